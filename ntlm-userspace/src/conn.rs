//! The lifecycle of one client connection: pick a backend, connect (failing over in
//! balancer order), hand the pair to the engine, and write one access-log line.
//!
//! The backend socket is created here for this client alone and closed when the engine
//! returns: it is never pooled, reused or shared. That is the security property the
//! project exists for (NTLM and Negotiate authenticate the TCP connection).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::Arc,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{io::Interest, net::TcpStream, sync::OwnedSemaphorePermit};
use tokio_util::task::TaskTracker;

use crate::{
    balance::{BackendLease, Balancer},
    config::Config,
    engine::{Engine, Outcome, Progress, Relayed},
    park::{ParkedConn, Parker},
    relay::{End, Fault, RelayCtl},
};

/// Everything a connection task needs, shared by all of them.
pub struct Shared {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Backend selection.
    pub balancer: Balancer,
    /// The data engine.
    pub engine: Arc<Engine>,
    /// Timeouts and the forced-close signal.
    pub ctl: RelayCtl,
    /// Every connection's task (and every parked connection, by a token): the drain waits
    /// for them.
    pub tracker: TaskTracker,
    /// Where idle connections wait without a task (`--park-after`, splice engine).
    pub parker: Option<Parker>,
}

/// Who a connection is, for its whole life (parking included).
pub struct ConnMeta {
    /// Its number in the logs.
    pub id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// When it was accepted.
    pub started: Instant,
    /// The backend it was paired with, counted for least-conn.
    pub lease: BackendLease,
    /// Its slot under `--max-connections`.
    pub permit: OwnedSemaphorePermit,
}

/// Serves one accepted client connection to its end, then releases its connection slot
/// (`permit`).
///
/// Everything is owned by this one future, which is the connection's task: while the
/// connection is idle its size is what the connection costs in memory. So the connect phase
/// (timeouts, failover) is boxed and freed once connected, and this is not an `async fn`,
/// which would store its by-value arguments a second time.
#[allow(clippy::manual_async_fn)]
pub fn serve(
    shared: Arc<Shared>,
    id: u64,
    client: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let started = Instant::now();
        // The connect phase (timeouts, failover) is one boxed future, freed once connected.
        // Its output is destructured in place: a named local holding the backend or the lease
        // (or borrowed, as by set_nodelay) would keep its slot in this task for the
        // connection's whole life.
        let Some((backend, lease)) = Box::pin(async {
            tokio::select! {
                c = connect_backend(&shared, id, peer) => c,
                () = shared.ctl.force_close.cancelled() => None,
            }
        })
        .await
        else {
            // Dropping the client closes it at once: no backend would take it.
            drop(client);
            access_log(id, peer, None, shared.engine.name(), &Outcome {
                bytes_up: 0,
                bytes_down: 0,
                end: End::ConnectFailed,
                fault: None,
                engine: shared.engine.name(),
            }, started.elapsed());
            drop(permit);
            return;
        };
        let relayed = shared.engine.relay(id, client, backend, &shared.ctl, Progress::new()).await;
        finish(&shared, ConnMeta { id, peer, started, lease, permit }, relayed);
    }
}

/// A connection's task returned: the access log if it ended, else parking.
fn finish(shared: &Arc<Shared>, meta: ConnMeta, relayed: Relayed) {
    match relayed {
        Relayed::Ended(outcome) => ended(shared, meta, &outcome),
        Relayed::Parked { socks, progress } => {
            let conn = ParkedConn { meta, token: shared.tracker.token(), socks, progress };
            match &shared.parker {
                Some(parker) => parker.park(shared, conn),
                None => resume_now(shared, conn),
            }
        }
    }
}

/// Writes the access-log line of a connection that ended, then gives up its backend lease
/// and its connection slot.
fn ended(shared: &Shared, meta: ConnMeta, outcome: &Outcome) {
    let ConnMeta { id, peer, started, lease, permit } = meta;
    let backend_addr = shared.balancer.addr(lease.index());
    drop(lease);
    access_log(id, peer, Some(backend_addr), outcome.engine, outcome, started.elapsed());
    drop(permit);
}

/// Closes a parked connection (idle timeout, forced shutdown) and logs it.
pub(crate) fn close_parked(shared: &Shared, conn: ParkedConn, end: End) {
    let ParkedConn { meta, token, socks, progress } = conn;
    drop(socks);
    ended(shared, meta, &progress.ended(end, None, shared.engine.name()));
    drop(token);
}

/// Starts a task that relays a parked connection again, from where it stopped.
pub(crate) fn resume_now(shared: &Arc<Shared>, conn: ParkedConn) {
    let ParkedConn { meta, token, socks, progress } = conn;
    shared.tracker.spawn(resume(shared.clone(), meta, socks, progress));
    // Only now: the new task is tracked, so the drain never sees the connection gone.
    drop(token);
}

/// The task of a connection taken out of the parker: back into the runtime, then relayed as
/// before. Not an `async fn` (see [`serve`]).
#[allow(clippy::manual_async_fn)]
fn resume(
    shared: Arc<Shared>,
    meta: ConnMeta,
    socks: [OwnedFd; 2],
    progress: Progress,
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
                ended(&shared, meta, &progress.ended(End::Internal, Some(Fault::Internal(e)), shared.engine.name()));
                return;
            }
        };
        let relayed = shared.engine.relay(meta.id, client, backend, &shared.ctl, progress).await;
        finish(&shared, meta, relayed);
    }
}

async fn connect_backend(shared: &Shared, id: u64, peer: SocketAddr) -> Option<(TcpStream, BackendLease)> {
    let timeout = shared.config.connect_timeout;
    for (index, addr) in shared.balancer.order(peer) {
        match tokio::time::timeout(timeout, connect(id, addr)).await {
            Ok(Ok(s)) => return Some((s, shared.balancer.lease(index))),
            Ok(Err(e)) => log::warn!("conn={id} backend={addr} connect failed: {e}; trying the next backend"),
            Err(_) => log::warn!(
                "conn={id} backend={addr} connect timed out after {}; trying the next backend",
                humantime::format_duration(timeout)
            ),
        }
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
async fn connect(id: u64, addr: SocketAddr) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    if let Err(e) = s.set_tcp_nodelay(true) {
        log::debug!("conn={id} TCP_NODELAY: {e}");
    }
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(s))?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::ConnectionAborted, "the connection closed while connecting")));
    }
    Ok(stream)
}

fn access_log(
    id: u64,
    client: SocketAddr,
    backend: Option<SocketAddr>,
    engine: &str,
    o: &Outcome,
    elapsed: Duration,
) {
    let backend = backend.map_or_else(|| "-".to_string(), |b| b.to_string());
    let error = match &o.fault {
        Some(f) => format!(" error=\"{}\"", f.to_string().replace('"', "'")),
        None => String::new(),
    };
    log::info!(
        target: "access",
        "conn={id} client={client} backend={backend} engine={engine} bytes_up={} bytes_down={} duration_ms={} end={}{error}",
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
    use crate::config::{Balance, EngineChoice};

    #[tokio::test]
    async fn backend_connect_sets_nodelay_and_reports_refusal() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let s = connect(1, addr).await.unwrap();
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
        let e = connect(2, addr).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }

    /// What an idle connection costs the process is mostly its task, i.e. this future (plus
    /// tokio's two socket registrations). The bound is there so that a change that bloats it
    /// (an unboxed engine future, a large local held across the relay) is noticed.
    #[tokio::test]
    async fn connection_task_is_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let config = Arc::new(Config {
            listen: vec![addr],
            backends: vec![addr],
            engine: EngineChoice::Splice,
            balance: Balance::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Some(Duration::from_secs(3600)),
            drain_timeout: Duration::from_secs(1),
            max_connections: 1,
            max_inflight: 1 << 20,
            max_inflight_total: 1 << 20,
            sockmap_sndbuf: 0,
            pipe_size: 0,
            park_after: Some(Duration::from_secs(2)),
        });
        let shared = Arc::new(Shared {
            balancer: crate::balance::Balancer::new(config.balance, config.backends.clone()),
            ctl: RelayCtl { idle_timeout: config.idle_timeout, force_close: CancellationToken::new(), park_after: config.park_after },
            engine: Arc::new(Engine::select(&config).unwrap().0),
            config,
            tracker: TaskTracker::new(),
            parker: None,
        });
        let client = TcpStream::connect(addr).await.unwrap();
        let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        {
            let c2 = TcpStream::connect(addr).await.unwrap();
            let c3 = TcpStream::connect(addr).await.unwrap();
            eprintln!("engine relay {}", size_of_val(&shared.engine.relay(1, c2, c3, &shared.ctl, Progress::new())));
            eprintln!("outcome {}", size_of::<Outcome>());
        }
        let task = serve(shared.clone(), 1, client, addr, permit);
        let size = size_of_val(&task);
        eprintln!("connection task future: {size} bytes");
        assert!(size <= 600, "the connection task grew to {size} bytes");
        // The task of a connection back from the parker holds the same.
        let meta = ConnMeta {
            id: 2,
            peer: addr,
            started: Instant::now(),
            lease: shared.balancer.lease(0),
            permit: Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap(),
        };
        let (c, b) = (std::net::TcpStream::connect(addr).unwrap(), std::net::TcpStream::connect(addr).unwrap());
        let resumed = resume(shared.clone(), meta, [c.into(), b.into()], Progress::new());
        let size = size_of_val(&resumed);
        eprintln!("resumed connection task future: {size} bytes");
        assert!(size <= 600, "the resumed connection task grew to {size} bytes");
    }
}
