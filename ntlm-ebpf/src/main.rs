//! Kernel side of ntlm-splice's sockmap engine.
//!
//! Both sockets of a spliced connection sit in two SockHashes keyed by their own cookie:
//! `FWD` (these programs attached: "forward what arrives here") and `PEER` (no programs:
//! `PEER[cookie of A] = B`). When bytes arrive on A, the stream verdict redirects the socket
//! buffer to the egress of `PEER[cookie of A]`, counts it in `STATS[cookie of A]`, and when the
//! count crosses the threshold userspace put in `CTL[cookie of A]` it emits one `WakeEvent`
//! so that userspace can check how much the kernel holds in flight (see
//! `ntlm-userspace/src/engine/sockmap`). When userspace pauses A (in-flight cap reached), or
//! when a buffer would take A's redirected count past the limit userspace set (so that the
//! cap holds even before userspace reacts), the verdict passes A's buffers to A's own
//! receive queue instead, where they are charged to A so that TCP flow control stops the
//! sender; userspace copies them to B in order.
//!
//! Overlap guard (verdict-only mode): `tcp_read_skb()` hands the verdict whole buffers from the
//! receive queue, and TCP queues a retransmitted segment that partly overlaps bytes already
//! received without trimming it (`tcp_recvmsg()` skips the overlap by sequence number; the
//! sockmap path does not), so the overlap would be forwarded twice. The verdict therefore
//! tracks each socket's next expected sequence number and cuts the overlap off the head of
//! the buffer before forwarding it. The struct offsets it needs come from the kernel's BTF
//! via the loader ([`SEQ_GUARD`]).

#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, stream_parser, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use ntlm_common::{
    ERR_COUNT, ERR_LINEARIZE, ERR_NO_CTL, ERR_NO_PEER_UNTRACKED, ERR_NO_STATS, ERR_SEQ_GAP, EVENTS_BYTES,
    MAX_SOCKETS, SEQ_KNOWN, SeqGuard, SockCtl, SockStats, WakeEvent,
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

/// Buffers up to this many bytes are made linear before they are redirected (0: never);
/// patched by the loader with `ntlm_common::LINEARIZE_MAX`.
#[unsafe(no_mangle)]
static LINEARIZE_MAX: u32 = 0;

/// Kernel struct offsets for the overlap guard, patched by the loader from the running
/// kernel's BTF (`enabled` stays 0 when it has none: the guard is off).
#[unsafe(no_mangle)]
static SEQ_GUARD: SeqGuard = SeqGuard {
    enabled: 0,
    skb_seq: 0,
    skb_sk: 0,
    tcp_copied_seq: 0,
    test_cut_fail_step: 0,
};

/// Most bytes one `bpf_skb_adjust_room` call may cut from an sk_skb buffer (kernel limit).
const CUT_STEP: u32 = 0xfff;
/// Most cut steps per buffer: 512 x 4095 bytes covers a 2 MiB overlap. One segment overlaps
/// by less than its own length (64 KiB on loopback), but TCP merges segments in its queues
/// (coalescing, the out-of-order queue), and overlaps over 128 KiB were seen under load: with
/// 32 steps they reset connections (-E2BIG). The steps allocate nothing (the overlap is pulled
/// first) and only the steps a cut needs run. A larger overlap counts as `guard_failed`.
const CUT_STEPS: u32 = 512;

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
    let mut buf_len = buf_len;
    if !parser {
        // SAFETY: a plain read of a constant the loader may have patched.
        let guard = unsafe { core::ptr::read_volatile(&raw const SEQ_GUARD) };
        if guard.enabled != 0 {
            match cut_overlap(ctx, s, &guard, buf_len as u32) {
                Ok(left) => buf_len = u64::from(left),
                Err(()) => {
                    s.guard_failed += 1;
                    return Err(SK_DROP);
                }
            }
            if buf_len == 0 {
                // Entirely bytes this socket had already handed over.
                return Ok(SK_DROP);
            }
        }
    }
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
            SockCtl { wake_at: u64::MAX, paused: 0, user_copied: s.passed, stop_at: u64::MAX }
        }
    };

    // Paused, userspace still has passed bytes to write first, or this buffer would take the
    // in-flight count past the cap: keep it on the socket (its memory is charged there, so
    // TCP closes the window) for userspace to copy.
    let over_cap = s.bytes.saturating_add(len) > ctl.stop_at;
    if ctl.paused != 0 || ctl.user_copied != s.passed || over_cap {
        if ctl.paused == 0 && ctl.user_copied == s.passed {
            s.cap_stops += 1;
        }
        s.passed += len;
        s.passed_segs += 1;
        return Ok(SK_PASS);
    }

    // The psock's egress sends a buffer with one sendmsg per page fragment (no MSG_MORE), so
    // the destination sends one packet per fragment; made linear, the buffer leaves whole
    // (three times fewer packets on paced streams over veth, see docs/sockmap.md). A failure
    // costs only packets: the buffer is redirected as it is, and counted.
    // SAFETY: a plain read of a constant the loader may have patched.
    let linearize_max = unsafe { core::ptr::read_volatile(&raw const LINEARIZE_MAX) };
    if !parser && ctx.len() <= linearize_max {
        match ctx.pull_data(ctx.len()) {
            Ok(()) => s.linearized += 1,
            Err(_) => count_error(ERR_LINEARIZE),
        }
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

/// The overlap guard: cuts off the head of this buffer the bytes before `s.seq_next` (already
/// taken from the socket) and advances `s.seq_next`. Returns the buffer's length after the
/// cut; `Err` if a kernel read or a cut failed (the buffer is then no longer usable).
fn cut_overlap(ctx: &SkBuffContext, s: &mut SockStats, g: &SeqGuard, len: u32) -> Result<u32, ()> {
    let skb = ctx.as_ptr().cast::<u8>();
    // SAFETY: reads through bpf_probe_read_kernel (faults return an error); the offsets come
    // from the running kernel's BTF: the buffer's TCP_SKB_CB(skb)->seq.
    let seq: u32 =
        unsafe { bpf_probe_read_kernel(skb.wrapping_add(g.skb_seq as usize).cast::<u32>()) }
            .map_err(|_| ())?;
    if s.seq_next & SEQ_KNOWN == 0 {
        // First buffer since insertion: it continues from where the socket's reader stood.
        // SAFETY: as above: skb->sk, then tcp_sk(sk)->copied_seq.
        let sk: *const u8 = unsafe {
            bpf_probe_read_kernel(skb.wrapping_add(g.skb_sk as usize).cast::<*const u8>())
        }
        .map_err(|_| ())?;
        // SAFETY: as above.
        let copied: u32 = unsafe {
            bpf_probe_read_kernel(sk.wrapping_add(g.tcp_copied_seq as usize).cast::<u32>())
        }
        .map_err(|_| ())?;
        s.seq_next = SEQ_KNOWN | u64::from(copied);
    }
    let next = s.seq_next as u32;
    let end = seq.wrapping_add(len);
    let ahead = next.wrapping_sub(seq) as i32;
    let mut left = len;
    if ahead < 0 {
        count_error(ERR_SEQ_GAP);
    } else if ahead > 0 {
        let overlap = (ahead as u32).min(len);
        s.overlap_max = s.overlap_max.max(u64::from(overlap));
        // Pull the whole overlap into the linear head in one allocation first: each cut step
        // then finds its bytes there and allocates nothing. Cutting straight away pulls
        // 4,095 bytes per step into a head that keeps the bytes cut before, so a 64 KiB
        // overlap took 16 ever larger GFP_ATOMIC allocations (and copied the head each time).
        let err = match ctx.pull_data(overlap) {
            Ok(()) => cut_head(ctx.as_ptr(), overlap, g.test_cut_fail_step),
            Err(e) => e,
        };
        if err != 0 {
            s.cut_err = err as u64;
            return Err(());
        }
        s.overlap_skbs += 1;
        s.overlap_bytes += u64::from(overlap);
        left = len - overlap;
    }
    if end.wrapping_sub(next) as i32 > 0 {
        s.seq_next = SEQ_KNOWN | u64::from(end);
    }
    Ok(left)
}

/// State of one [`cut_head`] for its [`cut_step`] callback.
#[repr(C)]
struct Cut {
    /// This program's context (`struct sk_buff`).
    skb: *mut core::ffi::c_void,
    /// Bytes still to cut.
    todo: u32,
    /// [`SeqGuard::test_cut_fail_step`].
    fail_step: u32,
    /// The error a failed step's helper call returned (0: none).
    err: i64,
}

/// Cuts `n` bytes off the head of the buffer, in the steps `bpf_skb_adjust_room` accepts.
/// The steps run under `bpf_loop`, so the verifier checks one step, not each of up to
/// [`CUT_STEPS`] unrolled with every path through the rest of the verdict. Returns 0 if all
/// `n` bytes were cut, else a negative errno (-E2BIG: more than [`CUT_STEPS`] steps).
///
/// Each step needs the bytes it cuts in the buffer's linear head (`pskb_may_pull`, which
/// allocates with GFP_ATOMIC when they are not), so the caller pulls the whole overlap there
/// first; that one allocation, as large as the overlap (order 5 for a 64 KiB overlap with
/// the head), is what can fail under memory pressure or fragmentation (-ENOMEM).
fn cut_head(skb: *mut core::ffi::c_void, n: u32, fail_step: u32) -> i64 {
    let mut cut = Cut {
        skb,
        todo: n,
        fail_step,
        err: 0,
    };
    // SAFETY: `cut_step` matches bpf_loop's callback signature and only reads `cut`, which
    // lives on this stack for the whole call.
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            CUT_STEPS,
            cut_step as *mut core::ffi::c_void,
            (&raw mut cut).cast(),
            0,
        )
    };
    if cut.err != 0 {
        cut.err
    } else if rc < 0 {
        rc
    } else if cut.todo != 0 {
        -7 // -E2BIG
    } else {
        0
    }
}

/// One step of [`cut_head`]: cuts up to [`CUT_STEP`] bytes. Returns 1 to stop the loop.
#[inline(never)]
extern "C" fn cut_step(index: u64, cut: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `Cut` that `cut_head` gave it.
    let cut = unsafe { &mut *cut.cast::<Cut>() };
    let step = cut.todo.min(CUT_STEP);
    if step == 0 {
        return 1;
    }
    let rc = if cut.fail_step != 0 && index + 1 == u64::from(cut.fail_step) {
        -12 // -ENOMEM, injected by a test
    } else {
        // SAFETY: `cut.skb` is the program's context, as the helper requires.
        unsafe { aya_ebpf::helpers::generated::bpf_skb_adjust_room(cut.skb.cast(), -(step as i32), 0, 0) }
    };
    if rc != 0 {
        cut.err = rc;
        return 1;
    }
    cut.todo -= step;
    0
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
