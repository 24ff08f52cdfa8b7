//! Start-up self-test: one loopback connection spliced through the maps, with bytes that
//! arrive before insertion, data both ways and a FIN each way, checked byte for byte within a
//! bounded time. It runs the real relay path (set-up, events, drain, clean-up), on its own
//! thread and runtime so that `load` works from any context.

use std::{
    os::fd::AsRawFd as _,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::{Inner, session, snapshot};
use crate::lifecycle::{End, EngineKind, RelayCtl};

/// Bytes sent each way.
const BYTES: usize = 48 << 10;
/// Of which sent before the relay starts (trap 4).
const EARLY: usize = 4 << 10;

/// Bytes the FIONREAD probe queues on its socket.
const PROBE_BYTES: usize = 4 << 10;
/// Longest the FIONREAD probe waits for its bytes to arrive (loopback: at once).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What FIONREAD said of a socket in the engine's PEER map (no verdict program attached)
/// with [`PROBE_BYTES`] queued: the state of the `fionread` defect on this kernel
/// (`kernels`), measured rather than read from the version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FionreadProbe {
    /// Bytes queued on the socket (seen with a peek).
    pub queued: u64,
    /// What FIONREAD reported.
    pub reported: u64,
}

impl FionreadProbe {
    /// Whether FIONREAD misreported the queue: the kernel has the `fionread` defect.
    pub fn broken(&self) -> bool {
        self.reported != self.queued
    }
}

impl std::fmt::Display for FionreadProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.broken() { "broken" } else { "ok" };
        write!(
            f,
            "{what}: FIONREAD reported {} of {} queued bytes on a socket in a map without a verdict",
            self.reported, self.queued
        )
    }
}

/// Probes the `fionread` defect: a loopback socket goes into PEER (which has no program
/// attached, as for a paused source), gets [`PROBE_BYTES`], and FIONREAD must report them.
/// Harmless to the engine: no verdict runs on PEER and the entry is removed at once.
pub(super) fn fionread_probe(inner: &Inner) -> anyhow::Result<FionreadProbe> {
    use std::{io::Write as _, os::fd::AsFd as _};

    use crate::sys::sock::ioctl_int;

    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("FIONREAD probe: bind 127.0.0.1:0")?;
    let reader = std::net::TcpStream::connect(listener.local_addr()?).context("FIONREAD probe: connect")?;
    let (mut writer, _) = listener.accept().context("FIONREAD probe: accept")?;
    let fd = reader.as_fd();
    let cookie = super::sock::cookie(fd).context("FIONREAD probe: SO_COOKIE")?;
    inner.kernel.peer.put_sock(cookie, fd).context("FIONREAD probe: insert into PEER")?;
    let measured = (|| -> anyhow::Result<FionreadProbe> {
        writer.write_all(&[0x5a; PROBE_BYTES]).context("FIONREAD probe: write")?;
        reader.set_read_timeout(Some(PROBE_TIMEOUT))?;
        // FIONREAD is what is under test, so wait for the bytes with a peek of all of them.
        let mut buf = vec![0u8; PROBE_BYTES];
        // SAFETY: recv(2) writes at most buf.len() bytes into buf, which lives across the call.
        let n = unsafe {
            libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_WAITALL)
        };
        ensure!(n >= 0, "FIONREAD probe: peek: {}", std::io::Error::last_os_error());
        ensure!(
            n as usize == PROBE_BYTES,
            "FIONREAD probe: only {n} of {PROBE_BYTES} bytes arrived within {PROBE_TIMEOUT:?}"
        );
        let reported = ioctl_int(fd, libc::FIONREAD).context("FIONREAD probe: ioctl(FIONREAD)")?;
        Ok(FionreadProbe { queued: PROBE_BYTES as u64, reported })
    })();
    let removed = inner.kernel.peer.delete(cookie).context("FIONREAD probe: delete from PEER");
    let probe = measured?;
    ensure!(removed?, "FIONREAD probe: its PEER entry was gone before it was deleted");
    Ok(probe)
}

/// Runs the self-test; returns how long it took.
pub(super) fn run(inner: &Arc<Inner>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (tx, rx) = mpsc::channel();
    let inner = Arc::clone(inner);
    std::thread::Builder::new()
        .name("sockmap-selftest".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot build the self-test runtime")
                .and_then(|rt| rt.block_on(exercise(&inner)));
            // The receiver may have given up (timeout); nothing left to tell then.
            if tx.send(result).is_err() {
                log::debug!("sockmap self-test finished after its deadline");
            }
        })
        .context("cannot start the self-test thread")?;
    match rx.recv_timeout(super::SELF_TEST_TIMEOUT) {
        Ok(r) => r.map(|()| started.elapsed()),
        Err(_) => bail!(
            "no result within {:?}: bytes did not get through the sockmap on this kernel",
            super::SELF_TEST_TIMEOUT
        ),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

async fn exercise(inner: &Arc<Inner>) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await.context("self-test: bind 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut user = TcpStream::connect(addr).await?;
    let (proxy_client, _) = listener.accept().await?;
    let proxy_backend = TcpStream::connect(addr).await?;
    let (mut server, _) = listener.accept().await?;

    let up = pattern(BYTES, 1);
    let down = pattern(BYTES, 2);
    // Bytes already queued on both sockets before they enter the maps.
    user.write_all(&up[..EARLY]).await?;
    server.write_all(&down[..EARLY]).await?;

    let ctl = RelayCtl { idle_timeout: Some(Duration::from_secs(4)), ..RelayCtl::unlimited() };
    let relay = session::relay(inner, 0, proxy_client, proxy_backend, &ctl);
    let traffic = async {
        let (mut ur, mut uw) = user.split();
        let (mut sr, mut sw) = server.split();
        let send_up = async {
            uw.write_all(&up[EARLY..]).await?;
            uw.shutdown().await
        };
        let send_down = async {
            sw.write_all(&down[EARLY..]).await?;
            sw.shutdown().await
        };
        let mut got_up = Vec::new();
        let mut got_down = Vec::new();
        let (a, b, c, d) = tokio::join!(send_up, send_down, sr.read_to_end(&mut got_up), ur.read_to_end(&mut got_down));
        a.context("self-test: client write")?;
        b.context("self-test: backend write")?;
        c.context("self-test: backend read")?;
        d.context("self-test: client read")?;
        anyhow::Ok((got_up, got_down))
    };
    let (outcome, traffic) = tokio::join!(relay, traffic);
    let (got_up, got_down) = traffic.with_context(|| {
        format!("the relay ended with {:?} ({:?})", outcome.end, outcome.fault.as_ref().map(ToString::to_string))
    })?;
    ensure!(got_up == up, "client-to-backend bytes differ ({} of {} arrived)", got_up.len(), up.len());
    ensure!(got_down == down, "backend-to-client bytes differ ({} of {} arrived)", got_down.len(), down.len());
    ensure!(
        matches!(outcome.end, End::ClientFin | End::BackendFin),
        "the connection ended with {:?} ({:?})",
        outcome.end,
        outcome.fault.map(|f| f.to_string())
    );
    ensure!(outcome.engine == EngineKind::Sockmap, "the connection was carried by {}, not the kernel", outcome.engine);
    ensure!(
        (outcome.bytes_up, outcome.bytes_down) == (BYTES as u64, BYTES as u64),
        "byte counters say {}/{} instead of {BYTES}/{BYTES}",
        outcome.bytes_up,
        outcome.bytes_down
    );
    let s = snapshot(inner);
    if s.stats != 0 || s.ctl != 0 || s.fwd != 0 || s.peer != 0 {
        return Err(anyhow!("map entries left behind after the connection: {s:?}"));
    }
    Ok(())
}
