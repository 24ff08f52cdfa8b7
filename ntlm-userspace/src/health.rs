//! Backend health: the up/down state machine of one backend ([`Health`]), the active probe
//! (a TCP connect, or an HTTP `GET` whose status is checked: [`probe`]), the loop that probes
//! one backend every interval ([`run`]) and the passive check that counts a client's failed
//! backend connect ([`passive_failure`]).
//!
//! The module knows nothing of routes or pools: a backend is anything that implements
//! [`Target`]. The data path only calls [`Health::is_up`], one atomic load.
//!
//! Semantics follow nginx and HAProxy: a backend starts up; `fall` failed checks in a row mark
//! it down, `rise` passed checks in a row mark it up again; each change is logged once.

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use log::{debug, info, warn};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;

/// Probe interval when the configuration gives none (HAProxy's `inter` default).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Probe timeout when the configuration gives none: one interval, as HAProxy's `timeout check`.
pub const DEFAULT_TIMEOUT: Duration = DEFAULT_INTERVAL;
/// Passed checks in a row that mark a down backend up, when the configuration gives none.
pub const DEFAULT_RISE: u32 = 2;
/// Failed checks in a row that mark an up backend down, when the configuration gives none.
pub const DEFAULT_FALL: u32 = 3;
/// The shortest interval [`run`] uses; a shorter one (zero included) is raised to this, so a
/// bad value cannot make the loop spin.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// How many bytes of a backend's answer the HTTP probe reads, at most, looking for the end of
/// the status line; a longer line (or no line at all) fails the probe.
pub const MAX_STATUS_LINE: usize = 4096;
/// After the status line, the HTTP probe reads (and drops) at most this many more bytes of the
/// response, so that it can close after the backend did and the backend sees a normal close
/// rather than a reset. A longer response is cut off with a reset; the verdict stands.
pub const MAX_DRAIN: usize = 64 * 1024;
/// How many bytes of a malformed status line an error shows (escaped).
const SHOWN_BYTES: usize = 64;
/// The `User-Agent` of the HTTP probe, so a backend's logs can tell checks from clients.
pub const USER_AGENT: &str = "ntlm-splice-health";

/// How one backend is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Time from the start of one probe to the start of the next (a slower probe delays the
    /// next one instead of overlapping it). Raised to [`MIN_INTERVAL`] if shorter.
    pub interval: Duration,
    /// The whole probe's budget: the TCP connect and, with [`Check::http`], the request and the
    /// status line must all complete within it.
    pub timeout: Duration,
    /// Passed checks in a row that mark a down backend up (0 counts as 1).
    pub rise: u32,
    /// Failed checks in a row that mark an up backend down (0 counts as 1).
    pub fall: u32,
    /// An HTTP check after the connect; `None` checks by TCP connect alone.
    pub http: Option<HttpCheck>,
    /// Bytes written first on every probe connection: the PROXY header of a connection that
    /// carries no client (v2 `LOCAL`), for a route that sends one, so that a backend requiring
    /// a header answers the probe (as HAProxy's `check-send-proxy`).
    pub proxy_header: Option<Vec<u8>>,
}

impl Default for Check {
    /// A TCP check every [`DEFAULT_INTERVAL`], with [`DEFAULT_TIMEOUT`], [`DEFAULT_RISE`] and
    /// [`DEFAULT_FALL`].
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            http: None,
            proxy_header: None,
        }
    }
}

/// The HTTP part of a check: `GET path` over plain TCP, passed if the status is in `expect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    /// The request target, an absolute path such as `/healthz` (visible ASCII, no spaces).
    pub path: String,
    /// The `Host` header; `None` sends the backend's `ip:port`.
    pub host: Option<String>,
    /// The statuses that pass, an inclusive range: `(200, 299)` for `2xx`.
    pub expect: (u16, u16),
}

/// A change of a backend's state, returned by [`Health::record`] exactly once per change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The backend was down and passed `rise` checks in a row.
    Up,
    /// The backend was up and failed `fall` checks in a row.
    Down,
}

/// Bit of [`Health::state`]: the backend is up.
const UP: u64 = 1 << 33;
/// Bit of [`Health::state`]: the current run is of passed checks (else of failed ones).
const RUN_PASSED: u64 = 1 << 32;
/// Bits of [`Health::state`]: the length of the current run (saturating).
const RUN_LEN: u64 = u32::MAX as u64;

/// The health state of one backend, shared by its checker and the data path. Lock-free: the
/// whole state is one atomic word, changed by compare-and-swap, so concurrent records (the
/// active checker and any number of clients' failed connects) are linearised and each change
/// of state is reported to exactly one caller.
#[derive(Debug)]
pub struct Health {
    /// [`UP`] | [`RUN_PASSED`] | run length in [`RUN_LEN`].
    state: AtomicU64,
    /// How many times the state changed.
    transitions: AtomicU64,
    /// How many failures were recorded, active probes and clients' connects alike.
    checks_failed: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// A backend that is up (as nginx and HAProxy start them) with no checks recorded.
    pub fn new() -> Self {
        Self { state: AtomicU64::new(UP), transitions: AtomicU64::new(0), checks_failed: AtomicU64::new(0) }
    }

    /// Whether new connections may go to this backend: one atomic load.
    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Acquire) & UP != 0
    }

    /// Records one check's result: `fall` failures in a row mark the backend down, `rise`
    /// successes in a row mark it up; a result of the other kind starts a new run. Returns the
    /// change this result caused, if any; of concurrent callers, exactly one sees each change.
    pub fn record(&self, ok: bool, rise: u32, fall: u32) -> Option<Transition> {
        if !ok {
            self.checks_failed.fetch_add(1, Ordering::Relaxed);
        }
        let next = |s| step(s, ok, rise, fall);
        // The closure never returns None, so both arms carry the state it replaced.
        let prev = match self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| Some(next(s))) {
            Ok(prev) | Err(prev) => prev,
        };
        let change = match (prev & UP != 0, next(prev) & UP != 0) {
            (true, false) => Some(Transition::Down),
            (false, true) => Some(Transition::Up),
            _ => None,
        };
        if change.is_some() {
            self.transitions.fetch_add(1, Ordering::Relaxed);
        }
        change
    }

    /// How many times this backend changed state (up to down or down to up).
    pub fn transitions(&self) -> u64 {
        self.transitions.load(Ordering::Relaxed)
    }

    /// How many failures were recorded: failed probes and clients' failed connects.
    pub fn checks_failed(&self) -> u64 {
        self.checks_failed.load(Ordering::Relaxed)
    }
}

/// The state after one more result: a pure function of the packed state, so a CAS loop can
/// retry it.
fn step(state: u64, ok: bool, rise: u32, fall: u32) -> u64 {
    let up = state & UP != 0;
    let run_passed = state & RUN_PASSED != 0;
    let run = if run_passed == ok { ((state & RUN_LEN) as u32).saturating_add(1) } else { 1 };
    let up = if ok { up || run >= rise.max(1) } else { up && run < fall.max(1) };
    (if up { UP } else { 0 }) | (if ok { RUN_PASSED } else { 0 }) | u64::from(run)
}

/// Why a probe failed. Each message says what the backend did and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The backend's host answered the connect with a reset: nothing listens there.
    #[error("connect refused: nothing listens on {addr}; start the service or fix the backend address")]
    Refused {
        /// The backend.
        addr: SocketAddr,
        /// The connect's error.
        #[source]
        source: io::Error,
    },
    /// The connect failed otherwise (no route to the host, network unreachable, ...).
    #[error("connect to {addr} failed: {source}; check the address and the route to it")]
    Connect {
        /// The backend.
        addr: SocketAddr,
        /// The connect's error.
        #[source]
        source: io::Error,
    },
    /// The connect did not complete within the check's timeout.
    #[error(
        "connect to {addr} timed out after {}: the host is down or a firewall drops the packets; \
         raise the check's timeout if the backend is only slow",
        humantime::format_duration(*timeout)
    )]
    ConnectTimeout {
        /// The backend.
        addr: SocketAddr,
        /// The check's timeout.
        timeout: Duration,
    },
    /// The configured path or host cannot be sent in a request line or header.
    #[error(
        "health check http {what} {value:?} cannot be sent: use visible ASCII without spaces \
         (a path starts with /, e.g. /healthz)"
    )]
    InvalidRequest {
        /// `"path"` or `"host"`.
        what: &'static str,
        /// The configured value.
        value: String,
    },
    /// Sending the HTTP request failed.
    #[error("sending the HTTP request failed: {source}")]
    Send {
        /// The write's error.
        #[source]
        source: io::Error,
    },
    /// Reading the answer failed (typically a reset).
    #[error("reading the HTTP status line failed: {source}; is the backend an HTTP service?")]
    Read {
        /// The read's error.
        #[source]
        source: io::Error,
    },
    /// Connected, but no complete status line arrived within the check's timeout.
    #[error(
        "no HTTP status line within {} (connect included): the service is stalled or does not \
         speak HTTP; raise the check's timeout if it is only slow",
        humantime::format_duration(*timeout)
    )]
    StatusTimeout {
        /// The check's timeout.
        timeout: Duration,
    },
    /// The backend closed before a complete status line.
    #[error(
        "no HTTP status line: the backend closed after {received} bytes; for a TLS port (443) \
         drop `http` and check by TCP connect"
    )]
    NoStatusLine {
        /// Bytes received before the close.
        received: usize,
    },
    /// No end of line in the first [`MAX_STATUS_LINE`] bytes.
    #[error("no end of the HTTP status line in the first {limit} bytes: the backend does not speak HTTP")]
    StatusLineTooLong {
        /// [`MAX_STATUS_LINE`].
        limit: usize,
    },
    /// What arrived is not `HTTP/1.x NNN ...`.
    #[error(
        "bad HTTP status line \"{line}\" (expected HTTP/1.x NNN reason): the backend does not \
         speak plain HTTP; for a TLS port (443) drop `http` and check by TCP connect"
    )]
    BadStatusLine {
        /// The start of what arrived, escaped.
        line: String,
    },
    /// A well-formed status outside the expected range.
    #[error("HTTP status {status} for {path}, expected {lo}-{hi}: fix the service's health page, or widen `expect`")]
    Status {
        /// The status received.
        status: u16,
        /// Lowest passing status.
        lo: u16,
        /// Highest passing status.
        hi: u16,
        /// The path requested.
        path: String,
    },
}

/// Probes one backend: a TCP connect, then, with [`Check::http`], a `GET` whose status line
/// must carry a status in `expect`. Everything (connect included) completes within
/// `check.timeout`, and at most [`MAX_STATUS_LINE`] bytes are read looking for the status
/// line, so no answer can hang the probe. The connection is closed normally (FIN, no
/// `SO_LINGER` 0); after an HTTP answer the probe first reads the rest of the response, up to
/// [`MAX_DRAIN`] bytes, so that the backend sees a normal close too.
pub async fn probe(addr: SocketAddr, check: &Check) -> Result<(), ProbeError> {
    // A request that cannot be sent is a configuration error: fail before touching the backend.
    let req = check.http.as_ref().map(|http| request(addr, http)).transpose()?;
    let deadline = Instant::now() + check.timeout;
    let mut stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Err(_elapsed) => return Err(ProbeError::ConnectTimeout { addr, timeout: check.timeout }),
        Ok(Err(source)) if source.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(ProbeError::Refused { addr, source });
        }
        Ok(Err(source)) => return Err(ProbeError::Connect { addr, source }),
        Ok(Ok(stream)) => stream,
    };
    if let Some(header) = &check.proxy_header {
        match tokio::time::timeout_at(deadline, stream.write_all(header)).await {
            Err(_elapsed) => return Err(ProbeError::StatusTimeout { timeout: check.timeout }),
            Ok(Err(source)) => return Err(ProbeError::Send { source }),
            Ok(Ok(())) => {}
        }
    }
    let (Some(http), Some(req)) = (&check.http, req) else {
        return Ok(());
    };
    let status = match tokio::time::timeout_at(deadline, async {
        stream.write_all(req.as_bytes()).await.map_err(|source| ProbeError::Send { source })?;
        read_status(&mut stream).await
    })
    .await
    {
        Err(_elapsed) => return Err(ProbeError::StatusTimeout { timeout: check.timeout }),
        Ok(result) => result?,
    };
    // The verdict is known; reading on only lets the close be a normal one (see MAX_DRAIN).
    if let Err(why) = tokio::time::timeout_at(deadline, drain(&mut stream)).await {
        debug!("health backend={addr} response not drained before the timeout ({why}); closing anyway");
    }
    let (lo, hi) = http.expect;
    if (lo..=hi).contains(&status) {
        Ok(())
    } else {
        Err(ProbeError::Status { status, lo, hi, path: http.path.clone() })
    }
}

/// The HTTP probe's request, with the configured path and host checked first.
fn request(addr: SocketAddr, http: &HttpCheck) -> Result<String, ProbeError> {
    let sendable = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !sendable(&http.path) || !http.path.starts_with('/') {
        return Err(ProbeError::InvalidRequest { what: "path", value: http.path.clone() });
    }
    let host = match &http.host {
        Some(host) if !sendable(host) => {
            return Err(ProbeError::InvalidRequest { what: "host", value: host.clone() });
        }
        Some(host) => host.clone(),
        None => addr.to_string(),
    };
    Ok(format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\nConnection: close\r\n\r\n",
        http.path
    ))
}

/// Reads up to [`MAX_STATUS_LINE`] bytes until the end of the first line and parses it as an
/// HTTP status line. Fails as soon as the bytes received cannot start one, so a backend that
/// answers in another protocol fails at once rather than at the timeout.
async fn read_status<R: AsyncRead + Unpin>(reader: &mut R) -> Result<u16, ProbeError> {
    let mut buf = [0u8; MAX_STATUS_LINE];
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(ProbeError::StatusLineTooLong { limit: MAX_STATUS_LINE });
        }
        let n = reader.read(&mut buf[len..]).await.map_err(|source| ProbeError::Read { source })?;
        if n == 0 {
            return Err(ProbeError::NoStatusLine { received: len });
        }
        let start = len;
        len += n;
        if let Some(end) = buf[start..len].iter().position(|&b| b == b'\n') {
            let line = &buf[..start + end];
            return parse_status_line(line).ok_or_else(|| bad_line(line));
        }
        let prefix = len.min(STATUS_PREFIX.len());
        if buf[..prefix] != STATUS_PREFIX[..prefix] {
            return Err(bad_line(&buf[..len]));
        }
    }
}

/// What every status line this probe accepts starts with.
const STATUS_PREFIX: &[u8] = b"HTTP/1.";

/// [`ProbeError::BadStatusLine`] showing the first [`SHOWN_BYTES`] bytes of `line`, escaped.
fn bad_line(line: &[u8]) -> ProbeError {
    ProbeError::BadStatusLine { line: line[..line.len().min(SHOWN_BYTES)].escape_ascii().to_string() }
}

/// Parses an HTTP/1.x status line (the bytes before its `\n`; one trailing `\r` is dropped)
/// and returns its status code. Accepted, exactly: `HTTP/1.` DIGIT SP 3DIGIT, then either
/// nothing or SP and a reason phrase of HTAB, SP, visible ASCII and bytes >= 0x80 (RFC 9112
/// 4; the SP before an empty reason may be missing, as some servers send it).
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(STATUS_PREFIX)?;
    let (&minor, rest) = rest.split_first()?;
    let rest = rest.strip_prefix(b" ").filter(|_| minor.is_ascii_digit())?;
    let (code, reason) = rest.split_at_checked(3)?;
    if !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let reason_ok = |r: &[u8]| r.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80);
    match reason.split_first() {
        None => {}
        Some((b' ', reason)) if reason_ok(reason) => {}
        Some(_) => return None,
    }
    Some(code.iter().fold(0, |n, &d| n * 10 + u16::from(d - b'0')))
}

/// Reads and drops the rest of a response until the backend closes, at most [`MAX_DRAIN`]
/// bytes. Its result does not change the verdict; errors only end it early.
async fn drain(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < MAX_DRAIN {
        match stream.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => total += n,
            Err(e) => {
                debug!("health draining the response after the status line: {e}");
                return;
            }
        }
    }
}

/// A backend as the health checker sees it; the route/pool model implements it.
pub trait Target: Send + Sync + 'static {
    /// The address probes connect to.
    fn addr(&self) -> SocketAddr;
    /// The backend's health state.
    fn health(&self) -> &Health;
    /// How log lines name the backend, as logfmt fields: `route=intranet backend=10.0.0.7:443`.
    fn label(&self) -> String;
    /// Its state changed (once per change, as it is logged): for its metrics.
    fn changed(&self, _to: Transition) {}
}

/// Probes `target` every `check.interval` and records the results in its [`Health`] until
/// `stop` is cancelled (also mid-probe or mid-wait: it returns promptly). Probes never
/// overlap: the first runs at once; later ones run at `start + offset + k * interval`, where
/// `offset` (below one interval) is a hash of the backend's address (see [`spread`]), so that
/// backends started together do not probe in lockstep. A probe slower than the interval
/// delays the next, which then starts as soon as it ends. Each change of state is logged once:
/// down at warn with the last probe's error, up at info.
pub async fn run(target: Arc<impl Target>, check: Check, stop: CancellationToken) {
    let check = Arc::new(check);
    let probe_check = Arc::clone(&check);
    run_with(target, &check, stop, move |addr| {
        let check = Arc::clone(&probe_check);
        async move { probe(addr, &check).await }
    })
    .await;
}

/// [`run`] with the probe passed in, so that tests can drive the schedule with paused time.
async fn run_with<T, F, P>(target: Arc<T>, check: &Check, stop: CancellationToken, mut probe: F)
where
    T: Target,
    F: FnMut(SocketAddr) -> P,
    P: Future<Output = Result<(), ProbeError>>,
{
    let addr = target.addr();
    let interval = check.interval.max(MIN_INTERVAL);
    let mut ticks = tokio::time::interval_at(Instant::now() + interval + spread(addr, interval), interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            result = probe(addr) => result,
        };
        match result {
            Ok(()) => {
                if let Some(change) = target.health().record(true, check.rise, check.fall) {
                    log_transition(&*target, change, check.rise, check.fall, &"");
                }
            }
            Err(e) => {
                debug!("health {} check failed: {e}", target.label());
                if let Some(change) = target.health().record(false, check.rise, check.fall) {
                    log_transition(&*target, change, check.rise, check.fall, &e);
                }
            }
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
    }
}

/// Records a client's failed connect to `target` as a failed check (the passive check: a
/// backend that refuses clients goes down without waiting for the prober) and logs the change
/// it causes, if any, as [`run`] does.
pub fn passive_failure(target: &impl Target, rise: u32, fall: u32, err: &io::Error) {
    if let Some(change) = target.health().record(false, rise, fall) {
        log_transition(target, change, rise, fall, &format_args!("client connect: {err}"));
    }
}

/// Logs one change of state: down at warn with its cause, up at info.
fn log_transition(target: &impl Target, change: Transition, rise: u32, fall: u32, cause: &dyn fmt::Display) {
    target.changed(change);
    let line = transition_line(&target.label(), change, rise, fall, cause);
    match change {
        Transition::Down => warn!("{line}"),
        Transition::Up => info!("{line}"),
    }
}

/// The log line of one change of state:
/// `health route=intranet backend=10.0.0.7:443 state=down after 3 failed checks: connect refused`.
fn transition_line(label: &str, change: Transition, rise: u32, fall: u32, cause: &dyn fmt::Display) -> String {
    match change {
        Transition::Down => format!("health {label} state=down after {} failed checks: {cause}", fall.max(1)),
        Transition::Up => format!("health {label} state=up after {} passed checks", rise.max(1)),
    }
}

/// The phase of a backend's probes within the interval, in whole milliseconds (the resolution
/// of tokio's timer): FNV-1a (64-bit) over the address's IP octets (an IPv4 address as its
/// IPv4-mapped IPv6 form) and its port (big-endian), mixed by the MurmurHash3 64-bit
/// finaliser so that neighbouring addresses land far apart, modulo the interval. Deterministic
/// (a backend keeps its phase across reloads and restarts), no randomness, always below
/// `interval` (zero for an interval under 1 ms).
fn spread(addr: SocketAddr, interval: Duration) -> Duration {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let fnv =
        ip.iter().chain(&addr.port().to_be_bytes()).fold(FNV_OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME));
    let mut hash = fnv;
    hash = (hash ^ (hash >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash = (hash ^ (hash >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    let millis = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    if millis == 0 { Duration::ZERO } else { Duration::from_millis(hash % millis) }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Barrier, Mutex},
        thread,
    };

    use proptest::prelude::*;
    use tokio::{
        io::AsyncWriteExt as _,
        net::TcpListener,
        sync::{mpsc, oneshot},
        task::JoinHandle,
        time::timeout,
    };

    use super::*;

    /// A deadline for things that must happen (never reached when the code works).
    const PATIENT: Duration = Duration::from_secs(10);
    /// A check timeout that the tests expect to expire.
    const SHORT: Duration = Duration::from_millis(300);
    /// Most bytes a test responder reads of a request, or writes of an endless answer.
    const RESPONDER_CAP: usize = 16 << 20;

    /// A backend for the checker.
    struct TestTarget {
        addr: SocketAddr,
        health: Health,
    }

    impl Target for TestTarget {
        fn addr(&self) -> SocketAddr {
            self.addr
        }
        fn health(&self) -> &Health {
            &self.health
        }
        fn label(&self) -> String {
            format!("route=test backend={}", self.addr)
        }
    }

    fn target(addr: SocketAddr) -> Arc<TestTarget> {
        Arc::new(TestTarget { addr, health: Health::new() })
    }

    fn tcp_check(timeout: Duration) -> Check {
        Check { timeout, ..Check::default() }
    }

    fn http_check(timeout: Duration) -> Check {
        Check {
            timeout,
            http: Some(HttpCheck { path: "/healthz".into(), host: None, expect: (200, 399) }),
            ..Check::default()
        }
    }

    // ---- state machine ----

    #[test]
    fn starts_up_with_nothing_counted() {
        let h = Health::new();
        assert!(h.is_up());
        assert_eq!((h.transitions(), h.checks_failed()), (0, 0));
    }

    #[test]
    fn fall_failures_in_a_row_mark_down_rise_successes_mark_up() {
        let h = Health::new();
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), None);
        assert!(h.is_up(), "two failures of fall=3 must not mark it down");
        assert_eq!(h.record(false, 2, 3), Some(Transition::Down));
        assert!(!h.is_up());
        assert_eq!(h.record(false, 2, 3), None, "already down: no second transition");
        assert_eq!(h.record(true, 2, 3), None);
        assert!(!h.is_up(), "one success of rise=2 must not mark it up");
        assert_eq!(h.record(true, 2, 3), Some(Transition::Up));
        assert!(h.is_up());
        assert_eq!(h.record(true, 2, 3), None, "already up: no second transition");
        assert_eq!((h.transitions(), h.checks_failed()), (2, 4));
    }

    #[test]
    fn a_result_of_the_other_kind_restarts_the_run() {
        let h = Health::new();
        for ok in [false, false, true, false, false] {
            assert_eq!(h.record(ok, 2, 3), None);
        }
        assert!(h.is_up(), "the success broke the run of failures");
        assert_eq!(h.record(false, 2, 3), Some(Transition::Down), "third failure in a row");
        for ok in [true, false, true] {
            assert_eq!(h.record(ok, 2, 3), None);
        }
        assert!(!h.is_up(), "the failure broke the run of successes");
        assert_eq!(h.record(true, 2, 3), Some(Transition::Up), "second success in a row");
    }

    #[test]
    fn alternating_results_never_flip() {
        for start_up in [true, false] {
            let h = Health::new();
            if !start_up {
                assert_eq!(h.record(false, 2, 2), None);
                assert_eq!(h.record(false, 2, 2), Some(Transition::Down));
            }
            for i in 0..1000 {
                assert_eq!(h.record(i % 2 == 0, 2, 2), None, "result {i}");
                assert_eq!(h.is_up(), start_up);
            }
        }
    }

    #[test]
    fn rise_and_fall_of_zero_count_as_one() {
        for n in [0, 1] {
            let h = Health::new();
            assert_eq!(h.record(false, n, n), Some(Transition::Down));
            assert_eq!(h.record(true, n, n), Some(Transition::Up));
        }
    }

    #[test]
    fn a_long_run_saturates_instead_of_wrapping() {
        let down_long_run = u64::from(u32::MAX);
        let next = step(down_long_run, false, 2, 3);
        assert_eq!(next, down_long_run, "stays down, run stays at the maximum");
        assert_eq!(step(next, true, 2, 3) & UP, 0, "one success after it is a run of one");
    }

    #[test]
    fn concurrent_records_report_each_change_exactly_once() {
        const THREADS: usize = 8;
        const ROUNDS: usize = 200;
        const PER_THREAD: usize = 20;
        for round in 0..ROUNDS {
            let h = Health::new();
            let barrier = Barrier::new(THREADS);
            let count = |ok: bool, want: Transition| {
                thread::scope(|s| {
                    let workers: Vec<_> = (0..THREADS)
                        .map(|_| {
                            s.spawn(|| {
                                barrier.wait();
                                (0..PER_THREAD).filter(|_| h.record(ok, 2, 3) == Some(want)).count()
                            })
                        })
                        .collect();
                    workers.into_iter().map(|w| w.join().expect("recorder panicked")).sum::<usize>()
                })
            };
            assert_eq!(count(false, Transition::Down), 1, "round {round}: downs");
            assert!(!h.is_up());
            assert_eq!(count(true, Transition::Up), 1, "round {round}: ups");
            assert!(h.is_up());
            assert_eq!(h.transitions(), 2);
            assert_eq!(h.checks_failed(), (THREADS * PER_THREAD) as u64);
        }
    }

    #[test]
    fn concurrent_mixed_results_give_alternating_consistent_transitions() {
        const THREADS: usize = 4;
        const PER_THREAD: usize = 200_000;
        let h = Health::new();
        let barrier = Barrier::new(THREADS);
        let seen = Mutex::new(Vec::new());
        thread::scope(|s| {
            for t in 0..THREADS {
                let (h, barrier, seen) = (&h, &barrier, &seen);
                s.spawn(move || {
                    barrier.wait();
                    // Runs of 3 failures and 2 successes per thread, interleaved across threads.
                    let mine: Vec<_> =
                        (0..PER_THREAD).filter_map(|i| h.record((i + t) % 5 < 2, 2, 2)).collect();
                    seen.lock().expect("poisoned").extend(mine);
                });
            }
        });
        let seen = seen.into_inner().expect("poisoned");
        let downs = seen.iter().filter(|&&c| c == Transition::Down).count() as i64;
        let ups = seen.len() as i64 - downs;
        assert!(ups > 0, "the pattern should make the backend change state");
        assert_eq!(h.transitions(), seen.len() as u64, "every change returned to one caller");
        assert_eq!(downs - ups, i64::from(!h.is_up()), "changes alternate, starting up");
    }

    // ---- status line parser ----

    /// The accepted grammar, spelt out position by position (the specification the property
    /// tests hold the parser to).
    fn well_formed(line: &[u8]) -> Option<u16> {
        let l = line.strip_suffix(b"\r").unwrap_or(line);
        let digits = |r: std::ops::Range<usize>| l[r].iter().all(u8::is_ascii_digit);
        let head = l.len() >= 12 && &l[..7] == b"HTTP/1." && digits(7..8) && l[8] == b' ' && digits(9..12);
        let tail = l.len() == 12 || (l.len() > 12 && l[12] == b' ' && l[13..].iter().all(|&b| b == 9 || (b >= 0x20 && b != 0x7f)));
        if !(head && tail) {
            return None;
        }
        Some(u16::from(l[9] - b'0') * 100 + u16::from(l[10] - b'0') * 10 + u16::from(l[11] - b'0'))
    }

    #[test]
    fn status_line_fixtures() {
        let good: &[(&[u8], u16)] = &[
            (b"HTTP/1.1 200 OK\r", 200),
            (b"HTTP/1.0 503 Service Unavailable", 503),
            (b"HTTP/1.1 204", 204),
            (b"HTTP/1.1 204\r", 204),
            (b"HTTP/1.1 200 ", 200),
            (b"HTTP/1.1 404 Nicht\tGefunden \xc3\xa4", 404),
            (b"HTTP/1.9 099 x", 99),
        ];
        for &(line, code) in good {
            assert_eq!(parse_status_line(line), Some(code), "{}", line.escape_ascii());
        }
        let bad: &[&[u8]] = &[
            b"",
            b"HTTP/1.1",
            b"HTTP/2 200 OK",
            b"HTTP/2.0 200 OK",
            b"http/1.1 200 OK",
            b"HTTP/1.x 200 OK",
            b"HTTP/1.1  200 OK",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 2x0 OK",
            b"HTTP/1.1 200OK",
            b"HTTP/1.1 200 OK\r\r",
            b"HTTP/1.1 200 O\x00K",
            b"HTTP/1.1 200 O\x7fK",
            b"HTTP/1.1\t200 OK",
            b" HTTP/1.1 200 OK",
            b"\x15\x03\x03\x00\x02\x02\x28",
        ];
        for &line in bad {
            assert_eq!(parse_status_line(line), None, "{}", line.escape_ascii());
        }
    }

    /// Bytes that matter to the grammar, so generated lines come close to valid ones.
    fn grammar_byte() -> impl Strategy<Value = u8> {
        prop_oneof![b'0'..=b'9', Just(b' '), Just(b'\r'), Just(b'\t'), Just(b'\n'), Just(0u8), Just(0x7f), 0x21u8..=0xff]
    }

    /// A reason-phrase byte.
    fn reason_byte() -> impl Strategy<Value = u8> {
        prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff]
    }

    /// Proptest cases per property.
    const CASES: u32 = 2000;

    /// Lines of any bytes.
    fn any_line() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..64)
    }

    /// `HTTP/1.` and grammar bytes: lines close to valid ones.
    fn near_valid_line() -> impl Strategy<Value = Vec<u8>> {
        (grammar_byte(), prop::collection::vec(grammar_byte(), 0..24))
            .prop_map(|(minor, tail)| [&b"HTTP/1."[..], &[minor], &tail].concat())
    }

    /// A well-formed status line (without its `\n`) and its status.
    fn well_formed_line() -> impl Strategy<Value = (Vec<u8>, u16)> {
        (0u8..=9, 0u16..=999, prop::option::of(prop::collection::vec(reason_byte(), 0..40)), any::<bool>()).prop_map(
            |(minor, code, reason, cr)| {
                let mut line = format!("HTTP/1.{minor} {code:03}").into_bytes();
                if let Some(reason) = reason {
                    line.push(b' ');
                    line.extend(reason);
                }
                if cr {
                    line.push(b'\r');
                }
                (line, code)
            },
        )
    }

    /// What a backend sends, and the size of the chunks it arrives in.
    fn answer_in_chunks() -> impl Strategy<Value = (Vec<u8>, usize)> {
        (prop::collection::vec(grammar_byte(), 0..96), any::<bool>(), 1usize..16).prop_map(|(data, prefixed, chunk)| {
            (if prefixed { [b"HTTP/1.1 ".as_slice(), &data].concat() } else { data }, chunk)
        })
    }

    /// Valid answers (a well-formed status line, its end of line, more bytes) with a few
    /// random edits (see [`ntlm_fuzz::havoc`]), in chunks of a random size.
    fn havoc_on_valid_answers() -> impl Strategy<Value = (Vec<u8>, usize)> {
        let valid = (well_formed_line(), prop::collection::vec(any::<u8>(), 0..32))
            .prop_map(|((line, _), rest)| [line, b"\n".to_vec(), rest].concat());
        (ntlm_fuzz::havoc(valid), 1usize..16)
    }

    /// The parser accepts exactly the grammar of [`well_formed`].
    fn agrees_with_the_grammar(line: &[u8]) -> Result<(), TestCaseError> {
        prop_assert_eq!(parse_status_line(line), well_formed(line));
        Ok(())
    }

    /// The reader, fed `data` in chunks of `chunk` bytes over a small duplex pipe, gives the
    /// status the parser gives for the first line, and fails when the parser does, with one
    /// line of message quoting at most [`SHOWN_BYTES`] of the answer.
    fn reader_agrees_with_the_parser(data: &[u8], chunk: usize) -> Result<(), TestCaseError> {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let got = rt.block_on(async {
            let (mut reader, mut writer) = tokio::io::duplex(8);
            let feed = data.to_vec();
            let writer = tokio::spawn(async move {
                for piece in feed.chunks(chunk) {
                    if writer.write_all(piece).await.is_err() {
                        break; // the reader decided early and hung up
                    }
                }
            });
            let got = read_status(&mut reader).await;
            drop(reader);
            writer.await.expect("writer panicked");
            got
        });
        let want = data.iter().position(|&b| b == b'\n').and_then(|end| parse_status_line(&data[..end]));
        match (got, want) {
            (Ok(code), Some(want)) => prop_assert_eq!(code, want),
            (Err(e), None) => {
                let text = e.to_string();
                prop_assert!(!text.contains('\n'), "{}", text);
                if let ProbeError::BadStatusLine { line } = &e {
                    // escape_ascii writes at most 4 characters a byte (`\xNN`).
                    prop_assert!(line.len() <= 4 * SHOWN_BYTES, "{}", line);
                }
            }
            (got, want) => prop_assert!(false, "reader {:?}, parser {:?}", got, want),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

        #[test]
        fn parser_agrees_with_the_grammar_on_any_bytes(line in any_line()) {
            agrees_with_the_grammar(&line)?;
        }

        #[test]
        fn parser_agrees_with_the_grammar_near_valid_lines(line in near_valid_line()) {
            agrees_with_the_grammar(&line)?;
        }

        #[test]
        fn parser_accepts_every_well_formed_line((line, code) in well_formed_line()) {
            prop_assert_eq!(parse_status_line(&line), Some(code));
        }

        #[test]
        fn reader_agrees_with_the_parser_whatever_the_chunks((data, chunk) in answer_in_chunks()) {
            reader_agrees_with_the_parser(&data, chunk)?;
        }

        #[test]
        fn reader_and_parser_agree_on_valid_answers_with_random_edits((data, chunk) in havoc_on_valid_answers()) {
            reader_agrees_with_the_parser(&data, chunk)?;
            let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
            agrees_with_the_grammar(line)?;
        }
    }

    /// The status-line properties above, on fresh cases for a time budget instead of
    /// [`CASES`] cases (see the `ntlm_fuzz` crate).
    #[test]
    #[ignore = "fuzz target: `cargo xtask test` runs it for NTLM_SPLICE_FUZZ_SECS"]
    fn fuzz_health_status_line() {
        let data = |(data, _): &(Vec<u8>, usize)| data.clone();
        ntlm_fuzz::Target::new("health_status_line")
            .property("any bytes", any_line(), Clone::clone, |line| agrees_with_the_grammar(&line))
            .property("near valid lines", near_valid_line(), Clone::clone, |line| agrees_with_the_grammar(&line))
            .property(
                "well-formed lines",
                well_formed_line(),
                |(line, _)| line.clone(),
                |(line, code)| {
                    prop_assert_eq!(parse_status_line(&line), Some(code));
                    Ok(())
                },
            )
            .property("reader in chunks", answer_in_chunks(), data, |(data, chunk)| {
                reader_agrees_with_the_parser(&data, chunk)
            })
            .property("havoc on valid answers", havoc_on_valid_answers(), data, |(data, chunk)| {
                reader_agrees_with_the_parser(&data, chunk)?;
                agrees_with_the_grammar(data.split(|&b| b == b'\n').next().unwrap_or_default())
            })
            .run();
    }

    #[tokio::test]
    async fn reader_gives_up_after_max_status_line_bytes() {
        let (mut reader, mut writer) = tokio::io::duplex(64);
        let feed = tokio::spawn(async move {
            let mut sent = 0;
            let mut chunk = b"HTTP/1.1 ".to_vec();
            while sent < 4 * MAX_STATUS_LINE {
                if writer.write_all(&chunk).await.is_err() {
                    return sent;
                }
                sent += chunk.len();
                chunk = vec![b'x'; 100];
            }
            sent
        });
        let got = timeout(PATIENT, read_status(&mut reader)).await.expect("reader must not hang");
        assert!(matches!(got, Err(ProbeError::StatusLineTooLong { limit: MAX_STATUS_LINE })), "{got:?}");
        drop(reader);
        let sent = feed.await.expect("feeder panicked");
        assert!(sent < 2 * MAX_STATUS_LINE, "read {sent} bytes, more than the limit and a buffer");
    }

    // ---- probe ----

    /// How a test responder answers the one connection it accepts.
    #[derive(Clone, Copy)]
    enum Reply {
        /// Send these bytes, close, then wait for the prober's close.
        Bytes(&'static [u8]),
        /// Send the status line, then `n` bytes of body in several writes, then close.
        LongBody(usize),
        /// Send these bytes and keep the connection open until the prober closes it.
        BytesThenHold(&'static [u8]),
        /// Read the request, answer nothing, wait for the prober's close.
        Silence,
        /// Answer `HTTP/1.1 200` and then bytes without a newline until the prober hangs up.
        Endless,
    }

    /// What a test responder saw.
    #[derive(Debug)]
    struct Served {
        /// The request bytes.
        request: Vec<u8>,
        /// How the prober's close arrived after the answer: `Ok(0)` is a normal close.
        close: io::Result<usize>,
    }

    /// Serves one connection on loopback as `reply` says.
    async fn responder(reply: Reply) -> (SocketAddr, JoinHandle<Served>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let (mut conn, _) = timeout(PATIENT, listener.accept()).await.expect("no probe came").expect("accept");
            let request = read_request(&mut conn).await;
            match reply {
                Reply::Bytes(bytes) => {
                    conn.write_all(bytes).await.expect("write answer");
                    conn.shutdown().await.expect("shutdown");
                }
                Reply::LongBody(n) => {
                    conn.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes())
                        .await
                        .expect("write head");
                    for piece in vec![b'b'; n].chunks(1000) {
                        // A write error here is the prober's reset: report it as its close.
                        if let Err(e) = conn.write_all(piece).await {
                            return Served { request, close: Err(e) };
                        }
                        tokio::task::yield_now().await;
                    }
                    conn.shutdown().await.expect("shutdown");
                }
                Reply::BytesThenHold(bytes) => conn.write_all(bytes).await.expect("write answer"),
                Reply::Silence => {}
                Reply::Endless => {
                    let mut sent = 0;
                    let mut chunk = b"HTTP/1.1 200".to_vec();
                    while sent < RESPONDER_CAP && conn.write_all(&chunk).await.is_ok() {
                        sent += chunk.len();
                        chunk = vec![b'x'; 1024];
                    }
                    return Served { request, close: Ok(sent) };
                }
            }
            let mut rest = Vec::new();
            let close = timeout(PATIENT, conn.read_to_end(&mut rest)).await.expect("prober never closed");
            Served { request, close }
        });
        (addr, task)
    }

    /// Reads a request head (up to its empty line, the close, or [`RESPONDER_CAP`] bytes).
    async fn read_request(conn: &mut TcpStream) -> Vec<u8> {
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n") && request.len() < RESPONDER_CAP {
            match timeout(PATIENT, conn.read(&mut buf)).await.expect("request never ended") {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        request
    }

    #[tokio::test]
    async fn tcp_probe_passes_against_a_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        probe(addr, &tcp_check(PATIENT)).await.expect("listener accepts");
        let (mut conn, _) = timeout(PATIENT, listener.accept()).await.expect("probe connected").expect("accept");
        let mut rest = Vec::new();
        let close = timeout(PATIENT, conn.read_to_end(&mut rest)).await.expect("probe closed");
        assert_eq!(close.expect("a normal close, not a reset"), 0, "the TCP probe sends nothing");
    }

    #[tokio::test]
    async fn tcp_probe_is_refused_when_nothing_listens() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        drop(listener);
        let err = probe(addr, &tcp_check(PATIENT)).await.expect_err("nothing listens");
        assert!(matches!(err, ProbeError::Refused { addr: a, .. } if a == addr), "{err:?}");
        assert!(err.to_string().starts_with("connect refused"), "{err}");
    }

    #[tokio::test]
    async fn tcp_probe_times_out_when_the_accept_queue_is_full() {
        const MAX_FILLERS: usize = 64;
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
        socket.listen(0).expect("listen");
        let addr = socket.local_addr().expect("local addr").as_socket().expect("inet");
        // Never accepted: fill the accept queue until a connect hangs (its SYN is dropped).
        let mut fillers = Vec::new();
        let mut full = false;
        for _ in 0..MAX_FILLERS {
            match timeout(SHORT, TcpStream::connect(addr)).await {
                Ok(conn) => fillers.push(conn.expect("filler connect")),
                Err(_elapsed) => {
                    full = true;
                    break;
                }
            }
        }
        assert!(full, "the accept queue never filled after {MAX_FILLERS} connects");
        let started = Instant::now();
        let err = probe(addr, &tcp_check(SHORT)).await.expect_err("queue is full");
        assert!(matches!(err, ProbeError::ConnectTimeout { timeout: SHORT, .. }), "{err:?}");
        assert!(started.elapsed() >= SHORT, "gave up before the timeout");
        assert!(started.elapsed() < PATIENT, "took far longer than the timeout");
    }

    #[tokio::test]
    async fn http_probe_sends_the_documented_request_and_passes_on_200() {
        let (addr, served) = responder(Reply::Bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")).await;
        probe(addr, &http_check(PATIENT)).await.expect("200 is in 200-399");
        let served = served.await.expect("responder panicked");
        let want = format!(
            "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ntlm-splice-health\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(served.request, want.as_bytes(), "{}", served.request.escape_ascii());
        assert_eq!(served.close.expect("a normal close, not a reset"), 0);
    }

    #[tokio::test]
    async fn http_probe_sends_the_configured_host() {
        let (addr, served) = responder(Reply::Bytes(b"HTTP/1.0 204\r\n\r\n")).await;
        let mut check = http_check(PATIENT);
        if let Some(http) = &mut check.http {
            http.host = Some("intranet.example.net".into());
        }
        probe(addr, &check).await.expect("204 is in 200-399");
        let served = served.await.expect("responder panicked");
        let want = "GET /healthz HTTP/1.1\r\nHost: intranet.example.net\r\nUser-Agent: ntlm-splice-health\r\n\
                    Connection: close\r\n\r\n";
        assert_eq!(served.request, want.as_bytes(), "{}", served.request.escape_ascii());
    }

    #[tokio::test]
    async fn http_probe_reads_a_long_response_to_its_end_for_a_normal_close() {
        let (addr, served) = responder(Reply::LongBody(MAX_DRAIN / 2)).await;
        probe(addr, &http_check(PATIENT)).await.expect("200 is in 200-399");
        let served = served.await.expect("responder panicked");
        assert_eq!(served.close.expect("a normal close, not a reset"), 0);
    }

    #[tokio::test]
    async fn http_probe_fails_on_500_naming_status_and_range() {
        let (addr, _served) = responder(Reply::Bytes(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")).await;
        let err = probe(addr, &http_check(PATIENT)).await.expect_err("500 is not in 200-399");
        assert!(matches!(err, ProbeError::Status { status: 500, lo: 200, hi: 399, .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("500") && text.contains("200-399") && text.contains("/healthz"), "{text}");
    }

    #[tokio::test]
    async fn http_probe_fails_on_garbage() {
        let (addr, _served) = responder(Reply::Bytes(b"SSH-2.0-OpenSSH_9.6\r\n")).await;
        let err = probe(addr, &http_check(PATIENT)).await.expect_err("not HTTP");
        assert!(matches!(&err, ProbeError::BadStatusLine { line } if line == "SSH-2.0-OpenSSH_9.6\\r"), "{err:?}");
    }

    #[tokio::test]
    async fn http_probe_fails_at_once_on_garbage_without_newline_or_close() {
        // A TLS alert, as a TLS port answers plain text; the connection stays open.
        let (addr, _served) = responder(Reply::BytesThenHold(b"\x15\x03\x03\x00\x02\x02\x28")).await;
        let err = probe(addr, &http_check(PATIENT)).await.expect_err("not HTTP");
        assert!(matches!(&err, ProbeError::BadStatusLine { line } if line == "\\x15\\x03\\x03\\x00\\x02\\x02("), "{err:?}");
    }

    #[tokio::test]
    async fn http_probe_fails_when_the_backend_closes_without_a_status_line() {
        let (addr, _served) = responder(Reply::Bytes(b"HTTP/1.1 200")).await;
        let err = probe(addr, &http_check(PATIENT)).await.expect_err("no full line");
        assert!(matches!(err, ProbeError::NoStatusLine { received: 12 }), "{err:?}");
    }

    #[tokio::test]
    async fn http_probe_times_out_on_silence() {
        let (addr, served) = responder(Reply::Silence).await;
        let started = Instant::now();
        let err = probe(addr, &http_check(SHORT)).await.expect_err("no answer");
        assert!(matches!(err, ProbeError::StatusTimeout { timeout: SHORT }), "{err:?}");
        assert!(started.elapsed() >= SHORT && started.elapsed() < PATIENT, "{:?}", started.elapsed());
        let served = served.await.expect("responder panicked");
        assert!(served.request.starts_with(b"GET /healthz "), "the request was sent");
    }

    #[tokio::test]
    async fn http_probe_bounds_an_endless_status_line() {
        let (addr, served) = responder(Reply::Endless).await;
        let err = probe(addr, &http_check(PATIENT)).await.expect_err("no end of line");
        assert!(matches!(err, ProbeError::StatusLineTooLong { limit: MAX_STATUS_LINE }), "{err:?}");
        let sent = served.await.expect("responder panicked").close.expect("count");
        assert!(sent < RESPONDER_CAP, "the prober kept reading: the responder hit its cap");
    }

    #[tokio::test]
    async fn http_probe_refuses_unsendable_path_or_host_before_connecting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let cases = [("/a b", None, "path"), ("healthz", None, "path"), ("/", Some("x\r\nEvil: 1"), "host")];
        for (path, host, what) in cases {
            let mut check = http_check(PATIENT);
            check.http = Some(HttpCheck { path: path.into(), host: host.map(Into::into), expect: (200, 299) });
            let err = probe(addr, &check).await.expect_err("unsendable");
            assert!(matches!(err, ProbeError::InvalidRequest { what: w, .. } if w == what), "{err:?}");
        }
        let nothing = timeout(SHORT, listener.accept()).await;
        assert!(nothing.is_err(), "a probe connected although its request could not be sent");
    }

    // ---- run, passive checks, logs ----

    #[test]
    fn transition_lines_name_target_state_count_and_cause() {
        let label = "route=intranet backend=10.0.0.7:443";
        assert_eq!(
            transition_line(label, Transition::Down, 2, 3, &"connect refused"),
            "health route=intranet backend=10.0.0.7:443 state=down after 3 failed checks: connect refused"
        );
        assert_eq!(
            transition_line(label, Transition::Up, 2, 3, &""),
            "health route=intranet backend=10.0.0.7:443 state=up after 2 passed checks"
        );
    }

    #[test]
    fn passive_failures_count_and_mark_down() {
        let t = target(SocketAddr::from(([127, 0, 0, 1], 9)));
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        passive_failure(&*t, 2, 2, &refused);
        assert!(t.health.is_up());
        passive_failure(&*t, 2, 2, &refused);
        assert!(!t.health.is_up());
        passive_failure(&*t, 2, 2, &refused);
        assert_eq!((t.health.transitions(), t.health.checks_failed()), (1, 3));
    }

    #[test]
    fn spread_is_deterministic_below_the_interval_and_differs_per_backend() {
        // Long enough that 33 phases in whole milliseconds need not collide by chance.
        let interval = Duration::from_secs(3600);
        let addrs: Vec<SocketAddr> = (0..16u16)
            .map(|i| SocketAddr::from(([10, 0, 0, 7], 443 + i)))
            .chain((0..16u8).map(|i| SocketAddr::from(([10, 0, 1, i], 443))))
            .chain([SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 443))])
            .collect();
        let mut offsets: Vec<_> = addrs.iter().map(|&a| spread(a, interval)).collect();
        for (&a, &o) in addrs.iter().zip(&offsets) {
            assert!(o < interval, "{a}: {o:?}");
            assert_eq!(spread(a, interval), o, "{a}: not deterministic");
        }
        offsets.sort();
        offsets.dedup();
        assert_eq!(offsets.len(), addrs.len(), "two backends share a phase");
        assert_eq!(spread(addrs[0], Duration::ZERO), Duration::ZERO);
        // Neighbouring backends spread over the interval rather than bunching in one part.
        let short = Duration::from_secs(2);
        for quarter in 0..4 {
            let part = short / 4 * quarter..short / 4 * (quarter + 1);
            assert!(addrs.iter().any(|&a| part.contains(&spread(a, short))), "no phase in {part:?}");
        }
    }

    /// Starts [`run_with`] over a scripted probe; each call reports its start time.
    fn scripted(
        t: &Arc<TestTarget>,
        check: Check,
        script: Vec<(Duration, bool)>,
    ) -> (CancellationToken, mpsc::UnboundedReceiver<Instant>, JoinHandle<()>) {
        let stop = CancellationToken::new();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut calls = 0;
        let probe = move |_addr| {
            let (slow, ok) = script.get(calls).copied().unwrap_or((Duration::ZERO, true));
            calls += 1;
            tx.send(Instant::now()).expect("test gone");
            async move {
                tokio::time::sleep(slow).await;
                if ok { Ok(()) } else { Err(ProbeError::NoStatusLine { received: 0 }) }
            }
        };
        let task = tokio::spawn({
            let (t, stop) = (Arc::clone(t), stop.clone());
            async move { run_with(t, &check, stop, probe).await }
        });
        (stop, rx, task)
    }

    #[tokio::test(start_paused = true)]
    async fn run_probes_at_once_then_on_a_spread_grid_and_a_slow_probe_delays_the_next() {
        let t = target(SocketAddr::from(([10, 0, 0, 7], 443)));
        let interval = Duration::from_secs(2);
        let slow = interval + interval / 2;
        let check = Check { interval, ..Check::default() };
        let script = vec![(Duration::ZERO, true), (Duration::ZERO, true), (slow, true)];
        let (stop, mut starts, task) = scripted(&t, check, script);
        let mut at = Vec::new();
        for _ in 0..5 {
            at.push(timeout(PATIENT * 10, starts.recv()).await.expect("probe due").expect("runner gone"));
        }
        stop.cancel();
        timeout(PATIENT, task).await.expect("run stops").expect("run panicked");
        let offset = spread(t.addr, interval);
        assert!(offset > Duration::ZERO, "this address should have a phase");
        let since: Vec<_> = at.iter().map(|&a| a - at[0]).collect();
        let grid = |k: u32| interval * k + offset;
        assert_eq!(since, [Duration::ZERO, grid(1), grid(2), grid(2) + slow, grid(2) + slow + interval]);
    }

    #[tokio::test(start_paused = true)]
    async fn run_raises_a_zero_interval() {
        let t = target(SocketAddr::from(([10, 0, 0, 7], 443)));
        let (stop, mut starts, task) = scripted(&t, Check { interval: Duration::ZERO, ..Check::default() }, vec![]);
        let first = starts.recv().await.expect("first probe");
        let second = starts.recv().await.expect("second probe");
        stop.cancel();
        timeout(PATIENT, task).await.expect("run stops").expect("run panicked");
        assert_eq!(second - first, MIN_INTERVAL + spread(t.addr, MIN_INTERVAL));
    }

    #[tokio::test(start_paused = true)]
    async fn run_stops_promptly_while_waiting_and_while_probing() {
        let interval = Duration::from_secs(3600);
        let t = target(SocketAddr::from(([10, 0, 0, 7], 443)));
        // While waiting for the next probe.
        let (stop, mut starts, task) = scripted(&t, Check { interval, ..Check::default() }, vec![]);
        let first = starts.recv().await.expect("first probe at once");
        stop.cancel();
        timeout(PATIENT, task).await.expect("run stops").expect("run panicked");
        assert!(first.elapsed() < interval, "run waited for the next probe before stopping");
        assert!(starts.try_recv().is_err(), "probed after the stop");
        // While a probe hangs.
        let (stop, mut starts, task) = scripted(&t, Check { interval, ..Check::default() }, vec![(interval * 10, true)]);
        let first = starts.recv().await.expect("first probe at once");
        stop.cancel();
        timeout(PATIENT, task).await.expect("run stops").expect("run panicked");
        assert!(first.elapsed() < interval, "run waited for the hanging probe");
    }

    /// Serves probes one by one on loopback: each request is handed to the test with a sender
    /// for the status to answer, so the test sees every probe and decides its result.
    async fn gated_responder() -> (SocketAddr, mpsc::Receiver<oneshot::Sender<u16>>) {
        const MAX_PROBES: usize = 64;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            for _ in 0..MAX_PROBES {
                let Ok(Ok((mut conn, _))) = timeout(PATIENT, listener.accept()).await else { return };
                read_request(&mut conn).await;
                let (answer, status) = oneshot::channel();
                if tx.send(answer).await.is_err() {
                    return;
                }
                let Ok(status) = status.await else { return };
                let head = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                if conn.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn run_goes_down_after_fall_bad_probes_and_up_after_rise_good_ones() {
        let (addr, mut probes) = gated_responder().await;
        let t = target(addr);
        let check = Check { interval: Duration::from_millis(10), rise: 2, fall: 3, ..http_check(PATIENT) };
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(Arc::clone(&t), check, stop.clone()));
        // (status answered, state expected once it is recorded), with rise 2 and fall 3.
        let script = [
            (200, true),
            (500, true),
            (200, true),
            (500, true),
            (500, true),
            (500, false), // the third 500 in a row
            (500, false),
            (200, false),
            (500, false),
            (200, false),
            (200, true), // the second 200 in a row
            (200, true),
        ];
        let mut up = true;
        for (n, &(status, up_after)) in script.iter().enumerate() {
            let answer = timeout(PATIENT, probes.recv()).await.expect("probe due").expect("responder gone");
            assert_eq!(t.health.is_up(), up, "before probe {}", n + 1);
            answer.send(status).expect("responder gone");
            up = up_after;
        }
        // The next probe comes after the last result was recorded; it hangs until the stop.
        let _hanging = timeout(PATIENT, probes.recv()).await.expect("probe due").expect("responder gone");
        assert_eq!(t.health.is_up(), up);
        assert_eq!(t.health.transitions(), 2);
        assert_eq!(t.health.checks_failed(), script.iter().filter(|(s, _)| *s == 500).count() as u64);
        stop.cancel();
        timeout(PATIENT, task).await.expect("run stops mid-probe").expect("run panicked");
    }
}
