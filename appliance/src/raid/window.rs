//! Buffers RAID moves between members itself: a RAID5 piece's windows (old
//! data, old and new parity, a full stripe's rows) and a rebuild's or
//! scrub's rows. They come from DMA pools of the user's own (a channel, a
//! rebuild), registered like guest memory, so an NVMe member's controller
//! reaches them in place. From the heap, every command of a 4 KiB RAID5
//! read-modify-write (two reads, two writes) went through the driver's
//! bounce pages: a copy and about 900 instructions each.
//!
//! Pools are per size class (powers of two from 4 KiB), on ordinary pages,
//! made as a class needs more (each twice the last, populated then) and
//! bounded: past the bound, or if a pool cannot be mapped, a window comes
//! from the heap as before and is bounced by drivers that need registered
//! memory. Pools are not shared between channels, so taking and giving
//! back stays on this core.

use std::ops::{Deref, DerefMut};

use bdev::{DmaBuf, DmaPool};

/// The smallest class (a page) and the largest (a RAID5 window never
/// spans more than a chunk, chunks are at most 1 MiB, and so are rebuild
/// rows).
const MIN_CLASS_SHIFT: u32 = 12;
const MAX_POOLED: usize = 1 << 20;
/// Bytes of the largest pool, and at most this much per class and user:
/// 4 KiB windows for 1,024 read-modify-writes in flight, 1 MiB ones for two
/// full stripes of four members.
const POOL_BYTES: usize = 2 << 20;
const CLASS_BYTES: usize = 8 << 20;
/// Heap windows kept for reuse (see [`Windows::give`]), up to this size.
const HEAP_KEPT: usize = 256;
const HEAP_KEPT_MAX: usize = 4 << 20;

/// One window: `len` bytes, from a DMA pool or from the heap.
pub(crate) enum WinBuf {
    Heap(Vec<u8>),
    Dma(DmaBuf, usize),
}

impl Default for WinBuf {
    fn default() -> WinBuf {
        WinBuf::Heap(Vec::new())
    }
}

impl WinBuf {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            WinBuf::Heap(v) => v,
            WinBuf::Dma(b, len) => &b.as_slice()[..*len],
        }
    }
}

impl Deref for WinBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for WinBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            WinBuf::Heap(v) => v,
            WinBuf::Dma(b, len) => &mut b.as_mut_slice()[..*len],
        }
    }
}

#[derive(Default)]
struct Class {
    pools: Vec<DmaPool>,
    /// Bytes of all its pools.
    bytes: usize,
    /// Windows given back, taken again last in first out: the one just
    /// used is still in cache (a pool's own queue would cycle through all
    /// of its 2 MiB).
    free: Vec<DmaBuf>,
    /// A pool could not be made: this class uses the heap from now on.
    failed: bool,
}

/// One user's buffers.
#[derive(Default)]
pub(crate) struct Windows {
    classes: Vec<Class>,
    /// Heap windows given back, reused before allocating again: fresh ones
    /// cost a page fault per 4 KiB once the allocator hands large freed
    /// blocks back to the kernel (full-stripe writes ran at a third of
    /// their speed).
    heap: Vec<Vec<u8>>,
}

impl Windows {
    /// A window of `len` bytes. Not zeroed: every plan fills the parts it
    /// reads back (reads, new data or computed parity).
    pub(crate) fn take(&mut self, len: usize) -> WinBuf {
        if len > 0 && len <= MAX_POOLED {
            if let Some(b) = self.take_dma(len) {
                return WinBuf::Dma(b, len);
            }
        }
        let mut b = self.heap.pop().unwrap_or_default();
        b.resize(len, 0);
        WinBuf::Heap(b)
    }

    /// The buffer size of `len`'s class, and the class.
    fn class(&mut self, len: usize) -> (usize, &mut Class) {
        let size = len.next_power_of_two().max(1 << MIN_CLASS_SHIFT);
        let k = (size.trailing_zeros() - MIN_CLASS_SHIFT) as usize;
        if self.classes.len() <= k {
            self.classes.resize_with(k + 1, Class::default);
        }
        (size, &mut self.classes[k])
    }

    fn take_dma(&mut self, len: usize) -> Option<DmaBuf> {
        let (size, class) = self.class(len);
        if let Some(b) = class.free.pop() {
            return Some(b);
        }
        if let Some(b) = class.pools.iter().find_map(DmaPool::alloc) {
            return Some(b);
        }
        // Pools grow with demand, each twice the last, from 16 windows up
        // to 2 MiB: a volume used lightly, or a channel made for a single
        // request, does not map 2 MiB for it.
        let left = CLASS_BYTES.saturating_sub(class.bytes);
        let bytes = (size * 16)
            .saturating_mul(1 << class.pools.len().min(16))
            .min(POOL_BYTES.max(size))
            .min(left / size * size);
        if class.failed || bytes == 0 {
            return None;
        }
        // Ordinary pages: hugepages are left to what must have them (an
        // NVMe queue without an IOMMU), and ordinary ones map fine through
        // one.
        match DmaPool::with_pages(bytes / size, size, false) {
            Ok(pool) => {
                let b = pool.alloc();
                class.bytes += bytes;
                class.pools.push(pool);
                b
            }
            Err(e) => {
                tracing::warn!(bytes = size, error = %e, "no DMA pool for RAID buffers; they come from the heap");
                class.failed = true;
                None
            }
        }
    }

    /// Take a window back for reuse. A heap one is kept unless it is
    /// large or enough are kept.
    pub(crate) fn give(&mut self, b: WinBuf) {
        match b {
            WinBuf::Dma(b, _) => self.class(b.len()).1.free.push(b),
            WinBuf::Heap(v) => {
                if v.capacity() > 0 && v.capacity() <= HEAP_KEPT_MAX && self.heap.len() < HEAP_KEPT
                {
                    self.heap.push(v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_come_from_registered_pools_by_class_and_fall_back_to_the_heap() {
        let mut w = Windows::default();
        let a = w.take(4096);
        let b = w.take(512);
        let c = w.take(64 << 10);
        for (buf, len) in [(&a, 4096), (&b, 512), (&c, 64 << 10)] {
            assert!(matches!(buf, WinBuf::Dma(..)), "{len} bytes");
            assert_eq!(buf.len(), len);
        }
        // Page aligned, so a controller can take them as PRPs.
        assert_eq!(a.as_ptr() as usize % 4096, 0);
        assert_ne!(a.as_ptr(), b.as_ptr());
        // Past the bound of a class (8 MiB: eight 1 MiB windows), and
        // above the largest pooled size, windows come from the heap.
        let big: Vec<WinBuf> = (0..9).map(|_| w.take(1 << 20)).collect();
        assert!(big[..8].iter().all(|b| matches!(b, WinBuf::Dma(..))));
        assert!(matches!(big[8], WinBuf::Heap(_)));
        assert!(matches!(w.take(2 << 20), WinBuf::Heap(_)));
        // A pooled window given back is the next one taken (still in
        // cache), whatever length it is taken for in its class.
        let p = a.as_ptr();
        w.give(a);
        let again = w.take(3000);
        assert_eq!((again.as_ptr(), again.len()), (p, 3000));
    }
}
