//! Backend selection. The balancer only orders a route's backends for a new connection; the
//! connection lifecycle tries them in that order until one accepts, so every policy fails
//! over the same way. Backends that are down are left out while any is up; when all are down
//! every one is tried anyway (a health check can be wrong; refusing every client is worse).

use std::{
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::{config::Balance, route::Backend};

/// Orders a route's backends for new client connections.
#[derive(Debug)]
pub struct Balancer {
    policy: Balance,
    /// Turn counter (round-robin; least-conn's tie-break).
    next: AtomicUsize,
}

impl Balancer {
    /// A balancer with `policy`.
    pub fn new(policy: Balance) -> Self {
        Self { policy, next: AtomicUsize::new(0) }
    }

    /// The backends to try for `client`, best first: every backend that is up exactly once
    /// (or every backend, if none is up), starting where the policy says and going on in
    /// configured order.
    pub fn order<'a>(&self, backends: &'a [Arc<Backend>], client: SocketAddr) -> impl Iterator<Item = &'a Arc<Backend>> {
        let n = backends.len();
        let any_up = backends.iter().any(|b| b.health.is_up());
        let eligible = move |b: &Arc<Backend>| !any_up || b.health.is_up();
        let start = match (n, self.policy) {
            (0, _) => 0,
            (_, Balance::RoundRobin) => self.next.fetch_add(1, Ordering::Relaxed) % n,
            (_, Balance::SourceHash) => (hash_ip(client.ip()) % n as u64) as usize,
            (_, Balance::LeastConn) => {
                let offset = self.next.fetch_add(1, Ordering::Relaxed) % n;
                (0..n)
                    .map(|i| (i + offset) % n)
                    .filter(|&i| eligible(&backends[i]))
                    .min_by_key(|&i| backends[i].live())
                    .unwrap_or(0)
            }
        };
        (0..n).map(move |i| &backends[(start + i) % n]).filter(move |b| eligible(b))
    }
}

fn hash_ip(ip: IpAddr) -> u64 {
    // Stable across runs and processes (SipHash with fixed keys), so a restart keeps clients
    // on the same backend.
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
    use crate::route::{Backend, Lease};

    fn backends(n: u16) -> Vec<Arc<Backend>> {
        (0..n).map(|i| Arc::new(Backend::for_test(SocketAddr::from(([127, 0, 0, 1], 10_000 + i))))).collect()
    }
    fn client(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 40_000))
    }
    fn ports<'a>(it: impl Iterator<Item = &'a Arc<Backend>>) -> Vec<u16> {
        it.map(|b| b.addr.port() - 10_000).collect()
    }
    fn mark_down(b: &Backend) {
        for _ in 0..3 {
            b.health.record(false, 1, 3);
        }
        assert!(!b.health.is_up());
    }

    #[test]
    fn round_robin_rotates_and_lists_every_backend_once() {
        let (b, bs) = (Balancer::new(Balance::RoundRobin), backends(3));
        let firsts: Vec<u16> = (0..6).map(|_| ports(b.order(&bs, client(1)))[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        assert_eq!(ports(b.order(&bs, client(1))), [0, 1, 2]);
    }

    #[test]
    fn least_conn_prefers_the_idle_backend() {
        let (b, bs) = (Balancer::new(Balance::LeastConn), backends(3));
        let l0 = Lease::new(&bs[0]);
        let _l1 = Lease::new(&bs[1]);
        for _ in 0..5 {
            assert_eq!(ports(b.order(&bs, client(1)))[0], 2);
        }
        drop(l0);
        let first = ports(b.order(&bs, client(1)))[0];
        assert!(first == 0 || first == 2, "{first}");
    }

    #[test]
    fn source_hash_is_sticky_per_client_ip() {
        let (b, bs) = (Balancer::new(Balance::SourceHash), backends(4));
        for last in 1..50 {
            let a = ports(b.order(&bs, client(last)))[0];
            let again = ports(b.order(&bs, SocketAddr::new(client(last).ip(), 1)))[0];
            assert_eq!(a, again);
        }
        let spread: std::collections::HashSet<u16> = (1..50).map(|l| ports(b.order(&bs, client(l)))[0]).collect();
        assert!(spread.len() > 1, "all clients hashed to one backend");
    }

    /// A backend that is down is never offered while another is up, under every policy;
    /// with all down, all are offered.
    #[test]
    fn down_backends_are_skipped_until_all_are_down() {
        for policy in [Balance::RoundRobin, Balance::LeastConn, Balance::SourceHash] {
            let (b, bs) = (Balancer::new(policy), backends(3));
            mark_down(&bs[1]);
            for last in 0..30 {
                let order = ports(b.order(&bs, client(last)));
                assert_eq!(order.len(), 2, "{policy:?}: {order:?}");
                assert!(!order.contains(&1), "{policy:?}: a down backend was offered: {order:?}");
            }
            mark_down(&bs[0]);
            mark_down(&bs[2]);
            let mut all = ports(b.order(&bs, client(7)));
            all.sort();
            assert_eq!(all, [0, 1, 2], "{policy:?}: all down, all tried");
        }
    }
}
