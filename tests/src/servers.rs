//! Loopback backends for transport tests, and a positional byte pattern so that a receiver
//! can check every byte it gets against what was sent (order, loss and duplication all show
//! up as the offset of the first wrong byte), without buffering the stream.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};

/// Bytes moved per read or write in these helpers.
pub const CHUNK: usize = 256 << 10;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the pattern of stream `seed` starting at byte `offset`.
pub fn pattern_fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let word = splitmix64(seed ^ (pos / 8).wrapping_mul(0x2545_f491_4f6c_dd1d)).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

/// Checks a received stream against the pattern of `seed`.
#[derive(Debug)]
pub struct Verifier {
    seed: u64,
    /// Bytes checked so far.
    pub len: u64,
    /// Offset of the first wrong byte, if any.
    pub first_mismatch: Option<u64>,
    scratch: Vec<u8>,
}

impl Verifier {
    /// A verifier for stream `seed`.
    pub fn new(seed: u64) -> Self {
        Verifier { seed, len: 0, first_mismatch: None, scratch: Vec::new() }
    }

    /// Checks the next received bytes.
    pub fn update(&mut self, data: &[u8]) {
        if self.first_mismatch.is_none() {
            self.scratch.resize(data.len(), 0);
            pattern_fill(self.seed, self.len, &mut self.scratch);
            if let Some(i) = self.scratch.iter().zip(data).position(|(a, b)| a != b) {
                self.first_mismatch = Some(self.len + i as u64);
            }
        }
        self.len += data.len() as u64;
    }

    /// Panics unless exactly `expected` correct bytes were received.
    pub fn assert_exact(&self, expected: u64, what: &str) {
        assert_eq!(self.first_mismatch, None, "{what}: first wrong byte at offset {:?} (of {} received)", self.first_mismatch, self.len);
        assert_eq!(self.len, expected, "{what}: received {} bytes, sent {expected}", self.len);
    }
}

/// Writes `len` bytes of pattern `seed` to `w`.
pub async fn send_pattern<W: AsyncWriteExt + Unpin>(w: &mut W, seed: u64, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK as u64) as usize;
        pattern_fill(seed, off, &mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        off += n as u64;
    }
    Ok(())
}

/// Reads `r` to EOF, checking it against pattern `seed`.
pub async fn recv_pattern<R: AsyncReadExt + Unpin>(r: &mut R, seed: u64) -> std::io::Result<Verifier> {
    let mut v = Verifier::new(seed);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(v);
        }
        v.update(&buf[..n]);
    }
}

/// Accept-queue length of the test servers: as deep as the kernel allows (it clamps to
/// `net.core.somaxconn`, 4096 by default). A real backend (IIS: 1,000 and up) does not
/// overflow when 1,000 connections arrive at once; with tokio's default of 1,024 this one
/// did (TcpExtListenOverflows, then SyncookiesFailed = the connections it reset).
const TEST_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> TcpListener {
    let s = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .expect("test server socket");
    s.set_reuseaddr(true).expect("SO_REUSEADDR");
    s.bind(addr).expect("bind test server");
    s.listen(TEST_BACKLOG).expect("listen test server")
}

/// A loopback server; dropping it stops accepting (live connections finish on their own).
pub struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
    accepted: Arc<AtomicU64>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Serves every connection with `handler` on 127.0.0.1:0.
    pub async fn start<F, Fut>(handler: F) -> Server
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Self::start_on("127.0.0.1:0".parse().unwrap(), handler).await
    }

    /// Serves every connection with `handler` on `addr`.
    pub async fn start_on<F, Fut>(addr: SocketAddr, handler: F) -> Server
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = listen(addr);
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handler(s));
            }
        });
        Server { addr, task, accepted }
    }

    /// Echoes every byte back; on EOF half-closes its side too.
    pub async fn echo() -> Server {
        Self::start(|s| async move {
            let (mut r, mut w) = s.into_split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        })
        .await
    }

    /// Reads everything, checking it against pattern `seed`; after the client's EOF answers
    /// one line `len=N mismatch=OFFSET|none\n` and closes. The result also goes to the channel.
    pub async fn sink(seed: u64) -> (Server, mpsc::UnboundedReceiver<Verifier>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let server = Self::start(move |mut s| {
            let tx = tx.clone();
            async move {
                let Ok(v) = recv_pattern(&mut s, seed).await else { return };
                let line = format!(
                    "len={} mismatch={}\n",
                    v.len,
                    v.first_mismatch.map_or("none".to_string(), |m| m.to_string())
                );
                let _ = s.write_all(line.as_bytes()).await;
                let _ = s.shutdown().await;
                let _ = tx.send(v);
            }
        })
        .await;
        (server, rx)
    }

    /// Sends `len` bytes of pattern `seed`, half-closes, then reads to EOF and reports how many
    /// bytes the client sent it meanwhile (lets a test check the other direction stays open).
    pub async fn source(seed: u64, len: u64) -> (Server, mpsc::UnboundedReceiver<u64>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let server = Self::start(move |s| {
            let tx = tx.clone();
            async move {
                let (mut r, mut w) = s.into_split();
                if send_pattern(&mut w, seed, len).await.is_err() {
                    return;
                }
                let _ = w.shutdown().await;
                let mut n = 0u64;
                let mut buf = vec![0u8; CHUNK];
                while let Ok(m) = r.read(&mut buf).await {
                    if m == 0 {
                        break;
                    }
                    n += m as u64;
                }
                let _ = tx.send(n);
            }
        })
        .await;
        (server, rx)
    }

    /// Reads at most `rate` bytes per second (changeable while running through the returned
    /// handle; 0 = unlimited), checking pattern `seed`; reports the verifier at EOF.
    pub async fn slow_sink(seed: u64, rate: u64) -> (Server, Arc<AtomicU64>, mpsc::UnboundedReceiver<Verifier>) {
        let rate_handle = Arc::new(AtomicU64::new(rate));
        let (tx, rx) = mpsc::unbounded_channel();
        let r2 = rate_handle.clone();
        let server = Self::start(move |mut s| {
            let tx = tx.clone();
            let rate = r2.clone();
            async move {
                let mut v = Verifier::new(seed);
                let mut buf = vec![0u8; 64 << 10];
                let tick = Duration::from_millis(10);
                loop {
                    let r = rate.load(Ordering::Relaxed);
                    let want = if r == 0 { buf.len() } else { ((r / 100) as usize).clamp(1, buf.len()) };
                    match s.read(&mut buf[..want]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => v.update(&buf[..n]),
                    }
                    if rate.load(Ordering::Relaxed) != 0 {
                        tokio::time::sleep(tick).await;
                    }
                }
                let _ = tx.send(v);
            }
        })
        .await;
        (server, rate_handle, rx)
    }
}

/// A loopback address where nothing listens (bound then closed: connects are refused).
pub async fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A listener whose accept queue is full and never drained: further SYNs are dropped, so a
/// connect to it hangs until the connector's own timeout. Keep the value alive while used.
pub struct Unresponsive {
    /// The address that does not answer.
    pub addr: SocketAddr,
    _listener: std::net::TcpListener,
    _fillers: Vec<std::net::TcpStream>,
}

impl Unresponsive {
    /// Creates it on loopback.
    pub fn new() -> Unresponsive {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket calls on a descriptor we create and own.
        let listener = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
                sin_zero: [0; 8],
            };
            assert_eq!(libc::bind(fd, (&raw const sa).cast(), size_of::<libc::sockaddr_in>() as u32), 0);
            assert_eq!(libc::listen(fd, 0), 0);
            std::net::TcpListener::from_raw_fd(fd)
        };
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        // Fill the accept queue; once a connect times out, SYNs are being dropped.
        for _ in 0..8 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => fillers.push(s),
                Err(_) => return Unresponsive { addr, _listener: listener, _fillers: fillers },
            }
        }
        panic!("could not fill the accept queue of {addr}");
    }
}

impl Default for Unresponsive {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_positional() {
        let mut a = vec![0u8; 1000];
        pattern_fill(7, 0, &mut a);
        let mut b = vec![0u8; 13];
        pattern_fill(7, 501, &mut b);
        assert_eq!(&a[501..514], &b[..]);
        let mut v = Verifier::new(7);
        v.update(&a[..333]);
        v.update(&a[333..]);
        v.assert_exact(1000, "split");
        let mut bad = a.clone();
        bad[700] ^= 1;
        let mut v = Verifier::new(7);
        v.update(&bad);
        assert_eq!(v.first_mismatch, Some(700));
    }

    #[test]
    fn unresponsive_listener_drops_syns() {
        let u = Unresponsive::new();
        assert!(std::net::TcpStream::connect_timeout(&u.addr, Duration::from_millis(300)).is_err());
    }
}
