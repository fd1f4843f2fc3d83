//! A split virtqueue's available and used rings (virtio 1.x, 2.7), read
//! and written through host pointers translated once per guest memory map.
//!
//! virtio-queue does the same through vm-memory on every access: a region
//! search and a bounds-checked copy per index read or used entry, about a
//! sixth of the export's CPU per request in perf. The queue set-up still
//! comes from virtio-queue (`Queue::is_valid` checked the rings fit guest
//! memory); this only replaces the per-request ring accesses, with the same
//! ordering: Acquire on the guest's indices, Release on ours, and a full
//! fence before a notification decision.

use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use super::dirtylog::DirtyLog;
use super::memory::GuestMap;
use super::FrontendError;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

/// VRING_USED_F_NO_NOTIFY.
const NO_NOTIFY: u16 = 1;

/// The rings of one queue on one memory map.
pub struct Ring {
    avail: *mut u8,
    used: *mut u8,
    /// The descriptor table, if it lies in one region (else null: nothing
    /// is prefetched, the chain walk translates it itself).
    desc: *const u8,
    avail_gpa: u64,
    used_gpa: u64,
    desc_gpa: u64,
    /// The guest's avail index as `pop` last read it (entries up to it are
    /// taken before it is read again).
    avail_idx: u16,
    size: u16,
    event_idx: bool,
    next_avail: u16,
    next_used: u16,
    /// The used index at the last notification decision (EVENT_IDX).
    signalled_used: Option<u16>,
    /// The connection's dirty log while the frontend logs (live
    /// migration): every write to the used ring is marked in it.
    log: Option<Arc<DirtyLog>>,
}

// SAFETY: the pointers are into guest memory the export keeps mapped for
// as long as the memory map they came from, which the owning runner holds;
// the runner and its ring stay on one reactor.
unsafe impl Send for Ring {}

/// Start fetching the cache line at `p` (a hint: it never faults).
#[inline]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch has no preconditions (SSE is baseline on x86_64).
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The host address of `len` bytes at guest address `gpa`, if they lie in
/// one region and are aligned to `align`.
fn host(mem: &GuestMemoryMmap, gpa: u64, len: u64, align: u64) -> Option<*mut u8> {
    if !gpa.is_multiple_of(align) {
        return None;
    }
    let (region, offset) = mem.to_region_addr(GuestAddress(gpa))?;
    if offset.0.checked_add(len)? > region.len() {
        return None;
    }
    region.get_host_address(MemoryRegionAddress(offset.0)).ok()
}

impl Ring {
    /// The rings of `q` (validated by `Queue::is_valid`) in `mem`, carrying
    /// on from the queue's indices.
    pub fn new(q: &Queue, mem: &GuestMap) -> Result<Ring, FrontendError> {
        // A split ring's size is a power of two (virtio 1.x, 2.7; virtio-
        // queue refuses others): slots are indices masked, not divided.
        if !q.size().is_power_of_two() {
            return Err(FrontendError::Invalid(format!(
                "queue size {} is not a power of two",
                q.size()
            )));
        }
        let mut r = Ring {
            avail: std::ptr::null_mut(),
            used: std::ptr::null_mut(),
            desc: std::ptr::null(),
            avail_gpa: q.avail_ring(),
            used_gpa: q.used_ring(),
            desc_gpa: q.desc_table(),
            avail_idx: q.next_avail(),
            size: q.size(),
            event_idx: q.event_idx_enabled(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            signalled_used: None,
            log: None,
        };
        r.remap(mem)?;
        Ok(r)
    }

    /// Translate the rings again (the guest memory map changed).
    /// On failure the ring holds null pointers: the old ones may point
    /// into memory that is unmapped once the old map goes, and the caller
    /// must not use the ring until a remap succeeds.
    pub fn remap(&mut self, mem: &GuestMap) -> Result<(), FrontendError> {
        self.avail = std::ptr::null_mut();
        self.used = std::ptr::null_mut();
        self.desc = std::ptr::null();
        // Read the guest's index again through the new map.
        self.avail_idx = self.next_avail;
        let n = self.size as u64;
        let avail = host(mem, self.avail_gpa, 6 + 2 * n, 2).ok_or_else(|| {
            FrontendError::Invalid(format!(
                "avail ring at {:#x} is not in one guest memory region",
                self.avail_gpa
            ))
        })?;
        let used = host(mem, self.used_gpa, 6 + 8 * n, 4).ok_or_else(|| {
            FrontendError::Invalid(format!(
                "used ring at {:#x} is not in one guest memory region",
                self.used_gpa
            ))
        })?;
        (self.avail, self.used) = (avail, used);
        self.desc =
            host(mem, self.desc_gpa, 16 * n, 16).map_or(std::ptr::null(), |p| p.cast_const());
        Ok(())
    }

    /// The head `k` entries after the next one `pop` returns, if the guest
    /// had made it available when `pop` last read its index (no new read
    /// of the index: that line is the one the guest keeps writing).
    #[inline]
    pub fn peek(&self, k: u16) -> Option<u16> {
        let ahead = self.avail_idx.wrapping_sub(self.next_avail);
        if k >= ahead || ahead > self.size {
            return None;
        }
        Some(self.avail_entry(self.next_avail.wrapping_add(k)))
    }

    /// The head in the avail ring's entry for request `i` (any index: the
    /// slot wraps).
    #[inline]
    fn avail_entry(&self, i: u16) -> u16 {
        let slot = (i & (self.size - 1)) as usize;
        self.u16_at(self.avail, 4 + 2 * slot)
            .load(Ordering::Relaxed)
    }

    /// Descriptor `head` in the table, if it is one and the table lies in
    /// one region.
    #[inline]
    fn desc_ptr(&self, head: u16) -> Option<*const u8> {
        if head >= self.size || self.desc.is_null() {
            return None;
        }
        // SAFETY: inside the table (head < size; the table's 16 * size
        // bytes were checked in `remap`).
        Some(unsafe { self.desc.add(16 * head as usize) })
    }

    /// Start fetching descriptor `head` into the cache.
    #[inline]
    pub fn prefetch_desc(&self, head: u16) {
        if let Some(p) = self.desc_ptr(head) {
            prefetch(p);
        }
    }

    /// The buffer address in descriptor `head` as the guest wrote it now
    /// (a hint for prefetching only: the chain walk reads it again).
    #[inline]
    pub fn desc_addr(&self, head: u16) -> Option<u64> {
        let p = self.desc_ptr(head)?;
        // SAFETY: inside the table; unaligned-safe (a region's host start
        // need not be aligned as its guest address is); a racing guest
        // write only changes the value read.
        Some(u64::from_le(unsafe {
            std::ptr::read_unaligned(p as *const u64)
        }))
    }

    fn u16_at(&self, base: *mut u8, off: usize) -> &AtomicU16 {
        // SAFETY: `off` is inside the ring (checked in `remap`) and 2-byte
        // aligned (the ring's base is); guest memory outlives the map.
        unsafe { AtomicU16::from_ptr(base.add(off) as *mut u16) }
    }

    /// The next request's head, `Ok(None)` when the ring is empty, or an
    /// error when the guest's index runs further ahead than the ring holds.
    #[inline]
    pub fn pop(&mut self) -> Result<Option<u16>, FrontendError> {
        // The index is read again only once the entries it announced are
        // taken: the guest writes that line on another core with every
        // request, and reading it per pop was a sixth of the export's time
        // per request (perf), as SPDK's and DPDK's vrings also read it once
        // per batch. Its Acquire covers the entries up to it.
        let mut ahead = self.avail_idx.wrapping_sub(self.next_avail);
        if ahead == 0 {
            self.avail_idx = self.u16_at(self.avail, 2).load(Ordering::Acquire);
            ahead = self.avail_idx.wrapping_sub(self.next_avail);
            if ahead == 0 {
                return Ok(None);
            }
        }
        let idx = self.avail_idx;
        if ahead > self.size {
            return Err(FrontendError::Invalid(format!(
                "avail index {idx} is {ahead} entries past ours, more than the {} the ring holds",
                self.size
            )));
        }
        let head = self.avail_entry(self.next_avail);
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Give the last popped request back.
    pub fn undo_pop(&mut self) {
        self.next_avail = self.next_avail.wrapping_sub(1);
    }

    /// Return `head` with `len` bytes written to the guest.
    #[inline]
    pub fn add_used(&mut self, head: u16, len: u32) {
        let slot = (self.next_used & (self.size - 1)) as usize;
        // SAFETY: the entry is inside the used ring (checked in `remap`),
        // 4-byte aligned; a racing guest can only corrupt its own view.
        unsafe {
            let e = self.used.add(4 + 8 * slot) as *mut u32;
            std::ptr::write_volatile(e, head as u32);
            std::ptr::write_volatile(e.add(1), len);
        }
        self.next_used = self.next_used.wrapping_add(1);
        // The entry is visible before the index that announces it.
        self.u16_at(self.used, 2)
            .store(self.next_used, Ordering::Release);
        self.mark_used();
    }

    /// Mark the used ring in `log` from now on (the runner's, see
    /// `LogSwitch`).
    pub fn set_log(&mut self, log: Option<Arc<DirtyLog>>) {
        self.log = log;
    }

    /// Mark the used ring (flags, index, entries, avail event) in the
    /// dirty log, if the frontend logs: after the write, so a log sync
    /// between the two cannot clear the mark and copy the old bytes.
    fn mark_used(&self) {
        if let Some(log) = &self.log {
            log.mark(self.used_gpa, 6 + 8 * self.size as u64);
        }
    }

    /// Ask the guest to kick for new requests; true if some arrived
    /// meanwhile (look at the ring again).
    pub fn enable_notification(&mut self) -> bool {
        if self.event_idx {
            let at = 4 + 8 * self.size as usize;
            self.u16_at(self.used, at)
                .store(self.next_avail, Ordering::Relaxed);
        } else {
            self.u16_at(self.used, 0).store(0, Ordering::Relaxed);
        }
        self.mark_used();
        // The guest must see the request for kicks before we look again.
        fence(Ordering::SeqCst);
        self.u16_at(self.avail, 2).load(Ordering::Relaxed) != self.next_avail
    }

    /// Tell the guest not to kick (without EVENT_IDX; with it the guest
    /// kicks only when the avail event asks).
    pub fn disable_notification(&mut self) {
        if !self.event_idx {
            self.u16_at(self.used, 0)
                .store(NO_NOTIFY, Ordering::Relaxed);
            self.mark_used();
        }
    }

    /// Whether the guest wants an interrupt for what was added since the
    /// last decision (EVENT_IDX's used event; without it, unless the
    /// driver set VIRTQ_AVAIL_F_NO_INTERRUPT).
    pub fn needs_notification(&mut self) -> bool {
        let used = self.next_used;
        // Our used entries are visible before we read the guest's event.
        fence(Ordering::SeqCst);
        if !self.event_idx {
            // VIRTQ_AVAIL_F_NO_INTERRUPT: a driver that polls asks for none.
            return self.u16_at(self.avail, 0).load(Ordering::Relaxed) & 1 == 0;
        }
        let Some(old) = self.signalled_used.replace(used) else {
            return true;
        };
        let at = 4 + 2 * self.size as usize;
        let event = self.u16_at(self.avail, at).load(Ordering::Relaxed);
        // vring_need_event: the event index lies in (old, used].
        used.wrapping_sub(event).wrapping_sub(1) < used.wrapping_sub(old)
    }

    /// Requests popped so far (the index to continue from).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Continue popping from `idx`.
    pub fn set_next_avail(&mut self, idx: u16) {
        self.next_avail = idx;
        // Nothing past it is known to be announced: read the index again.
        self.avail_idx = idx;
    }

    /// Used entries added so far.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const SIZE: u16 = 8;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    /// A ring of 8 over 64 KiB of test memory, and that memory.
    fn ring() -> (Ring, GuestMap) {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("test memory");
        let map = GuestMap::for_test(mem);
        let mut q = Queue::new(SIZE).expect("queue");
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(&*map));
        let r = Ring::new(&q, &map).expect("ring");
        (r, map)
    }

    /// The guest makes entries `[from, to)` available, entry i holding
    /// head 10 + i (mod the ring), and publishes `to`.
    fn announce(mem: &GuestMap, from: u16, to: u16) {
        let mut i = from;
        while i != to {
            let slot = (i % SIZE) as u64;
            mem.write_obj(
                i.wrapping_add(10) % SIZE,
                GuestAddress(AVAIL + 4 + 2 * slot),
            )
            .expect("avail entry");
            i = i.wrapping_add(1);
        }
        mem.write_obj(to, GuestAddress(AVAIL + 2))
            .expect("avail idx");
    }

    fn head(i: u16) -> u16 {
        i.wrapping_add(10) % SIZE
    }

    #[test]
    fn pops_what_was_announced_in_order_and_then_nothing() {
        let (mut r, mem) = ring();
        announce(&mem, 0, 3);
        for i in 0..3 {
            assert_eq!(r.pop().expect("pop"), Some(head(i)));
        }
        assert_eq!(r.pop().expect("pop"), None);
        // Announced later: read again once the cached ones are taken.
        announce(&mem, 3, 5);
        assert_eq!(r.pop().expect("pop"), Some(head(3)));
        assert_eq!(r.pop().expect("pop"), Some(head(4)));
        assert_eq!(r.pop().expect("pop"), None);
    }

    #[test]
    fn set_next_avail_forgets_the_cached_index() {
        let (mut r, mem) = ring();
        announce(&mem, 0, 4);
        assert_eq!(r.pop().expect("pop"), Some(head(0)));
        assert_eq!(r.pop().expect("pop"), Some(head(1)));
        // A restart continues from 0, and the guest now says only 1 is
        // available (its index went back, as after a reset).
        r.set_next_avail(0);
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).expect("idx");
        assert_eq!(r.pop().expect("pop"), Some(head(0)));
        assert_eq!(r.pop().expect("pop"), None);
    }

    #[test]
    fn a_runaway_index_is_refused_once_the_cached_entries_are_taken() {
        let (mut r, mem) = ring();
        announce(&mem, 0, 3);
        assert_eq!(r.pop().expect("pop"), Some(head(0)));
        // Now the index runs more than the ring ahead.
        mem.write_obj(3 + SIZE + 5, GuestAddress(AVAIL + 2))
            .expect("idx");
        assert_eq!(r.pop().expect("pop"), Some(head(1)));
        assert_eq!(r.pop().expect("pop"), Some(head(2)));
        assert!(r.pop().is_err(), "a runaway index must be refused");
    }

    #[test]
    fn undo_pop_gives_the_same_head_back() {
        let (mut r, mem) = ring();
        announce(&mem, 0, 2);
        assert_eq!(r.pop().expect("pop"), Some(head(0)));
        assert_eq!(r.pop().expect("pop"), Some(head(1)));
        r.undo_pop();
        assert_eq!(r.pop().expect("pop"), Some(head(1)));
        assert_eq!(r.pop().expect("pop"), None);
    }

    #[test]
    fn peek_sees_only_announced_entries_and_desc_addr_only_the_table() {
        let (mut r, mem) = ring();
        announce(&mem, 0, 3);
        assert_eq!(r.pop().expect("pop"), Some(head(0)));
        assert_eq!(r.peek(0), Some(head(1)));
        assert_eq!(r.peek(1), Some(head(2)));
        assert_eq!(r.peek(2), None);
        mem.write_obj(0xabcd_0000u64, GuestAddress(DESC + 16 * 3))
            .expect("desc");
        assert_eq!(r.desc_addr(3), Some(0xabcd_0000));
        assert_eq!(r.desc_addr(SIZE), None);
        r.prefetch_desc(SIZE); // out of the table: nothing happens
        r.prefetch_desc(u16::MAX);
    }
}
