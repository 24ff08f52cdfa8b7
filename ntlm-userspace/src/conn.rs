//! The life of one client connection, owned here from accept to the access-log line, in
//! named stages:
//!
//! 1. [`inspect`]: on a listen address with `accept_proxy_from`, the PROXY header of a
//!    trusted balancer is read and consumed, and names the client ([`identity::accept`]); then
//!    on a listen address with SNI routes, the client's TLS server name is peeked (never
//!    consumed) within the address's `sni_timeout`, and a client that sends no ClientHello in
//!    time, or bytes that are not TLS, is closed; elsewhere nothing is read;
//! 2. route: the [`Site`] of the listen address picks the [`Route`] (by server name, else its
//!    default); the connection keeps that `Arc<Route>` for its life, whatever a reload does;
//! 3. [`connect`](connect_backend): a new backend connection for this client alone, in the
//!    route's balancer order, failing over; a refused or timed-out connect counts against
//!    the backend's health when the route checks health; made from the route's `source`
//!    (the client's own address, transparently), and led by the route's PROXY header; then
//!    (stage 3½, [`observe_ntlm`]) on a route with `ntlm_observe` and no SNI, the first
//!    exchanges are relayed in userspace and read until the NTLM login on the connection is
//!    decided ([`crate::ntlm`]), the failed-login guard judging it ([`crate::guard`]); the
//!    engine goes on from the byte counts reached;
//! 4. the engine of the route: moves bytes under the lifecycle contract
//!    ([`crate::lifecycle`]) until the connection ends, or hands it to the parker while idle
//!    ([`park`](crate::park), which gives it back through [`park::Owner`]);
//! 5. [`end`](Lifecycle::ended): the backend [`Lease`] and the connection slot are given up;
//! 6. [`access_log`]: one line per connection, whichever way it ended.
//!
//! The backend socket is created here for this client alone and closed when the engine
//! returns: it is never pooled, reused or shared. That is the security property the
//! project exists for (NTLM and Negotiate authenticate the TCP connection).

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{io::Interest, net::TcpStream, sync::OwnedSemaphorePermit};
use tokio_util::{
    sync::CancellationToken,
    task::{TaskTracker, task_tracker::TaskTrackerToken},
};

use crate::{
    engine::Kept,
    guard::{Blocked, Guard},
    identity::{self, Identity, Source},
    lifecycle::{End, EngineKind, Fault, Outcome, Progress, Relayed, Side},
    metrics::{BlockReason, Metrics},
    ntlm::{self, Judge, Login, LoginResult, Names, ObserveLimits, Observed, Stop},
    park::{self, Owner as _, Parked, Parker, Refused},
    route::{Lease, Route, Site},
    sni,
};

/// The log target of parking and unparking (debug): the parker's own module, where an
/// operator looking for parking turns logging up (`RUST_LOG=ntlm_splice::park=debug`).
const PARK_TARGET: &str = "ntlm_splice::park";

/// What every connection of a running server shares, whatever its route.
pub struct Lifecycle {
    /// Every connection's task (and every parked connection, by a token): the drain waits
    /// for them.
    pub tracker: TaskTracker,
    /// Where idle connections wait without a task (splice engine, `park_after`).
    pub parker: Option<Parker<Waiting>>,
    /// Cancelled when live connections must close (shutdown after the drain timeout).
    pub force_close: CancellationToken,
    /// The process's metrics (a connection's own route and backend hold their handles).
    pub metrics: Arc<Metrics>,
}

/// Who a connection is, for its whole life (parking included).
pub struct ConnMeta {
    /// Its number in the logs.
    pub id: u64,
    /// The client's address: the socket's peer, or the source of its accepted PROXY header.
    pub client: SocketAddr,
    /// The balancer the PROXY header came from, if one was accepted (boxed: most connections
    /// have none, and this is kept while parked).
    pub via: Option<Box<SocketAddr>>,
    /// When it was accepted.
    pub started: Instant,
    /// Its route, as it was when the connection was routed.
    pub route: Arc<Route>,
    /// The backend it was paired with, counted for least-conn.
    pub lease: Lease,
    /// Its slot under `max_connections`.
    pub permit: OwnedSemaphorePermit,
    /// The NTLM login the observer saw on it, for the access log (boxed: most connections
    /// have none, and this is kept while parked).
    pub ntlm: Option<Box<Login>>,
}

/// A parked connection's identity, and the token that keeps the drain counting it.
pub struct Waiting {
    /// Who it is.
    pub meta: ConnMeta,
    /// Keeps the connection counted by the drain on shutdown while it has no task.
    pub token: TaskTrackerToken,
    /// What its engine kept besides the sockets (sockmap engine: its map entries).
    pub kept: Option<Kept>,
}

/// What stage 1 learnt of the client: who it is, and the server name it asked for.
struct Inspected {
    /// Who, and through which balancer.
    who: Identity,
    /// The TLS server name, on an address with SNI routes.
    name: Option<String>,
}

/// Why a connection ended before an engine took it (the access log's `end=` and `error=`).
struct Unserved {
    route: Option<Arc<Route>>,
    end: End,
    why: Option<Fault>,
    /// When it ended while the NTLM observer read it: what it had by then (boxed: the usual
    /// refusal has none).
    observed: Option<Box<EndedObserved>>,
}

/// A connection that ended in the NTLM observer: its backend, the bytes moved, the login.
struct EndedObserved {
    lease: Lease,
    progress: Progress,
    ntlm: Option<Box<Login>>,
}

/// Serves one client connection accepted on `site` to its end, then releases its connection
/// slot (`permit`).
///
/// Everything is owned by this one future, which is the connection's task: while the
/// connection is idle its size is what the connection costs in memory. So stages 1-3 (the
/// peek, timeouts, failover) are one boxed future, freed once connected, and this is not an
/// `async fn`, which would store its by-value arguments a second time.
#[allow(clippy::manual_async_fn)]
pub fn serve(
    lc: Arc<Lifecycle>,
    site: Arc<Site>,
    id: u64,
    client: TcpStream,
    mut peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let started = Instant::now();
        // Stages 1-3. The output is destructured in place: a named local holding the backend
        // or the lease (or borrowed, as by set_nodelay) would keep its slot in this task for
        // the connection's whole life.
        // `peer` becomes the client's address (the PROXY header's source, if one was accepted)
        // rather than a second address being kept for the connection's life.
        let (route, backend, lease, via, progress, ntlm) =
            match Box::pin(route_and_connect(&lc, site, id, &client, &mut peer)).await {
                Ok(c) => c,
                Err((u, who)) => {
                    // Dropping the client closes it at once: no backend would take it (or the
                    // observer ended the connection, and closed the backend).
                    drop(client);
                    let engine = u.route.as_ref().map_or(EngineKind::Splice, |r| r.engine.kind());
                    let (progress, backend, ntlm) = match u.observed.map(|o| *o) {
                        Some(EndedObserved { lease, progress, ntlm }) => (progress, Some(lease.backend().addr), ntlm),
                        None => (Progress::new(), None, None),
                    };
                    let outcome = progress.ended(u.end, u.why, engine);
                    let via = who.via.unwrap_or(peer);
                    lc.metrics.ended(u.route.as_deref(), &outcome);
                    let elapsed = started.elapsed();
                    access_log(id, who.client, via, u.route.as_deref(), backend, &outcome, elapsed, ntlm.as_deref());
                    drop(permit);
                    return;
                }
            };
        // Stage 4: the route's engine.
        let relayed = route.engine.relay(id, client, backend, &route.ctl, progress, None).await;
        lc.returned(ConnMeta { id, client: peer, via, started, route, lease, permit, ntlm }, relayed);
    }
}

/// A connection served: its route, its backend socket and lease, the balancer it came
/// through, and the bytes moved and the login seen by the NTLM observer.
type Served = (Arc<Route>, TcpStream, Lease, Option<Box<SocketAddr>>, Progress, Option<Box<Login>>);

/// Stages 1-3½: inspect the client, choose its route, connect a backend of that route, and
/// observe the NTLM login (one future with [`serve`]'s one await on it, so that the client
/// socket, borrowed here, takes no extra room in the connection's task).
/// `peer` is the socket's peer, and becomes the client's address when a PROXY header names
/// it.
async fn route_and_connect(
    lc: &Lifecycle,
    site: Arc<Site>,
    id: u64,
    client: &TcpStream,
    peer: &mut SocketAddr,
) -> Result<Served, (Unserved, Identity)> {
    let direct = Identity { client: *peer, destination: None, via: None };
    let inspected = tokio::select! {
        n = inspect(&site, client, direct) => n,
        () = lc.force_close.cancelled() => return Err((Unserved { route: None, end: End::Shutdown, why: None, observed: None }, direct)),
    };
    // A client on an SNI address that sent no complete ClientHello in time, closed, or sent
    // something that is not TLS is closed without a backend connection; a TLS client goes
    // to the route of its server name, else (no name, or no match) to the default route.
    let Inspected { mut who, name } = inspected?;
    let unrouted = |why: String| {
        (Unserved { route: None, end: End::NoRoute, why: Some(Fault::Unrouted(why)), observed: None }, who)
    };
    let Some(route) = site.route(name.as_deref()).cloned() else {
        return Err(unrouted(match name {
            Some(name) => format!("no route for the server name {name:?} and no default route"),
            None => "the client sent no server name and there is no default route".to_string(),
        }));
    };
    // Clients on an address with SNI routes speak TLS: nothing of their logins can be read.
    let observes = route.spec.options.ntlm_observe && !site.needs_sni();
    drop(site);
    route.metrics.routed();
    if let Some(blocked) = route.guard.as_ref().and_then(|g| g.address_blocked(who.client.ip(), Instant::now())) {
        route.metrics.guard_block(block_reason(&blocked));
        let why = Some(Fault::Blocked(Box::new(blocked_why(&blocked))));
        return Err((Unserved { route: Some(route), end: End::GuardBlocked, why, observed: None }, who));
    }
    if route.spec.options.proxy_protocol.is_some() && who.destination.is_none() {
        // The address the client connected to, for the PROXY header out.
        who.destination = client.local_addr().ok();
    }
    let connected = tokio::select! {
        c = connect_backend(&route, id, &who, name.as_deref()) => c,
        () = lc.force_close.cancelled() => None,
    };
    let Some((backend, lease)) = connected else {
        return Err((Unserved { route: Some(route), end: End::ConnectFailed, why: None, observed: None }, who));
    };
    let (progress, ntlm) = if observes {
        match observe_ntlm(&route, id, client, &backend, who.client.ip()).await {
            Ok(seen) => seen,
            Err((progress, end, why, ntlm)) => {
                let observed = Some(Box::new(EndedObserved { lease, progress, ntlm }));
                return Err((Unserved { route: Some(route), end, why, observed }, who));
            }
        }
    } else {
        (Progress::new(), None)
    };
    *peer = who.client;
    Ok((route, backend, lease, who.via.map(Box::new), progress, ntlm))
}

/// Stage 1: what the client says before the route is chosen: its PROXY header on an address
/// with `accept_proxy_from` (consumed: it is the balancer's, not the client's), then the TLS
/// server name on an address with SNI routes (peeked, so the backend still gets every byte).
async fn inspect(site: &Site, client: &TcpStream, direct: Identity) -> Result<Inspected, (Unserved, Identity)> {
    let who = match &site.accept_proxy {
        None => direct,
        Some(accept) => identity::accept(accept, client, direct.client).await.map_err(|e| {
            let why = Some(Fault::ProxyRefused(Box::new(e.to_string())));
            (Unserved { route: None, end: End::ProxyRefused, why, observed: None }, direct)
        })?,
    };
    if !site.needs_sni() {
        return Ok(Inspected { who, name: None });
    }
    match sni::peek_server_name(client, site.sni_timeout).await {
        Ok(name) => Ok(Inspected { who, name }),
        Err(e) => Err((
            Unserved { route: None, end: End::NoRoute, why: Some(Fault::Unrouted(e.to_string())), observed: None },
            who,
        )),
    }
}

/// Stage 3½: relays the first exchanges of a connection in userspace until its NTLM login is
/// decided, the guard judging each login; `Ok` to hand the connection to the engine from the
/// progress reached, `Err` when it ends here (the sockets to reset are set so; the caller
/// closes them). Either way with the login seen, for the log.
async fn observe_ntlm(
    route: &Route,
    id: u64,
    client: &TcpStream,
    backend: &TcpStream,
    from: IpAddr,
) -> Result<(Progress, Option<Box<Login>>), (Progress, End, Option<Fault>, Option<Box<Login>>)> {
    let mut judge = GuardJudge { route, id, from, blocked: None };
    let Observed { progress, stop, login, answerable } =
        ntlm::observe(client, backend, &route.ctl, &ObserveLimits::default(), &mut judge).await;
    let blocked = judge.blocked.take();
    if let Some(l) = &login
        && matches!(l.result, LoginResult::Blocked | LoginResult::Unanswered)
    {
        // Decided logins were counted as they came (GuardJudge::decided).
        route.metrics.login(l.result);
    }
    log::debug!(
        "conn={id} route={} ntlm observer stopped ({}) after {} bytes up, {} down",
        route.name(),
        stop.as_str(),
        progress.bytes[0],
        progress.bytes[1]
    );
    let login = login.map(Box::new);
    let (end, fault) = match stop {
        stop if stop.hands_over() => return Ok((progress, login)),
        Stop::Blocked => {
            let b = blocked.unwrap_or(Blocked::User(String::new()));
            route.metrics.guard_block(block_reason(&b));
            if answerable {
                // The client waits for this request's response alone: say no, rather than
                // close, which HTTP clients take for a lost connection and retry (curl five
                // times), each retry blocked again.
                match client.try_write(BLOCKED_RESPONSE) {
                    Ok(n) if n == BLOCKED_RESPONSE.len() => {}
                    Ok(n) => log::debug!("conn={id} the guard's 403 went out in part ({n} bytes)"),
                    Err(e) => log::debug!("conn={id} the guard's 403: {e}"),
                }
            }
            (End::GuardBlocked, Some(Fault::Blocked(Box::new(blocked_why(&b)))))
        }
        Stop::DeniedUnwatched => {
            route.metrics.guard_block(BlockReason::Unwatched);
            let why = "the failed-login guard closes a connection whose last login was denied when the observer \
                       stops watching it (64 KiB or 10 s); the client's next try comes on a new connection";
            (End::GuardBlocked, Some(Fault::Blocked(Box::new(why.to_string()))))
        }
        Stop::Failed(fault) => {
            for &side in fault.resets() {
                let sock = if side == Side::Client { client } else { backend };
                if let Err(e) = crate::sys::sock::set_linger_zero(sock.as_fd()) {
                    log::debug!("conn={id} SO_LINGER on the {side:?} socket: {e}");
                }
            }
            fault.ending()
        }
        Stop::IdleTimeout => (End::IdleTimeout, None),
        // Stop::Shutdown; the others hand over.
        _ => (End::Shutdown, None),
    };
    Err((progress, end, fault, login))
}

/// What a client whose login the guard blocks gets, when it waits for that response alone
/// (not counted in the access log's bytes, which are the backend's and the client's).
const BLOCKED_RESPONSE: &[u8] = b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 60\r\n\
    Connection: close\r\n\r\nLogins are blocked for a while after too many failed ones.\r\n";

/// The failed-login guard of a route (if it has one) as the observer's judge; also counts the
/// logins decided.
struct GuardJudge<'a> {
    route: &'a Route,
    id: u64,
    /// The client's address (the PROXY header's source, if one was accepted).
    from: IpAddr,
    /// What the guard refused, if it did.
    blocked: Option<Blocked>,
}

impl GuardJudge<'_> {
    fn guard(&self) -> Option<&Guard> {
        self.route.guard.as_deref()
    }
}

impl Judge for &mut GuardJudge<'_> {
    fn admit(&mut self, names: &Names) -> bool {
        let Some(g) = self.guard() else { return true };
        let now = Instant::now();
        // The address too: it may have been blocked by a denied login on this very connection.
        self.blocked = g.address_blocked(self.from, now).or_else(|| g.user_blocked(&names.account(), now));
        self.blocked.is_none()
    }

    fn decided(&mut self, login: &Login) {
        self.route.metrics.login(login.result);
        let Some(g) = self.guard() else { return };
        let now = Instant::now();
        let account = login.names.account();
        match login.result {
            LoginResult::Denied => {
                for b in g.denied(self.from, Some(&account), now) {
                    let spec = g.spec();
                    log::warn!(
                        "conn={} route={} the failed-login guard blocks {} for {} after {} denied logins within {}",
                        self.id,
                        self.route.name(),
                        match &b {
                            Blocked::Address(a) => format!("the client address {a}"),
                            Blocked::User(u) => format!("the user \"{u}\""),
                        },
                        humantime::format_duration(spec.block_for),
                        spec.max_failures,
                        humantime::format_duration(spec.window),
                    );
                }
            }
            LoginResult::Ok => g.succeeded(&account, now),
            _ => {}
        }
    }

    fn watches_denied(&self) -> bool {
        self.guard().is_some()
    }
}

/// The metrics label of a block.
fn block_reason(b: &Blocked) -> BlockReason {
    match b {
        Blocked::Address(_) => BlockReason::Address,
        Blocked::User(_) => BlockReason::User,
    }
}

/// The access log's `error=` of a block (the user's name is in `ntlm_user=`).
fn blocked_why(b: &Blocked) -> String {
    match b {
        Blocked::Address(_) => "the failed-login guard ([route.guard]) blocks this client's address",
        Blocked::User(_) => "the failed-login guard ([route.guard]) blocks this user name",
    }
    .to_string()
}

impl Lifecycle {
    /// The engine returned: stages 5-6 if the connection ended, else parking.
    fn returned(self: &Arc<Self>, meta: ConnMeta, relayed: Relayed) {
        match relayed {
            Relayed::Ended(outcome) => self.ended(meta, &outcome),
            Relayed::Parked { socks, progress, kept } => {
                let idle_timeout = meta.route.ctl.idle_timeout;
                let conn = Parked { meta: Waiting { meta, token: self.tracker.token(), kept }, socks, progress };
                let Some(parker) = &self.parker else { return self.resume(conn) };
                let id = conn.meta.meta.id;
                // Kernel-forwarded bytes wake a sockmap connection through the parker's bell.
                let parked = parker.park_then(conn, idle_timeout, |w: &mut Waiting, key| {
                    if let Some(k) = &mut w.kept {
                        k.parked(parker.bell(), key);
                    }
                });
                match parked {
                    Ok(_) => log::debug!(target: PARK_TARGET, "conn={id} parked"),
                    Err((conn, Refused::Closed)) => self.close(conn, End::Shutdown),
                    Err((conn, e @ Refused::Watch(_))) => {
                        log::debug!("conn={id} cannot park ({e}); relaying it on");
                        self.resume(conn);
                    }
                }
            }
        }
    }

    /// Stages 5-6: gives up the backend lease and the connection slot, and writes the
    /// access-log line.
    fn ended(&self, meta: ConnMeta, outcome: &Outcome) {
        let ConnMeta { id, client, via, started, route, lease, permit, ntlm } = meta;
        let backend = lease.backend().addr;
        drop(lease);
        let peer = via.map_or(client, |v| *v);
        self.metrics.ended(Some(&route), outcome);
        access_log(id, client, peer, Some(&route), Some(backend), outcome, started.elapsed(), ntlm.as_deref());
        drop(permit);
    }
}

/// The parker gives connections back here.
impl park::Owner<Waiting> for Arc<Lifecycle> {
    /// Starts a task that relays a parked connection again, from where it stopped.
    fn resume(&self, conn: Parked<Waiting>) {
        let Parked { meta: Waiting { meta, token, kept }, socks, progress } = conn;
        log::debug!(target: PARK_TARGET, "conn={} unparked", meta.id);
        self.tracker.spawn(resume(self.clone(), meta, socks, progress, kept));
        // Only now: the new task is tracked, so the drain never sees the connection gone.
        drop(token);
    }

    /// Closes a parked connection (idle timeout, forced shutdown) and logs it.
    fn close(&self, conn: Parked<Waiting>, end: End) {
        let Parked { meta: Waiting { meta, token, kept }, socks, progress } = conn;
        // The map entries go while the sockets are open, then the sockets.
        drop(kept);
        drop(socks);
        let engine = meta.route.engine.kind();
        self.ended(meta, &progress.ended(end, None, engine));
        drop(token);
    }
}

/// The task of a connection taken out of the parker: back into the runtime, then relayed as
/// before, on its route's engine. Not an `async fn` (see [`serve`]).
#[allow(clippy::manual_async_fn)]
pub fn resume(
    lc: Arc<Lifecycle>,
    meta: ConnMeta,
    socks: [OwnedFd; 2],
    progress: Progress,
    kept: Option<Kept>,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let [c, b] = socks;
        let (client, backend) = match (
            TcpStream::from_std(std::net::TcpStream::from(c)),
            TcpStream::from_std(std::net::TcpStream::from(b)),
        ) {
            (Ok(c), Ok(b)) => (c, b),
            (Err(e), _) | (_, Err(e)) => {
                // epoll_ctl(2) failed (out of memory, or fs.epoll.max_user_watches): both
                // sockets close as this returns, and the connection ends.
                log::warn!("conn={} cannot return a parked connection to the runtime: {e}", meta.id);
                let engine = meta.route.engine.kind();
                lc.ended(meta, &progress.ended(End::Internal, Some(Fault::Internal(e)), engine));
                return;
            }
        };
        let route = meta.route.clone();
        let relayed = route.engine.relay(meta.id, client, backend, &route.ctl, progress, kept).await;
        lc.returned(meta, relayed);
    }
}

/// Stage 3: a new backend connection of `route` for this client, trying the backends in the
/// balancer's order with the route's connect timeout, from the route's `source`, and led by
/// the route's PROXY header (`name`: the TLS server name, for v2's authority).
async fn connect_backend(route: &Route, id: u64, who: &Identity, name: Option<&str>) -> Option<(TcpStream, Lease)> {
    let timeout = route.connect_timeout();
    let o = &route.spec.options;
    // The destination is known whenever a header goes out (see route_and_connect); the
    // client's own address stands in if getsockname(2) failed.
    let header = o.proxy_protocol.map(|v| v.header(who.client, who.destination.unwrap_or(who.client), name));
    for backend in route.order(who.client) {
        let addr = backend.addr;
        let started = route.metrics.connecting(&backend.metrics);
        let attempt = async {
            let s = connect(id, addr, o.source.map(|src| (src, who.client))).await?;
            if let Some(h) = &header {
                identity::send_header(&s, h).await?;
            }
            Ok::<_, io::Error>(s)
        };
        let err = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(s)) => {
                route.metrics.connected(started);
                return Some((s, Lease::new(backend)));
            }
            Ok(Err(e)) => {
                log::warn!(
                    "conn={id} route={} backend={addr} connect failed: {e}; trying the next backend",
                    route.name()
                );
                e
            }
            Err(_) => {
                let t = humantime::format_duration(timeout);
                log::warn!(
                    "conn={id} route={} backend={addr} connect timed out after {t}; trying the next backend",
                    route.name()
                );
                io::Error::new(io::ErrorKind::TimedOut, format!("connect timed out after {t}"))
            }
        };
        route.connect_failed(backend, &err);
    }
    None
}

/// Opens a backend connection with TCP_NODELAY (the client socket has it from the listener,
/// see `server::bind`).
///
/// Not `TcpStream::connect`, which reads SO_ERROR after every connect, one getsockopt(2) per
/// connection: here the outcome comes from what epoll reports when the handshake ends
/// (EPOLLOUT alone: connected; with EPOLLERR or EPOLLHUP: failed), and SO_ERROR is read only
/// after a failure, for its message.
///
/// With `source` (the route's `source` and the client's address), the socket is bound first
/// (see [`identity::bind`]).
async fn connect(id: u64, addr: SocketAddr, source: Option<(Source, SocketAddr)>) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    if let Err(e) = s.set_tcp_nodelay(true) {
        log::debug!("conn={id} TCP_NODELAY: {e}");
    }
    if let Some((source, client)) = source {
        identity::bind(&s, source, client, addr)?;
    }
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(s))?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::ConnectionAborted, "the connection closed while connecting")
        }));
    }
    Ok(stream)
}

/// Stage 6: the access-log line (target `access`) of a connection that ended; `ntlm`: the
/// login the observer saw (names only, escaped by the parser: never a token).
#[allow(clippy::too_many_arguments)]
fn access_log(
    id: u64,
    client: SocketAddr,
    peer: SocketAddr,
    route: Option<&Route>,
    backend: Option<SocketAddr>,
    o: &Outcome,
    elapsed: Duration,
    ntlm: Option<&Login>,
) {
    // A connection that was never routed was carried by no engine.
    let engine = if route.is_some() { o.engine.as_str() } else { "-" };
    let route = route.map_or("-", Route::name);
    let backend = backend.map_or_else(|| "-".to_string(), |b| b.to_string());
    let error = match &o.fault {
        Some(f) => format!(" error=\"{}\"", f.to_string().replace('"', "'")),
        None => String::new(),
    };
    let ntlm = match ntlm {
        Some(l) => format!(
            " ntlm_user=\"{}\" ntlm_workstation=\"{}\" ntlm_result={}",
            l.names.account(),
            l.names.workstation,
            l.result.as_str()
        ),
        None => String::new(),
    };
    log::info!(
        target: "access",
        "conn={id} client={client} peer={peer} route={route} backend={backend} engine={engine} bytes_up={} bytes_down={} duration_ms={} end={}{error}{ntlm}",
        o.bytes_up,
        o.bytes_down,
        elapsed.as_millis(),
        o.end.as_str(),
    );
}

#[cfg(test)]
mod tests {
    use tokio::sync::Semaphore;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::config::EngineChoice;

    /// The guard's answer is one whole HTTP/1.1 response whose body is as long as it says.
    #[test]
    fn the_guards_403_is_a_whole_response() {
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut r = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head) = r.parse(BLOCKED_RESPONSE).unwrap() else { panic!("a partial head") };
        assert_eq!(r.code, Some(403));
        let len = r.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length")).unwrap().value;
        let len: usize = std::str::from_utf8(len).unwrap().parse().unwrap();
        assert_eq!(BLOCKED_RESPONSE.len() - head, len);
    }

    #[tokio::test]
    async fn backend_connect_sets_nodelay_and_reports_refusal() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let s = connect(1, addr, None).await.unwrap();
        assert!(s.nodelay().unwrap());
        let (mut far, _) = l.accept().await.unwrap();
        assert_eq!(far.peer_addr().unwrap(), s.local_addr().unwrap());
        // The stream is usable both ways.
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = s;
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        far.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        drop(l);
        // Nothing listens there any more: refused, with the kernel's error.
        drop((s, far));
        let e = connect(2, addr, None).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }

    /// What an idle connection costs the process is mostly its task, i.e. this future (plus
    /// tokio's two socket registrations). The bound is there so that a change that bloats it
    /// (an unboxed engine future, a large local held across the relay) is noticed. 608: the
    /// balancer's address of a PROXY-header client (`via`, boxed) added 8 bytes in release;
    /// 624: the NTLM login seen (boxed) and the observer's byte counts handed to the engine.
    #[tokio::test]
    async fn connection_task_is_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let table = crate::route::Table::single_for_test(EngineChoice::Splice, addr).await;
        let site = table.sites.values().next().unwrap().clone();
        let route = table.routes.values().next().unwrap().clone();
        let metrics = Arc::new(Metrics::new());
        let force_close = CancellationToken::new();
        let lc = Arc::new(Lifecycle { tracker: TaskTracker::new(), parker: None, force_close, metrics });
        let client = TcpStream::connect(addr).await.unwrap();
        let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        {
            let c2 = TcpStream::connect(addr).await.unwrap();
            let c3 = TcpStream::connect(addr).await.unwrap();
            eprintln!(
                "engine relay {}",
                size_of_val(&route.engine.relay(1, c2, c3, &route.ctl, Progress::new(), None))
            );
            eprintln!("outcome {}", size_of::<Outcome>());
        }
        let task = serve(lc.clone(), site, 1, client, addr, permit);
        let size = size_of_val(&task);
        eprintln!("connection task future: {size} bytes");
        assert!(size <= 624, "the connection task grew to {size} bytes");
        // The task of a connection back from the parker holds the same.
        let meta = ConnMeta {
            id: 2,
            client: addr,
            via: None,
            started: Instant::now(),
            lease: Lease::new(&route.backends[0]),
            route,
            permit: Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap(),
            ntlm: None,
        };
        let (c, b) = (std::net::TcpStream::connect(addr).unwrap(), std::net::TcpStream::connect(addr).unwrap());
        let resumed = resume(lc, meta, [c.into(), b.into()], Progress::new(), None);
        let size = size_of_val(&resumed);
        eprintln!("resumed connection task future: {size} bytes");
        assert!(size <= 624, "the resumed connection task grew to {size} bytes");
    }
}
