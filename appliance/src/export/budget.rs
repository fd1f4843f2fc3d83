//! Guest memory every connection's table holds, daemon-wide. With a device
//! that maps memory for DMA (an IOMMU), registered guest memory is pinned:
//! allocated, zeroed and never reclaimed, on the daemon's account. Each
//! export's own limit defaults to the host's memory, so two frontends
//! with sparse files of most of it pinned more than the host has, and the
//! OOM killer took the daemon and every VM's disk with it (audit). Their
//! sum is held within a budget then.
//!
//! Only each connection's current table counts: a table being replaced
//! stays mapped while requests still use it, but it is the same memory
//! (the frontend's files) the new one maps again.

use std::sync::Mutex;

use super::FrontendError;

/// Bytes of every connection's current table.
static TABLES: Mutex<u64> = Mutex::new(0);

/// One connection's share of the daemon-wide total: the bytes of its
/// current table, given back when dropped.
#[derive(Debug, Default)]
pub struct TableShare(u64);

impl TableShare {
    /// Make this connection's share `bytes`, and say what it was. Growing
    /// it is refused when memory is pinned for DMA and every connection's
    /// tables would pass [`pin_budget`]; `checked` false (putting back a
    /// share a failed change took) never refuses.
    pub fn resize(&mut self, bytes: u64, checked: bool) -> Result<u64, FrontendError> {
        let mut all = TABLES.lock().unwrap_or_else(|e| e.into_inner());
        let others = all.saturating_sub(self.0);
        if checked && bytes > self.0 && bdev::dma_mappers_present() {
            let budget = pin_budget();
            let sum = others.saturating_add(bytes);
            if sum > budget {
                return Err(FrontendError::Invalid(format!(
                    "guest memory of {bytes} bytes would make the daemon's connections hold {sum} bytes, over the {budget} bytes it may pin for DMA (the host's memory less a reserve)"
                )));
            }
        }
        *all = others.saturating_add(bytes);
        Ok(std::mem::replace(&mut self.0, bytes))
    }
}

impl Drop for TableShare {
    fn drop(&mut self) {
        let mut all = TABLES.lock().unwrap_or_else(|e| e.into_inner());
        *all = all.saturating_sub(self.0);
    }
}

/// Guest memory the daemon may pin, all connections together: the host's
/// memory less an eighth of it (at least 1 GiB) for the host itself and
/// the daemon's own memory.
pub fn pin_budget() -> u64 {
    let total = crate::host::memory_total().unwrap_or(u64::MAX);
    total.saturating_sub((total / 8).max(1 << 30))
}
