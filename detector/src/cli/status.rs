//! `stormguard status`: is it running, what is attached, what it sees.
use clap::Args;
use serde_json::Value;

use super::client::{ClientArgs, fmt_secs, print_json};
use crate::api::{StatusView, TableView};

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let v = args.client.call("status", Value::Null)?;
    if args.client.json {
        return print_json(&v);
    }
    let s: StatusView = serde_json::from_value(v)?;
    super::write_stdout(&render(&s))
}

/// Share of its capacity from which a table is marked as nearly full.
const NEAR_FULL: f64 = 0.9;

/// Widest line of the tables block.
const TABLES_WIDTH: usize = 100;

/// The human form of a status, every line ending in a newline.
pub fn render(s: &StatusView) -> String {
    let mut out = Vec::new();
    out.push(format!(
        "stormguard {} (pid {}), up {}",
        s.version,
        s.pid,
        fmt_secs(s.uptime_s)
    ));
    // What needs attention first.
    for d in &s.degraded {
        out.push(format!("DEGRADED: {d}"));
    }
    out.push(format!(
        "always-on probes ({}): {}",
        s.always_on.len(),
        s.always_on.join(", ")
    ));
    let od = &s.on_demand;
    let state = if od.attached {
        format!(
            "attached {}s/{}s for pids {:?}",
            od.attached_for_s, od.max_attached_s, od.suspects
        )
    } else if od.cooling_down {
        "off (attach cap reached, cooling down)".into()
    } else {
        "off".into()
    };
    out.push(format!(
        "on-demand probes ({}; {}): {state}",
        od.mode,
        od.hooks.join(", ")
    ));
    out.push(format!("kernel {}", s.kernel));
    for (name, found) in &s.kernel_features {
        out.push(format!("kernel {name}: {found}"));
    }
    for sig in &s.signals {
        let what = if !sig.available {
            format!("MISSING — {} ({})", sig.without, sig.problems.join("; "))
        } else {
            let mut w = format!("via {}", sig.via.join(", "));
            if let Some(f) = &sig.fallback {
                w += &format!(" — {f}");
            }
            if !sig.problems.is_empty() {
                w += &format!(" — partial: {}", sig.problems.join("; "));
            }
            w
        };
        out.push(format!("signal {}: {what}", sig.name));
    }
    out.push(format!(
        "events {:.0}/s, ring-buffer drops {}, untracked attempts {}",
        s.events_per_s, s.ring_drops, s.untracked
    ));
    out.push(format!(
        "flows tracked {}, storms active {}, incidents recorded {}",
        s.flows_tracked, s.storms_active, s.incidents_total
    ));
    let st = &s.store;
    let mut store = if st.is_failing() {
        format!(
            "store FAILING: {}",
            st.last_error.as_deref().unwrap_or("unknown error")
        )
    } else {
        format!("store {}", st.state)
    };
    store += &format!(
        " (queued {}, dropped writes {})",
        st.queued, st.dropped_writes
    );
    out.push(store);
    if let Some(line) = counts_line("errors survived", &s.errors) {
        out.push(line);
    }
    if let Some(line) = counts_line("kernel anomalies", &s.kernel_anomalies) {
        out.push(line);
    }
    out.push(enforce_line(&s.enforce));
    out.extend(tables_block(&s.tables));
    out.push(format!(
        "socket {}, database {}, metrics {}",
        s.socket, s.database, s.metrics
    ));
    let mut text = String::new();
    for line in out {
        // One line each, whatever a message carries.
        text.push_str(&line.replace('\n', " "));
        text.push('\n');
    }
    text
}

/// "enforce: mode enforce, 2/64 budgets (hooks attached); allowed 50, denied 900".
fn enforce_line(e: &crate::enforce::EnforceSummary) -> String {
    let mode = if e.mode.is_empty() {
        "observe"
    } else {
        &e.mode
    };
    let mut line = format!(
        "enforce: mode {mode}, {}/{} budgets ({})",
        e.budgets,
        e.max_budgets,
        if e.attached {
            "hooks attached"
        } else {
            "nothing attached"
        }
    );
    let counts = [
        ("allowed", e.allowed),
        ("slowed", e.slowed),
        ("denied", e.denied),
        ("would deny", e.would_deny),
        ("would slow", e.would_slow),
        ("storms not enforced", e.not_enforced),
        ("errors", e.errors),
    ];
    let shown: Vec<String> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if !shown.is_empty() {
        line += &format!("; {}", shown.join(", "));
    }
    if !e.shaped_devices.is_empty() {
        line += &format!("; htb qdisc on {}", e.shaped_devices.join(", "));
    }
    if let Some(err) = &e.last_error {
        line += &format!("; last error: {err}");
    }
    line
}

/// "label: a 3, b 1" for the non-zero counts, None when there are none.
fn counts_line(label: &str, counts: &std::collections::BTreeMap<String, u64>) -> Option<String> {
    let parts: Vec<String> = counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    (!parts.is_empty()).then(|| format!("{label}: {}", parts.join(", ")))
}

/// Every table as `name entries/capacity`, marked when nearly full or
/// evicting, wrapped at [`TABLES_WIDTH`].
fn tables_block(tables: &[TableView]) -> Vec<String> {
    if tables.is_empty() {
        return Vec::new();
    }
    let mut lines = vec![format!(
        "tables ({}; entries/capacity, ! = over {:.0}% full):",
        tables.len(),
        NEAR_FULL * 100.0
    )];
    let mut line = String::new();
    for t in tables {
        let full = t.capacity > 0 && t.entries as f64 >= NEAR_FULL * t.capacity as f64;
        let mut item = format!(
            "{}{} {}/{}",
            if full { "!" } else { "" },
            t.name,
            t.entries,
            t.capacity
        );
        if t.evictions > 0 {
            item += &format!(" ({} evicted)", t.evictions);
        }
        if !line.is_empty() && line.len() + 2 + item.len() > TABLES_WIDTH {
            lines.push(std::mem::take(&mut line));
        }
        if line.is_empty() {
            line.push_str("  ");
        } else {
            line.push_str(", ");
        }
        line.push_str(&item);
    }
    lines.push(line);
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StoreHealthView;

    #[test]
    fn a_healthy_status_says_the_store_is_ok_and_nothing_else() {
        let s = StatusView {
            version: "0.1.0".into(),
            pid: 42,
            uptime_s: 61,
            ..Default::default()
        };
        let text = render(&s);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "stormguard 0.1.0 (pid 42), up 1m1s");
        assert!(
            lines.contains(&"store ok (queued 0, dropped writes 0)"),
            "{text}"
        );
        for absent in [
            "DEGRADED",
            "errors survived",
            "kernel anomalies",
            "tables (",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
    }

    #[test]
    fn degraded_store_errors_anomalies_and_tables_are_shown() {
        let s = StatusView {
            degraded: vec![
                "on-demand probes detached: EMFILE".into(),
                "store failing: disk full\nsecond line".into(),
            ],
            store: StoreHealthView {
                state: "failing".into(),
                last_error: Some("database or disk is full".into()),
                queued: 12,
                dropped_writes: 3,
            },
            errors: [
                ("store".to_string(), 4),
                ("map_update".to_string(), 2),
                ("ring".to_string(), 0),
            ]
            .into_iter()
            .collect(),
            kernel_anomalies: [("map_full".to_string(), 7)].into_iter().collect(),
            enforce: crate::enforce::EnforceSummary {
                mode: "dry-run".into(),
                budgets: 2,
                max_budgets: 64,
                attached: true,
                allowed: 50,
                would_deny: 900,
                ..Default::default()
            },
            tables: vec![
                TableView {
                    name: "flows".into(),
                    entries: 120,
                    capacity: 10_000,
                    evictions: 0,
                },
                TableView {
                    name: "SUSPECTS".into(),
                    entries: 4096,
                    capacity: 4096,
                    evictions: 12,
                },
            ],
            ..Default::default()
        };
        let text = render(&s);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "DEGRADED: on-demand probes detached: EMFILE");
        assert_eq!(lines[2], "DEGRADED: store failing: disk full second line");
        for line in [
            "store FAILING: database or disk is full (queued 12, dropped writes 3)",
            "errors survived: map_update 2, store 4",
            "kernel anomalies: map_full 7",
            "enforce: mode dry-run, 2/64 budgets (hooks attached); allowed 50, would deny 900",
            "tables (2; entries/capacity, ! = over 90% full):",
            "  flows 120/10000, !SUSPECTS 4096/4096 (12 evicted)",
        ] {
            assert!(lines.contains(&line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn many_tables_wrap() {
        let tables: Vec<TableView> = (0..20)
            .map(|i| TableView {
                name: format!("TABLE_{i}"),
                entries: 1,
                capacity: 65_536,
                evictions: 0,
            })
            .collect();
        let block = tables_block(&tables);
        assert!(block.len() > 2, "{block:?}");
        assert!(block.iter().all(|l| l.len() <= TABLES_WIDTH), "{block:?}");
        let items: usize = block[1..].iter().map(|l| l.split(", ").count()).sum();
        assert_eq!(items, 20);
    }
}
