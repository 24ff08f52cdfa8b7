//! What sits between the client and the backend: nothing (direct; at the edge, `routed`),
//! ntlm-splice with one of its engines, nginx `stream`, or HAProxy `mode tcp`. Peers are installed from Debian's
//! packages when missing, and run from configs written to a temp dir, never the system's.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::procs::{self, NetnsFd, Proc};

/// Time a proxy gets to start listening (loading eBPF programs included).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a proxy gets to exit after its stop signal before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// ntlm-splice's drain time after SIGTERM: the benchmark's connections are all closed by then.
const NTLM_DRAIN: &str = "2s";
/// HAProxy's pipe cap when splicing: enough for every active transfer; counted by HAProxy
/// in the descriptors it needs, so it also bounds how many connections fit the fd limit.
const HAPROXY_MAXPIPES: u64 = 256;
/// Descriptors a proxy needs beyond two per connection (listeners, epoll, logs, pipes).
pub const FD_HEADROOM: u64 = 640;

/// Who a subject is, for ratios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// No proxy: the ceiling.
    Direct,
    /// ntlm-splice.
    Ours,
    /// nginx or HAProxy.
    Peer,
}

/// One thing to measure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// Client straight to the backend.
    Direct,
    /// The edge bench's floor: the splicer namespace only routes (`ip_forward` on), the
    /// client connects to the backend's address through it. Counts as direct in ratios.
    Routed,
    /// ntlm-splice `--engine <engine>`; `threads: None` is its default (one per CPU).
    Ntlm { engine: &'static str, threads: Option<u32> },
    /// ntlm-splice `--engine <engine>` (`--baseline-engine`, default splice) from another
    /// build (`--baseline`), to compare two builds within one interleaved run.
    Baseline { bin: PathBuf, engine: String },
    /// nginx stream; `workers: None` is `worker_processes auto` (Debian's shipped default).
    Nginx { workers: Option<u32> },
    /// HAProxy mode tcp; `threads: None` is its default (one per CPU). `big_pipes`:
    /// `tune.pipesize` 1 MiB, the pipe size ntlm-splice's splice engine uses (HAProxy's
    /// default is the kernel's 64 KiB), to show what of a lead is the pipe size alone.
    Haproxy { threads: Option<u32>, splice: bool, big_pipes: bool },
}

impl Subject {
    /// Every subject, in table order.
    pub fn all() -> Vec<Subject> {
        vec![
            Subject::Direct,
            Subject::Ntlm { engine: "sockmap", threads: None },
            Subject::Ntlm { engine: "splice", threads: None },
            Subject::Ntlm { engine: "splice", threads: Some(1) },
            Subject::Nginx { workers: Some(1) },
            Subject::Nginx { workers: None },
            Subject::Haproxy { threads: Some(1), splice: false, big_pipes: false },
            Subject::Haproxy { threads: None, splice: false, big_pipes: false },
            Subject::Haproxy { threads: Some(1), splice: true, big_pipes: false },
            Subject::Haproxy { threads: None, splice: true, big_pipes: false },
            Subject::Haproxy { threads: None, splice: true, big_pipes: true },
        ]
    }

    /// Short name used in tables, JSON and `--only`.
    pub fn name(&self) -> String {
        match self {
            Subject::Direct => "direct".into(),
            Subject::Routed => "routed".into(),
            Subject::Ntlm { engine, threads: None } => format!("ntlm-{engine}"),
            Subject::Ntlm { engine, threads: Some(t) } => format!("ntlm-{engine}-{t}t"),
            Subject::Baseline { engine, .. } => format!("ntlm-{engine}-baseline"),
            Subject::Nginx { workers: Some(n) } => format!("nginx-{n}w"),
            Subject::Nginx { workers: None } => "nginx-auto".into(),
            Subject::Haproxy { threads, splice, big_pipes } => format!(
                "haproxy{}-{}{}",
                if *splice { "-splice" } else { "" },
                threads.map_or("auto".to_string(), |t| format!("{t}t")),
                if *big_pipes { "-pipe1m" } else { "" }
            ),
        }
    }

    /// Direct, ours or a peer.
    pub fn kind(&self) -> Kind {
        match self {
            Subject::Direct | Subject::Routed => Kind::Direct,
            Subject::Ntlm { .. } | Subject::Baseline { .. } => Kind::Ours,
            _ => Kind::Peer,
        }
    }

    /// How long after the last idle connection opened the memory is read (the client's
    /// `--settle-ms`). ntlm-splice (both engines) parks an idle connection after
    /// `--park-after` (2 s by default) and trims the heap 1 s after a burst of them parked,
    /// so it is read once that is done; the others do nothing later that would change it.
    pub fn idle_settle_ms(&self) -> u64 {
        match self {
            Subject::Ntlm { .. } | Subject::Baseline { .. } => IDLE_SETTLE_PARKED_MS,
            _ => IDLE_SETTLE_MS,
        }
    }

    /// One line saying how it is configured.
    pub fn describe(&self) -> String {
        match self {
            Subject::Direct => "no proxy: client connects to the backend (the ceiling)".into(),
            Subject::Routed => {
                "no proxy: the splicer namespace only forwards (ip_forward=1), the client connects to the backend's address (the floor)".into()
            }
            Subject::Ntlm { engine, threads } => {
                format!(
                    "ntlm-splice --engine {engine}{}, --max-connections raised for the idle runs, defaults otherwise (access log on, to a file)",
                    threads.map_or(String::new(), |t| format!(" --threads {t}"))
                )
            }
            Subject::Baseline { bin, engine } => {
                format!(
                    "ntlm-splice --engine {engine} from {} (--baseline), settings as ntlm-{engine}",
                    bin.display()
                )
            }
            Subject::Nginx { workers: Some(n) } => {
                format!("nginx stream, worker_processes {n}, proxy_half_close on")
            }
            Subject::Nginx { workers: None } => {
                "nginx stream, worker_processes auto (Debian's default), proxy_half_close on".into()
            }
            Subject::Haproxy { threads, splice, big_pipes } => format!(
                "HAProxy mode tcp, nbthread {}{}{}",
                threads.map_or("default (one per CPU)".to_string(), |t| t.to_string()),
                if *splice {
                    ", option splice-request + splice-response"
                } else {
                    ", no splicing"
                },
                if *big_pipes { ", tune.pipesize 1048576 (ntlm-splice's pipe size)" } else { "" }
            ),
        }
    }
}

/// Installed peers, or why not.
#[derive(Debug, Default, Serialize)]
pub struct Tools {
    /// nginx binary, if usable.
    pub nginx: Option<PathBuf>,
    /// `load_module` path for a dynamic stream module; `None` when built in.
    pub nginx_stream_module: Option<PathBuf>,
    /// `nginx -v`.
    pub nginx_version: Option<String>,
    /// Why nginx is skipped.
    pub nginx_skip: Option<String>,
    /// haproxy binary, if usable.
    pub haproxy: Option<PathBuf>,
    /// `haproxy -v`, first line.
    pub haproxy_version: Option<String>,
    /// HAProxy was built with splice support (`+LINUX_SPLICE`).
    pub haproxy_splice: bool,
    /// Why HAProxy is skipped.
    pub haproxy_skip: Option<String>,
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).stdin(Stdio::null()).output().ok()?;
    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    Some(s)
}

fn find_bin(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs apt-get for `pkgs` with services kept from starting: Debian's nginx and haproxy
/// packages start the system service (nginx on port 80) from their postinst, which
/// invoke-rc.d skips when /usr/sbin/policy-rc.d exits 101. A policy already there is left alone.
fn apt_install_quietly(pkgs: &[&str]) -> anyhow::Result<()> {
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours && crate::is_root() {
        fs::write(policy, "#!/bin/sh\n# written by cargo xtask bench while it installs packages\nexit 101\n")
            .context("cannot write /usr/sbin/policy-rc.d")?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(policy, fs::Permissions::from_mode(0o755))?;
    }
    let r = crate::apt_install(pkgs);
    if ours && crate::is_root() {
        let _ = fs::remove_file(policy);
    }
    r
}

/// Finds nginx with its stream module and HAProxy, installing what is missing (unless
/// `install` is false). Never fails: what cannot be had gets a skip reason.
pub fn find_tools(install: bool) -> Tools {
    let mut t = Tools::default();
    match nginx(install) {
        Ok((bin, module, version)) => {
            t.nginx = Some(bin);
            t.nginx_stream_module = module;
            t.nginx_version = Some(version);
        }
        Err(e) => t.nginx_skip = Some(format!("{e:#}")),
    }
    match haproxy(install) {
        Ok((bin, version, splice)) => {
            t.haproxy = Some(bin);
            t.haproxy_version = Some(version);
            t.haproxy_splice = splice;
        }
        Err(e) => t.haproxy_skip = Some(format!("{e:#}")),
    }
    t
}

fn nginx(install: bool) -> anyhow::Result<(PathBuf, Option<PathBuf>, String)> {
    let bin = match find_bin("nginx") {
        Some(b) => b,
        None if install => {
            apt_install_quietly(&["nginx", "libnginx-mod-stream"]).context("installing nginx")?;
            find_bin("nginx").context("nginx still missing after apt-get install nginx")?
        }
        None => bail!("nginx is not installed (apt-get install nginx libnginx-mod-stream)"),
    };
    let b = bin.to_string_lossy().into_owned();
    let v = output(&b, &["-V"]).context("nginx -V failed")?;
    let version = v.lines().find(|l| l.starts_with("nginx version")).unwrap_or("nginx").trim().to_string();
    let args: Vec<&str> = v.split_whitespace().collect();
    if args.contains(&"--with-stream") {
        return Ok((bin, None, version));
    }
    if !args.contains(&"--with-stream=dynamic") {
        bail!("this nginx has no stream module (not in `nginx -V`)");
    }
    let dir = args
        .iter()
        .find_map(|a| a.strip_prefix("--modules-path="))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/nginx/modules"));
    let module = dir.join("ngx_stream_module.so");
    if !module.is_file() {
        if !install {
            bail!("nginx's stream module {} is missing (apt-get install libnginx-mod-stream)", module.display());
        }
        apt_install_quietly(&["libnginx-mod-stream"]).context("installing libnginx-mod-stream")?;
        if !module.is_file() {
            bail!("{} still missing after apt-get install libnginx-mod-stream", module.display());
        }
    }
    Ok((bin, Some(module), version))
}

fn haproxy(install: bool) -> anyhow::Result<(PathBuf, String, bool)> {
    let bin = match find_bin("haproxy") {
        Some(b) => b,
        None if install => {
            apt_install_quietly(&["haproxy"]).context("installing haproxy")?;
            find_bin("haproxy").context("haproxy still missing after apt-get install haproxy")?
        }
        None => bail!("haproxy is not installed (apt-get install haproxy)"),
    };
    let vv = output(&bin.to_string_lossy(), &["-vv"]).context("haproxy -vv failed")?;
    let version = vv.lines().next().unwrap_or("haproxy").trim().to_string();
    Ok((bin, version, vv.contains("+LINUX_SPLICE")))
}

/// A started subject.
pub struct Running {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The proxy's processes (empty for direct), measured for CPU and RSS.
    pub pids: Vec<u32>,
    /// HAProxy's stats socket.
    pub stats_socket: Option<PathBuf>,
    /// Its log file, for error messages.
    pub log: Option<PathBuf>,
    /// The proxy process; dropping it stops the proxy.
    pub proc: Option<Proc>,
}

/// What every start needs to know.
pub struct Env<'a> {
    /// The workspace root.
    pub root: &'a Path,
    /// Temp dir for configs and logs.
    pub dir: &'a Path,
    /// The backend (on loopback, or in the edge bench's backend namespace).
    pub backend: SocketAddr,
    /// The backend's PID, whose CPU counts in the stack's CPU.
    pub backend_pid: Option<u32>,
    /// Connections each proxy must be able to hold (the largest idle run).
    pub max_conns: u64,
    /// Our open-files limit (inherited by the proxies).
    pub nofile: u64,
    /// Peers found.
    pub tools: &'a Tools,
    /// The address proxies listen on (127.0.0.1; at the edge, the splicer's client side).
    pub listen_ip: IpAddr,
    /// The namespace proxies run in (`None`: ours).
    pub proxy_ns: Option<&'a NetnsFd>,
    /// The namespace clients connect from, also for readiness checks (`None`: ours).
    pub client_ns: Option<&'a NetnsFd>,
}

/// Starts `s`; `tag` makes file names unique per start.
pub fn start(s: &Subject, env: &Env, tag: &str) -> anyhow::Result<Running> {
    match s {
        Subject::Direct | Subject::Routed => {
            Ok(Running { addr: env.backend, pids: Vec::new(), stats_socket: None, log: None, proc: None })
        }
        Subject::Ntlm { engine, threads } => {
            start_ntlm(&env.root.join("target/release/ntlm-splice"), engine, *threads, env, tag)
        }
        Subject::Baseline { bin, engine } => start_ntlm(bin, engine, None, env, tag),
        Subject::Nginx { workers } => start_nginx(*workers, env, tag),
        Subject::Haproxy { threads, splice, big_pipes } => start_haproxy(*threads, *splice, *big_pipes, env, tag),
    }
}

fn start_ntlm(bin: &Path, engine: &str, threads: Option<u32>, env: &Env, tag: &str) -> anyhow::Result<Running> {
    let log = env.dir.join(format!("{tag}.log"));
    let mut cmd = Command::new(bin);
    cmd.args([
        "--listen",
        &SocketAddr::new(env.listen_ip, 0).to_string(),
        "--backend",
        &env.backend.to_string(),
        "--engine",
        engine,
    ])
    .args(["--max-connections", &(env.max_conns + 64).to_string(), "--drain-timeout", NTLM_DRAIN])
    .args(threads.map(|t| ["--threads".to_string(), t.to_string()]).into_iter().flatten())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(fs::File::create(&log)?);
    if let Some(ns) = env.proxy_ns {
        ns.enter_on_spawn(&mut cmd);
    }
    let mut p =
        Proc::spawn(&format!("ntlm-splice --engine {engine}"), &mut cmd, libc::SIGTERM, libc::SIGTERM, STOP_GRACE)?;
    let line = procs::wait_log_line(&mut p, &log, "listening addr=", START_TIMEOUT)?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .with_context(|| format!("cannot read the address from `{line}`"))?;
    Ok(Running { addr, pids: vec![p.pid()], stats_socket: None, log: Some(log), proc: Some(p) })
}

/// nginx's config: standalone (no include of /etc/nginx), everything in `dir`.
pub fn nginx_conf(
    workers: Option<u32>,
    module: Option<&Path>,
    dir: &Path,
    listen: SocketAddr,
    backend: SocketAddr,
    nofile: u64,
) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "# Written by cargo xtask bench; a standalone config, nothing from /etc/nginx.");
    if let Some(m) = module {
        let _ = writeln!(c, "load_module {};", m.display());
    }
    let _ = writeln!(c, "daemon off;\nmaster_process on;");
    let _ = writeln!(c, "worker_processes {};", workers.map_or("auto".to_string(), |n| n.to_string()));
    let _ = writeln!(c, "worker_rlimit_nofile {nofile};");
    let _ = writeln!(c, "pid {}/nginx.pid;", dir.display());
    let _ = writeln!(c, "error_log {}/error.log warn;", dir.display());
    let _ = writeln!(c, "events {{\n    worker_connections {nofile};\n}}");
    let _ = writeln!(c, "stream {{\n    upstream backend {{\n        server {backend};\n    }}");
    let _ = writeln!(c, "    server {{\n        listen {listen};\n        proxy_pass backend;");
    // Without it nginx closes both directions at the client's FIN, so an upload's EOF never
    // reaches the backend as EOF and the sink's byte count never comes back. It changes
    // nothing on the data path (NTLM over HTTP needs no half-close; nginx >= 1.21.4).
    let _ = writeln!(c, "        proxy_half_close on;\n    }}\n}}");
    c
}

fn start_nginx(workers: Option<u32>, env: &Env, tag: &str) -> anyhow::Result<Running> {
    let bin = env.tools.nginx.as_ref().context("nginx is unavailable")?;
    let dir = env.dir.join(tag);
    fs::create_dir_all(&dir)?;
    let addr = SocketAddr::new(env.listen_ip, procs::free_port()?);
    let conf = dir.join("nginx.conf");
    fs::write(
        &conf,
        nginx_conf(workers, env.tools.nginx_stream_module.as_deref(), &dir, addr, env.backend, env.nofile),
    )?;
    let stderr = dir.join("stderr.log");
    let mut cmd = Command::new(bin);
    cmd.arg("-p").arg(&dir).arg("-c").arg(&conf).arg("-e").arg(dir.join("error.log"));
    let out = fs::File::create(&stderr)?;
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    if let Some(ns) = env.proxy_ns {
        ns.enter_on_spawn(&mut cmd);
    }
    // SIGTERM is nginx's fast shutdown: the master stops its workers, then exits.
    let mut p = Proc::spawn("nginx", &mut cmd, libc::SIGTERM, libc::SIGTERM, STOP_GRACE)?;
    procs::wait_listening(&mut p, addr, env.client_ns, START_TIMEOUT).map_err(|e| {
        anyhow::anyhow!("{e:#}\n{}\n{}", procs::file_tail(&stderr, 8), procs::file_tail(&dir.join("error.log"), 8))
    })?;
    // Measure the master and every worker.
    let want = workers.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |n| n as usize);
    let mut pids = Vec::new();
    for _ in 0..250 {
        pids = ntlm_bench::procfs::descendants(p.pid());
        if pids.len() >= want {
            break;
        }
        procs::sleep(procs::POLL)?;
    }
    if pids.is_empty() {
        bail!("nginx listens but has no worker process");
    }
    pids.insert(0, p.pid());
    Ok(Running { addr, pids, stats_socket: None, log: Some(dir.join("error.log")), proc: Some(p) })
}

/// When idle memory is read, after the last idle connection opened (see
/// [`Subject::idle_settle_ms`]).
pub const IDLE_SETTLE_MS: u64 = 500;
/// The same for ntlm-splice: `--park-after` (2 s) plus the 1 s heap-trim delay
/// plus [`IDLE_SETTLE_MS`].
pub const IDLE_SETTLE_PARKED_MS: u64 = 3500;

/// `tune.pipesize` of the big-pipe HAProxy variant: ntlm-splice's `--pipe-size` default.
const HAPROXY_BIG_PIPE: u32 = 1 << 20;

/// HAProxy's config. `maxconn` is sized so that HAProxy's own descriptor estimate
/// (2 per connection + 2 per pipe + a few) fits the open-files limit.
pub fn haproxy_conf(
    threads: Option<u32>,
    splice: bool,
    big_pipes: bool,
    stats: &Path,
    listen: SocketAddr,
    backend: SocketAddr,
    max_conns: u64,
) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "# Written by cargo xtask bench; a standalone config, nothing from /etc/haproxy.");
    let _ = writeln!(c, "global");
    let _ = writeln!(c, "    maxconn {}", max_conns + 16);
    let _ = writeln!(c, "    maxpipes {HAPROXY_MAXPIPES}");
    if let Some(t) = threads {
        let _ = writeln!(c, "    nbthread {t}");
    }
    if big_pipes {
        let _ = writeln!(c, "    tune.pipesize {HAPROXY_BIG_PIPE}");
    }
    let _ = writeln!(c, "    stats socket {} mode 600 level admin", stats.display());
    let _ = writeln!(c, "defaults\n    mode tcp\n    maxconn {}", max_conns + 16);
    let _ = writeln!(c, "    timeout connect 5s\n    timeout client 1h\n    timeout server 1h");
    if splice {
        let _ = writeln!(c, "    option splice-request\n    option splice-response");
    }
    let _ = writeln!(c, "frontend fe\n    bind {listen}\n    default_backend be");
    let _ = writeln!(c, "backend be\n    server s1 {backend}");
    c
}

fn start_haproxy(threads: Option<u32>, splice: bool, big_pipes: bool, env: &Env, tag: &str) -> anyhow::Result<Running> {
    let bin = env.tools.haproxy.as_ref().context("haproxy is unavailable")?;
    let dir = env.dir.join(tag);
    fs::create_dir_all(&dir)?;
    let addr = SocketAddr::new(env.listen_ip, procs::free_port()?);
    let stats = dir.join("stats.sock");
    let conf = dir.join("haproxy.cfg");
    fs::write(&conf, haproxy_conf(threads, splice, big_pipes, &stats, addr, env.backend, env.max_conns))?;
    let log = dir.join("stderr.log");
    let mut cmd = Command::new(bin);
    cmd.arg("-f").arg(&conf).arg("-db");
    let out = fs::File::create(&log)?;
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    if let Some(ns) = env.proxy_ns {
        ns.enter_on_spawn(&mut cmd);
    }
    let mut p = Proc::spawn("haproxy", &mut cmd, libc::SIGTERM, libc::SIGTERM, STOP_GRACE)?;
    procs::wait_listening(&mut p, addr, env.client_ns, START_TIMEOUT)
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", procs::file_tail(&log, 8)))?;
    Ok(Running { addr, pids: vec![p.pid()], stats_socket: Some(stats), log: Some(log), proc: Some(p) })
}

/// HAProxy's own count of bytes it moved with splice(2) (`show info`, whose field is
/// spelled `TotalSplicdedBytesOut` in 2.6; any `TotalSplic*` field is taken).
pub fn haproxy_spliced_bytes(stats: &Path) -> anyhow::Result<u64> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(stats)
        .with_context(|| format!("cannot connect to {}", stats.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"show info\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    out.lines()
        .find(|l| l.starts_with("TotalSplic"))
        .and_then(|l| l.split_once(':'))
        .and_then(|(_, v)| v.trim().parse().ok())
        .context("no TotalSplic* field in HAProxy's `show info`")
}
