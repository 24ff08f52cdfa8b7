//! The config file (`--config FILE`): its TOML format, the validated model the server runs
//! from, and every check that needs no network.
//!
//! Every key is documented in the shipped example, `docs/examples/ntlm-splice.toml` (a test
//! parses it). Reading takes two steps, as in rathole's `config.rs`: serde reads the text into
//! `Raw*` structs that mirror it (every table `deny_unknown_fields`, every value `Spanned` so
//! its line is known), then a checker validates them, collecting every problem (not only
//! the first), each with the file, the line, the key and the fix, and builds the
//! [`FileConfig`].
//!
//! Note for the server: host names are NOT resolved here. A backend stays a [`BackendAddr`]
//! (host text and port); the server resolves them on start and again on each reload, so
//! `ntlm-splice check` needs no DNS and a reload picks up changed DNS records. Two other things
//! are left to the server as well: whether addresses such as `0.0.0.0:443` and `10.0.0.1:443`
//! can both be bound (the kernel says), and which `sni` pattern wins when an exact name and a
//! `*.` wildcard both match (nginx and HAProxy users expect the exact name).

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{Ipv6Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::ValueEnum;
use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

use crate::{
    guard::GuardSpec,
    identity::{DEFAULT_ACCEPT_PROXY_TIMEOUT, ProxyVersion, Source, parse_proxy_version},
    proxy_proto::Trusted,
};

use super::{
    Balance, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_INFLIGHT_TOTAL, DEFAULT_PARK_AFTER, DEFAULT_PIPE_SIZE, DEFAULT_SOCKMAP_SNDBUF,
    EngineChoice, MAX_PIPE_SIZE, MAX_SOCKMAP_SNDBUF, MAX_THREADS, parse_bytes, parse_duration,
};

/// Default engine of a route (the CLI's `--engine` default).
pub const DEFAULT_ENGINE: EngineChoice = EngineChoice::Auto;
/// Default balancing policy of a route (the CLI's `--balance` default).
pub const DEFAULT_BALANCE: Balance = Balance::RoundRobin;
/// Default most time a connection stays half-open after one side's FIN: `0`, no limit.
pub const DEFAULT_HALF_CLOSE_TIMEOUT: &str = "0";
/// Default time a client on an SNI listener gets to send its whole TLS ClientHello.
pub const DEFAULT_SNI_TIMEOUT: &str = "5s";
/// Default time between two health probes of one backend (HAProxy's `inter` default).
pub const DEFAULT_HEALTH_INTERVAL: &str = "2s";
/// Default successful probes in a row that mark a down backend up (HAProxy's `rise` default).
pub const DEFAULT_HEALTH_RISE: u32 = 2;
/// Default failed probes in a row that mark an up backend down (HAProxy's `fall` default).
pub const DEFAULT_HEALTH_FALL: u32 = 3;
/// Default denied logins within the window that block an address or a user (below AD's
/// common lockout thresholds of 5-10, so the guard acts before the directory locks the
/// account).
pub const DEFAULT_GUARD_MAX_FAILURES: u32 = 5;
/// Default window denied logins are counted in.
pub const DEFAULT_GUARD_WINDOW: &str = "5m";
/// Default length of a block.
pub const DEFAULT_GUARD_BLOCK_FOR: &str = "15m";
/// Default path of the HTTP probe.
pub const DEFAULT_HTTP_PATH: &str = "/";
/// Default status codes an HTTP probe accepts, inclusive: 2xx and 3xx, as HAProxy's
/// `option httpchk` and nginx's `check_http_expect_alive` do by default.
pub const DEFAULT_HTTP_EXPECT: (u16, u16) = (200, 399);
/// Lowest HTTP status code `expect` may name.
pub const MIN_HTTP_STATUS: u16 = 100;
/// Highest HTTP status code `expect` may name.
pub const MAX_HTTP_STATUS: u16 = 599;
/// Smallest kernel byte limit (`max_inflight`, a non-zero `sockmap_sndbuf` or `pipe_size`):
/// one loopback segment, as the CLI checks.
pub const MIN_KERNEL_BYTES: u64 = 64 << 10;
/// Longest DNS name an `sni` pattern may be, without a trailing dot (RFC 1035).
pub const MAX_DNS_NAME_LEN: usize = 253;
/// Longest label of a DNS name (RFC 1035).
pub const MAX_DNS_LABEL_LEN: usize = 63;
/// Where the annotated example of the format lives in the repository (named in fixes).
pub const EXAMPLE_PATH: &str = "docs/examples/ntlm-splice.toml";

/// A validated config file: everything the server needs to run, host names not yet resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct FileConfig {
    /// Process-wide settings (`[global]`); a reload cannot change them.
    pub global: Global,
    /// The routes (`[[route]]`), in file order; at least one, names unique.
    pub routes: Vec<RouteSpec>,
    /// The metrics endpoint (`[metrics]`); a reload cannot change it.
    pub metrics: MetricsSpec,
}

/// The metrics endpoint, `[metrics]` (or `--metrics-listen`). Read at start only, as
/// [`Global`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSpec {
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: nowhere. Never one of
    /// the routes' listen addresses (port 0 aside).
    pub listen: Option<SocketAddr>,
}

/// Process-wide settings, `[global]`. Read at start only: a reload that changes one logs that
/// a restart is needed and keeps the old value (see [`super::diff::Plan::restart_needed`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    /// On SIGTERM/SIGINT, time live connections get to finish before they are closed.
    pub drain_timeout: Duration,
    /// Most concurrent client connections, all routes together (at least 1).
    pub max_connections: usize,
    /// Worker threads; `None`: one per CPU.
    pub threads: Option<usize>,
    /// sockmap engine: most bytes in the kernel between the two sockets of one connection.
    pub max_inflight: u64,
    /// sockmap engine: most in-flight bytes summed over all connections (≥ `max_inflight`).
    pub max_inflight_total: u64,
    /// sockmap engine: send buffer of both sockets of a connection; 0: kernel autotuning.
    pub sockmap_sndbuf: u64,
    /// splice engine: capacity of each direction's pipe; 0: the kernel's default.
    pub pipe_size: u64,
    /// The user to switch to once listeners are bound and engines loaded; `None`: keep the
    /// user the process was started as (see `crate::privilege`).
    pub user: Option<String>,
    /// The group to switch to with `user`; `None`: the user's primary group.
    pub group: Option<String>,
    /// sockmap engine: run it even on a kernel with a known sockmap defect that the engine
    /// meets (`engine::sockmap::kernels`), e.g. where a distribution backported the fix.
    pub sockmap_allow_affected_kernel: bool,
}

/// One route (`[[route]]`): the listeners it owns, its backend pool and its options.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    /// Unique name, `[A-Za-z0-9_.-]+`; names the route in logs and reloads.
    pub name: String,
    /// Addresses to accept clients on (at least one, no repeats). Port 0 picks a free port.
    pub listen: Vec<SocketAddr>,
    /// Backends, in file order (at least one, no repeats); resolved by the server.
    pub backends: Vec<BackendAddr>,
    /// Server names (TLS SNI) that choose this route on a listen address it shares with
    /// other routes: exact names or `*.` wildcards, lowercased, without a trailing dot.
    /// Empty: the route is the default for its addresses.
    pub sni: Vec<String>,
    /// Route options: `[defaults]` overridden by the route's own keys.
    pub options: RouteOptions,
    /// Active health checks; `None`: none (passive checks only).
    pub health: Option<HealthSpec>,
    /// The failed-login guard (`[route.guard]`); `None`: off.
    pub guard: Option<GuardSpec>,
}

/// A backend as written in the file: a host name or IP address and a port, not resolved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendAddr {
    /// Host name or IP address, without brackets around an IPv6 address.
    pub host: String,
    /// TCP port, 1 to 65535.
    pub port: u16,
}

impl BackendAddr {
    /// The `host:port` text to resolve (IPv6 addresses in brackets), e.g. for
    /// `tokio::net::lookup_host`.
    pub fn spec(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The options of a route: `[defaults]` and every `[[route]]` may set any of them.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteOptions {
    /// Data engine.
    pub engine: EngineChoice,
    /// Backend selection policy.
    pub balance: Balance,
    /// Time allowed for each backend connect before the next backend is tried (> 0).
    pub connect_timeout: Duration,
    /// Close both sides after this long with no byte either way; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// splice engine: park a connection after this long without a byte; `None`: never.
    pub park_after: Option<Duration>,
    /// After one side's FIN, most time the connection may stay half-open; `None`: no limit.
    pub half_close_timeout: Option<Duration>,
    /// How long a client on an SNI listener may take to send its ClientHello (> 0).
    pub sni_timeout: Duration,
    /// Where backend connections are made from; `None`: the kernel picks the address.
    pub source: Option<Source>,
    /// The PROXY header sent before the client's bytes; `None`: none.
    pub proxy_protocol: Option<ProxyVersion>,
    /// Sources that must start with a PROXY header (an outer balancer); empty: none.
    pub accept_proxy_from: Trusted,
    /// How long a source in `accept_proxy_from` may take to send its header (> 0).
    pub accept_proxy_timeout: Duration,
    /// Read the NTLM handshake of plain-HTTP clients (not TLS) before the engine takes over.
    pub ntlm_observe: bool,
}

/// Active health checks of a route's backends (`[route.health]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSpec {
    /// Time between two probes of one backend (> 0).
    pub interval: Duration,
    /// Time one probe may take (> 0); by default the smaller of `interval` and the route's
    /// `connect_timeout`.
    pub timeout: Duration,
    /// Successful probes in a row that mark a down backend up (≥ 1).
    pub rise: u32,
    /// Failed probes in a row that mark an up backend down (≥ 1).
    pub fall: u32,
    /// The HTTP probe; `None`: a TCP connect is the probe.
    pub http: Option<HttpCheckSpec>,
}

/// An HTTP probe: `GET path` with `Host: host`, healthy if the status is in `expect`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpCheckSpec {
    /// Request path: starts with `/`, no whitespace or control characters.
    pub path: String,
    /// `Host` header; `None`: the backend's host as written in `backends`.
    pub host: Option<String>,
    /// Accepted status codes, an inclusive range within 100..=599.
    pub expect: (u16, u16),
}

impl Default for Global {
    /// The CLI's defaults.
    fn default() -> Self {
        Self {
            drain_timeout: default_duration(DEFAULT_DRAIN_TIMEOUT),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            threads: None,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_inflight_total: DEFAULT_MAX_INFLIGHT_TOTAL,
            sockmap_sndbuf: DEFAULT_SOCKMAP_SNDBUF,
            pipe_size: DEFAULT_PIPE_SIZE,
            user: None,
            group: None,
            sockmap_allow_affected_kernel: false,
        }
    }
}

impl Default for RouteOptions {
    /// The CLI's defaults.
    fn default() -> Self {
        Self {
            engine: DEFAULT_ENGINE,
            balance: DEFAULT_BALANCE,
            connect_timeout: default_duration(DEFAULT_CONNECT_TIMEOUT),
            idle_timeout: nonzero(default_duration(DEFAULT_IDLE_TIMEOUT)),
            park_after: nonzero(default_duration(DEFAULT_PARK_AFTER)),
            half_close_timeout: nonzero(default_duration(DEFAULT_HALF_CLOSE_TIMEOUT)),
            sni_timeout: default_duration(DEFAULT_SNI_TIMEOUT),
            source: None,
            proxy_protocol: None,
            accept_proxy_from: Trusted::default(),
            accept_proxy_timeout: default_duration(DEFAULT_ACCEPT_PROXY_TIMEOUT),
            ntlm_observe: true,
        }
    }
}

/// One thing wrong in a config file, rendered on one line as
/// `FILE:LINE: [SCOPE: ]KEY: MESSAGE`, the message ending with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file, as given to [`load`] or [`parse`].
    pub origin: String,
    /// 1-based line of the offending key or value (of the table when a key is missing).
    pub line: usize,
    /// The route at fault, as `route "name"` (or `route #N` when it has no usable name);
    /// empty outside routes.
    pub scope: String,
    /// The key at fault, dotted from its table (`global.max_inflight`, `health.rise`);
    /// empty when the text around a syntax error names none.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.origin, self.line)?;
        if !self.scope.is_empty() {
            write!(f, "{}: ", self.scope)?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// A config file that cannot be used, with every reason found; `Display` gives one line per
/// problem, each naming the file, the line, the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("{}: cannot read the config file ({cause}); check the path and that this user may read it", path.display())]
    Read {
        /// The path given.
        path: PathBuf,
        /// Why the read failed (in the message already, so not also the error's source:
        /// `{:#}` would print it twice).
        cause: std::io::Error,
    },
    /// Not UTF-8, not TOML, or a key or value of the wrong name or type. The TOML parser stops
    /// at the first such problem, so there is one.
    #[error("{problem}")]
    Syntax {
        /// The problem, its line taken from the parser's span.
        problem: Problem,
        /// The parser's own error, when it came from the TOML parser. Deliberately not the
        /// `source()`: its `Display` spans several lines and repeats `problem`.
        toml: Option<Box<toml::de::Error>>,
    },
    /// Well-formed TOML that breaks the rules: every problem found, in file order.
    #[error("{}", problems.iter().map(Problem::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The problems (at least one).
        problems: Vec<Problem>,
    },
}

impl FileError {
    /// The problems found in the text: none for a read error.
    pub fn problems(&self) -> &[Problem] {
        match self {
            FileError::Read { .. } => &[],
            FileError::Syntax { problem, .. } => std::slice::from_ref(problem),
            FileError::Invalid { problems } => problems,
        }
    }
}

/// Reads and validates the config file at `path`; problems name it as given.
pub fn load(path: &Path) -> Result<FileConfig, FileError> {
    let bytes = std::fs::read(path).map_err(|cause| FileError::Read { path: path.to_owned(), cause })?;
    let origin = path.display().to_string();
    match String::from_utf8(bytes) {
        Ok(text) => parse(&text, &origin),
        Err(e) => {
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
            let message = "the file is not valid UTF-8 here; save it as UTF-8".to_owned();
            Err(FileError::Syntax {
                problem: Problem { origin, line, scope: String::new(), key: String::new(), message },
                toml: None,
            })
        }
    }
}

/// Validates config file `text`; `origin` names the file in problems (e.g. its path).
pub fn parse(text: &str, origin: &str) -> Result<FileConfig, FileError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| syntax_error(text, origin, e))?;
    let mut checker = Checker { text, origin, problems: Vec::new() };
    let config = checker.file(&raw);
    if checker.problems.is_empty() {
        Ok(config)
    } else {
        checker.problems.sort_by_key(|p| p.line);
        Err(FileError::Invalid { problems: checker.problems })
    }
}

// ---------------------------------------------------------------------------------------------
// The text as serde reads it.

/// The whole file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    global: Option<RawGlobal>,
    metrics: Option<Spanned<RawMetrics>>,
    defaults: Option<RawOptions>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
}

/// `[metrics]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

/// `[global]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    drain_timeout: Option<Spanned<DurationText>>,
    max_connections: Option<Spanned<i64>>,
    threads: Option<Spanned<i64>>,
    max_inflight: Option<Spanned<SizeText>>,
    max_inflight_total: Option<Spanned<SizeText>>,
    sockmap_sndbuf: Option<Spanned<SizeText>>,
    pipe_size: Option<Spanned<SizeText>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    sockmap_allow_affected_kernel: Option<bool>,
}

/// `[defaults]` as written; the same keys as the options part of [`RawRoute`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    engine: Option<Spanned<String>>,
    balance: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<DurationText>>,
    idle_timeout: Option<Spanned<DurationText>>,
    park_after: Option<Spanned<DurationText>>,
    half_close_timeout: Option<Spanned<DurationText>>,
    sni_timeout: Option<Spanned<DurationText>>,
    source: Option<Spanned<String>>,
    proxy_protocol: Option<Spanned<String>>,
    accept_proxy_from: Option<SpannedList>,
    accept_proxy_timeout: Option<Spanned<DurationText>>,
    ntlm_observe: Option<Spanned<bool>>,
}

/// A list of strings, each with its place, the list with its own.
type SpannedList = Spanned<Vec<Spanned<String>>>;

/// One `[[route]]` as written. The option keys repeat [`RawOptions`]: serde's `flatten` cannot
/// be combined with `deny_unknown_fields`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<Spanned<String>>,
    listen: Option<SpannedList>,
    backends: Option<SpannedList>,
    sni: Option<SpannedList>,
    health: Option<Spanned<RawHealth>>,
    guard: Option<Spanned<RawGuard>>,
    engine: Option<Spanned<String>>,
    balance: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<DurationText>>,
    idle_timeout: Option<Spanned<DurationText>>,
    park_after: Option<Spanned<DurationText>>,
    half_close_timeout: Option<Spanned<DurationText>>,
    sni_timeout: Option<Spanned<DurationText>>,
    source: Option<Spanned<String>>,
    proxy_protocol: Option<Spanned<String>>,
    accept_proxy_from: Option<SpannedList>,
    accept_proxy_timeout: Option<Spanned<DurationText>>,
    ntlm_observe: Option<Spanned<bool>>,
}

impl RawRoute {
    /// The route's own option keys.
    fn options(&self) -> RawOptions {
        RawOptions {
            engine: self.engine.clone(),
            balance: self.balance.clone(),
            connect_timeout: self.connect_timeout.clone(),
            idle_timeout: self.idle_timeout.clone(),
            park_after: self.park_after.clone(),
            half_close_timeout: self.half_close_timeout.clone(),
            sni_timeout: self.sni_timeout.clone(),
            source: self.source.clone(),
            proxy_protocol: self.proxy_protocol.clone(),
            accept_proxy_from: self.accept_proxy_from.clone(),
            accept_proxy_timeout: self.accept_proxy_timeout.clone(),
            ntlm_observe: self.ntlm_observe.clone(),
        }
    }
}

/// `[route.guard]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuard {
    max_failures: Option<Spanned<i64>>,
    window: Option<Spanned<DurationText>>,
    block_for: Option<Spanned<DurationText>>,
}

/// `[route.health]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval: Option<Spanned<DurationText>>,
    timeout: Option<Spanned<DurationText>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    http: Option<Spanned<RawHttp>>,
}

/// `http = { ... }` of `[route.health]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    expect: Option<Spanned<ExpectText>>,
}

/// A duration as written: a string, parsed later so its problem can name the key.
#[derive(Debug, Clone)]
struct DurationText(String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a duration in quotes, e.g. "5s", "500ms", "1h" or "0""#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_owned()))
            }
        }
        d.deserialize_str(V)
    }
}

/// A byte size as written: an integer (bytes) or a string with a unit ("4MiB").
#[derive(Debug, Clone)]
enum SizeText {
    /// `max_inflight = 4194304`
    Int(i64),
    /// `max_inflight = "4MiB"`
    Text(String),
}

impl<'de> Deserialize<'de> for SizeText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = SizeText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a size: a number of bytes or a string such as "512KiB", "4MiB" or "1GiB""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SizeText, E> {
                Ok(SizeText::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SizeText, E> {
                Ok(i64::try_from(v).map_or(SizeText::Text(v.to_string()), SizeText::Int))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SizeText, E> {
                Ok(SizeText::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// An HTTP `expect` as written: `"2xx"`, `"200"`, `"200-399"`, or a bare integer code.
#[derive(Debug, Clone)]
struct ExpectText(String);

impl<'de> Deserialize<'de> for ExpectText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ExpectText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"status codes in quotes, e.g. "2xx", "200" or "200-399""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ExpectText, E> {
                Ok(ExpectText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ExpectText, E> {
                Ok(ExpectText(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ExpectText, E> {
                Ok(ExpectText(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Syntax errors: the parser's message, with the line and key found from its span.

/// Turns the TOML parser's error into a one-line problem with its line, key and a fix.
fn syntax_error(text: &str, origin: &str, e: toml::de::Error) -> FileError {
    let start = e.span().map_or(0, |s| s.start);
    let line = line_of(text, start);
    let key = key_at(text, start);
    let message = match unknown_key(e.message()) {
        Some((name, valid)) => {
            format!("unknown key `{name}`; valid keys here: {valid} (remove it or correct its spelling)")
        }
        // `[route]` instead of `[[route]]`: serde's words would not say so.
        None if key == "route" && e.message().contains("expected a sequence") => {
            "a route is written [[route]], with two brackets, once per route".to_owned()
        }
        None => format!("{}; see {EXAMPLE_PATH} for every key and how to write it", e.message()),
    };
    FileError::Syntax {
        problem: Problem { origin: origin.to_owned(), line, scope: String::new(), key, message },
        toml: Some(Box::new(e)),
    }
}

/// The unknown key and the valid ones from serde's "unknown field `x`, expected one of `a`,
/// `b`" (or "expected `a`"), or `None` for any other message.
fn unknown_key(message: &str) -> Option<(&str, String)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (name, rest) = rest.split_once('`')?;
    let valid = rest.strip_prefix(", expected ")?;
    let valid = valid.strip_prefix("one of ").unwrap_or(valid);
    Some((name, valid.replace('`', "")))
}

/// 1-based line of byte offset `at` in `text`, clamped to the text's lines.
fn line_of(text: &str, at: usize) -> usize {
    let at = at.min(text.len());
    let line = 1 + text.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
    // An offset just past a final newline belongs to no line of its own.
    line.min(text.lines().count().max(1))
}

/// The dotted key at byte offset `at` of `text`, as far as the text shows it: the nearest
/// table header above (`route.health`) joined with the key its line assigns, if any.
fn key_at(text: &str, at: usize) -> String {
    let mut at = at.min(text.len());
    // As in `line_of`: the end of a text ending in a newline is on its last line.
    if at == text.len() && text.ends_with('\n') {
        at -= 1;
    }
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let header_of = |l: &str| {
        let l = l.trim();
        l.strip_prefix('[').map(|h| h.trim_start_matches('[').split(']').next().unwrap_or("").trim().to_owned())
    };
    if let Some(h) = header_of(line) {
        return h;
    }
    let table = text[..line_start].lines().rev().find_map(header_of).unwrap_or_default();
    let assigned = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| {
        !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | ' '))
    });
    match (table.is_empty(), assigned) {
        (_, None) => table,
        (true, Some(k)) => k.to_owned(),
        (false, Some(k)) => format!("{table}.{k}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.

/// Validates the raw file, collecting every problem, and builds the model.
struct Checker<'a> {
    /// The whole text, to turn spans into lines.
    text: &'a str,
    /// The file's name in problems.
    origin: &'a str,
    /// Problems found so far.
    problems: Vec<Problem>,
}

/// Where a checked value lives: its route (or none) and the prefix of its key.
#[derive(Clone, Copy)]
struct Scope<'s> {
    /// `route "name"`, or empty outside routes.
    route: &'s str,
    /// Prefix of the key, e.g. `global.`, `defaults.`, `health.` or empty.
    prefix: &'s str,
}

impl Checker<'_> {
    /// Records a problem at `span`.
    fn report(&mut self, span: &Range<usize>, scope: Scope<'_>, key: &str, message: String) {
        self.problems.push(Problem {
            origin: self.origin.to_owned(),
            line: line_of(self.text, span.start),
            scope: scope.route.to_owned(),
            key: format!("{}{key}", scope.prefix),
            message,
        });
    }

    /// A duration value; `zero_ok: false` rejects "0" with `example` as the fix.
    fn duration(
        &mut self,
        v: &Spanned<DurationText>,
        scope: Scope<'_>,
        key: &str,
        zero_ok: bool,
        example: &str,
    ) -> Option<Duration> {
        let text = &v.get_ref().0;
        match parse_duration(text) {
            Ok(d) if d.is_zero() && !zero_ok => {
                self.report(&v.span(), scope, key, format!("{text:?} must be greater than zero, e.g. {example:?}"));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.report(&v.span(), scope, key, format!("{text:?}: {e}"));
                None
            }
        }
    }

    /// A byte size value.
    fn size(&mut self, v: &Spanned<SizeText>, scope: Scope<'_>, key: &str) -> Option<u64> {
        let parsed = match v.get_ref() {
            SizeText::Int(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative; write e.g. \"4MiB\"")),
            SizeText::Text(t) => parse_bytes(t).map_err(|e| format!("{t:?}: {e}")),
        };
        parsed.map_err(|m| self.report(&v.span(), scope, key, m)).ok()
    }

    /// An integer that must lie in `lo..=hi`; `why` says the range and the fix.
    fn int_in(&mut self, v: &Spanned<i64>, scope: Scope<'_>, key: &str, lo: i64, hi: i64, why: &str) -> Option<i64> {
        let n = *v.get_ref();
        if (lo..=hi).contains(&n) {
            Some(n)
        } else {
            self.report(&v.span(), scope, key, format!("{n}: {why}"));
            None
        }
    }

    /// The whole file.
    fn file(&mut self, raw: &RawFile) -> FileConfig {
        let global = raw.global.as_ref().map_or_else(Global::default, |g| self.global(g));
        let defaults = match &raw.defaults {
            Some(d) => self.options(d, Scope { route: "", prefix: "defaults." }, &RouteOptions::default()),
            None => RouteOptions::default(),
        };
        if raw.route.is_empty() {
            self.problems.push(Problem {
                origin: self.origin.to_owned(),
                line: 1,
                scope: String::new(),
                key: "route".to_owned(),
                message: format!(
                    "the file has no [[route]]; add one with a name, listen and backends (see {EXAMPLE_PATH})"
                ),
            });
        }
        let mut routes = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, r) in raw.route.iter().enumerate() {
            routes.push(self.route(i, r, &defaults, &mut names));
        }
        self.shared_listeners(&raw.route, &routes);
        let metrics = raw.metrics.as_ref().map(|m| self.metrics(m, &raw.route, &routes)).unwrap_or_default();
        FileConfig { global, routes, metrics }
    }

    /// `[metrics]`; `routes` (and `raw`, for their lines) to refuse a shared address.
    fn metrics(&mut self, m: &Spanned<RawMetrics>, raw: &[Spanned<RawRoute>], routes: &[RouteSpec]) -> MetricsSpec {
        let s = Scope { route: "", prefix: "metrics." };
        let Some(v) = &m.get_ref().listen else {
            let fix = "missing; write e.g. listen = \"127.0.0.1:9100\", or remove [metrics] to serve no metrics";
            self.report(&m.span(), s, "listen", fix.into());
            return MetricsSpec::default();
        };
        let text = v.get_ref();
        let Ok(addr) = text.parse::<SocketAddr>() else {
            let m = format!(
                "{text:?} is not an ip:port address; write e.g. \"127.0.0.1:9100\" (host names are not accepted here)"
            );
            self.report(&v.span(), s, "listen", m);
            return MetricsSpec::default();
        };
        // Two sockets on one port 0 get two ports; any other shared address is a mistake.
        let clash = routes.iter().position(|r| addr.port() != 0 && r.listen.contains(&addr));
        if let Some(i) = clash {
            let m = format!(
                "{addr} is also a listen address of route {:?} (line {}); give the metrics endpoint an address \
                 of its own, e.g. \"127.0.0.1:9100\"",
                routes[i].name,
                line_of(self.text, raw[i].span().start),
            );
            self.report(&v.span(), s, "listen", m);
            return MetricsSpec::default();
        }
        MetricsSpec { listen: Some(addr) }
    }

    /// `[global]`.
    fn global(&mut self, g: &RawGlobal) -> Global {
        let s = Scope { route: "", prefix: "global." };
        let mut out = Global::default();
        if let Some(d) = g.drain_timeout.as_ref().and_then(|v| self.duration(v, s, "drain_timeout", true, "30s")) {
            out.drain_timeout = d;
        }
        if let Some(v) = &g.max_connections
            && let Some(n) = self.int_in(v, s, "max_connections", 1, i64::MAX, "must be at least 1, e.g. 4096")
        {
            out.max_connections = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(v) = &g.threads {
            let why = "must be from 1 to 1024; leave it out for one per CPU";
            let hi = i64::try_from(MAX_THREADS).unwrap_or(i64::MAX);
            if let Some(n) = self.int_in(v, s, "threads", 1, hi, why) {
                out.threads = usize::try_from(n).ok();
            }
        }
        if let Some(v) = &g.max_inflight
            && let Some(n) = self.size(v, s, "max_inflight")
        {
            if n < MIN_KERNEL_BYTES {
                let m = format!("{n}: must be at least 64KiB (one loopback segment), e.g. \"4MiB\"");
                self.report(&v.span(), s, "max_inflight", m);
            } else {
                out.max_inflight = n;
            }
        }
        if let Some(v) = &g.max_inflight_total
            && let Some(n) = self.size(v, s, "max_inflight_total")
        {
            out.max_inflight_total = n;
        }
        if out.max_inflight_total < out.max_inflight {
            // Report where the fix goes: the total if written, else the per-connection cap
            // that outgrew the default total.
            match (&g.max_inflight_total, &g.max_inflight) {
                (Some(t), _) => {
                    let m = format!(
                        "{}: must be at least global.max_inflight ({})",
                        out.max_inflight_total, out.max_inflight
                    );
                    self.report(&t.span(), s, "max_inflight_total", m);
                }
                (None, Some(i)) => {
                    let m = format!(
                        "{}: more than global.max_inflight_total ({} by default); set max_inflight_total at least as high",
                        out.max_inflight, DEFAULT_MAX_INFLIGHT_TOTAL
                    );
                    self.report(&i.span(), s, "max_inflight", m);
                }
                (None, None) => {}
            }
        }
        if let Some(v) = &g.sockmap_sndbuf
            && let Some(n) = self.size(v, s, "sockmap_sndbuf")
        {
            if n != 0 && !(MIN_KERNEL_BYTES..=MAX_SOCKMAP_SNDBUF).contains(&n) {
                let m = format!("{n}: must be 0 (kernel autotuning) or from 64KiB to 1GiB, e.g. \"8MiB\"");
                self.report(&v.span(), s, "sockmap_sndbuf", m);
            } else {
                out.sockmap_sndbuf = n;
            }
        }
        if let Some(v) = &g.pipe_size
            && let Some(n) = self.size(v, s, "pipe_size")
        {
            if n != 0 && !(MIN_KERNEL_BYTES..=MAX_PIPE_SIZE).contains(&n) {
                let m = format!("{n}: must be 0 (the kernel's default) or from 64KiB to 64MiB, e.g. \"1MiB\"");
                self.report(&v.span(), s, "pipe_size", m);
            } else {
                out.pipe_size = n;
            }
        }
        for (key, value, slot) in [("user", &g.user, &mut out.user), ("group", &g.group, &mut out.group)] {
            if let Some(v) = value {
                match account_name_problem(v.get_ref()) {
                    Some(why) => self.report(&v.span(), s, key, format!("{:?}: {why}", v.get_ref())),
                    None => *slot = Some(v.get_ref().clone()),
                }
            }
        }
        if let (Some(v), None) = (&g.group, &g.user) {
            let m = "group needs user: set `user` too (the group alone does not switch anything)".to_string();
            self.report(&v.span(), s, "group", m);
        }
        if let Some(v) = g.sockmap_allow_affected_kernel {
            out.sockmap_allow_affected_kernel = v;
        }
        out
    }

    /// Route options written in `raw`, each replacing its value in `base`.
    fn options(&mut self, raw: &RawOptions, s: Scope<'_>, base: &RouteOptions) -> RouteOptions {
        let mut out = base.clone();
        if let Some(v) = &raw.engine {
            match EngineChoice::from_str(v.get_ref(), false) {
                Ok(e) => out.engine = e,
                Err(_) => {
                    let m = format!("{:?} is not an engine; write one of {}", v.get_ref(), names::<EngineChoice>());
                    self.report(&v.span(), s, "engine", m);
                }
            }
        }
        if let Some(v) = &raw.balance {
            match Balance::from_str(v.get_ref(), false) {
                Ok(b) => out.balance = b,
                Err(_) => {
                    let m = format!("{:?} is not a balance policy; write one of {}", v.get_ref(), names::<Balance>());
                    self.report(&v.span(), s, "balance", m);
                }
            }
        }
        if let Some(d) = raw.connect_timeout.as_ref().and_then(|v| self.duration(v, s, "connect_timeout", false, "5s"))
        {
            out.connect_timeout = d;
        }
        if let Some(d) = raw.idle_timeout.as_ref().and_then(|v| self.duration(v, s, "idle_timeout", true, "1h")) {
            out.idle_timeout = nonzero(d);
        }
        if let Some(d) = raw.park_after.as_ref().and_then(|v| self.duration(v, s, "park_after", true, "2s")) {
            out.park_after = nonzero(d);
        }
        let half_close = raw.half_close_timeout.as_ref();
        if let Some(d) = half_close.and_then(|v| self.duration(v, s, "half_close_timeout", true, "1m")) {
            out.half_close_timeout = nonzero(d);
        }
        if let Some(d) = raw.sni_timeout.as_ref().and_then(|v| self.duration(v, s, "sni_timeout", false, "5s")) {
            out.sni_timeout = d;
        }
        if let Some(v) = &raw.source {
            match v.get_ref().parse::<Source>() {
                Ok(src) => out.source = Some(src),
                Err(e) => self.report(&v.span(), s, "source", e.to_string()),
            }
        }
        if let Some(v) = &raw.proxy_protocol {
            match parse_proxy_version(v.get_ref()) {
                Ok(p) => out.proxy_protocol = p,
                Err(e) => self.report(&v.span(), s, "proxy_protocol", e.to_string()),
            }
        }
        if let Some(list) = &raw.accept_proxy_from {
            let mut ok = true;
            for v in list.get_ref() {
                if let Err(e) = Trusted::parse([v.get_ref()]) {
                    self.report(&v.span(), s, "accept_proxy_from", e.to_string());
                    ok = false;
                }
            }
            if ok {
                // Each entry parsed alone above, so the whole list parses.
                out.accept_proxy_from = Trusted::parse(list.get_ref().iter().map(Spanned::get_ref)).unwrap_or_default();
            }
        }
        let accept_timeout = raw.accept_proxy_timeout.as_ref();
        if let Some(d) = accept_timeout.and_then(|v| self.duration(v, s, "accept_proxy_timeout", false, "5s")) {
            out.accept_proxy_timeout = d;
        }
        if let Some(v) = &raw.ntlm_observe {
            out.ntlm_observe = *v.get_ref();
        }
        out
    }

    /// One `[[route]]`; `names` maps each name seen so far to its line.
    fn route(
        &mut self,
        index: usize,
        r: &Spanned<RawRoute>,
        defaults: &RouteOptions,
        names: &mut HashMap<String, usize>,
    ) -> RouteSpec {
        let header = r.span();
        let raw = r.get_ref();
        let name = raw.name.as_ref().map(|n| n.get_ref().clone()).unwrap_or_default();
        let usable = is_route_name(&name);
        let scope_name = route_scope(index, &name);
        let s = Scope { route: &scope_name, prefix: "" };
        match &raw.name {
            None => self.report(&header, s, "name", "missing; give the route a name, e.g. name = \"intranet\"".into()),
            Some(n) if n.get_ref().is_empty() => {
                self.report(&n.span(), s, "name", "is empty; give the route a name, e.g. name = \"intranet\"".into())
            }
            Some(n) if !usable => {
                let m = format!("{name:?} may hold only letters, digits, '_', '.' and '-'; e.g. \"intranet\"");
                self.report(&n.span(), s, "name", m);
            }
            Some(n) => {
                let line = line_of(self.text, n.span().start);
                if let Some(first) = names.get(&name) {
                    let m =
                        format!("{name:?} is also the name of the route at line {first}; give each route its own name");
                    self.report(&n.span(), s, "name", m);
                } else {
                    names.insert(name.clone(), line);
                }
            }
        }

        let mut listen = Vec::new();
        for v in self.list(&header, &raw.listen, s, "listen", r#"listen = ["0.0.0.0:443"]"#) {
            let text = v.get_ref();
            match text.parse::<SocketAddr>() {
                Ok(a) if listen.contains(&a) => {
                    self.report(&v.span(), s, "listen", format!("{text:?} is listed twice; remove one"));
                }
                Ok(a) => listen.push(a),
                Err(_) => {
                    let m = format!(
                        "{text:?} is not an ip:port address; write e.g. \"0.0.0.0:443\" or \"[::]:443\" (host names are not accepted here)"
                    );
                    self.report(&v.span(), s, "listen", m);
                }
            }
        }

        let mut backends: Vec<BackendAddr> = Vec::new();
        for v in self.list(&header, &raw.backends, s, "backends", r#"backends = ["iis1.example.net:443"]"#) {
            let text = v.get_ref();
            match parse_backend(text) {
                Ok(b) if backends.iter().any(|o| o.port == b.port && o.host.eq_ignore_ascii_case(&b.host)) => {
                    self.report(&v.span(), s, "backends", format!("{text:?} is listed twice; remove one"));
                }
                Ok(b) => backends.push(b),
                Err(m) => self.report(&v.span(), s, "backends", format!("{text:?} {m}")),
            }
        }

        let mut sni: Vec<String> = Vec::new();
        for v in raw.sni.iter().flat_map(|l| l.get_ref()) {
            let text = v.get_ref();
            match sni_pattern(text) {
                Ok(p) if sni.contains(&p) => {
                    self.report(&v.span(), s, "sni", format!("{text:?} is listed twice; remove one"));
                }
                Ok(p) => sni.push(p),
                Err(m) => self.report(&v.span(), s, "sni", format!("{text:?} {m}")),
            }
        }

        let options = self.options(&raw.options(), s, defaults);
        let health = raw.health.as_ref().map(|h| self.health(h, &scope_name, &options));
        let guard = raw.guard.as_ref().map(|g| self.guard(g.get_ref(), &scope_name));
        RouteSpec { name, listen, backends, sni, options, health, guard }
    }

    /// The entries of a list that must not be empty; reports it missing or empty.
    fn list<'r>(
        &mut self,
        header: &Range<usize>,
        list: &'r Option<SpannedList>,
        s: Scope<'_>,
        key: &str,
        example: &str,
    ) -> &'r [Spanned<String>] {
        match list {
            None => {
                self.report(header, s, key, format!("missing; add at least one, e.g. {example}"));
                &[]
            }
            Some(l) if l.get_ref().is_empty() => {
                self.report(&l.span(), s, key, format!("is empty; add at least one, e.g. {example}"));
                &[]
            }
            Some(l) => l.get_ref(),
        }
    }

    /// `[route.health]` of a route whose options are `options`.
    fn health(&mut self, h: &Spanned<RawHealth>, route: &str, options: &RouteOptions) -> HealthSpec {
        let s = Scope { route, prefix: "health." };
        let raw = h.get_ref();
        let interval = raw
            .interval
            .as_ref()
            .and_then(|v| self.duration(v, s, "interval", false, DEFAULT_HEALTH_INTERVAL))
            .unwrap_or_else(|| default_duration(DEFAULT_HEALTH_INTERVAL));
        let timeout = raw
            .timeout
            .as_ref()
            .and_then(|v| self.duration(v, s, "timeout", false, "1s"))
            .unwrap_or_else(|| interval.min(options.connect_timeout));
        let count = |c: &mut Self, v: &Option<Spanned<i64>>, key: &str, default: u32| {
            let why = format!("must be at least 1, e.g. {default}");
            v.as_ref()
                .and_then(|v| c.int_in(v, s, key, 1, i64::from(u32::MAX), &why))
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(default)
        };
        let rise = count(self, &raw.rise, "rise", DEFAULT_HEALTH_RISE);
        let fall = count(self, &raw.fall, "fall", DEFAULT_HEALTH_FALL);
        let http = raw.http.as_ref().map(|h| self.http(h.get_ref(), route));
        HealthSpec { interval, timeout, rise, fall, http }
    }

    /// `[route.guard]`.
    fn guard(&mut self, raw: &RawGuard, route: &str) -> GuardSpec {
        let s = Scope { route, prefix: "guard." };
        let why = format!("must be at least 1, e.g. {DEFAULT_GUARD_MAX_FAILURES}");
        let max_failures = raw
            .max_failures
            .as_ref()
            .and_then(|v| self.int_in(v, s, "max_failures", 1, i64::from(u32::MAX), &why))
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(DEFAULT_GUARD_MAX_FAILURES);
        let dur = |c: &mut Self, v: &Option<Spanned<DurationText>>, key: &str, default: &str| {
            v.as_ref().and_then(|v| c.duration(v, s, key, false, default)).unwrap_or_else(|| default_duration(default))
        };
        let window = dur(self, &raw.window, "window", DEFAULT_GUARD_WINDOW);
        let block_for = dur(self, &raw.block_for, "block_for", DEFAULT_GUARD_BLOCK_FOR);
        GuardSpec { max_failures, window, block_for }
    }

    /// `http = { ... }` of `[route.health]`.
    fn http(&mut self, raw: &RawHttp, route: &str) -> HttpCheckSpec {
        let s = Scope { route, prefix: "health.http." };
        let mut path = DEFAULT_HTTP_PATH.to_owned();
        if let Some(v) = &raw.path {
            let p = v.get_ref();
            if !p.starts_with('/') {
                self.report(&v.span(), s, "path", format!("{p:?} must start with '/', e.g. \"/healthz\""));
            } else if let Some(c) = p.chars().find(|c| c.is_whitespace() || c.is_control()) {
                let m = format!("{p:?} holds {c:?}; percent-encode it (a space is %20)");
                self.report(&v.span(), s, "path", m);
            } else {
                path.clone_from(p);
            }
        }
        let mut host = None;
        if let Some(v) = &raw.host {
            let h = v.get_ref();
            if h.is_empty() || h.chars().any(|c| c.is_whitespace() || c.is_control()) {
                let m = format!("{h:?} is not a host name; write e.g. \"intranet.example.net\" or leave it out");
                self.report(&v.span(), s, "host", m);
            } else {
                host = Some(h.clone());
            }
        }
        let mut expect = DEFAULT_HTTP_EXPECT;
        if let Some(v) = &raw.expect {
            let t = &v.get_ref().0;
            match parse_expect(t) {
                Some(e) => expect = e,
                None => {
                    let m = format!(
                        "{t:?} is not a status class, code or range from 100 to 599; write e.g. \"2xx\", \"200\" or \"200-399\""
                    );
                    self.report(&v.span(), s, "expect", m);
                }
            }
        }
        HttpCheckSpec { path, host, expect }
    }

    /// Routes sharing a listen address: at most one without `sni` (the default) and no server
    /// name on two of them. Each pair of routes is reported once, however many addresses they
    /// share.
    fn shared_listeners(&mut self, raw: &[Spanned<RawRoute>], routes: &[RouteSpec]) {
        // For each address, in file order: the routes on it.
        let mut on: Vec<(SocketAddr, Vec<usize>)> = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            for a in &r.listen {
                match on.iter_mut().find(|(x, _)| x == a) {
                    Some((_, v)) => v.push(i),
                    None => on.push((*a, vec![i])),
                }
            }
        }
        // (earlier route, later route, server name or "" for two defaults) already reported.
        let mut said: HashSet<(usize, usize, &str)> = HashSet::new();
        for (addr, idx) in on.iter().filter(|(_, v)| v.len() > 1) {
            // The PROXY header is read before the route is known (the server name follows
            // it): every route on an address must trust the same sources.
            let first = idx[0];
            for &i in &idx[1..] {
                let (a, b) = (&routes[first].options.accept_proxy_from, &routes[i].options.accept_proxy_from);
                if a != b && said.insert((first, i, " accept_proxy_from")) {
                    let scope = route_scope(i, &routes[i].name);
                    let s = Scope { route: &scope, prefix: "" };
                    let span = raw[i].get_ref().accept_proxy_from.as_ref().map_or(raw[i].span(), Spanned::span);
                    let m = format!(
                        "[{b}] differs from route {:?} (line {}), which shares listen address {addr}: [{a}]; \
                         the PROXY header is read before the route is chosen, so routes on one address must \
                         trust the same sources: make the lists equal (or set it once in [defaults])",
                        routes[first].name,
                        line_of(self.text, raw[first].span().start),
                    );
                    self.report(&span, s, "accept_proxy_from", m);
                }
            }
            let mut default: Option<usize> = None;
            let mut names: HashMap<&str, usize> = HashMap::new();
            for &i in idx {
                let scope = route_scope(i, &routes[i].name);
                let s = Scope { route: &scope, prefix: "" };
                let header_line = |j: usize| line_of(self.text, raw[j].span().start);
                match default {
                    Some(d) if routes[i].sni.is_empty() && said.insert((d, i, "")) => {
                        let span = span_of(&raw[i].get_ref().listen, |t| t.parse().ok() == Some(*addr));
                        let m = format!(
                            "{addr} is also a listen address of route {:?} (line {}), and neither has sni; \
                             only one route per address may go without sni (the default): \
                             give one of them sni = [\"name.example.net\"] or another address",
                            routes[d].name,
                            header_line(d),
                        );
                        self.report(&span.unwrap_or(raw[i].span()), s, "listen", m);
                    }
                    None if routes[i].sni.is_empty() => default = Some(i),
                    _ => {}
                }
                for p in &routes[i].sni {
                    let Some(&o) = names.get(p.as_str()) else {
                        names.insert(p, i);
                        continue;
                    };
                    if said.insert((o, i, p)) {
                        let span = span_of(&raw[i].get_ref().sni, |t| sni_pattern(t).as_ref() == Ok(p));
                        let m = format!(
                            "{p:?} is also on route {:?} (line {}), which shares listen address {addr}; \
                             a server name picks one route per address: remove it from one of them",
                            routes[o].name,
                            header_line(o),
                        );
                        self.report(&span.unwrap_or(raw[i].span()), s, "sni", m);
                    }
                }
            }
        }
    }
}

/// How problems name route number `index` (0-based) called `name`: `route "name"`, or
/// `route #N` when the name is not usable.
fn route_scope(index: usize, name: &str) -> String {
    if is_route_name(name) { format!("route {name:?}") } else { format!("route #{}", index + 1) }
}

/// The span of the first entry of `list` that `matches`.
fn span_of(list: &Option<SpannedList>, matches: impl Fn(&str) -> bool) -> Option<Range<usize>> {
    list.as_ref()?.get_ref().iter().find(|v| matches(v.get_ref())).map(Spanned::span)
}

/// The names of a clap value enum, as the file writes them: "auto, sockmap, splice".
fn names<T: ValueEnum>() -> String {
    T::value_variants()
        .iter()
        .filter_map(|v| v.to_possible_value())
        .map(|p| p.get_name().to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A built-in default duration; the constants are checked by a test.
fn default_duration(text: &str) -> Duration {
    parse_duration(text).unwrap_or_else(|e| panic!("built-in default duration {text:?} does not parse: {e}"))
}

/// `None` for zero ("0" turns the timer off), else the duration.
fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Why `name` cannot be a user or group name (`None`: it can): not empty, at most 256
/// bytes, no whitespace, control characters, `:` or `/` (which no account database allows).
pub(crate) fn account_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 256 {
        return Some("must be a user or group name of 1 to 256 characters, e.g. \"ntlm-splice\"");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control() || c == ':' || c == '/') {
        return Some("has whitespace, a control character, ':' or '/', which no user or group name has");
    }
    None
}

/// A route name: `[A-Za-z0-9_.-]+`.
fn is_route_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Parses `host:port` (IPv6 in brackets); the error continues a sentence that starts with the
/// quoted text and ends with the fix.
pub(crate) fn parse_backend(text: &str) -> Result<BackendAddr, String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return Err("has no closing ']'; write an IPv6 address as \"[2001:db8::7]:443\"".into());
        };
        if ip.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{ip:?} in brackets is not an IPv6 address; write e.g. \"[2001:db8::7]:443\""));
        }
        let Some(port) = after.strip_prefix(':') else {
            return Err(format!("has no port; write host:port, e.g. \"[{ip}]:443\""));
        };
        (ip, port)
    } else {
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!("has no port; write host:port, e.g. \"{text}:443\""));
        };
        if host.contains(':') {
            return Err(format!("is an IPv6 address without brackets; write it as \"[{host}]:{port}\""));
        }
        if host.is_empty() {
            return Err("has no host; write host:port, e.g. \"iis1.example.net:443\"".into());
        }
        if !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) {
            let m = format!(
                "has host {host:?}, which may hold only letters, digits, '.', '-' and '_' (or be an IP address); e.g. \"iis1.example.net:443\""
            );
            return Err(m);
        }
        (host, port)
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(BackendAddr { host: host.to_owned(), port: p }),
        _ => {
            let shown = if host.contains(':') { format!("[{host}]") } else { host.to_owned() };
            Err(format!("has port {port:?}, not a number from 1 to 65535; e.g. \"{shown}:443\""))
        }
    }
}

/// Normalises and checks an `sni` pattern (lowercase, no trailing dot); the error continues a
/// sentence that starts with the quoted pattern and ends with the fix.
fn sni_pattern(text: &str) -> Result<String, String> {
    let lower = text.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if name.is_empty() {
        return Err("is empty; write a server name such as \"intranet.example.net\"".into());
    }
    if name == "*" {
        return Err("would match every name; leave sni out to make the route the default for its addresses".into());
    }
    let rest = name.strip_prefix("*.").unwrap_or(name);
    if rest.contains('*') {
        return Err("has a '*' that is not the whole first label; write a wildcard as \"*.example.net\"".into());
    }
    if name.len() > MAX_DNS_NAME_LEN {
        return Err(format!("is longer than {MAX_DNS_NAME_LEN} characters, too long for a DNS name"));
    }
    for label in rest.split('.') {
        if label.is_empty() {
            return Err(
                "has an empty label (two dots in a row, or a leading dot); write e.g. \"intranet.example.net\"".into(),
            );
        }
        if label.len() > MAX_DNS_LABEL_LEN {
            return Err(format!("has a label longer than {MAX_DNS_LABEL_LEN} characters; a DNS label cannot be"));
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(
                "may hold only letters, digits, '-' and '.' (write an international name in its xn-- form)".into()
            );
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("has label {label:?}; a DNS label cannot start or end with '-'"));
        }
    }
    Ok(name.to_owned())
}

/// `"2xx"` .. `"5xx"`, a code `"200"` or a range `"200-399"` as an inclusive pair within
/// [`MIN_HTTP_STATUS`]..=[`MAX_HTTP_STATUS`].
fn parse_expect(text: &str) -> Option<(u16, u16)> {
    let t = text.trim();
    let code = |s: &str| {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u16>().ok().filter(|c| (MIN_HTTP_STATUS..=MAX_HTTP_STATUS).contains(c))
    };
    let pair = if let Some(class) = t.strip_suffix("xx").or_else(|| t.strip_suffix("XX")) {
        match class {
            "2" | "3" | "4" | "5" => {
                let lo = class.parse::<u16>().ok()? * 100;
                (lo, lo + 99)
            }
            _ => return None,
        }
    } else if let Some((lo, hi)) = t.split_once('-') {
        (code(lo)?, code(hi)?)
    } else {
        let c = code(t)?;
        (c, c)
    };
    (pair.0 <= pair.1).then_some(pair)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;
    use clap::Parser;

    /// The shipped annotated example.
    const EXAMPLE: &str = include_str!("../../../docs/examples/ntlm-splice.toml");

    /// A file made of `lines`: line N of the file is `lines[N - 1]`.
    fn file(lines: &[&str]) -> String {
        let mut s = lines.join("\n");
        s.push('\n');
        s
    }

    /// A minimal valid route named `name` on lines 1..=4 of its own (header first).
    fn route(name: &str, listen: &str) -> Vec<String> {
        vec![
            "[[route]]".into(),
            format!("name = {name:?}"),
            format!("listen = [{listen:?}]"),
            r#"backends = ["b1.example.net:443"]"#.into(),
        ]
    }

    /// Every problem of a file that must be rejected, one rendered line each; also checks
    /// that the error's `Display` is those lines.
    fn problems(lines: &[&str]) -> Vec<String> {
        let text = file(lines);
        let e = match parse(&text, "t.toml") {
            Ok(c) => panic!("accepted:\n{text}\nas {c:#?}"),
            Err(e) => e,
        };
        let out: Vec<String> = e.problems().iter().map(Problem::to_string).collect();
        assert_eq!(e.to_string(), out.join("\n"));
        out
    }

    /// The one problem of a rejected file.
    fn problem(lines: &[&str]) -> String {
        let p = problems(lines);
        assert_eq!(p.len(), 1, "{p:#?}");
        p[0].clone()
    }

    /// A file of a minimal route `a` on line 1..=4 followed by `extra` lines (line 5 on).
    fn with_route(extra: &[&str]) -> Vec<String> {
        let mut v = route("a", "127.0.0.1:1");
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    fn ok(lines: &[&str]) -> FileConfig {
        let text = file(lines);
        parse(&text, "t.toml").unwrap_or_else(|e| panic!("rejected:\n{text}\n{e}"))
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn backend(host: &str, port: u16) -> BackendAddr {
        BackendAddr { host: host.into(), port }
    }

    #[test]
    fn shipped_example_parses_to_what_it_says() {
        let c = parse(EXAMPLE, EXAMPLE_PATH).unwrap_or_else(|e| panic!("{e}"));
        let global = Global {
            drain_timeout: secs(30),
            max_connections: 4096,
            threads: Some(2),
            max_inflight: 4 << 20,
            max_inflight_total: 256 << 20,
            sockmap_sndbuf: 8 << 20,
            pipe_size: 1 << 20,
            user: Some("ntlm-splice".into()),
            group: Some("ntlm-splice".into()),
            sockmap_allow_affected_kernel: false,
        };
        assert_eq!(c.global, global);
        let defaults = RouteOptions {
            engine: EngineChoice::Auto,
            balance: Balance::RoundRobin,
            connect_timeout: secs(5),
            idle_timeout: Some(secs(3600)),
            park_after: Some(secs(2)),
            half_close_timeout: None,
            sni_timeout: secs(5),
            source: None,
            proxy_protocol: None,
            accept_proxy_from: Trusted::default(),
            accept_proxy_timeout: secs(5),
            ntlm_observe: true,
        };
        let both: Vec<SocketAddr> = vec!["0.0.0.0:443".parse().unwrap(), "[::]:443".parse().unwrap()];
        let intranet = RouteSpec {
            name: "intranet".into(),
            listen: both.clone(),
            backends: vec![backend("iis1.example.net", 443), backend("10.0.0.7", 443), backend("2001:db8::7", 443)],
            sni: vec!["intranet.example.net".into(), "*.corp.example.net".into()],
            options: RouteOptions { balance: Balance::LeastConn, source: Some(Source::Client), ..defaults.clone() },
            health: Some(HealthSpec {
                interval: secs(2),
                timeout: secs(1),
                rise: 2,
                fall: 3,
                http: Some(HttpCheckSpec {
                    path: "/healthz".into(),
                    host: Some("intranet.example.net".into()),
                    expect: (200, 299),
                }),
            }),
            guard: None,
        };
        let exchange = RouteSpec {
            name: "exchange".into(),
            listen: both,
            backends: vec![backend("exch1.example.net", 443), backend("exch2.example.net", 443)],
            sni: vec!["mail.example.net".into(), "autodiscover.example.net".into()],
            options: RouteOptions { balance: Balance::SourceHash, ..defaults.clone() },
            health: None,
            guard: None,
        };
        let sql = RouteSpec {
            name: "sql".into(),
            listen: vec!["0.0.0.0:1433".parse().unwrap()],
            backends: vec![backend("sql1.example.net", 1433)],
            sni: vec![],
            options: RouteOptions { engine: EngineChoice::Splice, idle_timeout: Some(secs(900)), ..defaults.clone() },
            health: None,
            guard: None,
        };
        let appliance = RouteSpec {
            name: "appliance".into(),
            listen: vec!["0.0.0.0:8443".parse().unwrap()],
            backends: vec![backend("10.2.0.5", 8443)],
            sni: vec![],
            options: RouteOptions {
                accept_proxy_from: "10.1.0.0/16".parse().unwrap(),
                proxy_protocol: Some(ProxyVersion::V2),
                ..defaults.clone()
            },
            health: None,
            guard: None,
        };
        let intranet_http = RouteSpec {
            name: "intranet-http".into(),
            listen: vec!["0.0.0.0:80".parse().unwrap()],
            backends: vec![backend("iis1.example.net", 80)],
            sni: vec![],
            options: RouteOptions { source: Some(Source::Client), ..defaults },
            health: None,
            guard: Some(GuardSpec { max_failures: 5, window: secs(300), block_for: secs(900) }),
        };
        let metrics = MetricsSpec { listen: Some("127.0.0.1:9100".parse().unwrap()) };
        let routes = vec![intranet, exchange, sql, appliance, intranet_http];
        assert_eq!(c, FileConfig { global, routes, metrics });
    }

    /// The example documents every key the parser knows: each key of every table appears in
    /// it as `key =` (the unknown-key message lists a table's keys).
    #[test]
    fn shipped_example_shows_every_key() {
        for table in ["[global]", "[metrics]", "[defaults]", "[[route]]", "[[route]]\n[route.health]", "[[route]]\n[route.guard]"] {
            let text = format!("{table}\nno_such_key = 1\n");
            let e = parse(&text, "t.toml").unwrap_err();
            let msg = e.to_string();
            let valid = msg.split("valid keys here: ").nth(1).and_then(|r| r.split(" (").next());
            let valid = valid.unwrap_or_else(|| panic!("{msg}"));
            for key in valid.split(", ") {
                let shown = EXAMPLE.contains(&format!("\n{key} = ")) || EXAMPLE.contains(&format!("\n[route.{key}]"));
                assert!(shown, "{table} {key} is not in the example");
            }
        }
        for key in ["path", "expect", "host"] {
            assert!(EXAMPLE.contains(&format!("{key} = \"")), "http.{key} is not in the example");
        }
        // And every top-level table.
        let msg = parse("no_such_table = 1\n", "t.toml").unwrap_err().to_string();
        let valid = msg.split("valid keys here: ").nth(1).and_then(|r| r.split(" (").next());
        for table in valid.unwrap_or_else(|| panic!("{msg}")).split(", ") {
            let shown = EXAMPLE.contains(&format!("\n[{table}]\n")) || EXAMPLE.contains(&format!("\n[[{table}]]\n"));
            assert!(shown, "[{table}] is not in the example");
        }
    }

    /// Left out, every key takes the command line's default.
    #[test]
    fn defaults_are_the_command_lines() {
        let c = ok(&refs(&route("a", "127.0.0.1:1")));
        let cli = Cli::try_parse_from(["ntlm-splice"]).unwrap().proxy;
        let g = &c.global;
        assert_eq!(
            (g.drain_timeout, g.max_connections, g.threads, g.max_inflight, g.max_inflight_total),
            (cli.drain_timeout, cli.max_connections, cli.threads, cli.max_inflight, cli.max_inflight_total)
        );
        assert_eq!((g.sockmap_sndbuf, g.pipe_size), (cli.sockmap_sndbuf, cli.pipe_size));
        let o = &c.routes[0].options;
        assert_eq!((o.engine, o.balance, o.connect_timeout), (cli.engine, cli.balance, cli.connect_timeout));
        assert_eq!((o.idle_timeout, o.park_after), (nonzero(cli.idle_timeout), nonzero(cli.park_after)));
        assert_eq!((o.half_close_timeout, o.sni_timeout), (None, secs(5)));
        assert_eq!(c.routes[0].sni, Vec::<String>::new());
        assert_eq!(c.routes[0].health, None);
        assert_eq!(c.global, Global::default());
        assert_eq!(*o, RouteOptions::default());
    }

    #[test]
    fn a_route_overrides_defaults_key_by_key() {
        let mut v = vec!["[defaults]", r#"idle_timeout = "0""#, r#"balance = "source-hash""#, r#"park_after = "0""#];
        v.extend(["[[route]]", r#"name = "a""#, r#"listen = ["127.0.0.1:1"]"#, r#"backends = ["b:1"]"#]);
        v.extend([r#"balance = "least-conn""#, r#"half_close_timeout = "1m 30s""#, r#"sni_timeout = "250ms""#]);
        v.extend(["[[route]]", r#"name = "b""#, r#"listen = ["127.0.0.1:2"]"#, r#"backends = ["b:1"]"#]);
        let c = ok(&v);
        let a = &c.routes[0].options;
        assert_eq!((a.balance, a.idle_timeout, a.park_after), (Balance::LeastConn, None, None));
        assert_eq!((a.half_close_timeout, a.sni_timeout), (Some(secs(90)), Duration::from_millis(250)));
        let b = &c.routes[1].options;
        assert_eq!((b.balance, b.idle_timeout, b.half_close_timeout), (Balance::SourceHash, None, None));
        assert_eq!(b.connect_timeout, secs(5));
    }

    #[test]
    fn health_defaults() {
        let mut v = with_route(&[r#"connect_timeout = "500ms""#, "[route.health]", "http = {}"]);
        let c = ok(&refs(&v));
        let h = c.routes[0].health.clone().unwrap();
        assert_eq!((h.interval, h.timeout, h.rise, h.fall), (secs(2), Duration::from_millis(500), 2, 3));
        assert_eq!(h.http, Some(HttpCheckSpec { path: "/".into(), host: None, expect: (200, 399) }));
        v[4] = r#"connect_timeout = "10s""#.into();
        v[6] = r#"interval = "3s""#.into();
        let h = ok(&refs(&v)).routes[0].health.clone().unwrap();
        assert_eq!((h.interval, h.timeout, h.http), (secs(3), secs(3), None), "timeout: the smaller");
    }

    #[test]
    fn values_in_their_other_forms() {
        let mut v = vec!["[global]", "max_inflight = 131072", r#"max_inflight_total = "1 GiB""#, "sockmap_sndbuf = 0"];
        v.extend(["sockmap_allow_affected_kernel = true"]);
        v.extend(["[[route]]", r#"name = "A-1.b_c""#, r#"listen = ["[::1]:0"]"#]);
        v.extend([r#"backends = ["[::1]:8", "127.0.0.1:9", "Host-1_x:65535"]"#]);
        v.extend([r#"sni = ["Intranet.Example.NET.", "*.x-1.example""#, "]"]);
        v.extend(["health.http.expect = 404"]);
        let c = ok(&v);
        assert_eq!(
            (c.global.max_inflight, c.global.max_inflight_total, c.global.sockmap_sndbuf),
            (128 << 10, 1 << 30, 0)
        );
        assert!(c.global.sockmap_allow_affected_kernel);
        let r = &c.routes[0];
        assert_eq!(r.name, "A-1.b_c");
        assert_eq!(r.listen, vec!["[::1]:0".parse::<SocketAddr>().unwrap()]);
        assert_eq!(r.backends, vec![backend("::1", 8), backend("127.0.0.1", 9), backend("Host-1_x", 65535)]);
        assert_eq!(r.sni, vec!["intranet.example.net".to_string(), "*.x-1.example".to_string()]);
        assert_eq!(r.health.as_ref().and_then(|h| h.http.as_ref()).map(|h| h.expect), Some((404, 404)));
    }

    #[test]
    fn backend_addr_prints_as_written() {
        for (text, want) in [("[2001:db8::7]:443", backend("2001:db8::7", 443)), ("iis1:1", backend("iis1", 1))] {
            let b = parse_backend(text).unwrap();
            assert_eq!(b, want);
            assert_eq!((b.to_string(), b.spec()), (text.to_string(), text.to_string()));
        }
    }

    #[test]
    fn expect_forms() {
        let cases = [
            ("2xx", Some((200, 299))),
            ("5XX", Some((500, 599))),
            ("200", Some((200, 200))),
            ("100", Some((100, 100))),
            ("200-399", Some((200, 399))),
            ("204 - 204", Some((204, 204))),
            ("1xx", None),
            ("6xx", None),
            ("99", None),
            ("600", None),
            ("300-200", None),
            ("200-600", None),
            ("+200", None),
            ("", None),
            ("2xx-3xx", None),
        ];
        for (t, want) in cases {
            assert_eq!(parse_expect(t), want, "{t:?}");
        }
    }

    #[test]
    fn routes_sharing_an_address_by_sni() {
        // Two routes with sni and one default on the same address; an sni route alone.
        let mut v = route("a", "0.0.0.0:443");
        v.push(r#"sni = ["a.example.net"]"#.into());
        v.extend(route("b", "0.0.0.0:443"));
        v.push(r#"sni = ["b.example.net", "*.example.net"]"#.into());
        v.extend(route("c", "0.0.0.0:443"));
        v.extend(route("d", "0.0.0.0:444"));
        v.push(r#"sni = ["a.example.net"]"#.into());
        let c = ok(&refs(&v));
        assert_eq!(c.routes.len(), 4);
    }

    #[test]
    fn no_route() {
        let want = "t.toml:1: route: the file has no [[route]]; add one with a name, listen and backends (see docs/examples/ntlm-splice.toml)";
        assert_eq!(problem(&["[global]", "threads = 1"]), want);
        assert_eq!(problem(&[]), want);
    }

    #[test]
    fn route_names() {
        let mut v = route("a", "127.0.0.1:1");
        v.remove(1);
        assert_eq!(
            problem(&refs(&v)),
            r#"t.toml:1: route #1: name: missing; give the route a name, e.g. name = "intranet""#
        );
        assert_eq!(
            problem(&refs(&route("", "127.0.0.1:1"))),
            r#"t.toml:2: route #1: name: is empty; give the route a name, e.g. name = "intranet""#
        );
        assert_eq!(
            problem(&refs(&route("a b", "127.0.0.1:1"))),
            r#"t.toml:2: route #1: name: "a b" may hold only letters, digits, '_', '.' and '-'; e.g. "intranet""#
        );
        let mut v = route("a", "127.0.0.1:1");
        v.extend(route("a", "127.0.0.1:2"));
        assert_eq!(
            problem(&refs(&v)),
            r#"t.toml:6: route "a": name: "a" is also the name of the route at line 2; give each route its own name"#
        );
    }

    #[test]
    fn listen_problems() {
        let mut v = route("a", "127.0.0.1:1");
        v.remove(2);
        assert_eq!(
            problem(&refs(&v)),
            r#"t.toml:1: route "a": listen: missing; add at least one, e.g. listen = ["0.0.0.0:443"]"#
        );
        v.insert(2, "listen = []".into());
        assert_eq!(
            problem(&refs(&v)),
            r#"t.toml:3: route "a": listen: is empty; add at least one, e.g. listen = ["0.0.0.0:443"]"#
        );
        assert_eq!(
            problem(&refs(&route("a", "localhost:443"))),
            r#"t.toml:3: route "a": listen: "localhost:443" is not an ip:port address; write e.g. "0.0.0.0:443" or "[::]:443" (host names are not accepted here)"#
        );
        let v = with_route(&[r#"listen = ["[::]:1", "[::]:2","#, r#"  "[::]:1"]"#]);
        let mut v = refs(&v);
        v.remove(2);
        assert_eq!(problem(&v), r#"t.toml:5: route "a": listen: "[::]:1" is listed twice; remove one"#);
    }

    #[test]
    fn backend_problems() {
        let at = |b: &str| {
            let mut v = route("a", "127.0.0.1:1");
            v[3] = format!("backends = [{b:?}]");
            problem(&refs(&v))
        };
        let pre = r#"t.toml:4: route "a": backends: "#;
        let cases = [
            ("iis1", r#""iis1" has no port; write host:port, e.g. "iis1:443""#),
            ("iis1:0", r#""iis1:0" has port "0", not a number from 1 to 65535; e.g. "iis1:443""#),
            ("iis1:65536", r#""iis1:65536" has port "65536", not a number from 1 to 65535; e.g. "iis1:443""#),
            ("iis1:https", r#""iis1:https" has port "https", not a number from 1 to 65535; e.g. "iis1:443""#),
            ("[::1]:", r#""[::1]:" has port "", not a number from 1 to 65535; e.g. "[::1]:443""#),
            (":443", r#"":443" has no host; write host:port, e.g. "iis1.example.net:443""#),
            (
                "2001:db8::7:443",
                r#""2001:db8::7:443" is an IPv6 address without brackets; write it as "[2001:db8::7]:443""#,
            ),
            ("[2001:db8::7", r#""[2001:db8::7" has no closing ']'; write an IPv6 address as "[2001:db8::7]:443""#),
            ("[::1]", r#""[::1]" has no port; write host:port, e.g. "[::1]:443""#),
            ("[iis1]:443", r#""[iis1]:443" "iis1" in brackets is not an IPv6 address; write e.g. "[2001:db8::7]:443""#),
            (
                "ii s1:443",
                r#""ii s1:443" has host "ii s1", which may hold only letters, digits, '.', '-' and '_' (or be an IP address); e.g. "iis1.example.net:443""#,
            ),
        ];
        for (b, want) in cases {
            assert_eq!(at(b), format!("{pre}{want}"), "{b}");
        }
        let mut v = route("a", "127.0.0.1:1");
        v.remove(3);
        assert_eq!(
            problem(&refs(&v)),
            r#"t.toml:1: route "a": backends: missing; add at least one, e.g. backends = ["iis1.example.net:443"]"#
        );
        v.push("backends = []".into());
        assert_eq!(
            problem(&refs(&v)),
            r#"t.toml:4: route "a": backends: is empty; add at least one, e.g. backends = ["iis1.example.net:443"]"#
        );
        v[3] = r#"backends = ["IIS1:443", "10.0.0.1:443", "iis1:443"]"#.into();
        assert_eq!(problem(&refs(&v)), r#"t.toml:4: route "a": backends: "iis1:443" is listed twice; remove one"#);
    }

    #[test]
    fn two_defaults_on_one_address() {
        let mut v = route("a", "0.0.0.0:443");
        v.extend(route("b", "0.0.0.0:443"));
        assert_eq!(
            problem(&refs(&v)),
            r#"t.toml:7: route "b": listen: 0.0.0.0:443 is also a listen address of route "a" (line 1), and neither has sni; only one route per address may go without sni (the default): give one of them sni = ["name.example.net"] or another address"#
        );
    }

    #[test]
    fn client_identity_keys() {
        let v = with_route(&[
            r#"source = "client-ip""#,
            r#"proxy_protocol = "v1""#,
            r#"accept_proxy_from = ["10.0.0.0/8", "2001:db8::7"]"#,
            r#"accept_proxy_timeout = "750ms""#,
        ]);
        let c = ok(&refs(&v));
        let o = &c.routes[0].options;
        assert_eq!(o.source, Some(Source::ClientIp));
        assert_eq!(o.proxy_protocol, Some(ProxyVersion::V1));
        assert_eq!(o.accept_proxy_from, "10.0.0.0/8, 2001:db8::7".parse().unwrap());
        assert_eq!(o.accept_proxy_timeout, Duration::from_millis(750));
        // [defaults] sets them for every route; "off" turns PROXY out off again.
        let mut v = vec!["[defaults]", r#"proxy_protocol = "v2""#, r#"source = "192.0.2.10""#];
        let r = with_route(&[r#"proxy_protocol = "off""#]);
        v.extend(refs(&r));
        let c = ok(&v);
        assert_eq!(c.routes[0].options.proxy_protocol, None);
        assert_eq!(c.routes[0].options.source, Some(Source::Addr("192.0.2.10".parse().unwrap())));
    }

    #[test]
    fn client_identity_keys_name_their_fix() {
        let v = with_route(&[
            r#"source = "clientip""#,
            r#"proxy_protocol = "2""#,
            r#"accept_proxy_from = ["10.1.0.0/8", "lb.example.net"]"#,
            r#"accept_proxy_timeout = "0""#,
        ]);
        let p = problems(&refs(&v));
        assert_eq!(p.len(), 5, "{p:#?}");
        assert!(p[0].starts_with(r#"t.toml:5: route "a": source: "clientip" is not a source: write "client""#), "{}", p[0]);
        assert!(p[1].starts_with(r#"t.toml:6: route "a": proxy_protocol: "2" is not a PROXY protocol"#), "{}", p[1]);
        assert!(p[2].contains("accept_proxy_from: `10.1.0.0/8` has address bits set past its prefix; write the network as 10.0.0.0/8"), "{}", p[2]);
        assert!(p[3].contains("accept_proxy_from: `lb.example.net` is not an address or a network"), "{}", p[3]);
        assert!(p[4].starts_with(r#"t.toml:8: route "a": accept_proxy_timeout: "0" must be greater than zero"#), "{}", p[4]);
    }

    #[test]
    fn routes_of_one_address_trust_the_same_sources() {
        let mut v = route("a", "0.0.0.0:443");
        v.push(r#"accept_proxy_from = ["10.0.0.0/8"]"#.into());
        v.extend(route("b", "0.0.0.0:443"));
        v.push(r#"sni = ["y.example.net"]"#.into());
        assert_eq!(
            problem(&refs(&v)),
            r#"t.toml:6: route "b": accept_proxy_from: [] differs from route "a" (line 1), which shares listen address 0.0.0.0:443: [10.0.0.0/8]; the PROXY header is read before the route is chosen, so routes on one address must trust the same sources: make the lists equal (or set it once in [defaults])"#
        );
        v.push(r#"accept_proxy_from = ["10.0.0.0/8"]"#.into());
        ok(&refs(&v));
    }

    #[test]
    fn one_server_name_on_two_routes_of_an_address() {
        let mut v = route("a", "0.0.0.0:443");
        v.push(r#"sni = ["x.example.net"]"#.into());
        v.extend(route("b", "0.0.0.0:443"));
        v.push(r#"sni = ["y.example.net", "X.example.net."]"#.into());
        // Both routes also share [::]:443: still one problem.
        v[2] = r#"listen = ["0.0.0.0:443", "[::]:443"]"#.into();
        v[7] = r#"listen = ["0.0.0.0:443", "[::]:443"]"#.into();
        assert_eq!(
            problem(&refs(&v)),
            r#"t.toml:10: route "b": sni: "x.example.net" is also on route "a" (line 1), which shares listen address 0.0.0.0:443; a server name picks one route per address: remove it from one of them"#
        );
    }

    #[test]
    fn sni_patterns() {
        let at = |p: &str| problem(&refs(&with_route(&[&format!("sni = [{p:?}]")])));
        let long_label = format!("{}.example.net", "a".repeat(64));
        let long_name = format!("{}.net", vec!["a".repeat(62); 4].join("."));
        assert!(sni_pattern(&format!("{}.example.net", "a".repeat(63))).is_ok());
        let longest = format!("{}.a", vec!["a".repeat(62); 4].join("."));
        assert_eq!((longest.len(), sni_pattern(&longest)), (253, Ok(longest.clone())));
        let pre = r#"t.toml:5: route "a": sni: "#;
        let cases = [
            ("*", r#""*" would match every name; leave sni out to make the route the default for its addresses"#.to_string()),
            ("", r#""" is empty; write a server name such as "intranet.example.net""#.into()),
            (
                "a.*.example.net",
                r#""a.*.example.net" has a '*' that is not the whole first label; write a wildcard as "*.example.net""#.into(),
            ),
            ("*x.example.net", r#""*x.example.net" has a '*' that is not the whole first label; write a wildcard as "*.example.net""#.into()),
            (
                "a..net",
                r#""a..net" has an empty label (two dots in a row, or a leading dot); write e.g. "intranet.example.net""#.into(),
            ),
            (
                "a_b.net",
                r#""a_b.net" may hold only letters, digits, '-' and '.' (write an international name in its xn-- form)"#.into(),
            ),
            ("-a.net", r#""-a.net" has label "-a"; a DNS label cannot start or end with '-'"#.into()),
            (&long_label, format!("{long_label:?} has a label longer than 63 characters; a DNS label cannot be")),
            (&long_name, format!("{long_name:?} is longer than 253 characters, too long for a DNS name")),
        ];
        for (p, want) in cases {
            assert_eq!(at(p), format!("{pre}{want}"), "{p}");
        }
        assert_eq!(
            problem(&refs(&with_route(&[r#"sni = ["a.net", "A.NET"]"#]))),
            r#"t.toml:5: route "a": sni: "A.NET" is listed twice; remove one"#
        );
    }

    #[test]
    fn option_problems() {
        let p = problems(&["[defaults]", r#"connect_timeout = "0""#, r#"sni_timeout = "0""#, r#"engine = "xdp""#]);
        assert_eq!(
            p,
            [
                r#"t.toml:1: route: the file has no [[route]]; add one with a name, listen and backends (see docs/examples/ntlm-splice.toml)"#,
                r#"t.toml:2: defaults.connect_timeout: "0" must be greater than zero, e.g. "5s""#,
                r#"t.toml:3: defaults.sni_timeout: "0" must be greater than zero, e.g. "5s""#,
                r#"t.toml:4: defaults.engine: "xdp" is not an engine; write one of auto, sockmap, splice"#,
            ]
        );
        let v = with_route(&[r#"connect_timeout = "0""#, r#"balance = "random""#, r#"idle_timeout = "5 parsecs""#]);
        let p = problems(&refs(&v));
        assert_eq!(p[0], r#"t.toml:5: route "a": connect_timeout: "0" must be greater than zero, e.g. "5s""#);
        assert_eq!(
            p[1],
            r#"t.toml:6: route "a": balance: "random" is not a balance policy; write one of round-robin, least-conn, source-hash"#
        );
        assert!(
            p[2].starts_with(r#"t.toml:7: route "a": idle_timeout: "5 parsecs": "#)
                && p[2].ends_with("; write a duration such as 500ms, 5s, 2m or 1h"),
            "{}",
            p[2]
        );
        assert_eq!(p.len(), 3);
        let v = with_route(&[r#"sni_timeout = "0""#]);
        assert_eq!(problem(&refs(&v)), r#"t.toml:5: route "a": sni_timeout: "0" must be greater than zero, e.g. "5s""#);
    }

    #[test]
    fn health_problems() {
        let v = with_route(&[
            "[route.health]",
            r#"interval = "0""#,
            r#"timeout = "0""#,
            "rise = 0",
            "fall = -1",
            r#"http = { path = "healthz", expect = "1xx", host = "" }"#,
        ]);
        let pre = r#"t.toml:"#;
        let want = [
            r#"6: route "a": health.interval: "0" must be greater than zero, e.g. "2s""#,
            r#"7: route "a": health.timeout: "0" must be greater than zero, e.g. "1s""#,
            r#"8: route "a": health.rise: 0: must be at least 1, e.g. 2"#,
            r#"9: route "a": health.fall: -1: must be at least 1, e.g. 3"#,
            r#"10: route "a": health.http.path: "healthz" must start with '/', e.g. "/healthz""#,
            r#"10: route "a": health.http.host: "" is not a host name; write e.g. "intranet.example.net" or leave it out"#,
            r#"10: route "a": health.http.expect: "1xx" is not a status class, code or range from 100 to 599; write e.g. "2xx", "200" or "200-399""#,
        ];
        let want: Vec<String> = want.iter().map(|w| format!("{pre}{w}")).collect();
        assert_eq!(problems(&refs(&v)), want);
        let v = with_route(&["[route.health]", r#"http = { path = "/a b" }"#]);
        assert_eq!(
            problem(&refs(&v)),
            r#"t.toml:6: route "a": health.http.path: "/a b" holds ' '; percent-encode it (a space is %20)"#
        );
        let v = with_route(&["[route.health]", r#"http = { path = "/a\u0007" }"#]);
        assert_eq!(
            problem(&refs(&v)),
            r#"t.toml:6: route "a": health.http.path: "/a\u{7}" holds '\u{7}'; percent-encode it (a space is %20)"#
        );
    }

    /// `user` and `group`: names as account databases allow them, and no group without a user.
    #[test]
    fn user_and_group() {
        let r = route("a", "127.0.0.1:1");
        let mut v = vec!["[global]", r#"user = "ntlm-splice""#, r#"group = "proxy""#];
        v.extend(refs(&r));
        let c = parse(&file(&v), "t.toml").unwrap();
        assert_eq!((c.global.user.as_deref(), c.global.group.as_deref()), (Some("ntlm-splice"), Some("proxy")));
        let mut v = vec!["[global]", r#"user = """#, r#"group = "a b""#];
        v.extend(refs(&r));
        assert_eq!(
            problems(&v),
            [
                r#"t.toml:2: global.user: "": must be a user or group name of 1 to 256 characters, e.g. "ntlm-splice""#,
                r#"t.toml:3: global.group: "a b": has whitespace, a control character, ':' or '/', which no user or group name has"#,
            ]
        );
        let mut v = vec!["[global]", r#"group = "proxy""#];
        v.extend(refs(&r));
        assert_eq!(
            problem(&v),
            "t.toml:2: global.group: group needs user: set `user` too (the group alone does not switch anything)"
        );
        let mut v = vec!["[global]", "user = 0"];
        v.extend(refs(&r));
        assert!(problem(&v).starts_with("t.toml:2: global.user: "), "a number is not a name");
    }

    #[test]
    fn global_problems() {
        let mut v = vec![
            "[global]",
            "max_connections = 0",
            "threads = 0",
            r#"max_inflight = "1KiB""#,
            r#"sockmap_sndbuf = "2GiB""#,
            r#"pipe_size = "4KiB""#,
            r#"drain_timeout = "soon""#,
            "max_inflight_total = -5",
        ];
        let r = route("a", "127.0.0.1:1");
        v.extend(refs(&r));
        let p = problems(&v);
        let want = [
            "t.toml:2: global.max_connections: 0: must be at least 1, e.g. 4096",
            "t.toml:3: global.threads: 0: must be from 1 to 1024; leave it out for one per CPU",
            r#"t.toml:4: global.max_inflight: 1024: must be at least 64KiB (one loopback segment), e.g. "4MiB""#,
            r#"t.toml:5: global.sockmap_sndbuf: 2147483648: must be 0 (kernel autotuning) or from 64KiB to 1GiB, e.g. "8MiB""#,
            r#"t.toml:6: global.pipe_size: 4096: must be 0 (the kernel's default) or from 64KiB to 64MiB, e.g. "1MiB""#,
        ];
        assert_eq!(p[..5], want);
        assert!(p[5].starts_with(r#"t.toml:7: global.drain_timeout: "soon": "#), "{}", p[5]);
        assert_eq!(p[6], r#"t.toml:8: global.max_inflight_total: -5 is negative; write e.g. "4MiB""#);
        assert_eq!(p.len(), 7);

        let v = ["[global]", "threads = 1025", r#"pipe_size = "1 furlong""#];
        let mut v: Vec<&str> = v.to_vec();
        v.extend(refs(&r));
        assert_eq!(
            problems(&v),
            [
                "t.toml:2: global.threads: 1025: must be from 1 to 1024; leave it out for one per CPU",
                r#"t.toml:3: global.pipe_size: "1 furlong": unknown size unit "furlong"; use KiB, MiB or GiB"#,
            ]
        );
        let mut v = vec!["[global]", r#"max_inflight = "8MiB""#, r#"max_inflight_total = "4MiB""#];
        v.extend(refs(&r));
        assert_eq!(
            problem(&v),
            "t.toml:3: global.max_inflight_total: 4194304: must be at least global.max_inflight (8388608)"
        );
        v.remove(2);
        v[1] = r#"max_inflight = "512MiB""#;
        assert_eq!(
            problem(&v),
            "t.toml:2: global.max_inflight: 536870912: more than global.max_inflight_total (268435456 by default); set max_inflight_total at least as high"
        );
    }

    /// `[metrics] listen`: an ip:port, not a route's listen address (port 0 aside), and
    /// required once the table is there.
    #[test]
    fn metrics_table() {
        let r = route("a", "127.0.0.1:9100");
        let with = |extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            v.extend(r.iter().cloned());
            v
        };
        let c = ok(&refs(&with(&["[metrics]", r#"listen = "[::1]:9101""#])));
        assert_eq!(c.metrics.listen, Some("[::1]:9101".parse().unwrap()));
        assert_eq!(ok(&refs(&r)).metrics, MetricsSpec::default(), "no table, no endpoint");
        let zero = route("a", "127.0.0.1:0");
        let mut v = vec!["[metrics]".to_string(), r#"listen = "127.0.0.1:0""#.to_string()];
        v.extend(zero);
        assert_eq!(ok(&refs(&v)).metrics.listen, Some("127.0.0.1:0".parse().unwrap()), "port 0 twice is two ports");
        assert_eq!(
            problem(&refs(&with(&["[metrics]", r#"listen = "localhost:9100""#]))),
            r#"t.toml:2: metrics.listen: "localhost:9100" is not an ip:port address; write e.g. "127.0.0.1:9100" (host names are not accepted here)"#
        );
        assert_eq!(
            problem(&refs(&with(&["[metrics]", r#"listen = "127.0.0.1:9100""#]))),
            r#"t.toml:2: metrics.listen: 127.0.0.1:9100 is also a listen address of route "a" (line 3); give the metrics endpoint an address of its own, e.g. "127.0.0.1:9100""#
        );
        assert_eq!(
            problem(&refs(&with(&["[metrics]"]))),
            r#"t.toml:1: metrics.listen: missing; write e.g. listen = "127.0.0.1:9100", or remove [metrics] to serve no metrics"#
        );
        let p = problem(&refs(&with(&["[metrics]", r#"port = 9100"#])));
        assert!(p.starts_with("t.toml:2: metrics.port: unknown key `port`; valid keys here: listen"), "{p}");
    }

    #[test]
    fn syntax_errors_name_the_line_and_the_fix() {
        let v = with_route(&["[route.health]", "interval = \"2s\"", "intervl = \"2s\""]);
        assert_eq!(
            problem(&refs(&v)),
            "t.toml:7: route.health.intervl: unknown key `intervl`; valid keys here: interval, timeout, rise, fall, http (remove it or correct its spelling)"
        );
        let v = with_route(&["listn = []"]);
        assert_eq!(
            problem(&refs(&v)),
            "t.toml:5: route.listn: unknown key `listn`; valid keys here: name, listen, backends, sni, health, guard, engine, balance, connect_timeout, idle_timeout, park_after, half_close_timeout, sni_timeout, source, proxy_protocol, accept_proxy_from, accept_proxy_timeout, ntlm_observe (remove it or correct its spelling)"
        );
        assert_eq!(
            problem(&["", "[gobal]"]),
            "t.toml:2: gobal: unknown key `gobal`; valid keys here: global, metrics, defaults, route (remove it or correct its spelling)"
        );
        assert_eq!(
            problem(&["[route]", r#"name = "a""#]),
            "t.toml:1: route: a route is written [[route]], with two brackets, once per route"
        );
        let v = with_route(&["[route.health]", "", "interval = 2"]);
        assert_eq!(
            problem(&refs(&v)),
            r#"t.toml:7: route.health.interval: invalid type: integer `2`, expected a duration in quotes, e.g. "5s", "500ms", "1h" or "0"; see docs/examples/ntlm-splice.toml for every key and how to write it"#
        );
        let e = problem(&["[global]", "", "drain_timeout = \"30s"]);
        assert!(
            e.starts_with("t.toml:3: global.drain_timeout: ") && e.ends_with("for every key and how to write it"),
            "{e}"
        );
        let e = problem(&["[[route]]", "name = 'a'", "listen = [", "  \"127.0.0.1:1\",", "  7,", "]"]);
        assert!(e.starts_with("t.toml:5: route: invalid type: integer `7`, expected a string"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_in_line_order() {
        let mut v = route("b", "0.0.0.0:443");
        v[3] = r#"backends = ["x"]"#.into();
        v.extend(route("a b", "nowhere"));
        let p = problems(&refs(&v));
        let lines: Vec<&str> = p.iter().map(|l| l.split(':').nth(1).unwrap()).collect();
        assert_eq!(lines, ["4", "6", "7"], "{p:#?}");
    }

    #[test]
    fn key_and_line_at_every_offset() {
        let text = "[route.health]\nrise = \"é\"\n";
        for at in 0..=text.len() + 2 {
            let want_line = if at <= text.find('\n').unwrap() { 1 } else { 2 };
            assert_eq!(line_of(text, at), want_line, "offset {at}");
            let want_key = if want_line == 1 { "route.health" } else { "route.health.rise" };
            assert_eq!(key_at(text, at), want_key, "offset {at}");
        }
    }

    /// A scratch file of this test process, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, bytes: &[u8]) -> Self {
            let path = std::env::temp_dir().join(format!("ntlm-splice-{}-{name}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Err(e) = std::fs::remove_file(&self.0) {
                eprintln!("cannot remove {}: {e}", self.0.display());
            }
        }
    }

    #[test]
    fn load_reads_names_the_file_and_its_problems() {
        let f = TempFile::new("good.toml", EXAMPLE.as_bytes());
        assert_eq!(load(&f.0).unwrap(), parse(EXAMPLE, "x").unwrap());

        let mut bad = b"[global]\nthreads = 0\n".to_vec();
        bad.extend_from_slice(file(&refs(&route("a", "127.0.0.1:1"))).as_bytes());
        let f = TempFile::new("bad.toml", &bad);
        let e = load(&f.0).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}:2: global.threads: 0: must be from 1 to 1024; leave it out for one per CPU", f.0.display())
        );

        let f = TempFile::new("latin1.toml", b"# ok\n# caf\xe9\n");
        let e = load(&f.0).unwrap_err().to_string();
        assert_eq!(e, format!("{}:2: the file is not valid UTF-8 here; save it as UTF-8", f.0.display()));

        let missing = std::env::temp_dir().join(format!("ntlm-splice-{}-missing.toml", std::process::id()));
        let e = load(&missing).unwrap_err();
        assert!(matches!(&e, FileError::Read { path, .. } if *path == missing), "{e:?}");
        let e = e.to_string();
        assert!(
            e.starts_with(&format!("{}: cannot read the config file (", missing.display()))
                && e.ends_with("); check the path and that this user may read it"),
            "{e}"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Cases per property: the three together run in a few seconds in release.
        const CASES: u32 = 2000;

        /// Problems of a rejected text must name lines inside it.
        fn lines_are_inside(text: &str, e: &FileError) -> Result<(), TestCaseError> {
            let n = text.lines().count().max(1);
            prop_assert!(!e.problems().is_empty(), "no problem in {e:?}");
            for p in e.problems() {
                prop_assert!((1..=n).contains(&p.line), "line {} of {n}: {p}\n{text}", p.line);
                prop_assert!(!p.to_string().contains('\n'), "two lines in one problem: {p}");
            }
            Ok(())
        }

        /// Options as a file may write them: each `None` is left out.
        #[derive(Debug, Clone, Default)]
        struct GenOptions {
            engine: Option<EngineChoice>,
            balance: Option<Balance>,
            connect_timeout: Option<Duration>,
            idle_timeout: Option<Duration>,
            park_after: Option<Duration>,
            half_close_timeout: Option<Duration>,
            sni_timeout: Option<Duration>,
        }

        fn name_of<T: ValueEnum>(v: &T) -> String {
            v.to_possible_value().map(|p| p.get_name().to_owned()).unwrap_or_default()
        }

        /// "0" or humantime text of a whole number of milliseconds.
        fn dur(d: Duration) -> String {
            if d.is_zero() { "0".into() } else { humantime::format_duration(d).to_string() }
        }

        impl GenOptions {
            fn render(&self, out: &mut String) {
                let mut put = |k: &str, v: Option<String>| {
                    if let Some(v) = v {
                        out.push_str(&format!("{k} = {v:?}\n"));
                    }
                };
                put("engine", self.engine.as_ref().map(name_of));
                put("balance", self.balance.as_ref().map(name_of));
                put("connect_timeout", self.connect_timeout.map(dur));
                put("idle_timeout", self.idle_timeout.map(dur));
                put("park_after", self.park_after.map(dur));
                put("half_close_timeout", self.half_close_timeout.map(dur));
                put("sni_timeout", self.sni_timeout.map(dur));
            }

            /// These over `base`, as the file format says.
            fn over(&self, base: &RouteOptions) -> RouteOptions {
                RouteOptions {
                    engine: self.engine.unwrap_or(base.engine),
                    balance: self.balance.unwrap_or(base.balance),
                    connect_timeout: self.connect_timeout.unwrap_or(base.connect_timeout),
                    idle_timeout: self.idle_timeout.map_or(base.idle_timeout, nonzero),
                    park_after: self.park_after.map_or(base.park_after, nonzero),
                    half_close_timeout: self.half_close_timeout.map_or(base.half_close_timeout, nonzero),
                    sni_timeout: self.sni_timeout.unwrap_or(base.sni_timeout),
                    ..base.clone()
                }
            }
        }

        fn any_duration(zero_ok: bool) -> impl Strategy<Value = Duration> {
            let lo = u64::from(!zero_ok);
            prop_oneof![
                (lo..100_000u64).prop_map(Duration::from_millis),
                (lo..200_000u64).prop_map(Duration::from_secs)
            ]
        }

        fn gen_options() -> impl Strategy<Value = GenOptions> {
            let engine = prop_oneof![Just(EngineChoice::Auto), Just(EngineChoice::Splice), Just(EngineChoice::Sockmap)];
            let balance = prop_oneof![Just(Balance::RoundRobin), Just(Balance::LeastConn), Just(Balance::SourceHash)];
            (
                proptest::option::of(engine),
                proptest::option::of(balance),
                proptest::option::of(any_duration(false)),
                proptest::option::of(any_duration(true)),
                proptest::option::of(any_duration(true)),
                proptest::option::of(any_duration(true)),
                proptest::option::of(any_duration(false)),
            )
                .prop_map(
                    |(engine, balance, connect_timeout, idle_timeout, park_after, half_close_timeout, sni_timeout)| {
                        GenOptions {
                            engine,
                            balance,
                            connect_timeout,
                            idle_timeout,
                            park_after,
                            half_close_timeout,
                            sni_timeout,
                        }
                    },
                )
        }

        /// `[route.health]` as generated: interval, timeout if written, rise, fall, http.
        type GenHealth = (Duration, Option<Duration>, u32, u32, Option<HttpCheckSpec>);

        /// A generated route: the model fields written in the file, plus its options and health
        /// as written (the expected model is derived in [`expected`]).
        #[derive(Debug, Clone)]
        struct GenRoute {
            listen: Vec<SocketAddr>,
            backends: Vec<BackendAddr>,
            sni: Vec<String>,
            options: GenOptions,
            health: Option<GenHealth>,
        }

        fn gen_backend() -> impl Strategy<Value = BackendAddr> {
            let host = prop_oneof![
                "[a-z][a-z0-9-]{0,10}(\\.[a-z0-9]{1,5}){0,2}",
                any::<[u8; 4]>().prop_map(|b| std::net::Ipv4Addr::from(b).to_string()),
                any::<u128>().prop_map(|b| Ipv6Addr::from(b).to_string()),
            ];
            (host, 1..=u16::MAX).prop_map(|(host, port)| BackendAddr { host, port })
        }

        fn gen_route() -> impl Strategy<Value = GenRoute> {
            let listen = proptest::collection::vec(
                prop_oneof![
                    (any::<[u8; 4]>(), any::<u16>()).prop_map(|(b, p)| SocketAddr::from((b, p))),
                    (any::<u128>(), any::<u16>()).prop_map(|(b, p)| SocketAddr::from((Ipv6Addr::from(b), p))),
                ],
                1..4,
            );
            let sni = proptest::collection::vec("(\\*\\.)?[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?(\\.[a-z]{1,6}){1,3}", 0..3);
            let http = proptest::option::of(
                ("/[a-zA-Z0-9/._~%-]{0,20}", proptest::option::of("[a-z.]{1,20}"), 100..=599u16, 0..100u16).prop_map(
                    |(path, host, lo, span)| HttpCheckSpec { path, host, expect: (lo, (lo + span).min(599)) },
                ),
            );
            let health = proptest::option::of((
                any_duration(false),
                proptest::option::of(any_duration(false)),
                1..10u32,
                1..10u32,
                http,
            ));
            (listen, proptest::collection::vec(gen_backend(), 1..4), sni, gen_options(), health).prop_map(
                |(mut listen, mut backends, mut sni, options, health)| {
                    let mut seen = HashSet::new();
                    listen.retain(|a| seen.insert(*a));
                    let mut seen = HashSet::new();
                    backends.retain(|b| seen.insert((b.host.to_ascii_lowercase(), b.port)));
                    let mut seen = HashSet::new();
                    sni.retain(|s| seen.insert(s.clone()));
                    GenRoute { listen, backends, sni, options, health }
                },
            )
        }

        fn quoted(items: impl Iterator<Item = String>) -> String {
            format!("[{}]", items.map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", "))
        }

        /// The TOML text of a generated file.
        fn render(global: &Global, defaults: &GenOptions, routes: &[GenRoute]) -> String {
            let mut t = String::from("[global]\n");
            t.push_str(&format!("drain_timeout = {:?}\n", dur(global.drain_timeout)));
            t.push_str(&format!("max_connections = {}\n", global.max_connections));
            if let Some(n) = global.threads {
                t.push_str(&format!("threads = {n}\n"));
            }
            t.push_str(&format!("max_inflight = {}\n", global.max_inflight));
            t.push_str(&format!("max_inflight_total = \"{}KiB\"\n", global.max_inflight_total >> 10));
            t.push_str(&format!("sockmap_sndbuf = {}\n", global.sockmap_sndbuf));
            t.push_str(&format!("pipe_size = \"{}\"\n", global.pipe_size));
            if let Some(user) = &global.user {
                t.push_str(&format!("user = {user:?}\n"));
            }
            if let Some(group) = &global.group {
                t.push_str(&format!("group = {group:?}\n"));
            }
            t.push_str(&format!("sockmap_allow_affected_kernel = {}\n", global.sockmap_allow_affected_kernel));
            t.push_str("\n[defaults]\n");
            defaults.render(&mut t);
            for (i, r) in routes.iter().enumerate() {
                t.push_str(&format!("\n[[route]]\nname = \"r{i}\"\n"));
                t.push_str(&format!("listen = {}\n", quoted(r.listen.iter().map(SocketAddr::to_string))));
                t.push_str(&format!("backends = {}\n", quoted(r.backends.iter().map(BackendAddr::spec))));
                if !r.sni.is_empty() {
                    t.push_str(&format!("sni = {}\n", quoted(r.sni.iter().cloned())));
                }
                r.options.render(&mut t);
                if let Some((interval, timeout, rise, fall, http)) = &r.health {
                    t.push_str(&format!("[route.health]\ninterval = {:?}\n", dur(*interval)));
                    if let Some(to) = timeout {
                        t.push_str(&format!("timeout = {:?}\n", dur(*to)));
                    }
                    t.push_str(&format!("rise = {rise}\nfall = {fall}\n"));
                    if let Some(h) = http {
                        let host = h.host.as_ref().map(|h| format!(", host = {h:?}")).unwrap_or_default();
                        let (lo, hi) = h.expect;
                        t.push_str(&format!("http = {{ path = {:?}, expect = \"{lo}-{hi}\"{host} }}\n", h.path));
                    }
                }
            }
            t
        }

        /// The model a generated file must parse to.
        fn expected(global: &Global, defaults: &GenOptions, routes: &[GenRoute]) -> FileConfig {
            let base = defaults.over(&RouteOptions::default());
            let routes = routes
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let options = r.options.over(&base);
                    let health = r.health.clone().map(|(interval, timeout, rise, fall, http)| HealthSpec {
                        interval,
                        timeout: timeout.unwrap_or(interval.min(options.connect_timeout)),
                        rise,
                        fall,
                        http,
                    });
                    RouteSpec {
                        name: format!("r{i}"),
                        listen: r.listen.clone(),
                        backends: r.backends.clone(),
                        sni: r.sni.clone(),
                        options,
                        health,
                        guard: None,
                    }
                })
                .collect();
            FileConfig { global: global.clone(), routes, metrics: MetricsSpec::default() }
        }

        fn gen_global() -> impl Strategy<Value = Global> {
            (
                any_duration(true),
                1..100_000usize,
                proptest::option::of(1..=MAX_THREADS),
                (MIN_KERNEL_BYTES..1 << 30),
                0..(1u64 << 20),
                prop_oneof![Just(0), MIN_KERNEL_BYTES..=MAX_SOCKMAP_SNDBUF],
                prop_oneof![Just(0u64), (1u64..=64).prop_map(|m| m << 20)],
                // A user, and with one maybe a group.
                proptest::option::of(("[a-z_][a-z0-9_.-]{0,15}", proptest::option::of("[a-z_][a-z0-9_-]{0,15}"))),
                any::<bool>(),
            )
                .prop_map(
                    |(
                        drain_timeout,
                        max_connections,
                        threads,
                        max_inflight,
                        extra_kib,
                        sockmap_sndbuf,
                        pipe_size,
                        account,
                        sockmap_allow_affected_kernel,
                    )| {
                        let (user, group) = account.map_or((None, None), |(u, g)| (Some(u), g));
                        Global {
                            drain_timeout,
                            max_connections,
                            threads,
                            max_inflight,
                            // Rendered in KiB: a whole number of them, at least max_inflight.
                            max_inflight_total: (max_inflight.div_ceil(1024) + extra_kib) << 10,
                            sockmap_sndbuf,
                            pipe_size,
                            user,
                            group,
                            sockmap_allow_affected_kernel,
                        }
                    },
                )
        }

        /// Generated routes may share listen addresses only where the file allows it: drop
        /// from each later route the addresses that would break the sharing rules.
        fn shareable(mut routes: Vec<GenRoute>) -> Vec<GenRoute> {
            let mut owners: HashMap<SocketAddr, Vec<usize>> = HashMap::new();
            for i in 0..routes.len() {
                let (before, rest) = routes.split_at_mut(i);
                let r = &mut rest[0];
                r.listen.retain(|a| {
                    owners.get(a).is_none_or(|o| {
                        o.iter().all(|&j| {
                            let other = &before[j];
                            let both_default = other.sni.is_empty() && r.sni.is_empty();
                            let same_name = other.sni.iter().any(|p| r.sni.contains(p));
                            !both_default && !same_name
                        })
                    })
                });
                if r.listen.is_empty() {
                    r.listen.push(SocketAddr::from(([127, 0, 0, 1], 40000 + i as u16)));
                }
                for a in &r.listen {
                    owners.entry(*a).or_default().push(i);
                }
            }
            routes
        }

        /// Routes often sharing a few addresses, to exercise the sharing rules too.
        fn gen_routes() -> impl Strategy<Value = Vec<GenRoute>> {
            let shared = [SocketAddr::from(([0, 0, 0, 0], 443)), SocketAddr::from((Ipv6Addr::UNSPECIFIED, 443))];
            proptest::collection::vec((gen_route(), proptest::option::of(0..2usize)), 1..6).prop_map(move |v| {
                let routes = v
                    .into_iter()
                    .map(|(mut r, share)| {
                        if let Some(s) = share
                            && !r.listen.contains(&shared[s])
                        {
                            r.listen.push(shared[s]);
                        }
                        r
                    })
                    .collect();
                shareable(routes)
            })
        }

        /// The parts of a valid file, as generated.
        type Generated = (Global, GenOptions, Vec<GenRoute>);

        fn generated() -> impl Strategy<Value = Generated> {
            (gen_global(), gen_options(), gen_routes())
        }

        /// Any bytes, including ones that are not UTF-8 (read lossily).
        fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(any::<u8>(), 0..400)
        }

        /// Text made of the pieces of the format, which gets past the TOML parser more often.
        fn toml_like_text() -> impl Strategy<Value = String> {
            "(\\[\\[route\\]\\]|\\[route\\.health\\]|\\[global\\]|\\[defaults\\]|name|listen|backends|sni|interval|http|expect|rise|=|\"|\\[|\\]|\\{|\\}|,|\n| |[a-z0-9:.*-]{1,6}|\"[0-9]{1,4}(ms|s|KiB)?\"|\"[0-9.:]{3,12}\"){0,60}"
        }

        /// A valid file, generated or the example, with one line deleted or an unknown key
        /// inserted (`true`).
        fn line_edited() -> impl Strategy<Value = (String, bool)> {
            let valid = prop_oneof![generated().prop_map(|(g, d, r)| render(&g, &d, &r)), Just(EXAMPLE.to_owned())];
            (valid, any::<prop::sample::Index>(), any::<bool>()).prop_map(|(text, at, insert)| {
                let mut lines: Vec<&str> = text.lines().collect();
                let i = at.index(lines.len());
                if insert {
                    lines.insert(i, "no_such_key = 1");
                } else {
                    lines.remove(i);
                }
                (lines.join("\n"), insert)
            })
        }

        /// Valid files, generated or the example, with a few random edits (see
        /// [`ntlm_fuzz::havoc`]).
        fn havoc_on_valid_files() -> impl Strategy<Value = Vec<u8>> {
            let valid = prop_oneof![
                generated().prop_map(|(g, d, r)| render(&g, &d, &r).into_bytes()),
                Just(EXAMPLE.as_bytes().to_vec()),
            ];
            ntlm_fuzz::havoc(valid)
        }

        /// Any text gets Ok or an error whose problems lie on lines inside it; never a panic.
        fn ok_or_lines_inside(text: &str) -> Result<(), TestCaseError> {
            if let Err(e) = parse(text, "t.toml") {
                lines_are_inside(text, &e)?;
            }
            Ok(())
        }

        /// A valid file, rendered to text, parses back to the model it was made from.
        fn round_trips((global, defaults, routes): Generated) -> Result<(), TestCaseError> {
            let text = render(&global, &defaults, &routes);
            let got = parse(&text, "t.toml").map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(got, expected(&global, &defaults, &routes), "{}", text);
            Ok(())
        }

        /// A valid file with a line deleted is still valid or rejected with problems on lines
        /// inside it; one with an unknown key inserted is rejected so.
        fn edited_names_a_line((text, insert): (String, bool)) -> Result<(), TestCaseError> {
            match parse(&text, "t.toml") {
                Ok(_) => prop_assert!(!insert, "an unknown key was accepted:\n{}", text),
                Err(e) => lines_are_inside(&text, &e)?,
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

            /// See [`ok_or_lines_inside`].
            #[test]
            fn any_text_never_panics(bytes in any_bytes()) {
                ok_or_lines_inside(&String::from_utf8_lossy(&bytes))?;
            }

            /// See [`ok_or_lines_inside`].
            #[test]
            fn toml_like_text_never_panics(text in toml_like_text()) {
                ok_or_lines_inside(&text)?;
            }

            /// See [`ok_or_lines_inside`].
            #[test]
            fn valid_files_with_random_edits_never_panic(bytes in havoc_on_valid_files()) {
                ok_or_lines_inside(&String::from_utf8_lossy(&bytes))?;
            }

            /// See [`round_trips`].
            #[test]
            fn generated_files_round_trip(parts in generated()) {
                round_trips(parts)?;
            }

            /// See [`edited_names_a_line`].
            #[test]
            fn mutated_files_name_a_line(case in line_edited()) {
                edited_names_a_line(case)?;
            }
        }

        /// The config file properties above, on fresh cases for a time budget instead of
        /// [`CASES`] cases (see the `ntlm_fuzz` crate).
        #[test]
        #[ignore = "fuzz target: `cargo xtask test` runs it for NTLM_SPLICE_FUZZ_SECS"]
        fn fuzz_config_file() {
            let lossy = |bytes: Vec<u8>| ok_or_lines_inside(&String::from_utf8_lossy(&bytes));
            ntlm_fuzz::Target::new("config_file")
                .property("any bytes", any_bytes(), Clone::clone, lossy)
                .property("toml-like text", toml_like_text(), |t| t.clone().into_bytes(), |t| ok_or_lines_inside(&t))
                .property("havoc on valid files", havoc_on_valid_files(), Clone::clone, lossy)
                .property(
                    "generated files round trip",
                    generated(),
                    |(g, d, r)| render(g, d, r).into_bytes(),
                    round_trips,
                )
                .property(
                    "line deleted or unknown key",
                    line_edited(),
                    |(t, _)| t.clone().into_bytes(),
                    edited_names_a_line,
                )
                .run();
        }
    }
}
