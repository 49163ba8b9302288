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
//! ## Health series have bounded labels
//! `stormguard_errors_total{kind}`, `stormguard_kernel_anomalies_total{kind}`
//! and `stormguard_table_*{table}` take their label values from the daemon,
//! not from the traffic: error kinds ("map_update", "store",
//! "probe_attach", "ring", "proc"...), anomaly kinds ("map_full",
//! "ring_reserve"...) and table names ("flows", "SUSPECTS"...) are small
//! fixed sets in the code. Each family still keeps at most
//! [`MAX_LABEL_VALUES`] values, so a bug cannot grow a scraper's database.
//!
//! ## The server is bounded
//! [`serve`] holds at most [`MAX_CONNECTIONS`] connections; one more is
//! closed as soon as it is accepted and counted in
//! `stormguard_metrics_connections_refused_total`. A connection that has
//! not sent complete request headers within [`HEADER_TIMEOUT`] — a new one,
//! or a keep-alive one idle after its last response — is closed. Without
//! these, any local user could hold enough idle connections to exhaust the
//! daemon's open files, and the next probe attach would fail.
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
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE as CONTENT_TYPE_HEADER;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// `Content-Type` of the `/metrics` response: the classic Prometheus text
/// exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Outcome labels accepted by [`Metrics::add_connect_attempts`]; their series
/// exist (at 0) from the start.
pub const CONNECT_OUTCOMES: [&str; 4] = ["established", "failed", "closed", "before_syn"];

/// Most distinct label values a health family ([`Metrics::set_errors`],
/// [`Metrics::set_tables`], [`Metrics::set_kernel_anomalies`]) keeps; more
/// are ignored (and logged at debug level).
pub const MAX_LABEL_VALUES: usize = 32;

/// Most connections [`serve`] holds at once.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connection may take to send complete request headers,
/// counted from its accept or from the end of its previous response.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest any one connection lives, whatever it does: a backstop against
/// a client that keeps sending requests slowly forever.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// How long [`serve`] waits for in-flight requests at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
    /// What active storms burn, summed (see `cost`), and the host's CPU.
    storm_cpu: Gauge<f64, AtomicU64>,
    storm_rss: Gauge<u64, AtomicU64>,
    host_cpu: Gauge<f64, AtomicU64>,
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
    errors: Arc<KindFamily>,
    kernel_anomalies: Arc<KindFamily>,
    tables: Arc<TableSeries>,
    store_failing: Gauge<u64, AtomicU64>,
    store_queued: Gauge<u64, AtomicU64>,
    store_dropped_writes: Counter,
    connections_refused: Counter,
    enforce_decisions: Arc<KindFamily>,
    enforce_budgets: Gauge<u64, AtomicU64>,
    enforce_attached: Gauge<u64, AtomicU64>,
    services: Arc<ServiceSeries>,
    notify: crate::notify::Counters,
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
        let storm_cpu = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "storm_cpu_cores",
            "CPU the processes of active retry storms used in the last second, in cores, summed",
            storm_cpu.clone(),
        );
        let storm_rss = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "storm_rss_bytes",
            "Resident memory of the processes of active retry storms, summed",
            storm_rss.clone(),
        );
        let host_cpu = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "host_cpu_ratio",
            "Busy share of all the host's CPUs in the last second (0-1), beside storm_cpu_cores",
            host_cpu.clone(),
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

        let errors = Arc::new(KindFamily::new(
            "errors",
            "Runtime errors the daemon survived since start, by kind.",
        ));
        registry.register_collector(Box::new(Arc::clone(&errors)));
        let kernel_anomalies = Arc::new(KindFamily::new(
            "kernel_anomalies",
            "Anomalies the eBPF programs reported since start (a full map, a failed ring \
             reservation, an unexpected state), by kind.",
        ));
        registry.register_collector(Box::new(Arc::clone(&kernel_anomalies)));
        let tables = Arc::new(TableSeries::default());
        registry.register_collector(Box::new(Arc::clone(&tables)));
        let enforce_decisions = Arc::new(KindFamily::new(
            "enforce_decisions",
            "Decisions of every budget since start, by kind: allowed, slowed, denied, \
             would_deny and would_slow (dry-run budgets), not_enforced (storms that got no \
             budget).",
        ));
        registry.register_collector(Box::new(Arc::clone(&enforce_decisions)));
        let enforce_budgets = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "enforce_budgets",
            "Budgets in force (manual and from storms)",
            enforce_budgets.clone(),
        );
        let enforce_attached = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "enforce_attached",
            "1 while the enforcement hooks are attached (only while a budget exists)",
            enforce_attached.clone(),
        );
        let store_failing = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "store_failing",
            "1 while writes to the incident database fail (detection goes on)",
            store_failing.clone(),
        );
        let store_queued = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "store_queued",
            "Incident writes waiting in the writer's queue",
            store_queued.clone(),
        );
        let store_dropped_writes = Counter::default();
        registry.register(
            "store_dropped_writes",
            "Incident writes given up on since start (queue full, or failed for good)",
            store_dropped_writes.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "metrics_connections_refused",
            "Connections to this endpoint closed at once because it already held its maximum",
            connections_refused.clone(),
        );

        let services = Arc::new(ServiceSeries::default());
        registry.register_collector(Box::new(Arc::clone(&services)));
        let notify = crate::notify::Counters::default();
        registry.register(
            "notify_sent",
            "Storm start/end notifications delivered ([[notify]])",
            notify.sent.clone(),
        );
        registry.register(
            "notify_failed",
            "Notifications given up on after every attempt failed",
            notify.failed.clone(),
        );
        registry.register(
            "notify_dropped",
            "Notifications never attempted: a queue was full, or min_interval",
            notify.dropped.clone(),
        );

        Metrics {
            registry,
            flows_tracked,
            storms_active,
            storm_cpu,
            storm_rss,
            host_cpu,
            connect_attempts,
            events_dropped,
            incidents,
            signal_available,
            signal_degraded,
            storms,
            per_storm_max,
            errors,
            kernel_anomalies,
            tables,
            store_failing,
            store_queued,
            store_dropped_writes,
            connections_refused,
            enforce_decisions,
            enforce_budgets,
            enforce_attached,
            services,
            notify,
        }
    }

    /// Whether storms are exported by service, and for how many services
    /// at most (`[metrics] per_service`, `per_service_max`; on, 64 by
    /// default).
    pub fn set_service_limits(&self, on: bool, max: usize) {
        let mut limits = self
            .services
            .limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *limits = on.then_some(max.max(1));
    }

    /// Sets the per-service series from the active storms: (service,
    /// attempts per second). Services beyond the most allowed — the ones
    /// with the fewest storms, then the lowest rates — are summed under
    /// `service="other"`, so a host with many containers cannot grow a
    /// scraper's database without bound.
    pub fn set_service_storms(&self, storms: &[(String, f64)]) {
        let Some(max) = *self
            .services
            .limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        else {
            return;
        };
        let mut merged: BTreeMap<&str, (u64, f64)> = BTreeMap::new();
        for (service, rate) in storms {
            let e = merged.entry(service.as_str()).or_default();
            e.0 += 1;
            if rate.is_finite() && *rate >= 0.0 {
                e.1 += rate;
            }
        }
        let mut rows: Vec<ServiceRow> = merged
            .into_iter()
            .map(|(service, (storms, rate))| ServiceRow {
                service: service.to_owned(),
                storms,
                rate,
            })
            .collect();
        rows.sort_by(|a, b| {
            b.storms
                .cmp(&a.storms)
                .then_with(|| b.rate.total_cmp(&a.rate))
                .then_with(|| a.service.cmp(&b.service))
        });
        if rows.len() > max {
            // One series is kept for "other" itself.
            let rest = rows.split_off(max - 1);
            rows.push(ServiceRow {
                service: "other".into(),
                storms: rest.iter().map(|r| r.storms).sum(),
                rate: rest.iter().map(|r| r.rate).sum(),
            });
        }
        *self
            .services
            .rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = rows;
    }

    /// The notify counters, for `notify::start` (clones share the values).
    pub fn notify_counters(&self) -> crate::notify::Counters {
        self.notify.clone()
    }

    /// Sets the enforcement series from the enforcer's summary.
    pub fn set_enforce(&self, s: &crate::enforce::EnforceSummary) {
        self.enforce_decisions.set(&BTreeMap::from([
            ("allowed".to_string(), s.allowed),
            ("slowed".to_string(), s.slowed),
            ("denied".to_string(), s.denied),
            ("would_deny".to_string(), s.would_deny),
            ("would_slow".to_string(), s.would_slow),
            ("not_enforced".to_string(), s.not_enforced),
        ]));
        self.enforce_budgets.set(s.budgets as u64);
        self.enforce_attached.set(u64::from(s.attached));
    }

    /// Feeds `stormguard_errors_total{kind}` with the running totals of
    /// errors survived, by kind (see [`crate::api::StatusView::errors`]).
    pub fn set_errors(&self, errors: &BTreeMap<String, u64>) {
        self.errors.set(errors);
    }

    /// Feeds `stormguard_kernel_anomalies_total{kind}` with the running
    /// totals of anomalies the eBPF programs reported, by kind.
    pub fn set_kernel_anomalies(&self, anomalies: &BTreeMap<String, u64>) {
        self.kernel_anomalies.set(anomalies);
    }

    /// Sets `stormguard_table_entries{table}` and
    /// `stormguard_table_capacity{table}`, and feeds
    /// `stormguard_table_evictions_total{table}`, from every bounded table
    /// and kernel map. Tables not listed disappear.
    pub fn set_tables(&self, tables: &[crate::api::TableView]) {
        self.tables.set(tables);
    }

    /// Sets `stormguard_store_failing` (0/1) and `stormguard_store_queued`,
    /// and feeds `stormguard_store_dropped_writes_total`.
    pub fn set_store(&self, store: &crate::api::StoreHealthView) {
        self.store_failing.set(u64::from(store.is_failing()));
        self.store_queued.set(store.queued);
        self.store_dropped_writes
            .inner()
            .fetch_max(store.dropped_writes, Ordering::Relaxed);
    }

    /// Counts one connection [`serve`] closed because it was full.
    fn refuse_connection(&self) {
        self.connections_refused.inc();
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

    /// Sets `stormguard_storm_cpu_cores`, `stormguard_storm_rss_bytes`
    /// and `stormguard_host_cpu_ratio` from the active incidents' costs.
    pub fn set_storm_cost<'a>(
        &self,
        costs: impl IntoIterator<Item = &'a crate::cost::Cost>,
        host_cpu: f64,
    ) {
        let (mut cpu, mut rss) = (0.0, 0);
        for c in costs {
            cpu += c.cpu_cores;
            rss += c.rss_bytes;
        }
        self.storm_cpu.set(cpu);
        self.storm_rss.set(rss);
        self.host_cpu.set(host_cpu);
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

/// A counter family with one label (`kind`) whose values come from a
/// small fixed set in the code, fed with running totals: a total never
/// goes backwards, a kind once seen stays, and at most
/// [`MAX_LABEL_VALUES`] kinds are kept.
#[derive(Debug)]
struct KindFamily {
    name: &'static str,
    help: &'static str,
    totals: Mutex<BTreeMap<String, u64>>,
}

impl KindFamily {
    fn new(name: &'static str, help: &'static str) -> KindFamily {
        KindFamily {
            name,
            help,
            totals: Mutex::new(BTreeMap::new()),
        }
    }

    fn set(&self, totals: &BTreeMap<String, u64>) {
        let mut kept = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        for (kind, total) in totals {
            if let Some(v) = kept.get_mut(kind) {
                *v = (*v).max(*total);
            } else if kept.len() < MAX_LABEL_VALUES {
                kept.insert(kind.clone(), *total);
            } else {
                tracing::debug!(family = self.name, kind, "too many label values; ignored");
            }
        }
    }
}

impl Collector for KindFamily {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        if totals.is_empty() {
            return Ok(());
        }
        let mut family =
            encoder.encode_descriptor(self.name, self.help, None, MetricType::Counter)?;
        for (kind, total) in totals.iter() {
            let labels = [("kind", kind.as_str())];
            ConstCounter::new(*total).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// `stormguard_table_entries`, `_capacity` and `_evictions_total`, by
/// table, in name order.
#[derive(Debug, Default)]
struct TableSeries {
    /// name → (entries, capacity, evictions).
    rows: Mutex<BTreeMap<String, (u64, u64, u64)>>,
}

impl TableSeries {
    fn set(&self, tables: &[crate::api::TableView]) {
        let mut rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = BTreeMap::new();
        for t in tables {
            if next.len() >= MAX_LABEL_VALUES && !next.contains_key(&t.name) {
                tracing::debug!(table = %t.name, "too many tables; ignored");
                continue;
            }
            // The evictions counter never goes backwards.
            let before = rows.get(&t.name).map_or(0, |r| r.2);
            next.insert(
                t.name.clone(),
                (t.entries, t.capacity, t.evictions.max(before)),
            );
        }
        *rows = next;
    }
}

impl Collector for TableSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        if rows.is_empty() {
            return Ok(());
        }
        {
            let mut family = encoder.encode_descriptor(
                "table_entries",
                "Entries in a bounded table or kernel map.",
                None,
                MetricType::Gauge,
            )?;
            for (name, (entries, _, _)) in rows.iter() {
                ConstGauge::new(*entries).encode(family.encode_family(&[("table", name)])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "table_capacity",
                "Most entries a bounded table or kernel map holds.",
                None,
                MetricType::Gauge,
            )?;
            for (name, (_, capacity, _)) in rows.iter() {
                ConstGauge::new(*capacity).encode(family.encode_family(&[("table", name)])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "table_evictions",
            "Entries pushed out of a bounded table or kernel map to make room, since start.",
            None,
            MetricType::Counter,
        )?;
        for (name, (_, _, evictions)) in rows.iter() {
            ConstCounter::new(*evictions).encode(family.encode_family(&[("table", name)])?)?;
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

#[derive(Debug)]
struct ServiceRow {
    service: String,
    storms: u64,
    rate: f64,
}

/// Storms by service: the count and summed rate of active storms per
/// service, most storms first. Both descriptors are written even with no
/// storm, so a dashboard or rule finds the names on a quiet host.
#[derive(Debug)]
struct ServiceSeries {
    rows: Mutex<Vec<ServiceRow>>,
    /// None: not exported; Some(n): at most n series each.
    limits: Mutex<Option<usize>>,
}

impl Default for ServiceSeries {
    fn default() -> Self {
        ServiceSeries {
            rows: Mutex::new(Vec::new()),
            limits: Mutex::new(Some(64)),
        }
    }
}

impl Collector for ServiceSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self
            .limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
        {
            return Ok(());
        }
        let rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut family = encoder.encode_descriptor(
                "service_storms_active",
                "Retry storms currently detected, by service (systemd unit, container, \
                 namespace/pod, or host).",
                None,
                MetricType::Gauge,
            )?;
            for row in rows.iter() {
                ConstGauge::new(row.storms)
                    .encode(family.encode_family(&[("service", row.service.as_str())])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "service_storm_attempts_per_second",
            "Attempts per second of the active retry storms of a service, summed.",
            None,
            MetricType::Gauge,
        )?;
        for row in rows.iter() {
            ConstGauge::new(row.rate)
                .encode(family.encode_family(&[("service", row.service.as_str())])?)?;
        }
        Ok(())
    }
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(CONTENT_TYPE_HEADER, CONTENT_TYPE)], metrics.encode())
}

/// Bounds of [`serve_with`]; [`serve`] uses the defaults
/// ([`MAX_CONNECTIONS`], [`HEADER_TIMEOUT`]).
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Most connections held at once; more are closed when accepted.
    pub max_connections: usize,
    /// Time to send complete request headers, from the accept or from the
    /// end of the previous response.
    pub header_timeout: Duration,
    /// Longest a connection lives, whatever it does.
    pub lifetime: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
            lifetime: CONNECTION_LIFETIME,
        }
    }
}

/// Serves `GET /metrics` ([`CONTENT_TYPE`]) on `listener` until `shutdown`
/// completes, then finishes in-flight requests (for up to 5 s) and returns.
/// Other paths get 404, other methods on `/metrics` 405. Bounded as the
/// module docs say.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, metrics, ServeLimits::default(), shutdown).await
}

/// [`serve`] with explicit bounds (tests use short ones).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};

    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(Arc::clone(&metrics));
    let service = hyper_util::service::TowerToHyperService::new(app);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // The timer starts whenever hyper waits for a request head: right after
    // the accept, and after each response on a keep-alive connection. So
    // it bounds both slow headers and idle keep-alive connections.
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut backoff = crate::api::backoff::AcceptBackoff::default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff.reset();
                stream
            }
            Err(error) => {
                let wait = backoff.failed("metrics", &error);
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            // Closed at once: a full server holds no more descriptors.
            metrics.refuse_connection();
            drop(stream);
            continue;
        };
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(limits.lifetime, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%error, "metrics connection ended"),
                Err(_) => tracing::debug!("metrics connection closed at its lifetime"),
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("metrics: connections still open at shutdown were dropped");
    }
    Ok(())
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
    fn storms_by_service_are_bounded_and_on_by_default() {
        let m = Metrics::new(false, 10);
        let text = m.encode();
        // Declared before any storm, so rules and dashboards find them.
        assert!(
            text.contains("# TYPE stormguard_service_storms_active gauge\n"),
            "{text}"
        );
        let s = |name: &str, rate: f64| (name.to_string(), rate);
        m.set_service_storms(&[
            s("nginx.service", 10.0),
            s("shop/checkout-1", 50.0),
            s("nginx.service", 5.0),
            s("host", 1.0),
        ]);
        let text = m.encode();
        assert_eq!(
            samples(&text, "stormguard_service_storms_active"),
            [
                "stormguard_service_storms_active{service=\"nginx.service\"} 2",
                "stormguard_service_storms_active{service=\"shop/checkout-1\"} 1",
                "stormguard_service_storms_active{service=\"host\"} 1",
            ],
            "{text}"
        );
        assert_eq!(
            samples(&text, "stormguard_service_storm_attempts_per_second")[0],
            "stormguard_service_storm_attempts_per_second{service=\"nginx.service\"} 15.0"
        );
        // 100 services, at most 3 series: the two busiest and "other".
        m.set_service_limits(true, 3);
        let many: Vec<(String, f64)> = (0..100)
            .map(|i| (format!("u{i:03}.service"), i as f64))
            .collect();
        m.set_service_storms(&many);
        let text = m.encode();
        assert_eq!(
            samples(&text, "stormguard_service_storms_active"),
            [
                "stormguard_service_storms_active{service=\"u099.service\"} 1",
                "stormguard_service_storms_active{service=\"u098.service\"} 1",
                "stormguard_service_storms_active{service=\"other\"} 98",
            ],
            "{text}"
        );
        m.set_service_limits(false, 3);
        assert!(!m.encode().contains("stormguard_service_"));
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
        assert!(
            !text.contains("stormguard_storm_attempts_per_second"),
            "{text}"
        );
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
        assert!(
            !text.contains("stormguard_storm_attempts_per_second"),
            "{text}"
        );
    }

    #[test]
    fn per_storm_series_absent_when_disabled() {
        let m = Metrics::new(false, 10);
        m.set_active_storms(&[storm("curl", "10.0.0.1:443", 5.0)]);
        let text = m.encode();
        assert!(
            !text.contains("stormguard_storm_attempts_per_second"),
            "{text}"
        );
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

    #[test]
    fn health_series_render_exactly() {
        let m = Metrics::new(false, 10);
        let text = m.encode();
        for absent in ["stormguard_errors", "kernel_anomalies", "stormguard_table_"] {
            assert!(!text.contains(absent), "{absent} before any value:\n{text}");
        }
        assert_eq!(
            samples(&text, "stormguard_store_failing"),
            ["stormguard_store_failing 0"]
        );

        let totals = |kv: &[(&str, u64)]| -> BTreeMap<String, u64> {
            kv.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        m.set_errors(&totals(&[("store", 3), ("map_update", 1)]));
        m.set_kernel_anomalies(&totals(&[("ring_reserve", 9), ("map_full", 2)]));
        m.set_tables(&[
            crate::api::TableView {
                name: "flows".into(),
                entries: 120,
                capacity: 10_000,
                evictions: 0,
            },
            crate::api::TableView {
                name: "SUSPECTS".into(),
                entries: 4096,
                capacity: 4096,
                evictions: 17,
            },
        ]);
        m.set_store(&crate::api::StoreHealthView {
            state: "failing".into(),
            last_error: Some("disk full".into()),
            queued: 40,
            dropped_writes: 5,
        });
        let text = m.encode();
        let expect: &[(&str, &[&str])] = &[
            (
                "stormguard_errors_total",
                &[
                    "stormguard_errors_total{kind=\"map_update\"} 1",
                    "stormguard_errors_total{kind=\"store\"} 3",
                ],
            ),
            (
                "stormguard_kernel_anomalies_total",
                &[
                    "stormguard_kernel_anomalies_total{kind=\"map_full\"} 2",
                    "stormguard_kernel_anomalies_total{kind=\"ring_reserve\"} 9",
                ],
            ),
            (
                "stormguard_table_entries",
                &[
                    "stormguard_table_entries{table=\"SUSPECTS\"} 4096",
                    "stormguard_table_entries{table=\"flows\"} 120",
                ],
            ),
            (
                "stormguard_table_capacity",
                &[
                    "stormguard_table_capacity{table=\"SUSPECTS\"} 4096",
                    "stormguard_table_capacity{table=\"flows\"} 10000",
                ],
            ),
            (
                "stormguard_table_evictions_total",
                &[
                    "stormguard_table_evictions_total{table=\"SUSPECTS\"} 17",
                    "stormguard_table_evictions_total{table=\"flows\"} 0",
                ],
            ),
            ("stormguard_store_failing", &["stormguard_store_failing 1"]),
            ("stormguard_store_queued", &["stormguard_store_queued 40"]),
            (
                "stormguard_store_dropped_writes_total",
                &["stormguard_store_dropped_writes_total 5"],
            ),
            (
                "stormguard_metrics_connections_refused_total",
                &["stormguard_metrics_connections_refused_total 0"],
            ),
        ];
        for (name, lines) in expect {
            assert_eq!(samples(&text, name), *lines, "{text}");
        }
        for line in [
            "# TYPE stormguard_errors_total counter",
            "# TYPE stormguard_kernel_anomalies_total counter",
            "# TYPE stormguard_table_entries gauge",
            "# TYPE stormguard_table_capacity gauge",
            "# TYPE stormguard_table_evictions_total counter",
            "# TYPE stormguard_store_failing gauge",
            "# TYPE stormguard_store_queued gauge",
            "# TYPE stormguard_store_dropped_writes_total counter",
            "# TYPE stormguard_metrics_connections_refused_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?}:\n{text}");
        }

        // Counters never go back; gauges follow; kinds once seen stay.
        m.set_errors(&totals(&[("store", 2)]));
        m.set_tables(&[crate::api::TableView {
            name: "SUSPECTS".into(),
            entries: 10,
            capacity: 4096,
            evictions: 3,
        }]);
        m.set_store(&crate::api::StoreHealthView::default());
        let text = m.encode();
        assert_eq!(
            samples(&text, "stormguard_errors_total"),
            [
                "stormguard_errors_total{kind=\"map_update\"} 1",
                "stormguard_errors_total{kind=\"store\"} 3",
            ]
        );
        assert_eq!(
            samples(&text, "stormguard_table_entries"),
            ["stormguard_table_entries{table=\"SUSPECTS\"} 10"]
        );
        assert_eq!(
            samples(&text, "stormguard_table_evictions_total"),
            ["stormguard_table_evictions_total{table=\"SUSPECTS\"} 17"]
        );
        assert_eq!(
            samples(&text, "stormguard_store_failing"),
            ["stormguard_store_failing 0"]
        );
        assert_eq!(
            samples(&text, "stormguard_store_dropped_writes_total"),
            ["stormguard_store_dropped_writes_total 5"]
        );
    }

    #[test]
    fn label_values_are_capped() {
        let m = Metrics::new(false, 10);
        let many: BTreeMap<String, u64> = (0..100).map(|i| (format!("k{i:03}"), 1)).collect();
        m.set_errors(&many);
        m.set_tables(
            &(0..100)
                .map(|i| crate::api::TableView {
                    name: format!("t{i:03}"),
                    entries: 1,
                    capacity: 2,
                    evictions: 0,
                })
                .collect::<Vec<_>>(),
        );
        let text = m.encode();
        assert_eq!(
            samples(&text, "stormguard_errors_total").len(),
            MAX_LABEL_VALUES
        );
        assert_eq!(
            samples(&text, "stormguard_table_entries").len(),
            MAX_LABEL_VALUES
        );
    }

    /// Reads until EOF; the time it took, or None if `bound` passed.
    async fn eof_after(s: &mut tokio::net::TcpStream, bound: Duration) -> Option<Duration> {
        let start = tokio::time::Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(start + bound, s.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn connections_are_capped_and_idle_ones_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::new(false, 10));
        let limits = ServeLimits {
            max_connections: 2,
            header_timeout: Duration::from_millis(500),
            lifetime: Duration::from_secs(60),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_with(
            listener,
            Arc::clone(&metrics),
            limits,
            async move {
                let _ = stop_rx.await;
            },
        ));
        let connect = || tokio::net::TcpStream::connect(addr);
        // One keep-alive client that sends a request, one that sends
        // nothing, one partial header: the third is over the cap.
        let mut keep = connect().await.unwrap();
        keep.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut silent = connect().await.unwrap();
        // Give the server time to accept both before the next.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut over = connect().await.unwrap();
        let took = eof_after(&mut over, Duration::from_secs(5)).await;
        assert!(
            took.is_some_and(|t| t < Duration::from_millis(400)),
            "{took:?}"
        );
        assert_eq!(
            samples(
                &metrics.encode(),
                "stormguard_metrics_connections_refused_total"
            ),
            ["stormguard_metrics_connections_refused_total 1"]
        );
        // The silent one and the idle keep-alive one are closed after the
        // header timeout, not before.
        let silent_took = eof_after(&mut silent, Duration::from_secs(5)).await;
        let keep_took = eof_after(&mut keep, Duration::from_secs(5)).await;
        for took in [silent_took, keep_took] {
            let t = took.expect("closed by the server");
            assert!(t < Duration::from_secs(2), "{t:?}");
        }
        // Places are free again: a slow header is cut at the timeout.
        let mut slow = connect().await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let t = eof_after(&mut slow, Duration::from_secs(5))
            .await
            .expect("closed");
        assert!(
            t >= Duration::from_millis(400) && t < Duration::from_secs(2),
            "{t:?}"
        );
        let (status, _, _) = http_get(addr, "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve ends")
            .unwrap()
            .unwrap();
    }
}
