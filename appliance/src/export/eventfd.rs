//! Reading and writing the eventfds a frontend hands over (kick and call).
//!
//! We set O_NONBLOCK on them, but that flag belongs to the open file, which
//! the frontend shares through its own descriptor: it can clear the flag
//! again whenever it likes. A plain read of an empty kick fd would then
//! block the reactor, and with it every queue on that core. Reads here ask
//! for no waiting per call instead (RWF_NOWAIT, which eventfds honour since
//! Linux 5.12), so the frontend's flags do not matter.
//!
//! Writes cannot be asked that (eventfds refuse RWF_NOWAIT for writes), so
//! a write looks for room first, and a [`Signaller`] is watched: a write
//! the frontend still made block (it filled the counter and cleared the
//! flag between our look and our write) is freed by a watchdog thread
//! that takes the counter. Only a frontend that means harm fills a
//! counter: a real one reads it long before.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// RWF_NOWAIT was refused once (an older kernel): use the fallback.
static NO_NOWAIT: AtomicBool = AtomicBool::new(false);

/// Take the counter of eventfd `fd` (0 if it was 0), never waiting.
pub(crate) fn drain(fd: RawFd) -> u64 {
    drain_watched(fd).0
}

/// [`drain`], and whether the watchdog had to free the read: the frontend
/// made it block (on kernels without RWF_NOWAIT for eventfds), which only
/// one that means harm does, and may do again at every kick.
pub(crate) fn drain_watched(fd: RawFd) -> (u64, bool) {
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
            return (v, false);
        }
        let e = std::io::Error::last_os_error().raw_os_error();
        if n >= 0 || matches!(e, Some(libc::EAGAIN) | Some(libc::EINTR)) {
            return (0, false);
        }
        // Refused (an older kernel, a seccomp filter): never again.
        NO_NOWAIT.store(true, Ordering::Relaxed);
    }
    // Older kernels: read only what poll says is there. A frontend that
    // clears O_NONBLOCK and takes the count itself in between blocks this
    // read until its next kick, which it need never send: the read is
    // watched, and the watchdog frees it with a count of one (a spurious
    // kick) if it makes no progress between two looks (audit).
    if !ready(fd, libc::POLLIN) {
        return (0, false);
    }
    #[cfg(test)]
    tests::between_poll_and_read(fd);
    let reading = Reading::start(fd);
    // SAFETY: reading 8 bytes into our own u64.
    let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    let freed = reading.finish();
    (if n == 8 { v } else { 0 }, freed)
}

/// Start the watchdog's thread, on a control thread (started by a reactor
/// it would inherit that reactor's pinning to its core): before a kick fd
/// is read, as it frees reads as well as writes.
pub(crate) fn start_watchdog() {
    let _ = watched();
}

/// A read in progress on the fallback path.
struct Listed {
    id: u64,
    fd: RawFd,
    /// Its thread.
    tid: libc::pid_t,
    /// The watchdog saw it at its last look.
    seen: bool,
    /// The watchdog freed it.
    freed: bool,
}

/// Reads in progress on the fallback path.
static READING: Mutex<Vec<Listed>> = Mutex::new(Vec::new());

/// A read of the fallback path, listed while it runs.
struct Reading(u64);

impl Reading {
    fn start(fd: RawFd) -> Reading {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: gettid(2) has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        lock_reading().push(Listed {
            id,
            fd,
            tid,
            seen: false,
            freed: false,
        });
        Reading(id)
    }

    /// The read has returned: off the list, and whether it was freed.
    fn finish(self) -> bool {
        let mut list = lock_reading();
        let freed = list.iter().any(|r| r.id == self.0 && r.freed);
        list.retain(|r| r.id != self.0);
        freed
    }
}

fn lock_reading() -> std::sync::MutexGuard<'static, Vec<Listed>> {
    READING.lock().unwrap_or_else(|e| e.into_inner())
}

/// One look at the fallback's reads: one seen at the last look too, whose
/// counter is empty and whose thread sleeps, is blocked (the frontend took
/// the count it was going to read), and is freed with a count of one. A
/// read whose thread was only descheduled (a loaded machine) is not: its
/// frontend would lose its connection for it (review). (Its descriptor is
/// open: the read's caller holds it until the read has returned and left
/// the list.)
fn free_blocked_reads() {
    for r in lock_reading().iter_mut() {
        if r.seen && !r.freed && !ready(r.fd, libc::POLLIN) && asleep(r.tid) {
            write_one(r.fd);
            r.freed = true;
        }
        r.seen = true;
    }
}

/// Whether thread `tid` of this process sleeps (in a system call).
fn asleep(tid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).is_ok_and(|stat| {
        // "tid (comm) S ...": the state follows the command's closing
        // paren.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('S'))
    })
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

fn write_one(fd: RawFd) {
    let one = 1u64;
    // SAFETY: writing 8 bytes from our own u64.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// An eventfd of the frontend's that we write to (a queue's call fd, or
/// its kick fd to wake our own runner), watched so a write the frontend
/// made block is freed (see the module's comment).
pub(crate) struct Signaller {
    file: File,
    /// Writes started and finished: a write in progress that makes no
    /// progress between two looks of the watchdog, on a full counter, is
    /// blocked.
    started: AtomicU64,
    finished: AtomicU64,
    /// Whether the watchdog had to free a write of this connection's.
    hostile: Arc<Hostility>,
}

/// A connection's mark, set when the watchdog had to free one of our
/// writes to its frontend's eventfds (the frontend means harm), and its
/// export's cooldown, which outlives the connection.
#[derive(Default)]
pub(crate) struct Hostility {
    /// None of the connection's eventfds is written to again: a new call
    /// fd would let it block the reactor again and again.
    connection: AtomicBool,
    /// A frontend that reconnects would get a fresh mark, and the same
    /// ~100 ms of a reactor each time (audit): its export refuses
    /// connections for a while.
    export: Arc<Cooldown>,
}

impl Hostility {
    /// A new connection's, of the export whose cooldown is `export`.
    pub(crate) fn of(export: Arc<Cooldown>) -> Arc<Hostility> {
        Arc::new(Hostility {
            connection: AtomicBool::new(false),
            export,
        })
    }

    fn marked(&self) -> bool {
        self.connection.load(Ordering::Relaxed)
    }

    fn mark(&self) {
        if !self.connection.swap(true, Ordering::Relaxed) {
            self.export.strike();
        }
    }
}

/// How long an export refuses connections after a frontend of its made
/// one of our writes block: 10 s the first time, twice as long each time
/// after, up to 10 minutes. A frontend that does it again on each
/// connection then costs a reactor ~100 ms per cooldown, not per
/// reconnect. No real frontend fills a counter (it reads it long before).
#[derive(Default)]
pub(crate) struct Cooldown {
    /// Until when, how many times so far, and whether a refusal in this
    /// cooldown was logged (once each).
    state: Mutex<(Option<Instant>, u32, bool)>,
}

const COOLDOWN_FIRST: Duration = Duration::from_secs(10);
const COOLDOWN_MAX: Duration = Duration::from_secs(600);

impl Cooldown {
    /// Start (or lengthen) the cooldown.
    pub(crate) fn strike(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 = s.1.saturating_add(1);
        let d = COOLDOWN_FIRST
            .saturating_mul(1 << (s.1 - 1).min(6))
            .min(COOLDOWN_MAX);
        s.0 = Some(Instant::now() + d);
        s.2 = false;
    }

    /// What is left of the cooldown, if any, and whether this is the
    /// first refusal of it (to be logged).
    pub(crate) fn refuse(&self) -> Option<(Duration, bool)> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let left = s.0?.checked_duration_since(Instant::now())?;
        let first = !std::mem::replace(&mut s.2, true);
        Some((left, first))
    }
}

/// How often the watchdog looks: a blocked write waits at most about
/// twice this.
const WATCH_EVERY: Duration = Duration::from_millis(50);

impl Signaller {
    /// Watch `file` (an eventfd of the connection whose flag is
    /// `hostile`) from now until the last handle goes.
    pub(crate) fn new(file: File, hostile: Arc<Hostility>) -> Arc<Signaller> {
        let s = Arc::new(Signaller {
            file,
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            hostile,
        });
        if let Some(watched) = watched() {
            watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((Arc::downgrade(&s), 0));
        }
        s
    }

    /// Add one to the counter if it has room now. Writes cannot be
    /// asked not to wait (eventfds take no RWF_NOWAIT for writes), so this
    /// looks first; a frontend that clears O_NONBLOCK and fills the counter
    /// in between makes it wait until the watchdog frees it.
    #[inline]
    pub(crate) fn signal(&self) {
        if self.hostile.marked() {
            return;
        }
        if ready(self.file.as_raw_fd(), libc::POLLOUT) {
            self.write_now();
        }
    }

    /// The write itself, after the look.
    fn write_now(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
        write_one(self.file.as_raw_fd());
        self.finished.fetch_add(1, Ordering::Relaxed);
    }
}

type Watched = Mutex<Vec<(Weak<Signaller>, u64)>>;

/// The signallers the watchdog looks at (with the finished count it saw
/// last), its thread started with the first; `None` if it cannot start.
fn watched() -> Option<&'static Watched> {
    static WATCHED: OnceLock<Option<Watched>> = OnceLock::new();
    WATCHED
        .get_or_init(|| {
            let started = std::thread::Builder::new()
                .name("eventfd-watch".into())
                .spawn(|| loop {
                    std::thread::sleep(WATCH_EVERY);
                    free_blocked_reads();
                    if let Some(w) = watched() {
                        free_blocked(w);
                    }
                });
            match started {
                Ok(_) => Some(Mutex::new(Vec::new())),
                Err(e) => {
                    tracing::error!(error = %e, "eventfd watchdog not started: a frontend could block a reactor");
                    None
                }
            }
        })
        .as_ref()
}

/// One look: take the counter of every signaller whose write has been
/// blocked since the last look on a full counter.
fn free_blocked(watched: &Watched) {
    let mut stuck = Vec::new();
    {
        let mut w = watched.lock().unwrap_or_else(|e| e.into_inner());
        w.retain(|(n, _)| n.strong_count() > 0);
        for (n, last) in w.iter_mut() {
            let Some(n) = n.upgrade() else {
                continue;
            };
            let finished = n.finished.load(Ordering::Relaxed);
            let started = n.started.load(Ordering::Relaxed);
            let blocked = started != finished && finished == *last;
            *last = finished;
            // A counter with room means the writer is only slow
            // (descheduled): its count is the frontend's, and is left
            // alone.
            if blocked && !ready(n.file.as_raw_fd(), libc::POLLOUT) {
                stuck.push(n);
            }
        }
    }
    // Taken without the list's lock: on the fallback path the frontend may
    // take the count first and block this read too, until a look frees it
    // (a thread of its own then: this one does the looking).
    for n in stuck {
        n.hostile.mark();
        let take = |n: &Signaller| {
            let took = drain(n.file.as_raw_fd());
            tracing::warn!(
                count = took,
                "a frontend filled an eventfd we write to and made it blocking; its counter was taken to free the write, and it is written to no more"
            );
        };
        if !NO_NOWAIT.load(Ordering::Relaxed) {
            take(&n);
            continue;
        }
        let on = n.clone();
        let spawned = std::thread::Builder::new()
            .name("eventfd-take".into())
            .spawn(move || take(&on));
        if spawned.is_err() {
            // No thread: here after all (a read that blocks is freed by
            // nobody then, but the write stays blocked otherwise).
            take(&n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    /// The descriptor whose next fallback read has its count taken first,
    /// as a frontend racing it would (-1: none).
    static RACE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

    pub(super) fn between_poll_and_read(fd: RawFd) {
        if RACE_FD
            .compare_exchange(fd, -1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            let mut v = 0u64;
            // SAFETY: reading 8 bytes into our own u64.
            unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
        }
    }

    /// From an audit: on kernels without RWF_NOWAIT for eventfds, a
    /// frontend that cleared O_NONBLOCK and took the count between our
    /// poll and our read blocked the read, and the reactor with every
    /// queue on it, until its next kick, which it need never send. The
    /// watchdog frees such a read. (Forcing the fallback leaves other
    /// tests of the process on it, which serves them as well.)
    #[test]
    fn a_fallback_read_the_frontend_made_block_is_freed() {
        NO_NOWAIT.store(true, Ordering::SeqCst);
        start_watchdog();
        let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        fd.write(1).unwrap();
        let raw = fd.as_raw_fd();
        RACE_FD.store(raw, Ordering::SeqCst);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(drain_watched(raw));
        });
        // Freed with a spurious kick of one, and said.
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)), Ok((1, true)));
        assert_eq!(drain(fd.as_raw_fd()), 0);
    }

    /// A second handle of `fd`, as a frontend's descriptor is ours.
    fn file_of(fd: &vmm_sys_util::eventfd::EventFd) -> File {
        let dup = fd.try_clone().unwrap();
        // SAFETY: a descriptor of our own, handed over whole.
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(dup.into_raw_fd()) }
    }

    #[test]
    fn a_blocking_eventfd_is_read_without_waiting() {
        // Blocking, as a frontend may have made ours.
        let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        assert_eq!(drain(fd.as_raw_fd()), 0);
        fd.write(3).unwrap();
        assert_eq!(drain(fd.as_raw_fd()), 3);
        assert_eq!(drain(fd.as_raw_fd()), 0);
        // A full counter takes no signal, and does not wait either.
        let n = Signaller::new(file_of(&fd), Default::default());
        fd.write(u64::MAX - 1).unwrap();
        n.signal();
        assert_eq!(drain(fd.as_raw_fd()), u64::MAX - 1);
        n.signal();
        assert_eq!(drain(fd.as_raw_fd()), 1);
    }

    /// The write a look cannot keep from blocking (the frontend filled the
    /// counter and cleared O_NONBLOCK after it) ends: the watchdog takes
    /// the counter, the frontend's connection gets no more writes, and its
    /// export refuses connections for a while.
    #[test]
    fn a_write_the_frontend_made_block_is_freed() {
        let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let export = Arc::new(Cooldown::default());
        assert!(export.refuse().is_none());
        let connection = Hostility::of(export.clone());
        let n = Signaller::new(file_of(&fd), connection.clone());
        fd.write(u64::MAX - 1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let m = n.clone();
        std::thread::spawn(move || {
            m.write_now();
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(60)).is_ok(),
            "the write stayed blocked"
        );
        // The counter was taken, then the write added its one.
        assert_eq!(drain(fd.as_raw_fd()), 1);
        // It is written to no more, and a counter with room is never
        // taken.
        fd.write(5).unwrap();
        n.signal();
        free_blocked(watched().unwrap());
        assert_eq!(drain(fd.as_raw_fd()), 5);
        // Nor is a new eventfd of the same connection (a new call fd).
        let other = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        Signaller::new(file_of(&other), connection).signal();
        assert_eq!(drain(other.as_raw_fd()), 0);
        // Another connection's is.
        Signaller::new(file_of(&other), Hostility::of(export.clone())).signal();
        assert_eq!(drain(other.as_raw_fd()), 1);
        // The export's cooldown runs, said once.
        let (left, first) = export.refuse().expect("a cooldown");
        assert!(first && left <= COOLDOWN_FIRST, "{left:?}");
        assert!(!export.refuse().expect("still").1);
    }

    /// Each strike doubles the cooldown, up to ten minutes.
    #[test]
    fn a_cooldown_doubles_up_to_its_bound() {
        let c = Cooldown::default();
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            c.strike();
            let (left, first) = c.refuse().expect("a cooldown");
            assert!(first);
            assert!(left <= COOLDOWN_MAX, "{left:?}");
            assert!(
                left + Duration::from_secs(1) >= last.min(COOLDOWN_MAX),
                "{left:?} after {last:?}"
            );
            last = left * 2;
        }
        assert!(last / 2 > COOLDOWN_MAX - Duration::from_secs(5));
    }
}
