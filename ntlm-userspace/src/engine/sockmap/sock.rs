//! The few socket facts the sockmap engine reads from the kernel, each one syscall, built on
//! the generic wrappers of [`crate::sys::sock`].

use std::{io, os::fd::BorrowedFd};

use socket2::SockRef;

pub(super) use crate::sys::sock::{peek_one as peek, recv, take_error};
use crate::sys::sock::{getsockopt, ioctl_int, setsockopt_int};

/// `SIOCOUTQ` (= TIOCOUTQ): bytes in the send queue not yet acknowledged by the peer (sent or
/// not).
const SIOCOUTQ: libc::Ioctl = libc::TIOCOUTQ;
/// `SIOCINQ` (= FIONREAD): bytes in the receive queue not yet read. Meaningful only before
/// the socket enters a sockmap (afterwards it reports the psock queue).
const SIOCINQ: libc::Ioctl = libc::FIONREAD;
/// `TCP_CLOSE_WAIT` in `tcpi_state`.
pub(super) const TCP_CLOSE_WAIT: u8 = 8;
/// `TCP_CLOSE` in `tcpi_state`.
pub(super) const TCP_CLOSE: u8 = 7;
/// `TCP_TIME_WAIT`, `TCP_LAST_ACK`, `TCP_CLOSING` in `tcpi_state`.
const TCP_TIME_WAIT: u8 = 6;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

/// Whether a socket in `state` has received its peer's FIN.
pub(super) fn fin_received(state: u8) -> bool {
    matches!(state, TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_TIME_WAIT)
}
/// `TCP_ESTABLISHED` in `tcpi_state`.
pub(super) const TCP_ESTABLISHED: u8 = 1;

/// The prefix of the kernel's `struct tcp_info` (include/uapi/linux/tcp.h) up to
/// `tcpi_bytes_retrans`, with the uapi layout; libc's struct stops before the byte counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct TcpInfo {
    pub state: u8,
    pub ca_state: u8,
    pub retransmits: u8,
    pub probes: u8,
    pub backoff: u8,
    pub options: u8,
    pub wscale: u8,
    pub flags: u8,
    pub rto: u32,
    pub ato: u32,
    pub snd_mss: u32,
    pub rcv_mss: u32,
    pub unacked: u32,
    pub sacked: u32,
    pub lost: u32,
    pub retrans: u32,
    pub fackets: u32,
    pub last_data_sent: u32,
    pub last_ack_sent: u32,
    pub last_data_recv: u32,
    pub last_ack_recv: u32,
    pub pmtu: u32,
    pub rcv_ssthresh: u32,
    pub rtt: u32,
    pub rttvar: u32,
    pub snd_ssthresh: u32,
    pub snd_cwnd: u32,
    pub advmss: u32,
    pub reordering: u32,
    pub rcv_rtt: u32,
    pub rcv_space: u32,
    pub total_retrans: u32,
    pub pacing_rate: u64,
    pub max_pacing_rate: u64,
    /// Bytes the peer acknowledged (RFC 4898 tcpEStatsAppHCThruOctetsAcked).
    pub bytes_acked: u64,
    /// Bytes received in sequence, the FIN included (tcpEStatsAppHCThruOctetsReceived).
    pub bytes_received: u64,
    pub segs_out: u32,
    pub segs_in: u32,
    pub notsent_bytes: u32,
    pub min_rtt: u32,
    pub data_segs_in: u32,
    pub data_segs_out: u32,
    pub delivery_rate: u64,
    pub busy_time: u64,
    pub rwnd_limited: u64,
    pub sndbuf_limited: u64,
    pub delivered: u32,
    pub delivered_ce: u32,
    pub bytes_sent: u64,
    pub bytes_retrans: u64,
}

const _: () = assert!(std::mem::offset_of!(TcpInfo, bytes_acked) == 120);
const _: () = assert!(std::mem::offset_of!(TcpInfo, bytes_received) == 128);
const _: () = assert!(std::mem::size_of::<TcpInfo>() == 216);

/// The socket's cookie (`SO_COOKIE`): its 64-bit id, the key of every map.
pub(super) fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    SockRef::from(&fd).cookie()
}

/// `TCP_INFO`, checked to include the byte counters.
pub(super) fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    let (info, len) = getsockopt::<TcpInfo>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    if len < std::mem::offset_of!(TcpInfo, bytes_received) + 8 {
        return Err(io::Error::other(format!("TCP_INFO too short ({len} bytes): kernel older than 4.1")));
    }
    Ok(info)
}

/// Every byte written into this socket so far (its TCP took them): acknowledged plus still
/// queued. TCP_INFO is read before SIOCOUTQ so that bytes acknowledged in between make the
/// sum smaller, never larger: a drain check built on it can wait too long, never too little.
pub(super) fn bytes_written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    written_after(fd, &tcp_info(fd)?)
}

/// [`bytes_written`] from a `TCP_INFO` just read.
fn written_after(fd: BorrowedFd<'_>, info: &TcpInfo) -> io::Result<u64> {
    Ok(info.bytes_acked + ioctl_int(fd, SIOCOUTQ)?)
}

/// Set-up counters of a socket that is in no sockmap yet, given a `TCP_INFO` read just
/// before (`first`): (bytes written to it, `bytes_acked + SIOCOUTQ`; data bytes taken out of
/// its receive queue by a reader, `bytes_received - SIOCINQ - FIN`). Read until stable, so
/// that no byte arriving between the reads skews them.
pub(super) fn setup_counters(fd: BorrowedFd<'_>, first: TcpInfo) -> io::Result<(u64, u64)> {
    let mut before = first;
    for _ in 0..16 {
        let inq = ioctl_int(fd, SIOCINQ)?;
        let after = tcp_info(fd)?;
        if after.bytes_received == before.bytes_received {
            // bytes_received counts the FIN; SIOCINQ never does.
            let fin = u64::from(fin_received(after.state));
            let written = written_after(fd, &after)?;
            return Ok((written, before.bytes_received.saturating_sub(inq + fin)));
        }
        before = after;
    }
    Err(io::Error::other("receive counters kept moving while reading them"))
}

/// Sets `SO_RCVLOWAT` to 1. On TCP this calls `tcp_data_ready()`, which runs the socket's
/// `sk_data_ready` when it has unread bytes: inside a sockmap that is the verdict, so bytes
/// that arrived before the socket was inserted (or while it was paused) are forwarded now
/// instead of waiting for the next segment, which may never come.
pub(super) fn kick(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)
}

/// Gives the socket a send buffer of `bytes` as the kernel counts it (SO_SNDBUF reads back
/// twice what was set: the kernel doubles it for its own overhead) and returns what it got.
///
/// SO_SNDBUFFORCE first, which is not capped by net.core.wmem_max (it needs CAP_NET_ADMIN,
/// which the sockmap engine has), then SO_SNDBUF, which is.
pub(super) fn set_sndbuf(fd: BorrowedFd<'_>, bytes: u64) -> io::Result<u64> {
    let half = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX);
    if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, half).is_ok() {
        // Not capped: the kernel sets exactly twice the value.
        return Ok(u64::try_from(half).unwrap_or(0) * 2);
    }
    let sock = SockRef::from(&fd);
    sock.set_send_buffer_size(usize::try_from(half).unwrap_or(0))?;
    Ok(sock.send_buffer_size()? as u64)
}

