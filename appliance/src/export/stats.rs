//! Per-queue IO counters and latency histograms of an export, read by the
//! metrics sampler.
//!
//! Each queue has one writer (the reactor that owns it), so counters are
//! bumped with a plain load and store, no read-modify-write; readers may
//! see a value one IO old. Latency is measured between the reactor-loop
//! timestamps of submission and completion ([`poller::Ctx::now`]), which
//! costs no clock read per IO and is accurate to one loop iteration.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bdev::IoOp;

/// Histogram buckets: bucket `i` holds latencies below `256 ns << i`
/// (the layout the API sends, [`mgmt::latency`]).
pub const BUCKETS: usize = mgmt::latency::BUCKETS;

/// One queue's counters.
#[derive(Default)]
pub struct IoStats {
    c: [AtomicU64; 7],
    lat: [[AtomicU64; BUCKETS]; 2],
    /// Sums of the latencies in `lat`, in nanoseconds (a Prometheus
    /// histogram carries its sum).
    lat_sum_ns: [AtomicU64; 2],
}

const READS: usize = 0;
const WRITES: usize = 1;
const READ_BYTES: usize = 2;
const WRITE_BYTES: usize = 3;
const OTHERS: usize = 4;
const ERRORS: usize = 5;
const INFLIGHT: usize = 6;

fn bump(a: &AtomicU64, by: u64) {
    a.store(
        a.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

fn bucket(ns: u64) -> usize {
    let units = ns >> 8;
    ((64 - units.leading_zeros()) as usize).min(BUCKETS - 1)
}

impl IoStats {
    /// A request finished (only the owning reactor calls this).
    pub fn record(&self, op: IoOp, bytes: u64, latency_ns: u64, ok: bool) {
        let (count, sum, lat) = match op {
            IoOp::Read => (READS, READ_BYTES, Some(0)),
            IoOp::Write => (WRITES, WRITE_BYTES, Some(1)),
            _ => (OTHERS, usize::MAX, None),
        };
        bump(&self.c[count], 1);
        if sum != usize::MAX {
            bump(&self.c[sum], bytes);
        }
        if let Some(l) = lat {
            bump(&self.lat[l][bucket(latency_ns)], 1);
            bump(&self.lat_sum_ns[l], latency_ns);
        }
        if !ok {
            bump(&self.c[ERRORS], 1);
        }
    }

    /// A request refused before it reached the volume.
    pub fn refused(&self) {
        bump(&self.c[ERRORS], 1);
    }

    /// Requests in flight now (only the owning reactor calls this).
    pub fn set_inflight(&self, n: usize) {
        self.c[INFLIGHT].store(n as u64, Ordering::Relaxed);
    }

    /// Add this queue's counters to `s`.
    pub fn add_to(&self, s: &mut IoSnapshot) {
        let v = |i: usize| self.c[i].load(Ordering::Relaxed);
        s.reads += v(READS);
        s.writes += v(WRITES);
        s.read_bytes += v(READ_BYTES);
        s.write_bytes += v(WRITE_BYTES);
        s.others += v(OTHERS);
        s.errors += v(ERRORS);
        s.inflight += v(INFLIGHT);
        for (k, sum) in self.lat_sum_ns.iter().enumerate() {
            s.latency_sum_ns[k] += sum.load(Ordering::Relaxed);
        }
        for (k, h) in self.lat.iter().enumerate() {
            for (i, b) in h.iter().enumerate() {
                s.latency[k][i] += b.load(Ordering::Relaxed);
            }
        }
    }
}

/// Counters of an export (summed over its queues) at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoSnapshot {
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flushes, discards, write-zeroes, GET_ID.
    pub others: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Requests in flight.
    pub inflight: u64,
    /// Connections dropped because the frontend broke a queue or its
    /// memory (an export-wide count, not a queue's).
    pub frontend_faults: u64,
    /// Latency histograms of reads (0) and writes (1).
    pub latency: [[u64; BUCKETS]; 2],
    /// The sums of their latencies, in nanoseconds.
    pub latency_sum_ns: [u64; 2],
}

impl IoSnapshot {
    /// The latency histogram of `later` minus this one (reads, writes).
    pub fn latency_since(&self, later: &IoSnapshot) -> [[u64; BUCKETS]; 2] {
        let mut d = later.latency;
        for (dk, sk) in d.iter_mut().zip(&self.latency) {
            for (x, y) in dk.iter_mut().zip(sk) {
                *x = x.saturating_sub(*y);
            }
        }
        d
    }
}

/// The `q` quantile (0..=1) of a histogram, as the upper bound of its
/// bucket; `None` if it is empty.
pub fn quantile(h: &[u64; BUCKETS], q: f64) -> Option<Duration> {
    mgmt::latency::quantile_ns(h, q).map(Duration::from_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        assert_eq!(bucket(100), 0);
        assert_eq!(bucket(300), 1);
        assert_eq!(bucket(10_000), 6);
        assert_eq!(bucket(10_000_000_000_000), BUCKETS - 1);
        let s = IoStats::default();
        for _ in 0..99 {
            s.record(IoOp::Read, 4096, 3_000, true);
        }
        s.record(IoOp::Read, 4096, 1_000_000, false);
        s.record(IoOp::Flush, 0, 0, true);
        let mut snap = IoSnapshot::default();
        s.add_to(&mut snap);
        assert_eq!(
            (snap.reads, snap.read_bytes, snap.others, snap.errors),
            (100, 409600, 1, 1)
        );
        let p50 = quantile(&snap.latency[0], 0.5).unwrap();
        assert!(
            p50 >= Duration::from_micros(3) && p50 < Duration::from_micros(7),
            "{p50:?}"
        );
        let p999 = quantile(&snap.latency[0], 0.999).unwrap();
        assert!(p999 >= Duration::from_millis(1), "{p999:?}");
        assert_eq!(quantile(&snap.latency[1], 0.5), None);
        assert_eq!(snap.latency_sum_ns, [99 * 3000 + 1_000_000, 0]);
    }
}
