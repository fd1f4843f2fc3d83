//! A hostile or broken vhost-user frontend (not its guest: the frontend
//! process itself, its memory table, its descriptors, its timing) costs
//! its own connection at most: the daemon never crashes or hangs, and a
//! second export whose queues share the reactors keeps serving.

#[path = "hostile/guest.rs"]
mod guest;

use std::time::{Duration, Instant};

use guest::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

/// Wait until `cond` holds (the daemon acts on its own threads).
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(30), "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A memory region of MEM bytes of a fresh memfd at guest address `gpa`.
fn other_memory(gpa: u64) -> (std::fs::File, *mut u8, VhostUserMemoryRegionInfo) {
    use std::os::fd::AsRawFd;
    let (file, base) = guest_memory(c"other");
    let info = VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: MEM as u64,
        userspace_addr: base as u64,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    };
    (file, base, info)
}

/// Point 1: a memory table without the region that holds a running
/// queue's rings. The queue must not touch them (the old pointers point
/// into memory the daemon unmaps); it waits, and goes on once a table
/// holds them again. The same through REM_MEM_REG / ADD_MEM_REG.
#[test]
fn a_memory_change_that_removes_the_rings_pauses_the_queue_until_they_return() {
    let r = rig_of(1, Duration::from_micros(50), 2);
    let mut g = Guest::setup(
        &r.socks[0],
        Setup {
            protocol: VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::REPLY_ACK,
            ..Default::default()
        },
    );
    let mut other = Guest::new(&r.socks[1], 1);
    g.good_read(0);
    other.good_read(0);

    // A whole new table, elsewhere in guest physical memory.
    let (_f, base, elsewhere) = other_memory(1 << 32);
    g.frontend.set_mem_table(&[elsewhere]).unwrap();
    // The queue's reactor goes through many idle loops (where it would
    // ask the guest for kicks through the used ring); the other export's
    // queue shares it and keeps serving.
    for _ in 0..200 {
        other.good_read(0);
    }
    // A request offered meanwhile waits.
    let s = g.offer_read(0);
    assert_eq!(g.used_within(0, Duration::from_millis(200)), None);
    g.frontend.set_mem_table(&[g.region()]).unwrap();
    assert_eq!(g.used(0), (0, 4097), "served once the rings are back");
    assert_eq!(g.read::<u8>(s), S_OK);

    // The same with single regions.
    g.frontend.remove_mem_region(&g.region()).unwrap();
    for _ in 0..200 {
        other.good_read(0);
    }
    let s = g.offer_read(0);
    assert_eq!(g.used_within(0, Duration::from_millis(200)), None);
    g.frontend.add_mem_region(&g.region()).unwrap();
    assert_eq!(g.used(0), (0, 4097), "served once the region is back");
    assert_eq!(g.read::<u8>(s), S_OK);
    g.good_read(0);
    other.good_read(0);
    assert!(r.exports[0].is_connected());
    assert_eq!(r.exports[0].stats().frontend_faults, 0);
    // SAFETY: our own mapping.
    unsafe { libc::munmap(base.cast(), MEM) };
}

/// A guest index that runs further ahead than the ring holds: the queue is
/// broken. Its connection is dropped (counted), as qemu-storage-daemon
/// does, so that the frontend reconnects and resets the device; a second
/// export on the same reactor keeps serving throughout.
#[test]
fn a_runaway_avail_index_drops_its_own_connection_and_nothing_else() {
    let r = rig_of(2, Duration::from_micros(50), 2);
    let mut g = Guest::new(&r.socks[0], 2);
    let mut other = Guest::new(&r.socks[1], 2);
    g.good_read(0);
    other.good_read(0);
    // Claim 1000 new requests on a 16-entry ring.
    let vq = &g.queues[0];
    g.write(vq.avail + 2, vq.next_avail.wrapping_add(1000));
    g.queues[0].kick.write(1).unwrap();
    eventually("the broken connection is dropped", || {
        r.exports[0].stats().frontend_faults > 0 && !r.exports[0].is_connected()
    });
    for _ in 0..10 {
        other.good_read(0);
        other.good_read(1);
    }
    // A new connection starts afresh.
    drop(g);
    let mut g = Guest::new(&r.socks[0], 2);
    g.good_read(0);
    g.good_read(1);
    assert!(!r.reactors.set().is_stopped());
}

/// The write end of a fresh pipe, dressed as an eventfd.
fn pipe_as_eventfd() -> (vmm_sys_util::eventfd::EventFd, std::fs::File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are new and ours.
    unsafe {
        (
            vmm_sys_util::eventfd::EventFd::from_raw_fd(fds[1]),
            std::fs::File::from_raw_fd(fds[0]),
        )
    }
}

/// Point 3: a call fd that is a pipe (whose buffer fills after 8192
/// notifications nobody reads) blocked the reactor's write, and with it
/// every queue on that reactor, for good. Call and kick fds must be
/// eventfds (a kick not in semaphore mode); the rest is refused, and the
/// queue runs without them (the guest polls).
#[test]
fn a_call_or_kick_fd_that_is_not_an_eventfd_is_refused() {
    let r = rig_of(1, Duration::from_micros(50), 2);
    let pipes = std::sync::Mutex::new(Vec::new());
    let mut g = Guest::setup(
        &r.socks[0],
        Setup {
            protocol: VhostUserProtocolFeatures::REPLY_ACK,
            call: &|_| {
                let (w, rd) = pipe_as_eventfd();
                pipes.lock().unwrap().push(rd);
                w
            },
            call_taken: false,
            ..Default::default()
        },
    );
    let mut other = Guest::new(&r.socks[1], 1);
    // More notifications than a pipe's buffer holds.
    for _ in 0..10_000 {
        g.good_read(0);
    }
    other.good_read(0);
    // A kick fd that is a pipe is refused as well.
    let (w, _rd) = pipe_as_eventfd();
    assert!(g.frontend.set_vring_kick(0, &w).is_err());
    g.good_read(0);
    // And an eventfd in semaphore mode: one read takes one count, so it
    // would stay readable and keep the reactor from ever sleeping.
    // (Kernels before 6.3 do not say a descriptor is one.)
    let sem = vmm_sys_util::eventfd::EventFd::new(libc::EFD_SEMAPHORE).unwrap();
    let info = format!(
        "/proc/self/fdinfo/{}",
        std::os::fd::AsRawFd::as_raw_fd(&sem)
    );
    if std::fs::read_to_string(info).is_ok_and(|i| i.contains("eventfd-semaphore")) {
        assert!(g.frontend.set_vring_kick(0, &sem).is_err());
    }
    g.good_read(0);
}

/// From an audit: SET_VRING_KICK with the invalid-FD flag (polling, no
/// kicks) was taken, the ring stopped and never started again: the
/// frontend's guest waited for ever on that queue. It is refused (said in
/// the answer when one is asked for), and the ring goes on as it was.
#[test]
fn a_kick_without_a_file_descriptor_is_refused() {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd};
    let r = rig_of(1, Duration::from_micros(50), 2);
    let mut g = Guest::new(&r.socks[0], 1);
    let mut other = Guest::new(&r.socks[1], 1);
    g.good_read(0);
    // Queue 0, bit 8: no file descriptor.
    let mut msg = header(SET_VRING_KICK, 8).to_vec();
    msg.extend_from_slice(&(1u64 << 8).to_le_bytes());
    // SAFETY: the frontend's socket, borrowed for one write and not closed.
    let mut sock = std::mem::ManuallyDrop::new(unsafe {
        std::os::unix::net::UnixStream::from_raw_fd(g.frontend.as_raw_fd())
    });
    sock.write_all(&msg).unwrap();
    // Messages are taken in order: once this is answered, that was too.
    g.frontend.get_features().unwrap();
    g.good_read(0);
    other.good_read(0);
}

/// A vhost-user message header: request, flags (version 1), payload size.
fn header(request: u32, size: u32) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&request.to_le_bytes());
    h[4..8].copy_from_slice(&1u32.to_le_bytes());
    h[8..12].copy_from_slice(&size.to_le_bytes());
    h
}
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_VRING_KICK: u32 = 12;

/// Point 4: a frontend that sends a header and never the payload it
/// announces held the export's control thread in a blocking read for good,
/// and a delete of the export (which joins that thread) with it. The
/// connection is dropped after the frontend IO timeout, and a delete ends
/// a stuck read at once.
#[test]
fn a_frontend_that_stops_mid_message_is_dropped_and_holds_up_no_delete() {
    use std::io::Write;
    let r = rig_of(1, Duration::from_micros(50), 2);
    let mut other = Guest::new(&r.socks[1], 1);
    let mut s = std::os::unix::net::UnixStream::connect(&r.socks[0]).unwrap();
    s.write_all(&header(SET_FEATURES, 8)).unwrap();
    eventually("connected", || r.exports[0].is_connected());
    other.good_read(0);
    eventually("the silent frontend is dropped", || {
        !r.exports[0].is_connected()
    });
    // A new frontend is served.
    drop(s);
    let mut g = Guest::new(&r.socks[0], 1);
    g.good_read(0);
    drop(g);
    // Stuck again, and the export is deleted meanwhile.
    let mut s = std::os::unix::net::UnixStream::connect(&r.socks[0]).unwrap();
    s.write_all(&header(SET_FEATURES, 8)).unwrap();
    eventually("connected", || r.exports[0].is_connected());
    let t = Instant::now();
    r.exports[0].delete(true).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "the delete waited for the frontend's timeout: {:?}",
        t.elapsed()
    );
    other.good_read(0);
}

/// Point 4, the other direction: a frontend that sends requests and never
/// reads the answers fills the socket; the export's blocking write held
/// its control thread for good. It is dropped after the timeout.
#[test]
fn a_frontend_that_never_reads_its_answers_is_dropped() {
    use std::io::Write;
    let r = rig_of(1, Duration::from_micros(50), 2);
    let mut other = Guest::new(&r.socks[1], 1);
    let mut s = std::os::unix::net::UnixStream::connect(&r.socks[0]).unwrap();
    s.set_nonblocking(true).unwrap();
    let req = header(GET_FEATURES, 0);
    let mut sent = 0u64;
    let t = Instant::now();
    // Until both directions are full: the daemon no longer reads.
    let mut full_since: Option<Instant> = None;
    while full_since.is_none_or(|f| f.elapsed() < Duration::from_millis(500)) {
        match s.write(&req) {
            Ok(n) => {
                assert_eq!(n, req.len());
                sent += 1;
                full_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                full_since.get_or_insert_with(Instant::now);
                std::thread::sleep(Duration::from_millis(10));
            }
            // Dropped already.
            Err(_) => break,
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{sent} requests taken"
        );
    }
    other.good_read(0);
    eventually("the frontend that never reads is dropped", || {
        !r.exports[0].is_connected()
    });
    drop(s);
    let mut g = Guest::new(&r.socks[0], 1);
    g.good_read(0);
    other.good_read(0);
}

/// Point 14: the inflight area is the frontend's; a request recorded in
/// flight with the largest counter made the next request's counter
/// overflow on the reactor (a panic in debug builds).
#[test]
fn an_inflight_area_with_a_counter_at_its_limit_is_served() {
    let r = rig_of(1, Duration::from_micros(50), 2);
    let mut other = Guest::new(&r.socks[1], 1);
    let prepare = |f: &mut vhost::vhost_user::Frontend, base: *mut u8| {
        // The guest had offered descriptor 3 (queue 0's avail ring is at
        // 0x2000): avail[0] = 3, avail idx = 1.
        // SAFETY: inside guest memory.
        unsafe {
            std::ptr::write_volatile(base.add(0x2000 + 4) as *mut u16, 3);
            std::ptr::write_volatile(base.add(0x2000 + 2) as *mut u16, 1);
        }
        inflight_area(f, |area| {
            // Descriptor 3 in flight (the split layout: a 16-byte queue
            // header, then 16 bytes per descriptor: inflight, padding,
            // next, counter).
            // SAFETY: inside the area.
            unsafe {
                let e = area.add(16 + 16 * 3);
                std::ptr::write_volatile(e, 1u8);
                std::ptr::write_volatile(e.add(8) as *mut u64, u64::MAX);
            }
        });
    };
    let mut g = Guest::setup(
        &r.socks[0],
        Setup {
            protocol: VhostUserProtocolFeatures::INFLIGHT_SHMFD,
            prepare: Some(&prepare),
            ..Default::default()
        },
    );
    g.queues[0].next_avail = 1;
    // Descriptor 3 (all zeroes: no status byte) comes back unanswered.
    assert_eq!(g.used(0).0, 3);
    g.good_read(0);
    g.good_read(0);
    other.good_read(0);
    assert!(!r.reactors.set().is_stopped());
}

/// From an audit: a request the daemon completed (its used-ring entry
/// written) just before it died may never have been signalled, and at
/// the restart nothing signalled it either: a guest waiting for that
/// interrupt waited for good. A queue that picks up an inflight area
/// tells its guest once, also when its call fd comes only later (review).
#[test]
fn a_queue_picking_up_after_a_restart_signals_its_guest_once() {
    restart_signal(false);
    restart_signal(true);
}

fn restart_signal(late_call: bool) {
    use std::os::fd::AsRawFd;
    let r = rig_of(1, Duration::from_micros(50), 1);
    let prepare = |f: &mut vhost::vhost_user::Frontend, base: *mut u8| {
        // Before the restart, descriptor 3 was offered and completed:
        // avail idx 1 (avail ring at 0x2000), used idx 1 with {3, 1}
        // (used ring at 0x3000).
        // SAFETY: inside guest memory.
        unsafe {
            std::ptr::write_volatile(base.add(0x2000 + 4) as *mut u16, 3);
            std::ptr::write_volatile(base.add(0x2000 + 2) as *mut u16, 1);
            std::ptr::write_volatile(base.add(0x3000 + 4) as *mut u32, 3);
            std::ptr::write_volatile(base.add(0x3000 + 8) as *mut u32, 1);
            std::ptr::write_volatile(base.add(0x3000 + 2) as *mut u16, 1);
        }
        inflight_area(f, |area| {
            // The area as the daemon left it: in use (version 1), its last
            // completion (head 3) at used index 1, nothing in flight.
            // SAFETY: inside the area.
            unsafe {
                std::ptr::write_volatile(area.add(8) as *mut u16, 1);
                std::ptr::write_volatile(area.add(12) as *mut u16, 3);
                std::ptr::write_volatile(area.add(14) as *mut u16, 1);
            }
        });
    };
    // Late: the first call fd (a pipe) is refused, and the ring starts
    // without one; the guest's comes after.
    let pipes = std::sync::Mutex::new(Vec::new());
    let pipe_call = |_| {
        let (w, rd) = pipe_as_eventfd();
        pipes.lock().unwrap().push(rd);
        w
    };
    let mut g = Guest::setup(
        &r.socks[0],
        Setup {
            protocol: VhostUserProtocolFeatures::INFLIGHT_SHMFD
                | VhostUserProtocolFeatures::REPLY_ACK,
            prepare: Some(&prepare),
            call: if late_call {
                &pipe_call
            } else {
                &|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap()
            },
            call_taken: !late_call,
            ..Default::default()
        },
    );
    if late_call {
        g.queues[0].call = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        g.frontend.set_vring_call(0, &g.queues[0].call).unwrap();
    }
    let mut fd = libc::pollfd {
        fd: g.queues[0].call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; waits at most 20 s.
    let n = unsafe { libc::poll(&mut fd, 1, 20_000) };
    assert_eq!(
        n, 1,
        "the guest was never signalled (late call fd: {late_call})"
    );
}

/// Ask the daemon for an inflight area of one queue, let `fill` write it
/// (as a restarted frontend finds it), and hand it back.
fn inflight_area(f: &mut vhost::vhost_user::Frontend, fill: impl FnOnce(*mut u8)) {
    use std::os::fd::AsRawFd;
    use vhost::vhost_user::message::VhostUserInflight;
    let ask = VhostUserInflight {
        num_queues: 1,
        queue_size: QSIZE,
        ..Default::default()
    };
    let (info, file) = f.get_inflight_fd(&ask).unwrap();
    // SAFETY: a fresh shared mapping of the area the daemon gave us.
    let area = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            info.mmap_size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            info.mmap_offset as libc::off_t,
        )
    } as *mut u8;
    assert_ne!(area as isize, -1);
    fill(area);
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(area.cast(), info.mmap_size as usize) };
    f.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
}

fn refused<T: std::fmt::Debug>(r: Result<T, vhost::Error>, what: &str) {
    assert!(r.is_err(), "{what} was accepted: {r:?}");
}

/// Point 2, first half: a region declared larger than its file was mapped
/// as it was, and the first copy past the file's end killed the daemon
/// with SIGBUS. Such a table is refused, and so is a descriptor that is not
/// a memory file; the connection goes on with its old table.
#[test]
fn a_memory_region_past_the_end_of_its_file_is_refused() {
    use std::os::fd::AsRawFd;
    let r = rig_of(1, Duration::from_micros(50), 2);
    let mut other = Guest::new(&r.socks[1], 1);
    let mut g = Guest::setup(
        &r.socks[0],
        Setup {
            protocol: VhostUserProtocolFeatures::REPLY_ACK,
            ..Default::default()
        },
    );
    g.good_read(0);
    let (f, base, mut big) = other_memory(0);
    big.memory_size = 2 * MEM as u64;
    refused(g.frontend.set_mem_table(&[big]), "a region twice its file");
    let mut off = g.region();
    off.mmap_offset = 4096;
    refused(
        g.frontend.set_mem_table(&[off]),
        "a region running one page past its file",
    );
    let (w, _rd) = pipe_as_eventfd();
    let mut pipe = g.region();
    pipe.mmap_handle = w.as_raw_fd();
    refused(g.frontend.set_mem_table(&[pipe]), "a pipe as guest memory");
    g.good_read(0);
    other.good_read(0);
    drop(f);
    // SAFETY: our own mapping.
    unsafe { libc::munmap(base.cast(), MEM) };
}

/// Point 2, second half: the frontend shrinks its memory file after the
/// daemon mapped it. The copy of a read's data into the lost pages faults
/// with SIGBUS; it must cost that connection only: the daemon lives, the
/// other export on the same reactor keeps serving, the frontend is
/// dropped (counted) and a new one is served.
#[test]
fn guest_memory_shrunk_under_the_mapping_costs_only_its_connection() {
    let r = rig_of(1, Duration::from_micros(50), 2);
    let mut other = Guest::new(&r.socks[1], 1);
    let mut g = Guest::new(&r.socks[0], 1);
    g.good_read(0);
    // Keep the first 1 MiB (rings, header, status); the data buffer at
    // 2 MiB is gone.
    g.file.set_len(1 << 20).unwrap();
    let (t, h, d, s) = (g.queues[0].desc, 0x20000u64, 0x200000u64, 0x60000u64);
    g.header(h, IN, 0);
    g.write(s, UNTOUCHED);
    g.desc(t, 0, h, 16, NEXT, 1);
    g.desc(t, 1, d, 4096, NEXT | WRITE, 2);
    g.desc(t, 2, s, 1, WRITE, 0);
    g.offer(0, 0);
    eventually("the frontend whose memory went is dropped", || {
        !r.exports[0].is_connected()
    });
    // (The rings, in the same region, read zeroes from then on: the
    // queue may count as broken too.)
    assert!(r.exports[0].stats().frontend_faults >= 1);
    for _ in 0..10 {
        other.good_read(0);
    }
    // The process lives on; a new frontend is served.
    drop(g);
    let mut g = Guest::new(&r.socks[0], 1);
    g.good_read(0);
    other.good_read(0);
}

/// Point 5: guest memory is mapped (and perhaps pinned for DMA) only
/// within the export's limit, checked before anything is mapped.
#[test]
fn guest_memory_over_the_export_limit_is_refused() {
    let r = rig_custom(1, Duration::from_micros(50), 1, |o| {
        o.memory_limit = MEM as u64
    });
    let mut g = Guest::setup(
        &r.socks[0],
        Setup {
            protocol: VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
            ..Default::default()
        },
    );
    g.good_read(0);
    let (f, base, second) = other_memory(1 << 32);
    refused(
        g.frontend.set_mem_table(&[g.region(), second]),
        "a table of twice the limit",
    );
    refused(
        g.frontend.add_mem_region(&second),
        "a region over the limit",
    );
    // Overlapping regions are refused too.
    let mut overlap = second;
    overlap.guest_phys_addr = 0x1000;
    refused(
        g.frontend.set_mem_table(&[g.region(), overlap]),
        "overlapping regions",
    );
    g.good_read(0);
    drop(f);
    // SAFETY: our own mapping.
    unsafe { libc::munmap(base.cast(), MEM) };
}

/// An indirect table longer than the queue (the spec asks drivers not to;
/// qemu-storage-daemon serves it): it came back with no status byte. It is
/// served, and a table that loops is still refused.
#[test]
fn an_indirect_table_longer_than_the_queue_is_served() {
    let r = rig_of(1, Duration::from_micros(50), 1);
    let mut g = Guest::new(&r.socks[0], 1);
    let (h, s, table) = (0x20000u64, 0x60000u64, 0x70000u64);
    let n = 26u16; // descriptors in the table: 24 of data, 3 blocks
    g.header(h, IN, 0);
    g.desc(table, 0, h, 16, NEXT, 1);
    for i in 1..n - 1 {
        // 512 bytes each into the data area.
        g.desc(
            table,
            i,
            0x80000 + 512 * (i as u64 - 1),
            512,
            NEXT | WRITE,
            i + 1,
        );
    }
    g.desc(table, n - 1, s, 1, WRITE, 0);
    let got = exchange(
        &mut g,
        |g, t| g.desc(t, 0, table, 16 * n as u32, INDIRECT, 0),
        s,
    );
    assert_eq!(got, ((n as u32 - 2) * 512 + 1, S_OK));
    g.good_read(0);
}

/// From review: a request the frontend waits for an answer to (here
/// GET_VRING_BASE of a queue that does not exist) failed in our handler,
/// the vhost crate sends no answer then, and the connection went on: the
/// frontend waited for good (QEMU holding its main loop). The connection
/// closes instead, and the export takes the next frontend.
#[test]
fn a_failed_request_that_must_be_answered_closes_the_connection() {
    use std::io::{Read, Write};
    const GET_VRING_BASE: u32 = 11;
    let r = rig_of(1, Duration::from_micros(50), 1);
    let mut s = std::os::unix::net::UnixStream::connect(&r.socks[0]).unwrap();
    let mut msg = header(GET_VRING_BASE, 8).to_vec();
    msg.extend_from_slice(&99u32.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    s.write_all(&msg).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => {}
        other => panic!("expected the connection closed, got {other:?}"),
    }
    drop(s);
    let mut g = Guest::new(&r.socks[0], 1);
    g.good_read(0);
}

/// O_NONBLOCK belongs to the open file, which the frontend shares: one
/// that clears it on its kick fd after handing it over must not make the
/// reactor wait on that idle queue's empty counter. The other export on
/// the same reactor keeps serving, and so does this one.
#[test]
fn a_kick_fd_made_blocking_by_the_frontend_holds_up_no_reactor() {
    let r = rig_of(1, Duration::from_micros(50), 2);
    let mut g = Guest::new(&r.socks[0], 1);
    let mut other = Guest::new(&r.socks[1], 1);
    g.good_read(0);
    other.good_read(0);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&g.queues[0].kick);
    // SAFETY: fcntl on the guest's own descriptor.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        assert!(flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0);
    }
    // The first queue idles (draining its kick fd now and then) while the
    // second, on the same reactor, serves reads.
    for _ in 0..200 {
        other.good_read(0);
    }
    g.good_read(0);
    assert!(!r.reactors.set().is_stopped());
}

/// From an audit: without EVENT_IDX a driver asks for no interrupts by
/// setting VIRTQ_AVAIL_F_NO_INTERRUPT in the avail ring (a polling driver,
/// firmware); every completion interrupted it all the same. Its answers
/// come without a call; clearing the flag brings calls back.
#[test]
fn a_driver_that_asks_for_no_interrupts_gets_none() {
    let r = rig_of(1, Duration::from_micros(50), 1);
    let mut g = Guest::setup(
        &r.socks[0],
        Setup {
            call: &|_| vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ..Default::default()
        },
    );
    let avail = g.queues[0].avail;
    g.write(avail, 1u16);
    for _ in 0..3 {
        g.good_read(0);
    }
    assert!(
        g.queues[0].call.read().is_err(),
        "interrupted though it asked for none"
    );
    g.write(avail, 0u16);
    g.good_read(0);
    let t = Instant::now();
    while g.queues[0].call.read().is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no interrupt once asked for"
        );
        std::thread::yield_now();
    }
}

/// From an audit: a ring whose guest address is misaligned for its part
/// (a region whose user address is 8 bytes off its guest address: the
/// user address the frontend gives is aligned, the descriptor table's
/// guest address is not) was replaced by virtio-queue with address 0 when
/// the ring started, with a log line, and the ring ran there. It is
/// refused when given (which costs the connection, as a refused message
/// does).
#[test]
fn a_misaligned_ring_address_is_refused() {
    use std::os::fd::AsRawFd;
    let r = rig_of(1, Duration::from_micros(50), 1);
    let (file, base) = guest_memory(c"misaligned");
    let f = bare_frontend(&r.socks[0]);
    let user = base as u64 + 8;
    f.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: user,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    }])
    .unwrap();
    f.set_vring_num(0, QSIZE).unwrap();
    let given = f.set_vring_addr(
        0,
        &vhost::VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: user + 0x5008,
            avail_ring_addr: user + 0x6000,
            used_ring_addr: user + 0x7000,
            log_addr: None,
        },
    );
    assert!(given.is_err(), "a descriptor table at guest 0x5008 taken");
    drop(f);
    eventually("the connection ends", || !r.exports[0].is_connected());
    // The export serves the next frontend.
    Guest::new(&r.socks[0], 1).good_read(0);
}

/// A frontend connected to `sock` with its features set, every message
/// waiting for the daemon's answer, and no memory yet.
fn bare_frontend(sock: &std::path::Path) -> vhost::vhost_user::Frontend {
    let mut f = vhost::vhost_user::Frontend::connect(sock, 1).unwrap();
    f.set_owner().unwrap();
    let features = f.get_features().unwrap();
    f.set_features(features & ((1 << 32) | (1 << 30))).unwrap();
    let pf = f.get_protocol_features().unwrap();
    f.set_protocol_features(pf & VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    f.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    f
}

/// A mapper that maps nothing: its presence says guest memory is pinned.
struct Pins;

impl bdev::DmaMapper for Pins {
    unsafe fn dma_map(&self, _ptr: *mut u8, _len: usize) -> Result<(), String> {
        Ok(())
    }
    fn dma_unmap(&self, _ptr: *mut u8) {}
}

/// From an audit: with a device that pins guest memory for DMA (an
/// IOMMU), each export's limit defaulted to the host's memory, so two
/// frontends with sparse files of most of it pinned more than the host
/// has, and the OOM killer took the daemon. Every connection's memory
/// together stays within the host's memory less a reserve, counted by the
/// file behind it: the disks of one VM map the same memory (review).
#[test]
fn guest_memory_pinned_for_dma_is_held_within_the_host_daemon_wide() {
    use std::os::fd::AsRawFd;
    let r = rig_of(1, Duration::from_micros(50), 3);
    let pins: std::sync::Arc<dyn bdev::DmaMapper> = std::sync::Arc::new(Pins);
    bdev::add_dma_mapper(&pins);
    let total = appliance::host::memory_total().unwrap();
    // Each within its export's limit; two files of it over the host.
    let size = (total * 3 / 5) & !0xfff;
    let table = |name: &std::ffi::CStr| {
        // SAFETY: a plain syscall; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        file
    };
    let region = |file: &std::fs::File| VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: 0x7000_0000_0000,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    };
    let (a, b) = (table(c"pinned-a"), table(c"pinned-b"));
    let first = bare_frontend(&r.socks[0]);
    first.set_mem_table(&[region(&a)]).unwrap();
    // A second disk of the same VM: the same memory, taken.
    let same = bare_frontend(&r.socks[2]);
    same.set_mem_table(&[region(&a)]).unwrap();
    // Another VM's memory: over the host.
    let second = bare_frontend(&r.socks[1]);
    let refused = second.set_mem_table(&[region(&b)]);
    assert!(refused.is_err(), "both pinned");
    drop(second);
    eventually("the refused connection ends", || {
        !r.exports[1].is_connected()
    });
    // Once the first VM has gone, the other's is taken.
    drop(first);
    drop(same);
    eventually("the first VM's connections end", || {
        !r.exports[0].is_connected() && !r.exports[2].is_connected()
    });
    let second = bare_frontend(&r.socks[1]);
    second.set_mem_table(&[region(&b)]).unwrap();
    drop(second);
    eventually("the second VM's connection ends", || {
        !r.exports[1].is_connected()
    });
    // Two halves of one file are both pinned (review: counting a file
    // with the most one connection maps let them through).
    let whole = table(c"pinned-c");
    whole.set_len(2 * size).unwrap();
    let low = bare_frontend(&r.socks[0]);
    low.set_mem_table(&[region(&whole)]).unwrap();
    let high = bare_frontend(&r.socks[1]);
    let refused = high.set_mem_table(&[VhostUserMemoryRegionInfo {
        mmap_offset: size,
        ..region(&whole)
    }]);
    assert!(refused.is_err(), "both halves pinned");
    drop(pins);
}

/// From an audit: a frontend that made one of our eventfd writes block
/// (the watchdog frees such a write in ~100 ms of a reactor) was marked
/// for its connection only: reconnecting gave it a fresh mark, and the
/// same cost every time. Its export refuses connections for a while now
/// (the watchdog's strike is tested beside it, in eventfd.rs): a frontend
/// that connects then is let go at once, and another export serves on.
#[test]
fn an_export_whose_frontend_made_a_write_block_refuses_connections_for_a_while() {
    use std::io::Read;
    let r = rig_of(1, Duration::from_micros(50), 2);
    let mut g = Guest::new(&r.socks[0], 1);
    g.good_read(0);
    r.exports[0].strike_for_test();
    drop(g);
    eventually("the connection ends", || !r.exports[0].is_connected());
    let mut s = std::os::unix::net::UnixStream::connect(&r.socks[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        other => panic!("expected the connection let go, got {other:?}"),
    }
    assert!(!r.exports[0].is_connected());
    Guest::new(&r.socks[1], 1).good_read(0);
}
