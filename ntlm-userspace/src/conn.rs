//! The lifecycle of one client connection: pick a backend, connect (failing over in
//! balancer order), hand the pair to the engine, and write one access-log line.
//!
//! The backend socket is created here for this client alone and closed when the engine
//! returns: it is never pooled, reused or shared. That is the security property the
//! project exists for (NTLM and Negotiate authenticate the TCP connection).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use crate::{
    balance::{BackendLease, Balancer},
    config::Config,
    engine::{Engine, Outcome},
    relay::{End, RelayCtl},
};

/// Everything a connection task needs, shared by all of them.
pub struct Shared {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Backend selection.
    pub balancer: Balancer,
    /// The data engine.
    pub engine: Arc<Engine>,
    /// Timeouts and the forced-close signal.
    pub ctl: RelayCtl,
}

/// Serves one accepted client connection to its end.
pub async fn serve(shared: &Shared, id: u64, client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let connected = tokio::select! {
        c = connect_backend(shared, id, peer) => c,
        () = shared.ctl.force_close.cancelled() => None,
    };
    let Some((backend, backend_addr, _lease)) = connected else {
        // Dropping the client closes it at once: no backend would take it.
        access_log(id, peer, None, shared.engine.name(), &Outcome {
            bytes_up: 0,
            bytes_down: 0,
            end: End::ConnectFailed,
            fault: None,
            engine: shared.engine.name(),
        }, started.elapsed());
        return;
    };
    if let Err(e) = client.set_nodelay(true).and_then(|()| backend.set_nodelay(true)) {
        log::debug!("conn={id} TCP_NODELAY: {e}");
    }
    let outcome = shared.engine.relay(id, client, backend, &shared.ctl).await;
    access_log(id, peer, Some(backend_addr), outcome.engine, &outcome, started.elapsed());
}

async fn connect_backend(
    shared: &Shared,
    id: u64,
    peer: SocketAddr,
) -> Option<(TcpStream, SocketAddr, BackendLease)> {
    let timeout = shared.config.connect_timeout;
    for (index, addr) in shared.balancer.order(peer) {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Some((s, addr, shared.balancer.lease(index))),
            Ok(Err(e)) => log::warn!("conn={id} backend={addr} connect failed: {e}; trying the next backend"),
            Err(_) => log::warn!(
                "conn={id} backend={addr} connect timed out after {}; trying the next backend",
                humantime::format_duration(timeout)
            ),
        }
    }
    None
}

fn access_log(
    id: u64,
    client: SocketAddr,
    backend: Option<SocketAddr>,
    engine: &str,
    o: &Outcome,
    elapsed: Duration,
) {
    let backend = backend.map_or_else(|| "-".to_string(), |b| b.to_string());
    let error = match &o.fault {
        Some(f) => format!(" error=\"{}\"", f.to_string().replace('"', "'")),
        None => String::new(),
    };
    log::info!(
        target: "access",
        "conn={id} client={client} backend={backend} engine={engine} bytes_up={} bytes_down={} duration_ms={} end={}{error}",
        o.bytes_up,
        o.bytes_down,
        elapsed.as_millis(),
        o.end.as_str(),
    );
}
