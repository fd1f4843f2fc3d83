//! How the driver reaches a controller: its register file (BAR0) and an
//! IOMMU that turns process memory into addresses the controller may use.
//! VFIO is one transport; the software controller is the other.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::error::NvmeError;

/// A controller's register file: a mapping of BAR0 (or the software
/// controller's shared page).
#[derive(Clone, Copy)]
pub struct Bar {
    base: *mut u8,
    len: usize,
}

// SAFETY: registers are only touched through 32-bit atomic accesses, which
// are what MMIO needs and are sound from any thread.
unsafe impl Send for Bar {}
unsafe impl Sync for Bar {}

impl Bar {
    /// A register file of `len` bytes at `base`.
    ///
    /// # Safety
    /// `base` must stay mapped for `len` bytes, 4-byte aligned, for as long
    /// as any copy of the `Bar` is used.
    pub unsafe fn new(base: *mut u8, len: usize) -> Bar {
        Bar { base, len }
    }

    fn reg(&self, off: usize) -> &AtomicU32 {
        // A register offset past the mapping is a driver bug (offsets come
        // from the specification and CAP.DSTRD, checked at bring-up).
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len,
            "register {off:#x} outside BAR"
        );
        // SAFETY: in bounds and aligned (checked above); the mapping outlives
        // the Bar (constructor contract).
        unsafe { AtomicU32::from_ptr(self.base.add(off) as *mut u32) }
    }

    /// Read a 32-bit register.
    #[inline]
    pub fn read32(&self, off: usize) -> u32 {
        self.reg(off).load(Ordering::Acquire)
    }

    /// Write a 32-bit register. Release ordering: queue entries written
    /// before a doorbell are visible to the controller when it sees the
    /// doorbell.
    #[inline]
    pub fn write32(&self, off: usize, v: u32) {
        self.reg(off).store(v, Ordering::Release)
    }

    /// Read a 64-bit register as two 32-bit reads (low first), which every
    /// controller accepts.
    pub fn read64(&self, off: usize) -> u64 {
        self.read32(off) as u64 | (self.read32(off + 4) as u64) << 32
    }

    /// Write a 64-bit register as two 32-bit writes (low first).
    pub fn write64(&self, off: usize, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A 2 MiB hugepage: what no-IOMMU mode hands a controller.
pub(crate) const HUGEPAGE: usize = 2 << 20;

/// A page-aligned, non-empty range, as `Transport::map` takes.
pub(crate) fn check_page_aligned(vaddr: *mut u8, len: usize) -> Result<(), NvmeError> {
    let page = crate::spec::PAGE;
    if !(vaddr as usize).is_multiple_of(page) || !len.is_multiple_of(page) || len == 0 {
        return Err(NvmeError::InvalidArgument(format!(
            "DMA map of {len} bytes at {vaddr:p} is not page aligned"
        )));
    }
    Ok(())
}

/// A controller's register file and DMA mappings.
pub trait Transport: Send + Sync {
    /// The register file.
    fn bar(&self) -> Bar;

    /// Let the controller read and write `len` bytes at `vaddr` (both page
    /// aligned); returns the IO virtual address it must use.
    ///
    /// # Safety
    /// The memory must stay mapped until `unmap` is called with the returned
    /// address.
    unsafe fn map(&self, vaddr: *mut u8, len: usize) -> Result<u64, NvmeError>;

    /// Undo a `map`.
    fn unmap(&self, iova: u64, len: usize);

    /// Undo a `map` of memory a device that did not stop may still write:
    /// its IO addresses are never handed out again, so a late write from
    /// it faults in the IOMMU instead of landing in memory mapped later.
    fn unmap_retired(&self, iova: u64, len: usize) {
        self.unmap(iova, len);
    }

    /// The device did not stop when told to, or is failed for good: every
    /// unmap from now on is [`unmap_retired`](Self::unmap_retired) (its
    /// queues' memory too), and bus mastering is turned off where the
    /// transport can (a device that obeys reaches no memory at all, the
    /// only guard without an IOMMU).
    fn retire_all(&self) {}

    /// Like `map`, for memory the controller may see in several pieces:
    /// `(offset in the range, length, IO address)` of each. With an IOMMU
    /// there is one piece; without one (DMA by physical address) each
    /// physically contiguous run is one. Undo with `unmap` per piece.
    ///
    /// # Safety
    /// As for `map`.
    unsafe fn map_pieces(
        &self,
        vaddr: *mut u8,
        len: usize,
    ) -> Result<Vec<(usize, usize, u64)>, NvmeError> {
        // SAFETY: forwarded from the caller.
        Ok(vec![(0, len, unsafe { self.map(vaddr, len)? })])
    }

    /// Whether the controller sees memory by physical address (no IOMMU):
    /// then memory it must see as one range comes from one hugepage.
    fn physical(&self) -> bool {
        false
    }

    /// Name for logs and errors (the PCI address for VFIO).
    fn name(&self) -> &str;
}

/// Page-aligned anonymous memory mapped for the controller, freed (and
/// unmapped from the IOMMU) on drop.
pub struct DmaMem {
    map: memmap2::MmapMut,
    iova: u64,
    transport: Arc<dyn Transport>,
}

// SAFETY: the memory is owned by this value; who writes it is up to the
// queue that owns it (one core), and the controller reaches it only by DMA.
unsafe impl Send for DmaMem {}

impl DmaMem {
    /// `len` zeroed bytes (rounded up to pages), locked and mapped. Without
    /// an IOMMU it is one 2 MiB hugepage, the only memory sure to be
    /// physically contiguous and never moved.
    pub fn new(transport: &Arc<dyn Transport>, len: usize) -> Result<DmaMem, NvmeError> {
        let len = len.div_ceil(crate::spec::PAGE) * crate::spec::PAGE;
        let mut map = if transport.physical() {
            if len > HUGEPAGE {
                return Err(NvmeError::InvalidArgument(format!(
                    "{}: {len} bytes of DMA memory do not fit a 2 MiB hugepage (no-IOMMU mode)",
                    transport.name()
                )));
            }
            memmap2::MmapOptions::new()
                .len(HUGEPAGE)
                .huge(Some(21))
                .populate()
                .map_anon()
                .map_err(|e| {
                    NvmeError::Os(
                        format!(
                            "{}: no-IOMMU mode needs 2 MiB hugepages for queues and buffers \
                             (reserve some: deploy/host-setup.sh hugepages N)",
                            transport.name()
                        ),
                        e,
                    )
                })?
        } else {
            memmap2::MmapOptions::new()
                .len(len)
                .populate()
                .map_anon()
                .map_err(|e| NvmeError::Os(format!("mapping {len} bytes of DMA memory"), e))?
        };
        // Pinning is what VFIO does anyway; locking keeps the software
        // controller's view the same. A failure (RLIMIT_MEMLOCK) is not
        // fatal: VFIO pins the pages itself.
        let _ = map.lock();
        // SAFETY: the mapping is owned by the returned value, which unmaps
        // it from the IOMMU before the mapping is dropped.
        let iova = unsafe { transport.map(map.as_mut_ptr(), map.len())? };
        Ok(DmaMem {
            map,
            iova,
            transport: transport.clone(),
        })
    }

    /// Start address in this process.
    pub fn ptr(&self) -> *mut u8 {
        self.map.as_ptr() as *mut u8
    }

    /// Start address for the controller.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Drop for DmaMem {
    fn drop(&mut self) {
        self.transport.unmap(self.iova, self.map.len());
    }
}
