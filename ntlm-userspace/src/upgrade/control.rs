//! `ntlm-splice upgrade --pid PID [--binary PATH]`: asks the running process for an upgrade
//! over its control socket, an abstract Unix socket named after its pid (so in the caller's
//! network namespace), and prints the outcome. Only a caller of the same user (or root) is
//! heard (SO_PEERCRED): the request names a binary the proxy will run.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

use crate::server::{Control, UpgradeRequest};

/// Longest request line (a path).
const MAX_REQUEST: u64 = 8 << 10;
/// How long a caller has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The abstract name of the control socket of process `pid`.
fn name(pid: u32) -> String {
    format!("ntlm-splice/upgrade/{pid}")
}

fn abstract_addr(pid: u32) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt as _;
    std::os::unix::net::SocketAddr::from_abstract_name(name(pid).as_bytes())
}

/// Serves this process's control socket: each request becomes a [`Control::Upgrade`] sent
/// to `control`, and the caller gets its outcome.
pub async fn serve(control: tokio::sync::mpsc::Sender<Control>) {
    let listener = match std::os::unix::net::UnixListener::bind_addr(&match abstract_addr(std::process::id()) {
        Ok(a) => a,
        Err(e) => return log::warn!("upgrade: no control socket ({e}); SIGUSR2 still upgrades"),
    })
    .and_then(|l| {
        l.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(l)
    }) {
        Ok(l) => l,
        Err(e) => return log::warn!("upgrade: cannot listen on the control socket ({e}); SIGUSR2 still upgrades"),
    };
    loop {
        let Ok((s, _)) = listener.accept().await else { continue };
        let me = crate::sys::caps::euid();
        match s.peer_cred() {
            Ok(c) if c.uid() == me || c.uid() == 0 => {}
            _ => {
                log::warn!("upgrade: refused a request on the control socket from another user");
                continue;
            }
        }
        let control = control.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r.take(MAX_REQUEST));
            let read = r.read_line(&mut line);
            if !matches!(tokio::time::timeout(REQUEST_TIMEOUT, read).await, Ok(Ok(_))) {
                return;
            }
            let path = line.trim_end_matches('\n');
            let binary = (!path.is_empty()).then(|| PathBuf::from(path));
            log::info!("upgrade: requested on the control socket");
            let (tx, rx) = tokio::sync::oneshot::channel();
            // Dropped once the answer is written: the process may exit then.
            let (_answering, answered) = tokio::sync::oneshot::channel::<()>();
            let request = UpgradeRequest { binary, reply: Some(tx), answered: Some(answered) };
            let answer = if control.send(Control::Upgrade(request)).await.is_err() {
                "failed: the proxy is shutting down\n".to_string()
            } else {
                match rx.await {
                    Ok(Ok(s)) => format!("ok: {s}\n"),
                    Ok(Err(e)) => format!("failed: {e}\n"),
                    Err(_) => "failed: the proxy is shutting down\n".to_string(),
                }
            };
            w.write_all(answer.as_bytes()).await.ok();
            w.shutdown().await.ok();
        });
    }
}

/// The `upgrade` subcommand: asks process `pid` to upgrade to `binary` (default: the path
/// it was started from) and waits for the outcome.
pub fn request(pid: u32, binary: Option<PathBuf>) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let binary = binary.map(std::path::absolute).transpose().context("--binary")?;
    let mut s = std::os::unix::net::UnixStream::connect_addr(&abstract_addr(pid)?).with_context(|| {
        format!("no ntlm-splice process with pid {pid} takes upgrade requests here (is it running, in this network namespace?)")
    })?;
    let wait = super::READY_TIMEOUT + super::HAND_OVER_TIMEOUT + REQUEST_TIMEOUT;
    s.set_read_timeout(Some(wait))?;
    let line = binary.map(|b| b.to_string_lossy().into_owned()).unwrap_or_default();
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).context("waiting for the outcome")?;
    let answer = answer.trim_end();
    match answer.strip_prefix("ok: ") {
        Some(ok) => Ok(ok.to_string()),
        None if answer.is_empty() => anyhow::bail!("process {pid} closed the control socket without an answer"),
        None => anyhow::bail!("{}", answer.strip_prefix("failed: ").unwrap_or(answer)),
    }
}
