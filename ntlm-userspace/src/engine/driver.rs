//! The async driver of the lifecycle contract ([`crate::lifecycle`]): an engine provides a
//! [`Session`], two directions that each move bytes until their source reaches EOF and then
//! pass the FIN on, plus byte counters and the time of the last byte moved; [`drive`] runs both
//! directions together (never `select!` over the two: one side's EOF must not cancel the other)
//! and ends the connection as the contract says. The sockmap engine runs through it; the
//! splice engine applies the same contract in its own state machine (see its module).

use std::{future::Future, io, time::Duration};

use crate::{
    lifecycle::{Dir, End, Fault, Fins, RelayCtl, Side, idle_deadline},
    sys::{clock::monotonic_ns, sock::set_linger_zero},
};

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
    /// Whether the session may park now (called once nothing moved for `park_after`):
    /// nothing in flight or held that needs its task.
    fn parkable(&self) -> bool {
        false
    }
}

/// Runs a session to its end and says why it ended, or `None` when it is to park: nothing
/// moved for `ctl.park_after`, no direction finished, and the session is
/// [`parkable`](Session::parkable). The session still owns the sockets; dropping it closes
/// them (with a reset where [`Session::reset_on_close`] asked for one).
pub async fn drive<S: Session>(s: &S, ctl: &RelayCtl) -> Option<(End, Option<Fault>)> {
    let up = s.run(Dir::Up);
    let down = s.run(Dir::Down);
    let idle = idle_watch(s, ctl.idle_timeout);
    let park = park_watch(s, ctl.park_after);
    tokio::pin!(up, down, idle, park);
    let mut fins = Fins::default();
    // Set when the first direction finishes, if there is a half-close timeout.
    let mut half_close: Option<tokio::time::Instant> = None;
    loop {
        // Once a direction has finished, nothing reads its source any more: a reset that
        // arrives there after the FIN (or while the other direction is idle) would go unseen
        // until the idle timeout, so the lifecycle watches that socket for errors itself.
        let finished = tokio::select! {
            r = &mut up, if !fins.is_done(Dir::Up) => r.map(|()| Dir::Up),
            r = &mut down, if !fins.is_done(Dir::Down) => r.map(|()| Dir::Down),
            e = socket_error(s.socket(Side::Client)), if fins.is_done(Dir::Up) => Err(Fault::on(Side::Client)(e)),
            e = socket_error(s.socket(Side::Backend)), if fins.is_done(Dir::Down) => Err(Fault::on(Side::Backend)(e)),
            () = &mut idle => return Some((End::IdleTimeout, None)),
            () = sleep_until(half_close), if half_close.is_some() => return Some((End::HalfCloseTimeout, None)),
            () = ctl.force_close.cancelled() => return Some((End::Shutdown, None)),
            () = &mut park, if fins.none() => return None,
        };
        match finished {
            Ok(dir) => {
                if let Some(end) = fins.finish(dir) {
                    return Some((end, None));
                }
                half_close = ctl.half_close_timeout.map(|t| tokio::time::Instant::now() + t);
            }
            Err(fault) => {
                for &side in fault.resets() {
                    s.reset_on_close(side);
                }
                return Some(fault.ending());
            }
        }
    }
}

/// Sleeps until `at` (never, for `None`).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves when `sock` reports an error (EPOLLERR: a reset, a timeout), with that error.
pub(crate) async fn socket_error(sock: &tokio::net::TcpStream) -> io::Error {
    loop {
        match sock.ready(tokio::io::Interest::ERROR).await {
            Ok(r) if r.is_error() => {
                return sock.take_error().ok().flatten().unwrap_or_else(|| io::ErrorKind::ConnectionReset.into());
            }
            Ok(_) => tokio::task::yield_now().await,
            Err(e) => return e,
        }
    }
}

async fn idle_watch<S: Session>(s: &S, timeout: Option<Duration>) {
    if timeout.is_none() {
        return std::future::pending().await;
    }
    loop {
        let deadline = idle_deadline(s.last_activity_ns(), timeout);
        let now = monotonic_ns();
        if now >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_nanos(deadline - now)).await;
    }
}

/// Longest wait before a session idle for `park_after` that was not parkable is asked again
/// (its directions notice they are idle on their own rechecks).
const PARK_RETRY: Duration = Duration::from_millis(250);

/// Resolves once nothing moved for `after` and the session is parkable (never for `None`).
async fn park_watch<S: Session>(s: &S, after: Option<Duration>) {
    let Some(after) = after else { return std::future::pending().await };
    loop {
        let at = s.last_activity_ns().saturating_add(crate::sys::clock::duration_ns(after));
        let now = monotonic_ns();
        if now < at {
            tokio::time::sleep(Duration::from_nanos(at - now)).await;
        } else if s.parkable() {
            return;
        } else {
            tokio::time::sleep(after.min(PARK_RETRY)).await;
        }
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

    /// [`drive`] of a session that never parks.
    async fn ended(s: &Script, ctl: &RelayCtl) -> (End, Option<Fault>) {
        drive(s, ctl).await.expect("a session that is never parkable parked")
    }

    fn ctl(idle: Option<Duration>) -> RelayCtl {
        RelayCtl { idle_timeout: idle, ..RelayCtl::unlimited() }
    }

    #[tokio::test]
    async fn half_close_waits_for_the_other_direction_and_names_the_first_fin() {
        let s = Script::new().await;
        s.last.store(monotonic_ns(), Ordering::Relaxed);
        let c = ctl(None);
        let d = ended(&s, &c);
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
        let (end, fault) = ended(&s, &ctl(None)).await;
        assert_eq!(end, End::ClientReset);
        assert!(fault.is_some());
        assert_eq!(*s.reset.lock().unwrap(), [Side::Backend]);
    }

    #[tokio::test]
    async fn idle_timeout_fires_only_after_inactivity() {
        let s = Script::new().await;
        s.last.store(monotonic_ns(), Ordering::Relaxed);
        let started = std::time::Instant::now();
        let (end, _) = ended(&s, &ctl(Some(Duration::from_millis(100)))).await;
        assert_eq!(end, End::IdleTimeout);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_reset_after_the_fin_is_passed_on() {
        let s = Script::new().await;
        s.last.store(monotonic_ns(), Ordering::Relaxed);
        let c = ctl(None);
        let d = ended(&s, &c);
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

    /// After one direction finished, the connection may stay half-closed at most the
    /// half-close timeout; before that, that timeout does not run.
    #[tokio::test]
    async fn a_half_closed_session_ends_at_the_half_close_timeout() {
        let s = Script::new().await;
        s.last.store(monotonic_ns(), Ordering::Relaxed);
        let c = RelayCtl { half_close_timeout: Some(Duration::from_millis(100)), ..RelayCtl::unlimited() };
        let d = ended(&s, &c);
        tokio::pin!(d);
        assert!(tokio::time::timeout(Duration::from_millis(300), &mut d).await.is_err(), "ended while both were open");
        let fin = std::time::Instant::now();
        s.up.notify_one();
        let (end, fault) = tokio::time::timeout(Duration::from_secs(5), d).await.expect("half-close timeout unseen");
        assert_eq!((end, fault.is_none()), (End::HalfCloseTimeout, true));
        assert!(fin.elapsed() >= Duration::from_millis(100), "ended before the timeout: {:?}", fin.elapsed());
    }

    #[tokio::test]
    async fn force_close_ends_a_live_session() {
        let s = Script::new().await;
        let c = ctl(None);
        c.force_close.cancel();
        assert_eq!(ended(&s, &c).await.0, End::Shutdown);
    }
}
