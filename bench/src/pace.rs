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

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd as _,
        thread,
        time::Instant,
    };

    use super::*;

    /// TCP's internal pacing holds a socket to its `SO_MAX_PACING_RATE` on a link with no
    /// `fq` qdisc (loopback here). Only a lower bound on the time is checked: a loaded host
    /// makes the transfer slower, never faster, so this cannot fail by noise.
    #[test]
    fn pacing_holds_a_sender_to_its_rate_without_fq() {
        const MBIT: u16 = 40;
        const BYTES: usize = 2_500_000; // 0.5 s at 40 Mbit/s; milliseconds unpaced
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let reader = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = 0;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match s.read(&mut buf).unwrap() {
                    0 => return got,
                    n => got += n,
                }
            }
        });
        let mut s = TcpStream::connect(addr).unwrap();
        set_max_pacing_rate(s.as_raw_fd(), MBIT).unwrap();
        let t = Instant::now();
        s.write_all(&vec![7u8; BYTES]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(reader.join().unwrap(), BYTES);
        let secs = t.elapsed().as_secs_f64();
        let paced_secs = BYTES as f64 / bytes_per_sec(MBIT) as f64;
        // The first window leaves before pacing has a rate to go by: allow 30% early.
        assert!(
            secs >= 0.7 * paced_secs,
            "{BYTES} bytes took {secs:.3} s; paced at {MBIT} Mbit/s they need {paced_secs:.2} s"
        );
    }

    #[test]
    fn rates_convert_to_bytes_per_second() {
        assert_eq!(bytes_per_sec(40), 5_000_000);
        assert_eq!(bytes_per_sec(u16::MAX), 8_191_875_000);
    }
}
