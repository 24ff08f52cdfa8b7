//! The lifecycle contract of one paired connection, written once for every engine.
//!
//! An engine moves bytes in two [`Dir`]ections. Each direction runs until its source reaches
//! EOF and the FIN was passed on to its destination; the connection then ends on the first of:
//!
//! - both directions finished: `end` is the side that half-closed first ([`Fins`]); a
//!   half-closed connection keeps its open direction flowing;
//! - a failure ([`Fault`]): on a socket, the other socket is reset; inside the engine, both
//!   are ([`Fault::resets`]); `end` says which ([`Fault::end`]);
//! - no byte moved for the idle timeout ([`End::IdleTimeout`], [`idle_deadline`]);
//! - one side half-closed longer ago than the half-close timeout ([`End::HalfCloseTimeout`],
//!   [`RelayCtl::half_close_timeout`]; HAProxy's `timeout client-fin` / `server-fin`);
//! - a forced shutdown after the drain timeout ([`End::Shutdown`], [`RelayCtl::force_close`]).
//!
//! The engine returns [`Relayed`]: the [`Outcome`] for the access log, or the parked sockets
//! with their [`Progress`]. `engine::driver::drive` runs this contract over an
//! engine's async [`crate::engine::driver::Session`] (the sockmap engine); the splice engine
//! runs the same decisions inside its hand-written state machine, which keeps an idle
//! connection's task small.

use std::{
    io,
    os::fd::OwnedFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::sys;

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

    /// The opposite direction.
    pub fn other(self) -> Dir {
        match self {
            Dir::Up => Dir::Down,
            Dir::Down => Dir::Up,
        }
    }

    /// How the connection ends if this direction finishes first: its source half-closed.
    pub fn fin(self) -> End {
        match self {
            Dir::Up => End::ClientFin,
            Dir::Down => End::BackendFin,
        }
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
    /// One side half-closed and the other did not finish within the half-close timeout.
    HalfCloseTimeout,
    /// No backend accepted the connection.
    ConnectFailed,
    /// No route for the client: on an address with SNI routes, its server name matched none
    /// and there is no default route, or it sent no ClientHello in time.
    NoRoute,
    /// Closed before routing by the PROXY-header checks (`accept_proxy_from`): a trusted
    /// source without a good header, or an untrusted one with a header.
    ProxyRefused,
    /// Closed by the failed-login guard (`[route.guard]`): the client's address, or the user
    /// it tried to log in as, is blocked.
    GuardBlocked,
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
            End::HalfCloseTimeout => "half_close_timeout",
            End::ConnectFailed => "connect_failed",
            End::NoRoute => "no_route",
            End::ProxyRefused => "proxy_refused",
            End::GuardBlocked => "guard_blocked",
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
    /// The client could not be routed (why, for the log; no payload in it).
    #[error("{0}")]
    Unrouted(String),
    /// The client's PROXY header was refused (why, for the log; never the header itself).
    /// Boxed so that `Fault` stays the size of one `String` (its niche holds the tag).
    #[error("{0}")]
    ProxyRefused(Box<String>),
    /// The failed-login guard closed the connection (why, for the log).
    #[error("{0}")]
    Blocked(Box<String>),
}

impl Fault {
    /// A socket failure on `side`.
    pub fn on(side: Side) -> impl FnOnce(io::Error) -> Fault {
        move |source| Fault::Socket { side, source }
    }

    /// How this failure ends the connection.
    pub fn end(&self) -> End {
        match self {
            Fault::Socket { side: Side::Client, .. } => End::ClientReset,
            Fault::Socket { side: Side::Backend, .. } => End::BackendReset,
            Fault::Internal(_) => End::Internal,
            Fault::Unrouted(_) => End::NoRoute,
            Fault::ProxyRefused(_) => End::ProxyRefused,
            Fault::Blocked(_) => End::GuardBlocked,
        }
    }

    /// The sockets that must close with a reset: the failed socket's peer, so that the reset
    /// is passed on, or both when the engine failed.
    pub fn resets(&self) -> &'static [Side] {
        match self {
            Fault::Socket { side: Side::Client, .. } => &[Side::Backend],
            Fault::Socket { side: Side::Backend, .. } => &[Side::Client],
            Fault::Internal(_) => &[Side::Client, Side::Backend],
            Fault::Unrouted(_) | Fault::ProxyRefused(_) | Fault::Blocked(_) => &[],
        }
    }

    /// The end and the fault, as an engine reports a failed connection.
    pub fn ending(self) -> (End, Option<Fault>) {
        (self.end(), Some(self))
    }
}

/// Which directions finished, and which of them first: a connection whose directions both
/// finished ends as the side that half-closed first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fins {
    done: [bool; 2],
    first: Option<Dir>,
}

impl Fins {
    /// Records that `dir` finished; the connection's end once both have.
    pub fn finish(&mut self, dir: Dir) -> Option<End> {
        self.done[dir as usize] = true;
        let first = *self.first.get_or_insert(dir);
        (self.done == [true; 2]).then(|| first.fin())
    }

    /// Whether `dir` finished.
    pub fn is_done(&self, dir: Dir) -> bool {
        self.done[dir as usize]
    }

    /// Whether neither direction finished (nothing half-closed).
    pub fn none(&self) -> bool {
        self.done == [false; 2]
    }

    /// Whether exactly one direction finished: the connection is half-closed.
    pub fn half(&self) -> bool {
        self.done[0] != self.done[1]
    }
}

/// What the lifecycle hands every engine for a connection.
#[derive(Clone, Debug)]
pub struct RelayCtl {
    /// Idle timeout, `None` for none.
    pub idle_timeout: Option<Duration>,
    /// Cancelled when live connections must close (shutdown after the drain timeout).
    pub force_close: CancellationToken,
    /// Idle time after which an engine that can park a connection ([`crate::park`]) hands
    /// it back instead of waiting in its task; `None`: never.
    pub park_after: Option<Duration>,
    /// Longest a connection may stay half-closed (one direction finished, the other not);
    /// `None`: no limit.
    pub half_close_timeout: Option<Duration>,
    /// The live upgrade's request to park at the next moment nothing is in flight.
    pub hand_over: HandOver,
}

/// The live upgrade's request to the engine that can park ([`crate::park`]): while it is on,
/// a connection parks at the first moment it has nothing in flight (both directions open),
/// whatever `park_after` says, and the parker hands it to the new process
/// ([`crate::upgrade`]). Shared by every route of a server.
#[derive(Clone, Debug)]
pub struct HandOver(Arc<HandOverState>);

#[derive(Debug)]
struct HandOverState {
    /// Cancelled when the hand-over starts, or with the forced close (a child of it): what
    /// a connection waits on for both.
    wake: CancellationToken,
    /// Whether the hand-over is on (it ends at its timeout; the wake token stays cancelled).
    on: AtomicBool,
}

impl HandOver {
    /// Off; woken also by `force_close`.
    pub fn new(force_close: &CancellationToken) -> HandOver {
        HandOver(Arc::new(HandOverState { wake: force_close.child_token(), on: AtomicBool::new(false) }))
    }

    /// Cancelled at the start of the hand-over or by the forced close: once it is, a
    /// connection looks at [`HandOver::is_on`] and its `force_close`.
    pub fn wake(&self) -> &CancellationToken {
        &self.0.wake
    }

    /// Whether connections should park for the hand-over now.
    pub fn is_on(&self) -> bool {
        self.0.on.load(Ordering::Acquire)
    }

    /// Starts the hand-over: wakes every connection waiting on [`HandOver::wake`].
    pub fn start(&self) {
        self.0.on.store(true, Ordering::Release);
        self.0.wake.cancel();
    }

    /// Ends it: connections relay on as before.
    pub fn stop(&self) {
        self.0.on.store(false, Ordering::Release);
    }
}

impl RelayCtl {
    /// Timeouts off, nothing to park, never forced closed: for tests.
    pub fn unlimited() -> RelayCtl {
        let force_close = CancellationToken::new();
        let hand_over = HandOver::new(&force_close);
        RelayCtl { idle_timeout: None, force_close, park_after: None, half_close_timeout: None, hand_over }
    }
}

/// CLOCK_MONOTONIC ns at which a connection whose last byte moved at `last_ns` times out;
/// `u64::MAX` without an idle timeout.
pub fn idle_deadline(last_ns: u64, timeout: Option<Duration>) -> u64 {
    timeout.map_or(u64::MAX, |t| last_ns.saturating_add(sys::clock::duration_ns(t)))
}

/// The engine that carried a connection (the access log's `engine=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// Userspace splice(2) (or its copy fallback for one socket).
    Splice,
    /// The in-kernel sockmap redirect, in one direction at least.
    Sockmap,
    /// The sockmap engine copied both directions in userspace: each socket had its FIN
    /// before it could enter the maps, so the kernel carried nothing.
    Copy,
}

impl EngineKind {
    /// The access-log spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Splice => "splice",
            EngineKind::Sockmap => "sockmap",
            EngineKind::Copy => "copy",
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one connection's data phase.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes delivered client to backend.
    pub bytes_up: u64,
    /// Bytes delivered backend to client.
    pub bytes_down: u64,
    /// Why it ended.
    pub end: End,
    /// The failure behind a reset or internal end, for the log.
    pub fault: Option<Fault>,
    /// Engine that carried the connection (sockmap may hand one to splice, e.g. a client
    /// that half-closed before it could be inserted).
    pub engine: EngineKind,
}

/// What a connection's data phase had done when it was parked, to go on from there.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Bytes delivered, indexed by [`Dir`]: (client to backend, backend to client).
    pub bytes: [u64; 2],
    /// CLOCK_MONOTONIC ns of the last byte moved (the idle timeout counts from it).
    pub last_ns: u64,
}

impl Progress {
    /// A connection that has moved nothing yet.
    pub fn new() -> Progress {
        Progress { bytes: [0; 2], last_ns: sys::clock::monotonic_ns() }
    }

    /// The outcome of a connection that ended with these counters.
    pub fn ended(self, end: End, fault: Option<Fault>, engine: EngineKind) -> Outcome {
        Outcome { bytes_up: self.bytes[0], bytes_down: self.bytes[1], end, fault, engine }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// How an engine's data phase returned.
#[derive(Debug)]
pub enum Relayed {
    /// The connection ended; both sockets are closed.
    Ended(Outcome),
    /// Nothing moved for `--park-after` and nothing is in flight: the sockets, taken out of
    /// the runtime (still open), and the progress so far, for [`crate::park`].
    Parked {
        /// Client, backend.
        socks: [OwnedFd; 2],
        /// Counters to go on with (bytes in all, so that a connection closed while parked
        /// logs them).
        progress: Progress,
        /// What the engine keeps to go on with besides the sockets (sockmap engine: the map
        /// entries, which stay while parked); handed back to [`crate::engine::Engine::relay`].
        kept: Option<crate::engine::Kept>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first direction to finish names the end, whichever finishes second.
    #[test]
    fn the_first_fin_names_the_end() {
        for (first, want) in [(Dir::Up, End::ClientFin), (Dir::Down, End::BackendFin)] {
            let mut f = Fins::default();
            assert!(f.none());
            assert_eq!(f.finish(first), None, "one direction is still open");
            assert!(f.is_done(first) && !f.is_done(first.other()) && !f.none());
            assert_eq!(f.finish(first.other()), Some(want));
        }
    }

    /// A socket failure resets the other socket and names its own side; an engine failure
    /// resets both.
    #[test]
    fn a_fault_names_the_end_and_the_sockets_to_reset() {
        let err = || io::Error::from(io::ErrorKind::ConnectionReset);
        let cases = [
            (Fault::on(Side::Client)(err()), End::ClientReset, &[Side::Backend][..]),
            (Fault::on(Side::Backend)(err()), End::BackendReset, &[Side::Client][..]),
            (Fault::Internal(err()), End::Internal, &[Side::Client, Side::Backend][..]),
        ];
        for (fault, end, resets) in cases {
            assert_eq!((fault.end(), fault.resets()), (end, resets), "{fault}");
            let (e, f) = fault.ending();
            assert_eq!((e, f.is_some()), (end, true));
        }
    }

    #[test]
    fn idle_deadline_saturates_and_is_off_without_a_timeout() {
        assert_eq!(idle_deadline(5, None), u64::MAX);
        assert_eq!(idle_deadline(5, Some(Duration::from_nanos(10))), 15);
        assert_eq!(idle_deadline(u64::MAX - 1, Some(Duration::from_secs(1))), u64::MAX);
    }
}
