//! The backend (on loopback, or in the edge bench's backend namespace): one task per
//! connection, the header says sink, source (paced if it asks) or echo.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Context as _;
use ntlm_bench::{
    procfs,
    proto::{self, ACK_LEN, CHUNK, FLAG_VERIFY, HEADER_LEN, Header, Mode, NO_MISMATCH},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Time a new connection gets to send its header (a readiness probe sends none and closes).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a client gets to close after a source has sent everything.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (EMFILE) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// Worker threads: the box has two cores, shared with the client and the proxy.
const WORKERS: usize = 2;

fn pattern() -> &'static Arc<Vec<u8>> {
    static P: OnceLock<Arc<Vec<u8>>> = OnceLock::new();
    P.get_or_init(|| Arc::new(proto::pattern_buf()))
}

/// Serves until `max` has passed.
pub fn serve(listen: SocketAddr, max: Duration) -> anyhow::Result<()> {
    procfs::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot bind {listen}"))?;
        println!("listening addr={}", listener.local_addr()?);
        let deadline = tokio::time::sleep(max);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => {
                    eprintln!("ntlm-bench serve: --max-secs reached, exiting");
                    return Ok(());
                }
                r = listener.accept() => match r {
                    Ok((s, _)) => {
                        tokio::spawn(async move {
                            if let Err(e) = handle(s).await {
                                eprintln!("ntlm-bench serve: connection: {e:#}");
                            }
                        });
                    }
                    Err(e) => {
                        eprintln!("ntlm-bench serve: accept: {e}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
    })
}

async fn handle(mut s: TcpStream) -> anyhow::Result<()> {
    s.set_nodelay(true)?;
    let mut h = [0u8; HEADER_LEN];
    match tokio::time::timeout(HEADER_TIMEOUT, s.read_exact(&mut h)).await {
        Err(_) => return Ok(()),
        // A readiness probe: connected and closed without a header.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
        Ok(Err(e)) => return Err(e).context("reading the header"),
        Ok(Ok(_)) => {}
    }
    let h = Header::decode(&h).map_err(anyhow::Error::msg)?;
    match h.mode {
        Mode::Sink => sink(s, h.flags & FLAG_VERIFY != 0).await,
        Mode::Source => {
            if h.pace_mbit > 0 {
                use std::os::fd::AsRawFd as _;
                ntlm_bench::pace::set_max_pacing_rate(s.as_raw_fd(), h.pace_mbit)
                    .context("SO_MAX_PACING_RATE on a paced source")?;
            }
            source(s, h.n).await
        }
        Mode::Echo { req, resp } => echo(s, req as usize, resp as usize).await,
    }
}

async fn sink(mut s: TcpStream, verify: bool) -> anyhow::Result<()> {
    let pat = pattern();
    let mut buf = vec![0u8; CHUNK];
    let (mut got, mut bad) = (0u64, NO_MISMATCH);
    loop {
        let n = s.read(&mut buf).await.context("sink read")?;
        if n == 0 {
            break;
        }
        if verify
            && bad == NO_MISMATCH
            && let Some(at) = proto::first_mismatch(pat, got, &buf[..n])
        {
            bad = at;
        }
        got += n as u64;
    }
    let mut ack = [0u8; ACK_LEN];
    ack[..8].copy_from_slice(&got.to_le_bytes());
    ack[8..].copy_from_slice(&bad.to_le_bytes());
    s.write_all(&ack).await.context("sink ack")?;
    s.shutdown().await.context("sink shutdown")?;
    Ok(())
}

async fn source(mut s: TcpStream, n: u64) -> anyhow::Result<()> {
    let pat = pattern();
    let mut sent = 0u64;
    while sent < n {
        let len = (n - sent).min(CHUNK as u64) as usize;
        s.write_all(proto::pattern_at(pat, sent, len)).await.context("source write")?;
        sent += len as u64;
    }
    s.shutdown().await.context("source shutdown")?;
    // Wait for the client's EOF so that our close does not turn into a reset.
    let mut scratch = [0u8; 512];
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Ok(n) = s.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}

async fn echo(mut s: TcpStream, req: usize, resp: usize) -> anyhow::Result<()> {
    let pat = pattern();
    let mut buf = vec![0u8; req];
    loop {
        match s.read_exact(&mut buf).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e).context("echo read"),
        }
        s.write_all(&pat[..resp]).await.context("echo write")?;
    }
}
