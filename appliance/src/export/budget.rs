//! Guest memory every connection's table holds, daemon-wide. With a device
//! that maps memory for DMA (an IOMMU), registered guest memory is pinned:
//! allocated, zeroed and never reclaimed, on the daemon's account. Each
//! export's own limit defaults to the host's memory, so two frontends
//! with sparse files of most of it pinned more than the host has, and the
//! OOM killer took the daemon and every VM's disk with it (audit). Their
//! sum is held within a budget then.
//!
//! Memory is counted by the file that backs it: the disks of one VM each
//! map the same guest memory, and pinning the same pages twice takes no
//! more (review: counting each connection whole refused a VM's second
//! disk). A file counts with what all connections map of it, but no more
//! than its length (counting only the most one connection maps let two
//! map different halves of one file: review). Only
//! each connection's current table counts: a table being replaced stays
//! mapped while requests still use it, but it is the same files the new
//! one maps again.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::FrontendError;

/// A backing file: its device and inode.
pub type FileKey = (u64, u64);

/// A file behind guest memory: which it is, and its length.
pub type FileOf = (FileKey, u64);

/// The file `f` is, and its length now.
pub fn file_of(f: &File) -> Result<FileOf, FrontendError> {
    let m = f
        .metadata()
        .map_err(|e| FrontendError::os("looking at a guest memory file", e))?;
    Ok(((m.dev(), m.ino()), m.len()))
}

/// What one table maps of one file: bytes, and the file's length.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Use {
    bytes: u64,
    len: u64,
}

/// Guest memory by file, in one table.
pub type Files = HashMap<FileKey, Use>;

/// Count `bytes` of file `of` in `files`.
pub fn count(files: &mut Files, of: FileOf, bytes: u64) {
    let u = files.entry(of.0).or_default();
    u.bytes = u.bytes.saturating_add(bytes);
    u.len = u.len.max(of.1);
}

/// Every connection's files: file -> connection -> use.
static TABLES: Mutex<Option<HashMap<FileKey, HashMap<u64, Use>>>> = Mutex::new(None);

/// The daemon-wide total: each file with what every connection maps of
/// it, at most its length.
fn total(all: &HashMap<FileKey, HashMap<u64, Use>>) -> u64 {
    all.values()
        .map(|by| {
            let mapped = by.values().map(|u| u.bytes).fold(0, u64::saturating_add);
            let len = by.values().map(|u| u.len).max().unwrap_or(0);
            mapped.min(len)
        })
        .fold(0, u64::saturating_add)
}

/// One connection's share of the daemon-wide total, given back when
/// dropped.
#[derive(Debug)]
pub struct TableShare {
    id: u64,
    files: Files,
}

impl Default for TableShare {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        TableShare {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            files: Files::new(),
        }
    }
}

impl TableShare {
    /// Make this connection's share `files`, and hand back what it was.
    /// Refused when memory is pinned for DMA and the daemon-wide total
    /// would grow past [`pin_budget`]; `checked` false (putting back a
    /// share a failed change took, or letting go) never refuses.
    pub fn resize(&mut self, files: Files, checked: bool) -> Result<Files, FrontendError> {
        let mut guard = TABLES.lock().unwrap_or_else(|e| e.into_inner());
        let all = guard.get_or_insert_with(HashMap::new);
        let before = total(all);
        let mut after = all.clone();
        for key in self.files.keys() {
            if let Some(by) = after.get_mut(key) {
                by.remove(&self.id);
            }
        }
        for (&key, &u) in &files {
            after.entry(key).or_default().insert(self.id, u);
        }
        after.retain(|_, by| !by.is_empty());
        let sum = total(&after);
        if checked && sum > before && bdev::dma_mappers_present() {
            let budget = pin_budget();
            if sum > budget {
                return Err(FrontendError::Invalid(format!(
                    "this guest memory would make the daemon's connections hold {sum} bytes, over the {budget} bytes it may pin for DMA (the host's memory less a reserve)"
                )));
            }
        }
        *all = after;
        Ok(std::mem::replace(&mut self.files, files))
    }
}

impl Drop for TableShare {
    fn drop(&mut self) {
        let _ = self.resize(Files::new(), false);
    }
}

/// Guest memory the daemon may pin, all connections together: the host's
/// memory less an eighth of it, at least 1 GiB but at most a quarter, for
/// the host itself and the daemon's own memory. (A flat 1 GiB left a
/// small host, a 512 MiB test guest, no budget at all: CI.)
pub fn pin_budget() -> u64 {
    let total = crate::host::memory_total().unwrap_or(u64::MAX);
    total.saturating_sub((total / 8).max(1 << 30).min(total / 4))
}
