//! The observer: relays a connection's first bytes in userspace, both ways, reading its HTTP
//! exchanges ([`super::http`]) until the NTLM login on it is decided, then stops so that the
//! route's engine carries the rest from the byte counts reached ([`Observed::progress`]).
//!
//! Byte safety: each read is scanned and then written out in full before its direction reads
//! again, and [`observe`] returns (for a hand-over) only once every byte it read is written,
//! so the engine takes over a pair with nothing in flight in userspace: no byte is lost,
//! reordered or sent twice. It may stop anywhere in a message (mid-body, mid-head): the
//! engine goes on with the byte stream.
//!
//! When it stops ([`Stop`]), in order of the exchanges:
//! - the response to the request carrying the AUTHENTICATE message: [`Login`] with its
//!   [`LoginResult`];
//!   A denied login does not stop it when the [`Judge`] watches denied connections (a
//!   route with a guard): a client may try again on the same connection, and each try is
//!   judged; such a connection is never handed over unwatched ([`Stop::DeniedUnwatched`]);
//! - a response that shows the client is not logging in with NTLM: its request carried no
//!   NTLM message and it is not the first `401` offering NTLM or Negotiate (browsers and
//!   requests-ntlm send an anonymous request first and start NTLM on the same connection
//!   when that 401 offers it; [`ANONYMOUS_CHALLENGES`]), or its request carried a NEGOTIATE
//!   and it is not a 401 (no challenge follows);
//! - the limits: [`ObserveLimits`] bytes each way or time;
//! - a scanner that cannot follow the protocol;
//! - a side's EOF (its FIN passed on first), a socket's failure, the route's idle timeout, a
//!   forced shutdown, or the [`Judge`] refusing an AUTHENTICATE (the guard).
//!
//! Nothing here logs; the token is decoded only to read the names, and only the names are
//! kept ([`super::message`]).

use std::{
    collections::VecDeque,
    future::poll_fn,
    io,
    os::fd::AsFd,
    pin::pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{net::TcpStream, time::Instant};

use super::{
    http::{GiveUp, Request, RequestScanner, Response, ResponseScanner},
    message::{self, Message, Names},
};
use crate::{
    lifecycle::{Dir, Fault, Progress, RelayCtl},
    sys::{self, sock::shutdown_write},
};

/// Bytes read from each side after which observation stops ([`ObserveLimits::max_bytes`]):
/// an NTLM handshake is a few KiB each way (the tokens are under 2 KiB, the 401 bodies small);
/// a connection still unresolved after this is carried by the engine, unobserved.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024;
/// Longest observation ([`ObserveLimits::max_time`]): a browser answers a challenge at once;
/// a client that waits longer (a password prompt) is handed over unobserved.
pub const DEFAULT_MAX_TIME: Duration = Duration::from_secs(10);
/// How many 401s offering NTLM or Negotiate to requests without an NTLM message are watched
/// past: the anonymous first request of browsers and requests-ntlm.
pub const ANONYMOUS_CHALLENGES: u32 = 1;
/// Size of each direction's buffer: one read, scanned then written in full.
const BUF: usize = 16 * 1024;
/// Reads per direction in one poll before the task yields, so a fast direction does not
/// starve the other or the timers.
const READS_PER_POLL: usize = 8;
/// A time that does not come: what an unlimited duration means for a timer.
const FAR: Duration = Duration::from_secs(30 * 365 * 86_400);

/// How much of a connection the observer reads before it hands over unresolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObserveLimits {
    /// Bytes read from one side after which observation stops (the read that crosses it is
    /// relayed in full).
    pub max_bytes: u64,
    /// Time after which observation stops (what is in flight is written out first).
    pub max_time: Duration,
}

impl Default for ObserveLimits {
    fn default() -> Self {
        ObserveLimits { max_bytes: DEFAULT_MAX_BYTES, max_time: DEFAULT_MAX_TIME }
    }
}

/// How an NTLM login went, from the status of the response to its AUTHENTICATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginResult {
    /// The server did not refuse the credentials: 101, or a status from 200 to 499 but 401
    /// (a 403 or 404 answers an authenticated request).
    Ok,
    /// 401: the credentials were refused (a bad password, an unknown or locked-out user).
    Denied,
    /// Any other status (5xx): the server failed; the login is undecided.
    Error,
    /// The [`Judge`] refused it: the request never reached the backend.
    Blocked,
    /// Observation stopped before the response came (limits, EOF, failure).
    Unanswered,
}

impl LoginResult {
    /// Every result, in declaration order (the metrics' slots).
    pub const ALL: [LoginResult; 5] =
        [LoginResult::Ok, LoginResult::Denied, LoginResult::Error, LoginResult::Blocked, LoginResult::Unanswered];

    /// The result a response with `status` gives.
    pub fn of(status: u16) -> LoginResult {
        match status {
            401 => LoginResult::Denied,
            101 | 200..=499 => LoginResult::Ok,
            _ => LoginResult::Error,
        }
    }

    /// The access-log spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LoginResult::Ok => "ok",
            LoginResult::Denied => "denied",
            LoginResult::Error => "error",
            LoginResult::Blocked => "blocked",
            LoginResult::Unanswered => "unanswered",
        }
    }
}

/// An NTLM login seen on the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    /// Who the AUTHENTICATE message named (escaped for the log).
    pub names: Names,
    /// How it went.
    pub result: LoginResult,
}

/// Why observation stopped.
#[derive(Debug)]
pub enum Stop {
    /// The response to the AUTHENTICATE came: [`Observed::login`] has the result.
    Login,
    /// The client is not logging in with NTLM (see the module doc).
    NotAuthenticating,
    /// The [`Judge`] refused the AUTHENTICATE message: the read holding the end of that
    /// request was not forwarded (earlier bytes were). Close both sockets.
    Blocked,
    /// The scanner of a direction cannot follow the protocol.
    CannotFollow {
        /// The direction.
        dir: Dir,
        /// Why.
        why: GiveUp,
    },
    /// [`ObserveLimits::max_bytes`] were read from the source of this direction.
    ByteCap(Dir),
    /// [`ObserveLimits::max_time`] passed.
    TimeLimit,
    /// The source of this direction reached EOF and the FIN was passed on
    /// (`shutdown(SHUT_WR)` of its destination); the other direction is open. The source
    /// reads EOF again, so an engine given the pair finds the same FIN (and passes it on
    /// again, which is harmless); this one is the first for the access log's `end=`.
    Fin(Dir),
    /// A socket failed; bytes read may not have been written. Reset the other socket
    /// ([`Fault::resets`]).
    Failed(Fault),
    /// Nothing moved for the route's idle timeout ([`RelayCtl::idle_timeout`]).
    IdleTimeout,
    /// The last login was denied, the [`Judge`] watches denied connections, and observation
    /// had to stop (a limit, a scanner that cannot follow, the client going on without
    /// NTLM): close, so that the client's next try comes on a new connection, watched,
    /// instead of on this one unwatched.
    DeniedUnwatched,
    /// The forced shutdown came ([`RelayCtl::force_close`]).
    Shutdown,
}

impl Stop {
    /// Whether the connection goes on with the engine: every byte read was written. Else
    /// (blocked, failed, idle, shutdown) it ends here.
    pub fn hands_over(&self) -> bool {
        !matches!(self, Stop::Blocked | Stop::Failed(_) | Stop::IdleTimeout | Stop::Shutdown | Stop::DeniedUnwatched)
    }

    /// A short name for debug logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Stop::Login => "login",
            Stop::NotAuthenticating => "not_authenticating",
            Stop::Blocked => "blocked",
            Stop::CannotFollow { .. } => "cannot_follow",
            Stop::ByteCap(_) => "byte_cap",
            Stop::TimeLimit => "time_limit",
            Stop::Fin(_) => "fin",
            Stop::Failed(_) => "failed",
            Stop::IdleTimeout => "idle_timeout",
            Stop::DeniedUnwatched => "denied_unwatched",
            Stop::Shutdown => "shutdown",
        }
    }
}

/// What observation did and learnt.
#[derive(Debug)]
pub struct Observed {
    /// Bytes written each way, and when the last one was: the engine starts from here.
    pub progress: Progress,
    /// Why it stopped.
    pub stop: Stop,
    /// The NTLM login seen, if an AUTHENTICATE message was (the last one: a connection
    /// watched past a denied login may carry several).
    pub login: Option<Login>,
    /// [`Stop::Blocked`] only: every earlier request was answered and its response written
    /// to the client in full, so the client waits for the blocked request's response alone
    /// and the proxy may answer it itself.
    pub answerable: bool,
}

/// Judges the logins the observer sees (the failed-login guard).
pub trait Judge {
    /// Asked about each AUTHENTICATE message before any byte of the read that completes its
    /// request is forwarded; `false` stops with [`Stop::Blocked`].
    fn admit(&mut self, names: &Names) -> bool;
    /// A login's response came (ok, denied or error).
    fn decided(&mut self, _login: &Login) {}
    /// Whether to watch on after a denied login (see [`Stop::DeniedUnwatched`]).
    fn watches_denied(&self) -> bool {
        false
    }
}

/// A plain `admit` function judges: it admits, and lets a denied login stop observation.
impl<F: FnMut(&Names) -> bool> Judge for F {
    fn admit(&mut self, names: &Names) -> bool {
        self(names)
    }
}

/// Relays `client` and `backend` both ways in userspace while reading their first HTTP
/// exchanges, until the NTLM login on the connection is decided or a limit is reached.
///
/// `judge` is asked about each AUTHENTICATE message before any byte of the read that
/// completes its request is forwarded, and told of each login decided ([`Judge`]).
/// `ctl` gives the idle timeout and the forced shutdown, as an engine honours them.
///
/// Dropping the future before it returns may drop bytes read and not yet written: do so only
/// to close the connection. The future holds the scanners' and timers' state (some 800
/// bytes; the buffers are on the heap): box it, so that a connection task does not keep that
/// size for its whole life.
pub async fn observe(
    client: &TcpStream,
    backend: &TcpStream,
    ctl: &RelayCtl,
    limits: &ObserveLimits,
    judge: impl Judge,
) -> Observed {
    let started = Instant::now();
    let mut relay = Relay {
        socks: [client, backend],
        lanes: [Lane::new(), Lane::new()],
        watch: Watch::new(judge),
        progress: Progress::new(),
        last_move: started,
        stop: None,
        max_bytes: limits.max_bytes,
    };
    let mut time_limit = pin!(tokio::time::sleep_until(after(started, limits.max_time)));
    // Only polled with an idle timeout.
    let mut idle = pin!(tokio::time::sleep_until(after(started, ctl.idle_timeout.unwrap_or_default())));
    let mut shutdown = pin!(ctl.force_close.cancelled());
    let stop = poll_fn(|cx| {
        if shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Stop::Shutdown);
        }
        if let Some(ending) = relay.poll_lanes(cx) {
            return Poll::Ready(ending);
        }
        if relay.stop.is_none() && time_limit.as_mut().poll(cx).is_ready() {
            relay.stop = Some(Stop::TimeLimit);
            // Reading ends; what is in flight is written (the lanes' writers are registered).
        }
        if relay.stop.is_some() && relay.lanes.iter().all(Lane::flushed) {
            return Poll::Ready(relay.stop.take().expect("checked"));
        }
        if let Some(timeout) = ctl.idle_timeout {
            let due = after(relay.last_move, timeout);
            if idle.deadline() != due {
                idle.as_mut().reset(due);
            }
            if idle.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Stop::IdleTimeout);
            }
        }
        Poll::Pending
    })
    .await;
    // An AUTHENTICATE whose response did not come is the last login, else the last decided.
    let unanswered = relay.watch.pending.iter().find_map(|p| match p {
        Pending::Authenticate(names) => Some(Login { names: names.clone(), result: LoginResult::Unanswered }),
        _ => None,
    });
    let login = unanswered.or_else(|| relay.watch.login.take());
    let denied = login.as_ref().is_some_and(|l| l.result == LoginResult::Denied);
    let answerable = matches!(stop, Stop::Blocked)
        && relay.watch.pending.is_empty()
        && relay.watch.responses.idle()
        && relay.lanes[Dir::Down as usize].flushed();
    let stop = match stop {
        Stop::NotAuthenticating | Stop::CannotFollow { .. } | Stop::ByteCap(_) | Stop::TimeLimit
            if denied && relay.watch.judge.watches_denied() =>
        {
            Stop::DeniedUnwatched
        }
        stop => stop,
    };
    Observed { progress: relay.progress, stop, login, answerable }
}

/// `start + d`, or some 30 years on when that is past what `Instant` holds.
fn after(start: Instant, d: Duration) -> Instant {
    start.checked_add(d).unwrap_or_else(|| start + FAR)
}

/// One direction's buffer: bytes `start..end` were read and not yet written.
struct Lane {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Bytes read from the source.
    read: u64,
}

impl Lane {
    fn new() -> Lane {
        Lane { buf: vec![0; BUF].into_boxed_slice(), start: 0, end: 0, read: 0 }
    }

    /// Whether every byte read was written.
    fn flushed(&self) -> bool {
        self.start == self.end
    }
}

/// The relay's state across polls.
struct Relay<'a, J> {
    /// Client, backend (indexed by [`crate::lifecycle::Side`] order, as [`Dir::src`] gives).
    socks: [&'a TcpStream; 2],
    /// Up, down.
    lanes: [Lane; 2],
    watch: Watch<J>,
    progress: Progress,
    /// When a byte was last written (the idle timer).
    last_move: Instant,
    /// Set once observation is to stop: no more reads, then return once flushed.
    stop: Option<Stop>,
    max_bytes: u64,
}

impl<J: Judge> Relay<'_, J> {
    /// Moves what can move in both directions; `Some` when the connection ends here.
    fn poll_lanes(&mut self, cx: &mut Context<'_>) -> Option<Stop> {
        for dir in [Dir::Up, Dir::Down] {
            if let Err(ending) = self.poll_lane(dir, cx) {
                return Some(ending);
            }
        }
        None
    }

    /// Moves `dir`'s bytes until it must wait: writes what is pending, then (unless stopping)
    /// reads, scans, and writes again.
    fn poll_lane(&mut self, dir: Dir, cx: &mut Context<'_>) -> Result<(), Stop> {
        let src = self.socks[dir.src() as usize];
        let dst = self.socks[dir.dst() as usize];
        let mut reads = 0;
        loop {
            let lane = &mut self.lanes[dir as usize];
            if !lane.flushed() {
                match dst.poll_write_ready(cx) {
                    Poll::Pending => return Ok(()),
                    Poll::Ready(Err(e)) => return Err(failed(dir.dst(), e)),
                    Poll::Ready(Ok(())) => {}
                }
                match dst.try_write(&lane.buf[lane.start..lane.end]) {
                    Ok(0) => return Err(failed(dir.dst(), io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        lane.start += n;
                        self.progress.bytes[dir as usize] += n as u64;
                        self.progress.last_ns = sys::clock::monotonic_ns();
                        self.last_move = Instant::now();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(failed(dir.dst(), e)),
                }
                continue;
            }
            if self.stop.is_some() {
                return Ok(());
            }
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Ok(());
            }
            match src.poll_read_ready(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Err(e)) => return Err(failed(dir.src(), e)),
                Poll::Ready(Ok(())) => {}
            }
            lane.start = 0;
            lane.end = 0;
            match src.try_read(&mut lane.buf) {
                Ok(0) => {
                    // Everything read before the EOF is written (the lane was flushed).
                    shutdown_write(dst.as_fd()).map_err(|e| failed(dir.dst(), e))?;
                    self.stop = Some(Stop::Fin(dir));
                    return Ok(());
                }
                Ok(n) => {
                    reads += 1;
                    lane.read += n as u64;
                    let bytes = &lane.buf[..n];
                    let seen = match dir {
                        Dir::Up => self.watch.up(bytes),
                        Dir::Down => self.watch.down(bytes),
                    };
                    match seen {
                        Some(Stop::Blocked) => return Err(Stop::Blocked),
                        Some(stop) => self.stop = Some(stop),
                        None if lane.read >= self.max_bytes => self.stop = Some(Stop::ByteCap(dir)),
                        None => {}
                    }
                    lane.end = n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(failed(dir.src(), e)),
            }
        }
    }
}

/// A socket failure as a stop.
fn failed(side: crate::lifecycle::Side, e: io::Error) -> Stop {
    Stop::Failed(Fault::on(side)(e))
}

/// What a request sent to the backend carried.
enum Pending {
    /// No NTLM message (no Authorization, another scheme, Kerberos, a malformed token).
    Plain,
    /// A NEGOTIATE message: a 401 with the challenge should answer it.
    Negotiate,
    /// An AUTHENTICATE message, and the names in it.
    Authenticate(Names),
}

/// The observer's reading of the exchanges, apart from the sockets: fed each direction's
/// reads, it says when to stop.
struct Watch<J> {
    requests: RequestScanner,
    responses: ResponseScanner,
    /// What each request sent and not yet answered carried, oldest first.
    pending: VecDeque<Pending>,
    /// 401s offering NTLM to requests without it, watched past so far.
    anonymous_challenges: u32,
    /// The last login whose response came (or that was blocked).
    login: Option<Login>,
    judge: J,
}

impl<J: Judge> Watch<J> {
    fn new(judge: J) -> Watch<J> {
        Watch {
            requests: RequestScanner::new(),
            responses: ResponseScanner::new(),
            pending: VecDeque::new(),
            anonymous_challenges: 0,
            login: None,
            judge,
        }
    }

    /// Reads bytes from the client; `Some` to stop.
    fn up(&mut self, bytes: &[u8]) -> Option<Stop> {
        let mut requests = Vec::new();
        let scanned = self.requests.feed(bytes, &mut requests);
        for request in requests {
            if let Some(stop) = self.request(&request) {
                return Some(stop);
            }
        }
        scanned.err().map(|why| Stop::CannotFollow { dir: Dir::Up, why })
    }

    fn request(&mut self, request: &Request) -> Option<Stop> {
        let message = request.auth.as_ref().and_then(|a| message::parse_token(a.scheme, &a.token).ok().flatten());
        let pending = match message {
            Some(Message::Authenticate(names)) => {
                if !self.judge.admit(&names) {
                    self.login = Some(Login { names, result: LoginResult::Blocked });
                    return Some(Stop::Blocked);
                }
                Pending::Authenticate(names)
            }
            Some(Message::Negotiate) => Pending::Negotiate,
            Some(Message::Challenge) | None => Pending::Plain,
        };
        if let Err(why) = self.responses.expect(request) {
            return Some(Stop::CannotFollow { dir: Dir::Up, why });
        }
        self.pending.push_back(pending);
        None
    }

    /// Reads bytes from the backend; `Some` to stop.
    fn down(&mut self, bytes: &[u8]) -> Option<Stop> {
        let mut responses = Vec::new();
        let scanned = self.responses.feed(bytes, &mut responses);
        for response in responses {
            if let Some(stop) = self.response(response) {
                return Some(stop);
            }
        }
        scanned.err().map(|why| Stop::CannotFollow { dir: Dir::Down, why })
    }

    fn response(&mut self, response: Response) -> Option<Stop> {
        // The scanner reports a final response only for a request it was told of, as each one
        // pushed here was; a 101 (after which it gives up) is reported without that check.
        let request = self.pending.pop_front().unwrap_or(Pending::Plain);
        match request {
            Pending::Authenticate(names) => {
                let login = Login { names, result: LoginResult::of(response.status) };
                self.judge.decided(&login);
                // Denied, and watched on: the client may try again here, judged again.
                let again = login.result == LoginResult::Denied && self.judge.watches_denied();
                if again {
                    // A client tries again as it began: perhaps anonymously first.
                    self.anonymous_challenges = 0;
                }
                self.login = Some(login);
                (!again).then_some(Stop::Login)
            }
            Pending::Negotiate if response.status == 401 => None,
            Pending::Plain
                if response.status == 401
                    && response.offers_ntlm
                    && self.anonymous_challenges < ANONYMOUS_CHALLENGES =>
            {
                self.anonymous_challenges += 1;
                None
            }
            // Not a login, unless a later request already started one.
            Pending::Negotiate | Pending::Plain => {
                self.pending.iter().all(|p| matches!(p, Pending::Plain)).then_some(Stop::NotAuthenticating)
            }
        }
    }
}

#[cfg(test)]
#[path = "tests/observe.rs"]
mod tests;
