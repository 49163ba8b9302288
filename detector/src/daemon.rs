//! `stormguard daemon`: the always-on service. Loads the probes, runs the
//! engine, keeps incidents in SQLite, answers the local API, serves
//! Prometheus metrics, and tells systemd when it is ready.
//!
//! Order matters for "nothing half-applied": the configuration is read and
//! checked first, then the database, the socket and the metrics port are
//! claimed, and only then are the eBPF programs loaded.
//!
//! Threads, so that nothing a user or the disk does can stall the sensor
//! path: the service loop (ring drain, engine, incident tracking) runs on
//! the main thread; the API and metrics servers on their own thread and
//! runtime, reading snapshots the loop publishes each second and the
//! database through their own connection; incidents go to SQLite through
//! the writer thread's bounded queue (`service::writer`).
//!
//! Errors by kind: a problem found before READY ends the start (exit 2 for
//! the environment, see `cli::exit_code`); after READY every error is
//! counted (status `errors`, metric `stormguard_errors_total`), logged at a
//! bounded rate and survived.
use std::{
    cell::RefCell,
    path::{Path, PathBuf},
    rc::Rc,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Context as _;
use tokio::sync::broadcast;

use crate::{
    api::{
        FlowView, OnDemandView, StatusView, TableView,
        server::{Shared, now_ms},
        socket::bind_socket,
    },
    config::Config,
    detect::{State, VerdictChange},
    enforce,
    health::kind,
    incident::{self, IncidentTracker},
    ingest::failure,
    kernel::{self, Sensors},
    metrics::Metrics,
    pipeline::{OnDemand, Pipeline},
    service::writer::{QUEUE_MAX, StoreWriter},
    service::{self, Interval, Options},
    store::Store,
};

/// The daemon's state between ticks, shared by the two loop callbacks.
struct Daemon {
    config: Config,
    /// Kernel features found at start-up (read once).
    features: Vec<(String, String)>,
    /// Budgets, shared with the API thread.
    enforcer: Arc<enforce::Handle>,
    store: StoreWriter,
    tracker: IncidentTracker,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    limiter: LogLimiter,
    started: Instant,
    last_observed: u64,
    last_retention: Instant,
    /// Kernel map usage, refreshed every 10 s.
    last_map_usage: Option<Instant>,
    kernel_tables: Vec<TableView>,
    /// Samples what storms burn (CPU, RSS) for their incidents.
    cost: crate::cost::CostMeter,
    /// `[[notify]]`: storm starts and ends handed to the notify thread
    /// (None without notifiers).
    notify: Option<crate::notify::Handle>,
}

/// At most `per_second` verdict-change log lines per second; the rest are
/// counted and reported in one line.
struct LogLimiter {
    per_second: u32,
    window: Instant,
    used: u32,
    suppressed: u64,
}

impl LogLimiter {
    fn allow(&mut self) -> bool {
        if self.window.elapsed().as_secs() >= 1 {
            if self.suppressed > 0 {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "verdict changes not logged (rate limit)"
                );
            }
            self.window = Instant::now();
            self.used = 0;
            self.suppressed = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// Which config file to read: the one named, else the default if present.
pub fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    explicit.map(Path::to_path_buf).or_else(|| {
        Path::new(crate::config::DEFAULT_PATH)
            .exists()
            .then(|| PathBuf::from(crate::config::DEFAULT_PATH))
    })
}

fn notify(state: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(e) = sd_notify::notify(state)
    {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Raises the soft open-file limit to the hard one (systemd starts
/// services at a soft 1,024): probes, maps, links, the API's and the
/// metrics' connections all take descriptors, and running out in a storm
/// would cost the on-demand probes. Connections are capped on their own
/// (api, metrics), so this is headroom, not an invitation.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let goal = lim.rlim_max.min(65_536);
        if lim.rlim_cur < goal {
            let want = libc::rlimit {
                rlim_cur: goal,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                tracing::debug!(
                    from = lim.rlim_cur,
                    to = want.rlim_cur,
                    "raised the open-file limit"
                );
            }
        }
    }
}

/// A problem found before READY: the environment (configuration, files,
/// ports, capabilities, the kernel) is wrong, restarting cannot fix it, and
/// the daemon exits 2 (the unit's `RestartPreventExitStatus=2`). Nothing
/// after READY is one of these.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct StartError(pub anyhow::Error);

/// Runs the daemon until SIGTERM. Errors are [`StartError`]s (before
/// READY); after READY errors are counted and survived.
pub async fn run(config_file: Option<&Path>) -> anyhow::Result<()> {
    let ready = std::rc::Rc::new(std::cell::Cell::new(false));
    match serve(config_file, ready.clone()).await {
        Err(e) if !ready.get() => Err(StartError(e).into()),
        other => other,
    }
}

async fn serve(
    config_file: Option<&Path>,
    ready_flag: Rc<std::cell::Cell<bool>>,
) -> anyhow::Result<()> {
    raise_nofile();
    let path = config_path(config_file);
    let config = Config::load(path.as_deref())?;
    tracing::info!(config = ?path, "starting");

    let store = Store::open(&config.store.path)?;
    let closed = store.close_dangling("daemon stopped")?;
    if closed > 0 {
        tracing::info!(closed, "closed incidents left open by the previous run");
    }
    store.retain(
        now_ms(),
        config.store.retention_days,
        config.store.max_incidents,
    )?;

    let (listener, access) = bind_socket(&config.daemon)?;
    let metrics = Arc::new(Metrics::new(
        config.metrics.per_storm,
        config.metrics.per_storm_max,
    ));
    metrics.set_service_limits(config.metrics.per_service, config.metrics.per_service_max);
    let metrics_listener = match config.metrics.listen.as_str() {
        "off" => None,
        addr => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot serve metrics on {addr} (metrics.listen)"))?;
            widen_backlog(&l);
            Some(l)
        }
    };

    let enforcer = Arc::new(enforce::Handle(Mutex::new(enforce::Enforcer::new(
        config.enforce.clone(),
        std::fs::read_to_string("/proc/mounts")
            .ok()
            .and_then(|m| kernel::find_cgroup2(&m)),
        Some(enforce::persist::path_beside(&config.store.path)),
    ))));
    // A qdisc a killed daemon left goes before anything else is applied.
    for note in enforcer.lock().undo_qdiscs() {
        tracing::warn!("slowing: {note}");
    }
    for note in enforcer.lock().restore() {
        tracing::info!("budgets: {note}");
    }

    let (events, _) = broadcast::channel(1024);
    // Answerable from the first request, before the first second is over.
    let features = kernel::features();
    let initial = StatusView {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        kernel_features: features.clone(),
        kernel: kernel::coverage::kernel_release(),
        socket: config.daemon.socket.display().to_string(),
        database: config.store.path.display().to_string(),
        metrics: config.metrics.listen.clone(),
        ..Default::default()
    };
    let shared = Arc::new(Shared {
        status: Mutex::new(initial),
        flows: Mutex::new(Vec::new()),
        db_path: config.store.path.clone(),
        db: Mutex::new(None),
        events,
        control: Some(enforcer.clone()),
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let servers = spawn_servers(
        listener
            .into_std()
            .context("moving the API socket to its thread")?,
        access,
        metrics_listener,
        shared.clone(),
        metrics.clone(),
        stopped,
    )?;
    let store = StoreWriter::start(store, QUEUE_MAX)?;
    let notifier = crate::notify::start(&config.notify, metrics.notify_counters())?;
    if notifier.is_some() {
        tracing::info!(
            notifiers = config.notify.len(),
            "notifying storm starts and ends"
        );
    }

    let state = Rc::new(RefCell::new(Daemon {
        store,
        tracker: IncidentTracker::new(),
        cost: Default::default(),
        shared: shared.clone(),
        metrics,
        limiter: LogLimiter {
            per_second: 10,
            window: Instant::now(),
            used: 0,
            suppressed: 0,
        },
        started: Instant::now(),
        last_observed: 0,
        last_retention: Instant::now(),
        last_map_usage: None,
        kernel_tables: Vec::new(),
        config: config.clone(),
        features,
        enforcer: enforcer.clone(),
        notify: notifier,
    }));
    let on_ready = {
        let state = state.clone();
        Box::new(move |sensors: &Sensors| {
            ready_flag.set(true);
            let d = state.borrow();
            if let Ok(mut s) = d.shared.status.lock() {
                s.always_on = sensors.always_on();
                s.signals = sensors.signals().iter().map(Into::into).collect();
            }
            d.metrics.set_signals(sensors.signals());
            tracing::info!(
                socket = %d.config.daemon.socket.display(),
                metrics = %d.config.metrics.listen,
                "ready"
            );
            notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status("watching for retry storms"),
            ]);
        })
    };
    let changes_state = state.clone();
    let interval_state = state.clone();
    let result = service::drive(
        Options {
            config: config.clone(),
            interval_ms: 1000,
            duration: None,
            on_demand: config.on_demand(),
            probe_max_secs: config.probes.max_attached_secs,
            record: None,
            on_ready: Some(on_ready),
        },
        move |pipe, changes| {
            changes_state.borrow_mut().on_changes(pipe, changes);
            Ok(())
        },
        move |pipe, sensors, iv| {
            interval_state.borrow_mut().on_interval(pipe, sensors, iv);
            Ok(())
        },
    )
    .await;
    notify(&[sd_notify::NotifyState::Stopping]);
    // Budgets end with the daemon; manual ones are on disk for the next start.
    enforcer.lock().shutdown();
    let _ = stop.send(true);
    if servers.join().is_err() {
        tracing::warn!("the API thread panicked");
    }
    let Daemon {
        mut tracker,
        mut store,
        mut notify,
        ..
    } = Rc::try_unwrap(state)
        .map_err(|_| anyhow::anyhow!("daemon state still shared at exit"))?
        .into_inner();
    let mut tap = crate::notify::EndTap::new(&mut store, notify.is_some());
    if let Err(e) = tracker.close_all(&mut tap, now_ms(), "daemon stopped") {
        tracing::warn!(error = %e, "closing open incidents at exit");
    }
    let ended = std::mem::take(&mut tap.ended);
    if let Some(mut n) = notify.take() {
        for inc in &ended {
            n.send(crate::notify::EventKind::End, inc);
        }
        // Bounded: a hanging receiver must not hold the stop past systemd's.
        if !n.finish(std::time::Duration::from_secs(5)) {
            tracing::warn!("notify: not every notification was delivered before exit");
        }
    }
    if !store.close(std::time::Duration::from_secs(10)) {
        tracing::warn!("incident store: not all writes finished before exit");
    }
    let _ = std::fs::remove_file(&config.daemon.socket);
    tracing::info!("stopped");
    result
}

/// The API and metrics servers, on a thread and runtime of their own: a
/// thousand clients, a slow query or a follower that stopped reading cost
/// that thread, never the service loop's drain and ticks.
fn spawn_servers(
    api: std::os::unix::net::UnixListener,
    access: crate::api::server::Access,
    metrics_listener: Option<std::net::TcpListener>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the API runtime")?;
    api.set_nonblocking(true)?;
    if let Some(l) = &metrics_listener {
        l.set_nonblocking(true)?;
    }
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    std::thread::Builder::new()
        .name("sg-api".into())
        .spawn(move || {
            rt.block_on(async move {
                let api = match tokio::net::UnixListener::from_std(api) {
                    Ok(l) => tokio::spawn(crate::api::server::serve(
                        l,
                        shared,
                        access,
                        wait_stop(stopped.clone()),
                    )),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot serve the API");
                        return;
                    }
                };
                let metrics_task = metrics_listener
                    .and_then(|l| match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => Some(l),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot serve metrics");
                            None
                        }
                    })
                    .map(|l| tokio::spawn(crate::metrics::serve(l, metrics, wait_stop(stopped))));
                let _ = api.await;
                if let Some(m) = metrics_task {
                    let _ = m.await;
                }
            })
        })
        .context("starting the API thread")
}

impl Daemon {
    /// Every bounded table, user space and kernel, for status and metrics.
    fn tables(&self, pipe: &Pipeline) -> Vec<TableView> {
        let mut v: Vec<TableView> = pipe
            .tables()
            .into_iter()
            .map(|t| TableView {
                name: t.name.to_string(),
                entries: t.entries,
                capacity: t.capacity,
                evictions: t.evictions,
            })
            .collect();
        v.push(TableView {
            name: "open_incidents".into(),
            entries: self.tracker.active().count() as u64,
            capacity: incident::OPEN_MAX as u64,
            evictions: self.tracker.not_opened,
        });
        v
    }

    fn on_changes(&mut self, pipe: &mut Pipeline, changes: &[VerdictChange]) {
        // Called on every tick, even without changes: storms waiting for a
        // roll-up's verdict are placed then (see `incident`). Incidents
        // closed on the way are caught at the store for `[[notify]]`.
        let mut tap = crate::notify::EndTap::new(&mut self.store, self.notify.is_some());
        let opened = self.tracker.on_changes(
            changes,
            &mut incident::Context {
                engine: &pipe.engine,
                procs: &mut pipe.procs,
                groups: pipe.engine.groups(),
                store: &mut tap,
                now_ms: now_ms(),
            },
        );
        let ended = std::mem::take(&mut tap.ended);
        let opened = opened.unwrap_or_else(|e| {
            pipe.health.error(kind::STORE, "recording incidents", &e);
            Vec::new()
        });
        for inc in &opened {
            tracing::warn!(id = %inc.id, comm = %inc.comm, destination = %inc.destination, processes = inc.processes(), "incident opened: {}", inc.explanation);
        }
        // Starts before ends: an incident opened and merged in one tick
        // still reaches a receiver in order.
        if let Some(n) = &mut self.notify {
            for inc in &opened {
                n.send(crate::notify::EventKind::Start, inc);
            }
            for inc in &ended {
                n.send(crate::notify::EventKind::End, inc);
            }
        }
        self.enforce(pipe, changes);
        for c in changes {
            let _ = self.shared.events.send(c.clone());
            if self.limiter.allow() {
                tracing::info!(
                    from = c.from.as_str(),
                    to = c.to.as_str(),
                    score = c.score,
                    subject = ?c.subject,
                    "{}",
                    c.explanation
                );
            }
        }
    }

    /// Every tick: storms get or lose their budgets, retry budgets get
    /// their deposits, expired budgets end (a storm's renewed while it
    /// goes on).
    fn enforce(&mut self, pipe: &mut Pipeline, changes: &[VerdictChange]) {
        let mut e = self.enforcer.lock();
        let tracker = &self.tracker;
        e.on_changes(changes, |subject| match *subject {
            crate::detect::Subject::Flow { pid, dest } => tracker
                .active()
                .find(|i| i.pid == Some(pid) && i.destination == dest.to_string())
                .map(|i| i.id.clone()),
            _ => None,
        });
        let (pids, cgroups) = e.watched();
        pipe.tally.watch(pids, cgroups);
        e.credit(&pipe.tally.drain());
        let engine = &pipe.engine;
        e.tick(kernel::monotonic_ns(), |subject| {
            engine
                .subject_stats(subject)
                .is_some_and(|s| s.state == State::Storm)
        });
    }

    fn on_interval(&mut self, pipe: &mut Pipeline, sensors: &mut Sensors, iv: Interval) {
        let now = now_ms();
        self.tracker.annotate_stacks(&pipe.stacks);
        self.tracker
            .annotate_cost(&mut self.cost, kernel::monotonic_ns());
        if let Err(e) = self
            .tracker
            .every_second(&pipe.engine, &mut self.store, now)
        {
            pipe.health.error(kind::STORE, "updating incidents", &e);
        }
        if self.last_retention.elapsed().as_secs() >= 3600 {
            self.last_retention = Instant::now();
            self.store.retain(
                now,
                self.config.store.retention_days,
                self.config.store.max_incidents,
            );
        }
        let stats = sensors.stats().unwrap_or_else(|e| {
            pipe.health
                .error(kind::MAP, "reading the kernel counters", &e);
            Default::default()
        });
        let events = pipe.observed - self.last_observed;
        self.last_observed = pipe.observed;
        let storms = self.tracker.active().count();
        let incidents_total = self.store.total();
        let store_health = self.store.health();
        if store_health.is_failing() {
            pipe.health.degrade(
                kind::STORE,
                format!(
                    "incident store failing ({}); detection goes on, writes are retried",
                    store_health.last_error.as_deref().unwrap_or("?")
                ),
            );
        } else {
            pipe.health.recover(kind::STORE);
        }

        // Flows for `top`, busiest first.
        let flows: Vec<FlowView> = iv
            .rows
            .iter()
            .take(200)
            .map(|r| {
                let v = pipe.engine.verdict(r.key.pid, &r.key.dest);
                FlowView {
                    pid: r.key.pid,
                    comm: r.comm.to_string(),
                    proto: match r.key.dest.proto {
                        crate::ingest::Proto::Tcp => "tcp".into(),
                        crate::ingest::Proto::Udp => "udp".into(),
                    },
                    destination: r.key.dest.to_string(),
                    attempts_per_s: r.counts.attempts as f64 / iv.secs,
                    failures_per_s: r.counts.failures as f64 / iv.secs,
                    main_error: r.counts.main_error(),
                    verdict: v
                        .as_ref()
                        .map(|v| v.state)
                        .unwrap_or(State::Healthy)
                        .as_str()
                        .into(),
                    score: v.as_ref().map(|v| v.score).unwrap_or(0),
                    explanation: v
                        .filter(|v| v.state != State::Healthy || v.persistent_failure)
                        .map(|v| v.explanation),
                    cpu_cores: self.cost.cpu_of(r.key.pid),
                    service: pipe.procs.service_of(r.key.pid).map(|s| s.name),
                }
            })
            .collect();

        // Metrics.
        let mut by_outcome = [0u64; 4];
        for r in &iv.rows {
            by_outcome[0] += r.counts.established;
            for (code, n) in &r.counts.failure_codes {
                match *code {
                    failure::CLOSED => by_outcome[2] += n,
                    failure::BEFORE_SYN => by_outcome[3] += n,
                    _ => by_outcome[1] += n,
                }
            }
        }
        for (label, n) in ["established", "failed", "closed", "before_syn"]
            .iter()
            .zip(by_outcome)
        {
            self.metrics.add_connect_attempts(label, n);
        }
        self.metrics
            .set_flows_tracked(pipe.engine.flow_count() as u64);
        self.metrics.set_storms_active(storms as u64);
        self.metrics.set_storm_cost(
            self.tracker.active().filter_map(|i| i.cost.as_ref()),
            self.cost.host_cpu(),
        );
        self.metrics
            .set_events_dropped_total(stats.ring_drops + stats.map_full);
        self.metrics.set_incidents_total(incidents_total);
        let active: Vec<(String, String, f64)> = self
            .tracker
            .active()
            .map(|i| {
                (
                    i.comm.clone(),
                    i.destination.clone(),
                    i.timeline.last().copied().unwrap_or(0.0) as f64,
                )
            })
            .collect();
        self.metrics.set_active_storms(&active);
        let by_service: Vec<(String, f64)> = self
            .tracker
            .active()
            .map(|i| {
                (
                    i.service
                        .as_ref()
                        .map_or_else(|| "unknown".to_string(), |s| s.name.clone()),
                    i.timeline.last().copied().unwrap_or(0.0) as f64,
                )
            })
            .collect();
        self.metrics.set_service_storms(&by_service);
        // Kernel maps: a key walk each, so every 10 s, not every second.
        if self
            .last_map_usage
            .is_none_or(|t| t.elapsed().as_secs() >= 10)
        {
            self.last_map_usage = Some(Instant::now());
            match sensors.map_usage() {
                Ok(usage) => {
                    self.kernel_tables = usage
                        .into_iter()
                        .map(|m| TableView {
                            name: format!("kernel:{}", m.name),
                            entries: m.entries,
                            capacity: m.capacity,
                            evictions: m.evictions,
                        })
                        .collect()
                }
                Err(e) => pipe
                    .health
                    .error(kind::MAP, "counting kernel map entries", &e),
            }
        }
        let anomalies: std::collections::BTreeMap<String, u64> = match sensors.anomalies() {
            Ok(a) => a.into_iter().map(|(k, n)| (k.to_string(), n)).collect(),
            Err(e) => {
                pipe.health
                    .error(kind::MAP, "reading kernel anomaly counters", &e);
                Default::default()
            }
        };
        self.metrics.set_kernel_anomalies(&anomalies);
        let errors = pipe.health.errors();
        let mut tables = self.tables(pipe);
        tables.extend(self.kernel_tables.iter().cloned());
        self.metrics.set_errors(&errors);
        self.metrics.set_store(&store_health);
        self.metrics.set_tables(&tables);

        // Status.
        let status = StatusView {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            always_on: sensors.always_on(),
            kernel: kernel::coverage::kernel_release(),
            signals: sensors.signals().iter().map(Into::into).collect(),
            on_demand: OnDemandView {
                mode: match pipe.on_demand {
                    OnDemand::Auto => "auto",
                    OnDemand::Always => "always",
                    OnDemand::Never => "never",
                }
                .into(),
                hooks: Sensors::on_demand_hooks().to_vec(),
                attached: sensors.on_demand_attached(),
                attached_for_s: pipe
                    .plan
                    .attached_since_ns
                    .map(|t| kernel::monotonic_ns().saturating_sub(t) / 1_000_000_000)
                    .unwrap_or(0),
                max_attached_s: self.config.probes.max_attached_secs,
                cooling_down: pipe.plan.cooling_down_until_ns.is_some(),
                suspects: pipe.plan.suspects.clone(),
            },
            kernel_features: self.features.clone(),
            events_per_s: events as f64 / iv.secs,
            ring_drops: stats.ring_drops,
            untracked: stats.map_full,
            flows_tracked: pipe.engine.flow_count(),
            storms_active: storms,
            incidents_total,
            socket: self.config.daemon.socket.display().to_string(),
            database: self.config.store.path.display().to_string(),
            metrics: self.config.metrics.listen.clone(),
            errors,
            degraded: pipe.health.degraded(),
            store: store_health,
            tables,
            kernel_anomalies: anomalies,
            enforce: self.enforcer.lock().summary(),
            stacks: pipe.stacks.stats.clone(),
        };
        self.metrics.set_enforce(&status.enforce);
        if let Ok(mut s) = self.shared.status.lock() {
            *s = status;
        }
        if let Ok(mut f) = self.shared.flows.lock() {
            *f = flows;
        }
    }
}

/// std listens with a backlog of 128: a burst of connections (a hostile
/// user's thousand, while the loop and the clients share the CPUs) then
/// overflows it before the accept loop, which closes what is over the cap
/// at once, catches up, and connections wait out a SYN retransmit (1 s).
/// Listening again on a bound socket only changes its backlog.
fn widen_backlog(l: &std::net::TcpListener) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a listening socket this function borrows; listen(2) on it
    // only resizes the queue (capped by net.core.somaxconn).
    let rc = unsafe { libc::listen(l.as_raw_fd(), 4096) };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "keeping the metrics listener's default backlog"
        );
    }
}
