//! The running server: its listeners and their accept loops, the connection cap, health
//! checks, reload and graceful shutdown.
//!
//! [`Server::start`] resolves and checks everything a configuration needs and binds every
//! listen address before a client is accepted, so a bad configuration fails at start with a
//! reason. [`Server::run`] then serves until told to stop, applying reloads in between:
//! a reload reads and validates the whole file first and changes nothing if any part of it
//! fails (parse, names that do not resolve, an engine that cannot load, an address that
//! cannot be bound); otherwise it binds new listen addresses, closes removed ones, keeps the
//! others open (no connect attempt is refused during a reload), swaps in the new routes and
//! restarts the health checks. Live connections keep the route and backend they have.
//!
//! An upgrade ([`Control::Upgrade`], [`crate::upgrade`]) starts a new process and hands it the
//! listeners; once it is ready this one stops accepting, hands it the connections that can
//! move, drains the rest and returns. Started by an upgrade ([`Server::start_with`]), a server
//! takes the listeners instead of binding, says it is ready, and relays what it is handed.
//!
//! With `[metrics] listen` the metrics endpoint is bound at start too ([`crate::metrics::http`]);
//! the server tells the metrics which table runs, which addresses are served, each reload's
//! result and the shutdown (the inputs of `/readyz`).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, BorrowedFd, RawFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{
    sync::CancellationToken,
    task::{AbortOnDropHandle, TaskTracker},
};

use crate::{
    config::{Config, diff, file},
    conn::{self, Lifecycle},
    engine::Engines,
    health,
    lifecycle::HandOver,
    metrics::{self, Metrics},
    park::{self, Parker},
    privilege,
    route::{Site, Table},
    sys::privs::Account,
    upgrade::{
        self, Inherited, Link,
        conns::{send_conn, stop_child, take_over},
        wire::Msg,
    },
};

/// Listen backlog: where clients wait while `max_connections` are busy. The kernel clamps
/// it to `net.core.somaxconn` (4096 by default since Linux 5.4); 1,024 overflowed when 1,000
/// clients connected at once (TcpExtListenOverflows, then syncookies).
pub const LISTEN_BACKLOG: i32 = 4096;
/// First pause after accept fails for lack of descriptors or memory.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between accept retries.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// After the drain timeout, how long closed connections get to write their log lines.
const FORCE_CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How often the hand-over of an upgrade looks at the live count.
const HAND_OVER_POLL: Duration = Duration::from_millis(50);
/// Shortest period of [`timer_floor`]: below it the wake-ups would cost more than they save.
const TIMER_FLOOR_MIN: Duration = Duration::from_millis(50);

/// What [`Server::run`] is told to do.
#[derive(Debug)]
pub enum Control {
    /// Read the configuration file again and apply it (SIGHUP).
    Reload,
    /// Stop accepting, drain, exit (SIGTERM, SIGINT).
    Shutdown,
    /// Start a new binary and hand it everything ([`crate::upgrade`]; SIGUSR2, `ntlm-splice
    /// upgrade`).
    Upgrade(UpgradeRequest),
}

/// An upgrade asked for: which binary, and who to tell how it went.
#[derive(Debug, Default)]
pub struct UpgradeRequest {
    /// The binary to start; `None`: this program's path.
    pub binary: Option<PathBuf>,
    /// Told the outcome: `Ok(summary)` once handed over, `Err(why)` if this process goes on.
    pub reply: Option<tokio::sync::oneshot::Sender<Result<String, String>>>,
    /// Closed by the asker once it passed the outcome on: the process does not exit before.
    pub answered: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// How long a process that upgraded waits for the asker to pass the outcome on.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// One bound listen address and its accept loop.
struct Listener {
    /// The routes on this address, swapped by a reload.
    site: Arc<ArcSwap<Site>>,
    /// Stops the accept loop, which closes the socket.
    stop: CancellationToken,
    /// The accept loop.
    task: tokio::task::JoinHandle<()>,
    /// The listening socket (owned by the accept loop), for an upgrade to pass on.
    fd: RawFd,
}

/// A server that has bound its listeners and is ready to serve.
pub struct Server {
    /// The file it was read from, for reloads (`None`: from the command line).
    path: Option<PathBuf>,
    config: Config,
    engines: Engines,
    table: Table,
    lc: Arc<Lifecycle>,
    /// Bound but not yet serving (until [`Server::run`]).
    pending: Vec<(SocketAddr, TcpListener)>,
    listeners: HashMap<SocketAddr, Listener>,
    /// Stops the health checks of the current table.
    health_stop: CancellationToken,
    /// One permit per open connection, parked ones included (`max_connections` in all).
    slots: Arc<Semaphore>,
    next_id: Arc<AtomicU64>,
    stop_accept: CancellationToken,
    /// The process's metrics.
    metrics: Arc<Metrics>,
    /// The metrics endpoint, bound but not yet serving (until [`Server::run`]).
    metrics_listener: Option<TcpListener>,
    /// What the process holds after [`Server::drop_privileges`] (`None`: nothing dropped).
    dropped: Option<privilege::Dropped>,
    /// The live upgrade's request to connections to park for the new process.
    hand_over: HandOver,
    /// The metrics endpoint's configured address and socket (owned by its task), for an
    /// upgrade to pass on.
    metrics_fd: Option<(SocketAddr, RawFd)>,
    /// Started by an upgrade: the link to the old process, for the rest of the hand-over.
    upgrade_link: Option<Link>,
    /// The metrics endpoint's task (from [`Server::run`]); stopped when an upgrade hands
    /// over, so that /readyz is answered by the new process alone.
    metrics_task: Option<AbortOnDropHandle<()>>,
}

impl Server {
    /// Everything short of serving: the engines, the routes (host names resolved), every
    /// listen address bound. Fails with the reason on the first problem.
    pub async fn start(config: Config, path: Option<PathBuf>) -> anyhow::Result<Server> {
        Server::start_with(config, path, None).await
    }

    /// [`Server::start`], taking the listening sockets an old process handed over
    /// (`inherited`, [`crate::upgrade`]) instead of binding their addresses.
    pub async fn start_with(
        config: Config,
        path: Option<PathBuf>,
        mut inherited: Option<Inherited>,
    ) -> anyhow::Result<Server> {
        let force_close = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let parker = match Parker::new(metrics.parked()) {
            Ok(p) => Some(p),
            Err(e) => {
                log::warn!(
                    "cannot create the epoll instance for parked connections ({e}); idle connections stay in their tasks"
                );
                None
            }
        };
        let engines = Engines::new(&config.global, &metrics);
        let hand_over = HandOver::new(&force_close);
        let table = Table::build(&config, &engines, None, &force_close, &hand_over, parker.is_some(), &metrics).await?;
        metrics.track(&table);
        let mut pending = Vec::new();
        for &addr in table.sites.keys() {
            let l = match inherited.as_mut().and_then(|i| i.take(addr)) {
                Some(l) => {
                    l.with_context(|| format!("the listening socket of {addr} handed over by the old process"))?
                }
                None => bind(addr)?,
            };
            pending.push((addr, l));
        }
        let metrics_listener = match config.metrics.listen {
            Some(a) => Some(match inherited.as_mut().and_then(|i| i.take_metrics(a)) {
                Some(l) => l.context("the metrics socket handed over by the old process")?,
                None => metrics::http::bind(a)?,
            }),
            None => None,
        };
        let metrics_fd = config.metrics.listen.zip(metrics_listener.as_ref().map(|l| l.as_raw_fd()));
        let lc = Arc::new(Lifecycle { tracker: TaskTracker::new(), parker, force_close, metrics: metrics.clone() });
        let slots = Arc::new(Semaphore::new(config.global.max_connections));
        Ok(Server {
            path,
            config,
            engines,
            table,
            lc,
            pending,
            listeners: HashMap::new(),
            health_stop: CancellationToken::new(),
            slots,
            next_id: Arc::new(AtomicU64::new(1)),
            stop_accept: CancellationToken::new(),
            metrics,
            metrics_listener,
            dropped: None,
            hand_over,
            metrics_fd,
            // The listeners the new configuration does not have close here.
            upgrade_link: inherited.map(|i| i.link),
            metrics_task: None,
        })
    }

    /// Gives up what serving no longer needs, between [`Server::start`] (listeners bound,
    /// engines loaded, self-test run) and [`Server::run`]: switches every thread to `account`
    /// when given and keeps only the capabilities [`privilege::needs`] names. A root process
    /// without `account` keeps everything (and says so); one started as another user narrows
    /// its capabilities all the same. Fails if any thread ends up holding something else.
    pub fn drop_privileges(&mut self, account: Option<&Account>) -> anyhow::Result<()> {
        if account.is_none() && crate::sys::caps::euid() == 0 {
            log::info!(
                "privileges: running as root for the whole run; pass --user NAME to switch to a user after start"
            );
            return Ok(());
        }
        let facts = privilege::Facts::of(&self.config, self.path.is_some(), self.engines.sockmap_loaded());
        let needs = privilege::needs(&facts);
        let held = crate::sys::privs::current().map(|c| c.permitted).unwrap_or(0);
        for n in needs.iter().filter(|n| held & n.cap.bit() == 0) {
            log::warn!("privileges: {} is not held, so this will fail: {}", n.cap.name(), n.why);
        }
        let dropped = privilege::drop_to(account, privilege::set_of(&needs)).with_context(|| match account {
            Some(a) => format!(
                "cannot drop privileges to user {:?}; the proxy stops rather than run with more than it should",
                a.name
            ),
            None => "cannot narrow the capabilities; the proxy stops rather than run with more than it should".into(),
        })?;
        self.engines.privileges_dropped(privilege::SEALED.into());
        for n in needs.iter().filter(|n| dropped.caps & n.cap.bit() != 0) {
            log::info!("privileges: keeping {}: {}", n.cap.name(), n.why);
        }
        log::info!("privileges: dropped; {}", dropped.summary());
        if let (Some(path), Some(a)) = (&self.path, account)
            && let Err(e) = std::fs::File::open(path)
        {
            log::warn!(
                "privileges: {} cannot be read as user {:?} ({e}), so a reload (SIGHUP) will fail: make it readable \
                 by that user or its group (chgrp/chmod)",
                path.display(),
                a.name
            );
        }
        self.dropped = Some(dropped);
        Ok(())
    }

    /// Serves until `Control::Shutdown` (or `control` closes), applying `Control::Reload`s;
    /// then drains: stops accepting, lets live connections finish for up to the drain
    /// timeout, closes the rest, returns.
    pub async fn run(mut self, mut control: tokio::sync::mpsc::Receiver<Control>) -> anyhow::Result<()> {
        for r in self.table.routes.values() {
            log::info!(
                "route={} engine={} reason=\"{}\"{}",
                r.name(),
                r.engine.kind(),
                r.engine_reason,
                client_identity(&r.spec.options)
            );
        }
        self.metrics_task = match self.metrics_listener.take() {
            Some(l) => {
                // Not "listening addr=": that line names the proxy's own listeners.
                log::info!("metrics: serving /metrics, /healthz and /readyz at http://{}", l.local_addr()?);
                Some(AbortOnDropHandle::new(tokio::spawn(metrics::http::serve(l, self.metrics.clone()))))
            }
            None => None,
        };
        let took_over = match self.upgrade_link.take() {
            Some(link) => self.ready_for_old(link).await,
            None => None,
        };
        for (addr, listener) in std::mem::take(&mut self.pending) {
            self.serve_on(addr, listener)?;
        }
        // Type=notify: ready at a start; after an upgrade, also the service's main process now.
        upgrade::notify_systemd();
        let _took_over = took_over.map(|link| {
            let routes = self.table.routes.clone();
            AbortOnDropHandle::new(tokio::spawn(take_over(link, routes, self.lc.clone(), self.slots.clone())))
        });
        self.start_health();
        let min_connect =
            self.config.routes.iter().map(|r| r.options.connect_timeout).min().unwrap_or(Duration::from_secs(5));
        let _floor = AbortOnDropHandle::new(tokio::spawn(timer_floor(min_connect)));
        let _parker = AbortOnDropHandle::new(tokio::spawn({
            let lc = self.lc.clone();
            async move {
                if let Some(parker) = &lc.parker {
                    park::run(parker, &lc, &lc.force_close).await;
                }
            }
        }));
        // Until Control::Shutdown, or the sender is gone.
        while let Some(c) = control.recv().await {
            match c {
                Control::Reload => self.reload().await,
                Control::Shutdown => break,
                Control::Upgrade(UpgradeRequest { binary, reply, answered }) => match self.upgrade(binary).await {
                    Ok(summary) => {
                        log::info!("upgrade: {summary}");
                        if let Some(r) = reply {
                            r.send(Ok(summary)).ok();
                        }
                        if let Some(a) = answered {
                            tokio::time::timeout(ANSWER_TIMEOUT, a).await.ok();
                        }
                        break;
                    }
                    Err(e) => {
                        log::error!("upgrade: failed, this process goes on serving everything: {e:#}");
                        if let Some(r) = reply {
                            r.send(Err(format!("{e:#}"))).ok();
                        }
                    }
                },
            }
        }
        self.drain().await;
        Ok(())
    }

    /// Starts the accept loop of `listener`, bound for `addr` (as configured).
    fn serve_on(&mut self, addr: SocketAddr, listener: TcpListener) -> io::Result<()> {
        let local = listener.local_addr()?;
        let site = self.table.sites[&addr].clone();
        let names: Vec<&str> = site.routes().map(|r| r.name()).collect();
        let backends: Vec<String> = site.routes().flat_map(|r| r.backends.iter().map(|b| b.addr.to_string())).collect();
        // Served from here (the socket is bound, the accept loop starts below): counted for
        // /readyz before the line that tells the world it listens.
        self.metrics.listening(addr);
        log::info!(
            "listening addr={local} routes={} backends={} max_connections={} threads={}",
            names.join(","),
            backends.join(","),
            self.config.global.max_connections,
            crate::config::ProxyArgs::worker_threads(&self.config)
        );
        let site = Arc::new(ArcSwap::new(site));
        let stop = self.stop_accept.child_token();
        let fd = listener.as_raw_fd();
        let task = tokio::spawn(accept_loop(
            listener,
            site.clone(),
            self.lc.clone(),
            self.slots.clone(),
            self.next_id.clone(),
            stop.clone(),
        ));
        self.listeners.insert(addr, Listener { site, stop, task, fd });
        Ok(())
    }

    /// One health-check task per backend of every route with `[route.health]`.
    fn start_health(&mut self) {
        self.health_stop = CancellationToken::new();
        for r in self.table.routes.values() {
            if let Some(check) = &r.health {
                for b in &r.backends {
                    let mut check = check.clone();
                    // An HTTP probe's Host header defaults to the backend as written.
                    if let Some(http) = &mut check.http {
                        http.host.get_or_insert_with(|| b.spec.clone());
                    }
                    tokio::spawn(health::run(b.clone(), check, self.health_stop.clone()));
                }
            }
        }
    }

    /// Reads the configuration file again and applies it, or changes nothing and says why.
    async fn reload(&mut self) {
        let Some(path) = self.path.clone() else {
            log::warn!("reload: the configuration came from the command line; nothing to reload (use --config FILE)");
            return;
        };
        match self.try_reload(&path).await {
            Ok(summary) => {
                self.metrics.reloaded(true);
                log::info!("reload: applied {}: {summary}", path.display());
            }
            Err(e) => {
                self.metrics.reloaded(false);
                // The rejected table's new series go; the running table's stay.
                self.metrics.track(&self.table);
                let privileges = match &self.dropped {
                    Some(d) => format!(
                        " (privileges were dropped at start: {}; a change that needs more takes a restart)",
                        d.summary()
                    ),
                    None => String::new(),
                };
                log::error!(
                    "reload: {} rejected, the running configuration is unchanged: {e:#}{privileges}",
                    path.display()
                );
            }
        }
    }

    async fn try_reload(&mut self, path: &std::path::Path) -> anyhow::Result<String> {
        let mut new = file::load(path)?;
        if new.global.user.is_none() {
            // `--user`/`--group` on the command line are not in the file: they stay.
            new.global.user.clone_from(&self.config.global.user);
            new.global.group.clone_from(&self.config.global.group);
        }
        let plan = diff::plan(&self.config, &new);
        if !plan.restart_needed.is_empty() {
            log::warn!(
                "reload: {} changed; that takes a restart, the running values are kept",
                plan.restart_needed.join(", ")
            );
            new.global = self.config.global.clone();
            new.metrics = self.config.metrics.clone();
        }
        let parking = self.lc.parker.is_some();
        let (fc, ho) = (&self.lc.force_close, &self.hand_over);
        let table = Table::build(&new, &self.engines, Some(&self.table), fc, ho, parking, &self.metrics).await?;
        // Bind every new address before changing anything: one that fails leaves all as it was
        // (the sockets bound so far close as `bound` drops).
        let mut bound = Vec::new();
        for &addr in &plan.bind {
            bound.push((addr, bind(addr)?));
        }
        // Commit.
        self.table = table;
        self.config = new;
        self.metrics.track(&self.table);
        for addr in &plan.close {
            if let Some(l) = self.listeners.remove(addr) {
                l.stop.cancel();
                // The accept loop owns the socket: once it returned, the port is closed, and
                // the reload is reported applied only after that.
                if let Err(e) = l.task.await {
                    log::error!("accept loop of {addr} failed: {e}");
                }
                self.metrics.closed(*addr);
                log::info!("reload: stopped listening on {addr}");
            }
        }
        for (addr, l) in &self.listeners {
            l.site.store(self.table.sites[addr].clone());
        }
        for (addr, listener) in bound {
            self.serve_on(addr, listener)?;
        }
        self.health_stop.cancel();
        self.start_health();
        Ok(format!(
            "routes added={:?} removed={:?} changed={:?}; listeners bound={:?} closed={:?} kept={}",
            plan.added,
            plan.removed,
            plan.changed,
            plan.bind,
            plan.close,
            plan.keep.len()
        ))
    }

    /// The new process's side of an upgrade, before it serves: says ready, waits for the old
    /// process to stop accepting, and starts its connection ids above every id there.
    async fn ready_for_old(&mut self, link: Link) -> Option<Link> {
        let next = async {
            link.send(&Msg::Ready { pid: std::process::id() }, &[]).await.context("telling it this one is ready")?;
            match link.expect(upgrade::LINK_TIMEOUT, "next connection id").await? {
                (Msg::NextId(n), _) => Ok(n),
                (m, _) => anyhow::bail!("unexpected upgrade message {m:?} instead of the next connection id"),
            }
        };
        match next.await {
            Ok(n) => {
                self.next_id.fetch_max(n, Ordering::Relaxed);
                log::info!("upgrade: serving; the old process stopped accepting and hands over its connections");
                Some(link)
            }
            Err(e) => {
                // The old process is gone or broken: serving beats a port nobody accepts on.
                log::warn!(
                    "upgrade: the old process did not finish the start of the hand-over ({e:#}); serving anyway \
                     (its connections stay there; connection ids may repeat those of its log)"
                );
                None
            }
        }
    }

    /// The old process's side of an upgrade: starts `binary`, hands it the listeners, and
    /// once it is ready, stops accepting and hands it every connection that can move within
    /// [`upgrade::HAND_OVER_TIMEOUT`]. `Err` (this process keeps everything) if the new one
    /// cannot start, fails, or is not ready within [`upgrade::READY_TIMEOUT`].
    async fn upgrade(&mut self, binary: Option<PathBuf>) -> anyhow::Result<String> {
        // A process that narrowed its capabilities after start (--user, or started as another
        // user than root, as under the systemd unit) passes what it kept to the new binary. That
        // is enough unless the new one must switch user again or load eBPF programs.
        let mut pass_on = 0;
        if let Some(d) = &self.dropped {
            if d.account.is_some() {
                anyhow::bail!(
                    "privileges were dropped at start ({}): a new binary started from here could not switch \
                     to the user again; restart the service instead, or start the proxy as that user itself \
                     (systemd User= with AmbientCapabilities=, as the shipped unit does) to upgrade live",
                    d.summary()
                );
            }
            if self.engines.sockmap_loaded() {
                anyhow::bail!(
                    "the sockmap engine is loaded and this process gave up the capabilities that loading it \
                     needs (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) after start ({}), so a new binary started from \
                     here could not load it; restart the service instead (systemctl restart)",
                    d.summary()
                );
            }
            pass_on = d.caps;
        }
        let binary = binary
            .or_else(upgrade::default_binary)
            .context("cannot tell this program's path; pass the binary to start (ntlm-splice upgrade --binary PATH)")?;
        log::info!("upgrade: starting {}", binary.display());
        let started = upgrade::start(&binary, pass_on)?;
        let pid = match self.hand_listeners(&started.link).await {
            Ok(pid) => pid,
            Err(e) => {
                let status = stop_child(started.child).await;
                return Err(e.context(format!("the new process {} ({status})", binary.display())));
            }
        };
        let link = started.link;
        // Committed: from here the new process serves. Its exit status is not ours to wait for.
        drop(started.child);
        // systemd (Type=notify) follows the service to it before this process stops or exits.
        upgrade::notify_main_pid(pid);
        log::info!("upgrade: the new process pid={pid} is ready; this one stops accepting and hands over");
        self.metrics.draining();
        self.metrics_task = None;
        self.stop_accept.cancel();
        for (addr, l) in std::mem::take(&mut self.listeners) {
            if let Err(e) = l.task.await {
                log::error!("accept loop of {addr} failed: {e}");
            }
        }
        let next = self.next_id.load(Ordering::Relaxed);
        if let Err(e) = link.send(&Msg::NextId(next), &[]).await {
            log::error!("upgrade: cannot send the next connection id to pid={pid} ({e}); draining here");
            return Ok(format!("the new process pid={pid} serves new connections; moved=0"));
        }
        let moved = self.hand_over_conns(&link, pid).await;
        link.send(&Msg::Done, &[]).await.ok();
        Ok(format!("the new process pid={pid} serves; moved={moved} connections to it"))
    }

    /// Sends every listener and waits for the new process's ready message: its pid.
    async fn hand_listeners(&self, link: &Link) -> anyhow::Result<u32> {
        for (&addr, l) in &self.listeners {
            // SAFETY: the accept loop owns the socket and runs until stop_accept.
            let fd = unsafe { BorrowedFd::borrow_raw(l.fd) };
            link.send(&Msg::Listener(addr), &[fd]).await.context("sending a listening socket")?;
        }
        if let Some((addr, fd)) = self.metrics_fd {
            // SAFETY: the metrics task owns the socket while `run` runs.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            link.send(&Msg::Metrics(addr), &[fd]).await.context("sending the metrics socket")?;
        }
        link.send(&Msg::ListenersDone, &[]).await.context("sending the listeners")?;
        match link.expect(upgrade::READY_TIMEOUT, "ready message").await? {
            (Msg::Ready { pid }, _) => Ok(pid),
            (m, _) => anyhow::bail!("unexpected upgrade message {m:?} instead of ready"),
        }
    }

    /// Hands parked splice connections, then active ones as they come to rest, to the new
    /// process until none is left here or [`upgrade::HAND_OVER_TIMEOUT`]; returns how many
    /// moved. What stays drains here.
    async fn hand_over_conns(&self, link: &Link, pid: u32) -> usize {
        use park::Owner as _;
        let Some(parker) = &self.lc.parker else {
            log::warn!("upgrade: no parker (epoll failed at start): live connections drain here");
            return 0;
        };
        if !self.table.routes.values().any(|r| matches!(*r.engine, crate::engine::Engine::Splice(_))) {
            log::info!("upgrade: no route's engine can hand its connections over (sockmap): they drain here");
            return 0;
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // A parked sockmap pair stays: its map entries belong to this process's maps.
        let stays = |w: &crate::conn::Waiting| w.kept.is_some();
        let mut queue: std::collections::VecDeque<_> = parker.divert(tx, stays).into();
        self.hand_over.start();
        let deadline = tokio::time::Instant::now() + upgrade::HAND_OVER_TIMEOUT;
        let live = || self.config.global.max_connections - self.slots.available_permits();
        let mut moved = 0;
        'hand: loop {
            while let Some(conn) = queue.pop_front() {
                match send_conn(link, &conn).await {
                    Ok(()) => {
                        log::debug!("conn={} handed over to pid={pid}", conn.meta.meta.id);
                        moved += 1;
                    }
                    Err(e) => {
                        log::error!("upgrade: cannot hand a connection to pid={pid} ({e}); the rest drain here");
                        queue.push_front(conn);
                        break 'hand;
                    }
                }
            }
            if live() == 0 {
                break;
            }
            tokio::select! {
                Some(c) = rx.recv() => queue.push_back(c),
                () = tokio::time::sleep_until(deadline) => {
                    log::warn!(
                        "upgrade: live={} connections could not move within {}; they drain here",
                        live(),
                        humantime::format_duration(upgrade::HAND_OVER_TIMEOUT)
                    );
                    break;
                }
                // Connections that end here free their slots without a message.
                () = tokio::time::sleep(HAND_OVER_POLL) => {}
            }
        }
        self.hand_over.stop();
        parker.undivert();
        while let Ok(c) = rx.try_recv() {
            queue.push_back(c);
        }
        for conn in queue {
            self.lc.resume(conn);
        }
        moved
    }

    /// Stops accepting, waits for live connections up to the drain timeout, then closes them.
    async fn drain(self) {
        self.metrics.draining();
        self.stop_accept.cancel();
        self.health_stop.cancel();
        for (_, l) in self.listeners {
            // The accept loops own the listeners: once they return, the ports are closed.
            if let Err(e) = l.task.await {
                log::error!("accept loop failed: {e}");
            }
        }
        let conns = &self.lc.tracker;
        let drain_timeout = self.config.global.drain_timeout;
        // Connections, not tasks: a connection that has just parked can still have its
        // returning task in the tracker beside its parked token.
        let live = || self.config.global.max_connections - self.slots.available_permits();
        log::info!(
            "shutdown: stopped accepting; draining live={} connections (parked={}) for up to {}",
            live(),
            self.lc.parker.as_ref().map_or(0, Parker::len),
            humantime::format_duration(drain_timeout)
        );
        conns.close();
        if tokio::time::timeout(drain_timeout, conns.wait()).await.is_err() {
            log::warn!("shutdown: drain timeout reached; closing live={} connections", live());
            self.lc.force_close.cancel();
            if tokio::time::timeout(FORCE_CLOSE_GRACE, conns.wait()).await.is_err() {
                log::error!("shutdown: connections did not close within {FORCE_CLOSE_GRACE:?}; exiting anyway");
            }
        }
        log::info!("shutdown: done");
    }
}

/// Serves `config` until `shutdown` completes, then drains (no reloads): what tests and
/// embedders use.
pub async fn serve_until(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let server = Server::start(config, None).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let run = server.run(rx);
    tokio::pin!(run);
    tokio::select! {
        r = &mut run => return r,
        () = shutdown => {}
    }
    tx.send(Control::Shutdown).await.ok();
    run.await
}

/// Binds `addr` (SO_REUSEADDR, TCP_NODELAY, backlog [`LISTEN_BACKLOG`]; IPV6_V6ONLY on IPv6
/// addresses so that `[::]:443` and `0.0.0.0:443` can both be listened on).
///
/// TCP_NODELAY is set on the listener: Linux copies it to every accepted socket, which saves
/// one setsockopt(2) per connection.
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listen = || -> io::Result<TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_tcp_nodelay(true)?;
        s.bind(&addr.into())?;
        s.listen(LISTEN_BACKLOG)?;
        TcpListener::from_std(s.into())
    };
    listen().with_context(|| {
        format!(
            "cannot listen on {addr}: is another process using the port? \
             (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        )
    })
}

async fn accept_loop(
    listener: TcpListener,
    site: Arc<ArcSwap<Site>>,
    lc: Arc<Lifecycle>,
    slots: Arc<Semaphore>,
    next_id: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        // Take a slot before accepting: at the cap, clients wait in the listen backlog.
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            p = slots.clone().acquire_owned() => p.expect("the connection semaphore is never closed"),
        };
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((client, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                lc.tracker.spawn(conn::serve(lc.clone(), site.load_full(), id, client, peer, permit));
            }
            Err(e) if is_resource_exhaustion(&e) => {
                if backoff == ACCEPT_BACKOFF_MIN {
                    log::warn!(
                        "accept failed: {e}; backing off and retrying (raise the open-files limit or lower max_connections)"
                    );
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
            Err(e) => log::debug!("accept: {e}"),
        }
    }
}

/// Keeps a timer pending that always expires before a new connect timeout would.
///
/// tokio wakes its timer driver (an eventfd write, and a wake-up of whichever thread is parked
/// in epoll_wait, usually the other worker) whenever a new timer expires earlier than every
/// pending one. Each connection's connect timeout usually does: the other timers are idle
/// timeouts, an hour away. strace counted 0.64 of those writes per connection (1.67 writes
/// per connection, of which one is the access log). A timer that fires every half connect
/// timeout is always earlier, so a new connect timeout never wakes the driver; it costs one
/// wake-up per half connect timeout instead (2.5 s by default). With several routes, the
/// shortest connect timeout sets it.
async fn timer_floor(connect_timeout: Duration) {
    let period = timer_floor_period(connect_timeout);
    loop {
        tokio::time::sleep(period).await;
    }
}

/// Half the connect timeout, at least [`TIMER_FLOOR_MIN`].
fn timer_floor_period(connect_timeout: Duration) -> Duration {
    (connect_timeout / 2).max(TIMER_FLOOR_MIN)
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// How a route carries the client's address, for its start-up line: ` source=client
/// proxy_protocol=v2 accept_proxy_from="10.0.0.0/8"`, the keys that are set.
fn client_identity(o: &crate::config::file::RouteOptions) -> String {
    let mut out = String::new();
    if let Some(s) = o.source {
        out.push_str(&format!(" source={s}"));
    }
    if let Some(v) = o.proxy_protocol {
        out.push_str(&format!(" proxy_protocol={}", v.as_str()));
    }
    if !o.accept_proxy_from.is_empty() {
        out.push_str(&format!(" accept_proxy_from=\"{}\"", o.accept_proxy_from));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor must expire before a connect timeout started at the same time, except where
    /// that would mean waking more often than every TIMER_FLOOR_MIN.
    #[test]
    fn timer_floor_is_earlier_than_a_connect_timeout() {
        for t in [Duration::from_millis(150), Duration::from_secs(5), Duration::from_secs(3600)] {
            assert!(timer_floor_period(t) < t, "{t:?}");
        }
        assert_eq!(timer_floor_period(Duration::from_millis(1)), TIMER_FLOOR_MIN);
    }

    /// conn.rs sets TCP_NODELAY on the backend socket only: accepted sockets inherit it from
    /// the listener.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let _c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (a, _) = l.accept().await.unwrap();
        assert!(a.nodelay().unwrap());
    }

    /// `[::]:P` and `0.0.0.0:P` can both be listened on (IPV6_V6ONLY), as the example
    /// configuration does.
    #[tokio::test]
    async fn ipv6_and_ipv4_wildcards_bind_side_by_side() {
        let v6 = bind("[::]:0".parse().unwrap()).unwrap();
        let port = v6.local_addr().unwrap().port();
        bind(SocketAddr::from(([0, 0, 0, 0], port))).expect("the IPv4 wildcard on the IPv6 wildcard's port");
    }
}
