//! The frontend's dirty log for live migration (vhost-user SET_LOG_BASE with
//! VHOST_F_LOG_ALL): a bitmap in shared memory with one bit per 4 KiB page
//! of guest physical memory, bit `n % 8` of byte `n / 8` for page `n`.
//! While logging is on, every guest page the backend writes (data read
//! into guest buffers, status bytes, the used ring) is marked before the
//! used index makes the request visible; the frontend copies those pages
//! again. Bits are set with atomic ORs: the frontend clears them
//! concurrently with atomic exchanges.

use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

/// Guest pages the log has a bit for are this big.
pub const LOG_PAGE: u64 = 4096;

/// Largest log we map: one bit per 4 KiB page of 16 TiB of guest memory.
const MAX_LOG_BYTES: u64 = (16 << 40) / LOG_PAGE / 8;

/// The log a connection's queues mark in: the one SET_LOG_BASE gave
/// while VHOST_F_LOG_ALL is on, else none. Switched without draining the
/// queues (each picks it up at the start of its next poll, see
/// `version`): a switch that waited for a device to give back its
/// requests could time out, and QEMU (to 9.0 at least) aborts the whole VM
/// when a backend refuses to start logging (audit).
#[derive(Default)]
pub struct LogSwitch {
    version: AtomicU64,
    log: std::sync::Mutex<Option<Arc<DirtyLog>>>,
}

impl LogSwitch {
    /// Bumped by every switch: a queue that saw another takes `get` again.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The log to mark in now.
    pub fn get(&self) -> Option<Arc<DirtyLog>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Mark in `log` from now on (once each queue has looked).
    pub fn set(&self, log: Option<Arc<DirtyLog>>) {
        *self.log.lock().unwrap_or_else(|e| e.into_inner()) = log;
        self.version.fetch_add(1, Ordering::Release);
    }
}

/// A mapped dirty log.
pub struct DirtyLog {
    /// Dropped before `map`: the SIGBUS table never names an unmapped range.
    _sigbus: super::sigbus::Registration,
    map: MmapRaw,
    /// Bits we set (a page written twice counts twice).
    marked: AtomicU64,
    /// Writes that fell beyond the end of the log (a frontend that sized it
    /// too small); they cannot be recorded.
    beyond: AtomicU64,
}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog")
            .field("bytes", &self.map.len())
            .finish()
    }
}

impl DirtyLog {
    /// Map `size` bytes of `file` from `offset`, as SET_LOG_BASE names them.
    pub fn map(
        file: &File,
        size: u64,
        offset: u64,
        fault: &Arc<super::fault::FaultSignal>,
    ) -> Result<DirtyLog, String> {
        if size == 0 || size > MAX_LOG_BYTES {
            return Err(format!(
                "a dirty log of {size} bytes (1 to {MAX_LOG_BYTES} accepted)"
            ));
        }
        if !offset.is_multiple_of(super::memory::page_size() as u64) {
            return Err(format!("dirty log offset {offset:#x} is not page aligned"));
        }
        if offset.checked_add(size).is_none() {
            return Err(format!("dirty log {offset:#x}+{size:#x} overflows"));
        }
        let meta = file
            .metadata()
            .map_err(|e| format!("dirty log file: {e}"))?;
        // A memory file (memfd, tmpfs, hugetlbfs), as QEMU sends: a device
        // or pipe has no length to check, and a mapping past a file's end
        // faults on the reactor that writes there.
        if let Some(why) = super::memory::memory_file_problem(file) {
            return Err(format!("the dirty log's file is {why}"));
        }
        super::memory::whole_huge_pages(file, offset, size).map_err(|page| {
            format!(
                "dirty log {offset:#x}+{size:#x} on {page:#x}-byte huge pages is not whole pages"
            )
        })?;
        let len = meta.len();
        if offset + size > len {
            return Err(format!(
                "dirty log {offset:#x}+{size:#x} is beyond its file ({len:#x} bytes)"
            ));
        }
        let map = MmapOptions::new()
            .offset(offset)
            .len(size as usize)
            .map_raw(file)
            .map_err(|e| format!("mapping the dirty log: {e}"))?;
        // The frontend may still shrink the file under the mapping: a mark
        // there then costs its connection, not the daemon (sigbus.rs).
        let sigbus = super::sigbus::register(map.as_mut_ptr(), map.len(), fault)?;
        Ok(DirtyLog {
            _sigbus: sigbus,
            map,
            marked: AtomicU64::new(0),
            beyond: AtomicU64::new(0),
        })
    }

    /// Pages the log covers.
    pub fn pages(&self) -> u64 {
        self.map.len() as u64 * 8
    }

    /// Mark the pages of guest bytes `[gpa, gpa + len)` written.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let byte = page / 8;
            if byte >= self.map.len() as u64 {
                self.beyond.fetch_add(1, Ordering::Relaxed);
                return;
            }
            // SAFETY: `byte` is inside the mapping, which lives as long as
            // `self`; the frontend writes the same bytes only atomically.
            let cell = unsafe { &*(self.map.as_mut_ptr().add(byte as usize) as *const AtomicU8) };
            cell.fetch_or(1 << (page % 8), Ordering::SeqCst);
            self.marked.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Page bits set so far, and writes beyond the log.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.marked.load(Ordering::Relaxed),
            self.beyond.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::fault::FaultSignal;
    use super::*;

    fn memfd(len: u64) -> File {
        // SAFETY: plain syscall; result checked.
        let fd = unsafe { libc::memfd_create(c"log".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd we own.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn bits(f: &File, at: u64, n: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; n];
        f.read_exact_at(&mut b, at).unwrap();
        b
    }

    #[test]
    fn marks_every_page_a_write_touches_and_nothing_else() {
        let f = memfd(8192);
        let log = DirtyLog::map(&f, 4096, 4096, &fault()).unwrap();
        assert_eq!(log.pages(), 4096 * 8);
        log.mark(0, 1); // page 0
        log.mark(4095 + 4096 * 8, 2); // pages 8 and 9
        log.mark(4096 * 20, 4096); // page 20 only
        log.mark(4096 * 30, 0); // nothing
        let b = bits(&f, 4096, 4);
        assert_eq!(b, [0b0000_0001, 0b0000_0011, 0b0001_0000, 0]);
        assert_eq!(bits(&f, 0, 4), [0; 4], "before the log's offset");
        assert_eq!(log.counts(), (4, 0));
        // Beyond the log: counted, not written.
        log.mark(4096 * 8 * 4096, 1);
        assert_eq!(log.counts(), (4, 1));
    }

    fn fault() -> Arc<FaultSignal> {
        Arc::new(FaultSignal::new().unwrap())
    }

    #[test]
    fn bad_logs_are_refused() {
        let f = memfd(8192);
        let fault = fault();
        assert!(DirtyLog::map(&f, 0, 0, &fault).is_err());
        assert!(DirtyLog::map(&f, 4096, 100, &fault).is_err());
        assert!(
            DirtyLog::map(&f, 8192, 4096, &fault).is_err(),
            "past the file"
        );
        assert!(DirtyLog::map(&f, u64::MAX, 0, &fault).is_err());
        assert!(DirtyLog::map(&f, 4096, u64::MAX - 4095, &fault).is_err());
        assert!(DirtyLog::map(&f, 8192, 0, &fault).is_ok());
        // From review: an empty memfd passed (a length of 0 was taken for
        // a file without one), and a pipe is no memory file.
        assert!(
            DirtyLog::map(&memfd(0), 4096, 0, &fault).is_err(),
            "empty file"
        );
        let (r, _w) = std::io::pipe().unwrap();
        let pipe = File::from(std::os::fd::OwnedFd::from(r));
        assert!(DirtyLog::map(&pipe, 4096, 0, &fault).is_err(), "a pipe");
    }

    /// From review: a frontend that shrinks its log after SET_LOG_BASE
    /// made the next mark raise SIGBUS, whose default action killed the
    /// daemon. The mark now lands on zero memory and raises the export's
    /// fault signal (its connection closes).
    #[test]
    fn a_log_shrunk_under_the_mapping_costs_only_its_connection() {
        let f = memfd(8192);
        let fault = fault();
        let log = DirtyLog::map(&f, 8192, 0, &fault).unwrap();
        log.mark(0, 1);
        assert!(!fault.take());
        f.set_len(0).unwrap();
        log.mark(4096 * 8 * 4096 + 4096, 1);
        assert!(fault.take(), "the export's fault signal was raised");
        assert_eq!(fault.count(), 1);
    }
}
