//! An epoll instance of our own (the parker's), beside tokio's.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// An epoll instance.
pub struct Epoll(OwnedFd);

/// One event as epoll_wait(2) reports it.
pub type Event = libc::epoll_event;

/// Readable, peer half-closed, one-shot: what a parked socket is watched for.
pub const IN_RDHUP_ONESHOT: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32;

impl Epoll {
    /// A new close-on-exec instance.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: epoll_create1 returned a fresh descriptor that we now own.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` for `events`, reported with `key`.
    pub fn add(&self, fd: RawFd, events: u32, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: key };
        // SAFETY: both descriptors are open (the caller's fd is borrowed for the call); ev is
        // a valid event.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd`.
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: the event argument may be null for DEL; a closed fd only fails.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The events ready now, without waiting, into `events`; how many.
    pub fn ready(&self, events: &mut [Event]) -> io::Result<usize> {
        self.wait_ms(events, 0)
    }

    /// Blocks the calling thread until events are ready (a thread of its own: never on the
    /// runtime), into `events`; how many.
    pub fn wait(&self, events: &mut [Event]) -> io::Result<usize> {
        self.wait_ms(events, -1)
    }

    fn wait_ms(&self, events: &mut [Event], timeout_ms: i32) -> io::Result<usize> {
        let max = i32::try_from(events.len()).unwrap_or(i32::MAX);
        // SAFETY: events is a valid buffer of at least `max` entries.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), max, timeout_ms) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }

    /// An empty event buffer entry.
    pub const EMPTY: Event = libc::epoll_event { events: 0, u64: 0 };
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// An eventfd(2), non-blocking and close-on-exec: a counter one thread bumps to wake another
/// that waits on it in an epoll set.
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new eventfd at 0.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd has no memory preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we now own.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds 1, which makes it readable.
    pub fn notify(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        let rc = unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
        if rc == 8 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// Another descriptor of the same eventfd.
    pub fn try_clone(&self) -> io::Result<EventFd> {
        self.0.try_clone().map(EventFd)
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
