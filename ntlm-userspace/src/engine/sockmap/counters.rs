//! The engine's counters, declared once: the `counters!` table below yields the atomic
//! [`Counters`] the connections bump, the matching fields of the public [`Snapshot`], its
//! filling, [`COUNTERS`] (name and help of each), which `doctor` and metrics print, and
//! [`KINDS`] (how metrics export each).

use std::sync::atomic::{AtomicU64, Ordering};

/// How a counter of the table is exported as a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A count of events: a Prometheus counter (`_total`).
    Count,
    /// The highest value seen so far (written `(high_water)` after its name in the table): a
    /// gauge, which never goes down.
    HighWater,
}

/// The [`Kind`] of a table entry: `(high_water)` or nothing.
macro_rules! kind {
    () => {
        Kind::Count
    };
    (high_water) => {
        Kind::HighWater
    };
}

/// Declares the counters: each entry is a doc comment (the help text), a name and
/// optionally its kind (`(high_water)`; a count by default).
macro_rules! counters {
    ($( $(#[doc = $doc:literal])+ $name:ident $(($kind:ident))?, )*) => {
        /// Engine-wide counters (for `doctor`, metrics, tests and debugging), one atomic each.
        #[derive(Default)]
        pub(crate) struct Counters {
            $( $(#[doc = $doc])+ pub(crate) $name: AtomicU64, )*
        }

        /// A snapshot of the engine's state (for `doctor` and tests).
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct Snapshot {
            /// Entries in FWD.
            pub fwd: usize,
            /// Entries in PEER.
            pub peer: usize,
            /// Entries in STATS.
            pub stats: usize,
            /// Entries in CTL.
            pub ctl: usize,
            /// Cookies registered for events.
            pub waiters: usize,
            /// Bytes reserved in the global in-flight budget.
            pub reserved: u64,
            /// Kernel error counters (`ERR_*` of ntlm-common).
            pub kernel_errors: Vec<u64>,
            /// Wake events received.
            pub events: u64,
            $( $(#[doc = $doc])+ pub $name: u64, )*
            /// Why the verdict's overlap guard is off (`None`: on).
            pub guard_off: Option<String>,
        }

        /// Name and help text of every counter, in declaration order (the order of
        /// [`Snapshot::counters`] and `SockmapEngine::counters`).
        pub const COUNTERS: [(&str, &str); [$(stringify!($name)),*].len()] =
            [$( (stringify!($name), concat!($($doc),+).trim_ascii()), )*];

        /// How each counter is exported, in [`COUNTERS`] order.
        pub const KINDS: [Kind; COUNTERS.len()] = [$( kind!($($kind)?), )*];

        impl Counters {
            /// Every counter's value now, in [`COUNTERS`] order.
            pub(crate) fn values(&self) -> [u64; COUNTERS.len()] {
                [$( self.$name.load(Ordering::Relaxed), )*]
            }
        }

        impl Snapshot {
            /// This snapshot with the counters read from `c`.
            pub(crate) fn with_counters(mut self, c: &Counters) -> Snapshot {
                $( self.$name = c.$name.load(Ordering::Relaxed); )*
                self
            }

            /// Every counter as captured: (name, help, value), in [`COUNTERS`] order.
            pub fn counters(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + use<> {
                named([$( self.$name, )*])
            }
        }
    };
}

counters! {
    /// Connections carried (fully or partly) in the kernel.
    kernel_conns,
    /// Connections handed whole to the splice engine (a socket not ESTABLISHED at setup).
    splice_fallbacks,
    /// Directions copied in userspace (FIN before insertion or during a pause).
    copy_directions,
    /// Times a source was paused for its in-flight cap.
    pauses,
    /// Map deletions that failed at cleanup (besides "not there").
    cleanup_failures,
    /// Highest in-flight byte count measured on any direction.
    max_inflight_seen (high_water),
    /// Payload bytes copied in userspace (passed while paused, or sources whose FIN came
    /// before insertion).
    copied_bytes,
    /// Zero-length buffers the verdict saw (FIN), summed over finished connections.
    empty_skbs,
    /// Connections reset because the kernel delivered bytes twice (see `duplicates`).
    duplicates,
    /// Retransmitted buffers whose overlap the verdict cut off, over finished connections.
    overlap_skbs,
    /// Bytes those cuts removed.
    overlap_bytes,
    /// Buffers the verdict passed because of its in-flight limit (finished connections).
    cap_stops,
    /// Copy buffers allocated for passed bytes (one per direction that ever needed one).
    lane_bufs,
    /// Buffers the verdict made linear before redirecting them, so that the destination
    /// sends each as one packet rather than one per page fragment (finished connections).
    linearized,
}

/// `values` (in [`COUNTERS`] order) with each counter's name and help.
pub(crate) fn named(values: [u64; COUNTERS.len()]) -> impl Iterator<Item = (&'static str, &'static str, u64)> {
    COUNTERS.into_iter().zip(values).map(|((name, help), v)| (name, help, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each counter lands in its own snapshot field (the public names tests and `doctor`
    /// read) and comes out of the iterator under its own name.
    #[test]
    fn every_counter_reaches_its_field_and_its_name() {
        let c = Counters::default();
        let fields = [
            &c.kernel_conns,
            &c.splice_fallbacks,
            &c.copy_directions,
            &c.pauses,
            &c.cleanup_failures,
            &c.max_inflight_seen,
            &c.copied_bytes,
            &c.empty_skbs,
            &c.duplicates,
            &c.overlap_skbs,
            &c.overlap_bytes,
            &c.cap_stops,
            &c.lane_bufs,
            &c.linearized,
        ];
        assert_eq!(fields.len(), COUNTERS.len());
        // Distinct values, so a counter read into the wrong field shows.
        for (i, f) in fields.iter().enumerate() {
            f.store(1000 + i as u64, Ordering::Relaxed);
        }
        let s = Snapshot::default().with_counters(&c);
        let by_field = [
            ("kernel_conns", s.kernel_conns),
            ("splice_fallbacks", s.splice_fallbacks),
            ("copy_directions", s.copy_directions),
            ("pauses", s.pauses),
            ("cleanup_failures", s.cleanup_failures),
            ("max_inflight_seen", s.max_inflight_seen),
            ("copied_bytes", s.copied_bytes),
            ("empty_skbs", s.empty_skbs),
            ("duplicates", s.duplicates),
            ("overlap_skbs", s.overlap_skbs),
            ("overlap_bytes", s.overlap_bytes),
            ("cap_stops", s.cap_stops),
            ("lane_bufs", s.lane_bufs),
            ("linearized", s.linearized),
        ];
        let listed: Vec<_> = s.counters().collect();
        let live: Vec<_> = named(c.values()).collect();
        assert_eq!(listed, live, "a snapshot lists what the counters hold");
        for (i, ((name, value), (listed_name, help, listed_value))) in by_field.into_iter().zip(listed).enumerate() {
            assert_eq!((name, value), (listed_name, 1000 + i as u64), "field {name}");
            assert_eq!(listed_value, value, "{name}");
            assert!(!help.is_empty() && help == help.trim() && !help.contains('\n'), "help of {name}: {help:?}");
        }
        let high_water: Vec<&str> =
            COUNTERS.iter().zip(KINDS).filter(|(_, k)| *k == Kind::HighWater).map(|((n, _), _)| *n).collect();
        assert_eq!(high_water, ["max_inflight_seen"], "only the maximum is not a count of events");
        // The other fields are not counters and stay as they were.
        assert_eq!((s.fwd, s.events, s.guard_off), (0, 0, None));
    }
}
