//! The connections of an upgrade: the old process sends each with its identity
//! ([`send_conn`]); the new one relays each as the same connection ([`take_over`]).

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd as _, OwnedFd},
    sync::Arc,
    time::Duration,
};

use tokio::sync::Semaphore;

use super::{
    Link,
    wire::{ConnState, Msg},
};
use crate::{
    conn::{self, ConnMeta, Lifecycle, Waiting},
    lifecycle::Progress,
    park,
    route::{Backend, Lease, Route},
};

/// How often a failed new process is looked at while it is given time to exit.
const EXIT_POLL: Duration = Duration::from_millis(50);
/// How many times (one [`EXIT_POLL`] apart) before it is killed.
const EXIT_POLLS: u32 = 10;

/// Sends one parked connection to the new process (its sockets, identity and counters);
/// the caller drops it after: its sockets close here, no log line is written here.
pub async fn send_conn(link: &Link, conn: &park::Parked<Waiting>) -> io::Result<()> {
    let m = &conn.meta.meta;
    let state = ConnState {
        id: m.id,
        client: m.client,
        via: m.via.as_deref().copied(),
        age: m.started.elapsed(),
        route: m.route.name().to_string(),
        backend: m.lease.backend().addr,
        bytes: conn.progress.bytes,
        last_ns: conn.progress.last_ns,
        ntlm: m.ntlm.as_deref().cloned(),
    };
    link.send(&Msg::Conn(Box::new(state)), &[conn.socks[0].as_fd(), conn.socks[1].as_fd()]).await
}

/// Kills the new process of a failed upgrade if it still runs, and reaps it: how it ended.
pub async fn stop_child(mut child: std::process::Child) -> String {
    if let Ok(Some(status)) = child.try_wait() {
        return status.to_string();
    }
    // Given a moment to exit by itself (it may have closed the link as it exited).
    for _ in 0..EXIT_POLLS {
        tokio::time::sleep(EXIT_POLL).await;
        if let Ok(Some(status)) = child.try_wait() {
            return status.to_string();
        }
    }
    if let Err(e) = child.kill() {
        return format!("cannot kill it: {e}");
    }
    match tokio::task::spawn_blocking(move || child.wait()).await {
        Ok(Ok(status)) => format!("killed: {status}"),
        _ => "killed".to_string(),
    }
}

/// The new process's side of an upgrade: relays every connection the old process hands
/// over, on its route here (by name; else one with its backend; else any, saying so).
pub async fn take_over(link: Link, routes: HashMap<String, Arc<Route>>, lc: Arc<Lifecycle>, slots: Arc<Semaphore>) {
    let mut took = 0usize;
    loop {
        match link.recv().await {
            Ok(Some((Msg::Conn(c), fds))) => match <[OwnedFd; 2]>::try_from(fds) {
                Ok(socks) => {
                    adopt(*c, socks, &routes, &lc, &slots);
                    took += 1;
                }
                Err(fds) => log::error!("upgrade: a connection came with {} descriptors instead of 2", fds.len()),
            },
            Ok(Some((Msg::Done, _))) | Ok(None) => break,
            Ok(Some((m, _))) => log::warn!("upgrade: unexpected message {m:?} from the old process"),
            Err(e) => {
                log::error!("upgrade: reading from the old process: {e}");
                break;
            }
        }
    }
    log::info!("upgrade: took over moved={took} connections from the old process");
}

/// Relays one handed-over connection here, as the same connection (id, start, counters,
/// identity): its access-log line is written here when it ends.
fn adopt(
    c: ConnState,
    socks: [OwnedFd; 2],
    routes: &HashMap<String, Arc<Route>>,
    lc: &Arc<Lifecycle>,
    slots: &Arc<Semaphore>,
) {
    let route = routes.get(&c.route).cloned().or_else(|| {
        let r = routes.values().find(|r| r.backends.iter().any(|b| b.addr == c.backend)).cloned();
        let r = r.or_else(|| routes.values().min_by(|a, b| a.name().cmp(b.name())).cloned());
        if let Some(r) = &r {
            log::warn!(
                "conn={} route {:?} is gone in the new configuration; relayed on route {}",
                c.id,
                c.route,
                r.name()
            );
        }
        r
    });
    let Some(route) = route else {
        log::error!("conn={} no route to relay a handed-over connection on; closed", c.id);
        return;
    };
    let backend = match route.backends.iter().find(|b| b.addr == c.backend) {
        Some(b) => b.clone(),
        None => Backend::detached(route.name(), c.backend),
    };
    // A smaller max_connections than the old process had does not close it: it counts
    // outside the cap.
    let permit = slots
        .clone()
        .try_acquire_owned()
        .unwrap_or_else(|_| Arc::new(Semaphore::new(1)).try_acquire_owned().expect("a fresh semaphore has a permit"));
    let started = std::time::Instant::now().checked_sub(c.age).unwrap_or_else(std::time::Instant::now);
    let meta = ConnMeta {
        id: c.id,
        client: c.client,
        via: c.via.map(Box::new),
        started,
        lease: Lease::new(&backend),
        route,
        permit,
        ntlm: c.ntlm.map(Box::new),
    };
    meta.route.metrics.adopted();
    let progress = Progress { bytes: c.bytes, last_ns: c.last_ns };
    // Nothing of an engine comes along: the route's engine takes the sockets as new.
    lc.tracker.spawn(conn::resume(lc.clone(), meta, socks, progress, None));
}
