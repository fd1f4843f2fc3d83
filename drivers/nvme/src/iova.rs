//! IO virtual addresses for DMA mappings, given back when a mapping goes.
//!
//! Guest memory is mapped for DMA at every memory table a vhost-user
//! frontend sends (each reconnect, each guest reboot, each memory hotplug)
//! and unmapped when it is replaced. Handed out from an ever-growing
//! counter, the addresses ran out after some hundreds of GiB of mappings
//! on a 39-bit IOMMU, and then every new queue of every volume on the
//! drive failed. Freed ranges are used again here (first fit, neighbours
//! merged), so the space in use is what is mapped now. A map is rare (a
//! control-path event): a lock and a sorted map are enough.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// A range of IO addresses, handed out in pieces and taken back.
pub(crate) struct IovaSpace {
    inner: Mutex<Space>,
}

struct Space {
    /// Free ranges below `top`: start -> length, never adjacent.
    free: BTreeMap<u64, u64>,
    /// Everything from here up was never handed out (or came back).
    top: u64,
    /// The end of the space.
    end: u64,
}

impl IovaSpace {
    /// The addresses `base..end`.
    pub(crate) fn new(base: u64, end: u64) -> IovaSpace {
        IovaSpace {
            inner: Mutex::new(Space {
                free: BTreeMap::new(),
                top: base,
                end,
            }),
        }
    }

    /// `len` bytes of addresses, or `None` when the space has no free
    /// range that large.
    pub(crate) fn alloc(&self, len: u64) -> Option<u64> {
        if len == 0 {
            return None;
        }
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let fit = s
            .free
            .iter()
            .find(|(_, &l)| l >= len)
            .map(|(&a, &l)| (a, l));
        if let Some((at, l)) = fit {
            s.free.remove(&at);
            if l > len {
                s.free.insert(at + len, l - len);
            }
            return Some(at);
        }
        let at = s.top;
        let next = at.checked_add(len).filter(|&n| n <= s.end)?;
        s.top = next;
        Some(at)
    }

    /// Give back `len` bytes at `at` (as [`alloc`](Self::alloc) handed
    /// them out).
    pub(crate) fn free(&self, at: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (mut start, mut end) = (at, at.saturating_add(len));
        // Merge with the free range just before and just after.
        if let Some((&a, &l)) = s.free.range(..start).next_back() {
            if a + l == start {
                s.free.remove(&a);
                start = a;
            }
        }
        if let Some(l) = s.free.remove(&end) {
            end += l;
        }
        if end == s.top {
            s.top = start;
        } else {
            s.free.insert(start, end - start);
        }
    }

    /// The highest address handed out so far, plus one (what the space
    /// in use reaches).
    #[cfg(test)]
    fn top(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).top
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_come_back_and_the_space_in_use_stays_bounded() {
        const GIB: u64 = 1 << 30;
        let s = IovaSpace::new(1 << 32, 1 << 39);
        // A fixed mapping (queues' memory) and guest memory mapped and
        // unmapped again and again: 10,000 memory tables of 1 GiB.
        let fixed = s.alloc(1 << 20).unwrap();
        for _ in 0..10_000 {
            let a = s.alloc(GIB).unwrap();
            let b = s.alloc(2 * GIB).unwrap();
            s.free(a, GIB);
            s.free(b, 2 * GIB);
        }
        assert!(s.top() <= (1 << 32) + (1 << 20) + 3 * GIB, "{:#x}", s.top());
        s.free(fixed, 1 << 20);
        assert_eq!(s.top(), 1 << 32, "everything back");
    }

    #[test]
    fn ranges_do_not_overlap_and_holes_are_reused() {
        let s = IovaSpace::new(0x1000, 0x1000 + 16 * 0x1000);
        let a: Vec<u64> = (0..4).map(|_| s.alloc(0x2000).unwrap()).collect();
        for w in a.windows(2) {
            assert!(w[0] + 0x2000 <= w[1]);
        }
        s.free(a[1], 0x2000);
        s.free(a[2], 0x2000);
        // The merged hole takes a larger piece.
        assert_eq!(s.alloc(0x4000), Some(a[1]));
        assert_eq!(s.alloc(0x8000), Some(a[3] + 0x2000));
        assert_eq!(s.alloc(0x1000), None, "the space is full");
        assert_eq!(s.alloc(0), None);
    }
}
