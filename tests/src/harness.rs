//! Runs the real `ntlm-splice` binary as a child process, the way a user would, and reads
//! its log: the address it listens on and one access-log line per connection.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpSocket, TcpStream},
    process::{Child, Command},
    sync::Notify,
};

/// How long a proxy may take to report that it listens.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a proxy may take to exit after SIGTERM (drain included).
const STOP_TIMEOUT: Duration = Duration::from_secs(90);

/// The `ntlm-splice` binary under test: `$NTLM_SPLICE_BIN` (set by `cargo xtask test`), or
/// the workspace's release or debug build.
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NTLM_SPLICE_BIN") {
        return p.into();
    }
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("ntlm-splice");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "no ntlm-splice binary: run `cargo xtask test`, or `cargo build -p ntlm-userspace` first, or set NTLM_SPLICE_BIN"
    );
}

/// The engines to test on this host: `$NTLM_SPLICE_TEST_ENGINES` (comma separated, set by
/// `cargo xtask test` from what `ntlm-splice doctor` finds), else `splice` only.
pub fn engines() -> Vec<String> {
    match std::env::var("NTLM_SPLICE_TEST_ENGINES") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|s| s.trim().to_string()).collect(),
        _ => {
            eprintln!("NTLM_SPLICE_TEST_ENGINES unset: testing the splice engine only (cargo xtask test sets it)");
            vec!["splice".to_string()]
        }
    }
}

/// `RUST_LOG` for a proxy whose parking is under test: its debug lines say when a connection
/// parks (`conn=N parked`) and comes back (`conn=N unparked`).
pub const PARK_LOG: &str = "info,ntlm_splice::park=debug";

/// Whether the sockmap engine's own suite runs here: `$NTLM_SPLICE_TEST_SOCKMAP=1`, set by
/// `cargo xtask test` when `ntlm-splice doctor` finds the engine usable (required in CI).
pub fn sockmap_suite() -> bool {
    std::env::var("NTLM_SPLICE_TEST_SOCKMAP").is_ok_and(|v| v == "1")
}

/// One access-log line (`access: key=value …`).
#[derive(Clone, Debug)]
pub struct AccessLine {
    /// The whole log line.
    pub raw: String,
    fields: HashMap<String, String>,
}

impl AccessLine {
    fn parse(line: &str) -> Option<AccessLine> {
        let (_, rest) = line.split_once(" access: ")?;
        let mut fields = HashMap::new();
        let mut rest = rest.trim();
        while !rest.is_empty() {
            let Some((k, v)) = rest.split_once('=') else { break };
            let (value, tail) = if let Some(q) = v.strip_prefix('"') {
                let end = q.find('"').unwrap_or(q.len());
                (&q[..end], q.get(end + 1..).unwrap_or(""))
            } else {
                let end = v.find(' ').unwrap_or(v.len());
                (&v[..end], &v[end..])
            };
            fields.insert(k.trim().to_string(), value.to_string());
            rest = tail.trim_start();
        }
        Some(AccessLine { raw: line.to_string(), fields })
    }

    /// A logfmt field.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// A numeric field; panics with the line when missing.
    pub fn num(&self, key: &str) -> u64 {
        self.get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("access line has no numeric {key}: {}", self.raw))
    }
}

/// The output of a child process (the proxy, HAProxy), one entry per line, and a signal for
/// every new line.
#[derive(Default)]
pub(crate) struct Log {
    lines: Mutex<Vec<String>>,
    grew: Notify,
    /// Output streams (stdout, stderr) read to their end.
    closed: std::sync::atomic::AtomicUsize,
}

/// The child's output streams the log reads.
const LOG_STREAMS: usize = 2;

impl Log {
    /// Appends every line of `stream` to the log, in a task of its own, until its end; with
    /// `$NTLM_SPLICE_TEST_ECHO` set, also prints each line tagged `[tag]`.
    pub(crate) fn follow(self: &Arc<Self>, stream: Box<dyn tokio::io::AsyncRead + Unpin + Send>, tag: &'static str) {
        let log = self.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if std::env::var_os("NTLM_SPLICE_TEST_ECHO").is_some() {
                    eprintln!("[{tag}] {line}");
                }
                log.lines.lock().unwrap().push(line);
                log.grew.notify_waiters();
            }
            log.closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            log.grew.notify_waiters();
        });
    }

    /// All lines so far.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// All lines so far, joined.
    pub(crate) fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until `done` holds for the lines; panics naming `whose` log, with its text, on
    /// timeout. `done` runs under the log lock.
    pub(crate) async fn wait(&self, timeout: Duration, whose: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let grew = self.grew.notified();
            if done(&self.lines.lock().unwrap()) {
                return;
            }
            if tokio::time::timeout_at(deadline, grew).await.is_err() {
                if done(&self.lines.lock().unwrap()) {
                    return;
                }
                panic!("timed out after {timeout:?} waiting on the {whose} log:\n{}", self.text());
            }
        }
    }
}

/// A running `ntlm-splice` child. Dropping it kills the child (by its own PID).
pub struct Proxy {
    child: Child,
    addr: SocketAddr,
    log: Arc<Log>,
}

impl Proxy {
    /// Starts `ntlm-splice --listen 127.0.0.1:0 --engine ENGINE --backend … EXTRA…` and waits
    /// until it listens.
    pub async fn start(engine: &str, backends: &[SocketAddr], extra: &[&str]) -> Proxy {
        Self::spawn(&[], &Self::args(engine, backends, extra), &Self::default_log()).await
    }

    /// As [`Proxy::start`], with `RUST_LOG=rust_log` (e.g. to see debug lines of a module).
    pub async fn start_with_log(engine: &str, backends: &[SocketAddr], extra: &[&str], rust_log: &str) -> Proxy {
        Self::spawn(&[], &Self::args(engine, backends, extra), rust_log).await
    }

    /// `RUST_LOG` for the proxy: `$NTLM_SPLICE_TEST_LOG`, else `info`.
    fn default_log() -> String {
        std::env::var("NTLM_SPLICE_TEST_LOG").unwrap_or_else(|_| "info".into())
    }

    fn args(engine: &str, backends: &[SocketAddr], extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec!["--engine".into(), engine.into()];
        if !extra.contains(&"--listen") {
            args.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        for b in backends {
            args.extend(["--backend".into(), b.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts `ntlm-splice --config PATH` and waits until it listens (its first listener).
    pub async fn start_config(path: &std::path::Path) -> Proxy {
        Self::spawn(&[], &["--config".to_string(), path.display().to_string()], &Self::default_log()).await
    }

    /// Every listener the proxy has announced so far: (bound address, its routes).
    pub fn listeners(&self) -> Vec<(SocketAddr, Vec<String>)> {
        self.log.lines.lock().unwrap().iter().filter_map(|l| parse_listening(l)).collect()
    }

    /// The bound address of the newest listener that serves `route` (waits for its log line).
    pub async fn addr_of(&self, route: &str, timeout: Duration) -> SocketAddr {
        let serves = |l: &str| parse_listening(l).is_some_and(|(_, routes)| routes.iter().any(|r| r == route));
        self.wait_log(timeout, |lines| lines.iter().any(|l| serves(l))).await;
        let lines = self.log.lines.lock().unwrap();
        lines.iter().rev().find(|l| serves(l)).and_then(|l| parse_listening(l)).map(|(a, _)| a).expect("just seen")
    }

    /// The bound addresses of the first `n` listeners that serve `route` (waits for their log
    /// lines), e.g. its IPv4 and its IPv6 address.
    pub async fn addrs_of(&self, route: &str, n: usize, timeout: Duration) -> Vec<SocketAddr> {
        let serving = |lines: &[String]| -> Vec<SocketAddr> {
            lines
                .iter()
                .filter_map(|l| parse_listening(l))
                .filter(|(_, routes)| routes.iter().any(|r| r == route))
                .map(|(a, _)| a)
                .take(n)
                .collect()
        };
        self.wait_log(timeout, |lines| serving(lines).len() >= n).await;
        serving(&self.log.lines())
    }

    /// Sends SIGHUP and waits for the proxy to say how the reload ended: `Ok(line)` for
    /// `reload: applied`, `Err(line)` for `reload: ... rejected`.
    pub async fn reload(&self, timeout: Duration) -> Result<String, String> {
        let done = |l: &str| l.contains("reload: applied") || (l.contains("reload: ") && l.contains(" rejected"));
        let before = self.log.lines.lock().unwrap().iter().filter(|l| done(l)).count();
        self.signal(libc::SIGHUP);
        self.wait_log(timeout, |lines| lines.iter().filter(|l| done(l)).count() > before).await;
        let lines = self.log.lines.lock().unwrap();
        let line = lines.iter().filter(|l| done(l)).nth(before).expect("just seen").clone();
        if line.contains("reload: applied") { Ok(line) } else { Err(line) }
    }

    /// Starts the binary with exactly `args`.
    pub async fn start_args(args: &[String]) -> Proxy {
        Self::spawn(&[], args, &Self::default_log()).await
    }

    /// Starts the binary with exactly `args` inside network namespace `netns`, as
    /// `ip netns exec NETNS ntlm-splice ARGS...` (`ip` execs the binary in its own place, so
    /// the child's PID, signals and output are the proxy's).
    pub async fn start_args_in(netns: &str, args: &[String]) -> Proxy {
        Self::spawn(&["ip", "netns", "exec", netns], args, &Self::default_log()).await
    }

    /// Starts `WRAPPER... BINARY ARGS...`, e.g. `setpriv --reuid=... --ambient-caps=...`, where
    /// the wrapper execs the binary in its own place (so the child's PID, signals and output
    /// are the proxy's); `binary` instead of [`bin`] when given (a copy others may run).
    pub async fn start_wrapped(wrapper: &[&str], binary: Option<&Path>, args: &[String]) -> Proxy {
        let mut full: Vec<&str> = wrapper.to_vec();
        let bin = binary.map_or_else(bin, Path::to_path_buf);
        full.push(bin.to_str().expect("a UTF-8 binary path"));
        Self::spawn_cmd(&full, args, &Self::default_log()).await
    }

    /// `wrapper` (may be empty) before the binary.
    async fn spawn(wrapper: &[&str], args: &[String], rust_log: &str) -> Proxy {
        let bin = bin();
        let mut full: Vec<&str> = wrapper.to_vec();
        full.push(bin.to_str().expect("a UTF-8 binary path"));
        Self::spawn_cmd(&full, args, rust_log).await
    }

    /// Runs `command[0] command[1..] args`.
    async fn spawn_cmd(command: &[&str], args: &[String], rust_log: &str) -> Proxy {
        let mut cmd = Command::new(command[0]);
        cmd.args(&command[1..]);
        cmd.args(args)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let log = Arc::new(Log::default());
        log.follow(Box::new(child.stderr.take().expect("stderr")), "proxy");
        log.follow(Box::new(child.stdout.take().expect("stdout")), "proxy");
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let grew = log.grew.notified();
            let found = log.lines.lock().unwrap().iter().find_map(|l| {
                l.split_once("listening addr=").and_then(|(_, r)| r.split(' ').next()?.parse::<SocketAddr>().ok())
            });
            if let Some(addr) = found {
                drop(grew);
                return Proxy { child, addr, log };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "ntlm-splice {args:?} exited with {status} before listening:\n{}",
                    log.lines.lock().unwrap().join("\n")
                );
            }
            // Poll for an early exit too: a child that dies prints nothing more.
            let _ = tokio::time::timeout(Duration::from_millis(100), grew).await;
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "ntlm-splice {args:?} did not listen within {START_TIMEOUT:?}:\n{}",
                    log.lines.lock().unwrap().join("\n")
                );
            }
        }
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("proxy still running")
    }

    /// All log output so far.
    pub fn logs(&self) -> String {
        self.log.text()
    }

    /// Access-log lines so far, in order.
    pub fn access_lines(&self) -> Vec<AccessLine> {
        self.log.lines.lock().unwrap().iter().filter_map(|l| AccessLine::parse(l)).collect()
    }

    /// Waits until at least `n` access lines were logged; panics with the log on timeout.
    pub async fn wait_access_lines(&self, n: usize, timeout: Duration) -> Vec<AccessLine> {
        self.wait_log(timeout, |lines| lines.iter().filter(|l| AccessLine::parse(l).is_some()).count() >= n).await;
        self.access_lines()
    }

    /// Waits until a log line contains `needle`; panics with the log on timeout.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        self.wait_log(timeout, |lines| lines.iter().any(|l| l.contains(needle))).await;
    }

    /// Waits until at least `n` log lines end with `suffix`; panics with the log on timeout.
    pub async fn wait_log_ending(&self, suffix: &str, n: usize, timeout: Duration) {
        self.wait_log(timeout, |lines| lines.iter().filter(|l| l.ends_with(suffix)).count() >= n).await;
    }

    /// Number of log lines so far that end with `suffix`.
    pub fn count_log_ending(&self, suffix: &str) -> usize {
        self.log.lines.lock().unwrap().iter().filter(|l| l.ends_with(suffix)).count()
    }

    /// Waits until `done` holds for the log lines. `done` runs under the log lock: it must
    /// not call back into this `Proxy`.
    async fn wait_log(&self, timeout: Duration, done: impl Fn(&[String]) -> bool) {
        self.log.wait(timeout, "proxy", done).await;
    }

    /// Waits (bounded) until the log readers reached the end of the child's stdout and
    /// stderr, i.e. the log holds everything the child wrote.
    pub async fn wait_output_closed(&self) {
        let closed = || self.log.closed.load(std::sync::atomic::Ordering::Relaxed) >= LOG_STREAMS;
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        while !closed() {
            let grew = self.log.grew.notified();
            if closed() {
                break;
            }
            if tokio::time::timeout_at(deadline, grew).await.is_err() && !closed() {
                panic!("the proxy's output did not close within {STOP_TIMEOUT:?}:\n{}", self.logs());
            }
        }
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain syscall; the PID is our own running child.
        let rc = unsafe { libc::kill(self.pid() as i32, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}): {}", self.pid(), std::io::Error::last_os_error());
    }

    /// Sends SIGTERM and waits for the exit (bounded).
    pub async fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit().await
    }

    /// Waits for the child to exit (bounded); panics with the log on timeout.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) => {
                // The log readers drain the pipes to their end (the child's last lines).
                self.wait_output_closed().await;
                status
            }
            Ok(Err(e)) => panic!("waiting for ntlm-splice: {e}"),
            Err(_) => panic!("ntlm-splice did not exit within {STOP_TIMEOUT:?}:\n{}", self.logs()),
        }
    }
}

/// Stops the proxy with SIGTERM and checks it exits 0.
pub async fn stop_ok(proxy: Proxy) {
    let status = proxy.stop().await;
    assert!(status.success(), "ntlm-splice exited with {status}");
}

// ---------------------------------------------------------------------------------------
// Config files
// ---------------------------------------------------------------------------------------

/// The start of a test's config file: a short drain (tests end their connections before they stop
/// the proxy) and `engine` for every route.
pub fn config_head(engine: &str) -> String {
    format!("[global]\ndrain_timeout = \"5s\"\n\n[defaults]\nengine = \"{engine}\"\nconnect_timeout = \"2s\"\n")
}

/// One `[[route]]` table; `extra` is appended as is (options, then a `[route.health]` table).
pub fn config_route(name: &str, listen: &[&str], backends: &[SocketAddr], extra: &str) -> String {
    let listen: Vec<String> = listen.iter().map(|a| format!("\"{a}\"")).collect();
    let backends: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "\n[[route]]\nname = \"{name}\"\nlisten = [{}]\nbackends = [{}]\n{extra}",
        listen.join(", "),
        backends.join(", ")
    )
}

// ---------------------------------------------------------------------------------------
// Client-side helpers shared by the suites
// ---------------------------------------------------------------------------------------

/// Bound for anything that should be quick on loopback: a connect, a round trip, an access
/// line.
pub const QUICK: Duration = Duration::from_secs(10);

/// Awaits `f` for at most `limit`, panicking with `what` otherwise.
pub async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Connects to `addr` from an address the kernel picks.
pub async fn connect(addr: SocketAddr) -> TcpStream {
    within(QUICK, &format!("connect to {addr}"), TcpStream::connect(addr))
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// Connects to `addr` from `source` (a free port), e.g. a loopback address of its own such
/// as 127.0.0.7, so that the client is recognisable wherever its address shows up.
pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = if source.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
        .unwrap_or_else(|e| panic!("client socket: {e}"));
    socket.bind(SocketAddr::new(source, 0)).unwrap_or_else(|e| panic!("bind the client to {source}: {e}"));
    within(QUICK, &format!("connect from {source} to {addr}"), socket.connect(addr))
        .await
        .unwrap_or_else(|e| panic!("connect from {source} to {addr}: {e}"))
}

/// Writes `msg` and reads exactly the same bytes back (through an echo backend).
pub async fn round_trip(s: &mut TcpStream, msg: &[u8], what: &str) {
    within(QUICK, &format!("{what}: write"), s.write_all(msg)).await.unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let mut back = vec![0u8; msg.len()];
    within(QUICK, &format!("{what}: echo of {} bytes", msg.len()), s.read_exact(&mut back))
        .await
        .unwrap_or_else(|e| panic!("{what}: reading the echo: {e}"));
    assert_eq!(back, msg, "{what}: echoed bytes differ");
}

/// The access line of the client connection whose address (`client=`) is `client` (waits
/// for it).
pub async fn access_line(proxy: &Proxy, client: SocketAddr) -> AccessLine {
    proxy.wait_for_log(&format!(" client={client} "), QUICK).await;
    let want = client.to_string();
    proxy
        .access_lines()
        .into_iter()
        .find(|l| l.get("client") == Some(want.as_str()))
        .unwrap_or_else(|| panic!("no access line for client {client}:\n{}", proxy.logs()))
}

/// How the proxy ended a client connection from the client's point of view.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// An orderly end of stream (`read` returned 0).
    Eof,
    /// A reset.
    Reset,
}

/// Waits until the proxy closes `s` (EOF or reset, no data); returns which.
pub async fn wait_closed(s: &mut TcpStream, limit: Duration, what: &str) -> Closed {
    let mut b = [0u8; 16];
    match within(limit, &format!("{what}: waiting for the proxy to close the client"), s.read(&mut b)).await {
        Ok(0) => Closed::Eof,
        Ok(n) => panic!("{what}: expected a close, got data {:?}", &b[..n]),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Closed::Reset,
        Err(e) => panic!("{what}: expected EOF or reset, got {e}"),
    }
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `ntlm-splice-TAG-PID-NANOS` in the system's temporary directory.
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("ntlm-splice-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TempDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `file` in it with `text`; returns its path.
    pub fn write(&self, file: &str, text: &str) -> PathBuf {
        let p = self.0.join(file);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("cannot remove {}: {e}", self.0.display());
        }
    }
}

/// A `listening addr=ADDR routes=A,B ...` line: the address and the routes.
fn parse_listening(line: &str) -> Option<(SocketAddr, Vec<String>)> {
    let (_, rest) = line.split_once("listening addr=")?;
    let addr = rest.split(' ').next()?.parse().ok()?;
    let routes = rest
        .split(' ')
        .find_map(|f| f.strip_prefix("routes="))
        .map(|r| r.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    Some((addr, routes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_parse_logfmt() {
        let l = AccessLine::parse(
            "ts=x level=info access: conn=3 client=127.0.0.1:5 backend=- engine=splice bytes_up=10 bytes_down=0 duration_ms=1 end=connect_failed error=\"Client socket: reset by peer\"",
        )
        .unwrap();
        assert_eq!(l.get("backend"), Some("-"));
        assert_eq!(l.num("bytes_up"), 10);
        assert_eq!(l.get("end"), Some("connect_failed"));
        assert_eq!(l.get("error"), Some("Client socket: reset by peer"));
        assert!(AccessLine::parse("ts=x level=info server: listening addr=1").is_none());
        let (a, r) =
            parse_listening("ts=x level=info server: listening addr=127.0.0.1:5 routes=a,b backends=x").unwrap();
        assert_eq!((a, r), ("127.0.0.1:5".parse().unwrap(), vec!["a".to_string(), "b".to_string()]));
    }
}
