//! Socket options, ioctls and flagged receives that tokio does not offer. `socket2` is used
//! where it has the option (linger, shutdown, pending error).

use std::{
    io,
    net::Shutdown,
    os::fd::{AsRawFd, BorrowedFd},
    time::Duration,
};

use socket2::SockRef;

/// `SIOCATMARK` from asm-generic/sockios.h (x86-64, arm64; the libc crate defines it only for
/// the BSDs).
const SIOCATMARK: libc::Ioctl = 0x8905;

/// getsockopt(2) of a `T`: the value and the length the kernel wrote.
pub fn getsockopt<T: Copy + Default>(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<(T, usize)> {
    let mut v = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: v is a valid, writable buffer of `len` bytes.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut v).cast(), &mut len) };
    if rc == 0 { Ok((v, len as usize)) } else { Err(io::Error::last_os_error()) }
}

/// setsockopt(2) of an int.
pub fn setsockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: valid fd and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, (&raw const v).cast(), size_of::<libc::c_int>() as libc::socklen_t)
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// An ioctl(2) that writes one int (SIOCINQ, SIOCOUTQ, SIOCATMARK), read as a count.
pub fn ioctl_int(fd: BorrowedFd<'_>, req: libc::Ioctl) -> io::Result<u64> {
    let mut v: libc::c_int = 0;
    // SAFETY: the requests this is used with write one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v) };
    if rc == 0 { Ok(v.max(0) as u64) } else { Err(io::Error::last_os_error()) }
}

/// Whether the next byte to read from the TCP socket `fd` is urgent data (the mark).
pub fn at_urgent_mark(fd: BorrowedFd<'_>) -> bool {
    ioctl_int(fd, SIOCATMARK).is_ok_and(|at| at != 0)
}

/// Sets SO_LINGER {on, 0} so that closing `fd` sends a reset instead of a FIN.
pub fn set_linger_zero(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).set_linger(Some(Duration::ZERO))
}

/// `shutdown(SHUT_WR)`: passes a FIN on. A peer that is already gone is not an error here
/// (ENOTCONN): the direction is over either way, and the other direction reports the reset.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    match SockRef::from(&fd).shutdown(Shutdown::Write) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        r => r,
    }
}

/// The pending socket error (`SO_ERROR`, which also clears it).
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    SockRef::from(&fd).take_error()
}

/// `recv(MSG_DONTWAIT)` into `buf`.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(fd, buf, libc::MSG_DONTWAIT)
}

/// Whether a read would return something, without taking it: `recv(MSG_PEEK |
/// MSG_DONTWAIT)` of one byte. `Ok(1)`: bytes; `Ok(0)`: the EOF; `WouldBlock`: neither.
pub fn peek_one(fd: BorrowedFd<'_>) -> io::Result<usize> {
    recv_flags(fd, &mut [0u8; 1], libc::MSG_PEEK | libc::MSG_DONTWAIT)
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)` into `buf`: the queued bytes, none taken.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(fd, buf, libc::MSG_PEEK | libc::MSG_DONTWAIT)
}

/// One step of reading a header by peeking (the SNI peek, the PROXY header): waits until
/// `stream` has more than the `seen` bytes already peeked, an EOF, or `buf` is full, and peeks
/// into `buf`. Returns the bytes now queued (0: EOF with nothing queued) and whether the peer
/// has half-closed (then no more bytes will come).
///
/// Waiting: the peek runs inside `try_io` and reports `WouldBlock` when it saw nothing new, so
/// tokio clears the read readiness (only if no newer event came meanwhile) and `ready` sleeps
/// until new data arrives; nothing is left set on the socket (unlike SO_RCVLOWAT). The end of
/// stream is seen by the read-closed readiness, taken before the peek so that the peek saw
/// every byte sent. Each turn takes one unit of tokio's cooperative budget, so that a socket
/// reported ready forever without new bytes cannot keep the task from yielding (and its
/// caller's timeout from firing). After a timeout cancels this, the readiness may stay cleared
/// with bytes queued: close the socket, or re-register it, before reading it again.
pub async fn peek_more(stream: &tokio::net::TcpStream, buf: &mut [u8], seen: usize) -> io::Result<(usize, bool)> {
    use std::os::fd::AsFd as _;
    loop {
        tokio::task::consume_budget().await;
        let closed = stream.ready(tokio::io::Interest::READABLE).await?.is_read_closed();
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || match peek(stream.as_fd(), buf)? {
            n if n == seen && n > 0 && n < buf.len() && !closed => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        });
        match peeked {
            Ok(n) => return Ok((n, closed)),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
}

fn recv_flags(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// send(2) of `buf` with `flags` (tests send urgent data with MSG_OOB).
pub fn send_flags(fd: BorrowedFd<'_>, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}
