//! Guest memory that disappears under our mapping costs its connection,
//! not the process. A frontend's memory is a file it shares with us (a
//! memfd, a hugetlbfs or tmpfs file); if it shrinks that file after we
//! mapped it, touching a page past the new end raises SIGBUS, whose
//! default action kills the daemon and every VM it serves.
//!
//! Each mapping of frontend memory is registered here with its export's
//! fault signal. The SIGBUS handler looks the faulting address up in a
//! fixed table (no lock, no allocation: only atomics and system calls,
//! which are async-signal-safe), replaces the whole region with anonymous
//! zero memory at the same address (mmap MAP_FIXED), raises the export's
//! fault signal and returns: the faulting copy completes on harmless
//! memory, and the export's control thread drops the connection, whose
//! requests then end with it. A fault elsewhere goes to the handler that
//! was installed before ours (Rust's guard-page check), or to the default
//! action. mmap with MAP_FIXED is the mechanism QEMU and the kernel's own
//! userfaultfd users rely on for replacing a mapping in place.
//!
//! No crate does this (memory-safety crates catch SIGSEGV for the
//! current thread with setjmp, which Rust cannot use soundly); it is
//! small, and docs/decisions.md says why it is hand-written.

use std::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use super::fault::FaultSignal;

const SLOTS: usize = 4096;
const FREE: u8 = 0;
const CLAIMED: u8 = 1;
const LIVE: u8 = 2;

struct Slot {
    /// Bumped before and after every change of the slot (a seqlock): the
    /// handler trusts what it read only if it is even and unchanged.
    gen: AtomicUsize,
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    fault: AtomicPtr<FaultSignal>,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    gen: AtomicUsize::new(0),
    state: AtomicU8::new(FREE),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    fault: AtomicPtr::new(std::ptr::null_mut()),
};
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

/// The handler that was installed before ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// The registered mapping that holds `addr`: its start, length and fault
/// signal, read consistently (a slot being reused meanwhile is read
/// again).
fn find(addr: usize) -> Option<(usize, usize, *mut FaultSignal)> {
    for s in TABLE.iter() {
        for _ in 0..100 {
            let g1 = s.gen.load(Ordering::Acquire);
            if g1 % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            if s.state.load(Ordering::Acquire) != LIVE {
                break;
            }
            let start = s.start.load(Ordering::Acquire);
            let len = s.len.load(Ordering::Acquire);
            let fault = s.fault.load(Ordering::Acquire);
            if s.gen.load(Ordering::Acquire) != g1 {
                continue;
            }
            if addr >= start && addr - start < len {
                return Some((start, len, fault));
            }
            break;
        }
    }
    None
}

/// A registered mapping; dropping it unregisters it (before the mapping
/// goes: the owner drops this first).
pub struct Registration {
    slot: &'static Slot,
    _fault: Arc<FaultSignal>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let s = self.slot;
        s.gen.fetch_add(1, Ordering::AcqRel);
        s.state.store(FREE, Ordering::Release);
        s.gen.fetch_add(1, Ordering::AcqRel);
    }
}

/// Register `len` bytes of frontend memory at `ptr` for `fault`. Refused
/// with the table full (4096 mappings): the mapping is not used then (it
/// was, unprotected, and a frontend's truncate then killed the daemon:
/// audit).
pub fn register(
    ptr: *mut u8,
    len: usize,
    fault: &Arc<FaultSignal>,
) -> Result<Registration, String> {
    install();
    register_in(&TABLE, ptr, len, fault)
}

/// [`register`] in `table`.
fn register_in(
    table: &'static [Slot],
    ptr: *mut u8,
    len: usize,
    fault: &Arc<FaultSignal>,
) -> Result<Registration, String> {
    // Whole pages: the handler's replacement mmap needs a page-aligned
    // start (MAP_FIXED), or it fails and the fault kills the process. A
    // mapping from an unaligned file offset (memmap2 rounds it down and
    // hands back a pointer into the first page) starts mid-page; the
    // pages around it are part of the same mapping.
    let page = super::memory::page_size();
    let start = ptr as usize & !(page - 1);
    let len = (ptr as usize).saturating_add(len).next_multiple_of(page) - start;
    let ptr = start as *mut u8;
    let slot = table.iter().position(|s| {
        s.state
            .compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    });
    let Some(i) = slot else {
        return Err(format!(
            "the daemon holds {} mappings of frontend memory already (each needs its SIGBUS guard)",
            table.len()
        ));
    };
    let s = &table[i];
    s.gen.fetch_add(1, Ordering::AcqRel);
    s.start.store(ptr as usize, Ordering::Release);
    s.len.store(len, Ordering::Release);
    s.fault
        .store(Arc::as_ptr(fault) as *mut FaultSignal, Ordering::Release);
    s.state.store(LIVE, Ordering::Release);
    s.gen.fetch_add(1, Ordering::AcqRel);
    Ok(Registration {
        slot: s,
        _fault: fault.clone(),
    })
}

fn install() {
    PREVIOUS.get_or_init(|| {
        // SAFETY: sigaction with a zeroed (valid) struct and our handler;
        // the previous action is read into `old`.
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &new, &mut old) != 0 {
                tracing::error!(error = %std::io::Error::last_os_error(), "installing the SIGBUS handler: guest memory is not protected");
            }
            old
        }
    });
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local; the interrupted code must find it as
    // it left it.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    if let Some((start, len, fault)) = find(addr) {
        // SAFETY: the range is a live mapping of frontend memory that we
        // own (registered until just before it is unmapped); replacing it
        // in place keeps every pointer into it valid.
        let r = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if r != libc::MAP_FAILED {
            if !fault.is_null() {
                // SAFETY: the registration keeps the signal alive while
                // its mapping is mapped, and the fault is in it.
                unsafe { (*fault).raise() };
            }
            // SAFETY: as above.
            unsafe { *libc::__errno_location() = errno };
            return;
        }
    }
    // Not frontend memory: whoever handled SIGBUS before us, else the
    // default action (the fault repeats on return and kills the process).
    // SAFETY: calling the previous handler as the kernel would, or
    // restoring the default action; both async-signal-safe.
    unsafe {
        match PREVIOUS.get() {
            Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
                if p.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(p.sa_sigaction);
                    f(sig, info, ctx);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(p.sa_sigaction);
                    f(sig);
                }
            }
            _ => {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From review: an inflight area at file offset 64 was registered at
    /// its unaligned pointer; the handler's MAP_FIXED remap then failed
    /// and the fault killed the process (the test process, here).
    #[test]
    fn a_mapping_registered_mid_page_survives_its_file_shrinking() {
        // SAFETY: plain syscalls on our own memfd and mapping.
        unsafe {
            let fd = libc::memfd_create(c"sigbus-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            let page = super::super::memory::page_size();
            assert_eq!(libc::ftruncate(fd, 2 * page as libc::off_t), 0);
            let base = libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(base, libc::MAP_FAILED);
            let at = (base as *mut u8).add(64);
            at.write_volatile(7);
            let fault = Arc::new(FaultSignal::new().unwrap());
            let reg = register(at, page, &fault).unwrap();
            assert_eq!(libc::ftruncate(fd, 0), 0);
            assert_eq!(
                at.read_volatile(),
                0,
                "read from the anonymous page put in its place"
            );
            assert!(fault.take(), "the fault is reported");
            drop(reg);
            libc::munmap(base, 2 * page);
            libc::close(fd);
        }
    }

    /// From an audit: with the table full, a mapping was used unprotected,
    /// and a frontend's truncate then killed the daemon. It is refused. (A
    /// table of the test's own: the process's is shared with tests that
    /// may run beside this one.)
    #[test]
    fn a_mapping_with_no_room_left_in_the_table_is_refused() {
        static SMALL: [Slot; 4] = [EMPTY; 4];
        let fault = Arc::new(FaultSignal::new().unwrap());
        let mut page = vec![0u8; 2 * super::super::memory::page_size()];
        let at = page.as_mut_ptr();
        let mut held: Vec<Registration> = (0..SMALL.len())
            .map(|_| register_in(&SMALL, at, 64, &fault).unwrap())
            .collect();
        let refused = register_in(&SMALL, at, 64, &fault).map(|_| ());
        assert!(refused.is_err_and(|why| why.contains("holds 4 mappings")));
        held.pop();
        assert!(register_in(&SMALL, at, 64, &fault).is_ok());
    }
}
