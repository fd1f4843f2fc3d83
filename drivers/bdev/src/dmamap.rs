//! Memory devices may DMA to in place. Whoever owns memory that IO is done
//! on (guest memory of an export, a DMA pool) registers it here; drivers
//! that need memory mapped for their device (an IOMMU) subscribe as
//! [`DmaMapper`]s and are told about every region, present and future.
//! Unregistered memory still works: such drivers copy through buffers of
//! their own.

use std::sync::{Arc, Mutex, Weak};

/// A driver that maps memory for its device.
pub trait DmaMapper: Send + Sync {
    /// Let the device reach `len` bytes at `ptr` directly.
    ///
    /// # Safety
    /// The memory stays mapped until `dma_unmap` is called for `ptr`.
    unsafe fn dma_map(&self, ptr: *mut u8, len: usize) -> Result<(), String>;
    /// Undo `dma_map`.
    fn dma_unmap(&self, ptr: *mut u8);
}

struct Registry {
    mappers: Vec<Weak<dyn DmaMapper>>,
    regions: Vec<(usize, usize)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    mappers: Vec::new(),
    regions: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// A registered region; dropping it unregisters it.
#[derive(Debug)]
pub struct DmaRegistration {
    ptr: usize,
}

/// Register `len` bytes at `ptr` with every mapper, now and later ones. A
/// mapper that refuses (out of IOMMU space, overlap) is logged: its device
/// then copies through bounce buffers for this memory.
///
/// # Safety
/// The memory must stay mapped until the returned value is dropped, and no
/// IO may be in flight to it then.
pub unsafe fn register_dma_memory(ptr: *mut u8, len: usize) -> DmaRegistration {
    let mut r = registry();
    r.mappers.retain(|m| m.strong_count() > 0);
    for m in r.mappers.iter().filter_map(Weak::upgrade) {
        // SAFETY: forwarded from the caller.
        if let Err(e) = unsafe { m.dma_map(ptr, len) } {
            refused(len, &e);
        }
    }
    r.regions.push((ptr as usize, len));
    DmaRegistration { ptr: ptr as usize }
}

impl Drop for DmaRegistration {
    fn drop(&mut self) {
        let mut r = registry();
        r.regions.retain(|&(p, _)| p != self.ptr);
        for m in r.mappers.iter().filter_map(Weak::upgrade) {
            m.dma_unmap(self.ptr as *mut u8);
        }
    }
}

/// A mapper refused memory: said as a warning once, then at debug (RAID
/// makes small pools as it goes, which a device without an IOMMU cannot
/// map unless they are physically contiguous).
fn refused(len: usize, e: &str) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(bytes = len, error = %e, "memory not mapped for DMA; IO to it is bounced (said once)");
    } else {
        tracing::debug!(bytes = len, error = %e, "memory not mapped for DMA; IO to it is bounced");
    }
}

/// Subscribe `mapper`: it maps every region registered so far, and hears
/// of later ones until it is dropped.
pub fn add_dma_mapper(mapper: &Arc<dyn DmaMapper>) {
    let mut r = registry();
    for &(p, len) in &r.regions {
        // SAFETY: registered regions stay mapped until unregistered, which
        // unmaps them from every live mapper first (under this lock).
        if let Err(e) = unsafe { mapper.dma_map(p as *mut u8, len) } {
            refused(len, &e);
        }
    }
    r.mappers.push(Arc::downgrade(mapper));
}
