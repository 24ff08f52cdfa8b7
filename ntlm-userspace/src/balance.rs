//! Backend selection. The balancer only orders the candidates; the connection lifecycle
//! tries them in that order until one accepts, so every policy fails over the same way.

use std::{
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::config::Balance;

/// Picks backends for new client connections.
#[derive(Debug)]
pub struct Balancer {
    policy: Balance,
    backends: Vec<SocketAddr>,
    next: AtomicUsize,
    /// Live connections per backend (least-conn), indexed like `backends`.
    live: Arc<Vec<AtomicUsize>>,
}

/// Holds one live-connection count on a backend until dropped.
#[derive(Debug)]
pub struct BackendLease {
    // A thin Arc: the lease lives in every connection's task.
    live: Arc<Vec<AtomicUsize>>,
    index: usize,
}

impl BackendLease {
    /// The backend this lease counts on, as an index for [`Balancer::addr`].
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for BackendLease {
    fn drop(&mut self) {
        self.live[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// A balancer over `backends` (must not be empty; `Config` guarantees it).
    pub fn new(policy: Balance, backends: Vec<SocketAddr>) -> Self {
        assert!(!backends.is_empty(), "balancer needs at least one backend");
        let live = Arc::new(backends.iter().map(|_| AtomicUsize::new(0)).collect());
        Self { policy, backends, next: AtomicUsize::new(0), live }
    }

    /// The backends to try for a client, best first; every backend appears exactly once.
    pub fn order(&self, client: SocketAddr) -> impl Iterator<Item = (usize, SocketAddr)> + '_ {
        let n = self.backends.len();
        let start = match self.policy {
            Balance::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            Balance::SourceHash => (hash_ip(client.ip()) % n as u64) as usize,
            Balance::LeastConn => {
                let offset = self.next.fetch_add(1, Ordering::Relaxed) % n;
                (0..n)
                    .map(|i| (i + offset) % n)
                    .min_by_key(|&i| self.live[i].load(Ordering::Relaxed))
                    .unwrap_or(0)
            }
        };
        (0..n).map(move |i| {
            let idx = (start + i) % n;
            (idx, self.backends[idx])
        })
    }

    /// The address of backend `index`.
    pub fn addr(&self, index: usize) -> SocketAddr {
        self.backends[index]
    }

    /// Counts a live connection on backend `index` until the lease is dropped.
    pub fn lease(&self, index: usize) -> BackendLease {
        self.live[index].fetch_add(1, Ordering::Relaxed);
        BackendLease { live: self.live.clone(), index }
    }
}

fn hash_ip(ip: IpAddr) -> u64 {
    // Stable across runs and processes (DefaultHasher with fixed keys), so a restart
    // keeps clients on the same backend.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x6e74_6c6d, 0x7370_6c69);
    // Treat an IPv4-mapped IPv6 client like its IPv4 address.
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.hash(&mut h),
            None => v6.hash(&mut h),
        },
        IpAddr::V4(v4) => v4.hash(&mut h),
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n).map(|i| SocketAddr::from(([127, 0, 0, 1], 10_000 + i))).collect()
    }
    fn client(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 40_000))
    }

    #[test]
    fn round_robin_rotates_and_lists_every_backend_once() {
        let b = Balancer::new(Balance::RoundRobin, addrs(3));
        let firsts: Vec<usize> = (0..6).map(|_| b.order(client(1)).next().unwrap().0).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        let all: Vec<usize> = b.order(client(1)).map(|(i, _)| i).collect();
        assert_eq!(all, [0, 1, 2]);
    }

    #[test]
    fn least_conn_prefers_the_idle_backend() {
        let b = Balancer::new(Balance::LeastConn, addrs(3));
        let _l0 = b.lease(0);
        let _l1 = b.lease(1);
        for _ in 0..5 {
            assert_eq!(b.order(client(1)).next().unwrap().0, 2);
        }
        drop(_l0);
        let first = b.order(client(1)).next().unwrap().0;
        assert!(first == 0 || first == 2, "{first}");
    }

    #[test]
    fn source_hash_is_sticky_per_client_ip() {
        let b = Balancer::new(Balance::SourceHash, addrs(4));
        for last in 1..50 {
            let a = b.order(client(last)).next().unwrap().0;
            let again = b.order(SocketAddr::new(client(last).ip(), 1)).next().unwrap().0;
            assert_eq!(a, again);
        }
        let spread: std::collections::HashSet<usize> =
            (1..50).map(|l| b.order(client(l)).next().unwrap().0).collect();
        assert!(spread.len() > 1, "all clients hashed to one backend");
    }
}
