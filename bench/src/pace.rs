//! Pacing a sender with `SO_MAX_PACING_RATE`: since Linux 4.13 TCP paces by itself (its
//! internal pacing, an hrtimer per socket) when a socket asks for a rate, without the `fq`
//! qdisc, so each connection of the edge workload can be held to its own WAN-like rate.

use std::{io, os::fd::RawFd};

/// Bytes per second of `mbit` Mbit/s.
pub fn bytes_per_sec(mbit: u16) -> u64 {
    u64::from(mbit) * 1_000_000 / 8
}

/// Sets `SO_MAX_PACING_RATE` on `fd` to `mbit` Mbit/s and reads it back.
pub fn set_max_pacing_rate(fd: RawFd, mbit: u16) -> io::Result<()> {
    // The kernel takes 32 or 64 bits; 64 holds any rate a u16 of Mbit/s gives.
    let want: u64 = bytes_per_sec(mbit);
    // SAFETY: a valid pointer and length to a u64 that lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&raw const want).cast(),
            size_of::<u64>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut got: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: as above, for the read-back.
    let rc =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_MAX_PACING_RATE, (&raw mut got).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if got != want {
        return Err(io::Error::other(format!("SO_MAX_PACING_RATE reads back {got} B/s, not the {want} B/s set")));
    }
    Ok(())
}
