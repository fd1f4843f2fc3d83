//! Inflight I/O tracking (vhost-user INFLIGHT_SHMEM, split virtqueues): a
//! shared memory area the frontend keeps across backend restarts, in which
//! the backend marks every request it has taken from the ring until its
//! completion is on the used ring. After a restart the requests still
//! marked are submitted again, in the order they were first taken, so a
//! crashed or restarted appliance loses no guest request.
//!
//! Layout per queue (the one QEMU and libvhost-user use): a 16-byte header
//! `{features: u64, version: u16, desc_num: u16, last_batch_head: u16,
//! used_idx: u16}` then `desc_num` 16-byte entries `{inflight: u8,
//! padding: [u8; 5], next: u16, counter: u64}`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use super::FrontendError;
use memmap2::{MmapOptions, MmapRaw};

const HEADER: usize = 16;
const ENTRY: usize = 16;
const ALIGN: usize = 64;

/// The header's version of an area in use.
const INFLIGHT_VERSION: u16 = 1;

fn queue_bytes(queue_size: u16) -> usize {
    (HEADER + ENTRY * queue_size as usize).div_ceil(ALIGN) * ALIGN
}

/// The whole shared area.
pub struct InflightRegion {
    /// Declared before `map`: unregistered before it is unmapped.
    sigbus: Option<super::sigbus::Registration>,
    map: MmapRaw,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the area is plain shared memory; each queue's part is written
// only by the reactor that runs that queue.
unsafe impl Send for InflightRegion {}
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    fn check(num_queues: u16, queue_size: u16) -> Result<(), FrontendError> {
        if num_queues == 0
            || num_queues > 64
            || queue_size == 0
            || queue_size > 1024
            || !queue_size.is_power_of_two()
        {
            return Err(FrontendError::Invalid(format!(
                "inflight area for {num_queues} queues of size {queue_size} is out of range"
            )));
        }
        Ok(())
    }

    /// A new, empty area in a memfd; returns it, its size and the fd for
    /// the frontend.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(InflightRegion, u64, File), FrontendError> {
        Self::check(num_queues, queue_size)?;
        let size = queue_bytes(queue_size) * num_queues as usize;
        // SAFETY: plain syscall with a NUL-terminated name; result checked.
        let fd = unsafe {
            libc::memfd_create(
                c"appliance-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(FrontendError::os(
                "memfd_create",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd is new and owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)
            .map_err(|e| FrontendError::os("sizing the inflight area", e))?;
        // The frontend gets this file: it must not shrink it under our
        // mapping.
        // SAFETY: fcntl on our own memfd.
        if unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        } != 0
        {
            return Err(FrontendError::os(
                "sealing the inflight area",
                std::io::Error::last_os_error(),
            ));
        }
        let map = MmapOptions::new()
            .len(size)
            .map_raw(&file)
            .map_err(|e| FrontendError::os("mapping the inflight area", e))?;
        let region = InflightRegion {
            sigbus: None,
            map,
            num_queues,
            queue_size,
        };
        for q in 0..num_queues {
            let base = region.queue_base(q);
            // Version 0: never used (libvhost-user's convention). The first
            // start sets it (`InflightQueue::recover`), so a fresh area (a
            // migration's destination) is told from a used one (a
            // reconnect).
            // SAFETY: inside the mapping; header fields at their offsets.
            unsafe {
                std::ptr::write_volatile(base.add(8) as *mut u16, 0); // version
                std::ptr::write_volatile(base.add(10) as *mut u16, queue_size);
            }
        }
        Ok((region, size as u64, file))
    }

    /// Map an area the frontend hands back (after a reconnect).
    pub fn open(
        file: &File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, FrontendError> {
        Self::check(num_queues, queue_size)?;
        let need = queue_bytes(queue_size) * num_queues as usize;
        if (size as usize) < need {
            return Err(FrontendError::Invalid(format!(
                "inflight area of {size} bytes is smaller than the {need} bytes it must hold"
            )));
        }
        if let Some(why) = super::memory::memory_file_problem(file) {
            return Err(FrontendError::Invalid(format!(
                "the inflight area's file is {why}"
            )));
        }
        let len = file
            .metadata()
            .map_err(|e| FrontendError::os("inflight fd", e))?
            .len();
        // At a page of the file: the SIGBUS handler patches whole pages
        // of the mapping, and the start of the page before an unaligned
        // area belongs to whatever else the frontend keeps in its file.
        let page = super::memory::page_size() as u64;
        if !offset.is_multiple_of(page) {
            return Err(FrontendError::Invalid(format!(
                "inflight area at offset {offset}, not at a page ({page} bytes) of its file"
            )));
        }
        // On huge pages, whole ones: the mapping is unmapped (and patched
        // by the SIGBUS handler) in its own length, which must be whole.
        let mut need = need;
        if let Some(page) = super::memory::huge_page(file) {
            if !offset.is_multiple_of(page) {
                return Err(FrontendError::Invalid(format!(
                    "inflight area at offset {offset} of a file of {page}-byte huge pages"
                )));
            }
            need = (need as u64).div_ceil(page).saturating_mul(page) as usize;
            if need as u64 > size {
                return Err(FrontendError::Invalid(format!(
                    "inflight area of {size} bytes is not the whole huge pages its {need} bytes take"
                )));
            }
        }
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(FrontendError::Invalid(format!(
                "inflight area {offset}+{size} runs past the end of its file ({len} bytes)"
            )));
        }
        let map = MmapOptions::new()
            .offset(offset)
            .len(need)
            .map_raw(file)
            .map_err(|e| FrontendError::os("mapping the inflight area", e))?;
        Ok(InflightRegion {
            sigbus: None,
            map,
            num_queues,
            queue_size,
        })
    }

    /// A frontend that shrinks the area's file under our mapping costs its
    /// connection, not the process (see `super::sigbus`).
    pub fn protect(
        &mut self,
        fault: &std::sync::Arc<super::fault::FaultSignal>,
    ) -> Result<(), String> {
        self.sigbus = Some(super::sigbus::register(
            self.map.as_mut_ptr(),
            self.map.len(),
            fault,
        )?);
        Ok(())
    }

    fn queue_base(&self, q: u16) -> *mut u8 {
        // SAFETY: q < num_queues, so the offset is inside the mapping.
        unsafe {
            self.map
                .as_mut_ptr()
                .add(q as usize * queue_bytes(self.queue_size))
        }
    }

    /// The tracking of queue `q`, if the area covers it with this size.
    /// A ring smaller than the area's (QEMU sizes the area with its
    /// queue-size; a guest may choose less: SeaBIOS, a Linux short of
    /// memory) uses the first `size` entries: refused, that queue ran with
    /// no tracking, and its requests in flight were lost at a reconnect.
    pub fn queue(self: &Arc<Self>, q: u16, size: u16) -> Option<InflightQueue> {
        if q >= self.num_queues || size == 0 || size > self.queue_size {
            return None;
        }
        Some(InflightQueue {
            base: self.queue_base(q),
            size,
            counter: 0,
            _region: self.clone(),
        })
    }
}

/// One queue's tracking, used only by the reactor running the queue.
pub struct InflightQueue {
    base: *mut u8,
    size: u16,
    counter: u64,
    _region: Arc<InflightRegion>,
}

// SAFETY: moved once to the reactor that owns the queue.
unsafe impl Send for InflightQueue {}

impl InflightQueue {
    fn entry(&self, head: u16) -> *mut u8 {
        // SAFETY: head < size (checked by callers), inside this queue's part.
        unsafe { self.base.add(HEADER + ENTRY * head as usize) }
    }

    /// A request was taken from the avail ring.
    #[inline]
    pub fn begin(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        // The counter carries on from the frontend's area, whose values
        // are its own: a hostile maximum wraps (its requests' order is
        // all it can spoil), it never panics the reactor.
        self.counter = self.counter.wrapping_add(1);
        let e = self.entry(head);
        // SAFETY: in bounds; the frontend reads this only after we die.
        unsafe {
            std::ptr::write_volatile(e.add(8) as *mut u64, self.counter);
            std::ptr::write_volatile(e, 1);
        }
    }

    /// About to put `head` on the used ring.
    #[inline]
    pub fn before_used(&mut self, head: u16) {
        // SAFETY: header field in bounds.
        unsafe { std::ptr::write_volatile(self.base.add(12) as *mut u16, head) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    }

    /// `head` is on the used ring, whose index is now `used_idx`.
    #[inline]
    pub fn after_used(&mut self, head: u16, used_idx: u16) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        if head < self.size {
            // SAFETY: in bounds.
            unsafe { std::ptr::write_volatile(self.entry(head), 0) };
        }
        // SAFETY: header field in bounds.
        unsafe { std::ptr::write_volatile(self.base.add(14) as *mut u16, used_idx) };
    }

    /// After a restart: settle the last completion if its used-ring update
    /// landed, then return the heads still in flight, oldest first. `None`
    /// for an area never used before (a migration's destination, a first
    /// start): nothing was in flight here, and the frontend's ring base
    /// stands. (Taken as used, its next request was put at the used index:
    /// a source that handed over a base past its used index had requests
    /// run twice and others never.)
    pub fn recover(&mut self, ring_used_idx: u16) -> Option<Vec<u16>> {
        // SAFETY: header field in bounds.
        let version = unsafe { std::ptr::read_volatile(self.base.add(8) as *const u16) };
        if version == 0 {
            // SAFETY: header fields in bounds.
            unsafe {
                std::ptr::write_volatile(self.base.add(8) as *mut u16, INFLIGHT_VERSION);
                std::ptr::write_volatile(self.base.add(14) as *mut u16, ring_used_idx);
            }
            return None;
        }
        // SAFETY: header fields in bounds.
        let (last_head, used_idx) = unsafe {
            (
                std::ptr::read_volatile(self.base.add(12) as *const u16),
                std::ptr::read_volatile(self.base.add(14) as *const u16),
            )
        };
        if used_idx != ring_used_idx {
            if last_head < self.size {
                // SAFETY: in bounds.
                unsafe { std::ptr::write_volatile(self.entry(last_head), 0) };
            }
            // SAFETY: header field in bounds.
            unsafe { std::ptr::write_volatile(self.base.add(14) as *mut u16, ring_used_idx) };
        }
        let mut heads: Vec<(u64, u16)> = (0..self.size)
            .filter_map(|h| {
                let e = self.entry(h);
                // SAFETY: in bounds.
                let (flag, counter) = unsafe {
                    (
                        std::ptr::read_volatile(e),
                        std::ptr::read_volatile(e.add(8) as *const u64),
                    )
                };
                (flag == 1).then_some((counter, h))
            })
            .collect();
        heads.sort_unstable();
        self.counter = heads.iter().map(|h| h.0).max().unwrap_or(0);
        Some(heads.into_iter().map(|(_, h)| h).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_in_flight_survive_a_reopen_in_order() {
        let (region, size, file) = InflightRegion::create(2, 8).unwrap();
        let region = Arc::new(region);
        let mut q = region.queue(1, 8).unwrap();
        assert!(region.queue(2, 8).is_none());
        assert!(region.queue(0, 16).is_none());
        // A new area: nothing to recover, the frontend's base stands.
        assert_eq!(q.recover(0), None);
        for head in [5, 2, 7, 0] {
            q.begin(head);
        }
        // 2 completes fully; 7's used update lands but the crash comes
        // before its flag is cleared.
        q.before_used(2);
        q.after_used(2, 1);
        q.before_used(7);
        drop(q);
        let reopened = Arc::new(InflightRegion::open(&file, 0, size, 2, 8).unwrap());
        let mut q = reopened.queue(1, 8).unwrap();
        // The used ring says two completions made it.
        assert_eq!(q.recover(2), Some(vec![5, 0]));
        // A fresh begin continues the order.
        q.begin(3);
        assert_eq!(q.recover(2), Some(vec![5, 0, 3]));
        // The other queue is untouched: never started, it is new.
        let mut q0 = reopened.queue(0, 8).unwrap();
        assert_eq!(q0.recover(0), None);
        // From review: a ring smaller than the area's is tracked too.
        let mut small = reopened.queue(0, 4).expect("a smaller ring");
        small.begin(2);
        assert_eq!(small.recover(0), Some(vec![2]));
        assert!(reopened.queue(0, 16).is_none(), "a larger one does not fit");
    }

    #[test]
    fn bad_areas_are_refused() {
        assert!(InflightRegion::create(0, 8).is_err());
        assert!(InflightRegion::create(1, 100).is_err());
        let (_, size, file) = InflightRegion::create(1, 8).unwrap();
        assert!(
            InflightRegion::open(&file, 0, size, 2, 8).is_err(),
            "too small for 2 queues"
        );
        assert!(
            InflightRegion::open(&file, 4096, size, 1, 8).is_err(),
            "past the end"
        );
        assert!(InflightRegion::open(&file, u64::MAX, size, 1, 8).is_err());
        // A frontend's own file (the one create() makes is sealed).
        // SAFETY: memfd_create with a valid name; the fd is ours.
        let file = unsafe {
            use std::os::fd::FromRawFd;
            let fd = libc::memfd_create(c"inflight-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            File::from_raw_fd(fd)
        };
        file.set_len(size + 4096).unwrap();
        assert!(
            InflightRegion::open(&file, 64, size, 1, 8).is_err(),
            "not at a page"
        );
        assert!(InflightRegion::open(&file, 4096, size, 1, 8).is_ok());
        // From review: any descriptor was mapped (a device, a pipe).
        let null = File::open("/dev/null").unwrap();
        assert!(InflightRegion::open(&null, 0, size, 1, 8).is_err());
    }
}
