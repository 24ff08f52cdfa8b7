//! The data phase of one paired connection, shared by every engine.
//!
//! An engine provides a [`Session`]: two directions that each move bytes until their
//! source reaches EOF and then pass the FIN on (`shutdown(SHUT_WR)` on the destination),
//! plus byte counters and the time of the last byte moved. [`drive`] runs both directions
//! together (never `select!` over the two: one side's EOF must not cancel the other),
//! and ends the connection on the first of: both directions finished (half-close works:
//! the open direction keeps flowing), a reset or error on either socket (the other side is
//! then reset too), the idle timeout, or a forced shutdown.

use std::{future::Future, io, time::Duration};

use tokio_util::sync::CancellationToken;

/// A socket of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The accepted client connection.
    Client,
    /// The connection we opened to the backend.
    Backend,
}

impl Side {
    /// The other socket of the pair.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
}

/// A direction of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client to backend.
    Up,
    /// Backend to client.
    Down,
}

impl Dir {
    /// The socket bytes of this direction are read from.
    pub fn src(self) -> Side {
        match self {
            Dir::Up => Side::Client,
            Dir::Down => Side::Backend,
        }
    }
    /// The socket bytes of this direction are written to.
    pub fn dst(self) -> Side {
        self.src().other()
    }
}

/// Why a connection ended (the access log's `end=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The client half-closed first; both directions then finished.
    ClientFin,
    /// The backend half-closed first; both directions then finished.
    BackendFin,
    /// The client's socket failed (reset, timeout); the backend was reset.
    ClientReset,
    /// The backend's socket failed; the client was reset.
    BackendReset,
    /// No byte moved for the idle timeout.
    IdleTimeout,
    /// No backend accepted the connection.
    ConnectFailed,
    /// Closed by the proxy's shutdown after the drain timeout.
    Shutdown,
    /// The engine failed for a reason of its own (e.g. a BPF map update); both closed.
    Internal,
}

impl End {
    /// The access-log spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientFin => "client_fin",
            End::BackendFin => "backend_fin",
            End::ClientReset => "client_reset",
            End::BackendReset => "backend_reset",
            End::IdleTimeout => "idle_timeout",
            End::ConnectFailed => "connect_failed",
            End::Shutdown => "shutdown",
            End::Internal => "internal_error",
        }
    }
}

/// A failure while moving bytes, tagged with the socket (or the engine) at fault.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    /// A socket of the pair failed (reset, broken pipe, timeout).
    #[error("{side:?} socket: {source}")]
    Socket {
        /// Which socket.
        side: Side,
        /// The error.
        source: io::Error,
    },
    /// The engine itself failed.
    #[error("engine: {0}")]
    Internal(#[source] io::Error),
}

impl Fault {
    /// A socket failure on `side`.
    pub fn on(side: Side) -> impl FnOnce(io::Error) -> Fault {
        move |source| Fault::Socket { side, source }
    }
}

/// One paired connection as an engine runs it.
pub trait Session: Send + Sync {
    /// Moves `dir` until its source reaches EOF and the FIN was passed on to the
    /// destination. Dropped (cancelled) when the connection ends for another reason.
    fn run(&self, dir: Dir) -> impl Future<Output = Result<(), Fault>> + Send;
    /// Bytes delivered so far: (client to backend, backend to client).
    fn bytes(&self) -> (u64, u64);
    /// CLOCK_MONOTONIC nanoseconds of the last byte moved in either direction.
    fn last_activity_ns(&self) -> u64;
    /// Makes the close of `side` a reset (SO_LINGER 0), to pass a reset on.
    fn reset_on_close(&self, side: Side);
    /// The socket of `side`, so that the lifecycle can watch it for errors once the
    /// direction reading from it has finished.
    fn socket(&self, side: Side) -> &tokio::net::TcpStream;
}

/// What the lifecycle hands every session.
#[derive(Clone, Debug)]
pub struct RelayCtl {
    /// Idle timeout, `None` for none.
    pub idle_timeout: Option<Duration>,
    /// Cancelled when live connections must close (shutdown after the drain timeout).
    pub force_close: CancellationToken,
    /// Idle time after which an engine that can park a connection ([`crate::park`]) hands
    /// it back instead of waiting in its task; `None`: never.
    pub park_after: Option<Duration>,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads, so kernel and
/// userspace activity times compare directly.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `d` in nanoseconds, saturating at u64::MAX (some 584 years).
pub fn duration_ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// Runs a session to its end and says why it ended. The session still owns the sockets;
/// dropping it closes them (with a reset where [`Session::reset_on_close`] asked for one).
pub async fn drive<S: Session>(s: &S, ctl: &RelayCtl) -> (End, Option<Fault>) {
    let up = s.run(Dir::Up);
    let down = s.run(Dir::Down);
    let idle = idle_watch(s, ctl.idle_timeout);
    tokio::pin!(up, down, idle);
    let (mut up_done, mut down_done) = (false, false);
    let mut first_fin = None;
    loop {
        // Once a direction has finished, nothing reads its source any more: a reset that
        // arrives there after the FIN (or while the other direction is idle) would go unseen
        // until the idle timeout, so the lifecycle watches that socket for errors itself.
        let finished = tokio::select! {
            r = &mut up, if !up_done => { up_done = true; r.map(|()| End::ClientFin) }
            r = &mut down, if !down_done => { down_done = true; r.map(|()| End::BackendFin) }
            e = socket_error(s.socket(Side::Client)), if up_done => Err(Fault::on(Side::Client)(e)),
            e = socket_error(s.socket(Side::Backend)), if down_done => Err(Fault::on(Side::Backend)(e)),
            () = &mut idle => return (End::IdleTimeout, None),
            () = ctl.force_close.cancelled() => return (End::Shutdown, None),
        };
        match finished {
            Ok(fin) => {
                first_fin.get_or_insert(fin);
                if up_done && down_done {
                    return (first_fin.unwrap_or(fin), None);
                }
            }
            Err(fault) => {
                let end = match &fault {
                    Fault::Socket { side: Side::Client, .. } => End::ClientReset,
                    Fault::Socket { side: Side::Backend, .. } => End::BackendReset,
                    Fault::Internal(_) => End::Internal,
                };
                match &fault {
                    Fault::Socket { side, .. } => s.reset_on_close(side.other()),
                    Fault::Internal(_) => {
                        s.reset_on_close(Side::Client);
                        s.reset_on_close(Side::Backend);
                    }
                }
                return (end, Some(fault));
            }
        }
    }
}

/// Resolves when `sock` reports an error (EPOLLERR: a reset, a timeout), with that error.
pub(crate) async fn socket_error(sock: &tokio::net::TcpStream) -> io::Error {
    loop {
        match sock.ready(tokio::io::Interest::ERROR).await {
            Ok(r) if r.is_error() => {
                return sock
                    .take_error()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into());
            }
            Ok(_) => tokio::task::yield_now().await,
            Err(e) => return e,
        }
    }
}

async fn idle_watch<S: Session>(s: &S, timeout: Option<Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let timeout_ns = duration_ns(timeout);
    loop {
        let deadline = s.last_activity_ns().saturating_add(timeout_ns);
        let now = monotonic_ns();
        if now >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_nanos(deadline - now)).await;
    }
}

/// Which sockets of a pair must close with a reset ([`Session::reset_on_close`]); the
/// engines' sessions keep one and apply it right before their sockets close.
#[derive(Debug, Default)]
pub struct ResetOnClose([std::sync::atomic::AtomicBool; 2]);

impl ResetOnClose {
    /// Marks `side` to close with a reset.
    pub fn set(&self, side: Side) {
        self.0[side as usize].store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets SO_LINGER 0 on every marked socket; `fd` gives the socket of a side, `id` names
    /// the connection in the log.
    pub fn apply<'a>(&self, id: u64, fd: impl Fn(Side) -> std::os::fd::BorrowedFd<'a>) {
        for side in [Side::Client, Side::Backend] {
            if self.0[side as usize].load(std::sync::atomic::Ordering::Relaxed)
                && let Err(e) = set_linger_zero(fd(side))
            {
                log::debug!("conn={id} SO_LINGER on {side:?} socket failed: {e}");
            }
        }
    }
}

/// Sets SO_LINGER {on, 0} so that closing `fd` sends a reset instead of a FIN.
pub fn set_linger_zero(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid fd and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// `shutdown(SHUT_WR)`: passes a FIN on. A peer that is already gone is not an error here
/// (ENOTCONN): the direction is over either way, and the other direction reports the reset.
pub fn shutdown_write(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a valid fd.
    let rc = unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOTCONN) { Ok(()) } else { Err(e) }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    };

    use tokio::sync::Notify;

    use super::*;

    /// A scripted session: each direction finishes when told, with the given result.
    struct Script {
        /// A connected loopback pair standing for the client and backend sockets, and the
        /// far ends of each (kept open so no error shows).
        socks: [tokio::net::TcpStream; 2],
        far: Mutex<Vec<tokio::net::TcpStream>>,
        up: Notify,
        down: Notify,
        up_result: Mutex<Option<Result<(), Fault>>>,
        down_result: Mutex<Option<Result<(), Fault>>>,
        last: AtomicU64,
        reset: Mutex<Vec<Side>>,
    }

    impl Session for Script {
        async fn run(&self, dir: Dir) -> Result<(), Fault> {
            let (n, r) = match dir {
                Dir::Up => (&self.up, &self.up_result),
                Dir::Down => (&self.down, &self.down_result),
            };
            n.notified().await;
            r.lock().unwrap().take().unwrap_or(Ok(()))
        }
        fn bytes(&self) -> (u64, u64) {
            (0, 0)
        }
        fn last_activity_ns(&self) -> u64 {
            self.last.load(Ordering::Relaxed)
        }
        fn reset_on_close(&self, side: Side) {
            self.reset.lock().unwrap().push(side);
        }
        fn socket(&self, side: Side) -> &tokio::net::TcpStream {
            &self.socks[side as usize]
        }
    }

    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    impl Script {
        async fn new() -> Script {
            let (a, fa) = pair().await;
            let (b, fb) = pair().await;
            Script {
                socks: [a, b],
                far: Mutex::new(vec![fa, fb]),
                up: Notify::new(),
                down: Notify::new(),
                up_result: Mutex::new(None),
                down_result: Mutex::new(None),
                last: AtomicU64::new(0),
                reset: Mutex::new(Vec::new()),
            }
        }
    }

    fn ctl(idle: Option<Duration>) -> RelayCtl {
        RelayCtl { idle_timeout: idle, force_close: CancellationToken::new(), park_after: None }
    }

    #[tokio::test]
    async fn half_close_waits_for_the_other_direction_and_names_the_first_fin() {
        let s = Script::new().await;
        s.last.store(monotonic_ns(), Ordering::Relaxed);
        let c = ctl(None);
        let d = drive(&s, &c);
        tokio::pin!(d);
        s.down.notify_one();
        // Backend finished first; the client direction still runs.
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut d).await.is_err());
        s.up.notify_one();
        let (end, fault) = d.await;
        assert_eq!(end, End::BackendFin);
        assert!(fault.is_none());
        assert!(s.reset.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_client_reset_resets_the_backend() {
        let s = Script::new().await;
        *s.up_result.lock().unwrap() = Some(Err(Fault::on(Side::Client)(io::ErrorKind::ConnectionReset.into())));
        s.up.notify_one();
        let (end, fault) = drive(&s, &ctl(None)).await;
        assert_eq!(end, End::ClientReset);
        assert!(fault.is_some());
        assert_eq!(*s.reset.lock().unwrap(), [Side::Backend]);
    }

    #[tokio::test]
    async fn idle_timeout_fires_only_after_inactivity() {
        let s = Script::new().await;
        s.last.store(monotonic_ns(), Ordering::Relaxed);
        let started = std::time::Instant::now();
        let (end, _) = drive(&s, &ctl(Some(Duration::from_millis(100)))).await;
        assert_eq!(end, End::IdleTimeout);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_reset_after_the_fin_is_passed_on() {
        let s = Script::new().await;
        s.last.store(monotonic_ns(), Ordering::Relaxed);
        let c = ctl(None);
        let d = drive(&s, &c);
        tokio::pin!(d);
        // The client direction ends (client FIN passed on), the backend direction stays open.
        s.up.notify_one();
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut d).await.is_err());
        // Now the client resets: its far end closes with SO_LINGER 0.
        let far = s.far.lock().unwrap().remove(0);
        set_linger_zero(std::os::fd::AsFd::as_fd(&far)).unwrap();
        drop(far);
        let (end, _) = tokio::time::timeout(Duration::from_secs(5), d).await.expect("reset went unseen");
        assert_eq!(end, End::ClientReset);
        assert_eq!(*s.reset.lock().unwrap(), [Side::Backend]);
    }

    #[tokio::test]
    async fn force_close_ends_a_live_session() {
        let s = Script::new().await;
        let c = ctl(None);
        c.force_close.cancel();
        assert_eq!(drive(&s, &c).await.0, End::Shutdown);
    }
}
