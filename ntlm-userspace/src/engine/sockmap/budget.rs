//! The global in-flight budget: bytes the kernel may hold between the sockets of all
//! connections together (`--max-inflight-total`).
//!
//! Each forwarding direction holds a reservation: the bytes it has in flight plus the
//! headroom it was granted (its event threshold is set so that it is woken before it uses
//! more). A direction that goes idle gives its reservation back once its destination has
//! drained, so idle connections hold nothing and the sum of reservations never exceeds the
//! total, except by bytes that were already in flight when a reservation shrank (they cannot
//! be taken back; they only drain).

use std::sync::atomic::{AtomicU64, Ordering};

/// Shared by all connections of an engine.
pub(crate) struct Budget {
    total: u64,
    reserved: AtomicU64,
}

impl Budget {
    pub(crate) fn new(total: u64) -> Budget {
        Budget { total, reserved: AtomicU64::new(0) }
    }

    /// Replaces a reservation of `old` bytes by one between `must` (always granted: bytes
    /// already in flight) and `want`, as far as the total allows. Returns the new reservation.
    pub(crate) fn resize(&self, old: u64, must: u64, want: u64) -> u64 {
        let want = want.max(must);
        let mut new = must;
        let update = self.reserved.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            let others = cur.saturating_sub(old);
            let room = self.total.saturating_sub(others);
            new = want.min(room).max(must);
            Some(others + new)
        });
        // The closure always returns Some.
        debug_assert!(update.is_ok());
        new
    }

    /// Gives a reservation back.
    pub(crate) fn release(&self, old: u64) {
        let update =
            self.reserved.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| Some(cur.saturating_sub(old)));
        debug_assert!(update.is_ok());
    }

    /// Bytes reserved now, over all connections.
    pub(crate) fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_up_to_the_total_and_never_below_what_is_in_flight() {
        let b = Budget::new(100);
        let a = b.resize(0, 0, 60);
        assert_eq!(a, 60);
        let c = b.resize(0, 10, 60);
        assert_eq!(c, 40, "only 40 left");
        assert_eq!(b.reserved(), 100);
        // In flight cannot be refused, even past the total.
        let d = b.resize(0, 5, 5);
        assert_eq!(d, 5);
        assert_eq!(b.reserved(), 105);
        b.release(d);
        // Shrinking returns room to others.
        let a = b.resize(a, 0, 0);
        assert_eq!(a, 0);
        assert_eq!(b.reserved(), 40);
        b.release(c);
        assert_eq!(b.reserved(), 0);
    }
}
