//! Live upgrade (issue 19; docs/upgrade.md): the running process starts the new binary and
//! hands it, over a `SOCK_SEQPACKET` pair with `SCM_RIGHTS` ([`crate::sys::fdpass`]), its
//! listening sockets (the same kernel sockets: no connect is refused at any moment) and its
//! live splice-engine connections with their identity ([`wire::ConnState`]), so that no
//! client logs in again.
//!
//! The order ([`crate::server::Server`] drives it):
//! 1. old: a socket pair; the new binary is started with one end and its number in
//!    [`FD_ENV`]; every listener is sent, then [`wire::Msg::ListenersDone`];
//! 2. new: reads them ([`Inherited::from_env`]), loads everything as at a start but takes
//!    those listeners instead of binding, and says [`wire::Msg::Ready`]; the old process
//!    waits [`READY_TIMEOUT`] for it, else (or if the new one exits) kills it and goes on
//!    serving;
//! 3. old: stops accepting, sends the next connection id, then every parked connection and
//!    every active splice one at its first moment with nothing in flight
//!    ([`crate::lifecycle::HandOver`]), for up to [`HAND_OVER_TIMEOUT`]; then drains the
//!    rest as on SIGTERM and exits.

pub mod conns;
pub mod control;
pub mod wire;

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd, RawFd},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use tokio::io::unix::AsyncFd;

use crate::sys::fdpass;
use wire::{MAX_MESSAGE, Msg};

/// The environment variable that gives the new process its end of the link.
pub const FD_ENV: &str = "NTLM_SPLICE_UPGRADE_FD";
/// How long the old process waits for the new one to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the old process hands over live connections before it drains the rest.
pub const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new process waits for the old one's next message during the start.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(10);

/// The path of this program as started, read once at start: after a package upgrade has
/// replaced the file, `/proc/self/exe` names the deleted old one, and the path names the new.
static EXE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// Notes the program's path (call at start, before anything can replace the file).
pub fn remember_exe() {
    EXE.get_or_init(|| std::env::current_exe().ok());
}

/// The binary an upgrade starts by default: this program's path as started.
pub fn default_binary() -> Option<PathBuf> {
    EXE.get_or_init(|| std::env::current_exe().ok()).clone()
}

/// One end of the upgrade link, non-blocking, in the runtime.
pub struct Link(AsyncFd<OwnedFd>);

impl Link {
    fn new(fd: OwnedFd) -> io::Result<Link> {
        socket2::SockRef::from(&fd).set_nonblocking(true)?;
        // SAFETY: an OwnedFd always returns the descriptor it owns, and the AsyncFd owns it.
        Ok(Link(unsafe { AsyncFd::register(fd) }?))
    }

    /// Sends `m` with `fds`.
    pub async fn send(&self, m: &Msg, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let bytes = m.encode();
        loop {
            let mut g = self.0.writable().await?;
            match g.try_io(|fd| fdpass::send(fd.get_ref().as_fd(), &bytes, fds)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// The next message and its descriptors; `None` when the other process closed its end.
    pub async fn recv(&self) -> io::Result<Option<(Msg, Vec<OwnedFd>)>> {
        loop {
            let mut g = self.0.readable().await?;
            match g.try_io(|fd| fdpass::recv(fd.get_ref().as_fd(), MAX_MESSAGE)) {
                Ok(Ok(r)) if r.data.is_empty() && r.fds.is_empty() => return Ok(None),
                Ok(Ok(r)) => {
                    let m = Msg::decode(&r.data).map_err(io::Error::other)?;
                    return Ok(Some((m, r.fds)));
                }
                // A SEQPACKET peer that exited with messages unread resets the pair: the same
                // end of the link as a close.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNRESET) => return Ok(None),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// [`Link::recv`] within `limit`, EOF and a timeout as errors naming `what` was awaited.
    pub async fn expect(&self, limit: Duration, what: &str) -> anyhow::Result<(Msg, Vec<OwnedFd>)> {
        match tokio::time::timeout(limit, self.recv()).await {
            Err(_) => anyhow::bail!("no {what} within {}", humantime::format_duration(limit)),
            Ok(Err(e)) => Err(e).with_context(|| format!("reading the {what}")),
            Ok(Ok(None)) => anyhow::bail!("the other process exited (or closed the link) before the {what}"),
            Ok(Ok(Some(m))) => Ok(m),
        }
    }
}

/// The old process's side: the new process started with its end of the link.
pub struct Started {
    /// The link.
    pub link: Link,
    /// The new process.
    pub child: std::process::Child,
}

/// Starts `binary` with this process's arguments and the other end of a new link, passing
/// it the capabilities among `caps` this process holds (as ambient capabilities: a process
/// that narrowed its own after start, e.g. under systemd's `AmbientCapabilities=`, has none
/// left to pass on otherwise, so the new one would start with nothing).
pub fn start(binary: &std::path::Path, caps: u64) -> anyhow::Result<Started> {
    use std::os::unix::process::CommandExt as _;
    let (ours, theirs) = fdpass::seqpacket_pair().context("cannot create the socket pair for the upgrade")?;
    let raw: RawFd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(binary);
    cmd.args(std::env::args_os().skip(1)).env(FD_ENV, raw.to_string());
    // SAFETY: the closure only calls fcntl(2), capget(2), capset(2) and prctl(2), which are
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            fdpass::inheritable(raw)?;
            crate::sys::privs::pass_on_exec(caps).map_err(io::Error::from_raw_os_error)
        });
    }
    let child = cmd.spawn().with_context(|| {
        let passing = if caps == 0 {
            String::new()
        } else {
            format!("; or passing it the capabilities {} failed", crate::sys::caps::names(caps))
        };
        format!("cannot start {} (check the path and that it is executable{passing})", binary.display())
    })?;
    drop(theirs);
    Ok(Started { link: Link::new(ours)?, child })
}

/// The new process's side: what the old process handed over at start.
pub struct Inherited {
    /// The link, for the rest of the hand-over.
    pub link: Link,
    /// Listening sockets by configured address.
    pub listeners: Vec<(std::net::SocketAddr, OwnedFd)>,
    /// The metrics endpoint's listening socket, by configured address.
    pub metrics: Option<(std::net::SocketAddr, OwnedFd)>,
}

impl Inherited {
    /// In a process started by an upgrade ([`FD_ENV`] set), reads the listeners the old
    /// process sends; `None` in a process started otherwise. Needs the runtime.
    pub async fn from_env() -> anyhow::Result<Option<Inherited>> {
        let Some(v) = std::env::var_os(FD_ENV) else { return Ok(None) };
        let fd: RawFd = v.to_str().and_then(|s| s.parse().ok()).with_context(|| {
            format!("{FD_ENV}={v:?} is not a descriptor number; it is set by `ntlm-splice upgrade` only: unset it")
        })?;
        let (ty, _) = crate::sys::sock::getsockopt::<libc::c_int>(
            // SAFETY: only read here; owned below once it is known to be a socket.
            unsafe { BorrowedFd::borrow_raw(fd) },
            libc::SOL_SOCKET,
            libc::SO_TYPE,
        )
        .with_context(|| {
            format!("{FD_ENV}={fd}: not an open socket; it is set by `ntlm-splice upgrade` only: unset it")
        })?;
        anyhow::ensure!(ty == libc::SOCK_SEQPACKET, "{FD_ENV}={fd}: not the upgrade's socket; unset it");
        // SAFETY: an open socket handed to this process for it alone (the old process closed
        // its copy of this end after starting it).
        let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // Not inherited further.
        socket2::SockRef::from(&owned).set_cloexec(true)?;
        let link = Link::new(owned)?;
        let mut got = Inherited { link, listeners: Vec::new(), metrics: None };
        loop {
            let (m, mut fds) = got.link.expect(LINK_TIMEOUT, "listening sockets from the old process").await?;
            match (m, fds.pop()) {
                (Msg::Listener(a), Some(fd)) => got.listeners.push((a, fd)),
                (Msg::Metrics(a), Some(fd)) => got.metrics = Some((a, fd)),
                (Msg::ListenersDone, None) => break,
                (m, _) => anyhow::bail!("unexpected upgrade message {m:?} while reading the listeners"),
            }
        }
        log::info!("took {} listening socket(s) from the old process", got.listeners.len());
        Ok(Some(got))
    }

    /// The listener handed over for configured address `addr`, as a tokio listener.
    pub fn take(&mut self, addr: std::net::SocketAddr) -> Option<io::Result<tokio::net::TcpListener>> {
        let i = self.listeners.iter().position(|(a, _)| *a == addr)?;
        Some(to_listener(self.listeners.swap_remove(i).1))
    }

    /// The metrics listener handed over for `addr`.
    pub fn take_metrics(&mut self, addr: std::net::SocketAddr) -> Option<io::Result<tokio::net::TcpListener>> {
        match self.metrics.take() {
            Some((a, fd)) if a == addr => Some(to_listener(fd)),
            _ => None,
        }
    }
}

fn to_listener(fd: OwnedFd) -> io::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// Tells systemd (`Type=notify`) that this process serves and is the service's main process
/// (after an upgrade: also sent by the old process, see [`notify_main_pid`]; `NotifyAccess=all`
/// lets this one through should that have failed); nothing without `$NOTIFY_SOCKET`.
pub fn notify_systemd() {
    notify(&format!("MAINPID={}\nREADY=1\n", std::process::id()));
}

/// Tells systemd that `pid` (the new process of an upgrade, which now serves) is the service's
/// main process. Sent by the old one, the main process until then, as soon as the new one is
/// ready: systemd has it before the old process exits, and does not take that exit for the
/// service's end. Nothing without `$NOTIFY_SOCKET`.
pub fn notify_main_pid(pid: u32) {
    notify(&format!("MAINPID={pid}\n"));
}

fn notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = (|| -> io::Result<()> {
        let s = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            s.send_to_addr(msg.as_bytes(), &addr)?;
        } else {
            s.send_to(msg.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        log::warn!(
            "cannot notify systemd at NOTIFY_SOCKET ({e}), so with Type=notify it does not see this: the unit must \
             allow AF_UNIX (RestrictAddressFamilies=)"
        );
    }
}
