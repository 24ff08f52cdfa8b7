//! Data engines. Both implement the lifecycle contract of [`crate::lifecycle`]: the
//! connection module (`conn`) pairs the sockets, an engine moves the bytes until the
//! connection ends (or, splice engine, parks) and says how it ended.
//!
//! - `splice/`: userspace splice(2), a hand-written state machine per connection;
//! - `sockmap/`: the in-kernel redirect, run through [`driver::drive`];
//! - `driver.rs`: the async driver of the contract over a [`driver::Session`].

pub mod driver;
pub mod sockmap;
pub mod splice;

use std::{
    future::Future,
    sync::{Arc, Mutex},
};

use tokio::net::TcpStream;
use tokio_util::either::Either;

use self::sockmap::kernels;
use crate::{
    config::{EngineChoice, file::Global},
    lifecycle::{EngineKind, Outcome, Progress, RelayCtl, Relayed},
    metrics::{Fallback, Metrics},
};

/// The engine a proxy run uses for all its connections.
pub enum Engine {
    /// Userspace splice(2).
    Splice(splice::SpliceEngine),
    /// In-kernel sockmap redirect.
    Sockmap(Arc<sockmap::SockmapEngine>),
}

/// Why `--engine auto` runs splice(2) in this release, even where the eBPF programs load:
/// on the edge workload (`cargo xtask bench --edge`: paced streams, kept-alive
/// request/response, connection churn) the splice engine used less host CPU per unit of work
/// than the sockmap engine on every class. The figures are in docs/performance.md ("Edge
/// workload") and docs/sockmap.md ("Status: opt-in, and why"); they change with kernels and
/// releases, so they are not repeated here.
pub const AUTO_REASON: &str = "auto: splice(2): on the edge workload (paced streams, kept-alive request/response, \
     connection churn) it used less host CPU per unit of work than the sockmap engine on every class \
     (docs/performance.md, \"Edge workload\"); the sockmap engine's one lead, median latency of small exchanges, \
     is chosen per route with engine = \"sockmap\"";

/// [`AUTO_REASON`] with the kernel's verdict on the known sockmap defects.
pub fn auto_reason(kernel: &kernels::Assessment) -> String {
    format!("{AUTO_REASON}; {}", kernel.summary())
}

/// An engine choice that cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// The eBPF programs did not load, or the self-test failed.
    #[error(
        "the sockmap engine was requested (--engine sockmap, or engine = \"sockmap\") but the eBPF engine is \
         unavailable: {reason}. Run as root (or with CAP_BPF and CAP_NET_ADMIN) on a kernel with sockmap support, \
         check the host with `ntlm-splice doctor`, or use the splice engine"
    )]
    Load {
        /// Why sockmap cannot be used here.
        reason: String,
    },
    /// The kernel has a known sockmap defect that the engine meets. The refusal is the
    /// message, not a source: a chain printed with `{:#}` would repeat it.
    #[error("the sockmap engine was requested (--engine sockmap, or engine = \"sockmap\") but {0}")]
    Kernel(Box<kernels::Refusal>),
}

/// The engines of a running server, made when a route first asks for one: every route
/// that uses an engine shares it (one pipe pool, one set of loaded eBPF programs).
pub struct Engines {
    /// Process-wide engine settings (pipe size, the sockmap engine's limits).
    global: Global,
    splice: Arc<Engine>,
    /// Loaded on first use; a failed load is not cached (a later reload may try again).
    sockmap: Mutex<Option<Arc<Engine>>>,
    /// Set once the process gave up the privileges that loading the sockmap engine needs
    /// ([`crate::privilege`]): why a later request for it is refused.
    sealed: std::sync::OnceLock<String>,
    /// Where fallbacks are counted and the sockmap engine's counters exported.
    metrics: Arc<Metrics>,
    /// The running kernel's verdict on the known sockmap defects (read once: the kernel
    /// does not change under a running process).
    kernel: kernels::Assessment,
}

impl Engines {
    /// The splice engine, ready; the sockmap engine is loaded when a route asks for it.
    pub fn new(global: &Global, metrics: &Arc<Metrics>) -> Engines {
        Self::with_host(global, metrics, &kernels::Host::read())
    }

    /// [`Engines::new`] judging the kernel described by `host`.
    pub(crate) fn with_host(global: &Global, metrics: &Arc<Metrics>, host: &kernels::Host) -> Engines {
        let splice = Arc::new(Engine::Splice(splice::SpliceEngine::new(global.pipe_size)));
        let kernel = kernels::assess(host);
        Engines {
            global: global.clone(),
            splice,
            sockmap: Mutex::new(None),
            sealed: std::sync::OnceLock::new(),
            metrics: metrics.clone(),
            kernel,
        }
    }

    /// Whether the sockmap engine is loaded (its programs attached, its maps held).
    pub fn sockmap_loaded(&self) -> bool {
        self.sockmap.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Records that the process can no longer load eBPF programs (`why`, with the fix): a
    /// later request for the sockmap engine is refused with it instead of failing in the
    /// kernel. The pipe budgets are computed again for the process's new user.
    pub fn privileges_dropped(&self, why: String) {
        let _first = self.sealed.set(why);
        let sockmap = self.sockmap.lock().unwrap_or_else(|e| e.into_inner());
        for e in std::iter::once(&self.splice).chain(sockmap.as_ref()) {
            match &**e {
                Engine::Splice(s) => s.refresh_pipe_budget(),
                Engine::Sockmap(s) => s.fallback().refresh_pipe_budget(),
            }
        }
    }

    /// Refuses the sockmap engine on a kernel with a known defect that it meets, unless
    /// `sockmap_allow_affected_kernel` is set; logs what is not known.
    fn check_kernel(&self) -> Result<(), Unavailable> {
        let parser = sockmap::parser_requested();
        if let Some(r) = self.kernel.refusal(parser) {
            if !self.global.sockmap_allow_affected_kernel {
                return Err(Unavailable::Kernel(Box::new(r)));
            }
            log::warn!(
                "sockmap: running on a kernel with a known defect because sockmap_allow_affected_kernel is set: {r}"
            );
        }
        for w in self.kernel.unknowns(parser) {
            log::warn!("{w}; the engine runs (`ntlm-splice doctor` lists every verdict)");
        }
        Ok(())
    }

    /// The engine for `choice`, with the reason for the log line.
    pub fn get(&self, choice: EngineChoice) -> Result<(Arc<Engine>, String), Unavailable> {
        match choice {
            EngineChoice::Splice => Ok((self.splice.clone(), "requested with engine splice".into())),
            EngineChoice::Auto => {
                self.metrics.fell_back(Fallback::AutoOptIn);
                Ok((self.splice.clone(), auto_reason(&self.kernel)))
            }
            EngineChoice::Sockmap => {
                let mut loaded = self.sockmap.lock().unwrap_or_else(|e| e.into_inner());
                let reason = format!("requested with engine sockmap; self-test passed; {}", self.kernel.summary());
                if let Some(e) = &*loaded {
                    return Ok((e.clone(), reason));
                }
                if let Some(why) = self.sealed.get() {
                    return Err(Unavailable::Load { reason: why.clone() });
                }
                self.check_kernel()?;
                let e = sockmap::SockmapEngine::load(&self.global)
                    .map_err(|e| Unavailable::Load { reason: format!("{e:#}") })?;
                let e = Arc::new(e);
                self.metrics.sockmap_loaded(&e);
                let e = Arc::new(Engine::Sockmap(e));
                *loaded = Some(e.clone());
                Ok((e, reason))
            }
        }
    }
}

impl Engine {
    /// Which engine this is (the log's `engine=`).
    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Splice(_) => EngineKind::Splice,
            Engine::Sockmap(_) => EngineKind::Sockmap,
        }
    }

    /// Moves bytes between the paired sockets until the connection ends, or parks it.
    ///
    /// The sockmap future is boxed: it is several KiB, and unboxed it would set the size of
    /// every connection task, splice ones included (an idle connection's memory is mostly its
    /// task). Not an `async fn`, whose by-value arguments would be stored a second time.
    ///
    /// Both engines park (`ctl.park_after`) and go on from `progress` (bytes moved before:
    /// by the NTLM observer, or before parking), which the connection's byte counts include;
    /// `kept` is what the engine kept of a parked connection ([`Relayed::Parked`]).
    pub fn relay<'a>(
        &'a self,
        id: u64,
        client: TcpStream,
        backend: TcpStream,
        ctl: &'a RelayCtl,
        progress: Progress,
        kept: Option<Kept>,
    ) -> impl Future<Output = Relayed> + Send + 'a {
        match self {
            Engine::Splice(e) => Either::Left(e.relay(id, client, backend, ctl, progress)),
            Engine::Sockmap(e) => {
                Either::Right(Box::pin(e.relay(id, client, backend, ctl, progress, kept.map(|k| k.0))))
            }
        }
    }
}

/// What an engine keeps of a parked connection besides its sockets (sockmap engine: its map
/// entries, which stay in the maps while it is parked, so the kernel keeps forwarding).
pub struct Kept(Box<sockmap::Kept>);

impl Kept {
    /// Called once the connection is parked under `key`: from now on a byte the kernel
    /// forwards for it rings `bell` with `key` (and at once if one did since it parked).
    pub fn parked(&mut self, bell: &Arc<crate::park::Bell>, key: u64) {
        self.0.parked(bell, key);
    }
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kept(sockmap)")
    }
}

/// Runs a session through the lifecycle's driver and collects its outcome; `None`: it is
/// to park (`ctl.park_after`).
pub(crate) async fn run_session<S: driver::Session>(s: &S, ctl: &RelayCtl, engine: EngineKind) -> Option<Outcome> {
    let (end, fault) = driver::drive(s, ctl).await?;
    let (bytes_up, bytes_down) = s.bytes();
    Some(Outcome { bytes_up, bytes_down, end, fault, engine })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engines(release: &str, allow: bool) -> Engines {
        let global = Global { sockmap_allow_affected_kernel: allow, ..Global::default() };
        let host = kernels::Host { release: release.into(), ..kernels::Host::default() };
        Engines::with_host(&global, &Arc::new(Metrics::new()), &host)
    }

    /// On a kernel with the duplicate-transmission bug the sockmap engine is refused before
    /// anything is loaded, with the defect, the releases with the fix and the switch named.
    #[test]
    fn an_affected_kernel_refuses_the_sockmap_engine_unless_forced() {
        let Err(e) = engines("6.8.12", false).get(EngineChoice::Sockmap) else { panic!("6.8.12 was not refused") };
        assert!(matches!(e, Unavailable::Kernel(_)), "{e}");
        let text = e.to_string();
        for part in ["--engine sockmap", "6.8.12", "dup_tx", "3b4f14b79428", "6.16+", "sockmap_allow_affected_kernel"] {
            assert!(text.contains(part), "{part:?} missing from: {text}");
        }
        // Forced, the kernel check passes: what is left is loading (refused here without root
        // or without the eBPF object, accepted with both).
        match engines("6.8.12", true).get(EngineChoice::Sockmap) {
            Err(Unavailable::Kernel(r)) => panic!("forced, still refused: {r}"),
            Err(Unavailable::Load { .. }) | Ok(_) => {}
        }
        // A fixed kernel is not refused for its kernel; splice never is.
        assert!(!matches!(engines("6.12.34", false).get(EngineChoice::Sockmap), Err(Unavailable::Kernel(_))));
        assert!(engines("6.8.12", false).get(EngineChoice::Splice).is_ok());
    }

    #[test]
    fn auto_states_the_kernel_verdict() {
        let (e, why) = engines("6.8.12", false).get(EngineChoice::Auto).unwrap();
        assert_eq!(e.kind(), EngineKind::Splice);
        assert!(why.starts_with(AUTO_REASON), "{why}");
        let verdict =
            "kernel 6.8.12: known sockmap defects: dup_tx affected, copied_seq affected, fionread not_affected";
        assert!(why.ends_with(verdict), "{why}");
    }
}
