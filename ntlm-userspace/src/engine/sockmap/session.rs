//! One connection through the sockmap engine: [`Conn`] (the two sockets, their set-up
//! baselines, per-direction state), [`relay`] (set-up, the lifecycle driver, the hand-over to
//! the splice engine), the [`Session`] the driver runs, and the accessors the other files
//! build on. The rest of a connection lives beside it:
//!
//! - `entries`: the set-up order and the map entries' RAII (traps 4, 5, 7, 8);
//! - `flow`: kernel forwarding, pausing and draining a direction (traps 1, 2, 3);
//! - `lane`: the userspace copies (bytes passed while paused; a source whose FIN came first);
//! - `duplicates`: the checks that stand when the verdict's overlap guard cannot.

use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use ntlm_common::{SockCtl, SockStats};
use tokio::{net::TcpStream, sync::Notify};

use super::{
    Inner,
    entries::{Chain, Entries, Unpaired, kick, setup},
    kernel::BPF_ANY,
    sock,
};
use crate::{
    engine::{
        driver::{self, Session},
        run_session,
    },
    lifecycle::{Dir, End, EngineKind, Fault, Outcome, Progress, RelayCtl, Relayed, Side},
    park::Bell,
    sys::{clock::monotonic_ns, sock::shutdown_write},
};

/// Per-direction state read outside the direction's own task.
#[derive(Default)]
pub(super) struct DirShared {
    /// The kernel forwarded this direction at some point.
    pub(super) kernel: AtomicBool,
    /// Bytes moved by the userspace copy.
    pub(super) copied: AtomicU64,
    /// The redirected total at which the direction last went idle (nothing in flight, no
    /// budget held, the next redirected byte raises an event), or [`NOT_IDLE`] since it did
    /// anything else. Starts idle at 0: set-up leaves a source so.
    pub(super) idle_at: AtomicU64,
}

/// [`DirShared::idle_at`] of a direction that is not idle.
pub(super) const NOT_IDLE: u64 = u64::MAX;

/// What a parked connection keeps besides its sockets: its map entries (the pair stays in
/// the maps, so the kernel keeps forwarding while it is parked, and closing it still removes
/// them) and what a new task needs to go on with the same counts.
pub(crate) struct Kept {
    maps: Entries,
    base_written: [u64; 2],
    base_consumed: [u64; 2],
    copied: [u64; 2],
    kernel: [bool; 2],
    idle_at: [u64; 2],
    /// Bytes moved before set-up (by the NTLM observer), which the outcome adds.
    before: [u64; 2],
    /// The wake-ups of the task that parked it, until [`Kept::parked`] hands the cookies'
    /// events to the parker (taken then).
    wake: Option<[Arc<Notify>; 2]>,
}

impl Kept {
    /// The connection is parked under `key`: from now on a byte the kernel forwards for it
    /// rings `bell`; if one was forwarded since it went idle (its event went to the task that
    /// parked it), at once.
    pub(crate) fn parked(&mut self, bell: &Arc<Bell>, key: u64) {
        let Some(wake) = self.wake.take() else { return };
        let eng = self.maps.engine();
        for (i, task) in wake.iter().enumerate() {
            if !eng.registry.park(self.maps.cookie()[i], task, bell, key) {
                return; // it came back already: its new task has the events
            }
        }
        let moved = |i: usize| eng.kernel.stats_of(self.maps.cookie()[i]).map_or(true, |s| s.bytes != self.idle_at[i]);
        if moved(0) || moved(1) {
            bell.ring(key);
        }
    }
}

/// A parked connection back from the parker: its sockets and what it kept, as a [`Conn`]
/// that goes on from there (same entries, baselines and counts).
fn resume<'e>(eng: &'e Inner, id: u64, client: TcpStream, backend: TcpStream, k: Kept, last_ns: u64) -> Conn<'e> {
    let Kept { maps, base_written, base_consumed, copied, kernel, idle_at: _, before: _, wake: _ } = k;
    let wake = maps.register();
    // Both directions look at once: the event that woke the connection went to the parker.
    for w in &wake {
        w.notify_one();
    }
    // Not idle until each direction has looked again (its first check, then a quiet
    // recheck): otherwise a connection woken by a FIN, whose last byte is long past, would
    // park again before its direction saw the EOF, and again on the same FIN.
    let dirs = [0, 1].map(|i| DirShared {
        kernel: AtomicBool::new(kernel[i]),
        copied: AtomicU64::new(copied[i]),
        idle_at: AtomicU64::new(NOT_IDLE),
    });
    Conn {
        eng,
        id,
        socks: [client, backend],
        cookie: maps.cookie(),
        maps,
        base_written,
        base_consumed,
        wake,
        dirs,
        last_user: AtomicU64::new(last_ns),
        reset: Default::default(),
    }
}

/// Parks `conn` (its task decided to): its sockets stay open (dup'd out of the runtime) and
/// in the maps, and its entries go into a [`Kept`]; the caller then drops `conn`, whose own
/// descriptors close (the dup'd ones keep the sockets open) and which removes nothing.
/// Fails (nothing handed over) if a descriptor cannot be dup'd.
fn park(conn: &Conn<'_>, before: [u64; 2]) -> io::Result<Relayed> {
    let socks = [conn.fd(Side::Client).try_clone_to_owned()?, conn.fd(Side::Backend).try_clone_to_owned()?];
    let (up, down) = conn.bytes();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let kept = Kept {
        maps: conn.maps.hand_over(),
        base_written: conn.base_written,
        base_consumed: conn.base_consumed,
        copied: [load(&conn.dirs[0].copied), load(&conn.dirs[1].copied)],
        kernel: [conn.dirs[0].kernel.load(Ordering::Relaxed), conn.dirs[1].kernel.load(Ordering::Relaxed)],
        idle_at: [load(&conn.dirs[0].idle_at), load(&conn.dirs[1].idle_at)],
        before,
        wake: Some(conn.wake.clone()),
    };
    let progress = Progress { bytes: [before[0] + up, before[1] + down], last_ns: conn.last_activity_ns() };
    Ok(Relayed::Parked { socks, progress, kept: Some(crate::engine::Kept(Box::new(kept))) })
}

/// One connection in the sockmap engine.
pub(super) struct Conn<'e> {
    /// The engine (maps, budget, counters).
    pub(super) eng: &'e Inner,
    /// The connection's id (for the log).
    pub(super) id: u64,
    // Declared before `maps`: the sockets close first, which takes them out of FWD and PEER
    // (no verdict runs after that), then `maps` deletes the side entries.
    /// The client and backend sockets.
    pub(super) socks: [TcpStream; 2],
    /// The map entries, registrations and budget, removed on drop.
    pub(super) maps: Entries,
    /// `SO_COOKIE` of the client and backend sockets.
    pub(super) cookie: [u64; 2],
    /// `bytes_written` of each socket at set-up (as a destination).
    pub(super) base_written: [u64; 2],
    /// `bytes_consumed` of each socket at set-up (as a source).
    pub(super) base_consumed: [u64; 2],
    /// Wake events for each source socket.
    pub(super) wake: [Arc<Notify>; 2],
    /// Per-direction state (up, down).
    pub(super) dirs: [DirShared; 2],
    /// CLOCK_MONOTONIC ns of the last byte moved that the kernel's `last_ns` does not show
    /// (userspace copy, drain progress).
    pub(super) last_user: AtomicU64,
    /// Sockets to close with a reset.
    pub(super) reset: driver::ResetOnClose,
}

/// Relays one connection (the engine's `relay`) to its end, never parking (`ctl` must have
/// no `park_after`): for the self-test and tests.
pub(super) async fn relay(eng: &Arc<Inner>, id: u64, client: TcpStream, backend: TcpStream, ctl: &RelayCtl) -> Outcome {
    match relay_or_park(eng, id, client, backend, ctl, Progress::new(), None).await {
        Relayed::Ended(o) => o,
        Relayed::Parked { progress, .. } => {
            progress.ended(End::Internal, Some(Fault::Internal(io::Error::other("parked"))), EngineKind::Sockmap)
        }
    }
}

/// Relays one connection until it ends or parks: a new one (`kept` `None`, `progress`: the
/// bytes moved before), or one back from the parker with what it kept.
pub(super) async fn relay_or_park(
    eng: &Arc<Inner>,
    id: u64,
    client: TcpStream,
    backend: TcpStream,
    ctl: &RelayCtl,
    progress: Progress,
    kept: Option<Box<Kept>>,
) -> Relayed {
    let (conn, before) = match kept {
        Some(k) => {
            let before = k.before;
            (resume(eng, id, client, backend, *k, progress.last_ns), before)
        }
        None => match setup(eng, id, client, backend) {
            Ok(c) => {
                eng.counters.kernel_conns.fetch_add(1, Ordering::Relaxed);
                (c, progress.bytes)
            }
            Err(Unpaired { client, backend, why }) => {
                log::debug!("conn={id} sockmap: {}; handing the connection to the splice engine", Chain(&why));
                eng.counters.splice_fallbacks.fetch_add(1, Ordering::Relaxed);
                // It may park there, and comes back to this engine, which tries the maps again.
                return eng.splice.relay(id, client, backend, ctl, progress).await;
            }
        },
    };
    let pauses_before = eng.counters.pauses.load(Ordering::Relaxed);
    let mut ctl = std::borrow::Cow::Borrowed(ctl);
    let mut outcome = loop {
        match run_session(&conn, &ctl, EngineKind::Sockmap).await {
            Some(o) => break o,
            None => match park(&conn, before) {
                Ok(parked) => return parked,
                Err(e) => {
                    log::debug!("conn={id} sockmap: cannot park ({e}); relaying it on");
                    ctl = std::borrow::Cow::Owned(RelayCtl { park_after: None, ..ctl.into_owned() });
                }
            },
        }
    };
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
    outcome.bytes_up += before[0];
    outcome.bytes_down += before[1];
    drop(conn);
    Relayed::Ended(outcome)
}

impl Conn<'_> {
    /// The socket of `side`.
    pub(super) fn sock(&self, side: Side) -> &TcpStream {
        &self.socks[side as usize]
    }

    /// The descriptor of `side`'s socket.
    pub(super) fn fd(&self, side: Side) -> BorrowedFd<'_> {
        self.sock(side).as_fd()
    }

    /// `SO_RCVLOWAT` kick of `side` (trap 4), so that the verdict sees bytes queued there.
    pub(super) fn kick(&self, side: Side) {
        kick(self.eng, self.id, side, self.fd(side));
    }

    /// The kernel's STATS entry of `side`'s socket.
    pub(super) fn stats(&self, side: Side) -> Result<SockStats, Fault> {
        self.eng.kernel.stats_of(self.cookie[side as usize]).map_err(Fault::Internal)
    }

    /// Bytes written to `dst` since set-up.
    pub(super) fn written(&self, dst: Side) -> Result<u64, Fault> {
        let w = sock::bytes_written(self.fd(dst)).map_err(Fault::on(dst))?;
        Ok(w.saturating_sub(self.base_written[dst as usize]))
    }

    /// Fails on a socket error pending on `side`. A destination (`writing`) must also still
    /// be open: it cannot have completed a close while this direction has not sent its FIN,
    /// unless it was reset. (A source may be closed cleanly: FINs exchanged both ways.)
    pub(super) fn check_alive(&self, side: Side, writing: bool) -> Result<(), Fault> {
        if let Some(e) = sock::take_error(self.fd(side)).map_err(Fault::on(side))? {
            return Err(Fault::on(side)(e));
        }
        if writing && sock::tcp_info(self.fd(side)).map_err(Fault::on(side))?.state == sock::TCP_CLOSE {
            return Err(Fault::on(side)(io::ErrorKind::ConnectionReset.into()));
        }
        Ok(())
    }

    /// Records userspace progress now (for the idle timeout).
    pub(super) fn touch(&self) {
        self.last_user.store(monotonic_ns(), Ordering::Relaxed);
    }

    /// Writes the CTL entry of `dir`'s source (what the verdict reads).
    pub(super) fn write_ctl(&self, dir: Dir, ctl: &SockCtl) -> Result<(), Fault> {
        self.eng.kernel.ctl.put(self.cookie[dir.src() as usize], ctl, BPF_ANY).map_err(Fault::Internal)
    }

    /// Moves `dir` to its end (the Session's `run`).
    async fn run_dir(&self, dir: Dir) -> Result<(), Fault> {
        if self.maps.in_fwd[dir as usize].load(Ordering::Relaxed) {
            self.forward(dir).await?;
            log::debug!("conn={} sockmap: {dir:?} source EOF; draining", self.id);
            self.drain(dir).await?;
        } else {
            self.eng.counters.copy_directions.fetch_add(1, Ordering::Relaxed);
            self.copy(dir).await?;
        }
        self.eng.budget.release(self.maps.reserved[dir as usize].swap(0, Ordering::Relaxed));
        if self.eng.breaks.no_fin {
            return std::future::pending().await;
        }
        shutdown_write(self.fd(dir.dst())).map_err(Fault::on(dir.dst()))
    }
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
            kernel + self.dirs[dir as usize].copied.load(Ordering::Relaxed)
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
        &self.socks[side as usize]
    }

    /// Both directions idle in the kernel path: each went idle at the redirected total it
    /// still shows, holds no budget, and every byte the verdict passed was written.
    fn parkable(&self) -> bool {
        [Dir::Up, Dir::Down].into_iter().all(|dir| {
            let d = &self.dirs[dir as usize];
            let idle_at = d.idle_at.load(Ordering::Relaxed);
            idle_at != NOT_IDLE
                && self.maps.in_fwd[dir as usize].load(Ordering::Relaxed)
                && self.maps.reserved[dir as usize].load(Ordering::Relaxed) == 0
                && self
                    .stats(dir.src())
                    .is_ok_and(|s| s.bytes == idle_at && s.passed == d.copied.load(Ordering::Relaxed))
        })
    }
}
