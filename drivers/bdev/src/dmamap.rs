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
    // The mappers are called without the registry's lock: an IOMMU map
    // pins (and faults in) the whole region, which for guest memory takes
    // seconds, and a channel that registers a small pool on a reactor
    // would wait that long behind it. A mapper added meanwhile maps this
    // region itself (it is listed before the lock is let go).
    let mappers: Vec<Arc<dyn DmaMapper>> = {
        let mut r = registry();
        r.mappers.retain(|m| m.strong_count() > 0);
        r.regions.push((ptr as usize, len));
        r.mappers.iter().filter_map(Weak::upgrade).collect()
    };
    for m in mappers {
        // SAFETY: forwarded from the caller.
        if let Err(e) = unsafe { m.dma_map(ptr, len) } {
            refused(len, &e);
        }
    }
    DmaRegistration { ptr: ptr as usize }
}

impl Drop for DmaRegistration {
    fn drop(&mut self) {
        // Unlisted first, under the lock (no mapper added later maps it),
        // then unmapped from every mapper there is, without the lock.
        let mappers: Vec<Arc<dyn DmaMapper>> = {
            let mut r = registry();
            r.regions.retain(|&(p, _)| p != self.ptr);
            r.mappers.iter().filter_map(Weak::upgrade).collect()
        };
        for m in mappers {
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

/// Whether a driver maps memory for its device now (an IOMMU): memory
/// registered then is pinned.
pub fn dma_mappers_present() -> bool {
    registry().mappers.iter().any(|m| m.strong_count() > 0)
}

/// Subscribe `mapper`: it maps every region registered so far, and hears
/// of later ones until it is dropped.
pub fn add_dma_mapper(mapper: &Arc<dyn DmaMapper>) {
    let mut r = registry();
    for &(p, len) in &r.regions {
        // SAFETY: registered regions stay mapped until unregistered, which
        // unlists them under this lock before it unmaps them from every
        // mapper listed then (this one too, once pushed below).
        if let Err(e) = unsafe { mapper.dma_map(p as *mut u8, len) } {
            refused(len, &e);
        }
    }
    r.mappers.push(Arc::downgrade(mapper));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Condvar};
    use std::time::Duration;

    /// A mapper whose map of one region waits until the test lets it go
    /// (an IOMMU pinning a large guest).
    #[derive(Default)]
    struct Slow {
        hold: usize,
        state: Mutex<(bool, bool)>, // (started, released)
        cv: Condvar,
        mapped: Mutex<Vec<usize>>,
    }

    impl DmaMapper for Slow {
        unsafe fn dma_map(&self, ptr: *mut u8, _len: usize) -> Result<(), String> {
            if ptr as usize == self.hold {
                let mut s = self.state.lock().unwrap();
                s.0 = true;
                self.cv.notify_all();
                while !s.1 {
                    s = self.cv.wait(s).unwrap();
                }
            }
            self.mapped.lock().unwrap().push(ptr as usize);
            Ok(())
        }
        fn dma_unmap(&self, ptr: *mut u8) {
            self.mapped.lock().unwrap().retain(|&p| p != ptr as usize);
        }
    }

    /// From review: the registry's lock was held across every mapper's
    /// map, so a RAID channel registering a small pool on a reactor
    /// waited for a guest's whole memory to be pinned.
    #[test]
    fn a_slow_map_holds_up_no_other_registration() {
        let a = vec![0u8; 8192];
        let b = vec![0u8; 8192];
        let (pa, pb) = (a.as_ptr() as usize, b.as_ptr() as usize);
        let slow = Arc::new(Slow {
            hold: pa,
            ..Default::default()
        });
        let m: Arc<dyn DmaMapper> = slow.clone();
        add_dma_mapper(&m);
        // SAFETY (both): the vectors outlive their registrations.
        let first = std::thread::spawn(move || unsafe { register_dma_memory(pa as *mut u8, 8192) });
        {
            let mut s = slow.state.lock().unwrap();
            while !s.0 {
                s = slow.cv.wait(s).unwrap();
            }
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(unsafe { register_dma_memory(pb as *mut u8, 8192) });
        });
        let second = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("registered while another region's map was slow");
        assert_eq!(*slow.mapped.lock().unwrap(), vec![pb]);
        slow.state.lock().unwrap().1 = true;
        slow.cv.notify_all();
        let first = first.join().unwrap();
        assert_eq!(slow.mapped.lock().unwrap().len(), 2);
        drop(first);
        drop(second);
        assert!(slow.mapped.lock().unwrap().is_empty(), "both unmapped");
        drop(a);
        drop(b);
    }
}
