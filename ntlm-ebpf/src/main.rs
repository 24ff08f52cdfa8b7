//! Kernel side of ntlm-splice's sockmap engine.
//!
//! Both sockets of a spliced connection sit in two SockHashes keyed by their own cookie:
//! `FWD` (these programs attached: "forward what arrives here") and `PEER` (no programs:
//! `PEER[cookie of A] = B`). When bytes arrive on A, the stream verdict redirects the socket
//! buffer to the egress of `PEER[cookie of A]`, counts it in `STATS[cookie of A]`, and when the
//! count crosses the threshold userspace put in `CTL[cookie of A]` it emits one `WakeEvent`
//! so that userspace can check how much the kernel holds in flight (see
//! `ntlm-userspace/src/engine/sockmap`). When userspace pauses A (in-flight cap reached) the
//! verdict passes A's buffers to A's own receive queue instead, where they are charged to A
//! so that TCP flow control stops the sender; userspace copies them to B in order.

#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{map, stream_parser, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use ntlm_common::{
    ERR_COUNT, ERR_NO_CTL, ERR_NO_PEER_UNTRACKED, ERR_NO_STATS, EVENTS_BYTES, MAX_SOCKETS, SockCtl, SockStats,
    WakeEvent,
};

#[map]
static FWD: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static PEER: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static STATS: HashMap<u64, SockStats> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static CTL: HashMap<u64, SockCtl> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
static ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ERR_COUNT, 0);

/// Set to 1 by the loader when the stream parser is attached: the verdict then forwards
/// whole strparser messages and counts the length the parser gave each one.
#[unsafe(no_mangle)]
static PARSER_ATTACHED: u8 = 0;

/// Stream parser: every socket buffer is one whole message (no framing). With a parser the
/// kernel reads the socket with `tcp_read_sock()`, which starts at the reader's position in a
/// buffer, so a retransmitted segment that overlaps bytes already read is not delivered
/// twice (`tcp_read_skb()`, the verdict-only path, hands over whole buffers).
#[stream_parser]
pub fn ntlm_parser(ctx: SkBuffContext) -> u32 {
    let len = ctx.len();
    // SAFETY: sk_skb programs may call bpf_get_socket_cookie with their own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match STATS.get_ptr_mut(cookie) {
        // SAFETY: a map value pointer from a successful lookup; the parser and the verdict of
        // one socket run under that socket's lock, one message at a time.
        Some(s) => unsafe {
            (*s).msg_len = u64::from(len);
            (*s).parsed_msgs += 1;
        },
        None => count_error(ERR_NO_STATS),
    }
    len
}

/// Stream verdict: redirect to the peer's egress and count, or keep the bytes for userspace
/// while the socket is paused.
#[stream_verdict]
pub fn ntlm_verdict(ctx: SkBuffContext) -> u32 {
    match try_verdict(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_verdict(ctx: &SkBuffContext) -> Result<u32, u32> {
    let buf_len = u64::from(ctx.len());
    // SAFETY: a plain read of a constant the loader may have patched.
    let parser = unsafe { core::ptr::read_volatile(&raw const PARSER_ATTACHED) } != 0;
    // SAFETY: sk_skb programs may call bpf_get_socket_cookie with their own context; the
    // kernel sets skb->sk to the receiving socket before running the verdict.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let stats = STATS.get_ptr_mut(cookie);

    // The verdict also runs with an empty buffer when a FIN arrives: nothing to forward,
    // and the FIN itself is socket state (RCV_SHUTDOWN) that userspace sees without it. Drop
    // it: passed (SK_PASS), it is queued behind any bytes redirected *to* this socket, and
    // the psock backlog then takes its 0-byte delivery for a hard error, reports EPIPE on
    // the socket and stops sending (measured: the start-up self-test failed that way).
    if buf_len == 0 {
        match stats {
            // SAFETY: a map value pointer from a successful lookup, valid for this run.
            Some(s) => unsafe { (*s).empty_skbs += 1 },
            None => count_error(ERR_NO_STATS),
        }
        return Ok(SK_DROP);
    }

    let Some(s) = stats else {
        // Userspace always creates the stats entry before inserting the socket in FWD; if it
        // is missing the bytes still go through, uncounted.
        count_error(ERR_NO_STATS);
        if PEER.redirect_skb(ctx, &mut cookie, 0) != i64::from(SK_PASS) {
            count_error(ERR_NO_PEER_UNTRACKED);
            return Err(SK_DROP);
        }
        return Ok(SK_PASS);
    };
    // SAFETY: a map value pointer from a successful lookup; the verdict of one socket runs
    // under that socket's lock, so nothing else writes this entry meanwhile.
    let s = unsafe { &mut *s };
    // With a parser the kernel forwards the message the parser cut, which may start inside
    // this buffer: count that length.
    let len = if parser { s.msg_len } else { buf_len };
    if parser && len != buf_len {
        s.len_mismatch += 1;
    }
    let ctl = match CTL.get_ptr(cookie) {
        // SAFETY: a map value pointer from a successful lookup; copied out at once.
        Some(c) => unsafe { *c },
        None => {
            count_error(ERR_NO_CTL);
            SockCtl { wake_at: u64::MAX, paused: 0, user_copied: s.passed }
        }
    };

    // Paused, or userspace still has passed bytes to write first: keep this buffer on the
    // socket (its memory is charged there, so TCP closes the window) for userspace to copy.
    if ctl.paused != 0 || ctl.user_copied != s.passed {
        s.passed += len;
        s.passed_segs += 1;
        return Ok(SK_PASS);
    }

    if PEER.redirect_skb(ctx, &mut cookie, 0) != i64::from(SK_PASS) {
        // The peer left PEER (closed): there is nowhere to deliver these bytes.
        s.drop_no_peer += 1;
        s.drop_no_peer_bytes += len;
        return Err(SK_DROP);
    }
    s.bytes += len;
    s.segs += 1;
    // SAFETY: plain helper call, no arguments.
    s.last_ns = unsafe { bpf_ktime_get_ns() };

    if s.bytes >= ctl.wake_at && s.fired_at != ctl.wake_at {
        let ev = WakeEvent { cookie, bytes: s.bytes };
        match EVENTS.output::<WakeEvent>(&ev, 0) {
            Ok(()) => {
                s.events += 1;
                s.fired_at = ctl.wake_at;
            }
            // Left unfired: the next buffer tries again.
            Err(_) => s.events_lost += 1,
        }
    }
    Ok(SK_PASS)
}

fn count_error(index: u32) {
    if let Some(p) = ERRORS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot from a successful lookup; programs run with migration
        // disabled, so this CPU's slot is ours for the increment.
        unsafe { *p += 1 }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
