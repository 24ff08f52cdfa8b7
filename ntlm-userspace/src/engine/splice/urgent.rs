//! Filling a pipe from a socket with splice(2), and TCP urgent data, which splice(2) cannot
//! read past: a direction that meets it switches to copying (see the engine's `poll_lane`).

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use tokio::{io::Interest, net::TcpStream};

use super::pipe::Pipe;
use crate::sys::{pipe as sys_pipe, sock::at_urgent_mark};

/// A splice(2) that cannot move past TCP urgent data (see [`fill_pipe`]).
#[derive(Debug, thiserror::Error)]
#[error("splice(2) stopped at TCP urgent data")]
struct UrgentMark;

/// Whether `e` is [`UrgentMark`]: the source's next byte is urgent data, which only recv(2)
/// passes.
pub(super) fn is_urgent_mark(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<UrgentMark>())
}

/// One splice(2) from `src` into the empty `pipe`, asking for its whole capacity: the bytes
/// moved, `WouldBlock` (readiness cleared) when the socket had none, or [`UrgentMark`].
pub(super) fn fill_pipe(src: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
    // A splice that moved fewer bytes than the pipe has slots stopped because the
    // socket had nothing more, not because the (empty) pipe filled up: each slot
    // holds at least a byte, and the call asked for the pipe's whole capacity.
    // The socket's readiness is then cleared as a failed read would clear it
    // (try_io sees WouldBlock; tokio's tick keeps anything that arrived since),
    // which saves that failing read: one splice(2) per message and direction
    // on a request/response connection. A FIN read with the bytes stays known
    // (tokio keeps read-closed readiness), and is read as 0 next.
    //
    // Short, or failing with EAGAIN, a splice may instead have stopped at TCP
    // urgent data: splice(2) reads through tcp_read_sock, which stops at the
    // urgent mark and never passes it, so the bytes behind it would wait
    // forever. SIOCATMARK (an ioctl that takes no lock, cheaper than the
    // failing splice it replaces) tells that case apart: a short read at the
    // mark leaves the readiness set, and the failing splice that follows is
    // reported as UrgentMark, which leaves it set too.
    let mut short = 0;
    let r = src.try_io(Interest::READABLE, || {
        match sys_pipe::splice(src.as_raw_fd(), pipe.w.as_raw_fd(), pipe.cap as usize) {
            Ok(n) if n > 0 && n < pipe.slots() && !at_urgent_mark(src.as_fd()) => {
                short = n;
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && at_urgent_mark(src.as_fd()) => {
                Err(io::Error::other(UrgentMark))
            }
            r => r,
        }
    });
    if short > 0 { Ok(short) } else { r }
}
