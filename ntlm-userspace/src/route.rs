//! The routing model: what a connection is routed by, and what it keeps.
//!
//! - A [`Route`] owns its backend pool (each [`Backend`] with its address, live count and
//!   health), its balancer, its engine and its options (timeouts, health check).
//! - A [`Site`] is one listen address and the routes on it: one default, and any number
//!   chosen by the TLS server name ([`crate::sni`]).
//! - A [`Table`] is every site and route of one configuration; [`Table::build`] makes one
//!   from a validated [`Config`], resolving host names, and keeps the [`Backend`]s (live
//!   counts, health) of an earlier table where route and address are the same.
//!
//! A connection holds its `Arc<Route>` and a [`Lease`] on its `Arc<Backend>` for its whole
//! life, never an index into a list that a reload can change: a reload builds a new table
//! and swaps it in; connections keep what they started with.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::{
    balance::Balancer,
    config::{
        Config,
        file::{HealthSpec, RouteSpec},
    },
    engine::{Engine, Engines, Unavailable},
    guard::Guard,
    health::{self, Check, Health, HttpCheck, Transition},
    identity::{AcceptProxy, ProxyVersion, Source},
    lifecycle::{HandOver, RelayCtl},
    metrics::{BackendMetrics, Metrics, RouteMetrics},
    sni::{SniPattern, SniTable},
};

/// One backend server of a route.
pub struct Backend {
    /// As configured (`host:port`), for logs.
    pub spec: String,
    /// The address connected to, resolved when the route was built.
    pub addr: SocketAddr,
    /// Live connections from this process (least-conn).
    live: AtomicUsize,
    /// Up or down, from active checks and failed client connects.
    pub health: Health,
    /// `route=NAME backend=SPEC` for log lines.
    label: String,
    /// Its metrics (kept with it across reloads).
    pub metrics: BackendMetrics,
}

impl Backend {
    fn new(route: &str, spec: String, addr: SocketAddr, metrics: BackendMetrics) -> Backend {
        let label = format!("route={route} backend={spec}");
        Backend { spec, addr, live: AtomicUsize::new(0), health: Health::new(), label, metrics }
    }

    /// A backend outside every route now: that of a connection moved by an upgrade whose
    /// route no longer has it (for its lease and log line only).
    pub fn detached(route: &str, addr: SocketAddr) -> Arc<Backend> {
        Arc::new(Backend::new(route, addr.to_string(), addr, BackendMetrics::default()))
    }

    /// Live connections now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

impl health::Target for Backend {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn health(&self) -> &Health {
        &self.health
    }
    fn label(&self) -> String {
        self.label.clone()
    }
    fn changed(&self, to: Transition) {
        self.metrics.transition(to);
    }
}

/// One live connection counted on its backend until dropped.
pub struct Lease(Arc<Backend>);

impl Lease {
    /// Counts a live connection on `backend`.
    pub fn new(backend: &Arc<Backend>) -> Lease {
        backend.live.fetch_add(1, Ordering::Relaxed);
        Lease(backend.clone())
    }

    /// The backend this connection is paired with.
    pub fn backend(&self) -> &Backend {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A route: its backends, how to pick one, and how its connections are carried.
pub struct Route {
    /// Its validated configuration (name, listen, backends as written, options).
    pub spec: RouteSpec,
    /// Its backends, in the order configured.
    pub backends: Vec<Arc<Backend>>,
    balancer: Balancer,
    /// The engine its connections use.
    pub engine: Arc<Engine>,
    /// Why that engine (for the start-up and reload log).
    pub engine_reason: String,
    /// Timeouts and the forced-close signal, as engines take them.
    pub ctl: RelayCtl,
    /// Its active health check, if configured (failed client connects count only then).
    pub health: Option<Check>,
    /// Its metrics.
    pub metrics: RouteMetrics,
    /// Its failed-login guard, if configured; the same one as before a reload while the
    /// route keeps its name (so counts and blocks survive it).
    pub guard: Option<Arc<Guard>>,
}

impl Route {
    /// The route's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The backends to try for `client`, best first (see [`Balancer::order`]).
    pub fn order(&self, client: SocketAddr) -> impl Iterator<Item = &Arc<Backend>> {
        self.balancer.order(&self.backends, client)
    }

    /// A client's connect to `backend` failed: counted, and a failed check if the route checks
    /// health.
    pub fn connect_failed(&self, backend: &Backend, e: &std::io::Error) {
        backend.metrics.connect_failed();
        if let Some(c) = &self.health {
            health::passive_failure(backend, c.rise, c.fall, e);
        }
    }

    /// Connect timeout of this route.
    pub fn connect_timeout(&self) -> Duration {
        self.spec.options.connect_timeout
    }
}

/// One listen address and the routes on it.
pub struct Site {
    /// The route for clients without a matching server name (or on a listener without SNI).
    default: Option<Arc<Route>>,
    /// Routes chosen by the TLS server name; `None` when no route on this address has `sni`.
    by_name: Option<SniTable<Arc<Route>>>,
    /// How long a client may take to send its ClientHello (the longest of the routes').
    pub sni_timeout: Duration,
    /// Who may (and must) send a PROXY header here; `None`: no one (every route on an
    /// address trusts the same sources, as validated).
    pub accept_proxy: Option<AcceptProxy>,
    /// Every route on this address, the default first.
    routes: Vec<Arc<Route>>,
}

impl Site {
    /// Whether a client's server name must be read before a route can be chosen.
    pub fn needs_sni(&self) -> bool {
        self.by_name.is_some()
    }

    /// The route for a client that sent `server_name` (`None`: no name, or not read).
    pub fn route(&self, server_name: Option<&str>) -> Option<&Arc<Route>> {
        match &self.by_name {
            Some(t) => t.lookup(server_name),
            None => self.default.as_ref(),
        }
    }

    /// Every route on this address.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

/// Every route and site of one configuration.
pub struct Table {
    /// Routes by name.
    pub routes: HashMap<String, Arc<Route>>,
    /// Sites by their configured listen address.
    pub sites: HashMap<SocketAddr, Arc<Site>>,
}

/// Why a table could not be built (the configuration stays as it was).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A backend host name does not resolve.
    #[error("route {route:?}: backend {spec}: cannot resolve it ({source}); check the name or write an IP address")]
    Resolve {
        /// The route.
        route: String,
        /// The backend as written.
        spec: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The route's transparent `source` cannot be used by this process.
    #[error("route {route:?}: source = \"{wanted}\": {error}")]
    Transparent {
        /// The route.
        route: String,
        /// Its source.
        wanted: Source,
        /// Why (the kernel's refusal of IP_TRANSPARENT, with the fix).
        error: std::io::Error,
    },
    /// The route's engine cannot run here.
    #[error("route {route:?}: {error}")]
    Engine {
        /// The route.
        route: String,
        /// Why (in the message, not a source: a `{:#}` chain would print it twice).
        error: Unavailable,
    },
}

impl Table {
    /// Builds the table of `config`: resolves every backend (the first address of each
    /// name, as at start), picks each route's engine, and keeps the [`Backend`] of
    /// `previous` where a route of the same name has a backend of the same spec and address
    /// (its live count, health and metrics carry over). Without `parking` (no parker) no
    /// connection parks, whatever `park_after` says. The routes' and new backends' metric
    /// handles are made in `metrics`.
    pub async fn build(
        config: &Config,
        engines: &Engines,
        previous: Option<&Table>,
        force_close: &CancellationToken,
        hand_over: &HandOver,
        parking: bool,
        metrics: &Metrics,
    ) -> Result<Table, BuildError> {
        let mut routes = HashMap::new();
        for spec in &config.routes {
            let old = previous.and_then(|t| t.routes.get(&spec.name));
            let mut backends = Vec::with_capacity(spec.backends.len());
            for b in &spec.backends {
                let written = b.to_string();
                let addr = resolve(&written)
                    .await
                    .map_err(|source| BuildError::Resolve { route: spec.name.clone(), spec: written.clone(), source })?;
                let kept = old.and_then(|r| r.backends.iter().find(|k| k.spec == written && k.addr == addr));
                backends.push(kept.cloned().unwrap_or_else(|| {
                    let m = metrics.backend(&spec.name, &written);
                    Arc::new(Backend::new(&spec.name, written, addr, m))
                }));
            }
            if spec.options.source.is_some_and(Source::is_transparent) {
                crate::identity::check_transparent().map_err(|source| BuildError::Transparent {
                    route: spec.name.clone(),
                    wanted: spec.options.source.unwrap_or(Source::Client),
                    error: source,
                })?;
            }
            let (engine, engine_reason) = engines
                .get(spec.options.engine)
                .map_err(|error| BuildError::Engine { route: spec.name.clone(), error })?;
            let o = &spec.options;
            let route = Route {
                balancer: Balancer::new(o.balance),
                backends,
                engine: engine.clone(),
                engine_reason,
                ctl: RelayCtl {
                    idle_timeout: o.idle_timeout,
                    force_close: force_close.clone(),
                    // Both engines park (the sockmap engine keeps the pair in the maps).
                    park_after: o.park_after.filter(|_| parking),
                    half_close_timeout: o.half_close_timeout,
                    hand_over: hand_over.clone(),
                },
                health: spec.health.as_ref().map(|h| check(h, o.proxy_protocol)),
                metrics: metrics.route(&spec.name),
                guard: spec.guard.map(|g| match old.and_then(|r| r.guard.clone()) {
                    Some(kept) => {
                        kept.set_spec(g);
                        kept
                    }
                    None => Arc::new(Guard::new(g)),
                }),
                spec: spec.clone(),
            };
            routes.insert(spec.name.clone(), Arc::new(route));
        }
        let sites = sites(config, &routes);
        Ok(Table { routes, sites })
    }
}

/// The sites of `config`'s listen addresses. The configuration was validated: at most one
/// route without `sni` per address, no pattern twice on one address.
fn sites(config: &Config, routes: &HashMap<String, Arc<Route>>) -> HashMap<SocketAddr, Arc<Site>> {
    /// The default route and the routes with server names, of one address.
    type Routes = (Option<Arc<Route>>, Vec<Arc<Route>>);
    let mut builders: HashMap<SocketAddr, Routes> = HashMap::new();
    for spec in &config.routes {
        let route = &routes[&spec.name];
        for &addr in &spec.listen {
            let (default, named) = builders.entry(addr).or_default();
            if spec.sni.is_empty() {
                *default = Some(route.clone());
            } else {
                named.push(route.clone());
            }
        }
    }
    builders
        .into_iter()
        .map(|(addr, (default, named))| {
            let sni_timeout = default.iter().chain(&named).map(|r| r.spec.options.sni_timeout).max().unwrap_or_default();
            let by_name = (!named.is_empty()).then(|| {
                let mut t = SniTable::new();
                for r in &named {
                    for name in &r.spec.sni {
                        let pattern: SniPattern = name.parse().expect("validated sni pattern");
                        t.insert(pattern, r.clone()).expect("validated: no pattern twice on one address");
                    }
                }
                if let Some(d) = &default {
                    t.set_default(d.clone());
                }
                t
            });
            let all = || default.iter().chain(&named).map(|r| &r.spec.options);
            let accept_proxy = all().find(|o| !o.accept_proxy_from.is_empty()).map(|o| AcceptProxy {
                trusted: o.accept_proxy_from.clone(),
                timeout: all().map(|o| o.accept_proxy_timeout).max().unwrap_or(o.accept_proxy_timeout),
            });
            let routes = default.iter().chain(&named).cloned().collect();
            (addr, Arc::new(Site { default, by_name, sni_timeout, accept_proxy, routes }))
        })
        .collect()
}

/// The health check of a route's `[route.health]`.
fn check(h: &HealthSpec, proxy: Option<ProxyVersion>) -> Check {
    Check {
        proxy_header: proxy.map(ProxyVersion::local_header),
        interval: h.interval,
        timeout: h.timeout,
        rise: h.rise,
        fall: h.fall,
        http: h.http.as_ref().map(|x| HttpCheck { path: x.path.clone(), host: x.host.clone(), expect: x.expect }),
    }
}

/// The first address of `host:port`.
async fn resolve(spec: &str) -> std::io::Result<SocketAddr> {
    tokio::net::lookup_host(spec)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
}

#[cfg(test)]
impl Table {
    /// The table of one route named `test` with `engine`, listening on 127.0.0.1:0, with one
    /// backend at `backend`.
    pub(crate) async fn single_for_test(engine: crate::config::EngineChoice, backend: SocketAddr) -> Table {
        use crate::config::file::{BackendAddr, RouteOptions};
        let route = RouteSpec {
            name: "test".into(),
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            backends: vec![BackendAddr { host: backend.ip().to_string(), port: backend.port() }],
            sni: Vec::new(),
            options: RouteOptions { engine, ..RouteOptions::default() },
            health: None,
            guard: None,
        };
        let config = Config { routes: vec![route], ..Config::default() };
        let metrics = Arc::new(Metrics::new());
        let engines = Engines::new(&config.global, &metrics);
        let force_close = CancellationToken::new();
        let hand_over = HandOver::new(&force_close);
        Table::build(&config, &engines, None, &force_close, &hand_over, true, &metrics).await.unwrap()
    }
}

#[cfg(test)]
impl Backend {
    /// A backend named by its address, outside any route.
    pub(crate) fn for_test(addr: SocketAddr) -> Backend {
        Backend::new("test", addr.to_string(), addr, BackendMetrics::default())
    }
}
