//! Command line and validated runtime configuration.
//!
//! Every flag is parsed by clap, then [`Cli::into_config`] checks the values together and
//! rejects a bad combination before anything is bound or loaded, naming the flag and the fix.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

pub mod diff;
pub mod file;

/// Default time allowed for a backend TCP connect before the next backend is tried.
pub const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
/// Default time a connection may carry no byte in either direction before both sides close.
pub const DEFAULT_IDLE_TIMEOUT: &str = "1h";
/// Default time live connections get to finish after SIGTERM/SIGINT before they are closed.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "30s";
/// Default cap on concurrent client connections (each also holds one backend socket).
/// Kept well below the common 20k-65k open-file limits: two descriptors per connection.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default per-connection cap on bytes the kernel holds in flight between the two sockets
/// (sockmap engine): beyond this the source socket is paused and TCP flow control pushes back.
pub const DEFAULT_MAX_INFLIGHT: u64 = 4 << 20;
/// Default cap on in-flight bytes summed over all sockmap connections.
pub const DEFAULT_MAX_INFLIGHT_TOTAL: u64 = 256 << 20;
/// Default send buffer of each socket of a sockmap connection (see `--sockmap-sndbuf`).
pub const DEFAULT_SOCKMAP_SNDBUF: u64 = 8 << 20;
/// Most `--sockmap-sndbuf` (the kernel takes it as an int, then doubles half of it).
pub const MAX_SOCKMAP_SNDBUF: u64 = 1 << 30;
/// Default capacity of the pipes the splice engine moves bytes through (see `--pipe-size`).
pub const DEFAULT_PIPE_SIZE: u64 = 1 << 20;
/// Most `--pipe-size`.
pub const MAX_PIPE_SIZE: u64 = 64 << 20;
/// Default time without a byte either way after which a splice-engine connection is parked.
pub const DEFAULT_PARK_AFTER: &str = "2s";
/// Most `--threads`: more threads than cores only cost memory.
pub const MAX_THREADS: usize = 1024;

/// Which data engine moves the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineChoice {
    /// sockmap if it loads and passes its self-test, else splice (and the log says why).
    Auto,
    /// In-kernel: eBPF sk_skb programs redirect between the paired sockets. Fails if unavailable.
    Sockmap,
    /// Userspace: splice(2) through a pipe per direction, driven by tokio readiness.
    Splice,
}

/// How a backend is picked for a new client connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Balance {
    /// Each new connection goes to the next backend in turn.
    RoundRobin,
    /// The backend with the fewest live connections from this process (ties: in turn).
    LeastConn,
    /// A hash of the client IP address, so one client keeps landing on one backend
    /// (useful when a login spans several TCP connections, e.g. Negotiate retries).
    SourceHash,
}

/// ntlm-splice: a TCP splicer that gives every client connection exactly one backend
/// connection of its own, for its whole life, never pooled or reused, closed together.
/// Built for connection-authenticated services (NTLM, Negotiate/Kerberos: IIS Windows
/// Authentication, Exchange, SharePoint). TLS passes through untouched.
#[derive(Debug, Parser)]
#[command(name = "ntlm-splice", version, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub proxy: ProxyArgs,
}

/// Subcommands besides running the proxy.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print what this host supports (privilege, BPF, sockmap, self-test) and which engine
    /// `--engine auto` would pick. Exits 0 even when eBPF is unavailable.
    Doctor,
}

/// Flags of the proxy itself.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Address to accept clients on, IPv4 or IPv6 (`[::1]:8080`). Repeat for several.
    /// Port 0 picks a free port (the log says which).
    #[arg(long = "listen", value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,

    /// Backend server (`host:port`, resolved once at start). Repeat for several; each client
    /// connection is paired with one new connection to one of them.
    #[arg(long = "backend", value_name = "HOST:PORT")]
    pub backend: Vec<String>,

    /// Data engine.
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,

    /// Backend selection policy. On connect failure the next backends are tried in turn.
    #[arg(long, value_enum, default_value_t = Balance::RoundRobin)]
    pub balance: Balance,

    /// Time allowed for each backend connect (e.g. 500ms, 5s) before trying the next.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_CONNECT_TIMEOUT, value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Close both sides after this long with no byte moving in either direction (e.g. 90s,
    /// 1h). `0` disables the idle timeout.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_IDLE_TIMEOUT, value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// On SIGTERM/SIGINT stop accepting, let live connections finish for up to this long,
    /// then close them.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_DRAIN_TIMEOUT, value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Most concurrent client connections. Further clients wait in the listen backlog
    /// until a connection ends (the kernel refuses them once the backlog is full).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// sockmap engine: most bytes held in the kernel between the two sockets of one
    /// connection (e.g. 4MiB); past it the sender is paused by TCP flow control.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_INFLIGHT, value_parser = parse_bytes)]
    pub max_inflight: u64,

    /// sockmap engine: most in-flight bytes summed over all connections (e.g. 256MiB).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_INFLIGHT_TOTAL, value_parser = parse_bytes)]
    pub max_inflight_total: u64,

    /// sockmap engine: send buffer of both sockets of a connection (e.g. 8MiB; 0 keeps the
    /// kernel's autotuning, net.ipv4.tcp_wmem). The kernel moves redirected bytes into a
    /// socket only while less than half of this is queued on it and otherwise tries again a
    /// timer tick later (4 ms at HZ=250), so a buffer smaller than about 8 ms of traffic
    /// leaves the socket idle between refills. Memory is used only while bytes are queued.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_SOCKMAP_SNDBUF, value_parser = parse_bytes)]
    pub sockmap_sndbuf: u64,

    /// splice engine: capacity of the pipe each direction moves bytes through while a burst
    /// is in flight (e.g. 1MiB; 0 keeps the kernel's default, 64KiB). One splice(2) call moves
    /// at most this much, so a larger pipe means fewer system calls and wake-ups per byte.
    /// Pipes are held only while bytes are in flight. Above /proc/sys/fs/pipe-max-size, or
    /// past the user's pipe-user-pages-soft without CAP_SYS_RESOURCE, a pipe keeps the
    /// default size.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_PIPE_SIZE, value_parser = parse_bytes)]
    pub pipe_size: u64,

    /// splice engine: after this long with no byte moving either way, a connection gives up
    /// its task and its runtime registrations and waits in one compact table until either
    /// socket has bytes, a FIN or an error: less memory per idle connection, a little more
    /// latency on the first request after it (the README has the figures). `0` keeps every
    /// connection in its task.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_PARK_AFTER, value_parser = parse_duration)]
    pub park_after: Duration,

    /// Worker threads that serve the connections (default: one per CPU). On a small machine
    /// shared with other busy processes, 1 costs less CPU per connection (fewer wake-ups
    /// between threads) but can use only one core.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// Validated configuration of a proxy run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to listen on (at least one).
    pub listen: Vec<SocketAddr>,
    /// Resolved backend addresses (at least one), in the order given.
    pub backends: Vec<SocketAddr>,
    /// Requested engine.
    pub engine: EngineChoice,
    /// Balancing policy.
    pub balance: Balance,
    /// Per-backend connect timeout.
    pub connect_timeout: Duration,
    /// Idle timeout; `None` disables it.
    pub idle_timeout: Option<Duration>,
    /// Drain timeout on shutdown.
    pub drain_timeout: Duration,
    /// Connection cap.
    pub max_connections: usize,
    /// Per-connection kernel in-flight cap (sockmap).
    pub max_inflight: u64,
    /// Global kernel in-flight cap (sockmap).
    pub max_inflight_total: u64,
    /// Send buffer of sockmap sockets; 0: the kernel's autotuning.
    pub sockmap_sndbuf: u64,
    /// Capacity of the splice engine's pipes; 0: the kernel's default.
    pub pipe_size: u64,
    /// Idle time after which a splice-engine connection is parked; `None`: never.
    pub park_after: Option<Duration>,
}

/// The defaults of every flag, with no listener and no backend: what `doctor` loads the
/// sockmap engine with, and the base of tests' configurations.
impl Default for Config {
    fn default() -> Self {
        let d = |s: &str| parse_duration(s).expect("the default durations parse");
        Config {
            listen: Vec::new(),
            backends: Vec::new(),
            engine: EngineChoice::Auto,
            balance: Balance::RoundRobin,
            connect_timeout: d(DEFAULT_CONNECT_TIMEOUT),
            idle_timeout: Some(d(DEFAULT_IDLE_TIMEOUT)),
            drain_timeout: d(DEFAULT_DRAIN_TIMEOUT),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_inflight_total: DEFAULT_MAX_INFLIGHT_TOTAL,
            sockmap_sndbuf: DEFAULT_SOCKMAP_SNDBUF,
            pipe_size: DEFAULT_PIPE_SIZE,
            park_after: Some(d(DEFAULT_PARK_AFTER)),
        }
    }
}

/// A configuration that cannot run, with the flag at fault and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No `--listen`.
    #[error("no --listen address given: pass e.g. --listen 0.0.0.0:443 (repeatable)")]
    NoListen,
    /// No `--backend`.
    #[error("no --backend given: pass e.g. --backend 10.0.0.5:443 (repeatable)")]
    NoBackend,
    /// A backend that does not resolve.
    #[error("--backend {spec}: cannot resolve it ({source}); give host:port or ip:port")]
    Resolve {
        /// The flag's value.
        spec: String,
        /// Resolver error.
        source: std::io::Error,
    },
    /// A value out of range.
    #[error("{flag} {value}: {why}")]
    Invalid {
        /// Which flag.
        flag: &'static str,
        /// Its value.
        value: String,
        /// What is wrong and the fix.
        why: &'static str,
    },
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{e}; write a duration such as 500ms, 5s, 2m or 1h"))
}

pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 4194304, 512KiB, 4MiB or 1GiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "KiB" | "k" => 1 << 10,
        "M" | "MB" | "MiB" | "m" => 1 << 20,
        "G" | "GB" | "GiB" | "g" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}; use KiB, MiB or GiB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

impl ProxyArgs {
    /// The number of worker threads: `--threads`, else one per CPU.
    ///
    /// Not part of [`Config`]: it sizes the runtime, which has to exist before the rest of
    /// the configuration can be checked (backends are resolved on it).
    pub fn worker_threads(&self) -> Result<usize, ConfigError> {
        match self.threads {
            None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
            Some(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
            Some(n) => Err(ConfigError::Invalid {
                flag: "--threads",
                value: n.to_string(),
                why: "must be from 1 to 1024; leave it out for one per CPU",
            }),
        }
    }

    /// Checks every value and resolves backends. Nothing is bound or loaded yet.
    pub async fn into_config(self) -> Result<Config, ConfigError> {
        self.worker_threads()?;
        if self.listen.is_empty() {
            return Err(ConfigError::NoListen);
        }
        if self.backend.is_empty() {
            return Err(ConfigError::NoBackend);
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                flag: "--connect-timeout",
                value: "0".into(),
                why: "must be greater than zero, e.g. 5s",
            });
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid {
                flag: "--max-connections",
                value: "0".into(),
                why: "must be at least 1",
            });
        }
        if self.max_inflight < 64 << 10 {
            return Err(ConfigError::Invalid {
                flag: "--max-inflight",
                value: self.max_inflight.to_string(),
                why: "must be at least 64KiB (one loopback segment), e.g. 4MiB",
            });
        }
        if self.max_inflight_total < self.max_inflight {
            return Err(ConfigError::Invalid {
                flag: "--max-inflight-total",
                value: self.max_inflight_total.to_string(),
                why: "must be at least --max-inflight",
            });
        }
        if self.sockmap_sndbuf != 0 && !(64 << 10..=MAX_SOCKMAP_SNDBUF).contains(&self.sockmap_sndbuf) {
            return Err(ConfigError::Invalid {
                flag: "--sockmap-sndbuf",
                value: self.sockmap_sndbuf.to_string(),
                why: "must be 0 (kernel autotuning) or from 64KiB to 1GiB, e.g. 8MiB",
            });
        }
        if self.pipe_size != 0 && !(64 << 10..=MAX_PIPE_SIZE).contains(&self.pipe_size) {
            return Err(ConfigError::Invalid {
                flag: "--pipe-size",
                value: self.pipe_size.to_string(),
                why: "must be 0 (the kernel's default) or from 64KiB to 64MiB, e.g. 1MiB",
            });
        }
        let mut backends = Vec::new();
        for spec in &self.backend {
            let mut addrs = tokio::net::lookup_host(spec.as_str())
                .await
                .map_err(|source| ConfigError::Resolve { spec: spec.clone(), source })?;
            let addr = addrs.next().ok_or_else(|| ConfigError::Resolve {
                spec: spec.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
            })?;
            backends.push(addr);
        }
        Ok(Config {
            listen: self.listen,
            backends,
            engine: self.engine,
            balance: self.balance,
            connect_timeout: self.connect_timeout,
            idle_timeout: (!self.idle_timeout.is_zero()).then_some(self.idle_timeout),
            drain_timeout: self.drain_timeout,
            max_connections: self.max_connections,
            max_inflight: self.max_inflight,
            max_inflight_total: self.max_inflight_total,
            sockmap_sndbuf: self.sockmap_sndbuf,
            pipe_size: self.pipe_size,
            park_after: (!self.park_after.is_zero()).then_some(self.park_after),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<ProxyArgs, clap::Error> {
        let mut v = vec!["ntlm-splice"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).map(|c| c.proxy)
    }

    #[tokio::test]
    async fn full_command_line_parses() {
        let cfg = args(&[
            "--listen", "127.0.0.1:8080", "--listen", "[::1]:8080",
            "--backend", "127.0.0.1:18080", "--backend", "[::1]:18081",
            "--engine", "splice", "--balance", "least-conn",
            "--connect-timeout", "250ms", "--idle-timeout", "0", "--max-connections", "10",
            "--max-inflight", "8MiB",
        ])
        .unwrap()
        .into_config()
        .await
        .unwrap();
        assert_eq!(cfg.listen.len(), 2);
        assert_eq!(cfg.backends[1], "[::1]:18081".parse().unwrap());
        assert_eq!(cfg.engine, EngineChoice::Splice);
        assert_eq!(cfg.balance, Balance::LeastConn);
        assert_eq!(cfg.connect_timeout, Duration::from_millis(250));
        assert_eq!(cfg.idle_timeout, None);
        assert_eq!(cfg.max_inflight, 8 << 20);
        assert_eq!(cfg.park_after, Some(Duration::from_secs(2)), "--park-after by default");
        let base = ["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2"];
        for (v, want) in [("0", None), ("500ms", Some(Duration::from_millis(500)))] {
            let c = args(&[&base[..], &["--park-after", v]].concat()).unwrap().into_config().await.unwrap();
            assert_eq!(c.park_after, want, "--park-after {v}");
        }
    }

    /// `Config::default()` is what the flags' defaults give, apart from the addresses.
    #[tokio::test]
    async fn default_config_matches_the_default_flags() {
        let mut c = args(&["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2"]).unwrap().into_config().await.unwrap();
        (c.listen, c.backends) = (Vec::new(), Vec::new());
        assert_eq!(format!("{c:?}"), format!("{:?}", Config::default()));
    }

    #[tokio::test]
    async fn missing_backend_names_the_flag() {
        let e = args(&["--listen", "127.0.0.1:1"]).unwrap().into_config().await.unwrap_err();
        assert!(e.to_string().contains("--backend"), "{e}");
    }

    #[test]
    fn bad_duration_says_how_to_write_one() {
        let e = args(&["--connect-timeout", "5 parsecs"]).unwrap_err().to_string();
        assert!(e.contains("such as 500ms"), "{e}");
    }

    #[test]
    fn bad_engine_is_rejected() {
        let e = args(&["--engine", "xdp"]).unwrap_err().to_string();
        assert!(e.contains("possible values"), "{e}");
    }

    #[tokio::test]
    async fn zero_connect_timeout_is_rejected() {
        let e = args(&["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--connect-timeout", "0"])
            .unwrap()
            .into_config()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("--connect-timeout"), "{e}");
    }

    #[tokio::test]
    async fn thread_count_is_checked() {
        let base = ["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2"];
        for bad in ["0", "1025"] {
            let a = args(&[&base[..], &["--threads", bad]].concat()).unwrap();
            let e = a.worker_threads().unwrap_err().to_string();
            assert!(e.contains("--threads") && e.contains("from 1 to 1024"), "{e}");
            let e = a.into_config().await.unwrap_err().to_string();
            assert!(e.contains("--threads"), "{e}");
        }
        let e = args(&[&base[..], &["--threads", "two"]].concat()).unwrap_err().to_string();
        assert!(e.contains("--threads"), "{e}");
        let a = args(&[&base[..], &["--threads", "1"]].concat()).unwrap();
        assert_eq!(a.worker_threads().unwrap(), 1);
        a.into_config().await.unwrap();
        let a = args(&base).unwrap();
        assert_eq!(a.worker_threads().unwrap(), std::thread::available_parallelism().unwrap().get());
        assert_eq!(MAX_THREADS, 1024, "the message above names the limit");
    }

    /// A byte-size flag: each of `bad` is rejected naming the flag and its `range`, each of
    /// `ok` lands in the config (read by `get`), and without the flag the config has `default`.
    async fn byte_flag_is_checked(
        flag: &str,
        bad: [&str; 2],
        range: &str,
        ok: [(&str, u64); 2],
        default: u64,
        get: fn(&Config) -> u64,
    ) {
        let base = ["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2"];
        for b in bad {
            let e = args(&[&base[..], &[flag, b]].concat()).unwrap().into_config().await.unwrap_err();
            assert!(e.to_string().contains(flag) && e.to_string().contains(range), "{e}");
        }
        for (o, want) in ok {
            let c = args(&[&base[..], &[flag, o]].concat()).unwrap().into_config().await.unwrap();
            assert_eq!(get(&c), want, "{flag} {o}");
        }
        let c = args(&base).unwrap().into_config().await.unwrap();
        assert_eq!(get(&c), default, "{flag} by default");
    }

    #[tokio::test]
    async fn sockmap_sndbuf_is_checked() {
        let ok = [("0", 0), ("16MiB", 16 << 20)];
        byte_flag_is_checked("--sockmap-sndbuf", ["1KiB", "2GiB"], "64KiB to 1GiB", ok, DEFAULT_SOCKMAP_SNDBUF, |c| {
            c.sockmap_sndbuf
        })
        .await;
    }

    #[tokio::test]
    async fn pipe_size_is_checked() {
        let ok = [("0", 0), ("256KiB", 256 << 10)];
        byte_flag_is_checked("--pipe-size", ["4KiB", "128MiB"], "64KiB to 64MiB", ok, DEFAULT_PIPE_SIZE, |c| c.pipe_size)
            .await;
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_bytes("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert!(parse_bytes("4 furlongs").is_err());
    }
}
