//! One connection through the sockmap engine: set-up, the two directions, clean-up.
//!
//! # Set-up order
//!
//! 1. Both sockets must be ESTABLISHED; otherwise (e.g. a client that sent its request and
//!    half-closed before we got here) the sockets never touch a map and the whole connection
//!    goes to the splice engine (trap 8).
//! 2. Baselines: bytes already written to each socket and already consumed from it, so that
//!    the drain check compares only what this relay moved.
//! 3. STATS and CTL entries and the event registration, so the verdict can count from the
//!    first byte.
//! 4. Both PEER entries (no programs attached: nothing changes for the sockets yet).
//! 5. Both FWD entries, each followed by an `SO_RCVLOWAT` kick for bytes that arrived
//!    earlier (trap 4). Inserting after the PEER entries means the verdict always finds the
//!    peer (trap 5). A socket whose FWD insertion fails because its FIN just arrived is
//!    copied in userspace instead (trap 8).
//!
//! # Backpressure (trap 3), and what this kernel (6.18) allows
//!
//! The kernel redirect path has no flow control: the verdict takes bytes out of the source's
//! TCP queue at once (so its window stays open) and queues them, unaccounted, on the
//! destination's psock. Each direction therefore counts what it has in flight (redirected
//! minus taken by the destination's TCP) on ring-buffer events, and past half of
//! `--max-inflight` (or when `--max-inflight-total` is used up) pauses its source.
//!
//! A pause is done by the verdict itself: `CTL.paused` makes it pass buffers to the source's
//! own queue instead of redirecting them, and this task reads them out at once into a
//! bounded buffer (the lane, at most half the cap) and writes them to the destination once
//! every byte redirected before them is in the destination's TCP. The verdict keeps passing
//! until `CTL.user_copied` (published after each write) equals what it passed, so order
//! holds when it redirects again. While the lane is full the task stops reading, the
//! passed buffers (charged to the source socket) close the TCP window, and the sender stops.
//!
//! Measured alternatives that do not work here:
//! - Deleting the source from FWD (and re-inserting it later) drops data: a `tcp_read_skb`
//!   already running hands its remaining buffers to a verdict pointer that is now NULL, and
//!   they are freed. 1 GiB uploads came out corrupted in about half the runs. Raising
//!   `SO_RCVLOWAT` first (so TCP stops calling the verdict) narrows the race but the verdict
//!   still runs whenever the receive window is nearly shut: bytes went missing in most runs.
//! - With a stream parser (`tcp_read_sock`), passed buffers deadlock on the receive-buffer
//!   check of the psock ingress path (every run stalled), and re-inserting after a delete
//!   re-initialises a strparser whose work item may still be queued.
//! - Leaving passed bytes queued while waiting made TCP drop segments.
//!
//! # A kernel bug the verdict works around
//!
//! `tcp_read_skb()` hands whole buffers to the verdict and ignores the reader's offset in
//! them. When the sender retransmits a segment with other boundaries (seen under CPU load:
//! drops with reason TCP_OLD_SEQUENCE/TCP_OLD_DATA), TCP queues a buffer whose head overlaps
//! bytes already delivered. The verdict's overlap guard (`ntlm-ebpf`) compares the buffer's
//! sequence number with the socket's next expected one and cuts the overlap off before
//! forwarding. Where it cannot (no kernel BTF, or a cut failed), every check still compares
//! redirected plus copied with what TCP received in sequence and resets the connection when
//! they disagree, before passed duplicates are written, and within one check for redirected
//! ones. `NTLM_SPLICE_SOCKMAP_PARSER=1` attaches the stream parser (which reads with
//! `tcp_read_sock` and skips overlaps itself) for comparison measurements only.

use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use ntlm_common::{SockCtl, SockStats};
use tokio::{io::Interest, net::TcpStream, sync::Notify, time::Instant};

use super::{
    Inner,
    kernel::{BPF_ANY, BPF_NOEXIST},
    sock,
};
use crate::{
    engine::{
        driver::{self, Session},
        run_session,
    },
    lifecycle::{Dir, EngineKind, Fault, Outcome, Progress, RelayCtl, Relayed, Side},
    sys::{clock::monotonic_ns, sock::shutdown_write},
};

/// First sleep of the drain and pause polls; doubled up to [`POLL_MAX`].
const POLL_MIN: Duration = Duration::from_millis(1);
/// Longest sleep of the drain and pause polls.
const POLL_MAX: Duration = Duration::from_millis(50);
/// After a wake event, when to look at a busy direction again (idle detection, lost events,
/// giving budget back); doubled up to [`RECHECK_MAX`] while nothing else wakes it.
const RECHECK_FIRST: Duration = Duration::from_millis(10);
/// Longest interval between checks of a direction that holds budget.
const RECHECK_MAX: Duration = Duration::from_millis(200);
/// Userspace copy buffer (FIN-before-insertion fallback).
const COPY_BUF: usize = 64 << 10;

/// A direction's index into per-direction arrays.
fn di(dir: Dir) -> usize {
    match dir {
        Dir::Up => 0,
        Dir::Down => 1,
    }
}

/// A socket's index into per-socket arrays.
fn si(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

/// Per-direction state read outside the direction's own task.
#[derive(Default)]
struct DirShared {
    /// The kernel forwarded this direction at some point.
    kernel: AtomicBool,
    /// Bytes moved by the userspace copy.
    copied: AtomicU64,
}

/// The connection's map entries, registrations and budget; dropping it removes them all
/// (trap 7), whatever state the connection ended in.
struct Entries<'e> {
    eng: &'e Inner,
    id: u64,
    cookie: [u64; 2],
    /// STATS/CTL entries and an event registration exist for socket i.
    tracked: [AtomicBool; 2],
    /// `PEER[cookie of socket i]` is set.
    in_peer: [AtomicBool; 2],
    /// The source of direction d is in FWD now.
    in_fwd: [AtomicBool; 2],
    /// Global budget held by direction d.
    reserved: [AtomicU64; 2],
    /// Set by `Conn::drop`, after which the sockets close before this drops: a socket leaves
    /// every SockHash when it closes (`sock_map_close`), so the FWD and PEER entries need no
    /// deletion. Left unset when set-up hands the open sockets to the splice engine.
    sockets_closed: AtomicBool,
}

/// One connection in the sockmap engine.
struct Conn<'e> {
    eng: &'e Inner,
    id: u64,
    // Declared before `maps`: the sockets close first, which takes them out of FWD and PEER
    // (no verdict runs after that), then `maps` deletes the side entries.
    socks: [TcpStream; 2],
    maps: Entries<'e>,
    cookie: [u64; 2],
    /// `bytes_written` of each socket at set-up (as a destination).
    base_written: [u64; 2],
    /// `bytes_consumed` of each socket at set-up (as a source).
    base_consumed: [u64; 2],
    /// Wake events for each source socket.
    wake: [Arc<Notify>; 2],
    dirs: [DirShared; 2],
    /// CLOCK_MONOTONIC ns of the last byte moved that the kernel's `last_ns` does not show
    /// (userspace copy, drain progress).
    last_user: AtomicU64,
    reset: driver::ResetOnClose,
}

/// Relays one connection (the engine's `relay`).
pub(super) async fn relay(eng: &Inner, id: u64, client: TcpStream, backend: TcpStream, ctl: &RelayCtl) -> Outcome {
    let conn = match setup(eng, id, client, backend) {
        Ok(c) => c,
        Err((client, backend, why)) => {
            log::debug!("conn={id} sockmap: {why}; handing the connection to the splice engine");
            eng.counters.splice_fallbacks.fetch_add(1, Ordering::Relaxed);
            return match eng.splice.relay(id, client, backend, ctl, Progress::new()).await {
                Relayed::Ended(o) => o,
                // server.rs gives the sockmap engine's connections no --park-after.
                Relayed::Parked { .. } => unreachable!("a sockmap-engine connection was parked"),
            };
        }
    };
    eng.counters.kernel_conns.fetch_add(1, Ordering::Relaxed);
    let pauses_before = eng.counters.pauses.load(Ordering::Relaxed);
    let mut outcome = run_session(&conn, ctl, EngineKind::Sockmap).await;
    let copied = [conn.dirs[0].copied.load(Ordering::Relaxed), conn.dirs[1].copied.load(Ordering::Relaxed)];
    if copied != [0, 0] {
        log::info!(
            "conn={id} sockmap: bytes copied in userspace up={} down={} (in-flight cap reached or FIN before insertion; engine pauses so far {})",
            copied[0],
            copied[1],
            eng.counters.pauses.load(Ordering::Relaxed) - pauses_before
        );
    }
    if !conn.dirs.iter().any(|d| d.kernel.load(Ordering::Relaxed)) {
        outcome.engine = EngineKind::Copy;
    }
    drop(conn);
    outcome
}

type SetupErr = (TcpStream, TcpStream, String);

/// What set-up reads from both sockets before they enter a map.
struct Baselines {
    cookie: [u64; 2],
    written: [u64; 2],
    consumed: [u64; 2],
}

/// Set-up step 1-2; `Ok(Err(why))` when a socket is not ESTABLISHED.
fn baselines(client: &TcpStream, backend: &TcpStream) -> io::Result<Result<Baselines, String>> {
    let mut b = Baselines { cookie: [0; 2], written: [0; 2], consumed: [0; 2] };
    for (i, s) in [client, backend].into_iter().enumerate() {
        let fd = s.as_fd();
        let info = sock::tcp_info(fd)?;
        let state = info.state;
        if state != sock::TCP_ESTABLISHED {
            let who = if i == 0 { "client" } else { "backend" };
            return Ok(Err(format!(
                "the {who} socket is not ESTABLISHED (TCP state {state}, e.g. it already sent its FIN)"
            )));
        }
        b.cookie[i] = sock::cookie(fd)?;
        (b.written[i], b.consumed[i]) = sock::setup_counters(fd, info)?;
    }
    Ok(Ok(b))
}

fn setup(eng: &Inner, id: u64, client: TcpStream, backend: TcpStream) -> Result<Conn<'_>, SetupErr> {
    let Baselines { cookie, written: base_written, consumed: base_consumed } = match baselines(&client, &backend) {
        Ok(Ok(v)) => v,
        Ok(Err(why)) => return Err((client, backend, why)),
        Err(e) => return Err((client, backend, format!("reading socket state failed: {e}"))),
    };
    if eng.sndbuf != 0 {
        for (side, s) in [(Side::Client, &client), (Side::Backend, &backend)] {
            size_sndbuf(eng, id, side, s.as_fd());
        }
    }
    let maps = Entries {
        eng,
        id,
        cookie,
        tracked: Default::default(),
        in_peer: Default::default(),
        in_fwd: Default::default(),
        reserved: Default::default(),
        sockets_closed: AtomicBool::new(false),
    };
    let wake = [eng.registry.register(cookie[0]), eng.registry.register(cookie[1])];
    if let Err(why) = maps.enter(&client, &backend) {
        // Nothing forwards yet; dropping `maps` removes what went in.
        return Err((client, backend, why));
    }
    let conn = Conn {
        eng,
        id,
        maps,
        socks: [client, backend],
        cookie,
        base_written,
        base_consumed,
        wake,
        dirs: Default::default(),
        last_user: AtomicU64::new(monotonic_ns()),
        reset: Default::default(),
    };
    for d in [Dir::Up, Dir::Down] {
        if conn.maps.in_fwd[di(d)].load(Ordering::Relaxed) {
            conn.dirs[di(d)].kernel.store(true, Ordering::Relaxed);
        }
    }
    Ok(conn)
}

impl Entries<'_> {
    /// Steps 3-5 of the set-up. An error means nothing forwards yet (no FWD entry) and the
    /// caller hands the connection to splice.
    fn enter(&self, client: &TcpStream, backend: &TcpStream) -> Result<(), String> {
        let k = &self.eng.kernel;
        let fd = |side: Side| match side {
            Side::Client => client.as_fd(),
            Side::Backend => backend.as_fd(),
        };
        for i in 0..2 {
            let fresh = SockStats { fired_at: u64::MAX, ..SockStats::default() };
            k.stats.put(self.cookie[i], &fresh, BPF_NOEXIST).map_err(|e| format!("creating the STATS entry: {e}"))?;
            self.tracked[i].store(true, Ordering::Relaxed);
            // The first redirected byte wakes us; the first check grants budget.
            let ctl = SockCtl { wake_at: 1, paused: 0, user_copied: 0, stop_at: stop_at(self.eng, 0, 0) };
            k.ctl.put(self.cookie[i], &ctl, BPF_NOEXIST).map_err(|e| format!("creating the CTL entry: {e}"))?;
        }
        if self.eng.breaks.fwd_first {
            self.enter_fwd(&fd);
        }
        // PEER[cookie of the client] = backend socket, and the reverse.
        for side in [Side::Client, Side::Backend] {
            k.peer.put_sock(self.cookie[si(side)], fd(side.other())).map_err(|e| {
                format!("inserting the {:?} socket in PEER failed ({e}); it may have closed", side.other())
            })?;
            self.in_peer[si(side)].store(true, Ordering::Relaxed);
        }
        if !self.eng.breaks.fwd_first {
            self.enter_fwd(&fd);
        }
        Ok(())
    }

    /// Inserts each source into FWD and kicks it; a source that cannot go in (its FIN
    /// arrived) is left to the userspace copy.
    fn enter_fwd<'s>(&self, fd: &impl Fn(Side) -> BorrowedFd<'s>) {
        for dir in [Dir::Up, Dir::Down] {
            let src = dir.src();
            match self.eng.kernel.fwd.put_sock(self.cookie[si(src)], fd(src)) {
                Ok(()) => {
                    self.in_fwd[di(dir)].store(true, Ordering::Relaxed);
                    kick(self.eng, self.id, src, fd(src));
                }
                Err(e) => log::debug!(
                    "conn={} sockmap: {src:?} socket not inserted in FWD ({e}); copying {dir:?} in userspace",
                    self.id
                ),
            }
        }
    }

    /// Deletes every map entry and registration of this connection. Idempotent.
    fn cleanup(&self) {
        let k = &self.eng.kernel;
        let fail = |what: &str, e: io::Error| {
            self.eng.counters.cleanup_failures.fetch_add(1, Ordering::Relaxed);
            log::warn!("conn={} sockmap: deleting {what} failed: {e}", self.id);
        };
        // Forwarding stops first, then the redirect targets, then the side maps.
        if self.sockets_closed.load(Ordering::Relaxed) {
            for f in self.in_fwd.iter().chain(&self.in_peer) {
                f.store(false, Ordering::Relaxed);
            }
        }
        for dir in [Dir::Up, Dir::Down] {
            if self.in_fwd[di(dir)].swap(false, Ordering::Relaxed)
                && let Err(e) = k.fwd.delete(self.cookie[si(dir.src())])
            {
                fail("a FWD entry", e);
            }
        }
        for i in 0..2 {
            if self.in_peer[i].swap(false, Ordering::Relaxed)
                && let Err(e) = k.peer.delete(self.cookie[i])
            {
                fail("a PEER entry", e);
            }
        }
        for i in 0..2 {
            self.eng.registry.unregister(self.cookie[i]);
            if self.tracked[i].swap(false, Ordering::Relaxed) && !self.eng.breaks.no_cleanup {
                if let Ok(st) = self.eng.kernel.stats_of(self.cookie[i]) {
                    let c = &self.eng.counters;
                    c.empty_skbs.fetch_add(st.empty_skbs, Ordering::Relaxed);
                    c.overlap_skbs.fetch_add(st.overlap_skbs, Ordering::Relaxed);
                    c.cap_stops.fetch_add(st.cap_stops, Ordering::Relaxed);
                    c.overlap_bytes
                        .fetch_add(st.overlap_bytes, Ordering::Relaxed);
                    if st.overlap_skbs != 0 {
                        // More than one loopback segment in one buffer: TCP merged retransmitted
                        // segments; rare enough to show.
                        let level = if st.overlap_max > 64 << 10 { log::Level::Info } else { log::Level::Debug };
                        log::log!(
                            level,
                            "conn={} sockmap: cut {} overlapping bytes off {} retransmitted buffers from the {:?} socket \
                             (largest overlap {} bytes)",
                            self.id,
                            st.overlap_bytes,
                            st.overlap_skbs,
                            if i == 0 { Side::Client } else { Side::Backend },
                            st.overlap_max
                        );
                    }
                }
                if let Err(e) = k.stats.delete(self.cookie[i]) {
                    fail("a STATS entry", e);
                }
                if let Err(e) = k.ctl.delete(self.cookie[i]) {
                    fail("a CTL entry", e);
                }
            }
        }
        for r in &self.reserved {
            self.eng.budget.release(r.swap(0, Ordering::Relaxed));
        }
    }
}

impl Drop for Entries<'_> {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Gives a socket `--sockmap-sndbuf`. The kernel's redirect worker (`sk_psock_backlog`)
/// sends into a socket only while less than half its send buffer is queued; otherwise it
/// retries one timer tick later (4 ms at HZ=250), and the wake-up that more room would
/// bring is lost because the retry is already pending. With the autotuned 4 MiB at most,
/// 2 MiB lasts about 2 ms at loopback speed and the socket sat idle for the rest of each
/// tick: the kernel path moved 547-650 MiB/s, and 846-1,036 MiB/s with 8 MiB, against
/// 887-1,181 MiB/s through the splice engine in the same minutes (1 GiB uploads, pause off).
fn size_sndbuf(eng: &Inner, id: u64, side: Side, fd: BorrowedFd<'_>) {
    match sock::set_sndbuf(fd, eng.sndbuf) {
        Ok(got) if got < eng.sndbuf && !eng.sndbuf_short.swap(true, Ordering::Relaxed) => log::warn!(
            "sockmap: asked for a {} byte send buffer, the kernel gave {got} (net.core.wmem_max, and no \
             CAP_NET_ADMIN for SO_SNDBUFFORCE?); bulk transfers through the kernel will be slower",
            eng.sndbuf
        ),
        Ok(_) => {}
        Err(e) => log::debug!("conn={id} sockmap: SO_SNDBUF on {side:?}: {e}"),
    }
}

/// `SO_RCVLOWAT` kick (trap 4), unless switched off for a test.
fn kick(eng: &Inner, id: u64, side: Side, fd: BorrowedFd<'_>) {
    if eng.breaks.no_kick {
        return;
    }
    if let Err(e) = sock::kick(fd) {
        log::debug!("conn={id} sockmap: SO_RCVLOWAT kick on {side:?} failed: {e}");
    }
}

impl<'e> Conn<'e> {
    fn sock(&self, side: Side) -> &TcpStream {
        &self.socks[si(side)]
    }

    fn fd(&self, side: Side) -> BorrowedFd<'_> {
        self.sock(side).as_fd()
    }

    fn kick(&self, side: Side) {
        kick(self.eng, self.id, side, self.fd(side));
    }

    fn stats(&self, side: Side) -> Result<SockStats, Fault> {
        self.eng.kernel.stats_of(self.cookie[si(side)]).map_err(Fault::Internal)
    }

    /// Bytes written to `dst` since set-up.
    fn written(&self, dst: Side) -> Result<u64, Fault> {
        let w = sock::bytes_written(self.fd(dst)).map_err(Fault::on(dst))?;
        Ok(w.saturating_sub(self.base_written[si(dst)]))
    }

    /// Bytes of `dir` the kernel redirected but `dst`'s TCP has not taken yet, and the
    /// redirected total.
    fn inflight(&self, dir: Dir) -> Result<(u64, u64), Fault> {
        let r = self.stats(dir.src())?.bytes;
        let w = self.written(dir.dst())?;
        let copied = self.dirs[di(dir)].copied.load(Ordering::Relaxed);
        let f = r.saturating_sub(w.saturating_sub(copied));
        self.eng.counters.max_inflight_seen.fetch_max(f, Ordering::Relaxed);
        Ok((f, r))
    }

    /// Fails on a socket error pending on `side`. A destination (`writing`) must also still
    /// be open: it cannot have completed a close while this direction has not sent its FIN,
    /// unless it was reset. (A source may be closed cleanly: FINs exchanged both ways.)
    fn check_alive(&self, side: Side, writing: bool) -> Result<(), Fault> {
        if let Some(e) = sock::take_error(self.fd(side)).map_err(Fault::on(side))? {
            return Err(Fault::on(side)(e));
        }
        if writing && sock::tcp_info(self.fd(side)).map_err(Fault::on(side))?.state == sock::TCP_CLOSE {
            return Err(Fault::on(side)(io::ErrorKind::ConnectionReset.into()));
        }
        Ok(())
    }

    fn touch(&self) {
        self.last_user.store(monotonic_ns(), Ordering::Relaxed);
    }

    /// Data bytes that arrived on `src` since set-up (the FIN not counted).
    fn arrived(&self, src: Side) -> Result<u64, Fault> {
        let info = sock::tcp_info(self.fd(src)).map_err(Fault::on(src))?;
        let fin = u64::from(sock::fin_received(info.state));
        Ok(info.bytes_received.saturating_sub(fin).saturating_sub(self.base_consumed[si(src)]))
    }

    /// Fails if the kernel handed the verdict more bytes than TCP received in sequence, or if
    /// the verdict's overlap guard met a buffer it could not cut.
    ///
    /// `tcp_read_skb()` (the verdict path) passes whole socket buffers and ignores where the
    /// reader stands in them; after a retransmission TCP queues a buffer whose head overlaps
    /// bytes already delivered (seen here under load: a duplicated 65,483-byte segment). The
    /// verdict cuts that overlap off by sequence number (`ntlm-ebpf`, overlap guard); this
    /// check is what stands when the guard is off (no kernel BTF) or failed: redirected plus
    /// passed would then exceed what arrived. `extra`: bytes userspace took out of the source
    /// besides the verdict's. Read in this order (stats, then TCP_INFO) the check has no
    /// false alarms.
    fn check_no_duplicate(&self, dir: Dir, extra: u64) -> Result<(), Fault> {
        self.check_no_duplicate_of(dir, extra, None)
    }

    /// [`Self::check_no_duplicate`]; `final_arrived`: the source's final count of arrived
    /// bytes (after its EOF, when no byte can arrive any more), read already, so the order of
    /// the reads no longer matters.
    fn check_no_duplicate_of(&self, dir: Dir, extra: u64, final_arrived: Option<u64>) -> Result<(), Fault> {
        let st = self.stats(dir.src())?;
        if st.guard_failed != 0 {
            self.eng.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return Err(Fault::Internal(io::Error::other(format!(
                "the overlap guard could not cut a retransmitted segment from the {:?} socket ({}) and dropped \
                 it; the stream is no longer intact, resetting the connection",
                dir.src(),
                match st.cut_err as i64 {
                    0 => "a kernel read failed".to_owned(),
                    -12 => "error -12, ENOMEM: the kernel's atomic allocation failed".to_owned(),
                    -7 => format!("error -7, E2BIG: an overlap of {} bytes, over the verdict's limit", st.overlap_max),
                    e => format!("error {e}"),
                }
            ))));
        }
        let delivered = st.bytes + extra;
        let arrived = match final_arrived {
            Some(a) => a,
            None => self.arrived(dir.src())?,
        };
        if delivered > arrived {
            self.eng.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return Err(Fault::Internal(io::Error::other(format!(
                "the kernel delivered {} bytes twice from the {:?} socket (tcp_read_skb ignores the overlap of a \
                 retransmitted segment{}); resetting the connection rather than passing them on",
                delivered - arrived,
                dir.src(),
                if self.eng.kernel.guard_off.is_some() {
                    ", and the overlap guard is off"
                } else {
                    ""
                }
            ))));
        }
        Ok(())
    }

    fn write_ctl(&self, dir: Dir, ctl: &SockCtl) -> Result<(), Fault> {
        self.eng.kernel.ctl.put(self.cookie[si(dir.src())], ctl, BPF_ANY).map_err(Fault::Internal)
    }

    /// Moves `dir` to its end (the Session's `run`).
    async fn run_dir(&self, dir: Dir) -> Result<(), Fault> {
        if self.maps.in_fwd[di(dir)].load(Ordering::Relaxed) {
            self.forward(dir).await?;
            log::debug!("conn={} sockmap: {dir:?} source EOF; draining", self.id);
            self.drain(dir).await?;
        } else {
            self.eng.counters.copy_directions.fetch_add(1, Ordering::Relaxed);
            self.copy(dir).await?;
        }
        self.eng.budget.release(self.maps.reserved[di(dir)].swap(0, Ordering::Relaxed));
        if self.eng.breaks.no_fin {
            return std::future::pending().await;
        }
        shutdown_write(self.fd(dir.dst())).map_err(Fault::on(dir.dst()))
    }

    /// Kernel forwarding until the source's EOF. Returns once the source reached EOF and
    /// every byte the verdict passed to userspace was written to the destination.
    ///
    /// While paused (and until userspace caught up), the verdict passes the source's bytes
    /// to the source's own queue. This loop reads them at once into a bounded buffer (the
    /// lane): left in the queue they would be charged to the socket and, once its receive
    /// buffer fills, make TCP drop segments, whose retransmissions `tcp_read_skb` then
    /// delivers twice (measured). The lane is written to the destination only after every
    /// byte redirected before it reached the destination's TCP.
    async fn forward(&self, dir: Dir) -> Result<(), Fault> {
        let (src, dst) = (self.sock(dir.src()), self.sock(dir.dst()));
        let wake = &self.wake[si(dir.src())];
        let cap = self.eng.max_inflight;
        let lane_max = lane_max(cap);
        let mut flow = Flow {
            ctl: SockCtl { wake_at: 1, paused: 0, user_copied: 0, stop_at: stop_at(self.eng, 0, 0) },
            paused: false,
            copied: 0,
            last_r: u64::MAX,
            recheck: None,
            interval: RECHECK_FIRST,
        };
        let mut lane = Lane::default();
        // Allocated on the first passed byte: most connections never need it, and 64 KiB per
        // direction up front was most of an idle sockmap connection's memory (21.6 KiB RSS
        // per idle connection in the bench; glibc hands back touched chunks).
        let mut buf: Vec<u8> = Vec::new();
        let mut eof = false;
        loop {
            if eof && lane.is_empty() {
                return Ok(());
            }
            // Redirected bytes still ahead of the lane: look again soon.
            let flush_poll = !lane.is_empty() && !lane.flushed;
            let recheck = if flush_poll { Some(Instant::now() + lane.poll) } else { flow.recheck };
            let timer = async move {
                match recheck {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let can_read = !eof && lane.len() < lane_max;
            let can_write = !lane.is_empty() && lane.flushed;
            tokio::select! {
                // The verdict takes every byte it redirects, so the source turns readable only
                // on EOF, on an error, or when bytes were passed to us.
                r = src.readable(), if can_read => {
                    r.map_err(Fault::on(dir.src()))?;
                    let read = |buf: &mut [u8]| {
                        let room = (lane_max - lane.len()).min(buf.len());
                        src.try_io(Interest::READABLE, || sock::recv(src.as_fd(), &mut buf[..room]))
                    };
                    let got = if buf.is_empty() {
                        // tokio reports a socket readable once at registration when bytes were
                        // waiting (the verdict took them since), and a source at its EOF is
                        // readable too: look before allocating, or every connection would
                        // allocate 64 KiB it never uses.
                        match src.try_io(Interest::READABLE, || sock::peek(src.as_fd())) {
                            Ok(0) => Ok(0),
                            Ok(_) => {
                                buf = vec![0u8; COPY_BUF];
                                self.eng.counters.lane_bufs.fetch_add(1, Ordering::Relaxed);
                                read(&mut buf)
                            }
                            Err(e) => Err(e),
                        }
                    } else {
                        read(&mut buf)
                    };
                    match got {
                        Ok(0) => {
                            if self.stats(dir.src())?.passed == flow.copied + lane.len() as u64 {
                                eof = true;
                            } else {
                                // Passed bytes still on their way to the socket's queue.
                                tokio::time::sleep(POLL_MIN).await;
                            }
                        }
                        Ok(n) => {
                            if lane.is_empty() && !flow.paused {
                                // Passed without a pause of ours: the verdict's own limit
                                // (or bytes still behind an earlier pass). Look now, so that
                                // the source pauses or gets a new limit once drained.
                                self.check(dir, &mut flow, false)?;
                            }
                            if lane.is_empty() && !lane.flushed {
                                // While anything passed is unwritten the verdict redirects
                                // nothing, so once the in-flight count reaches zero it stays
                                // there until the lane has caught up.
                                lane.flushed = self.inflight(dir)?.0 == 0;
                                lane.poll = POLL_MIN;
                            }
                            lane.push(&buf[..n]);
                            // Before any of it is written: the lane must not hold a duplicate.
                            self.check_no_duplicate(dir, flow.copied + lane.len() as u64)?;
                            self.touch();
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(Fault::on(dir.src())(e)),
                    }
                }
                r = dst.writable(), if can_write => {
                    r.map_err(Fault::on(dir.dst()))?;
                    match dst.try_write(lane.front()) {
                        Ok(n) => {
                            lane.consume(n);
                            flow.copied += n as u64;
                            if lane.is_empty() {
                                // Caught up once `passed` equals what we wrote: the verdict
                                // may redirect again, so the next lane bytes wait for a flush.
                                lane.flushed = false;
                            }
                            self.dirs[di(dir)].copied.fetch_add(n as u64, Ordering::Relaxed);
                            self.eng.counters.copied_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            self.touch();
                            // Once this equals `passed`, the verdict redirects again: everything
                            // passed is in the destination's TCP by then.
                            flow.ctl.user_copied = flow.copied;
                            self.write_ctl(dir, &flow.ctl)?;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(Fault::on(dir.dst())(e)),
                    }
                }
                r = dst.ready(Interest::ERROR) => {
                    let e = match r {
                        Ok(_) => sock::take_error(self.fd(dir.dst())).ok().flatten(),
                        Err(e) => Some(e),
                    };
                    return Err(Fault::on(dir.dst())(e.unwrap_or_else(|| io::ErrorKind::ConnectionReset.into())));
                }
                () = wake.notified() => {
                    if !flow.paused {
                        flow.interval = RECHECK_FIRST;
                    }
                    self.check(dir, &mut flow, false)?;
                }
                () = timer => {
                    if flush_poll {
                        // While the lane is not empty the verdict passes every buffer, so
                        // nothing is redirected and the in-flight count only falls.
                        if self.inflight(dir)?.0 == 0 {
                            lane.flushed = true;
                        } else {
                            self.check_alive(dir.dst(), true)?;
                            lane.poll = (lane.poll * 2).min(POLL_MAX);
                        }
                    } else {
                        self.check(dir, &mut flow, true)?;
                    }
                }
            }
        }
    }

    /// Looks at a forwarding direction: grants budget and sets the next event threshold,
    /// pauses it (the verdict then keeps the bytes on the source), or resumes it.
    /// `timer`: called by the recheck timer rather than an event.
    fn check(&self, dir: Dir, flow: &mut Flow, timer: bool) -> Result<(), Fault> {
        let reserved = &self.maps.reserved[di(dir)];
        let cap = self.eng.max_inflight;
        self.check_no_duplicate(dir, flow.copied)?;
        loop {
            let (f, r) = self.inflight(dir)?;
            let old = reserved.load(Ordering::Relaxed);
            if flow.paused {
                // Hold only what is really in flight while the destination drains.
                let mut held = self.eng.budget.resize(old, f, f);
                if f <= low(cap) {
                    let new = self.eng.budget.resize(held, f, high(cap).min(f + chunk(cap)));
                    if new - f >= min_headroom(cap) || self.eng.budget.reserved() == new {
                        reserved.store(new, Ordering::Relaxed);
                        flow.paused = false;
                        flow.ctl.paused = 0;
                        flow.ctl.wake_at = r + (new - f).max(1);
                        flow.ctl.stop_at = stop_at(self.eng, r, f);
                        self.write_ctl(dir, &flow.ctl)?;
                        log::trace!("conn={} sockmap: {dir:?} resumed at {r} redirected, {f} in flight", self.id);
                        flow.last_r = r;
                        flow.interval = RECHECK_FIRST;
                        flow.recheck = Some(Instant::now() + flow.interval);
                        return Ok(());
                    }
                    // Not enough budget: give the grant back and wait for others to drain.
                    held = self.eng.budget.resize(new, f, f);
                }
                reserved.store(held, Ordering::Relaxed);
                if f != flow.last_r {
                    self.touch();
                }
                flow.last_r = f;
                flow.recheck = Some(Instant::now() + flow.interval);
                flow.interval = (flow.interval * 2).min(POLL_MAX);
                return Ok(());
            }
            if timer && f == 0 && r == flow.last_r {
                // Idle: nothing arrived since the last look and nothing is in flight. Give the
                // budget back; the next byte wakes us.
                self.eng.budget.release(reserved.swap(0, Ordering::Relaxed));
                flow.ctl.wake_at = r + 1;
                flow.ctl.stop_at = stop_at(self.eng, r, 0);
                self.write_ctl(dir, &flow.ctl)?;
                flow.recheck = None;
                if self.stats(dir.src())?.bytes > r {
                    continue;
                }
                return Ok(());
            }
            let new = self.eng.budget.resize(old, f, high(cap).min(f + chunk(cap)));
            reserved.store(new, Ordering::Relaxed);
            let headroom = new - f;
            if headroom < min_headroom(cap) && !self.eng.breaks.no_backpressure && !self.eng.breaks.no_soft_pause {
                // Pause: from the next buffer on the verdict keeps the bytes on the source.
                flow.paused = true;
                flow.ctl.paused = 1;
                self.write_ctl(dir, &flow.ctl)?;
                log::trace!("conn={} sockmap: {dir:?} paused at {r} redirected, {f} in flight", self.id);
                self.eng.counters.pauses.fetch_add(1, Ordering::Relaxed);
                reserved.store(self.eng.budget.resize(new, f, f), Ordering::Relaxed);
                flow.last_r = f;
                flow.interval = POLL_MIN;
                flow.recheck = Some(Instant::now() + flow.interval);
                return Ok(());
            }
            let wake_at = r + headroom.max(min_headroom(cap));
            flow.ctl.wake_at = wake_at;
            flow.ctl.stop_at = stop_at(self.eng, r, f);
            self.write_ctl(dir, &flow.ctl)?;
            flow.last_r = r;
            flow.recheck = Some(Instant::now() + flow.interval);
            if timer {
                flow.interval = (flow.interval * 2).min(RECHECK_MAX);
            }
            // Crossed while we were setting it: the kernel will not fire for it.
            if self.stats(dir.src())?.bytes >= wake_at {
                continue;
            }
            return Ok(());
        }
    }

    /// After the source's EOF: waits until the destination's TCP took every byte that
    /// arrived on the source (the redirect backlog may still hold many), so the FIN follows
    /// the data.
    async fn drain(&self, dir: Dir) -> Result<(), Fault> {
        if self.eng.breaks.no_drain {
            return Ok(());
        }
        let (src, dst) = (dir.src(), dir.dst());
        self.kick(src);
        let mut sleep = POLL_MIN;
        let mut last_w = u64::MAX;
        loop {
            self.check_alive(src, false)?;
            let received = sock::tcp_info(self.fd(src)).map_err(Fault::on(src))?.bytes_received;
            // At EOF without a socket error the source received a FIN, which bytes_received
            // counts (the state cannot tell: after FINs both ways it reads TCP_CLOSE).
            let arrived = received.saturating_sub(1).saturating_sub(self.base_consumed[si(src)]);
            let w = self.written(dst)?;
            if w >= arrived {
                self.check_no_duplicate_of(dir, self.dirs[di(dir)].copied.load(Ordering::Relaxed), Some(arrived))?;
                log::debug!(
                    "conn={} sockmap: {dir:?} drained: {arrived} bytes arrived, {w} written, {} redirected",
                    self.id,
                    self.stats(src)?.bytes
                );
                return Ok(());
            }
            let st = self.stats(src)?;
            if st.drop_no_peer > 0 {
                return Err(Fault::on(dst)(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    format!("{} bytes dropped: the destination left the map", st.drop_no_peer_bytes),
                )));
            }
            self.check_alive(dst, true)?;
            if w == last_w {
                // No progress: make sure the verdict has seen everything queued on the source.
                self.kick(src);
                sleep = (sleep * 2).min(POLL_MAX);
            } else {
                self.touch();
                sleep = POLL_MIN;
            }
            last_w = w;
            tokio::time::sleep(sleep).await;
        }
    }

    /// Userspace copy of `dir` until EOF, for a source that never entered FWD (its FIN came
    /// first): plain read/write, since the sockets may be in a map for the other direction.
    async fn copy(&self, dir: Dir) -> Result<(), Fault> {
        let (src, dst) = (self.sock(dir.src()), self.sock(dir.dst()));
        let copied = &self.dirs[di(dir)].copied;
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            src.readable().await.map_err(Fault::on(dir.src()))?;
            let n = match src.try_read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Fault::on(dir.src())(e)),
            };
            write_all(dst, &buf[..n]).await.map_err(Fault::on(dir.dst()))?;
            copied.fetch_add(n as u64, Ordering::Relaxed);
            self.eng.counters.copied_bytes.fetch_add(n as u64, Ordering::Relaxed);
            self.touch();
        }
    }
}

/// Writes all of `buf` to a non-blocking socket.
async fn write_all(dst: &TcpStream, buf: &[u8]) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        dst.writable().await?;
        match dst.try_write(&buf[off..]) {
            Ok(m) => off += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        // The fields drop after this: the sockets (closing them takes them out of FWD and
        // PEER), then `maps` (the side entries).
        self.reset.apply(self.id, |side| self.fd(side));
        self.maps.sockets_closed.store(true, Ordering::Relaxed);
    }
}

impl Session for Conn<'_> {
    async fn run(&self, dir: Dir) -> Result<(), Fault> {
        self.run_dir(dir).await
    }

    fn bytes(&self) -> (u64, u64) {
        let total = |dir: Dir| {
            let kernel = self.stats(dir.src()).map(|s| s.bytes).unwrap_or(0);
            kernel + self.dirs[di(dir)].copied.load(Ordering::Relaxed)
        };
        (total(Dir::Up), total(Dir::Down))
    }

    fn last_activity_ns(&self) -> u64 {
        let k = |side: Side| self.stats(side).map(|s| s.last_ns).unwrap_or(0);
        self.last_user.load(Ordering::Relaxed).max(k(Side::Client)).max(k(Side::Backend))
    }

    fn reset_on_close(&self, side: Side) {
        self.reset.set(side);
    }

    fn socket(&self, side: Side) -> &TcpStream {
        &self.socks[si(side)]
    }
}

/// Bytes the verdict passed to userspace, read out of the source and not yet written to
/// the destination.
#[derive(Default)]
struct Lane {
    buf: std::collections::VecDeque<u8>,
    /// Every byte redirected before the lane's bytes is in the destination's TCP.
    flushed: bool,
    /// Current interval of the flush poll.
    poll: Duration,
}

impl Lane {
    fn len(&self) -> usize {
        self.buf.len()
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn push(&mut self, b: &[u8]) {
        self.buf.extend(b);
    }
    fn front(&self) -> &[u8] {
        self.buf.as_slices().0
    }
    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
    }
}

/// Most bytes a direction's lane holds (userspace memory, while the in-kernel backlog
/// drains): half the cap, at least 256 KiB.
fn lane_max(cap: u64) -> usize {
    (cap / 2).max(256 << 10) as usize
}

/// Bookkeeping of a forwarding direction (its task's own state).
struct Flow {
    /// What we last wrote to CTL for the source.
    ctl: SockCtl,
    /// The verdict keeps the source's bytes (in-flight cap reached).
    paused: bool,
    /// Passed bytes written to the destination so far.
    copied: u64,
    /// Redirected total at the last check (idle detection); in-flight while paused.
    last_r: u64,
    /// When to check again without an event.
    recheck: Option<Instant>,
    /// Current recheck interval.
    interval: Duration,
}

/// The verdict's limit for a source (`SockCtl::stop_at`) when `r` bytes were redirected and
/// `f` of them were still in flight: redirecting stops where in flight would pass the cap,
/// whether or not userspace has reacted by then (in flight only falls between looks, except
/// by new redirects).
fn stop_at(eng: &Inner, r: u64, f: u64) -> u64 {
    if eng.breaks.no_backpressure { u64::MAX } else { r + eng.max_inflight.saturating_sub(f) }
}

/// In flight at which a direction pauses: half the cap. The other half absorbs what the
/// kernel redirects while userspace reacts to the event (the verdict keeps going until the
/// socket leaves FWD), so the cap holds in practice; tests measure the peak.
fn high(cap: u64) -> u64 {
    cap / 2
}

/// In flight below which a paused direction resumes.
fn low(cap: u64) -> u64 {
    cap / 4
}

/// Budget granted per event: an eighth of the cap, so a direction at full speed wakes
/// userspace about eight times per cap's worth of bytes.
fn chunk(cap: u64) -> u64 {
    (cap / 8).max(16 << 10)
}

/// Below this much headroom a direction pauses instead of forwarding on.
fn min_headroom(cap: u64) -> u64 {
    (cap / 16).clamp(1, 64 << 10)
}
