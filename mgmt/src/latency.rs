//! The latency histogram layout the daemon keeps per export queue and the
//! ExportStats call sends: bucket `i` counts requests that took less than
//! `256 ns << i` (and at least half that); the last bucket takes the rest.
//! Shared by the daemon (metrics) and applctl (`stats`), which must read
//! the buckets the same way.

/// Buckets per histogram.
pub const BUCKETS: usize = 32;

/// The upper bound of bucket `i` in nanoseconds (the last bucket's for
/// any index past it, as a histogram from outside may be longer).
pub fn bound_ns(i: usize) -> u64 {
    256u64 << i.min(BUCKETS - 1)
}

/// The `q` quantile (0..=1) of histogram `h`, as the upper bound of its
/// bucket in nanoseconds; `None` if it is empty. Counts that overflow
/// saturate (a histogram may come from another process).
pub fn quantile_ns(h: &[u64], q: f64) -> Option<u64> {
    let total = h.iter().fold(0u64, |a, &n| a.saturating_add(n));
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0u64;
    for (i, &n) in h.iter().enumerate() {
        seen = seen.saturating_add(n);
        if seen >= rank {
            return Some(bound_ns(i));
        }
    }
    Some(bound_ns(h.len().saturating_sub(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_upper_bounds() {
        let mut h = vec![0u64; BUCKETS];
        assert_eq!(quantile_ns(&h, 0.5), None);
        h[3] = 990;
        h[10] = 10;
        assert_eq!(quantile_ns(&h, 0.5), Some(2048));
        assert_eq!(quantile_ns(&h, 0.99), Some(2048));
        assert_eq!(quantile_ns(&h, 0.999), Some(262_144));
        // Longer than ours, or counts near the top of u64: no panic.
        let mut long = vec![0u64; 70];
        long[60] = 1;
        assert_eq!(quantile_ns(&long, 0.5), Some(bound_ns(BUCKETS - 1)));
        let huge = vec![u64::MAX; 70];
        assert_eq!(quantile_ns(&huge, 1.0), Some(256));
    }
}
