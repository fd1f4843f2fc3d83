//! Row locks shared by every core of a volume: RAID5 stripes, and RAID1
//! regions while a rebuild or scrub runs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Stripe locks: one bit per hash bucket of stripes, shared by all cores.
pub struct StripeLocks {
    words: Box<[AtomicU64]>,
}

impl StripeLocks {
    /// A table of 64 K buckets.
    pub fn new() -> StripeLocks {
        StripeLocks {
            words: (0..1024).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn slot(&self, stripe: u64) -> (usize, u64) {
        let h = stripe.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48;
        ((h as usize / 64) % self.words.len(), 1u64 << (h % 64))
    }

    /// Take the lock of `stripe` if it is free.
    pub fn try_lock(&self, stripe: u64) -> bool {
        let (w, bit) = self.slot(stripe);
        self.words[w].fetch_or(bit, Ordering::Acquire) & bit == 0
    }

    /// Release the lock of `stripe`.
    pub fn unlock(&self, stripe: u64) {
        let (w, bit) = self.slot(stripe);
        self.words[w].fetch_and(!bit, Ordering::Release);
    }

    /// Take the locks of stripes `first..=last`, all or none. Stripes of
    /// a long range share buckets, and a bucket taken twice failed the
    /// second time, every time: a discard that long never went through,
    /// and the writes queued behind it waited for ever (audit). A long
    /// range takes each of its buckets once.
    pub fn try_lock_range(&self, first: u64, last: u64) -> bool {
        if last.saturating_sub(first) < MIN_SHARED {
            // No two of them share a bucket (see `MIN_SHARED`).
            for s in first..=last {
                if !self.try_lock(s) {
                    for taken in first..s {
                        self.unlock(taken);
                    }
                    return false;
                }
            }
            return true;
        }
        // Its buckets as a mask, taken a word at a time. A word that is
        // partly held elsewhere gives back the bits this call set in it,
        // and the words before.
        let want = self.buckets(first, last);
        for (i, &m) in want.iter().enumerate() {
            if m == 0 {
                continue;
            }
            let before = self.words[i].fetch_or(m, Ordering::Acquire);
            if before & m != 0 {
                self.words[i].fetch_and(!(m & !before), Ordering::Release);
                for (w, &m) in self.words.iter().zip(&want[..i]) {
                    w.fetch_and(!m, Ordering::Release);
                }
                return false;
            }
        }
        true
    }

    /// Release what [`try_lock_range`](Self::try_lock_range) took.
    pub fn unlock_range(&self, first: u64, last: u64) {
        if last.saturating_sub(first) < MIN_SHARED {
            for s in first..=last {
                self.unlock(s);
            }
            return;
        }
        for (w, &m) in self.words.iter().zip(&self.buckets(first, last)) {
            w.fetch_and(!m, Ordering::Release);
        }
    }

    /// The buckets of stripes `first..=last`, as words of the table.
    fn buckets(&self, first: u64, last: u64) -> Vec<u64> {
        if last.saturating_sub(first) >= self.words.len() as u64 * 64 {
            // At least one stripe per bucket: every bucket, conservatively.
            return vec![u64::MAX; self.words.len()];
        }
        let mut want = vec![0u64; self.words.len()];
        for s in first..=last {
            let (w, bit) = self.slot(s);
            want[w] |= bit;
        }
        want
    }
}

impl Default for StripeLocks {
    fn default() -> Self {
        StripeLocks::new()
    }
}

/// The shortest distance between two stripes of one bucket: the golden
/// ratio hash spreads nearer ones over different buckets (a Fibonacci
/// number; a test checks every distance below it). Ranges shorter than
/// this take their stripes' locks one by one.
const MIN_SHARED: u64 = 46_368;

#[cfg(test)]
mod tests {
    use super::*;

    /// No two stripes nearer than `MIN_SHARED` share a bucket, wherever
    /// they start: their hashes differ by at least a bucket's width.
    #[test]
    fn stripes_nearer_than_min_shared_never_share_a_bucket() {
        for d in 1..MIN_SHARED {
            let apart = d.wrapping_mul(0x9E37_79B9_7F4A_7C15) as i64;
            assert!(apart.unsigned_abs() >= 1 << 48, "{d}");
        }
        let l = StripeLocks::new();
        assert!((0..100).any(|x| l.slot(x) == l.slot(x + MIN_SHARED)));
    }

    /// Ranges whose stripes share buckets are taken (once each) and given
    /// back whole; a stripe held elsewhere keeps the range out, all of it.
    #[test]
    fn a_range_sharing_buckets_is_taken_whole_or_not_at_all() {
        let l = StripeLocks::new();
        for (first, last) in [(0, 46_368 + 64), (5, 5 + 200_000), (7, 7 + 10), (0, 3000)] {
            assert!(l.try_lock_range(first, last), "{first}..={last}");
            assert!(!l.try_lock(first) && !l.try_lock(last));
            l.unlock_range(first, last);
            assert!(l.words.iter().all(|w| w.load(Ordering::SeqCst) == 0));
        }
        // Inside a long range, and inside a short one.
        for (held, first, last) in [(40_000, 0, 46_368 + 64), (9, 7, 17)] {
            assert!(l.try_lock(held));
            assert!(!l.try_lock_range(first, last));
            l.unlock(held);
            assert!(l.words.iter().all(|w| w.load(Ordering::SeqCst) == 0));
            assert!(l.try_lock_range(first, last));
            l.unlock_range(first, last);
        }
    }
}
