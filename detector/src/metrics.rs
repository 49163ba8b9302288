//! Prometheus metrics endpoint of the daemon.
//!
//! [`Metrics`] holds the daemon's counters and gauges in a
//! [`prometheus_client`] registry; [`serve`] exposes them as
//! `GET /metrics` in the classic Prometheus text format
//! (`text/plain; version=0.0.4`).
//!
//! ## Why per-storm series are optional and capped
//! The endpoint has no authentication: whoever can connect to the port can
//! read it, and on a loopback port that is *any local user*. The aggregate
//! series (flows tracked, storms active, connect attempts by outcome, drops,
//! incidents) reveal little, but the per-storm series
//! `stormguard_storm_attempts_per_second{comm,destination}` name other
//! users' processes and the hosts they talk to. They are therefore only
//! exported when asked for (`per_storm`), and at most `per_storm_max` of them
//! (the highest rates), which also bounds the label cardinality a misbehaving
//! host can push into the scraper's time-series database.
//!
//! ## Format
//! `prometheus_client` writes OpenMetrics text, in which a counter family is
//! declared without its `_total` suffix (`# TYPE x counter` followed by
//! `x_total 3`) and the exposition ends with `# EOF`. A classic text-format
//! parser, which is what a `text/plain; version=0.0.4` response is read with
//! (Python's `prometheus_client.parser`, checked by hand), then files the
//! `x_total` samples under a separate untyped family and the counter family
//! stays empty. [`Metrics::encode`] therefore omits `# EOF` and renames
//! counter `# HELP`/`# TYPE` lines to the sample name, which is valid in both
//! readings.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE as CONTENT_TYPE_HEADER;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// `Content-Type` of the `/metrics` response: the classic Prometheus text
/// exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Outcome labels accepted by [`Metrics::add_connect_attempts`]; their series
/// exist (at 0) from the start.
pub const CONNECT_OUTCOMES: [&str; 4] = ["established", "failed", "closed", "before_syn"];

/// Name of the per-storm gauge family, without the registry prefix.
const STORM_RATE_NAME: &str = "storm_attempts_per_second";
const STORM_RATE_HELP: &str = "Connection attempts per second of an active retry storm, by process \
     name (comm) and destination; only the highest rates are exported.";

const CONNECT_ATTEMPTS_NAME: &str = "connect_attempts";
const CONNECT_ATTEMPTS_HELP: &str =
    "Outbound connection attempts seen, by outcome (established, failed, closed, before_syn).";

/// The daemon's metrics. All setters take `&self` and are cheap; share it as
/// `Arc<Metrics>` between the pipeline and [`serve`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    flows_tracked: Gauge<u64, AtomicU64>,
    storms_active: Gauge<u64, AtomicU64>,
    connect_attempts: Arc<ConnectAttempts>,
    events_dropped: Counter,
    incidents: Counter,
    /// Per signal of [`crate::kernel::coverage`]: given by this kernel?
    signal_available: Family<Vec<(String, String)>, Gauge<u64, AtomicU64>>,
    /// Per signal: through a stand-in, an approximation, or only in part?
    signal_degraded: Family<Vec<(String, String)>, Gauge<u64, AtomicU64>>,
    /// `None` when per-storm series are disabled.
    storms: Option<Arc<StormSeries>>,
    per_storm_max: usize,
}

impl Metrics {
    /// Creates the registry. `per_storm`: whether per-storm series (labels
    /// `comm`, `destination`) are exported at all; `per_storm_max`: how many
    /// at most.
    pub fn new(per_storm: bool, per_storm_max: usize) -> Metrics {
        let mut registry = Registry::with_prefix("stormguard");
        // `register` appends a '.' to each help text; collectors' texts are
        // written as they are.

        let flows_tracked = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "flows_tracked",
            "Flows (one process talking to one destination) currently tracked",
            flows_tracked.clone(),
        );
        let storms_active = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "storms_active",
            "Retry storms currently detected",
            storms_active.clone(),
        );
        // A collector rather than a `Family`: every outcome is exported (at 0
        // before its first attempt) and in a fixed order.
        let connect_attempts = Arc::new(ConnectAttempts::default());
        registry.register_collector(Box::new(Arc::clone(&connect_attempts)));
        let events_dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Events the kernel side lost: ring buffer full, or a bounded kernel map refused to \
             track an attempt",
            events_dropped.clone(),
        );
        let incidents = Counter::default();
        registry.register(
            "incidents",
            "Retry-storm incidents recorded",
            incidents.clone(),
        );

        let signal_available = Family::<Vec<(String, String)>, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "signal_available",
            "1 when this kernel gives stormguard the signal (connects, sends, ...), 0 when it is \
             a gap (see `stormguard doctor`)",
            signal_available.clone(),
        );
        let signal_degraded = Family::<Vec<(String, String)>, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "signal_degraded",
            "1 when the signal comes through a stand-in hook, an approximation, or only in part",
            signal_degraded.clone(),
        );

        let storms = per_storm.then(|| Arc::new(StormSeries::default()));
        if let Some(storms) = &storms {
            registry.register_collector(Box::new(Arc::clone(storms)));
        }

        Metrics {
            registry,
            flows_tracked,
            storms_active,
            connect_attempts,
            events_dropped,
            incidents,
            signal_available,
            signal_degraded,
            storms,
            per_storm_max,
        }
    }

    /// Sets `stormguard_signal_available` and `stormguard_signal_degraded`
    /// from what the kernel gave at start.
    pub fn set_signals(&self, signals: &[crate::kernel::Signal]) {
        for s in signals {
            let label = vec![("signal".to_string(), s.name.to_string())];
            self.signal_available
                .get_or_create(&label)
                .set(u64::from(s.available()));
            self.signal_degraded
                .get_or_create(&label)
                .set(u64::from(s.degraded() || s.fallback.is_some()));
        }
    }

    /// Sets `stormguard_flows_tracked`.
    pub fn set_flows_tracked(&self, n: u64) {
        self.flows_tracked.set(n);
    }

    /// Sets `stormguard_storms_active`.
    pub fn set_storms_active(&self, n: u64) {
        self.storms_active.set(n);
    }

    /// Adds `n` to `stormguard_connect_attempts_total{outcome}`. `outcome`
    /// must be one of [`CONNECT_OUTCOMES`]; other values are ignored (and
    /// logged at debug level) so that label cardinality stays fixed.
    pub fn add_connect_attempts(&self, outcome: &str, n: u64) {
        let Some(index) = CONNECT_OUTCOMES.iter().position(|o| *o == outcome) else {
            tracing::debug!(outcome, "ignoring connect attempts with unknown outcome");
            return;
        };
        self.connect_attempts.by_outcome[index].inc_by(n);
    }

    /// Feeds `stormguard_events_dropped_total` with the running total of
    /// events the kernel side dropped; a value below the current one is
    /// ignored, so the counter never goes backwards.
    pub fn set_events_dropped_total(&self, total: u64) {
        self.events_dropped
            .inner()
            .fetch_max(total, Ordering::Relaxed);
    }

    /// Feeds `stormguard_incidents_total` with the running total of incidents
    /// recorded; a value below the current one is ignored.
    pub fn set_incidents_total(&self, total: u64) {
        self.incidents.inner().fetch_max(total, Ordering::Relaxed);
    }

    /// Replaces the per-storm series with one
    /// `stormguard_storm_attempts_per_second{comm,destination}` per entry of
    /// `storms` (`(comm, destination, attempts per second)`): at most
    /// `per_storm_max`, highest rates first, none when per-storm series are
    /// disabled. Series of storms not in `storms` disappear. Entries with the
    /// same `(comm, destination)` are summed (two processes of the same name
    /// hammering one destination), and non-finite or negative rates are
    /// dropped.
    pub fn set_active_storms(&self, storms: &[(String, String, f64)]) {
        let Some(series) = &self.storms else {
            return;
        };
        let mut merged: BTreeMap<(&str, &str), f64> = BTreeMap::new();
        for (comm, destination, rate) in storms {
            if rate.is_finite() && *rate >= 0.0 {
                *merged
                    .entry((comm.as_str(), destination.as_str()))
                    .or_default() += rate;
            }
        }
        let mut rows: Vec<StormRow> = merged
            .into_iter()
            .map(|((comm, destination), rate)| StormRow {
                comm: comm.to_owned(),
                destination: destination.to_owned(),
                rate,
            })
            .collect();
        // Highest rate first; ties in label order so the output is stable.
        rows.sort_by(|a, b| {
            b.rate
                .total_cmp(&a.rate)
                .then_with(|| a.comm.cmp(&b.comm))
                .then_with(|| a.destination.cmp(&b.destination))
        });
        rows.truncate(self.per_storm_max);
        *series.rows.lock().unwrap_or_else(PoisonError::into_inner) = rows;
    }

    /// The metrics in the classic Prometheus text exposition format (also
    /// valid OpenMetrics apart from the missing `# EOF`).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(err) =
            prometheus_client::encoding::text::encode_registry(&mut text, &self.registry)
        {
            // Writing to a String cannot fail; an error here comes from an
            // encoder rejecting a value. Serve what was written.
            tracing::warn!(%err, "encoding metrics failed; output is partial");
        }
        to_classic_text(&text)
    }
}

/// Rewrites `prometheus_client`'s OpenMetrics text so that classic
/// text-format parsers accept it: counter families are declared under their
/// sample name (`x_total`), and any `# EOF` line is dropped.
fn to_classic_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "].into_iter().find_map(|kind| {
            let rest = line.strip_prefix(kind)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then_some((kind, name, tail))
        });
        match descriptor {
            Some((kind, name, tail)) => {
                out.push_str(kind);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// `stormguard_connect_attempts_total{outcome}`, one counter per entry of
/// [`CONNECT_OUTCOMES`], encoded in that order.
#[derive(Debug, Default)]
struct ConnectAttempts {
    by_outcome: [Counter; CONNECT_OUTCOMES.len()],
}

impl Collector for ConnectAttempts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            CONNECT_ATTEMPTS_NAME,
            CONNECT_ATTEMPTS_HELP,
            None,
            MetricType::Counter,
        )?;
        for (outcome, counter) in CONNECT_OUTCOMES.iter().zip(&self.by_outcome) {
            let labels = [("outcome", *outcome)];
            counter.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct StormRow {
    comm: String,
    destination: String,
    rate: f64,
}

/// The per-storm gauge family, encoded in stored order (highest rate first),
/// which a `Family` (a hash map) would not keep.
#[derive(Debug, Default)]
struct StormSeries {
    rows: Mutex<Vec<StormRow>>,
}

impl Collector for StormSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        if rows.is_empty() {
            return Ok(());
        }
        let mut family =
            encoder.encode_descriptor(STORM_RATE_NAME, STORM_RATE_HELP, None, MetricType::Gauge)?;
        for row in rows.iter() {
            let labels = [
                ("comm", row.comm.as_str()),
                ("destination", row.destination.as_str()),
            ];
            ConstGauge::new(row.rate).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(CONTENT_TYPE_HEADER, CONTENT_TYPE)], metrics.encode())
}

/// Serves `GET /metrics` ([`CONTENT_TYPE`]) on `listener` until `shutdown`
/// completes, then finishes in-flight requests and returns. Other paths get
/// 404, other methods on `/metrics` 405.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn storm(comm: &str, destination: &str, rate: f64) -> (String, String, f64) {
        (comm.to_owned(), destination.to_owned(), rate)
    }

    /// Sample lines (not comments) whose name is `name`.
    fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .collect()
    }

    #[test]
    fn encodes_aggregate_series_with_help_and_type() {
        let m = Metrics::new(false, 10);
        m.set_flows_tracked(12);
        m.set_storms_active(2);
        m.add_connect_attempts("established", 5);
        m.add_connect_attempts("failed", 7);
        m.add_connect_attempts("failed", 3);
        m.set_events_dropped_total(4);
        m.set_incidents_total(1);
        let text = m.encode();

        for line in [
            "stormguard_flows_tracked 12",
            "stormguard_storms_active 2",
            "stormguard_connect_attempts_total{outcome=\"established\"} 5",
            "stormguard_connect_attempts_total{outcome=\"failed\"} 10",
            "stormguard_connect_attempts_total{outcome=\"closed\"} 0",
            "stormguard_connect_attempts_total{outcome=\"before_syn\"} 0",
            "stormguard_events_dropped_total 4",
            "stormguard_incidents_total 1",
            "# TYPE stormguard_flows_tracked gauge",
            "# TYPE stormguard_storms_active gauge",
            "# TYPE stormguard_connect_attempts_total counter",
            "# TYPE stormguard_events_dropped_total counter",
            "# TYPE stormguard_incidents_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        for name in [
            "stormguard_flows_tracked",
            "stormguard_storms_active",
            "stormguard_connect_attempts_total",
            "stormguard_events_dropped_total",
            "stormguard_incidents_total",
        ] {
            let help = format!("# HELP {name} ");
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&help) && l.len() > help.len()),
                "no HELP for {name} in:\n{text}"
            );
        }
        assert_eq!(
            samples(&text, "stormguard_connect_attempts_total"),
            [
                "stormguard_connect_attempts_total{outcome=\"established\"} 5",
                "stormguard_connect_attempts_total{outcome=\"failed\"} 10",
                "stormguard_connect_attempts_total{outcome=\"closed\"} 0",
                "stormguard_connect_attempts_total{outcome=\"before_syn\"} 0",
            ],
            "outcomes in CONNECT_OUTCOMES order"
        );
        assert!(
            text.lines()
                .filter(|l| l.starts_with("# HELP "))
                .all(|l| !l.ends_with("..")),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("_total_total"), "{text}");
        assert!(!text.contains("storm_attempts_per_second"), "{text}");
    }

    #[test]
    fn unknown_outcome_is_ignored() {
        let m = Metrics::new(false, 10);
        m.add_connect_attempts("bogus", 3);
        let text = m.encode();
        assert!(!text.contains("bogus"), "{text}");
        assert_eq!(samples(&text, "stormguard_connect_attempts_total").len(), 4);
    }

    #[test]
    fn running_total_counters_never_go_backwards() {
        let m = Metrics::new(false, 10);
        m.set_events_dropped_total(10);
        m.set_events_dropped_total(7);
        m.set_incidents_total(3);
        m.set_incidents_total(0);
        let text = m.encode();
        assert_eq!(
            samples(&text, "stormguard_events_dropped_total"),
            ["stormguard_events_dropped_total 10"]
        );
        assert_eq!(
            samples(&text, "stormguard_incidents_total"),
            ["stormguard_incidents_total 3"]
        );
        m.set_events_dropped_total(11);
        assert_eq!(
            samples(&m.encode(), "stormguard_events_dropped_total"),
            ["stormguard_events_dropped_total 11"]
        );
    }

    #[test]
    fn per_storm_series_are_capped_and_sorted_by_rate() {
        let m = Metrics::new(true, 2);
        m.set_active_storms(&[
            storm("curl", "10.0.0.1:443", 5.0),
            storm("java", "10.0.0.2:5432", 40.5),
            storm("python3", "[::1]:8080", 12.0),
        ]);
        let text = m.encode();
        assert_eq!(
            samples(&text, "stormguard_storm_attempts_per_second"),
            [
                "stormguard_storm_attempts_per_second{comm=\"java\",destination=\"10.0.0.2:5432\"} 40.5",
                "stormguard_storm_attempts_per_second{comm=\"python3\",destination=\"[::1]:8080\"} 12.0",
            ],
            "{text}"
        );
        assert!(
            text.contains("# TYPE stormguard_storm_attempts_per_second gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP stormguard_storm_attempts_per_second Connection attempts"),
            "{text}"
        );
    }

    #[test]
    fn per_storm_series_disappear_when_storm_ends() {
        let m = Metrics::new(true, 10);
        m.set_active_storms(&[
            storm("curl", "10.0.0.1:443", 5.0),
            storm("java", "10.0.0.2:5432", 9.0),
        ]);
        assert_eq!(
            samples(&m.encode(), "stormguard_storm_attempts_per_second").len(),
            2
        );
        m.set_active_storms(&[storm("java", "10.0.0.2:5432", 7.0)]);
        let text = m.encode();
        assert_eq!(
            samples(&text, "stormguard_storm_attempts_per_second"),
            [
                "stormguard_storm_attempts_per_second{comm=\"java\",destination=\"10.0.0.2:5432\"} 7.0"
            ]
        );
        m.set_active_storms(&[]);
        let text = m.encode();
        assert!(!text.contains("storm_attempts_per_second"), "{text}");
    }

    #[test]
    fn per_storm_series_absent_when_disabled() {
        let m = Metrics::new(false, 10);
        m.set_active_storms(&[storm("curl", "10.0.0.1:443", 5.0)]);
        let text = m.encode();
        assert!(!text.contains("storm_attempts_per_second"), "{text}");
        assert!(!text.contains("curl"), "{text}");

        // A cap of 0 exports none either.
        let m = Metrics::new(true, 0);
        m.set_active_storms(&[storm("curl", "10.0.0.1:443", 5.0)]);
        assert!(!m.encode().contains("curl"));
    }

    #[test]
    fn per_storm_duplicates_are_summed_and_bad_rates_dropped() {
        let m = Metrics::new(true, 10);
        m.set_active_storms(&[
            storm("curl", "10.0.0.1:443", 2.5),
            storm("curl", "10.0.0.1:443", 1.5),
            storm("nan", "x", f64::NAN),
            storm("inf", "x", f64::INFINITY),
            storm("neg", "x", -1.0),
        ]);
        assert_eq!(
            samples(&m.encode(), "stormguard_storm_attempts_per_second"),
            [
                "stormguard_storm_attempts_per_second{comm=\"curl\",destination=\"10.0.0.1:443\"} 4.0"
            ]
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new(true, 10);
        m.set_active_storms(&[storm("evil\"} 1\nx", "a\\b", 1.0)]);
        let text = m.encode();
        assert!(
            text.contains(
                "stormguard_storm_attempts_per_second{comm=\"evil\\\"} 1\\nx\",destination=\"a\\\\b\"} 1.0\n"
            ),
            "{text}"
        );
    }

    /// Sends a raw HTTP/1.1 GET and returns (status line, headers, body).
    async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .expect("read response");
        let response = String::from_utf8(response).expect("utf-8 response");
        let (head, body) = response.split_once("\r\n\r\n").expect("header end");
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (
            status.to_owned(),
            headers.to_ascii_lowercase(),
            body.to_owned(),
        )
    }

    #[tokio::test]
    async fn serves_metrics_until_shutdown() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let metrics = Arc::new(Metrics::new(true, 5));
        metrics.set_flows_tracked(3);
        metrics.set_active_storms(&[storm("curl", "10.0.0.1:443", 2.0)]);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::clone(&metrics), async move {
            let _ = stop_rx.await;
        }));

        let (status, headers, body) =
            tokio::time::timeout(Duration::from_secs(10), http_get(addr, "/metrics"))
                .await
                .expect("GET /metrics timed out");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            headers
                .lines()
                .any(|h| h == "content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{headers}"
        );
        // The body is chunked or sized; either way it carries the encoding.
        assert!(body.contains("stormguard_flows_tracked 3\n"), "{body}");
        assert!(
            body.contains(
                "stormguard_storm_attempts_per_second{comm=\"curl\",destination=\"10.0.0.1:443\"} 2.0\n"
            ),
            "{body}"
        );

        let (status, _, _) =
            tokio::time::timeout(Duration::from_secs(10), http_get(addr, "/other"))
                .await
                .expect("GET /other timed out");
        assert_eq!(status, "HTTP/1.1 404 Not Found");

        stop_tx.send(()).expect("server still waiting for shutdown");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve did not end after shutdown")
            .expect("serve task panicked")
            .expect("serve returned an error");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "listener still open after shutdown"
        );
    }
}
