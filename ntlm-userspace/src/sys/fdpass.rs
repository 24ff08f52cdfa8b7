//! Passing open descriptors to another process: a `SOCK_SEQPACKET` Unix socket pair, and
//! sendmsg(2)/recvmsg(2) of one message with descriptors in an `SCM_RIGHTS` control message
//! (unix(7)). Used by the live upgrade ([`crate::upgrade`]).
//!
//! The field types of `msghdr` and `cmsghdr` differ between glibc and musl (`msg_controllen`
//! and `cmsg_len` are `size_t` on glibc, `socklen_t` on musl, with padding beside them), so
//! every length is assigned with `as _` and the headers are zeroed first.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

/// Most descriptors one message carries (a connection's two sockets; a listener).
pub const MAX_FDS: usize = 4;

/// A connected pair of `SOCK_SEQPACKET` Unix sockets (message boundaries kept, in order),
/// both close-on-exec.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: `fds` is a writable array of two ints, as socketpair(2) wants.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair(2) succeeded: both are new descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Clears close-on-exec on `fd`, so that a program executed next inherits it.
pub fn inheritable(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl(2) on an int; async-signal-safe, so it may run between fork and exec.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Space for the control message of [`MAX_FDS`] descriptors, aligned for `cmsghdr`.
#[repr(C)]
union Control {
    _align: libc::cmsghdr,
    buf: [u8; 64],
}

const _: () = assert!(
    // SAFETY: CMSG_SPACE is a pure computation on its argument.
    unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize <= 64
);

/// Sends `data` as one message with `fds` attached (at most [`MAX_FDS`]); blocking or not as
/// `sock` is. The descriptors stay open here: the receiver gets its own copies.
pub fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} descriptors per message");
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    let mut control = Control { buf: [0; 64] };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = fds.len() * size_of::<RawFd>();
        // SAFETY: CMSG_SPACE/CMSG_LEN compute sizes; the buffer holds CMSG_SPACE(MAX_FDS) (the
        // assert above), and CMSG_FIRSTHDR/CMSG_DATA point inside it once msg_control and
        // msg_controllen are set.
        unsafe {
            msg.msg_control = (&raw mut control.buf).cast();
            msg.msg_controllen = libc::CMSG_SPACE(payload as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            let data = libc::CMSG_DATA(c).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: msg points at live buffers of the lengths it states.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != data.len() {
        return Err(io::Error::other(format!("sendmsg sent {n} of {} bytes of one message", data.len())));
    }
    Ok(())
}

/// One message received: its bytes and the descriptors that came with it (owned here now).
#[derive(Debug)]
pub struct Received {
    /// The message (empty with no descriptors: the peer closed).
    pub data: Vec<u8>,
    /// Its descriptors, close-on-exec.
    pub fds: Vec<OwnedFd>,
}

/// Receives one message of at most `max` bytes; blocking or not as `sock` is. A message that
/// was cut (longer than `max`, or more descriptors than [`MAX_FDS`]) is an error, its
/// descriptors closed.
pub fn recv(sock: BorrowedFd<'_>, max: usize) -> io::Result<Received> {
    let mut data = vec![0u8; max];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    let mut control = Control { buf: [0; 64] };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = (&raw mut control.buf).cast();
    msg.msg_controllen = 64 as _;
    // SAFETY: msg points at live, writable buffers of the lengths it states.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control up to msg_controllen; CMSG_FIRSTHDR/NXTHDR walk
    // within it, and each SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 new
    // descriptors, which are ours to own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..len / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::other("a message from the other process was cut short (too long)"));
    }
    data.truncate(n as usize);
    Ok(Received { data, fds })
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        os::{fd::AsFd as _, unix::net::UnixStream},
    };

    use super::*;

    /// A descriptor sent over the pair is the same open file on the other side: bytes
    /// written to the received copy come out of the original's peer; message boundaries hold.
    #[test]
    fn descriptors_and_messages_cross_the_pair() {
        let (a, b) = seqpacket_pair().unwrap();
        let (mut left, right) = UnixStream::pair().unwrap();
        send(a.as_fd(), b"first", &[right.as_fd()]).unwrap();
        send(a.as_fd(), b"second", &[]).unwrap();
        drop(right);
        let got = recv(b.as_fd(), 64).unwrap();
        assert_eq!(got.data, b"first");
        assert_eq!(got.fds.len(), 1);
        let mut moved = UnixStream::from(got.fds.into_iter().next().unwrap());
        moved.write_all(b"via the passed descriptor").unwrap();
        drop(moved);
        let mut s = String::new();
        left.read_to_string(&mut s).unwrap();
        assert_eq!(s, "via the passed descriptor");
        let got = recv(b.as_fd(), 64).unwrap();
        assert_eq!((got.data.as_slice(), got.fds.len()), (&b"second"[..], 0));
        drop(a);
        let got = recv(b.as_fd(), 64).unwrap();
        assert!(got.data.is_empty() && got.fds.is_empty(), "EOF once the peer closed");
    }

    /// A message longer than the receiver's buffer is an error, not a silently cut message.
    #[test]
    fn a_cut_message_is_an_error() {
        let (a, b) = seqpacket_pair().unwrap();
        send(a.as_fd(), &[1; 100], &[]).unwrap();
        assert!(recv(b.as_fd(), 10).is_err());
    }
}
