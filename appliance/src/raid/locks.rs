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
}

impl Default for StripeLocks {
    fn default() -> Self {
        StripeLocks::new()
    }
}
