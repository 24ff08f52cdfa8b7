//! The userspace copies of the sockmap engine: the lane (bytes the verdict passed to the
//! source's own queue while its direction was paused, read out at once and written to the
//! destination once everything redirected before them arrived; see `flow`), and the plain
//! copy of a direction whose source could not enter FWD because its FIN came first (trap 8).

use std::{io, sync::atomic::Ordering, time::Duration};

use tokio::net::TcpStream;

use super::session::Conn;
use crate::lifecycle::{Dir, Fault};

/// Read buffer of the userspace copies: the lane's (allocated on the first passed byte) and
/// the FIN-before-insertion copy's.
pub(super) const COPY_BUF: usize = 64 << 10;

impl Conn<'_> {
    /// Userspace copy of `dir` until EOF, for a source that never entered FWD (its FIN came
    /// first): plain read/write, since the sockets may be in a map for the other direction.
    pub(super) async fn copy(&self, dir: Dir) -> Result<(), Fault> {
        let (src, dst) = (self.sock(dir.src()), self.sock(dir.dst()));
        let copied = &self.dirs[dir as usize].copied;
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            src.readable().await.map_err(Fault::on(dir.src()))?;
            let n = match src.try_read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Fault::on(dir.src())(e)),
            };
            write_all(dst, &buf[..n]).await.map_err(Fault::on(dir.dst()))?;
            copied.fetch_add(n as u64, Ordering::Relaxed);
            self.eng.counters.copied_bytes.fetch_add(n as u64, Ordering::Relaxed);
            self.touch();
        }
    }
}

/// Writes all of `buf` to a non-blocking socket.
async fn write_all(dst: &TcpStream, buf: &[u8]) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        dst.writable().await?;
        match dst.try_write(&buf[off..]) {
            Ok(m) => off += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Bytes the verdict passed to userspace, read out of the source and not yet written to
/// the destination.
#[derive(Default)]
pub(super) struct Lane {
    buf: std::collections::VecDeque<u8>,
    /// Every byte redirected before the lane's bytes is in the destination's TCP.
    pub(super) flushed: bool,
    /// Current interval of the flush poll.
    pub(super) poll: Duration,
}

impl Lane {
    pub(super) fn len(&self) -> usize {
        self.buf.len()
    }
    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub(super) fn push(&mut self, b: &[u8]) {
        self.buf.extend(b);
    }
    pub(super) fn front(&self) -> &[u8] {
        self.buf.as_slices().0
    }
    pub(super) fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
    }
}

/// Most bytes a direction's lane holds (userspace memory, while the in-kernel backlog
/// drains): half the cap, at least 256 KiB.
pub(super) fn lane_max(cap: u64) -> usize {
    (cap / 2).max(256 << 10) as usize
}
