//! `stormguard status`: is it running, what is attached, what it sees.
use clap::Args;
use serde_json::Value;

use super::client::{ClientArgs, fmt_secs, print_json};
use crate::api::StatusView;

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
    println!(
        "stormguard {} (pid {}), up {}",
        s.version,
        s.pid,
        fmt_secs(s.uptime_s)
    );
    println!(
        "always-on probes ({}): {}",
        s.always_on.len(),
        s.always_on.join(", ")
    );
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
    println!(
        "on-demand probes ({}; {}): {state}",
        od.mode,
        od.hooks.join(", ")
    );
    println!("kernel {}", s.kernel);
    for (name, found) in &s.kernel_features {
        println!("kernel {name}: {found}");
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
        println!("signal {}: {what}", sig.name);
    }
    println!(
        "events {:.0}/s, ring-buffer drops {}, untracked attempts {}",
        s.events_per_s, s.ring_drops, s.untracked
    );
    println!(
        "flows tracked {}, storms active {}, incidents recorded {}",
        s.flows_tracked, s.storms_active, s.incidents_total
    );
    println!(
        "socket {}, database {}, metrics {}",
        s.socket, s.database, s.metrics
    );
    Ok(())
}
