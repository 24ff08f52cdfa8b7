//! Userspace engine: splice(2) from the source socket into a pipe and from the pipe into
//! the destination socket, driven by tokio readiness. Payload pages move by reference; the
//! process never reads a byte. A plain copy is used only where the kernel refuses splice(2)
//! for a socket (EINVAL), or when no pipe can be had (descriptor limit).
//!
//! Pipes are borrowed from a small pool only while a burst is in flight and returned empty,
//! so an idle connection holds just its two sockets (a 10,000-connection box would
//! otherwise need 40,000 extra descriptors).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{io::Interest, net::TcpStream};

use super::{Outcome, run_session};
use crate::relay::{self, Dir, Fault, RelayCtl, Session, Side, monotonic_ns};

/// Most bytes moved by one splice(2) call: the default pipe capacity (16 pages).
const SPLICE_CHUNK: usize = 64 << 10;
/// Empty pipes kept for reuse; more are closed when returned.
const PIPE_POOL_MAX: usize = 256;
/// Buffer of the copy fallback.
const COPY_BUF: usize = 64 << 10;

/// The splice engine: holds the shared pipe pool.
pub struct SpliceEngine {
    pool: Mutex<Vec<Pipe>>,
}

impl Default for SpliceEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl SpliceEngine {
    /// A new engine with an empty pipe pool.
    pub fn new() -> Self {
        Self { pool: Mutex::new(Vec::new()) }
    }

    fn take_pipe(&self) -> io::Result<Pipe> {
        if let Some(p) = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        Pipe::new()
    }

    fn give_pipe(&self, p: Pipe) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < PIPE_POOL_MAX {
            pool.push(p);
        }
    }

    /// Relays one paired connection to its end.
    pub async fn relay(&self, id: u64, client: TcpStream, backend: TcpStream, ctl: &RelayCtl) -> Outcome {
        let s = SpliceSession {
            engine: self,
            client,
            backend,
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            last: AtomicU64::new(monotonic_ns()),
            reset: relay::ResetOnClose::default(),
            id,
        };
        let outcome = run_session(&s, ctl, "splice").await;
        s.close();
        outcome
    }
}

/// A pipe pair; both ends non-blocking.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid two-int array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two fresh descriptors that we now own.
        Ok(unsafe { Pipe { r: OwnedFd::from_raw_fd(fds[0]), w: OwnedFd::from_raw_fd(fds[1]) } })
    }
}

fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall; null offsets are valid for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

struct SpliceSession<'e> {
    engine: &'e SpliceEngine,
    client: TcpStream,
    backend: TcpStream,
    up: AtomicU64,
    down: AtomicU64,
    last: AtomicU64,
    reset: relay::ResetOnClose,
    /// Connection id, for the log.
    id: u64,
}

/// How a burst ended.
enum Burst {
    /// The source has no more data for now.
    Drained,
    /// The source reached EOF.
    Eof,
    /// The kernel refused splice(2) for this socket; copy instead.
    Unsupported,
}

impl SpliceSession<'_> {
    fn sock(&self, side: Side) -> &TcpStream {
        match side {
            Side::Client => &self.client,
            Side::Backend => &self.backend,
        }
    }

    fn moved(&self, dir: Dir, n: usize) {
        let c = match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        };
        c.fetch_add(n as u64, Ordering::Relaxed);
        self.last.store(monotonic_ns(), Ordering::Relaxed);
    }

    /// Moves what the source has now through `pipe`; the pipe is empty again on `Ok`.
    async fn splice_burst(&self, dir: Dir, pipe: &Pipe) -> Result<Burst, Fault> {
        let (src, dst) = (self.sock(dir.src()), self.sock(dir.dst()));
        let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
        loop {
            let got = match src.try_io(Interest::READABLE, || splice(src_fd, pipe.w.as_raw_fd(), SPLICE_CHUNK)) {
                Ok(0) => return Ok(Burst::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Burst::Unsupported),
                Err(e) => return Err(Fault::on(dir.src())(e)),
            };
            let mut left = got;
            while left > 0 {
                let n = dst
                    .async_io(Interest::WRITABLE, || splice(pipe.r.as_raw_fd(), dst_fd, left))
                    .await
                    .map_err(Fault::on(dir.dst()))?;
                left -= n;
                self.moved(dir, n);
            }
        }
    }

    /// Moves what the source has now with a userspace buffer.
    async fn copy_burst(&self, dir: Dir, buf: &mut [u8]) -> Result<Burst, Fault> {
        let (src, dst) = (self.sock(dir.src()), self.sock(dir.dst()));
        loop {
            let got = match src.try_read(buf) {
                Ok(0) => return Ok(Burst::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
                Err(e) => return Err(Fault::on(dir.src())(e)),
            };
            let mut off = 0;
            while off < got {
                dst.writable().await.map_err(Fault::on(dir.dst()))?;
                match dst.try_write(&buf[off..got]) {
                    Ok(n) => {
                        off += n;
                        self.moved(dir, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(Fault::on(dir.dst())(e)),
                }
            }
        }
    }

    async fn pump(&self, dir: Dir) -> Result<(), Fault> {
        let src = self.sock(dir.src());
        let mut copy_buf: Option<Box<[u8]>> = None;
        loop {
            src.readable().await.map_err(Fault::on(dir.src()))?;
            let pipe = match copy_buf {
                None => self.engine.take_pipe().ok(),
                Some(_) => None,
            };
            let burst = match (&mut copy_buf, pipe) {
                (None, Some(pipe)) => {
                    let r = self.splice_burst(dir, &pipe).await;
                    // Only an empty pipe may go back to the pool; after a fault it may hold data.
                    if r.is_ok() {
                        self.engine.give_pipe(pipe);
                    }
                    r?
                }
                (buf, _) => {
                    let buf = buf.get_or_insert_with(|| vec![0; COPY_BUF].into_boxed_slice());
                    self.copy_burst(dir, buf).await?
                }
            };
            match burst {
                Burst::Drained => {}
                Burst::Eof => break,
                Burst::Unsupported => {
                    log::debug!("splice(2) refused for this socket; copying in userspace");
                    copy_buf.get_or_insert_with(|| vec![0; COPY_BUF].into_boxed_slice());
                }
            }
        }
        relay::shutdown_write(self.sock(dir.dst()).as_fd()).map_err(Fault::on(dir.dst()))
    }

    /// Closes both sockets, with a reset where one was asked for.
    fn close(self) {
        self.reset.apply(self.id, |side| self.sock(side).as_fd());
    }
}

impl Session for SpliceSession<'_> {
    async fn run(&self, dir: Dir) -> Result<(), Fault> {
        self.pump(dir).await
    }

    fn bytes(&self) -> (u64, u64) {
        (self.up.load(Ordering::Relaxed), self.down.load(Ordering::Relaxed))
    }

    fn last_activity_ns(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }

    fn reset_on_close(&self, side: Side) {
        self.reset.set(side);
    }

    fn socket(&self, side: Side) -> &TcpStream {
        self.sock(side)
    }
}
