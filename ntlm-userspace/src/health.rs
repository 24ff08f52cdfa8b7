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
}

impl Default for Check {
    /// A TCP check every [`DEFAULT_INTERVAL`], with [`DEFAULT_TIMEOUT`], [`DEFAULT_RISE`] and
    /// [`DEFAULT_FALL`].
    fn default() -> Self {
        Self { interval: DEFAULT_INTERVAL, timeout: DEFAULT_TIMEOUT, rise: DEFAULT_RISE, fall: DEFAULT_FALL, http: None }
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
    let deadline = Instant::now() + check.timeout;
    let mut stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Err(_elapsed) => return Err(ProbeError::ConnectTimeout { addr, timeout: check.timeout }),
        Ok(Err(source)) if source.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(ProbeError::Refused { addr, source });
        }
        Ok(Err(source)) => return Err(ProbeError::Connect { addr, source }),
        Ok(Ok(stream)) => stream,
    };
    let Some(http) = &check.http else {
        return Ok(());
    };
    let req = request(addr, http)?;
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

/// The phase of a backend's probes within the interval: FNV-1a (64-bit) over the address's
/// IP octets and its port (big-endian), modulo the interval in nanoseconds. Deterministic (the
/// same backend keeps its phase across reloads and restarts), no randomness, always below
/// `interval`.
fn spread(addr: SocketAddr, interval: Duration) -> Duration {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let hash =
        ip.iter().chain(&addr.port().to_be_bytes()).fold(FNV_OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME));
    let nanos = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 { Duration::ZERO } else { Duration::from_nanos(hash % nanos) }
}
