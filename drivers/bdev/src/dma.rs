//! DMA buffers: fixed-size buffers carved from one hugepage mapping, with a
//! fallback to ordinary pages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use memmap2::MmapMut;

use crate::error::BdevError;

const HUGEPAGE: usize = 2 << 20;

struct PoolInner {
    // Unregistered (dropped) before the mapping goes.
    _dma: crate::dmamap::DmaRegistration,
    _map: MmapMut,
    base: *mut u8,
    map_len: usize,
    buf_size: usize,
    hugepages: bool,
    /// Free buffer indices; lock-free so any core can allocate and free.
    free: ArrayQueue<u32>,
}

// SAFETY: the mapping lives as long as PoolInner; each buffer is handed to
// exactly one DmaBuf at a time through the free queue.
unsafe impl Send for PoolInner {}
unsafe impl Sync for PoolInner {}

/// A pool of equal DMA buffers. Cloning shares the pool.
#[derive(Clone)]
pub struct DmaPool {
    inner: Arc<PoolInner>,
}

impl DmaPool {
    /// `count` buffers of `buf_size` bytes (a power of two, at least 4 KiB).
    /// Tries 2 MiB hugepages first; if none are reserved it logs that and
    /// uses ordinary pages.
    pub fn new(count: usize, buf_size: usize) -> Result<DmaPool, BdevError> {
        Self::with_pages(count, buf_size, true)
    }

    /// As [`new`](Self::new), on ordinary pages unless `hugepages`: for
    /// pools made as they are needed, which should leave the reserved
    /// hugepages to what must have them (NVMe queues without an IOMMU).
    pub fn with_pages(
        count: usize,
        buf_size: usize,
        hugepages: bool,
    ) -> Result<DmaPool, BdevError> {
        if !buf_size.is_power_of_two() || buf_size < 4096 {
            return Err(BdevError::InvalidArgument(format!(
                "DMA buffer size must be a power of two of at least 4096, got {buf_size}"
            )));
        }
        if count == 0 || count > u32::MAX as usize {
            return Err(BdevError::InvalidArgument(format!(
                "DMA buffer count {count} is out of range"
            )));
        }
        let want = count
            .checked_mul(buf_size)
            .ok_or_else(|| BdevError::InvalidArgument("DMA pool size overflows".into()))?;
        let huge_len = want.div_ceil(HUGEPAGE) * HUGEPAGE;
        let huge = hugepages.then(|| {
            memmap2::MmapOptions::new()
                .len(huge_len)
                .huge(Some(21))
                .populate()
                .map_anon()
        });
        let (mut map, hugepages) = match huge {
            Some(Ok(m)) => (m, true),
            None => {
                let mut m = memmap2::MmapOptions::new()
                    .len(want)
                    .map_anon()
                    .map_err(|source| BdevError::Os {
                        what: format!("mapping {want} bytes for a DMA pool"),
                        source,
                    })?;
                // Transparent huge pages where the kernel can (fewer TLB
                // misses; they come from no reserved pool), then every
                // page touched now, not on the IO path.
                let _ = m.advise(memmap2::Advice::HugePage);
                for page in m.chunks_mut(4096) {
                    page[0] = 0;
                }
                (m, false)
            }
            Some(Err(e)) => {
                // Said once, however many pools are made.
                static SAID: AtomicBool = AtomicBool::new(false);
                if !SAID.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        bytes = huge_len,
                        error = %e,
                        "no 2 MiB hugepages for DMA pools (reserve them in /proc/sys/vm/nr_hugepages); \
                         falling back to ordinary 4 KiB pages"
                    );
                }
                let m = memmap2::MmapOptions::new()
                    .len(want)
                    .populate()
                    .map_anon()
                    .map_err(|source| BdevError::Os {
                        what: format!("mapping {want} bytes for the DMA pool"),
                        source,
                    })?;
                (m, false)
            }
        };
        let map_len = map.len();
        let base = map.as_mut_ptr();
        let free = ArrayQueue::new(count);
        for i in 0..count as u32 {
            let _ = free.push(i);
        }
        // SAFETY: the mapping lives in PoolInner with the registration,
        // which is dropped first; buffers hold the pool alive while in use.
        let dma = unsafe { crate::dmamap::register_dma_memory(base, map_len) };
        Ok(DmaPool {
            inner: Arc::new(PoolInner {
                _dma: dma,
                _map: map,
                base,
                map_len,
                buf_size,
                hugepages,
                free,
            }),
        })
    }

    /// Whether the pool sits on hugepages.
    pub fn is_hugepage(&self) -> bool {
        self.inner.hugepages
    }

    /// The one virtual range to register for DMA (VFIO map): address, length.
    pub fn region(&self) -> (usize, usize) {
        (self.inner.base as usize, self.inner.map_len)
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.inner.buf_size
    }

    /// Buffers currently free.
    pub fn available(&self) -> usize {
        self.inner.free.len()
    }

    /// A buffer, or `None` when all are in use (back-pressure).
    #[inline]
    pub fn alloc(&self) -> Option<DmaBuf> {
        let index = self.inner.free.pop()?;
        Some(DmaBuf {
            pool: self.inner.clone(),
            index,
        })
    }
}

/// One buffer from a [`DmaPool`]; returned to the pool when dropped.
pub struct DmaBuf {
    pool: Arc<PoolInner>,
    index: u32,
}

impl DmaBuf {
    /// Its address (for DMA mapping and IoVecs).
    #[inline]
    pub fn addr(&self) -> *mut u8 {
        // SAFETY: index < count, so the offset is inside the mapping.
        unsafe { self.pool.base.add(self.index as usize * self.pool.buf_size) }
    }

    /// Its length.
    #[inline]
    pub fn len(&self) -> usize {
        self.pool.buf_size
    }

    /// Always false.
    #[inline]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: this DmaBuf owns the buffer exclusively.
        unsafe { std::slice::from_raw_parts(self.addr(), self.len()) }
    }

    /// The bytes, mutable.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: this DmaBuf owns the buffer exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.addr(), self.len()) }
    }
}

// SAFETY: a DmaBuf is an exclusive handle to its buffer.
unsafe impl Send for DmaBuf {}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // Cannot fail: the queue has room for every buffer.
        let _ = self.pool.free.push(self.index);
    }
}
