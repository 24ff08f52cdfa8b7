//! In-kernel engine: both sockets of a connection go into BPF sockhashes and an `sk_skb`
//! stream verdict program redirects what arrives on one socket to the egress of the other.
//! Userspace never reads a payload byte; it only sets the pair up, watches for EOF, keeps
//! the kernel's in-flight bytes bounded and passes the FIN on once everything was delivered.
//!
//! ```text
//!   client ──TCP──▶ [client sock] ──verdict: redirect──▶ [backend sock] ──TCP──▶ backend
//!   client ◀──TCP── [client sock] ◀──redirect: verdict── [backend sock] ◀──TCP── backend
//!
//!   FWD  (verdict attached): cookie(C) → C, cookie(B) → B      "forward what arrives here"
//!   PEER (nothing attached): cookie(C) → B, cookie(B) → C      "where it goes"
//!   STATS: cookie → bytes/segments redirected, drops, last time   (kernel writes)
//!   CTL:   cookie → wake_at threshold for the next event          (userspace writes)
//! ```
//!
//! The traps this handles (numbers from `shared/notes/sockmap-facts.md`), each in `session`
//! or the file beside it that `session` names for it:
//!
//! 1. FIN is not forwarded: each direction waits for its source's EOF (a peek that returns
//!    0: the verdict consumes data, so only EOF or an error wakes it) and then calls
//!    `shutdown(SHUT_WR)` on the destination.
//! 2. The FIN must wait for the redirect backlog: before the shutdown the direction waits
//!    until the destination's TCP has taken every byte that arrived on the source
//!    (`acked + SIOCOUTQ` of the destination against `bytes_received` of the source).
//! 3. No memory bound in the kernel: past a per-connection cap (and a global one), the source
//!    socket is taken out of FWD (its PEER link keeps what was already redirected to it), its
//!    bytes stay in its TCP receive queue and TCP flow control stops the sender; once the
//!    destination drained below half the cap it goes back in. Event driven: the verdict
//!    emits a ring-buffer event when a threshold set by userspace is crossed.
//! 4. Bytes that arrived before insertion (or during a pause) are kicked through with
//!    `SO_RCVLOWAT`, whose handler runs the socket's `sk_data_ready` (the verdict).
//! 5. A verdict without a peer drops data: both PEER entries go in before either FWD entry.
//! 6. The verdict sees a zero-length buffer on FIN: counted and dropped (passing it breaks
//!    the pipe when the socket also carries bytes the other way), never redirected.
//! 7. Side maps do not clean themselves: every entry is deleted when the connection ends.
//! 8. A socket that already received a FIN cannot be inserted (EOPNOTSUPP): that direction
//!    is copied in userspace (read/write, never splice(2) on a socket in a map), or the whole
//!    connection goes to the splice engine if it never entered a map.
//! 9. Drain condition: as in 2, with the FIN counted once.
//! 10. aya-log is not used by the programs, so there is no logger whose map could go away.

mod btf;
mod budget;
mod counters;
mod dispatch;
mod duplicates;
mod entries;
mod flow;
mod kernel;
pub mod kernels;
mod lane;
mod selftest;
mod session;
mod sock;
#[cfg(test)]
mod tests;

pub(crate) use counters::Counters;
pub use counters::{COUNTERS, KINDS, Kind, Snapshot};
pub use kernel::ERROR_NAMES;
pub use selftest::FionreadProbe;
pub(crate) use session::Kept;

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ntlm_common::LINEARIZE_MAX;
use tokio::net::TcpStream;

use super::splice::SpliceEngine;
use crate::{
    config::file::Global,
    lifecycle::{Progress, RelayCtl, Relayed},
};

/// Environment variable (test hook) naming trap fixes to switch off, comma separated, to
/// prove that a test catches the trap: `kick`, `drain`, `fin`, `order`, `backpressure`,
/// `cleanup`, `overlap`, `softpause`, and `linearize` (buffers are redirected as they are:
/// more, smaller packets; for measurements). Never set it in production: each of the others
/// loses data, hangs or leaks.
pub const BREAK_ENV: &str = "NTLM_SPLICE_SOCKMAP_BREAK";
/// Environment variable: `1` also attaches the stream parser program (measurement only; see
/// `flow` for why the engine runs without one).
pub const PARSER_ENV: &str = "NTLM_SPLICE_SOCKMAP_PARSER";

/// Whether [`PARSER_ENV`] asks for the stream parser (which meets kernel defects the
/// engine alone does not: [`kernels::Use::WithParser`]).
pub fn parser_requested() -> bool {
    std::env::var(PARSER_ENV).is_ok_and(|v| v == "1")
}

/// Trap fixes that [`BREAK_ENV`] can switch off.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Breaks {
    /// Skip the SO_RCVLOWAT kick after insertion and resume (trap 4).
    pub(crate) no_kick: bool,
    /// Shut the destination down right at EOF, without waiting for the backlog (trap 2).
    pub(crate) no_drain: bool,
    /// Never pass the FIN on (trap 1).
    pub(crate) no_fin: bool,
    /// Insert FWD entries before PEER entries (trap 5).
    pub(crate) fwd_first: bool,
    /// Never pause a source, and no in-flight limit in the verdict either (trap 3).
    pub(crate) no_backpressure: bool,
    /// Userspace never pauses a source; only the verdict's own limit (`SockCtl::stop_at`)
    /// holds the cap. Shows that the kernel enforces it without userspace reacting.
    pub(crate) no_soft_pause: bool,
    /// Leave STATS/CTL entries behind (trap 7).
    pub(crate) no_cleanup: bool,
    /// Load the verdict with its retransmit overlap guard off.
    pub(crate) no_overlap_guard: bool,
    /// Redirect buffers as they are, without making them linear first (a cost, not a trap:
    /// the destination then sends one packet per page fragment).
    pub(crate) no_linearize: bool,
    /// Fault injection, not a trap fix: step `n` (> 0) of every overlap cut fails as if the
    /// kernel could not allocate (`SeqGuard::test_cut_fail_step`).
    pub(crate) cut_fail_step: u32,
}

impl Breaks {
    fn from_env() -> Breaks {
        let mut b = Breaks::default();
        let Ok(v) = std::env::var(BREAK_ENV) else { return b };
        for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "kick" => b.no_kick = true,
                "drain" => b.no_drain = true,
                "fin" => b.no_fin = true,
                "order" => b.fwd_first = true,
                "backpressure" => b.no_backpressure = true,
                "softpause" => b.no_soft_pause = true,
                "cleanup" => b.no_cleanup = true,
                "overlap" => b.no_overlap_guard = true,
                "linearize" => b.no_linearize = true,
                other => log::warn!("{BREAK_ENV}: unknown name {other:?} ignored"),
            }
        }
        log::warn!("{BREAK_ENV}={v}: trap fixes switched OFF for testing ({b:?}); this loses data");
        b
    }
}

/// What the engine shares with its connections.
pub(crate) struct Inner {
    pub(crate) kernel: kernel::Kernel,
    pub(crate) registry: Arc<dispatch::Registry>,
    pub(crate) budget: budget::Budget,
    pub(crate) max_inflight: u64,
    /// SO_SNDBUF (as the kernel reports it) for both sockets; 0: leave autotuning on.
    pub(crate) sndbuf: u64,
    /// Set once a socket got a smaller send buffer than asked, so that it is logged once.
    pub(crate) sndbuf_short: std::sync::atomic::AtomicBool,
    pub(crate) counters: Counters,
    pub(crate) breaks: Breaks,
    pub(crate) splice: SpliceEngine,
    // Declared last: stops the event thread before the maps go.
    _dispatcher: dispatch::Dispatcher,
}

/// The sockmap engine: the loaded programs, their maps and the event thread.
pub struct SockmapEngine {
    inner: Arc<Inner>,
    /// The FIONREAD probe run at load, or why it could not run.
    fionread: Result<FionreadProbe, String>,
}

impl SockmapEngine {
    /// Loads and attaches the eBPF programs, starts the event thread and runs the start-up
    /// self-test (a loopback connection spliced through the maps). Any failure comes back as
    /// an error saying why, so that `--engine auto` can fall back to splice.
    pub fn load(global: &Global) -> anyhow::Result<SockmapEngine> {
        let started = Instant::now();
        let inner = Self::load_untested(global)?;
        let loaded = started.elapsed();
        let test_time = selftest::run(&inner).context("sockmap self-test failed")?;
        log::info!(
            "sockmap: programs loaded and attached in {} ms, self-test passed in {} ms",
            loaded.as_millis(),
            test_time.as_millis()
        );
        if let Some(why) = &inner.kernel.guard_off {
            log::warn!(
                "sockmap: retransmit overlap guard off ({why}): a retransmitted segment that overlaps bytes \
                 already forwarded makes the engine reset that connection instead of forwarding it once"
            );
        }
        // The engine reads FIONREAD only before a socket enters a map, so a broken FIONREAD
        // is reported, never a reason to fail.
        let fionread = selftest::fionread_probe(&inner).map_err(|e| format!("{e:#}"));
        match &fionread {
            Ok(p) if p.broken() => log::warn!(
                "sockmap: kernel defect fionread present ({p}); the engine does not use FIONREAD on mapped sockets"
            ),
            Ok(p) => log::debug!("sockmap: FIONREAD probe {p}"),
            Err(e) => log::warn!("sockmap: FIONREAD probe could not run: {e}"),
        }
        Ok(SockmapEngine { inner, fionread })
    }

    /// Loads, attaches and starts the event thread; no self-test.
    fn load_untested(global: &Global) -> anyhow::Result<Arc<Inner>> {
        Self::load_with(global, Breaks::from_env())
    }

    /// [`Self::load_untested`] with the given trap fixes switched off.
    fn load_with(global: &Global, breaks: Breaks) -> anyhow::Result<Arc<Inner>> {
        let with_parser = parser_requested();
        let linearize = if breaks.no_linearize { 0 } else { LINEARIZE_MAX };
        let kernel::Loaded { kernel, events } =
            kernel::Kernel::load(with_parser, !breaks.no_overlap_guard, breaks.cut_fail_step, linearize)?;
        let registry = Arc::new(dispatch::Registry::default());
        let dispatcher = dispatch::Dispatcher::start(events, Arc::clone(&registry))
            .context("cannot start the sockmap event thread")?;
        let inner = Arc::new(Inner {
            kernel,
            registry,
            budget: budget::Budget::new(global.max_inflight_total),
            max_inflight: global.max_inflight,
            sndbuf: global.sockmap_sndbuf,
            sndbuf_short: Default::default(),
            counters: Counters::default(),
            breaks,
            splice: SpliceEngine::new(global.pipe_size),
            _dispatcher: dispatcher,
        });
        if with_parser {
            log::warn!(
                "sockmap: {PARSER_ENV}=1: stream parser attached (measurement only: pausing is not safe with it)"
            );
        }
        Ok(inner)
    }

    /// Relays one connection: in the kernel where it can, in userspace where it must; with
    /// `ctl.park_after`, parks it once idle (keeping it in the maps). `progress`: bytes moved
    /// before; `kept`: what it kept if it comes back from the parker.
    pub(crate) async fn relay(
        &self,
        id: u64,
        client: TcpStream,
        backend: TcpStream,
        ctl: &RelayCtl,
        progress: Progress,
        kept: Option<Box<Kept>>,
    ) -> Relayed {
        session::relay_or_park(&self.inner, id, client, backend, ctl, progress, kept).await
    }

    /// The splice engine it falls back to for connections the kernel cannot take.
    pub fn fallback(&self) -> &SpliceEngine {
        &self.inner.splice
    }

    /// The FIONREAD probe run at load (the `fionread` kernel defect, measured), or why it
    /// could not run.
    pub fn fionread_probe(&self) -> Result<FionreadProbe, &str> {
        self.fionread.as_ref().copied().map_err(String::as_str)
    }

    /// The engine's maps and counters now.
    pub fn snapshot(&self) -> Snapshot {
        snapshot(&self.inner)
    }

    /// Every counter now: (name, help, value), in [`COUNTERS`] order. Reads only the
    /// counters (no map walk), for metrics.
    pub fn counters(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + use<> {
        counters::named(self.inner.counters.values())
    }

    /// The kernel's error counters now (BPF helper failures the programs counted), each with
    /// its name ([`ERROR_NAMES`]); reads one per-CPU map, for metrics.
    pub fn kernel_errors(&self) -> impl Iterator<Item = (&'static str, u64)> + use<> {
        ERROR_NAMES.into_iter().zip(self.inner.kernel.errors())
    }
}

pub(crate) fn snapshot(inner: &Inner) -> Snapshot {
    let k = &inner.kernel;
    let n = |m: kernel::RawMap| m.len().unwrap_or(usize::MAX);
    Snapshot {
        fwd: n(k.fwd),
        peer: n(k.peer),
        stats: n(k.stats),
        ctl: n(k.ctl),
        waiters: inner.registry.len(),
        reserved: inner.budget.reserved(),
        kernel_errors: k.errors().to_vec(),
        events: inner.registry.events.load(Ordering::Relaxed),
        guard_off: k.guard_off.clone(),
        ..Snapshot::default()
    }
    .with_counters(&inner.counters)
}

/// Whether this binary carries the eBPF object, and if not, why (for `doctor`).
pub fn embedded_object() -> Result<usize, &'static str> {
    match kernel::UNAVAILABLE {
        Some(reason) => Err(reason),
        None => Ok(kernel::object_len()),
    }
}

/// How long the start-up self-test may take before the engine is declared unusable.
pub const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(5);
