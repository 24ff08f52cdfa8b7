//! The backend connect-time histogram: fixed buckets, one atomic add per bucket, count and
//! sum, so that a connection observing its connect time takes no lock (the client crate's own
//! `Histogram` locks a mutex on every observation).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};

/// Upper bounds of the buckets, in nanoseconds: from a loopback connect (tens of
/// microseconds) to a connect timeout (5 s by default); slower ones land in `+Inf`.
pub const BUCKETS_NS: [u64; 16] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

/// Nanoseconds in a second, for the exposition (seconds, as Prometheus names durations).
const NS_PER_SEC: f64 = 1e9;

/// A histogram of durations with [`BUCKETS_NS`]; clones share the same counts.
#[derive(Clone, Debug, Default)]
pub struct ConnectTime(Arc<Counts>);

/// The counts behind a [`ConnectTime`].
#[derive(Debug, Default)]
pub struct Counts {
    /// Observations per bucket (not cumulative); the last slot is `+Inf`.
    buckets: [AtomicU64; BUCKETS_NS.len() + 1],
    /// Sum of the observations, in nanoseconds.
    sum_ns: AtomicU64,
}

impl ConnectTime {
    /// Counts one duration.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let slot = BUCKETS_NS.iter().position(|&b| ns <= b).unwrap_or(BUCKETS_NS.len());
        self.0.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// (upper bound in seconds, observations in that bucket alone), `+Inf` last, and the
    /// count (the sum of the buckets, so that `+Inf` and `_count` always agree).
    fn snapshot(&self) -> (Vec<(f64, u64)>, u64) {
        let bounds = BUCKETS_NS.iter().map(|&b| b as f64 / NS_PER_SEC).chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> =
            bounds.zip(&self.0.buckets).map(|(b, n)| (b, n.load(Ordering::Relaxed))).collect();
        let count = buckets.iter().map(|&(_, n)| n).sum();
        (buckets, count)
    }
}

impl TypedMetric for ConnectTime {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ConnectTime {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (buckets, count) = self.snapshot();
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / NS_PER_SEC;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A duration lands in the first bucket whose bound it does not exceed (a bound is
    /// inclusive, `le`), past the last one in `+Inf`; the sum is kept in nanoseconds.
    #[test]
    fn durations_land_in_their_buckets() {
        let h = ConnectTime::default();
        let first = Duration::from_nanos(BUCKETS_NS[0]);
        h.observe(first);
        h.observe(first + Duration::from_nanos(1));
        h.observe(Duration::from_nanos(BUCKETS_NS[BUCKETS_NS.len() - 1] + 1));
        h.observe(Duration::from_secs(3600));
        let (buckets, count) = h.snapshot();
        assert_eq!(count, 4);
        assert_eq!(buckets.len(), BUCKETS_NS.len() + 1);
        assert_eq!((buckets[0].1, buckets[1].1), (1, 1));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 2)));
        assert_eq!(buckets[1..BUCKETS_NS.len()].iter().map(|b| b.1).sum::<u64>(), 1);
        assert!(BUCKETS_NS.windows(2).all(|w| w[0] < w[1]), "bounds ascend");
        assert_eq!(buckets[0].0, 0.00005, "bounds are exposed in seconds");
    }
}
