//! Guest memory as the vhost-user frontend describes it: regions of shared
//! memory file descriptors, mapped here in place (no bounce copies).

use std::fs::File;
use std::sync::Arc;

use super::FrontendError;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// One region: where the guest sees it, where the frontend process has it,
/// and our mapping of it.
#[derive(Clone)]
pub struct Region {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The frontend's virtual address (vring addresses are given in it).
    pub user_addr: u64,
    mapping: Arc<GuestRegionMmap>,
    /// Registered for DMA (NVMe controllers map it, so requests go to guest
    /// memory without a copy) for as long as any copy of the region lives.
    _dma: Arc<bdev::DmaRegistration>,
}

/// The regions of one connection.
#[derive(Clone, Default)]
pub struct GuestMemory {
    regions: Vec<Region>,
}

/// Largest number of regions we accept (offered as max mem slots).
pub const MAX_REGIONS: usize = 32;

impl GuestMemory {
    /// Map one region of `file` at `mmap_offset`.
    pub fn map_region(
        gpa: u64,
        size: u64,
        user_addr: u64,
        mmap_offset: u64,
        file: File,
    ) -> Result<Region, FrontendError> {
        let invalid = FrontendError::Invalid;
        if size == 0 || gpa.checked_add(size).is_none() || user_addr.checked_add(size).is_none() {
            return Err(invalid(format!(
                "memory region at {gpa:#x} of {size:#x} bytes is invalid"
            )));
        }
        let size_usize =
            usize::try_from(size).map_err(|_| invalid("memory region too large".to_string()))?;
        let mmap =
            MmapRegion::from_file(FileOffset::new(file, mmap_offset), size_usize).map_err(|e| {
                invalid(format!(
                    "mapping guest memory at {gpa:#x} ({size:#x} bytes): {e}"
                ))
            })?;
        let mapping = GuestRegionMmap::new(mmap, GuestAddress(gpa)).ok_or_else(|| {
            invalid(format!(
                "memory region at {gpa:#x} overflows the guest address space"
            ))
        })?;
        use vm_memory::GuestMemoryRegion;
        let host = mapping
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| invalid(format!("guest memory at {gpa:#x}: {e}")))?;
        // SAFETY: the registration lives with the mapping's Region; the
        // export stops its queues (no IO in flight) before dropping memory.
        let dma = unsafe { bdev::register_dma_memory(host, size_usize) };
        Ok(Region {
            gpa,
            size,
            user_addr,
            mapping: Arc::new(mapping),
            _dma: Arc::new(dma),
        })
    }

    /// Add a region; refuses overlaps and more than [`MAX_REGIONS`].
    pub fn add(&mut self, r: Region) -> Result<(), FrontendError> {
        if self.regions.len() >= MAX_REGIONS {
            return Err(FrontendError::Invalid(format!(
                "more than {MAX_REGIONS} memory regions"
            )));
        }
        if self
            .regions
            .iter()
            .any(|o| r.gpa < o.gpa + o.size && o.gpa < r.gpa + r.size)
        {
            return Err(FrontendError::Invalid(format!(
                "memory region at {:#x} overlaps another",
                r.gpa
            )));
        }
        self.regions.push(r);
        self.regions.sort_by_key(|r| r.gpa);
        Ok(())
    }

    /// Remove the region with this guest address and size.
    pub fn remove(&mut self, gpa: u64, size: u64) -> Result<(), FrontendError> {
        let before = self.regions.len();
        self.regions.retain(|r| !(r.gpa == gpa && r.size == size));
        if self.regions.len() == before {
            return Err(FrontendError::Invalid(format!(
                "no memory region at {gpa:#x} of {size:#x} bytes"
            )));
        }
        Ok(())
    }

    /// The frontend address `va` as a guest physical address.
    pub fn va_to_gpa(&self, va: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| va >= r.user_addr && va - r.user_addr < r.size)
            .map(|r| r.gpa + (va - r.user_addr))
    }

    /// An immutable snapshot for the data path.
    pub fn snapshot(&self) -> Result<GuestMemoryMmap, FrontendError> {
        if self.regions.is_empty() {
            return Ok(GuestMemoryMmap::new());
        }
        let regions = self.regions.iter().map(|r| r.mapping.clone()).collect();
        GuestMemoryMmap::from_arc_regions(regions)
            .map_err(|e| FrontendError::Invalid(format!("building the guest memory map: {e}")))
    }
}
