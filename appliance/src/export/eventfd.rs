//! Reading and writing the eventfds a frontend hands over (kick and call).
//!
//! We set O_NONBLOCK on them, but that flag belongs to the open file, which
//! the frontend shares through its own descriptor: it can clear the flag
//! again whenever it likes. A plain read of an empty kick fd would then
//! block the reactor, and with it every queue on that core. Reads here ask
//! for no waiting per call instead (RWF_NOWAIT, which eventfds honour since
//! Linux 5.12), so the frontend's flags do not matter.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// RWF_NOWAIT was refused once (an older kernel): use the fallback.
static NO_NOWAIT: AtomicBool = AtomicBool::new(false);

/// Take the counter of eventfd `fd` (0 if it was 0), never waiting.
pub(crate) fn drain(fd: RawFd) -> u64 {
    let mut v = 0u64;
    let iov = libc::iovec {
        iov_base: (&mut v as *mut u64).cast(),
        iov_len: 8,
    };
    if !NO_NOWAIT.load(Ordering::Relaxed) {
        // SAFETY: one iovec over our own 8 bytes; offset -1 is the
        // file's position, as an eventfd wants.
        let n = unsafe { libc::preadv2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
        if n == 8 {
            return v;
        }
        let e = std::io::Error::last_os_error().raw_os_error();
        if n >= 0 || matches!(e, Some(libc::EAGAIN) | Some(libc::EINTR)) {
            return 0;
        }
        // Refused (an older kernel, a seccomp filter): never again.
        NO_NOWAIT.store(true, Ordering::Relaxed);
    }
    // Older kernels: read only what poll says is there. A frontend that
    // clears O_NONBLOCK and takes the count itself in between can still
    // block this read until its next kick.
    if !ready(fd, libc::POLLIN) {
        return 0;
    }
    // SAFETY: reading 8 bytes into our own u64.
    let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    if n == 8 {
        v
    } else {
        0
    }
}

/// Whether `fd` is ready for `events` now.
pub(crate) fn ready(fd: RawFd, events: libc::c_short) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one pollfd of our own, no waiting.
    unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents & events != 0 }
}

/// Add one to eventfd `fd`'s counter if it has room now. Writes cannot be
/// asked not to wait (eventfds take no RWF_NOWAIT for writes), so this
/// looks first; a frontend that clears O_NONBLOCK and fills the counter
/// in between can still make it wait.
pub(crate) fn signal(fd: RawFd) {
    if !ready(fd, libc::POLLOUT) {
        return;
    }
    let one = 1u64;
    // SAFETY: writing 8 bytes from our own u64.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_blocking_eventfd_is_read_without_waiting() {
        // Blocking, as a frontend may have made ours.
        let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        assert_eq!(drain(fd.as_raw_fd()), 0);
        fd.write(3).unwrap();
        assert_eq!(drain(fd.as_raw_fd()), 3);
        assert_eq!(drain(fd.as_raw_fd()), 0);
        // A full counter takes no signal, and does not wait either.
        fd.write(u64::MAX - 1).unwrap();
        signal(fd.as_raw_fd());
        assert_eq!(drain(fd.as_raw_fd()), u64::MAX - 1);
        signal(fd.as_raw_fd());
        assert_eq!(drain(fd.as_raw_fd()), 1);
    }
}
