//! Listeners, the accept loops, the connection cap and graceful shutdown.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::Semaphore,
};
use tokio_util::{
    sync::CancellationToken,
    task::{AbortOnDropHandle, TaskTracker},
};

use crate::{
    balance::Balancer,
    config::Config,
    conn::{self, Lifecycle},
    engine::Engine,
    lifecycle::RelayCtl,
    park::{self, Parker},
};

/// Listen backlog: where clients wait while `--max-connections` are busy. The kernel clamps
/// it to `net.core.somaxconn` (4096 by default since Linux 5.4); 1,024 overflowed when 1,000
/// clients connected at once (TcpExtListenOverflows, then syncookies).
pub const LISTEN_BACKLOG: u32 = 4096;
/// First pause after accept fails for lack of descriptors or memory.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between accept retries.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// After the drain timeout, how long closed connections get to write their log lines.
const FORCE_CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Shortest period of [`timer_floor`]: below it the wake-ups would cost more than they save.
const TIMER_FLOOR_MIN: Duration = Duration::from_millis(50);

/// Binds every `--listen` address (SO_REUSEADDR, backlog [`LISTEN_BACKLOG`]).
///
/// TCP_NODELAY is set on the listener: Linux copies it to every accepted socket, which saves
/// one setsockopt(2) per connection.
pub fn bind(addrs: &[SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    addrs
        .iter()
        .map(|&addr| {
            let s = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
            s.set_reuseaddr(true)?;
            s.set_nodelay(true)?;
            s.bind(addr)?;
            s.listen(LISTEN_BACKLOG)
        })
        .zip(addrs)
        .map(|(r, addr)| {
            r.with_context(|| {
                format!(
                    "cannot listen on {addr}: is another process using the port? \
                     (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
                )
            })
        })
        .collect()
}

/// Serves clients on `listeners` until `shutdown` completes, then drains: stops accepting,
/// lets live connections finish for up to the drain timeout, closes the rest, returns.
pub async fn run(
    listeners: Vec<TcpListener>,
    config: Arc<Config>,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let force_close = CancellationToken::new();
    let stop_accept = CancellationToken::new();
    let conns = TaskTracker::new();
    let parker = match config.park_after {
        Some(_) if engine.parks() => match Parker::new(config.idle_timeout) {
            Ok(p) => Some(p),
            Err(e) => {
                log::warn!("cannot create the epoll instance for parked connections ({e}); idle connections stay in their tasks");
                None
            }
        },
        _ => None,
    };
    let lc = Arc::new(Lifecycle {
        balancer: Balancer::new(config.balance, config.backends.clone()),
        ctl: RelayCtl {
            idle_timeout: config.idle_timeout,
            force_close: force_close.clone(),
            park_after: config.park_after.filter(|_| parker.is_some()),
        },
        engine,
        config: config.clone(),
        tracker: conns.clone(),
        parker,
    });
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let next_id = Arc::new(AtomicU64::new(1));
    let _floor = AbortOnDropHandle::new(tokio::spawn(timer_floor(config.connect_timeout)));
    let _parker = AbortOnDropHandle::new(tokio::spawn({
        let lc = lc.clone();
        async move {
            if let Some(parker) = &lc.parker {
                park::run(parker, &lc, &lc.ctl.force_close).await;
            }
        }
    }));
    let mut acceptors = Vec::new();
    for listener in listeners {
        acceptors.push(tokio::spawn(accept_loop(
            listener,
            lc.clone(),
            slots.clone(),
            conns.clone(),
            next_id.clone(),
            stop_accept.clone(),
        )));
    }

    shutdown.await;
    stop_accept.cancel();
    for a in acceptors {
        // The accept loops own the listeners: once they return, the ports are closed.
        if let Err(e) = a.await {
            log::error!("accept loop failed: {e}");
        }
    }
    log::info!(
        "shutdown: stopped accepting; draining live={} connections (parked={}) for up to {}",
        conns.len(),
        lc.parker.as_ref().map_or(0, Parker::len),
        humantime::format_duration(config.drain_timeout)
    );
    conns.close();
    if tokio::time::timeout(config.drain_timeout, conns.wait()).await.is_err() {
        let live = conns.len();
        log::warn!("shutdown: drain timeout reached; closing live={live} connections");
        force_close.cancel();
        if tokio::time::timeout(FORCE_CLOSE_GRACE, conns.wait()).await.is_err() {
            log::error!("shutdown: connections did not close within {FORCE_CLOSE_GRACE:?}; exiting anyway");
        }
    }
    log::info!("shutdown: done");
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    lc: Arc<Lifecycle>,
    slots: Arc<Semaphore>,
    conns: TaskTracker,
    next_id: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        // Take a slot before accepting: at the cap, clients wait in the listen backlog.
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            p = slots.clone().acquire_owned() => p.expect("the connection semaphore is never closed"),
        };
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((client, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                conns.spawn(conn::serve(lc.clone(), id, client, peer, permit));
            }
            Err(e) if is_resource_exhaustion(&e) => {
                if backoff == ACCEPT_BACKOFF_MIN {
                    log::warn!("accept failed: {e}; backing off and retrying (raise the open-files limit or lower --max-connections)");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
            Err(e) => log::debug!("accept: {e}"),
        }
    }
}

/// Keeps a timer pending that always expires before a new connect timeout would.
///
/// tokio wakes its timer driver (an eventfd write, and a wake-up of whichever thread is parked
/// in epoll_wait, usually the other worker) whenever a new timer expires earlier than every
/// pending one. Each connection's connect timeout usually does: the other timers are idle
/// timeouts, an hour away. strace counted 0.64 of those writes per connection (1.67 writes
/// per connection, of which one is the access log). A timer that fires every half connect
/// timeout is always earlier, so a new connect timeout never wakes the driver; it costs one
/// wake-up per half connect timeout instead (2.5 s by default).
async fn timer_floor(connect_timeout: Duration) {
    let period = timer_floor_period(connect_timeout);
    loop {
        tokio::time::sleep(period).await;
    }
}

/// Half the connect timeout, at least [`TIMER_FLOOR_MIN`].
fn timer_floor_period(connect_timeout: Duration) -> Duration {
    (connect_timeout / 2).max(TIMER_FLOOR_MIN)
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor must expire before a connect timeout started at the same time, except where
    /// that would mean waking more often than every TIMER_FLOOR_MIN.
    #[test]
    fn timer_floor_is_earlier_than_a_connect_timeout() {
        for t in [Duration::from_millis(150), Duration::from_secs(5), Duration::from_secs(3600)] {
            assert!(timer_floor_period(t) < t, "{t:?}");
        }
        assert_eq!(timer_floor_period(Duration::from_millis(1)), TIMER_FLOOR_MIN);
    }

    /// conn.rs sets TCP_NODELAY on the backend socket only: accepted sockets inherit it from
    /// the listener.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let l = bind(&["127.0.0.1:0".parse().unwrap()]).unwrap().remove(0);
        let _c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (a, _) = l.accept().await.unwrap();
        assert!(a.nodelay().unwrap());
    }
}
