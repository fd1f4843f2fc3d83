//! Guest memory as the vhost-user frontend describes it: regions of shared
//! memory file descriptors, mapped here in place (no bounce copies).
//!
//! A memory table is checked whole before anything is mapped: the region
//! count, sizes and overlaps, the export's memory limit (mapped guest
//! memory may also be pinned for DMA), and that each region lies inside
//! its file (a mapping past the end of its file faults with SIGBUS on
//! first touch). A file shrunk after it was mapped is caught by the SIGBUS
//! handler ([`super::sigbus`]), which costs the frontend its connection.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::fault::FaultSignal;
use super::sigbus;
use super::FrontendError;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Our mapping of one region of frontend memory. Dropped last by whoever
/// holds it (the control thread's table or a reactor's memory map): its
/// DMA and SIGBUS registrations go first, then the memory is unmapped.
struct Mapping {
    ptr: *mut u8,
    len: usize,
    dma: Option<bdev::DmaRegistration>,
    sigbus: Option<sigbus::Registration>,
}

// SAFETY: the mapping is plain shared memory; the pointer is only
// unmapped in drop, by whichever thread drops the last reference.
unsafe impl Send for Mapping {}
// SAFETY: as above; nothing is mutated through &Mapping.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Let go of it on this thread: its registrations first, then the
    /// memory. Empty afterwards (its drop does nothing).
    fn release(&mut self) {
        self.dma.take();
        self.sigbus.take();
        let len = std::mem::take(&mut self.len);
        if len == 0 {
            return;
        }
        #[cfg(test)]
        tests::unmapped_on(std::thread::current().name(), self.ptr as usize);
        // SAFETY: our own mapping, used by nobody once the last map that
        // holds it is gone.
        unsafe { libc::munmap(self.ptr.cast(), len) };
    }

    fn is_empty(&self) -> bool {
        self.len == 0 && self.dma.is_none() && self.sigbus.is_none()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.is_empty() {
            return;
        }
        // The last holder may be a reactor (its gate let go of the map
        // after a change): undoing the DMA mapping (an IOMMU unmap that
        // unpins every page) and the unmap of a large guest took it from
        // every queue of every VM on it for milliseconds to seconds. A
        // thread of its own does that.
        if poller::current_reactor().is_some() {
            if let Some(tx) = unmapper() {
                let m = Mapping {
                    ptr: self.ptr,
                    len: std::mem::take(&mut self.len),
                    dma: self.dma.take(),
                    sigbus: self.sigbus.take(),
                };
                match tx.send(m) {
                    Ok(()) => return,
                    // The thread is gone: here after all. (Dropped as it
                    // was, it came back here and recursed until the stack
                    // overflowed: audit.)
                    Err(std::sync::mpsc::SendError(mut m)) => {
                        m.release();
                        return;
                    }
                }
            }
            // No thread: here after all (it was left mapped: audit).
        }
        self.release();
    }
}

/// The thread guest memory dropped on a reactor is unmapped on (started
/// with the first mapping; none if it could not start: then the reactor
/// does it, as before).
fn unmapper() -> Option<&'static std::sync::mpsc::Sender<Mapping>> {
    #[cfg(test)]
    if tests::NO_UNMAPPER.with(|n| n.get()) {
        return None;
    }
    static TX: std::sync::OnceLock<Option<std::sync::mpsc::Sender<Mapping>>> =
        std::sync::OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Mapping>();
        std::thread::Builder::new()
            .name("guest-unmap".into())
            .spawn(move || {
                for m in rx {
                    drop(m);
                }
            })
            .map_err(
                |e| tracing::error!(error = %e, "no thread to unmap guest memory: reactors do it"),
            )
            .ok()
            .map(|_| tx)
    })
    .as_ref()
}

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
    /// The file behind it (what the daemon-wide count goes by).
    file: super::budget::FileOf,
    mapping: Arc<GuestRegionMmap>,
    owner: Arc<Mapping>,
}

/// The regions of one connection.
#[derive(Clone, Default)]
pub struct GuestMemory {
    regions: Vec<Region>,
}

/// An immutable guest memory map for the data path: vm-memory's view of
/// the regions, and the mappings it points into, kept alive with it.
#[derive(Default)]
pub struct GuestMap {
    mem: GuestMemoryMmap,
    _owners: Vec<Arc<Mapping>>,
    /// The connection's dirty log while its frontend logs (live
    /// migration): every guest page the queues write is marked in it.
    /// One switch for every map of a connection, flipped without a new map.
    pub log: Arc<super::dirtylog::LogSwitch>,
}

#[cfg(test)]
impl GuestMap {
    /// A map over memory the test owns (no frontend, no log).
    pub(super) fn for_test(mem: GuestMemoryMmap) -> GuestMap {
        GuestMap {
            mem,
            _owners: Vec::new(),
            log: Default::default(),
        }
    }
}

impl std::ops::Deref for GuestMap {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

/// The system's page size (what mmap offsets and MAP_FIXED addresses
/// must be multiples of).
pub(super) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

/// Why a frontend's file cannot be guest memory, an inflight area or a
/// dirty log, if it cannot: it must be a regular file (a device or pipe
/// has no length to check), and not on a filesystem served over the
/// network or by a user process (FUSE, NFS, SMB, Ceph, 9p), where a page
/// fault on a reactor could wait for good on a server and stall every
/// queue of every VM on that reactor.
pub(super) fn memory_file_problem(file: &File) -> Option<String> {
    match file.metadata() {
        Ok(m) if m.file_type().is_file() => {}
        Ok(_) => return Some("not a regular file (memfd, tmpfs or hugetlbfs)".into()),
        Err(e) => return Some(format!("cannot be examined: {e}")),
    }
    let st = match statfs(file) {
        Ok(st) => st,
        Err(e) => return Some(format!("its filesystem cannot be examined: {e}")),
    };
    remote_filesystem(st.f_type as i64)
        .map(|fs| format!("on {fs}, which a page fault could wait on for good"))
}

/// What fstatfs says of the filesystem `file` is on.
fn statfs(file: &File) -> std::io::Result<libc::statfs> {
    // SAFETY: fstatfs fills the struct we pass; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor we hold and our own struct.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// The name of a filesystem type (statfs f_type) served over the network
/// or by a user process.
fn remote_filesystem(magic: i64) -> Option<&'static str> {
    Some(match magic {
        0x6573_5546 => "FUSE",
        0x6969 => "NFS",
        0x517b => "SMB",
        0xff53_4d42 => "CIFS",
        0xfe53_4d42 => "SMB2",
        0x00c3_6400 => "CephFS",
        0x0102_1997 => "9p",
        0x0bd0_0bd0 => "Lustre",
        0x4750_4653 => "GPFS",
        _ => return None,
    })
}

/// The page size of `file` if it is on hugetlbfs (a memfd made with
/// MFD_HUGETLB is too). Such a mapping can only be unmapped, or replaced
/// in part (the SIGBUS handler's zero pages), in whole huge pages: one
/// whose length is not a multiple would stay mapped for good, and a
/// SIGBUS in it would kill the process.
pub(super) fn huge_page(file: &File) -> Option<u64> {
    const HUGETLBFS_MAGIC: libc::c_long = 0x9584_58f6;
    let st = statfs(file).ok()?;
    (st.f_type as libc::c_long == HUGETLBFS_MAGIC).then_some((st.f_bsize as u64).max(4096))
}

/// Whether `len` bytes at `offset` of `file` are whole pages of it, if it
/// is on hugetlbfs (see [`huge_page`]); the page size when they are not.
pub(super) fn whole_huge_pages(file: &File, offset: u64, len: u64) -> Result<(), u64> {
    match huge_page(file) {
        Some(page) if !offset.is_multiple_of(page) || !len.is_multiple_of(page) => Err(page),
        _ => Ok(()),
    }
}

/// Largest number of regions we accept (offered as max mem slots).
pub const MAX_REGIONS: usize = 32;

/// One entry of a memory table, before it is mapped.
#[derive(Debug, Clone, Copy)]
pub struct Declared {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The frontend's virtual address.
    pub user_addr: u64,
    /// Where in its file the region starts.
    pub mmap_offset: u64,
}

fn invalid(what: String) -> FrontendError {
    FrontendError::Invalid(what)
}

impl GuestMemory {
    /// Check that `new` regions can join this table (count, sizes,
    /// overlaps, `limit` bytes in all) before any of them is mapped.
    pub fn check_table(&self, new: &[Declared], limit: u64) -> Result<(), FrontendError> {
        if self.regions.len() + new.len() > MAX_REGIONS {
            return Err(invalid(format!("more than {MAX_REGIONS} memory regions")));
        }
        let mut all: Vec<(u64, u64)> = self.regions.iter().map(|r| (r.gpa, r.size)).collect();
        for d in new {
            if d.size == 0
                || d.gpa.checked_add(d.size).is_none()
                || d.user_addr.checked_add(d.size).is_none()
                || d.mmap_offset.checked_add(d.size).is_none()
                || usize::try_from(d.size).is_err()
            {
                return Err(invalid(format!(
                    "memory region at {:#x} of {:#x} bytes is invalid",
                    d.gpa, d.size
                )));
            }
            // The mapping starts on a page, so a ring's host address is as
            // aligned as its guest address only if the region's start is:
            // a misaligned used ring would take misaligned atomic writes.
            // 16 bytes is the most a virtqueue part asks for (virtio 1.2,
            // 2.7.1: the descriptor table).
            if !d.gpa.is_multiple_of(16) {
                return Err(invalid(format!(
                    "memory region at {:#x} does not start on a 16-byte boundary",
                    d.gpa
                )));
            }
            if all
                .iter()
                .any(|&(gpa, size)| d.gpa < gpa + size && gpa < d.gpa + d.size)
            {
                return Err(invalid(format!(
                    "memory region at {:#x} overlaps another",
                    d.gpa
                )));
            }
            all.push((d.gpa, d.size));
        }
        let total = all.iter().map(|r| r.1).fold(0u64, u64::saturating_add);
        if total > limit {
            return Err(invalid(format!(
                "guest memory of {total} bytes is over the export's limit of {limit} bytes"
            )));
        }
        Ok(())
    }

    /// Map one region of `file` (checked by [`check_table`](Self::check_table)).
    pub fn map_region(
        d: Declared,
        file: &File,
        fault: &Arc<FaultSignal>,
    ) -> Result<Region, FrontendError> {
        if let Some(why) = memory_file_problem(file) {
            return Err(invalid(format!(
                "memory region at {:#x}: its file is {why}",
                d.gpa
            )));
        }
        let meta = file
            .metadata()
            .map_err(|e| FrontendError::os("the memory region's file", e))?;
        if d.mmap_offset.saturating_add(d.size) > meta.len() {
            return Err(invalid(format!(
                "memory region at {:#x}: {:#x} bytes at offset {:#x} run past the end of its {:#x}-byte file",
                d.gpa,
                d.size,
                d.mmap_offset,
                meta.len()
            )));
        }
        whole_huge_pages(file, d.mmap_offset, d.size).map_err(|page| {
            invalid(format!(
                "memory region at {:#x}: {:#x} bytes at offset {:#x} of a file of {page:#x}-byte huge pages: both must be whole pages",
                d.gpa, d.size, d.mmap_offset
            ))
        })?;
        let len = d.size as usize;
        let offset = libc::off_t::try_from(d.mmap_offset).map_err(|_| {
            invalid(format!(
                "memory region at {:#x}: offset out of range",
                d.gpa
            ))
        })?;
        let (prot, flags) = (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED);
        // SAFETY: a new shared mapping of the frontend's file; checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                flags,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(FrontendError::os(
                "mapping guest memory",
                std::io::Error::last_os_error(),
            ));
        }
        let ptr = ptr as *mut u8;
        // Its thread is started here, on a control thread: started by a
        // reactor it would inherit that reactor's pinning to its core.
        let _ = unmapper();
        let mut owner = Mapping {
            ptr,
            len,
            dma: None,
            sigbus: None,
        };
        owner.sigbus = Some(sigbus::register(ptr, len, fault).map_err(invalid)?);
        // SAFETY: the mapping is ours and lives as long as `owner`, which
        // every holder of the vm-memory region also holds.
        let mmap = unsafe { MmapRegion::build_raw(ptr, len, prot, flags) }
            .map_err(|e| invalid(format!("guest memory at {:#x}: {e}", d.gpa)))?;
        let mapping = GuestRegionMmap::new(mmap, GuestAddress(d.gpa)).ok_or_else(|| {
            invalid(format!(
                "memory region at {:#x} overflows the guest address space",
                d.gpa
            ))
        })?;
        // SAFETY: the registration is dropped before the memory is
        // unmapped (Mapping's drop); the export stops its queues (no IO in
        // flight) before it lets a map go.
        owner.dma = Some(unsafe { bdev::register_dma_memory(ptr, len) });
        Ok(Region {
            gpa: d.gpa,
            size: d.size,
            user_addr: d.user_addr,
            file: super::budget::file_of(file)?,
            mapping: Arc::new(mapping),
            owner: Arc::new(owner),
        })
    }

    /// Add a mapped region (checked by [`check_table`](Self::check_table)).
    pub fn add(&mut self, r: Region) {
        self.regions.push(r);
        self.regions.sort_by_key(|r| r.gpa);
    }

    /// Remove the region with this guest address and size.
    pub fn remove(&mut self, gpa: u64, size: u64) -> Result<(), FrontendError> {
        let before = self.regions.len();
        self.regions.retain(|r| !(r.gpa == gpa && r.size == size));
        if self.regions.len() == before {
            return Err(invalid(format!(
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

    /// Bytes of guest memory the table holds, by the file behind them.
    pub fn files(&self) -> super::budget::Files {
        let mut files = super::budget::Files::new();
        for r in &self.regions {
            super::budget::count(&mut files, r.file, r.size);
        }
        files
    }

    /// One past the highest guest address of the table (0 when empty).
    pub fn end(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.gpa.saturating_add(r.size))
            .max()
            .unwrap_or(0)
    }

    /// An immutable snapshot for the data path.
    pub fn snapshot(&self) -> Result<GuestMap, FrontendError> {
        if self.regions.is_empty() {
            return Ok(GuestMap::default());
        }
        let regions = self.regions.iter().map(|r| r.mapping.clone()).collect();
        let mem = GuestMemoryMmap::from_arc_regions(regions)
            .map_err(|e| invalid(format!("building the guest memory map: {e}")))?;
        Ok(GuestMap {
            mem,
            _owners: self.regions.iter().map(|r| r.owner.clone()).collect(),
            log: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    /// Which thread unmapped which mapping.
    static UNMAPPED_ON: std::sync::Mutex<Vec<(String, usize)>> = std::sync::Mutex::new(Vec::new());

    std::thread_local! {
        /// As if the unmapping thread could not start (on the thread that
        /// sets it: the tests of a process may run side by side).
        pub(super) static NO_UNMAPPER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    pub(super) fn unmapped_on(thread: Option<&str>, ptr: usize) {
        UNMAPPED_ON
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((thread.unwrap_or("").to_string(), ptr));
    }

    /// Map 4 MiB of guest memory, drop it on a reactor (which has no
    /// unmapping thread with `no_thread`), and say which thread unmapped
    /// it once one has.
    fn dropped_on_a_reactor(no_thread: bool) -> String {
        let reactors = poller::Reactors::start(poller::ReactorConfig {
            count: 1,
            ..Default::default()
        })
        .unwrap();
        let fault = Arc::new(FaultSignal::new().unwrap());
        let file = memfd(0);
        let whole = Declared {
            gpa: 0,
            size: 4 << 20,
            user_addr: 0,
            mmap_offset: 0,
        };
        let mut memory = GuestMemory::default();
        memory.add(GuestMemory::map_region(whole, &file, &fault).unwrap());
        let ptr = memory.regions[0].owner.ptr as usize;
        reactors
            .set()
            .call(0, std::time::Duration::from_secs(10), move |_| {
                NO_UNMAPPER.with(|n| n.set(no_thread));
                drop(memory);
                NO_UNMAPPER.with(|n| n.set(false));
            })
            .unwrap();
        let t = std::time::Instant::now();
        let on = loop {
            let on = UNMAPPED_ON.lock().unwrap().clone();
            if let Some((thread, _)) = on.into_iter().find(|(_, p)| *p == ptr) {
                break thread;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "never unmapped"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        reactors.shutdown().unwrap();
        on
    }

    /// From an audit: guest memory whose last holder was a reactor was
    /// unmapped (and its DMA mapping undone) there, stalling every queue
    /// on it. It is done on a thread of its own.
    #[test]
    fn guest_memory_dropped_on_a_reactor_is_unmapped_elsewhere() {
        assert_eq!(dropped_on_a_reactor(false), "guest-unmap");
    }

    /// From an audit: with no unmapping thread (it could not start), guest
    /// memory dropped on a reactor was left mapped; with the thread gone,
    /// the drop recursed until the stack overflowed. The reactor unmaps it
    /// then.
    #[test]
    fn guest_memory_dropped_on_a_reactor_without_the_thread_is_unmapped_there() {
        let on = dropped_on_a_reactor(true);
        assert!(on.starts_with("reactor"), "{on}");
    }

    fn memfd(flags: libc::c_uint) -> File {
        // SAFETY: plain syscall; result checked.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC | flags) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(4 << 20).unwrap();
        f
    }

    /// From review: any regular file was taken, on FUSE or NFS too, where
    /// a page fault on a reactor can wait for a server for good.
    #[test]
    fn memory_files_are_local_regular_files() {
        assert_eq!(memory_file_problem(&memfd(0)), None);
        let null = File::open("/dev/null").unwrap();
        assert!(memory_file_problem(&null).is_some());
        assert_eq!(remote_filesystem(0x6573_5546), Some("FUSE"));
        assert_eq!(remote_filesystem(0x6969), Some("NFS"));
        assert_eq!(remote_filesystem(0x0102_1994), None, "tmpfs");
        assert_eq!(remote_filesystem(0xef53), None, "ext4");
    }

    #[test]
    fn a_region_that_would_misalign_the_rings_is_refused() {
        let none = GuestMemory::default();
        let at = |gpa| Declared {
            gpa,
            size: 1 << 20,
            user_addr: 0,
            mmap_offset: 0,
        };
        for gpa in [2, 0x1004, 0x1008] {
            let e = none.check_table(&[at(gpa)], u64::MAX).unwrap_err();
            assert!(e.to_string().contains("16-byte"), "{e}");
        }
        none.check_table(&[at(0), at(0x100010)], u64::MAX).unwrap();
    }

    #[test]
    fn a_region_of_part_of_a_huge_page_is_refused() {
        let fault = Arc::new(FaultSignal::new().unwrap());
        let huge = memfd(libc::MFD_HUGETLB);
        assert_eq!(huge_page(&huge), Some(2 << 20));
        assert_eq!(huge_page(&memfd(0)), None);
        let part = |size, mmap_offset| Declared {
            gpa: 0,
            size,
            user_addr: 0,
            mmap_offset,
        };
        for (size, offset) in [(4096, 0), ((2 << 20) + 4096, 0), (2 << 20, 4096)] {
            let e = GuestMemory::map_region(part(size, offset), &huge, &fault)
                .err()
                .unwrap_or_else(|| panic!("{size:#x} at {offset:#x} was mapped"));
            assert!(e.to_string().contains("whole pages"), "{e}");
        }
    }
}
