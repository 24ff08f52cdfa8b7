//! Metrics: every metric of the process, declared once here, exported in the Prometheus text
//! format by the endpoint in [`http`] (`[metrics] listen`, `--metrics-listen`).
//!
//! How the data path stays lock-free: per-route ([`RouteMetrics`]) and per-backend
//! ([`BackendMetrics`]) handles are made when the route table is built (`route::Table::build`)
//! and held by the `Route` and `Backend` (a backend kept across a reload keeps its handles);
//! a connection only adds to atomics through them, never looks a label up. A scrape reads the
//! same atomics (the client crate's label maps are read-locked by the scrape alone).
//!
//! Values read at scrape time rather than counted: whether each backend is up (its health
//! state, so `backend_up` and `/readyz` always agree with the balancer), and the sockmap
//! engine's own counters (`engine::sockmap::COUNTERS`, the table `doctor` prints) and kernel
//! error counters. The bytes of a connection are counted when it ends, from the same
//! [`Outcome`] its access-log line prints (for the sockmap engine: the BPF programs' byte
//! counters), so the metrics and the access log agree.
//!
//! A connection closed before it had a route (no route for its server name, a refused PROXY
//! header) is counted with an empty `route` label (no route name is empty).

mod histogram;
pub mod http;

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use arc_swap::ArcSwap;
/// The gauge type of the handles (the parker holds one).
pub use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
    },
    registry::Registry,
};

pub use histogram::{BUCKETS_NS, ConnectTime};

use crate::{
    engine::sockmap::{self, SockmapEngine},
    health::Transition,
    lifecycle::{End, EngineKind, Outcome},
    ntlm::LoginResult,
    route::{Route, Table},
};

/// The prefix of every metric name.
pub const PREFIX: &str = "ntlm_splice";

/// The `route` label of connections that ended before a route was chosen.
pub const NO_ROUTE: &str = "";

/// Every [`End`], in the order of [`end_slot`].
const ENDS: [End; 12] = [
    End::ClientFin,
    End::BackendFin,
    End::ClientReset,
    End::BackendReset,
    End::IdleTimeout,
    End::HalfCloseTimeout,
    End::ConnectFailed,
    End::NoRoute,
    End::ProxyRefused,
    End::Shutdown,
    End::Internal,
    End::GuardBlocked,
];

/// The index of `end` in [`ENDS`] (a match, so that a new `End` does not compile until it is
/// counted here).
fn end_slot(end: End) -> usize {
    match end {
        End::ClientFin => 0,
        End::BackendFin => 1,
        End::ClientReset => 2,
        End::BackendReset => 3,
        End::IdleTimeout => 4,
        End::HalfCloseTimeout => 5,
        End::ConnectFailed => 6,
        End::NoRoute => 7,
        End::ProxyRefused => 8,
        End::Shutdown => 9,
        End::Internal => 10,
        End::GuardBlocked => 11,
    }
}

/// Every [`EngineKind`], in the order of [`engine_slot`].
const ENGINES: [EngineKind; 3] = [EngineKind::Splice, EngineKind::Sockmap, EngineKind::Copy];

/// The index of `engine` in [`ENGINES`].
fn engine_slot(engine: EngineKind) -> usize {
    match engine {
        EngineKind::Splice => 0,
        EngineKind::Sockmap => 1,
        EngineKind::Copy => 2,
    }
}

/// The `direction` labels of `bytes_total`, indexed as `Progress::bytes` (`lifecycle::Dir`).
const DIRECTIONS: [&str; 2] = ["up", "down"];

/// Why the failed-login guard closed a connection (`guard_blocks_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockReason {
    /// The client's address is blocked.
    Address,
    /// The user name is blocked.
    User,
    /// A connection whose last login was denied, closed when the observer stopped watching
    /// it (so that the client's next try is watched).
    Unwatched,
}

impl BlockReason {
    /// Every reason, in slot order.
    const ALL: [BlockReason; 3] = [BlockReason::Address, BlockReason::User, BlockReason::Unwatched];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockReason::Address => "address",
            BlockReason::User => "user",
            BlockReason::Unwatched => "unwatched",
        }
    }
}

/// Why a route runs on another engine than the best one (`engine_fallbacks_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// `engine = "auto"`: splice, because the sockmap engine is opt-in in this release
    /// (`engine::AUTO_REASON`).
    AutoOptIn,
}

impl Fallback {
    /// Every reason, in slot order.
    const ALL: [Fallback; 1] = [Fallback::AutoOptIn];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::AutoOptIn => "auto_opt_in",
        }
    }
}

/// `{route}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

/// `{route, end}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    route: String,
    end: &'static str,
}

/// `{route, engine, direction}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    route: String,
    engine: &'static str,
    direction: &'static str,
}

/// `{route, backend}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    route: String,
    backend: String,
}

/// `{route, backend, to}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    route: String,
    backend: String,
    to: &'static str,
}

/// `{route, result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    route: String,
    result: &'static str,
}

/// `{route, reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    route: String,
    reason: &'static str,
}

/// `{reason}` of engine fallbacks.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Why {
    reason: &'static str,
}

/// `{result}` of config reloads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcomes {
    result: &'static str,
}

/// The families with a `route` label (the registry holds clones: they share their series).
#[derive(Default)]
struct Families {
    accepted: Family<RouteLabel, Counter>,
    active: Family<RouteLabel, Gauge>,
    ends: Family<EndLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    connect_seconds: Family<RouteLabel, ConnectTime>,
    attempts: Family<BackendLabels, Counter>,
    failures: Family<BackendLabels, Counter>,
    transitions: Family<TransitionLabels, Counter>,
    logins: Family<ResultLabels, Counter>,
    guard_blocks: Family<ReasonLabels, Counter>,
}

/// What a running server's metrics are made of: the registry, the handles of process-wide
/// counters, and what scrapes read (the routes, listeners, the sockmap engine).
pub struct Metrics {
    registry: Registry,
    families: Families,
    /// Connections parked now (park.rs holds a clone).
    parked: Gauge,
    /// Config reloads: applied, rejected.
    reloads: [Counter; 2],
    /// Routes set up on another engine than the best, by [`Fallback`].
    fallbacks: [Counter; Fallback::ALL.len()],
    /// The handles of connections closed before they had a route.
    unrouted: RouteMetrics,
    /// What the scrape-time collectors and `/readyz` read.
    live: Arc<Live>,
    /// The route and backend labels made so far (to drop those a reload removed).
    known: Mutex<HashSet<(String, Option<String>)>>,
}

/// The state scrapes read at scrape time.
#[derive(Default)]
struct Live {
    /// The routes of the running table, by name.
    routes: ArcSwap<Vec<Arc<Route>>>,
    /// The listen addresses (as configured) whose accept loops run.
    listening: Mutex<HashSet<SocketAddr>>,
    /// Set once the server stops accepting (shutdown).
    draining: AtomicBool,
    /// The sockmap engine, once loaded.
    sockmap: OnceLock<Arc<SockmapEngine>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").field("routes", &self.routes.load().len()).finish_non_exhaustive()
    }
}

/// The handles of one route, held by its `Route`: atomic adds only.
#[derive(Default)]
pub struct RouteMetrics {
    accepted: Counter,
    active: Gauge,
    /// By [`end_slot`].
    ends: [Counter; ENDS.len()],
    /// By [`engine_slot`], then direction (up, down).
    bytes: [[Counter; 2]; ENGINES.len()],
    connect_seconds: ConnectTime,
    /// By [`LoginResult::ALL`] order.
    logins: [Counter; LoginResult::ALL.len()],
    /// By [`BlockReason::ALL`] order.
    guard_blocks: [Counter; BlockReason::ALL.len()],
}

/// The handles of one backend of a route, held by its `Backend`.
#[derive(Default)]
pub struct BackendMetrics {
    attempts: Counter,
    failures: Counter,
    /// To up, to down.
    transitions: [Counter; 2],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered, none with a route yet.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix(PREFIX);
        let families = Families::default();
        let f = &families;
        registry.register(
            "connections_accepted",
            "Client connections given a route (route=\"\": closed before one was chosen)",
            f.accepted.clone(),
        );
        registry.register("connections_active", "Client connections open now, parked ones included", f.active.clone());
        let parked = Gauge::default();
        registry.register("connections_parked", "Idle connections parked without a task now", parked.clone());
        registry.register("connection_ends", "Connections ended, by the access log's end= reason", f.ends.clone());
        registry.register(
            "bytes",
            "Bytes delivered by connections that ended, by engine and direction (up: client to backend)",
            f.bytes.clone(),
        );
        registry.register(
            "backend_connect_seconds",
            "Time of successful backend connects (the PROXY header out included)",
            f.connect_seconds.clone(),
        );
        registry.register("backend_connect_attempts", "Backend connects started for clients", f.attempts.clone());
        registry.register(
            "backend_connect_failures",
            "Backend connects for clients that failed or timed out",
            f.failures.clone(),
        );
        registry.register(
            "backend_health_transitions",
            "Changes of a backend's health state, by the state changed to",
            f.transitions.clone(),
        );
        registry.register("ntlm_logins", "NTLM logins the observer saw, by result", f.logins.clone());
        registry.register(
            "guard_blocks",
            "Connections closed by the failed-login guard, by what was blocked",
            f.guard_blocks.clone(),
        );
        let reloads_family = Family::<Outcomes, Counter>::default();
        let reloads = ["ok", "failed"].map(|result| reloads_family.get_or_create_owned(&Outcomes { result }));
        registry.register("config_reloads", "Configuration reloads (SIGHUP), applied or rejected", reloads_family);
        let fallbacks_family = Family::<Why, Counter>::default();
        let fallbacks = Fallback::ALL.map(|r| fallbacks_family.get_or_create_owned(&Why { reason: r.as_str() }));
        registry.register(
            "engine_fallbacks",
            "Routes set up on the splice engine instead of the sockmap engine, by reason (at start and each reload)",
            fallbacks_family,
        );
        let live = Arc::new(Live::default());
        registry.register_collector(Box::new(BackendUp(live.clone())));
        registry.register_collector(Box::new(SockmapCounters(live.clone())));
        let mut m = Metrics {
            registry,
            families,
            parked,
            reloads,
            fallbacks,
            unrouted: RouteMetrics::default(),
            live,
            known: Mutex::new(HashSet::new()),
        };
        m.unrouted = m.unrouted();
        m
    }

    /// The handles of connections closed before they had a route: accepted and ended only
    /// (they are never active for long, connect, carry bytes or log in), so only those
    /// series exist for them.
    fn unrouted(&self) -> RouteMetrics {
        self.lock_known().insert((NO_ROUTE.to_string(), None));
        let f = &self.families;
        let label = RouteLabel { route: NO_ROUTE.to_string() };
        RouteMetrics {
            accepted: f.accepted.get_or_create_owned(&label),
            ends: ENDS.map(|e| f.ends.get_or_create_owned(&EndLabels { route: NO_ROUTE.to_string(), end: e.as_str() })),
            ..RouteMetrics::default()
        }
    }

    /// The handles of route `route`, its series made now (at zero if new).
    pub fn route(&self, route: &str) -> RouteMetrics {
        self.lock_known().insert((route.to_string(), None));
        let f = &self.families;
        let r = || route.to_string();
        let label = RouteLabel { route: r() };
        RouteMetrics {
            accepted: f.accepted.get_or_create_owned(&label),
            active: f.active.get_or_create_owned(&label),
            ends: ENDS.map(|e| f.ends.get_or_create_owned(&EndLabels { route: r(), end: e.as_str() })),
            bytes: ENGINES.map(|e| {
                DIRECTIONS.map(|direction| {
                    f.bytes.get_or_create_owned(&BytesLabels { route: r(), engine: e.as_str(), direction })
                })
            }),
            connect_seconds: f.connect_seconds.get_or_create_owned(&label),
            logins: LoginResult::ALL
                .map(|x| f.logins.get_or_create_owned(&ResultLabels { route: r(), result: x.as_str() })),
            guard_blocks: BlockReason::ALL
                .map(|x| f.guard_blocks.get_or_create_owned(&ReasonLabels { route: r(), reason: x.as_str() })),
        }
    }

    /// The handles of backend `backend` (as written) of route `route`.
    pub fn backend(&self, route: &str, backend: &str) -> BackendMetrics {
        self.lock_known().insert((route.to_string(), Some(backend.to_string())));
        let f = &self.families;
        let label = BackendLabels { route: route.to_string(), backend: backend.to_string() };
        let to = |to| TransitionLabels { route: route.to_string(), backend: backend.to_string(), to };
        BackendMetrics {
            attempts: f.attempts.get_or_create_owned(&label),
            failures: f.failures.get_or_create_owned(&label),
            transitions: ["up", "down"].map(|t| f.transitions.get_or_create_owned(&to(t))),
        }
    }

    fn lock_known(&self) -> std::sync::MutexGuard<'_, HashSet<(String, Option<String>)>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The gauge of parked connections, for the parker.
    pub fn parked(&self) -> Gauge {
        self.parked.clone()
    }

    /// A connection ended: its end reason, and its bytes by engine (a connection that never
    /// had a route, `route` `None`, is counted as accepted and ended under [`NO_ROUTE`]).
    pub fn ended(&self, route: Option<&Route>, o: &Outcome) {
        match route {
            Some(r) => r.metrics.ended(o),
            None => {
                self.unrouted.routed();
                self.unrouted.ended(o);
            }
        }
    }

    /// A configuration reload was applied (`ok`) or rejected.
    pub fn reloaded(&self, ok: bool) {
        self.reloads[usize::from(!ok)].inc();
    }

    /// A route was set up on the splice engine for `why`.
    pub fn fell_back(&self, why: Fallback) {
        self.fallbacks[why as usize].inc();
    }

    /// The sockmap engine was loaded: its counters are exported from now on.
    pub fn sockmap_loaded(&self, engine: &Arc<SockmapEngine>) {
        // Engines loads it once and keeps it; a second one would be the same engine's twin.
        if self.live.sockmap.set(engine.clone()).is_err() {
            log::debug!("metrics: a sockmap engine is already exported");
        }
    }

    /// `table` is the running one now (start, reload): `backend_up` and `/readyz` read its
    /// routes; the series of routes and backends it no longer has are dropped.
    pub fn track(&self, table: &Table) {
        let mut routes: Vec<Arc<Route>> = table.routes.values().cloned().collect();
        routes.sort_by(|a, b| a.name().cmp(b.name()));
        let current: HashSet<(String, Option<String>)> = routes
            .iter()
            .flat_map(|r| {
                let name = r.name().to_string();
                std::iter::once((name.clone(), None))
                    .chain(r.backends.iter().map(move |b| (name.clone(), Some(b.spec.clone()))))
            })
            .chain([(NO_ROUTE.to_string(), None)])
            .collect();
        self.live.routes.store(Arc::new(routes));
        let mut known = self.lock_known();
        for (route, backend) in known.iter().filter(|k| !current.contains(k)) {
            self.forget(route, backend.as_deref());
        }
        known.retain(|k| current.contains(k));
    }

    /// Drops the series of a route (`backend` `None`) or of one backend of a route.
    fn forget(&self, route: &str, backend: Option<&str>) {
        let f = &self.families;
        let r = || route.to_string();
        if let Some(b) = backend {
            let label = BackendLabels { route: r(), backend: b.to_string() };
            f.attempts.remove(&label);
            f.failures.remove(&label);
            for to in ["up", "down"] {
                f.transitions.remove(&TransitionLabels { route: r(), backend: b.to_string(), to });
            }
            return;
        }
        let label = RouteLabel { route: r() };
        f.accepted.remove(&label);
        f.active.remove(&label);
        f.connect_seconds.remove(&label);
        for e in ENDS {
            f.ends.remove(&EndLabels { route: r(), end: e.as_str() });
        }
        for e in ENGINES {
            for direction in DIRECTIONS {
                f.bytes.remove(&BytesLabels { route: r(), engine: e.as_str(), direction });
            }
        }
        for x in LoginResult::ALL {
            f.logins.remove(&ResultLabels { route: r(), result: x.as_str() });
        }
        for x in BlockReason::ALL {
            f.guard_blocks.remove(&ReasonLabels { route: r(), reason: x.as_str() });
        }
    }

    /// The accept loop of listen address `addr` (as configured) runs.
    pub fn listening(&self, addr: SocketAddr) {
        self.live.listening.lock().unwrap_or_else(|e| e.into_inner()).insert(addr);
    }

    /// The accept loop of `addr` stopped (a reload removed it).
    pub fn closed(&self, addr: SocketAddr) {
        self.live.listening.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr);
    }

    /// The server stopped accepting for good (shutdown): not ready any more.
    pub fn draining(&self) {
        self.live.draining.store(true, Ordering::Relaxed);
    }

    /// Every metric in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String fails only if an encoder does; none of ours do.
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            log::error!("metrics: encoding failed: {e}");
        }
        out
    }

    /// `Ok` when the server serves: every listen address of the running table has its accept
    /// loop and every route has a backend up; else why not, on one line.
    pub fn readiness(&self) -> Result<(), String> {
        if self.live.draining.load(Ordering::Relaxed) {
            return Err("shutting down: no longer accepting connections".into());
        }
        let routes = self.live.routes.load();
        if routes.is_empty() {
            return Err("starting: no route table yet".into());
        }
        let listening = self.live.listening.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut why = Vec::new();
        for r in routes.iter() {
            let missing: Vec<String> =
                r.spec.listen.iter().filter(|a| !listening.contains(a)).map(ToString::to_string).collect();
            if !missing.is_empty() {
                why.push(format!("route {:?} is not listening on {} yet", r.name(), missing.join(", ")));
            }
            if !r.backends.iter().any(|b| b.health.is_up()) {
                let down: Vec<&str> = r.backends.iter().map(|b| b.spec.as_str()).collect();
                why.push(format!("route {:?} has no backend up (down: {})", r.name(), down.join(", ")));
            }
        }
        if why.is_empty() { Ok(()) } else { Err(why.join("; ")) }
    }
}

impl RouteMetrics {
    /// A client connection was given this route.
    pub fn routed(&self) {
        self.accepted.inc();
        self.active.inc();
    }

    /// A connection handed over by an upgrade's old process is relayed on this route (open
    /// now; it was accepted there).
    pub fn adopted(&self) {
        self.active.inc();
    }

    /// A backend connect for a client of this route starts on `backend`: counted, and the
    /// time to hand to [`RouteMetrics::connected`].
    pub fn connecting(&self, backend: &BackendMetrics) -> Instant {
        backend.attempts.inc();
        Instant::now()
    }

    /// The backend connect started at `started` succeeded.
    pub fn connected(&self, started: Instant) {
        self.connect_seconds.observe(started.elapsed());
    }

    /// A connection of this route ended.
    fn ended(&self, o: &Outcome) {
        self.active.dec();
        self.ends[end_slot(o.end)].inc();
        let [up, down] = &self.bytes[engine_slot(o.engine)];
        up.inc_by(o.bytes_up);
        down.inc_by(o.bytes_down);
    }

    /// The NTLM observer saw a login end with `result`.
    pub fn login(&self, result: LoginResult) {
        self.logins[result as usize].inc();
    }

    /// The failed-login guard closed a connection for `reason`.
    pub fn guard_block(&self, reason: BlockReason) {
        self.guard_blocks[reason as usize].inc();
    }
}

impl BackendMetrics {
    /// A client's connect to this backend failed or timed out.
    pub fn connect_failed(&self) {
        self.failures.inc();
    }

    /// The backend's health state changed.
    pub fn transition(&self, to: Transition) {
        let slot = match to {
            Transition::Up => 0,
            Transition::Down => 1,
        };
        self.transitions[slot].inc();
    }
}

/// `backend_up{route, backend}`: each backend's health state, read at scrape time.
#[derive(Debug)]
struct BackendUp(Arc<Live>);

impl Collector for BackendUp {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let routes = self.0.routes.load();
        if routes.is_empty() {
            return Ok(());
        }
        let help = "1 if the backend is up (health checks and failed client connects), else 0.";
        let mut family = encoder.encode_descriptor("backend_up", help, None, MetricType::Gauge)?;
        for r in routes.iter() {
            for b in &r.backends {
                let label = BackendLabels { route: r.name().to_string(), backend: b.spec.clone() };
                ConstGauge::new(i64::from(b.health.is_up())).encode(family.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}

/// The sockmap engine's counters (`engine::sockmap::COUNTERS`, one metric each, named
/// `sockmap_<name>`) and its kernel error counters, read at scrape time once it is loaded.
#[derive(Debug)]
struct SockmapCounters(Arc<Live>);

impl Collector for SockmapCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(engine) = self.0.sockmap.get() else { return Ok(()) };
        for ((name, help, value), kind) in engine.counters().zip(sockmap::KINDS) {
            let name = format!("sockmap_{name}");
            match kind {
                sockmap::Kind::Count => {
                    let c = ConstCounter::new(value);
                    c.encode(encoder.encode_descriptor(&name, help, None, c.metric_type())?)?;
                }
                sockmap::Kind::HighWater => {
                    let g = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
                    g.encode(encoder.encode_descriptor(&name, help, None, g.metric_type())?)?;
                }
            }
        }
        let help = "Failures the sockmap engine's BPF programs counted, by error.";
        let mut family = encoder.encode_descriptor("sockmap_kernel_errors", help, None, MetricType::Counter)?;
        for (error, value) in engine.kernel_errors() {
            ConstCounter::new(value).encode(family.encode_family(&[("error", error)])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
