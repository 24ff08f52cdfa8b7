//! Child processes of the benchmark: every one is tracked by PID and stopped on every exit
//! path (normal end, error, Ctrl-C, and our own death through PR_SET_PDEATHSIG).

use std::{
    fs,
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// How often waits poll a child, a port or the interrupt flag.
pub const POLL: Duration = Duration::from_millis(20);
/// Longest wait for a connect while checking that a proxy listens.
const PORT_PROBE_TIMEOUT: Duration = Duration::from_millis(200);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT, SIGTERM and SIGHUP into a flag every wait loop checks, so that the guards
/// below stop the children before we exit.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a handler that only stores an atomic is valid;
        // no SA_RESTART, so blocking calls return EINTR and loops see the flag.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Fails with "interrupted" once a signal came in.
pub fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d` in small steps, failing early on a signal.
pub fn sleep(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupt()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        thread::sleep(POLL.min(end - now));
    }
}

/// A child we started. Dropping it stops it: `stop_signal`, up to `grace`, then SIGKILL to
/// it and to the descendants it had (nginx's workers).
pub struct Proc {
    /// Short name for messages.
    pub name: String,
    child: Child,
    stop_signal: libc::c_int,
    grace: Duration,
    stopped: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd`. If this process dies first, the kernel sends the child `death_signal`.
    pub fn spawn(
        name: &str,
        cmd: &mut Command,
        death_signal: libc::c_int,
        stop_signal: libc::c_int,
        grace: Duration,
    ) -> anyhow::Result<Proc> {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Proc { name: name.to_string(), child, stop_signal, grace, stopped: None })
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.stopped.is_none() {
            self.stopped = self.child.try_wait().ok().flatten();
        }
        self.stopped
    }

    /// Waits up to `timeout` for the child to exit by itself; `None` if it did not.
    pub fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Ok(Some(s));
            }
            check_interrupt()?;
            if Instant::now() >= end {
                return Ok(None);
            }
            thread::sleep(POLL);
        }
    }

    /// Stops the child (and its descendants) and reaps it.
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let pid = self.pid();
        let family: Vec<(u32, Option<u64>)> =
            ntlm_bench::procfs::descendants(pid).into_iter().map(|d| (d, ntlm_bench::procfs::start_time(d))).collect();
        signal(pid, self.stop_signal);
        let end = Instant::now() + self.grace;
        // Not interruptible: this is the clean-up the interrupt is waiting for.
        while Instant::now() < end && self.exited().is_none() {
            thread::sleep(POLL);
        }
        if self.exited().is_none() {
            eprintln!("bench: {} (pid {pid}) did not stop in {:?}; killing it", self.name, self.grace);
            signal(pid, libc::SIGKILL);
        }
        for (d, started) in family {
            // Only those still alive and still the same process (nginx's workers normally
            // went with their master, and their PIDs may be someone else's by now).
            if started.is_some() && ntlm_bench::procfs::start_time(d) == started {
                signal(d, libc::SIGKILL);
            }
        }
        self.stopped = self.child.wait().ok();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory preconditions; the PID is one of ours.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A network namespace to start children in and to connect from (the edge bench's client,
/// splicer and backend namespaces), held open by a descriptor of `/run/netns/NAME`.
pub struct NetnsFd {
    /// Its name, for messages.
    pub name: String,
    file: fs::File,
}

impl NetnsFd {
    /// Opens the named namespace `/run/netns/NAME` (made by `ip netns add NAME`).
    pub fn open(name: &str) -> anyhow::Result<NetnsFd> {
        let path = format!("/run/netns/{name}");
        let file = fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
        Ok(NetnsFd { name: name.to_string(), file })
    }

    /// Makes `cmd` start in this namespace: the child joins it between fork and exec.
    pub fn enter_on_spawn(&self, cmd: &mut Command) {
        let fd = self.file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the descriptor stays open in the child until
        // exec (it is close-on-exec), which is after this runs.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Runs `f` on a thread that has joined this namespace (a socket it makes stays in it).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let fd = self.file.as_raw_fd();
        thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a descriptor we hold open; it moves only this thread, which
                // ends right after `f`.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    bail!("setns into {}: {}", self.name, std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

/// Connects to `addr` from namespace `ns` (ours when `None`).
fn connect_from(ns: Option<&NetnsFd>, addr: SocketAddr) -> anyhow::Result<()> {
    let connect = || TcpStream::connect_timeout(&addr, PORT_PROBE_TIMEOUT).map(drop);
    match ns {
        None => Ok(connect()?),
        Some(ns) => Ok(ns.run_in(connect)??),
    }
}

/// A fresh directory for configs, logs and client output; removed on drop unless kept.
pub struct TempDir {
    /// Its path.
    pub path: PathBuf,
    /// Keep it (logs of a failed run).
    pub keep: bool,
}

impl TempDir {
    /// Creates the directory.
    pub fn new() -> anyhow::Result<TempDir> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!("ntlm-bench.{}.{nanos}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("bench: logs kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago (for nginx and HAProxy, which cannot be
/// told to bind port 0 and report it).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits until `addr` accepts connections, seen from namespace `ns` (ours when `None`),
/// while `proc` is alive.
pub fn wait_listening(
    proc: &mut Proc,
    addr: SocketAddr,
    ns: Option<&NetnsFd>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    loop {
        check_interrupt()?;
        if let Some(s) = proc.exited() {
            bail!("{} exited ({s}) before listening on {addr}", proc.name);
        }
        if connect_from(ns, addr).is_ok() {
            return Ok(());
        }
        if Instant::now() >= end {
            bail!("{} did not listen on {addr} within {timeout:?}", proc.name);
        }
        thread::sleep(POLL);
    }
}

/// Waits until the file `log` has a line containing `needle`; returns that line.
pub fn wait_log_line(proc: &mut Proc, log: &Path, needle: &str, timeout: Duration) -> anyhow::Result<String> {
    let end = Instant::now() + timeout;
    loop {
        check_interrupt()?;
        let text = fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return Ok(line.to_string());
        }
        if let Some(s) = proc.exited() {
            bail!("{} exited ({s}) before logging `{needle}`:\n{}", proc.name, tail(&text, 12));
        }
        if Instant::now() >= end {
            bail!("{} did not log `{needle}` within {timeout:?}:\n{}", proc.name, tail(&text, 12));
        }
        thread::sleep(POLL);
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last lines of a file, for error messages.
pub fn file_tail(path: &Path, n: usize) -> String {
    tail(&fs::read_to_string(path).unwrap_or_default(), n)
}

/// Standard output and error of a finished client.
pub struct ClientOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

/// Runs `cmd` to completion (output to files in `dir`, so no pipe can fill up), killing it
/// after `timeout`.
pub fn run_to_end(name: &str, cmd: &mut Command, dir: &Path, timeout: Duration) -> anyhow::Result<ClientOutput> {
    let out = dir.join(format!("{name}.out"));
    let err = dir.join(format!("{name}.err"));
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(&out).context("client stdout file")?)
        .stderr(fs::File::create(&err).context("client stderr file")?);
    let mut p = Proc::spawn(name, cmd, libc::SIGKILL, libc::SIGKILL, Duration::from_secs(2))?;
    let status = match p.wait_timeout(timeout)? {
        Some(s) => s,
        None => {
            p.stop();
            bail!("{name} did not finish within {timeout:?}: killed");
        }
    };
    Ok(ClientOutput {
        status,
        stdout: fs::read_to_string(&out).unwrap_or_default(),
        stderr: fs::read_to_string(&err).unwrap_or_default(),
    })
}
