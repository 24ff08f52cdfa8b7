//! The command line, and the validated configuration a proxy runs with.
//!
//! A configuration comes from a file (`--config FILE`, [`file`]: every route, listener and
//! pool) or from the flags, which are the shorthand for one route named `default`. Either way
//! [`ProxyArgs::into_config`] returns the same validated [`Config`] before anything is
//! resolved, bound or loaded, and every problem is named (the flag, or the file's key and
//! line) with its fix. [`diff`] computes what a reload changes.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    identity::{DEFAULT_ACCEPT_PROXY_TIMEOUT, ProxyVersion, Source, parse_proxy_version},
    proxy_proto::Trusted,
};

pub mod diff;
pub mod file;

pub use file::FileConfig as Config;
use file::{BackendAddr, Global, MetricsSpec, RouteOptions, RouteSpec};

/// The name of the one route the command-line flags describe.
pub const FLAG_ROUTE: &str = "default";

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
    /// splice in this release (the sockmap engine is opt-in; the start-up log says why).
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
    /// Validate a configuration file without binding or loading anything (as `nginx -t`):
    /// exit 0 and a summary if it is good, non-zero with every problem (line, key, fix) if not.
    Check {
        /// The configuration file.
        #[arg(long = "config", value_name = "FILE")]
        config: PathBuf,
    },
    /// Upgrade the running proxy without dropping a connection: it starts the binary again
    /// (or --binary) with the same arguments and hands it its listening sockets and live
    /// connections (as SIGUSR2 does); prints the outcome. See docs/upgrade.md.
    Upgrade {
        /// The running proxy's process id.
        #[arg(long, value_name = "PID")]
        pid: u32,
        /// The binary to start instead of the proxy's own path.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
}

/// Flags of the proxy itself.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Read listeners, routes and pools from this TOML file (see docs/examples/ntlm-splice.toml)
    /// instead of the flags below, and re-read it on SIGHUP. The route and process flags
    /// cannot be combined with it: put them in the file.
    #[arg(long = "config", value_name = "FILE", conflicts_with_all = [
        "listen", "backend", "engine", "balance", "connect_timeout", "idle_timeout", "drain_timeout",
        "max_connections", "max_inflight", "max_inflight_total", "sockmap_sndbuf", "sockmap_allow_affected_kernel",
        "pipe_size",
        "park_after", "threads", "source", "proxy_protocol", "accept_proxy_from", "accept_proxy_timeout",
        "metrics_listen",
    ])]
    pub config: Option<PathBuf>,

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

    /// sockmap engine: run it even on a kernel with a known sockmap defect that the engine
    /// meets (start-up refuses it otherwise, naming the defect and the release with the
    /// fix; `ntlm-splice doctor` lists them). Only for a kernel that carries the fix without
    /// its number saying so, e.g. a distribution backport.
    #[arg(long)]
    pub sockmap_allow_affected_kernel: bool,

    /// splice engine: capacity of the pipe each direction moves bytes through while a burst
    /// is in flight (e.g. 1MiB; 0 keeps the kernel's default, 64KiB). One splice(2) call moves
    /// at most this much, so a larger pipe means fewer system calls and wake-ups per byte.
    /// Pipes are held only while bytes are in flight. Above /proc/sys/fs/pipe-max-size, or
    /// past the user's pipe-user-pages-soft without CAP_SYS_RESOURCE, a pipe keeps the
    /// default size.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_PIPE_SIZE, value_parser = parse_bytes)]
    pub pipe_size: u64,

    /// After this long with no byte moving either way, a connection gives up its task and
    /// its runtime registrations and waits in one compact table until either socket has
    /// bytes, a FIN or an error (sockmap engine: the pair stays in the kernel path, and a
    /// byte the kernel forwards also brings it back): less memory per idle connection, a little more
    /// latency on the first request after it (the README has the figures). `0` keeps every
    /// connection in its task.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_PARK_AFTER, value_parser = parse_duration)]
    pub park_after: Duration,

    /// Worker threads that serve the connections (default: one per CPU). On a small machine
    /// shared with other busy processes, 1 costs less CPU per connection (fewer wake-ups
    /// between threads) but can use only one core.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Where backend connections come from: `client` (the client's own address and port, so
    /// a backend such as IIS logs the real client; needs CAP_NET_ADMIN and the policy routing
    /// in the README), `client-ip` (the client's address, any port), or a local IP address.
    /// Default: the kernel picks.
    #[arg(long, value_name = "client|client-ip|IP")]
    pub source: Option<Source>,

    /// Send a PROXY protocol header (`v1` or `v2`) on each backend connection before the
    /// client's bytes, for backends that read it (HAProxy, nginx, appliances; not IIS).
    // Spelled `std::option::Option` so that clap takes the parser's `Option` ("off" is None)
    // as the value, instead of making the flag optional.
    #[arg(long, value_name = "v1|v2|off", default_value = "off", value_parser = parse_proxy_version)]
    pub proxy_protocol: std::option::Option<ProxyVersion>,

    /// Clients from these networks (an outer load balancer) must start with a PROXY v1 or v2
    /// header, whose source address is then the client. Comma separated or repeated, e.g.
    /// `10.0.0.0/8,2001:db8::/32`. Anyone else sending a header is closed.
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    pub accept_proxy_from: Vec<String>,

    /// Time a source in --accept-proxy-from has to send its whole PROXY header.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_ACCEPT_PROXY_TIMEOUT, value_parser = parse_duration)]
    pub accept_proxy_timeout: Duration,

    /// Serve metrics for Prometheus on this address (ip:port, e.g. 127.0.0.1:9100): GET
    /// /metrics, /healthz and /readyz. Keep it on loopback or a management network.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,

    /// Once the listeners are bound and the engines loaded, switch to this user (its primary
    /// group and supplementary groups) and keep only the capabilities still needed (the README,
    /// Privileges, says which). Also `user` in the file's `[global]`; may be combined with
    /// --config. Needs root (or CAP_SETUID, CAP_SETGID and CAP_SETPCAP) at start.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// With --user: switch to this group instead of the user's primary group.
    #[arg(long, value_name = "NAME", requires = "user")]
    pub group: Option<String>,

    /// With --config: read the file every DURATION and reload (as SIGHUP does) when its
    /// content has changed. For a file you cannot send a signal for, e.g. a Kubernetes
    /// ConfigMap volume, which is updated by swapping a symlink.
    #[arg(long, value_name = "DURATION", value_parser = parse_watch_interval)]
    pub watch_config: Option<Duration>,
}

/// The flags' defaults and no route: what `doctor` loads the sockmap engine with, and the
/// base of tests' configurations.
impl Default for Config {
    fn default() -> Self {
        Config { global: Global::default(), routes: Vec::new(), metrics: MetricsSpec::default() }
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
    /// A `--backend` that is not `host:port`.
    #[error("--backend {spec}: {why}")]
    Backend {
        /// The flag's value.
        spec: String,
        /// What is wrong and the fix.
        why: String,
    },
    /// An `--accept-proxy-from` entry that is not a network.
    #[error("--accept-proxy-from: {0}")]
    Trusted(String),
    /// The configuration file (`--config`): every problem with its line, key and fix.
    #[error(transparent)]
    File(#[from] file::FileError),
    /// `--user`/`--group` and the file's `[global]` key name different accounts.
    #[error(
        "{flag} {flag_value:?} and `{key} = {file_value:?}` in {path} differ: keep one of them (or make them equal)"
    )]
    AccountConflict {
        /// The flag.
        flag: &'static str,
        /// Its value.
        flag_value: String,
        /// The file's key.
        key: &'static str,
        /// The file's value.
        file_value: String,
        /// The file.
        path: String,
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
    humantime::parse_duration(s).map_err(|e| format!("{e}; write a duration such as 500ms, 5s, 2m or 1h"))
}

/// `--watch-config`: a duration above zero (zero would read the file in a busy loop).
fn parse_watch_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err("must be above 0; leave the flag out to reload on SIGHUP only".into()),
        d => Ok(d),
    }
}

pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size; write e.g. 4194304, 512KiB, 4MiB or 1GiB"))?;
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
    /// The number of worker threads for `config`: `--threads` (or the file's `threads`),
    /// else one per CPU.
    pub fn worker_threads(config: &Config) -> usize {
        config.global.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// The validated configuration, and the file it came from (`None`: from the flags). Host
    /// names are resolved later, when the routes are built; nothing is bound or loaded yet.
    pub fn into_config(self) -> Result<(Config, Option<PathBuf>), ConfigError> {
        for (flag, v) in [("--user", &self.user), ("--group", &self.group)] {
            if let Some(v) = v
                && let Some(why) = file::account_name_problem(v)
            {
                return Err(ConfigError::Invalid { flag, value: v.clone(), why });
            }
        }
        if self.config.is_none()
            && let Some(d) = self.watch_config
        {
            let why = "watches a configuration file: add --config FILE (flags are read once)";
            return Err(ConfigError::Invalid {
                flag: "--watch-config",
                value: humantime::format_duration(d).to_string(),
                why,
            });
        }
        if let Some(path) = self.config {
            let mut config = file::load(&path)?;
            let g = &mut config.global;
            for (flag, key, given, slot) in
                [("--user", "user", self.user, &mut g.user), ("--group", "group", self.group, &mut g.group)]
            {
                match (given, slot.as_ref()) {
                    (Some(v), Some(f)) if v != *f => {
                        return Err(ConfigError::AccountConflict {
                            flag,
                            flag_value: v,
                            key,
                            file_value: f.clone(),
                            path: path.display().to_string(),
                        });
                    }
                    (Some(v), _) => *slot = Some(v),
                    (None, _) => {}
                }
            }
            if g.group.is_some() && g.user.is_none() {
                // `--group` with a file that sets no user (`requires` covers only the flags).
                let why = "needs a user: pass --user or set `user` in [global]";
                return Err(ConfigError::Invalid { flag: "--group", value: g.group.clone().unwrap_or_default(), why });
            }
            return Ok((config, Some(path)));
        }
        let invalid = |flag, value: String, why| ConfigError::Invalid { flag, value, why };
        if let Some(n) = self.threads
            && !(1..=MAX_THREADS).contains(&n)
        {
            return Err(invalid("--threads", n.to_string(), "must be from 1 to 1024; leave it out for one per CPU"));
        }
        if self.listen.is_empty() {
            return Err(ConfigError::NoListen);
        }
        if self.backend.is_empty() {
            return Err(ConfigError::NoBackend);
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid("--connect-timeout", "0".into(), "must be greater than zero, e.g. 5s"));
        }
        if self.max_connections == 0 {
            return Err(invalid("--max-connections", "0".into(), "must be at least 1"));
        }
        if self.max_inflight < 64 << 10 {
            return Err(invalid(
                "--max-inflight",
                self.max_inflight.to_string(),
                "must be at least 64KiB (one loopback segment), e.g. 4MiB",
            ));
        }
        if self.max_inflight_total < self.max_inflight {
            return Err(invalid(
                "--max-inflight-total",
                self.max_inflight_total.to_string(),
                "must be at least --max-inflight",
            ));
        }
        if self.sockmap_sndbuf != 0 && !(64 << 10..=MAX_SOCKMAP_SNDBUF).contains(&self.sockmap_sndbuf) {
            return Err(invalid(
                "--sockmap-sndbuf",
                self.sockmap_sndbuf.to_string(),
                "must be 0 (kernel autotuning) or from 64KiB to 1GiB, e.g. 8MiB",
            ));
        }
        if self.pipe_size != 0 && !(64 << 10..=MAX_PIPE_SIZE).contains(&self.pipe_size) {
            return Err(invalid(
                "--pipe-size",
                self.pipe_size.to_string(),
                "must be 0 (the kernel's default) or from 64KiB to 64MiB, e.g. 1MiB",
            ));
        }
        let backends = self
            .backend
            .iter()
            .map(|spec| file::parse_backend(spec).map_err(|why| ConfigError::Backend { spec: spec.clone(), why }))
            .collect::<Result<Vec<BackendAddr>, _>>()?;
        if self.accept_proxy_timeout.is_zero() {
            return Err(invalid("--accept-proxy-timeout", "0".into(), "must be greater than zero, e.g. 5s"));
        }
        let accept_proxy_from =
            Trusted::parse(&self.accept_proxy_from).map_err(|e| ConfigError::Trusted(e.to_string()))?;
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        let route = RouteSpec {
            name: FLAG_ROUTE.into(),
            listen: self.listen,
            backends,
            sni: Vec::new(),
            options: RouteOptions {
                engine: self.engine,
                balance: self.balance,
                connect_timeout: self.connect_timeout,
                idle_timeout: nonzero(self.idle_timeout),
                park_after: nonzero(self.park_after),
                source: self.source,
                proxy_protocol: self.proxy_protocol,
                accept_proxy_from,
                accept_proxy_timeout: self.accept_proxy_timeout,
                ..RouteOptions::default()
            },
            health: None,
            guard: None,
        };
        let global = Global {
            drain_timeout: self.drain_timeout,
            max_connections: self.max_connections,
            threads: self.threads,
            max_inflight: self.max_inflight,
            max_inflight_total: self.max_inflight_total,
            sockmap_sndbuf: self.sockmap_sndbuf,
            pipe_size: self.pipe_size,
            user: self.user,
            group: self.group,
            sockmap_allow_affected_kernel: self.sockmap_allow_affected_kernel,
        };
        if let Some(m) = self.metrics_listen
            && m.port() != 0
            && route.listen.contains(&m)
        {
            let why = "is also a --listen address; give metrics a port of its own";
            return Err(invalid("--metrics-listen", m.to_string(), why));
        }
        let metrics = MetricsSpec { listen: self.metrics_listen };
        Ok((Config { global, routes: vec![route], metrics }, None))
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

    /// The flags' configuration: from the command line, one route.
    fn config(extra: &[&str]) -> Result<Config, ConfigError> {
        let (c, path) = args(extra).unwrap().into_config()?;
        assert!(path.is_none());
        Ok(c)
    }

    #[test]
    fn full_command_line_parses() {
        let cfg = config(&[
            "--listen",
            "127.0.0.1:8080",
            "--listen",
            "[::1]:8080",
            "--backend",
            "127.0.0.1:18080",
            "--backend",
            "[::1]:18081",
            "--backend",
            "iis1.example.net:443",
            "--engine",
            "splice",
            "--balance",
            "least-conn",
            "--connect-timeout",
            "250ms",
            "--idle-timeout",
            "0",
            "--max-connections",
            "10",
            "--max-inflight",
            "8MiB",
        ])
        .unwrap();
        assert_eq!(cfg.routes.len(), 1);
        let r = &cfg.routes[0];
        assert_eq!(r.name, FLAG_ROUTE);
        assert_eq!(r.listen.len(), 2);
        assert_eq!(r.backends[1], BackendAddr { host: "::1".into(), port: 18081 });
        assert_eq!(r.backends[2].to_string(), "iis1.example.net:443", "names are kept to be resolved later");
        assert_eq!(r.options.engine, EngineChoice::Splice);
        assert_eq!(r.options.balance, Balance::LeastConn);
        assert_eq!(r.options.connect_timeout, Duration::from_millis(250));
        assert_eq!(r.options.idle_timeout, None);
        assert_eq!(cfg.global.max_inflight, 8 << 20);
        assert_eq!(cfg.global.max_connections, 10);
        assert_eq!(r.options.park_after, Some(Duration::from_secs(2)), "--park-after by default");
        let base = ["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2"];
        for (v, want) in [("0", None), ("500ms", Some(Duration::from_millis(500)))] {
            let c = config(&[&base[..], &["--park-after", v]].concat()).unwrap();
            assert_eq!(c.routes[0].options.park_after, want, "--park-after {v}");
        }
    }

    /// `Config::default()` and `RouteOptions::default()` are what the flags' defaults give,
    /// apart from the route.
    #[test]
    fn default_config_matches_the_default_flags() {
        let mut c = config(&["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2"]).unwrap();
        let route = c.routes.remove(0);
        assert_eq!(route.options, RouteOptions::default());
        assert_eq!(c, Config::default());
    }

    /// `--user`/`--group`: on the flags' route, or with --config, where a file's different
    /// `user` is an error rather than a silent choice.
    #[test]
    fn user_and_group_flags() {
        let base = ["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2"];
        let c = config(&[&base[..], &["--user", "ntlm-splice", "--group", "proxy"]].concat()).unwrap();
        assert_eq!((c.global.user.as_deref(), c.global.group.as_deref()), (Some("ntlm-splice"), Some("proxy")));
        assert!(args(&[&base[..], &["--group", "proxy"]].concat()).is_err(), "--group needs --user");
        let e = config(&[&base[..], &["--user", "a:b"]].concat()).unwrap_err().to_string();
        assert!(e.starts_with("--user a:b: has whitespace"), "{e}");

        let dir = std::env::temp_dir().join(format!("ntlm-splice-user-flags-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let route = "[[route]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\"]\nbackends = [\"127.0.0.1:2\"]\n";
        let plain = dir.join("plain.toml");
        std::fs::write(&plain, route).unwrap();
        let with_user = dir.join("user.toml");
        std::fs::write(&with_user, format!("[global]\nuser = \"svc\"\n\n{route}")).unwrap();
        let from = |file: &std::path::Path, extra: &[&str]| {
            let p = file.to_str().unwrap();
            args(&[&["--config", p][..], extra].concat()).unwrap().into_config().map(|(c, _)| c.global)
        };
        let g = from(&plain, &["--user", "ntlm-splice"]).unwrap();
        assert_eq!((g.user.as_deref(), g.group), (Some("ntlm-splice"), None), "the flag with a file");
        assert_eq!(from(&with_user, &[]).unwrap().user.as_deref(), Some("svc"));
        assert_eq!(from(&with_user, &["--user", "svc"]).unwrap().user.as_deref(), Some("svc"), "equal is fine");
        let e = from(&with_user, &["--user", "other"]).unwrap_err().to_string();
        assert!(e.contains("--user \"other\" and `user = \"svc\"`") && e.contains("keep one of them"), "{e}");
        let e = from(&plain, &["--user", "a", "--group", "b c"]).unwrap_err().to_string();
        assert!(e.starts_with("--group b c: "), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `--watch-config`: only with --config, and never 0.
    #[test]
    fn watch_config_flag() {
        let a = args(&["--config", "x.toml", "--watch-config", "5s"]).unwrap();
        assert_eq!(a.watch_config, Some(Duration::from_secs(5)));
        assert_eq!(args(&["--config", "x.toml"]).unwrap().watch_config, None);
        let e = args(&["--config", "x.toml", "--watch-config", "0"]).unwrap_err().to_string();
        assert!(e.contains("must be above 0"), "{e}");
        let flags = ["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--watch-config", "5s"];
        let e = args(&flags).unwrap().into_config().unwrap_err().to_string();
        assert!(e.starts_with("--watch-config 5s: ") && e.contains("add --config FILE"), "{e}");
    }

    #[test]
    fn metrics_listen_flag() {
        let base = ["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2"];
        assert_eq!(config(&base).unwrap().metrics.listen, None);
        let c = config(&[&base[..], &["--metrics-listen", "127.0.0.1:9100"]].concat()).unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9100".parse().unwrap()));
        let e = config(&[&base[..], &["--metrics-listen", "127.0.0.1:1"]].concat()).unwrap_err().to_string();
        assert!(e.starts_with("--metrics-listen 127.0.0.1:1: is also a --listen address"), "{e}");
        let e = args(&[&base[..], &["--metrics-listen", "localhost:9100"]].concat()).unwrap_err().to_string();
        assert!(e.contains("--metrics-listen"), "{e}");
        let e = args(&["--config", "x.toml", "--metrics-listen", "127.0.0.1:9100"]).unwrap_err().to_string();
        assert!(e.contains("--metrics-listen") && e.contains("--config"), "{e}");
    }

    #[test]
    fn missing_backend_names_the_flag() {
        let e = config(&["--listen", "127.0.0.1:1"]).unwrap_err();
        assert!(e.to_string().contains("--backend"), "{e}");
    }

    #[test]
    fn a_backend_without_a_port_names_the_flag_and_the_fix() {
        let e = config(&["--listen", "127.0.0.1:1", "--backend", "iis1"]).unwrap_err().to_string();
        assert!(e.starts_with("--backend iis1: ") && e.contains("host:port"), "{e}");
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

    #[test]
    fn zero_connect_timeout_is_rejected() {
        let e = config(&["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--connect-timeout", "0"]).unwrap_err();
        assert!(e.to_string().contains("--connect-timeout"), "{e}");
    }

    #[test]
    fn thread_count_is_checked() {
        let base = ["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2"];
        for bad in ["0", "1025"] {
            let e = config(&[&base[..], &["--threads", bad]].concat()).unwrap_err().to_string();
            assert!(e.contains("--threads") && e.contains("from 1 to 1024"), "{e}");
        }
        let e = args(&[&base[..], &["--threads", "two"]].concat()).unwrap_err().to_string();
        assert!(e.contains("--threads"), "{e}");
        let c = config(&[&base[..], &["--threads", "1"]].concat()).unwrap();
        assert_eq!(ProxyArgs::worker_threads(&c), 1);
        let c = config(&base).unwrap();
        assert_eq!(ProxyArgs::worker_threads(&c), std::thread::available_parallelism().unwrap().get());
        assert_eq!(MAX_THREADS, 1024, "the message above names the limit");
    }

    /// `--config` reads the file (its errors name the file), and route flags beside it are
    /// refused by name.
    #[test]
    fn a_config_file_replaces_the_flags() {
        let dir = std::env::temp_dir().join(format!("ntlm-splice-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ok.toml");
        std::fs::write(&path, "[[route]]\nname = \"a\"\nlisten = [\"127.0.0.1:0\"]\nbackends = [\"127.0.0.1:9\"]\n")
            .unwrap();
        let p = path.to_str().unwrap();
        let (c, from) = args(&["--config", p]).unwrap().into_config().unwrap();
        assert_eq!((c.routes[0].name.as_str(), from.as_deref()), ("a", Some(path.as_path())));
        let e = args(&["--config", p, "--backend", "127.0.0.1:2"]).unwrap_err().to_string();
        assert!(e.contains("--backend") && e.contains("--config"), "{e}");
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[[route]]\nname = \"a\"\nlisten = [\"127.0.0.1:0\"]\nbackend = [\"x:1\"]\n").unwrap();
        let e = args(&["--config", bad.to_str().unwrap()]).unwrap().into_config().unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("backend"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A byte-size flag: each of `bad` is rejected naming the flag and its `range`, each of
    /// `ok` lands in the config (read by `get`), and without the flag the config has `default`.
    fn byte_flag_is_checked(
        flag: &str,
        bad: [&str; 2],
        range: &str,
        ok: [(&str, u64); 2],
        default: u64,
        get: fn(&Config) -> u64,
    ) {
        let base = ["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2"];
        for b in bad {
            let e = config(&[&base[..], &[flag, b]].concat()).unwrap_err();
            assert!(e.to_string().contains(flag) && e.to_string().contains(range), "{e}");
        }
        for (o, want) in ok {
            let c = config(&[&base[..], &[flag, o]].concat()).unwrap();
            assert_eq!(get(&c), want, "{flag} {o}");
        }
        let c = config(&base).unwrap();
        assert_eq!(get(&c), default, "{flag} by default");
    }

    #[test]
    fn sockmap_sndbuf_is_checked() {
        let ok = [("0", 0), ("16MiB", 16 << 20)];
        byte_flag_is_checked("--sockmap-sndbuf", ["1KiB", "2GiB"], "64KiB to 1GiB", ok, DEFAULT_SOCKMAP_SNDBUF, |c| {
            c.global.sockmap_sndbuf
        });
    }

    #[test]
    fn pipe_size_is_checked() {
        let ok = [("0", 0), ("256KiB", 256 << 10)];
        byte_flag_is_checked("--pipe-size", ["4KiB", "128MiB"], "64KiB to 64MiB", ok, DEFAULT_PIPE_SIZE, |c| {
            c.global.pipe_size
        });
    }

    #[test]
    fn the_affected_kernel_switch_reaches_the_config() {
        let base = ["--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2"];
        assert!(!config(&base).unwrap().global.sockmap_allow_affected_kernel);
        let c = config(&[&base[..], &["--sockmap-allow-affected-kernel"]].concat()).unwrap();
        assert!(c.global.sockmap_allow_affected_kernel);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_bytes("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert!(parse_bytes("4 furlongs").is_err());
    }
}
