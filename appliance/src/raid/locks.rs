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
    /// one range can share a bucket (with this hash, ones 46,368 apart
    /// often do), and a bucket taken twice failed the second time, every
    /// time: a discard that large never went through, and the writes
    /// queued behind it waited for ever (audit). Each bucket is taken once.
    pub fn try_lock_range(&self, first: u64, last: u64) -> bool {
        const FEW: usize = 16;
        let n = last.saturating_sub(first).saturating_add(1);
        if n <= FEW as u64 {
            let mut taken = [(0usize, 0u64); FEW];
            let mut k = 0;
            for s in first..=last {
                let slot = self.slot(s);
                if taken[..k].contains(&slot) {
                    continue;
                }
                if !self.try_lock(s) {
                    for &(w, bit) in &taken[..k] {
                        self.words[w].fetch_and(!bit, Ordering::Release);
                    }
                    return false;
                }
                taken[k] = slot;
                k += 1;
            }
            return true;
        }
        // A long range (a large discard): its buckets as a mask, taken a
        // word at a time.
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
        if last.saturating_sub(first) < self.words.len() as u64 {
            // Fewer stripes than words: one at a time (a bucket shared
            // twice is cleared twice, harmlessly).
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
        let all = self.words.len() as u64 * 64;
        if last.saturating_sub(first) >= all {
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

#[cfg(test)]
mod tests {
    use super::*;

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
