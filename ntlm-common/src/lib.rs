#![no_std]
//! Types shared by the kernel programs (`ntlm-ebpf`) and userspace (`ntlm-userspace`).
//!
//! Every struct here crosses the user/kernel boundary as raw bytes through a BPF map, so
//! each one is `#[repr(C)]`, `Copy`, made of fixed-width integers only and laid out without
//! implicit padding; the `const` asserts at the bottom keep both sides honest.
//!
//! The maps, all keyed by a socket cookie (`SO_COOKIE`, `bpf_get_socket_cookie`):
//!
//! | name | kind | value | written by |
//! |---|---|---|---|
//! | [`FWD_MAP`] | SockHash, programs attached | the socket itself | userspace |
//! | [`PEER_MAP`] | SockHash, no programs | the paired socket | userspace |
//! | [`STATS_MAP`] | Hash | [`SockStats`] | kernel (userspace creates/deletes) |
//! | [`CTL_MAP`] | Hash | [`SockCtl`] | userspace |
//! | [`EVENTS_MAP`] | RingBuf | [`WakeEvent`] | kernel |
//! | [`ERRORS_MAP`] | PerCpuArray, index `ERR_*` | `u64` | kernel |

/// SockHash of sockets whose incoming bytes the kernel forwards. The stream verdict program
/// (and optionally the stream parser) is attached to this map. A socket stays in it for the
/// whole connection: deleting an entry while bytes arrive makes the kernel drop buffers
/// (the verdict program pointer turns NULL under a running `tcp_read_skb`), so pausing is
/// done by the verdict itself (see [`SockCtl`]).
pub const FWD_MAP: &str = "FWD";
/// SockHash of redirect targets: the entry under socket A's cookie is socket B. No program is
/// attached, so inserting here changes nothing for the socket: both PEER entries go in
/// before either FWD entry, so the verdict always finds its peer.
pub const PEER_MAP: &str = "PEER";
/// Hash map cookie -> [`SockStats`], one entry per socket of a live sockmap connection.
pub const STATS_MAP: &str = "STATS";
/// Hash map cookie -> [`SockCtl`], the userspace-owned half of a socket's state.
pub const CTL_MAP: &str = "CTL";
/// Ring buffer of [`WakeEvent`]s.
pub const EVENTS_MAP: &str = "EVENTS";
/// Per-CPU array of `u64` counters for failures that have no per-socket entry to land in,
/// indexed by the `ERR_*` constants.
pub const ERRORS_MAP: &str = "ERRORS";

/// Name of the `sk_skb/stream_verdict` program in the object.
pub const VERDICT_PROG: &str = "ntlm_verdict";
/// Name of the `sk_skb/stream_parser` program in the object.
pub const PARSER_PROG: &str = "ntlm_parser";

/// Most sockets the maps hold: two per connection. Userspace caps connections below this.
pub const MAX_SOCKETS: u32 = 65_536;
/// Size of the [`EVENTS_MAP`] ring buffer in bytes (a power of two, a multiple of the page
/// size): 16,384 [`WakeEvent`]s with their 8-byte headers.
pub const EVENTS_BYTES: u32 = 512 * 1024;

/// [`ERRORS_MAP`] index: the verdict ran for a socket without a [`STATS_MAP`] entry (its
/// bytes were still forwarded, but not counted).
pub const ERR_NO_STATS: u32 = 0;
/// [`ERRORS_MAP`] index: the verdict ran for a socket without a [`CTL_MAP`] entry.
pub const ERR_NO_CTL: u32 = 1;
/// [`ERRORS_MAP`] index: a redirect found no peer for a socket that had no stats entry.
pub const ERR_NO_PEER_UNTRACKED: u32 = 2;
/// [`ERRORS_MAP`] index: a buffer started after [`SockStats::seq_next`] (a gap: bytes the
/// verdict never saw). Not expected; counted so that a kernel change would show up.
pub const ERR_SEQ_GAP: u32 = 3;
/// [`ERRORS_MAP`] index: the verdict could not make a buffer linear before redirecting it
/// (`bpf_skb_pull_data` failed, e.g. no memory for the head); it was redirected as it was.
pub const ERR_LINEARIZE: u32 = 4;
/// Number of [`ERRORS_MAP`] slots.
pub const ERR_COUNT: u32 = 5;

/// Largest buffer the verdict makes linear before redirecting it (the loader patches the
/// verdict's `LINEARIZE_MAX` with this, or with 0 to switch it off). The kernel's egress of
/// a redirected buffer (`__skb_send_sock`) calls sendmsg once per page fragment, without
/// MSG_MORE, so the destination's TCP sends one packet per fragment; a linear buffer goes
/// out whole (docs/sockmap.md, "Where the CPU goes on paced streams"). 64 KiB covers a
/// TSO/GRO buffer without BIG TCP; larger ones go as they are, which bounds the head the
/// kernel allocates for the copy.
pub const LINEARIZE_MAX: u32 = 64 << 10;

/// Per-socket counters kept by the stream verdict program, keyed by the socket's cookie.
///
/// Only the program writes an entry once userspace has created it (zeroed) and the verdict
/// for one socket runs under that socket's lock, so plain increments are exact.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockStats {
    /// Payload bytes that arrived on this socket and were redirected to its peer's egress.
    pub bytes: u64,
    /// Number of socket buffers redirected (segments or coalesced GRO/GSO units).
    pub segs: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last redirect; 0 if none yet.
    pub last_ns: u64,
    /// Socket buffers dropped because the peer had no [`PEER_MAP`] entry (peer closed).
    pub drop_no_peer: u64,
    /// Payload bytes in the socket buffers counted by `drop_no_peer`.
    pub drop_no_peer_bytes: u64,
    /// Zero-length socket buffers seen (the kernel runs the verdict with one on FIN); dropped,
    /// never redirected or counted as data.
    pub empty_skbs: u64,
    /// [`WakeEvent`]s emitted for this socket.
    pub events: u64,
    /// [`WakeEvent`]s that could not be emitted because the ring buffer was full.
    pub events_lost: u64,
    /// The [`SockCtl::wake_at`] value the last event was emitted for, so that one threshold
    /// wakes userspace once.
    pub fired_at: u64,
    /// Payload bytes passed to this socket's own receive queue instead of redirected (while
    /// paused, and until userspace has copied every byte passed before): userspace reads
    /// them and writes them to the peer itself, in order.
    pub passed: u64,
    /// Number of socket buffers counted in `passed`.
    pub passed_segs: u64,
    /// Messages the stream parser cut (0 without a parser).
    pub parsed_msgs: u64,
    /// Length the stream parser gave the message the verdict runs for next: with a parser
    /// this, not the buffer's length, is what a verdict forwards (a strparser message may
    /// start inside its first buffer).
    pub msg_len: u64,
    /// Verdict runs whose buffer length differed from the parsed message length (the
    /// verdict counted the parsed length).
    pub len_mismatch: u64,
    /// TCP sequence number just past the last payload byte the verdict has seen on this
    /// socket, plus [`SEQ_KNOWN`] once set (0: not yet; the first verdict starts it at the
    /// socket's `copied_seq`). Verdict-only mode with the overlap guard on (see
    /// [`SEQ_GUARD_GLOBAL`]).
    pub seq_next: u64,
    /// Socket buffers that started before `seq_next`: retransmitted segments overlapping
    /// bytes already taken from this socket. The verdict cut the overlap off before
    /// forwarding (`tcp_read_skb()` hands over whole buffers and would deliver it twice).
    pub overlap_skbs: u64,
    /// Payload bytes cut off by the overlap guard (counted in neither `bytes` nor `passed`).
    pub overlap_bytes: u64,
    /// Overlapping buffers the guard could not cut (`bpf_skb_adjust_room` failed, or a
    /// kernel read failed): the buffer was dropped and userspace resets the connection,
    /// because the stream is no longer intact. There is no way round that from a verdict:
    /// redirecting, passing or dropping a buffer all advance the socket's `copied_seq` by its
    /// whole length, so forwarding it uncut (and discarding the overlap elsewhere) would leave
    /// `copied_seq` ahead of `rcv_nxt`, and TCP would then stop waking the verdict
    /// (`tcp_epollin_ready`) until that many new bytes had arrived: a stalled connection.
    pub guard_failed: u64,
    /// Buffers passed because redirecting them would have taken [`SockStats::bytes`] past
    /// [`SockCtl::stop_at`]: the in-flight cap enforced by the kernel while userspace had
    /// not yet reacted.
    pub cap_stops: u64,
    /// The last error a cut of the overlap guard returned, as a negative errno in two's
    /// complement (0: none; -12 is ENOMEM, see `guard_failed`).
    pub cut_err: u64,
    /// Largest overlap the guard found in one buffer (bytes).
    pub overlap_max: u64,
    /// Buffers made linear (`bpf_skb_pull_data`) before they were redirected: see
    /// [`LINEARIZE_MAX`].
    pub linearized: u64,
}

/// Flag added to [`SockStats::seq_next`] once it holds a sequence number.
pub const SEQ_KNOWN: u64 = 1 << 32;

/// Name of the loader-patched global (a [`SeqGuard`]) that turns the overlap guard on.
pub const SEQ_GUARD_GLOBAL: &str = "SEQ_GUARD";

/// Byte offsets in the running kernel's structs, read by userspace from its BTF
/// (`/sys/kernel/btf/vmlinux`) and patched into the verdict before loading, for the overlap
/// guard. `enabled` 0 (no BTF): the guard is off and the verdict forwards whole buffers as
/// the kernel hands them over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqGuard {
    /// Non-zero: the offsets below are valid and the guard is on.
    pub enabled: u32,
    /// `offsetof(struct sk_buff, cb) + offsetof(struct tcp_skb_cb, seq)`: the buffer's first
    /// sequence number.
    pub skb_seq: u32,
    /// `offsetof(struct sk_buff, sk)`.
    pub skb_sk: u32,
    /// `offsetof(struct tcp_sock, copied_seq)`: where the reader of the socket stands.
    pub tcp_copied_seq: u32,
    /// Fault injection for tests, 0 in production: when `n` > 0, step `n` of every cut
    /// fails as if `bpf_skb_adjust_room` returned -ENOMEM (1: nothing is cut; 2: the first
    /// 4,095 bytes are cut, then it fails).
    pub test_cut_fail_step: u32,
}

/// Per-socket settings written by userspace, keyed by the socket's cookie.
///
/// The verdict redirects a buffer only when `paused` is 0, `user_copied` equals
/// [`SockStats::passed`] and the buffer keeps [`SockStats::bytes`] within `stop_at`: once one
/// buffer was passed to userspace, every later one is too until userspace has written all of
/// them to the peer, so the peer gets the bytes in order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockCtl {
    /// Emit a [`WakeEvent`] once [`SockStats::bytes`] reaches this value (`u64::MAX`: never).
    pub wake_at: u64,
    /// Non-zero: pass every buffer to the socket's own receive queue (in-flight cap reached;
    /// its memory is then charged to the socket and TCP flow control stops the sender).
    pub paused: u64,
    /// Passed bytes userspace has read and written to the peer so far.
    pub user_copied: u64,
    /// Redirect only while [`SockStats::bytes`] stays at or below this (`u64::MAX`: no
    /// limit); a buffer that would go past it is passed as if paused. Userspace sets it to
    /// the redirected count plus the cap minus what was in flight when it last looked, so
    /// the in-flight cap holds however late userspace reacts.
    pub stop_at: u64,
}

/// Ring buffer record: a socket's redirected byte count crossed its `wake_at` threshold.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WakeEvent {
    /// Cookie of the socket the bytes arrived on.
    pub cookie: u64,
    /// [`SockStats::bytes`] of that socket right after the redirect that crossed.
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<SockStats>() == 22 * 8);
const _: () = assert!(core::mem::size_of::<SeqGuard>() == 5 * 4);
const _: () = assert!(core::mem::align_of::<SockStats>() == 8);
const _: () = assert!(core::mem::size_of::<SockCtl>() == 4 * 8);
const _: () = assert!(core::mem::size_of::<WakeEvent>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made of `u64`s only (no padding, every bit
    // pattern valid), as the size asserts above check.
    unsafe impl aya::Pod for super::SockStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockCtl {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WakeEvent {}
    // SAFETY: `#[repr(C)]`, `Copy`, five `u32`s (no padding, every bit pattern valid).
    unsafe impl aya::Pod for super::SeqGuard {}
}
