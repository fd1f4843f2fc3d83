//! Dirty logging for live migration, driven by a raw vhost-user frontend:
//! with VHOST_F_LOG_ALL on, exactly the guest pages the backend wrote (read
//! data, status bytes, the used ring) are marked in the log SET_LOG_BASE
//! gave; with it off, none. A log the backend cannot use is refused. A
//! write held for a suspended range is answered before the ring's index is
//! handed back (a migration's destination would never see it again).

#[path = "hostile/guest.rs"]
mod guest;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use appliance::export::{Export, ExportOptions};
use appliance::qos::QosLimits;
use appliance::volume::Volume;
use bdev::{BlockDevice, FaultDevice, IoOp, RamDevice};
use guest::*;
use std::sync::Arc;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

/// VHOST_F_LOG_ALL.
const LOG_ALL: u64 = 1 << 26;
/// What the harness negotiates: VERSION_1, PROTOCOL_FEATURES, INDIRECT_DESC.
const BASE: u64 = (1 << 32) | (1 << 30) | (1 << 28);
/// Bytes of log for MEM bytes of guest memory (one bit per 4 KiB page).
const LOG_BYTES: u64 = (MEM as u64) / 4096 / 8;

fn memfd(len: u64) -> File {
    // SAFETY: plain syscall; result checked.
    let fd = unsafe { libc::memfd_create(c"dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// The pages marked in `log`, and the log cleared (as the frontend's sync
/// does).
fn take_marked(log: &File) -> BTreeSet<u64> {
    let pages = marked(log);
    log.write_all_at(&vec![0u8; LOG_BYTES as usize], 0).unwrap();
    pages
}

/// The used ring is marked just after the used index is written (a mark
/// before the write could be cleared by a sync in between and lost), so a
/// frontend that saw the index may look before that mark: wait for the
/// pages in `want` (failing at once on any other), then clear the log.
fn take_exactly(log: &File, want: &[u64]) {
    let want: BTreeSet<u64> = want.iter().copied().collect();
    let t = std::time::Instant::now();
    loop {
        let got = marked(log);
        assert!(got.is_subset(&want), "marked {got:x?}, expected {want:x?}");
        if got == want {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "marked {got:x?}, expected {want:x?}"
        );
        std::thread::yield_now();
    }
    take_marked(log);
}

/// The pages marked in `log`.
fn marked(log: &File) -> BTreeSet<u64> {
    let mut b = vec![0u8; LOG_BYTES as usize];
    log.read_exact_at(&mut b, 0).unwrap();
    let mut pages = BTreeSet::new();
    for (i, byte) in b.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                pages.insert(i as u64 * 8 + bit);
            }
        }
    }
    pages
}

fn logging_guest(sock: &std::path::Path) -> Guest {
    Guest::setup(
        sock,
        Setup {
            protocol: VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::REPLY_ACK,
            ..Default::default()
        },
    )
}

fn region(log: &File, size: u64, offset: u64) -> Option<VhostUserDirtyLogRegion> {
    Some(VhostUserDirtyLogRegion {
        mmap_size: size,
        mmap_offset: offset,
        mmap_handle: log.as_raw_fd(),
    })
}

/// A 4 KiB request of `kind` at sector 8 with its data at guest address
/// `data`, header at 0x20000 and status at 0x60000; returns its status.
fn request(g: &mut Guest, kind: u32, data: u64) -> u8 {
    let (h, s) = (0x20000, 0x60000);
    let (len, status) = exchange(
        g,
        |g, t| {
            g.header(h, kind, 8);
            g.desc(t, 0, h, 16, NEXT, 1);
            let flags = if kind == IN { NEXT | WRITE } else { NEXT };
            g.desc(t, 1, data, 4096, flags, 2);
            g.desc(t, 2, s, 1, WRITE, 0);
        },
        s,
    );
    assert_eq!(len, if kind == IN { 4097 } else { 1 });
    status
}

/// One export offering live migration (the default).
fn migratable() -> Rig {
    rig(1)
}

#[test]
fn logging_marks_exactly_the_pages_the_backend_writes() {
    let rig = migratable();
    let mut g = logging_guest(&rig.sock);
    let log = memfd(4096);
    g.frontend
        .set_log_base(0, region(&log, LOG_BYTES, 0))
        .unwrap();
    let used_page = g.queues[0].used / 4096;

    // Logging is off until the frontend turns VHOST_F_LOG_ALL on.
    assert_eq!(request(&mut g, IN, 0x40000), S_OK);
    assert!(take_marked(&log).is_empty());

    g.frontend.set_features(BASE | LOG_ALL).unwrap();
    // A read whose data straddles two pages: both, the status byte's page
    // and the used ring; not the header (the backend only reads it) nor
    // the descriptor table.
    assert_eq!(request(&mut g, IN, 0x40800), S_OK);
    take_exactly(&log, &[0x40, 0x41, 0x60, used_page]);
    // A write: the backend writes only the status and the used ring.
    assert_eq!(request(&mut g, OUT, 0x50000), S_OK);
    take_exactly(&log, &[0x60, used_page]);
    // A refused request (beyond the disk) still writes its status.
    let (h, s) = (0x20000u64, 0x60000u64);
    let (_, status) = exchange(
        &mut g,
        |g, t| {
            g.header(h, IN, 1 << 40);
            g.desc(t, 0, h, 16, NEXT, 1);
            g.desc(t, 1, 0x70000, 4096, NEXT | WRITE, 2);
            g.desc(t, 2, s, 1, WRITE, 0);
        },
        s,
    );
    assert_eq!(status, S_IOERR);
    take_exactly(&log, &[0x60, used_page]);
    // GET_ID writes its 20 bytes of serial, across a page boundary here:
    // those two pages are marked, not the rest of the 12 KiB the guest
    // offered (a chain of such descriptors, each up to 4 GiB, used to
    // keep a reactor marking pages for seconds).
    let (len, status) = exchange(
        &mut g,
        |g, t| {
            g.header(h, 8, 0);
            g.desc(t, 0, h, 16, NEXT, 1);
            g.desc(t, 1, 0x40ff0, 0x3000, NEXT | WRITE, 2);
            g.desc(t, 2, s, 1, WRITE, 0);
        },
        s,
    );
    assert_eq!((len, status), (21, S_OK));
    take_exactly(&log, &[0x40, 0x41, 0x60, used_page]);
    // What the operator sees (applctl export list): on, and the page bits
    // set (4 + 2 + 2 + 4 marks, a page marked twice counting twice).
    assert!(rig.exports[0].dirty_log().is_some_and(|n| n >= 12));

    // Off again: nothing is marked. Turning it off returns once every
    // reactor finished the polls begun before, so every earlier mark is in
    // by now.
    g.frontend.set_features(BASE).unwrap();
    assert_eq!(rig.exports[0].dirty_log(), None);
    take_marked(&log);
    assert_eq!(request(&mut g, IN, 0x40800), S_OK);
    assert!(take_marked(&log).is_empty());
}

#[test]
fn a_log_too_small_or_unmappable_is_refused_and_the_export_serves_on() {
    let rig = migratable();
    let small = memfd(4096);
    // Each bad log closes that frontend's connection (a migration that
    // cannot log must fail, and the frontend waits for this message's
    // reply); the export takes the next frontend.
    for (size, offset, why) in [
        (LOG_BYTES / 2, 0, "covers half the guest's memory"),
        (0, 0, "empty"),
        (LOG_BYTES, 100, "offset not page aligned"),
        (8192, 0, "beyond its file"),
    ] {
        let g = logging_guest(&rig.sock);
        let r = g.frontend.set_log_base(0, region(&small, size, offset));
        assert!(r.is_err(), "{why}: {r:?}");
        drop(g);
    }
    let mut g = logging_guest(&rig.sock);
    g.frontend
        .set_log_base(0, region(&small, LOG_BYTES, 0))
        .unwrap();
    g.frontend.set_features(BASE | LOG_ALL).unwrap();
    assert_eq!(request(&mut g, IN, 0x40000), S_OK);
    assert!(marked(&small).contains(&0x40));
}

#[test]
fn with_live_migration_off_dirty_logging_is_not_offered() {
    // QEMU then refuses to migrate the VM, which loses nothing.
    let rig = rig_custom(1, poller::ReactorConfig::default().idle_spin, 1, |o| {
        o.live_migration = false
    });
    let g = logging_guest(&rig.sock);
    let offered = g.frontend.get_features().unwrap();
    assert_eq!(offered & LOG_ALL, 0);
    assert!(g.frontend.set_features(BASE | LOG_ALL).is_err());
}

/// Suspend blocks 0..64 of the rig's volume and offer a 4 KiB write to
/// block 1, inside them: held. Returns its status byte's address.
fn held_write(rig: &Rig, g: &mut Guest) -> u64 {
    rig.volumes[0]
        .suspend_range(0, 64, std::time::Duration::from_secs(5))
        .unwrap();
    let (h, data, s) = (0x20000, 0x40000, 0x60000);
    g.write(s, UNTOUCHED);
    g.header(h, OUT, 8);
    let t = g.queues[0].desc;
    g.desc(t, 0, h, 16, NEXT, 1);
    g.desc(t, 1, data, 4096, NEXT, 2);
    g.desc(t, 2, s, 1, WRITE, 0);
    g.offer(0, 0);
    let t0 = std::time::Instant::now();
    while rig.exports[0].parked_writes() != 1 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "the write was not held"
        );
        std::thread::yield_now();
    }
    s
}

#[test]
fn a_write_held_for_a_suspended_range_is_answered_before_the_ring_index_is_handed_over() {
    let rig = rig(1);
    let mut g = Guest::new(&rig.sock, 1);
    let s = held_write(&rig, &mut g);
    // The frontend stops the ring as QEMU does before a migration's
    // destination takes over; what the used ring says when the index
    // comes back is what the destination's guest will see.
    let mut f = g.frontend.clone();
    let used_idx = (g.base as usize + g.queues[0].used as usize + 2) as *const u16;
    let used_idx = used_idx as usize;
    let stop = std::thread::spawn(move || {
        f.set_vring_enable(0, false).unwrap();
        let base = f.get_vring_base(0).unwrap();
        // SAFETY: the guest's used index, in memory the test keeps mapped
        // until it joins this thread.
        let used = unsafe { std::ptr::read_volatile(used_idx as *const u16) };
        (base, used)
    });
    // The stop waits for the write (up to its 30 s time-out): without
    // that it would come back at once with the write unanswered.
    let t0 = std::time::Instant::now();
    while !stop.is_finished() && t0.elapsed() < std::time::Duration::from_secs(2) {
        std::thread::yield_now();
    }
    assert!(
        !stop.is_finished(),
        "the ring was handed over while a write was held: {:?}",
        stop.join().unwrap()
    );
    rig.volumes[0].resume_range();
    let (base, used) = stop.join().unwrap();
    assert_eq!(
        (base, used),
        (1, 1),
        "the write is answered before the index comes back"
    );
    assert_eq!(g.read::<u8>(s), S_OK);
}

/// From an audit: when the range stayed suspended past the stop's
/// time-out, the ring stopped with the held write unanswered while the
/// index handed back counted it as taken: a migration's destination never
/// saw it, and the guest waited for it for ever (virtio-blk has no
/// time-out) or lost it without a word. It is answered with an I/O error
/// before the index comes back.
#[test]
fn a_write_held_past_the_stops_time_out_is_answered_with_an_error() {
    let rig = rig_custom(1, poller::ReactorConfig::default().idle_spin, 1, |o| {
        o.drain_timeout = Some(std::time::Duration::from_millis(500))
    });
    let mut g = Guest::new(&rig.sock, 1);
    let s = held_write(&rig, &mut g);
    g.frontend.set_vring_enable(0, false).unwrap();
    let base = g.frontend.get_vring_base(0).unwrap();
    // SAFETY: the guest's used index, in memory the test keeps mapped.
    let used = unsafe {
        std::ptr::read_volatile((g.base as usize + g.queues[0].used as usize + 2) as *const u16)
    };
    assert_eq!((base, used), (1, 1), "the index counts an unanswered write");
    assert_eq!(g.read::<u8>(s), S_IOERR);
    rig.volumes[0].resume_range();
}

/// An export of a 1 MiB RAM volume behind a fault injector, with `qos`
/// as its limits and a drain time-out of 200 ms, on two reactors.
struct FaultRig {
    control: Arc<bdev::FaultControl>,
    volume: Volume,
    export: Export,
    sock: std::path::PathBuf,
    reactors: poller::Reactors,
    _dir: tempfile::TempDir,
}

fn fault_rig(qos: QosLimits) -> FaultRig {
    let reactors = poller::Reactors::start(poller::ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ram: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("ram", 4096, 256).unwrap());
    let fault = Arc::new(FaultDevice::new(ram));
    let control = fault.control();
    let volume = Volume::new(reactors.set(), "v", fault);
    volume.init_qos(qos);
    let sock = dir.path().join("h.sock");
    let export = Export::create(
        reactors.set(),
        &volume,
        ExportOptions {
            serial: "h".into(),
            drain_timeout: Some(std::time::Duration::from_millis(200)),
            ..ExportOptions::new(sock.clone(), 1)
        },
    )
    .unwrap();
    FaultRig {
        control,
        volume,
        export,
        sock,
        reactors,
        _dir: dir,
    }
}

/// From an audit: turning dirty logging on drained the queues first, so a
/// request the device held past the drain time-out made the switch fail,
/// and QEMU (to 9.0 at least) aborts the whole VM when a backend refuses
/// to start logging. The switch waits for no device now: the read held
/// across it has its pages marked when it completes.
#[test]
fn dirty_logging_switched_on_while_the_device_holds_a_read_marks_it_once_done() {
    let FaultRig {
        control,
        volume,
        export,
        sock,
        reactors,
        _dir,
    } = fault_rig(QosLimits::default());
    let mut g = logging_guest(&sock);
    let used_page = g.queues[0].used / 4096;
    let log = memfd(4096);
    g.frontend
        .set_log_base(0, region(&log, LOG_BYTES, 0))
        .unwrap();
    // A read the device holds (data at 0x40000, status at 0x60000).
    control.hold(Some(IoOp::Read), 0, u64::MAX, 1);
    g.offer_read(0);
    assert!(control.wait_held(1, std::time::Duration::from_secs(10)));
    g.frontend
        .set_features(BASE | LOG_ALL)
        .expect("logging goes on");
    control.release();
    assert_eq!(g.used(0), (0, 4097));
    take_exactly(&log, &[0x40, 0x60, used_page]);
    drop(g);
    drop(export);
    drop(volume);
    reactors.shutdown().unwrap();
}

/// From an audit: requests in flight when logging goes on have their
/// chains walked again, and the guest may have rewritten them meanwhile.
/// A writable descriptor claiming 4 GiB held the reactor marking pages,
/// and a zero-length status descriptor underflowed (a panic of the
/// reactor in a debug build, the whole log marked in a release one). The
/// data marked is the read's, its length at most.
#[test]
fn a_chain_rewritten_while_in_flight_marks_no_more_than_its_read() {
    let FaultRig {
        control,
        volume,
        export,
        sock,
        reactors,
        _dir,
    } = fault_rig(QosLimits::default());
    let mut g = logging_guest(&sock);
    let used_page = g.queues[0].used / 4096;
    let log = memfd(4096);
    g.frontend
        .set_log_base(0, region(&log, LOG_BYTES, 0))
        .unwrap();
    control.hold(Some(IoOp::Read), 0, u64::MAX, 1);
    g.offer_read(0);
    assert!(control.wait_held(1, std::time::Duration::from_secs(10)));
    // Taken and held: the guest rewrites its chain (data at 0x40000 now
    // claims 4 GiB, the status descriptor nothing).
    let t = g.queues[0].desc;
    g.desc(t, 1, 0x40000, u32::MAX, NEXT | WRITE, 2);
    g.desc(t, 2, 0x60000, 0, WRITE, 0);
    g.frontend
        .set_features(BASE | LOG_ALL)
        .expect("logging goes on");
    control.release();
    assert_eq!(g.used(0), (0, 4097));
    take_exactly(&log, &[0x40, 0x60, used_page]);
    // The export serves on.
    g.good_read(0);
    drop(g);
    drop(export);
    drop(volume);
    reactors.shutdown().unwrap();
}

/// Stop ring 0, switch logging on with no log, enable the ring again and
/// offer a read: the ring waits for the log (the read is not served).
/// Returns the read's status byte's address.
fn waiting_for_the_log(g: &mut Guest) -> u64 {
    g.frontend.set_vring_enable(0, false).unwrap();
    g.frontend.set_features(BASE | LOG_ALL).unwrap();
    g.frontend.set_vring_enable(0, true).unwrap();
    let s = g.offer_read(0);
    assert_eq!(
        g.used_within(0, std::time::Duration::from_millis(300)),
        None,
        "served with no log"
    );
    s
}

/// From an audit: dirty logging switched on before any SET_LOG_BASE was
/// taken with the rings running, and they wrote guest memory with nothing
/// to log it in (QEMU gives the log first; another frontend need not).
/// Refused while rings run; a ring that starts meanwhile waits for the
/// log, and runs, logged, once it comes.
#[test]
fn dirty_logging_without_a_log_writes_nothing_unlogged() {
    let rig = migratable();
    let mut g = logging_guest(&rig.sock);
    assert!(
        g.frontend.set_features(BASE | LOG_ALL).is_err(),
        "taken with running rings and no log"
    );
    g.frontend.get_features().expect("the connection stays");
    let s = waiting_for_the_log(&mut g);
    let log = memfd(4096);
    g.frontend
        .set_log_base(0, region(&log, LOG_BYTES, 0))
        .unwrap();
    assert_eq!(g.used(0), (0, 4097));
    assert_eq!(g.read::<u8>(s), S_OK);
    // (offer_read's data buffer is at 0x40000.)
    let pages = marked(&log);
    assert!(pages.contains(&0x40), "{pages:x?}");
}

/// From review: a ring waiting for a dirty log that never came stayed
/// stopped when logging was switched off again (the guest's IO hung); it
/// starts then.
#[test]
fn a_ring_waiting_for_the_log_starts_when_logging_goes_off() {
    let rig = migratable();
    let mut g = logging_guest(&rig.sock);
    let s = waiting_for_the_log(&mut g);
    g.frontend.set_features(BASE).unwrap();
    assert_eq!(g.used(0), (0, 4097));
    assert_eq!(g.read::<u8>(s), S_OK);
}

/// From an audit: with logging on, a memory table reaching past the end of
/// the log was taken, and writes there were only counted, not logged (a
/// migration's destination missed them). Refused, as SET_LOG_BASE
/// refuses a log too small for the memory.
#[test]
fn memory_past_the_dirty_log_is_refused_while_logging() {
    let rig = migratable();
    let mut g = logging_guest(&rig.sock);
    let log = memfd(4096);
    g.frontend
        .set_log_base(0, region(&log, LOG_BYTES, 0))
        .unwrap();
    g.frontend.set_features(BASE | LOG_ALL).unwrap();
    let more = memfd(1 << 20);
    let far = vhost::VhostUserMemoryRegionInfo {
        guest_phys_addr: 1 << 30,
        memory_size: 1 << 20,
        userspace_addr: 0x7000_0000_0000,
        mmap_offset: 0,
        mmap_handle: more.as_raw_fd(),
    };
    assert!(g.frontend.set_mem_table(&[g.region(), far]).is_err());
    // What ran goes on, logged.
    assert_eq!(request(&mut g, IN, 0x40000), S_OK);
    assert!(marked(&log).contains(&0x40));
}

/// Offer a 4 KiB request of `kind` at `sector` as chain `head` (three
/// descriptors from `head`), its header, data and status at `gpa` plus
/// 0, 0x1000 and 0x2000; returns the status byte's address.
fn offer_at(g: &mut Guest, head: u16, kind: u32, sector: u64, gpa: u64) -> u64 {
    let (h, data, s) = (gpa, gpa + 0x1000, gpa + 0x2000);
    g.write(s, UNTOUCHED);
    g.header(h, kind, sector);
    let t = g.queues[0].desc;
    let flags = if kind == IN { NEXT | WRITE } else { NEXT };
    g.desc(t, head, h, 16, NEXT, head + 1);
    g.desc(t, head + 1, data, 4096, flags, head + 2);
    g.desc(t, head + 2, s, 1, WRITE, 0);
    g.offer(0, head);
    s
}

/// From an audit: a stop left to linger (its device held a read past the
/// drain time-out) ended, once the read came back, without the requests
/// it had taken from the ring and never sent: a write parked for a
/// suspended range, released as the range resumed and then held back by
/// the volume's limits. The index GET_VRING_BASE gave counted it, so a
/// migration's destination started past it and the guest waited for it
/// for good. It is answered (with an error) before the index is given.
#[test]
fn a_lingering_stop_answers_what_it_took_and_never_sent() {
    use std::time::Duration;
    // One byte a second (below what an operator may set): the first
    // write's 4 KiB hold every later one back for an hour.
    let FaultRig {
        control,
        volume,
        export,
        sock,
        reactors,
        _dir,
    } = fault_rig(QosLimits {
        write_bytes: 1,
        ..Default::default()
    });
    // With REPLY_ACK: the stop answers whether it stopped.
    let mut g = logging_guest(&sock);
    // A write takes the limit's allowance.
    let first = offer_at(&mut g, 6, OUT, 800, 0x27000);
    assert_eq!(g.used(0), (6, 1));
    assert_eq!(g.read::<u8>(first), S_OK);
    volume.suspend_range(0, 64, Duration::from_secs(5)).unwrap();
    let parked = offer_at(&mut g, 3, OUT, 8, 0x21000);
    let t0 = std::time::Instant::now();
    while export.parked_writes() != 1 {
        assert!(t0.elapsed() < Duration::from_secs(10), "not held");
        std::thread::yield_now();
    }
    control.hold(Some(IoOp::Read), 0, u64::MAX, 1);
    offer_at(&mut g, 0, IN, 0, 0x24000);
    assert!(control.wait_held(1, Duration::from_secs(10)));
    // The parked write goes again, and waits for the limit.
    volume.resume_range();
    assert!(
        g.frontend.set_vring_enable(0, false).is_err(),
        "the ring stopped with a read held"
    );
    assert_eq!(export.lingering_queues(), 1);
    control.release();
    // The read comes back, and the runner stops (a GET_VRING_BASE before
    // would be refused, and the connection with it).
    let t0 = std::time::Instant::now();
    while export.lingering_queues() > 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "never stopped");
        std::thread::yield_now();
    }
    let base = g.frontend.get_vring_base(0).unwrap();
    // SAFETY: the guest's used index, in memory the test keeps mapped.
    let used = unsafe {
        std::ptr::read_volatile((g.base as usize + g.queues[0].used as usize + 2) as *const u16)
    };
    assert_eq!(base, 3);
    assert_eq!(used, 3, "the index handed over counts an unanswered write");
    assert_eq!(g.read::<u8>(parked), S_IOERR);
    drop(g);
    drop(export);
    drop(volume);
    reactors.shutdown().unwrap();
}
