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

/// Why `--engine auto` runs splice(2) in this release, even where the eBPF programs load.
/// The measurements behind it are in docs/sockmap.md, "Status: opt-in, and why" (they change with kernels
/// and releases, so they are not repeated here).
pub const AUTO_REASON: &str = "auto: splice(2); the sockmap engine is opt-in (--engine sockmap) in this release: \
     docs/sockmap.md (\"Status: opt-in, and why\") has the measurements behind this choice";

/// An engine choice that cannot be honoured.
#[derive(Debug, thiserror::Error)]
#[error(
    "the sockmap engine was requested (--engine sockmap, or engine = \"sockmap\") but the eBPF engine is \
     unavailable: {reason}. Run as root (or with CAP_BPF and CAP_NET_ADMIN) on a kernel with sockmap support, \
     check the host with `ntlm-splice doctor`, or use the splice engine"
)]
pub struct Unavailable {
    /// Why sockmap cannot be used here.
    pub reason: String,
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
}

impl Engines {
    /// The splice engine, ready; the sockmap engine is loaded when a route asks for it.
    pub fn new(global: &Global, metrics: &Arc<Metrics>) -> Engines {
        let splice = Arc::new(Engine::Splice(splice::SpliceEngine::new(global.pipe_size)));
        Engines {
            global: global.clone(),
            splice,
            sockmap: Mutex::new(None),
            sealed: std::sync::OnceLock::new(),
            metrics: metrics.clone(),
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

    /// The engine for `choice`, with the reason for the log line.
    pub fn get(&self, choice: EngineChoice) -> Result<(Arc<Engine>, String), Unavailable> {
        match choice {
            EngineChoice::Splice => Ok((self.splice.clone(), "requested with engine splice".into())),
            EngineChoice::Auto => {
                self.metrics.fell_back(Fallback::AutoOptIn);
                Ok((self.splice.clone(), AUTO_REASON.into()))
            }
            EngineChoice::Sockmap => {
                let mut loaded = self.sockmap.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(e) = &*loaded {
                    return Ok((e.clone(), "requested with engine sockmap; self-test passed".into()));
                }
                if let Some(why) = self.sealed.get() {
                    return Err(Unavailable { reason: why.clone() });
                }
                let e = sockmap::SockmapEngine::load(&self.global).map_err(|e| Unavailable { reason: format!("{e:#}") })?;
                let e = Arc::new(e);
                self.metrics.sockmap_loaded(&e);
                let e = Arc::new(Engine::Sockmap(e));
                *loaded = Some(e.clone());
                Ok((e, "requested with engine sockmap; self-test passed".into()))
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

    /// Moves bytes between the paired sockets until the connection ends.
    ///
    /// The sockmap future is boxed: it is several KiB, and unboxed it would set the size of
    /// every connection task, splice ones included (an idle connection's memory is mostly its
    /// task). Not an `async fn`, whose by-value arguments would be stored a second time.
    ///
    /// Only the splice engine parks (`ctl.park_after`). Both go on from `progress` (bytes
    /// moved before: by the NTLM observer, or before parking), which the connection's byte
    /// counts include.
    pub fn relay<'a>(
        &'a self,
        id: u64,
        client: TcpStream,
        backend: TcpStream,
        ctl: &'a RelayCtl,
        progress: Progress,
    ) -> impl Future<Output = Relayed> + Send + 'a {
        match self {
            Engine::Splice(e) => Either::Left(e.relay(id, client, backend, ctl, progress)),
            Engine::Sockmap(e) => {
                Either::Right(Box::pin(async move {
                    let mut o = e.relay(id, client, backend, ctl).await;
                    // Its counters start at zero with the pair in the map.
                    o.bytes_up += progress.bytes[0];
                    o.bytes_down += progress.bytes[1];
                    Relayed::Ended(o)
                }))
            }
        }
    }

    /// Whether this engine can park idle connections.
    pub fn parks(&self) -> bool {
        matches!(self, Engine::Splice(_))
    }
}

/// Runs a session through the lifecycle's driver and collects its outcome.
pub(crate) async fn run_session<S: driver::Session>(s: &S, ctl: &RelayCtl, engine: EngineKind) -> Outcome {
    let (end, fault) = driver::drive(s, ctl).await;
    let (bytes_up, bytes_down) = s.bytes();
    Outcome { bytes_up, bytes_down, end, fault, engine }
}
