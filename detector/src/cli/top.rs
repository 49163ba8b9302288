//! `stormguard top`: flows by attempts/s with verdicts, refreshed every
//! second. A full-screen view (ratatui) on a terminal; plain periodic
//! tables otherwise, so it can be piped or logged.
use std::{io::IsTerminal as _, time::Duration};

use clap::Args;
use ratatui::{
    crossterm::event::{self, Event, KeyCode},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Paragraph, Row, Table},
};
use serde_json::Value;

use super::client::{ClientArgs, fmt_secs};
use crate::api::{FlowView, StatusView};

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(200..=60_000))]
    pub interval_ms: u64,
    /// Stop after this many refreshes (default: until q or Ctrl-C).
    #[arg(long)]
    pub iterations: Option<u64>,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn fetch(client: &ClientArgs) -> anyhow::Result<(StatusView, Vec<FlowView>)> {
    let mut c = client.connect()?;
    let status = serde_json::from_value(c.call("status", Value::Null)?)?;
    let flows = serde_json::from_value(c.call("flows", Value::Null)?)?;
    Ok((status, flows))
}

pub fn run(args: TopArgs) -> anyhow::Result<()> {
    // Fail before touching the terminal if the daemon is not there.
    let first = fetch(&args.client)?;
    if args.client.json || !std::io::stdout().is_terminal() {
        plain(&args, first)
    } else {
        tui(&args, first)
    }
}

fn plain(args: &TopArgs, mut data: (StatusView, Vec<FlowView>)) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut n = 0;
    loop {
        let (status, flows) = &data;
        let mut out = String::new();
        if args.client.json {
            let _ = writeln!(
                out,
                "{}",
                serde_json::json!({"status": status, "flows": flows})
            );
        } else {
            let _ = writeln!(
                out,
                "stormguard up {} | flows {} | storms {} | events {:.0}/s | drops {}",
                fmt_secs(status.uptime_s),
                status.flows_tracked,
                status.storms_active,
                status.events_per_s,
                status.ring_drops
            );
            let _ = writeln!(
                out,
                "{:>7} {:<15} {:<20} {:<4} {:<26} {:>10} {:>10} {:>5} {:<16} VERDICT",
                "PID",
                "COMM",
                "SERVICE",
                "PROTO",
                "DESTINATION",
                "ATTEMPT/s",
                "FAIL/s",
                "CPU",
                "ERROR"
            );
            for f in flows.iter().take(20) {
                let _ = writeln!(
                    out,
                    "{:>7} {:<15} {:<20} {:<4} {:<26} {:>10.1} {:>10.1} {:>5} {:<16} {}",
                    f.pid,
                    f.comm,
                    service(f.service.as_deref(), 20),
                    f.proto,
                    f.destination,
                    f.attempts_per_s,
                    f.failures_per_s,
                    cpu(f.cpu_cores),
                    f.main_error.as_deref().unwrap_or("-"),
                    f.verdict
                );
            }
            out.push('\n');
        }
        super::write_stdout(&out)?;
        n += 1;
        if args.iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(args.interval_ms));
        data = fetch(&args.client)?;
    }
}

fn tui(args: &TopArgs, mut data: (StatusView, Vec<FlowView>)) -> anyhow::Result<()> {
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        let mut n = 0;
        loop {
            terminal.draw(|frame| {
                let (status, flows) = &data;
                let [head, body] =
                    Layout::vertical([Constraint::Length(3), Constraint::Min(3)]).areas(frame.area());
                let od = &status.on_demand;
                let probes = if od.attached {
                    format!("on-demand probes attached {}s/{}s", od.attached_for_s, od.max_attached_s)
                } else {
                    "on-demand probes off".into()
                };
                frame.render_widget(
                    Paragraph::new(Line::from(format!(
                        "up {} | flows {} | storms {} | incidents {} | events {:.0}/s | drops {} | {probes}   (q to quit)",
                        fmt_secs(status.uptime_s),
                        status.flows_tracked,
                        status.storms_active,
                        status.incidents_total,
                        status.events_per_s,
                        status.ring_drops,
                    )))
                    .block(Block::default().borders(Borders::ALL).title(" stormguard top ")),
                    head,
                );
                let rows = flows.iter().map(|f| {
                    let style = match f.verdict.as_str() {
                        "storm" => Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
                        "suspect" | "recovering" => Style::default().fg(Color::Yellow),
                        _ => Style::default(),
                    };
                    Row::new(vec![
                        f.pid.to_string(),
                        f.comm.clone(),
                        service(f.service.as_deref(), 20),
                        f.proto.clone(),
                        f.destination.clone(),
                        format!("{:.1}", f.attempts_per_s),
                        format!("{:.1}", f.failures_per_s),
                        cpu(f.cpu_cores),
                        f.main_error.clone().unwrap_or_else(|| "-".into()),
                        f.verdict.clone(),
                        f.explanation.clone().unwrap_or_default(),
                    ])
                    .style(style)
                });
                let widths = [
                    Constraint::Length(7),
                    Constraint::Length(15),
                    Constraint::Length(20),
                    Constraint::Length(5),
                    Constraint::Length(26),
                    Constraint::Length(10),
                    Constraint::Length(10),
                    Constraint::Length(5),
                    Constraint::Length(16),
                    Constraint::Length(10),
                    Constraint::Min(20),
                ];
                frame.render_widget(
                    Table::new(rows, widths)
                        .header(
                            Row::new(vec![
                                "PID", "COMM", "SERVICE", "PROTO", "DESTINATION", "ATTEMPT/s", "FAIL/s", "CPU", "ERROR",
                                "VERDICT", "WHY",
                            ])
                            .style(Style::default().add_modifier(Modifier::BOLD)),
                        )
                        .block(Block::default().borders(Borders::ALL)),
                    body,
                );
            })?;
            n += 1;
            if args.iterations.is_some_and(|max| n >= max) {
                return Ok(());
            }
            if event::poll(Duration::from_millis(args.interval_ms))?
                && let Event::Key(k) = event::read()?
                && matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
            {
                return Ok(());
            }
            data = fetch(&args.client)?;
        }
    })();
    ratatui::restore();
    result
}

/// A process's CPU in cores ("-" when not measured: only storming
/// processes are).
fn cpu(cores: Option<f64>) -> String {
    cores.map_or_else(|| "-".into(), |c| format!("{c:.2}"))
}

/// A service name in at most `width` columns ("-" when not known).
pub fn service(name: Option<&str>, width: usize) -> String {
    name.map_or_else(|| "-".into(), |n| super::keep_end(n, width))
}
