//! Pipes and splice(2), for the splice engine.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// The page size assumed if sysconf cannot tell.
const PAGE_FALLBACK: usize = 4096;

/// The kernel's page size: a pipe's capacity, its slots and the user's pipe budget
/// (`fs.pipe-user-pages-soft`) are all counted in pages.
pub fn page_size() -> usize {
    static PAGE_SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE_SIZE
        .get_or_init(|| usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(PAGE_FALLBACK).max(1))
}

/// A new pipe, both ends non-blocking and close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid two-int array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// F_SETPIPE_SZ: asks for `bytes` of capacity; what the kernel gave (it rounds up to a power
/// of two pages).
pub fn set_capacity(pipe: &OwnedFd, bytes: usize) -> io::Result<usize> {
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: plain fcntl on a pipe descriptor the caller owns.
    let got = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    usize::try_from(got).map_err(|_| io::Error::last_os_error())
}

/// F_GETPIPE_SZ: the pipe's capacity in bytes.
pub fn capacity(pipe: &OwnedFd) -> io::Result<usize> {
    // SAFETY: plain fcntl on a pipe descriptor the caller owns.
    let got = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_GETPIPE_SZ) };
    usize::try_from(got).map_err(|_| io::Error::last_os_error())
}

/// splice(2) of up to `len` bytes from `from` to `to` (one of them a pipe), non-blocking.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
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
