//! RAID1: conformance, md-compatible placement, a member failing under a
//! verified workload on every reactor (through the quiesce epoch), and a
//! clear failure beyond what the level tolerates.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use appliance::raid::members::{FailureSink, Member, MemberState};
use appliance::raid::monitor::Monitor;
use appliance::raid::raid1::Raid1Device;
use appliance::volume::Volume;
use appliance::workload::{Workload, WorkloadParams};
use bdev::conformance::{self, run_one, rw};
use bdev::{BlockDevice, FaultDevice, IoOp, RamDevice};
use poller::{ReactorConfig, Reactors};

fn ram(name: &str, blocks: u64) -> Arc<dyn BlockDevice> {
    Arc::new(RamDevice::new(name, 4096, blocks).unwrap())
}

fn member(dev: Arc<dyn BlockDevice>) -> Member {
    Member {
        dev,
        state: MemberState::InSync,
        write_mostly: false,
        gone: Default::default(),
        errors: Default::default(),
        readd: false,
    }
}

#[test]
fn raid1_conforms() {
    let r = Raid1Device::new(
        "r1",
        vec![member(ram("a", 2048)), member(ram("b", 2100))],
        8,
        FailureSink::none(),
    )
    .unwrap();
    assert_eq!(
        r.info().num_blocks,
        2040,
        "smallest member minus the data offset"
    );
    conformance::run_all(Arc::new(r), 2, 2000);
}

#[test]
fn every_member_holds_the_data_at_the_data_offset() {
    let (a, b, c) = (ram("a", 256), ram("b", 256), ram("c", 256));
    let r = Raid1Device::new(
        "r1",
        vec![member(a.clone()), member(b.clone()), member(c.clone())],
        16,
        FailureSink::none(),
    )
    .unwrap();
    let mut ch = r.open_channel().unwrap();
    let mut buf = vec![0x5au8; 8192];
    run_one(ch.as_mut(), rw(IoOp::Write, 10, 2, &mut buf, 1)).unwrap();
    for m in [a, b, c] {
        let mut ch = m.open_channel().unwrap();
        let mut got = vec![0u8; 8192];
        run_one(ch.as_mut(), rw(IoOp::Read, 26, 2, &mut got, 1)).unwrap();
        assert_eq!(got, buf);
    }
}

#[test]
fn bad_mirrors_are_refused() {
    assert!(Raid1Device::new("x", vec![member(ram("a", 64))], 0, FailureSink::none()).is_err());
    let small = Arc::new(RamDevice::new("s", 512, 64).unwrap()) as Arc<dyn BlockDevice>;
    let e = Raid1Device::new(
        "x",
        vec![member(ram("a", 64)), member(small)],
        0,
        FailureSink::none(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("block size"), "{e}");
    assert!(Raid1Device::new(
        "x",
        vec![member(ram("a", 64)), member(ram("b", 64))],
        64,
        FailureSink::none()
    )
    .is_err());
}

#[test]
fn a_member_failing_under_load_is_marked_failed_and_no_io_fails() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let (fa, fb) = (
        Arc::new(FaultDevice::new(ram("a", 8192))),
        Arc::new(FaultDevice::new(ram("b", 8192))),
    );
    let (ca, cb) = (fa.control(), fb.control());
    let (tx, rx) = mpsc::channel();
    let dev = Arc::new(
        Raid1Device::new("r1", vec![member(fa), member(fb)], 0, FailureSink::new(tx)).unwrap(),
    );
    let volume = Volume::new(reactors.set(), "r1", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    let w = Workload::start_on_volume(reactors.set(), &volume, WorkloadParams::default()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    cb.pull();
    std::thread::sleep(Duration::from_millis(700));
    let totals = w.stop(Duration::from_secs(10)).unwrap();
    assert!(totals.clean(), "{totals:?}");
    assert!(totals.reads_verified > 0);
    assert_eq!(
        monitor.member_states(),
        vec![MemberState::InSync, MemberState::Failed]
    );
    assert!(
        volume.quiesce().config().0 >= 2,
        "the failure went through a new generation"
    );
    // Beyond what RAID1 tolerates: a clear error, no hang.
    ca.pull();
    let w = Workload::start_on_volume(reactors.set(), &volume, WorkloadParams::default()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let totals = w.stop(Duration::from_secs(10)).unwrap();
    assert!(
        totals.errors > 0,
        "IO on a mirror with no members left must fail"
    );
    reactors.shutdown().unwrap();
}

#[test]
fn a_spare_is_rebuilt_into_a_mirror_while_io_goes_on() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let (a, b) = (ram("a", 4096), ram("b", 4096));
    let fb = Arc::new(FaultDevice::new(b));
    let spare = ram("spare", 4096);
    let (tx, rx) = mpsc::channel();
    let dev = Arc::new(
        Raid1Device::new(
            "r1",
            vec![member(a.clone()), member(fb.clone())],
            8,
            FailureSink::new(tx),
        )
        .unwrap(),
    );
    let volume = Volume::new(reactors.set(), "r1", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![spare.clone()]);
    let w = Workload::start_on_volume(reactors.set(), &volume, WorkloadParams::default()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    fb.control().pull();
    let t = std::time::Instant::now();
    loop {
        let states = monitor.member_states();
        if states.iter().all(|s| *s == MemberState::InSync) && monitor.rebuild().is_some() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "rebuild did not finish: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let totals = w.stop(Duration::from_secs(10)).unwrap();
    assert!(totals.clean(), "{totals:?}");
    assert!(totals.reads_verified > 0);
    // The spare now mirrors member a exactly over the data area.
    let read_all = |d: &Arc<dyn BlockDevice>| {
        let mut ch = d.open_channel().unwrap();
        let mut buf = vec![0u8; (4096 - 8) * 4096];
        run_one(ch.as_mut(), rw(IoOp::Read, 8, 4096 - 8, &mut buf, 1)).unwrap();
        buf
    };
    assert!(
        read_all(&a) == read_all(&spare),
        "the rebuilt mirror differs"
    );
    reactors.shutdown().unwrap();
}

#[test]
fn scrub_repairs_a_diverged_mirror_while_io_goes_on() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let (a, b) = (ram("a", 2048), ram("b", 2048));
    let (_tx, rx) = mpsc::channel();
    let dev = Arc::new(
        Raid1Device::new(
            "r1",
            vec![member(a.clone()), member(b.clone())],
            0,
            FailureSink::none(),
        )
        .unwrap(),
    );
    let volume = Volume::new(reactors.set(), "r1", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    let wait = |p: &Arc<appliance::raid::rebuild::RebuildProgress>| {
        let t = std::time::Instant::now();
        while !p.is_finished() {
            assert!(t.elapsed() < Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(p.error().is_none(), "{:?}", p.error());
        p.mismatches.load(std::sync::atomic::Ordering::SeqCst)
    };
    // Mirror b silently differs in 5 blocks.
    let mut junk = vec![0xa5u8; 5 * 4096];
    run_one(
        b.open_channel().unwrap().as_mut(),
        rw(IoOp::Write, 700, 5, &mut junk, 1),
    )
    .unwrap();
    assert_eq!(
        wait(&monitor.scrub(false).unwrap()),
        5,
        "check counts the diverged blocks"
    );
    assert_eq!(wait(&monitor.scrub(true).unwrap()), 5, "repair fixes them");
    assert_eq!(wait(&monitor.scrub(false).unwrap()), 0);
    // Diverge again and repair while a verified workload writes everywhere:
    // writes lock their regions during the scrub, so the repair never
    // undoes one (how many junk blocks the workload overwrites first is
    // up to the race, so only the end state is asserted).
    run_one(
        b.open_channel().unwrap().as_mut(),
        rw(IoOp::Write, 1200, 5, &mut junk, 2),
    )
    .unwrap();
    let w = Workload::start_on_volume(reactors.set(), &volume, WorkloadParams::default()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    wait(&monitor.scrub(true).unwrap());
    let totals = w.stop(Duration::from_secs(10)).unwrap();
    assert!(totals.clean(), "{totals:?}");
    assert_eq!(
        wait(&monitor.scrub(false).unwrap()),
        0,
        "mirrors agree after the repair"
    );
    reactors.shutdown().unwrap();
}

#[test]
fn a_write_mostly_member_gets_every_write_and_is_read_only_when_nothing_else_can() {
    let (a, b) = (ram("a", 512), ram("b", 512));
    let fb = Arc::new(FaultDevice::new(b.clone()));
    let (tx, rx) = mpsc::channel();
    let mut slow = member(fb.clone());
    slow.write_mostly = true;
    let r = Raid1Device::new("r1", vec![member(a.clone()), slow], 8, FailureSink::new(tx)).unwrap();
    let mut ch = r.open_channel().unwrap();
    let mut data: Vec<u8> = (0..64 * 4096).map(|i| (i % 251) as u8).collect();
    run_one(ch.as_mut(), rw(IoOp::Write, 0, 64, &mut data, 1)).unwrap();
    // Any read sent to the write-mostly member now fails and is reported.
    fb.control().fail_reads(0, u64::MAX);
    for round in 0..4u64 {
        for lba in 0..64u64 {
            let mut got = vec![0u8; 4096];
            run_one(ch.as_mut(), rw(IoOp::Read, lba, 1, &mut got, 2 + round)).unwrap();
            assert_eq!(got[..], data[lba as usize * 4096..][..4096]);
        }
    }
    assert!(
        rx.try_recv().is_err(),
        "no read went to the write-mostly member"
    );
    fb.control().heal();
    // It has every write, at the data offset.
    let mut on_b = vec![0u8; 64 * 4096];
    run_one(
        b.open_channel().unwrap().as_mut(),
        rw(IoOp::Read, 8, 64, &mut on_b, 9),
    )
    .unwrap();
    assert!(on_b == data, "the write-mostly member got the writes");
    // With the other member failed it serves the reads.
    let mut slow = member(fb.clone());
    slow.write_mostly = true;
    let degraded = Raid1Device::new(
        "r1",
        vec![Member::new(a, MemberState::Failed), slow],
        8,
        FailureSink::none(),
    )
    .unwrap();
    let mut ch = degraded.open_channel().unwrap();
    let mut got = vec![0u8; 64 * 4096];
    run_one(ch.as_mut(), rw(IoOp::Read, 0, 64, &mut got, 10)).unwrap();
    assert!(got == data);
}

/// From review: while a resync after a crash ran, reads went to whichever
/// mirror had the fewest requests outstanding, so a guest could read one
/// mirror's copy of a block the resync then replaced with the other's:
/// data that changed with no write. Reads of what may differ go to the
/// mirror the repair copies from while a scrub runs.
#[test]
fn while_a_scrub_runs_a_read_of_what_may_differ_goes_to_the_reference_mirror() {
    use appliance::raid::level::RaidDevice;
    let (a, b) = (ram("a", 2048), ram("b", 2048));
    let r = Raid1Device::new(
        "r1",
        vec![member(a.clone()), member(b.clone())],
        0,
        FailureSink::none(),
    )
    .unwrap();
    let mut ch = r.open_channel().unwrap();
    // Block 100 differs: the crash tore a write, b did not get it.
    let mut new = vec![0x11u8; 4096];
    run_one(ch.as_mut(), rw(IoOp::Write, 100, 1, &mut new, 1)).unwrap();
    let mut old = vec![0x22u8; 4096];
    run_one(
        b.open_channel().unwrap().as_mut(),
        rw(IoOp::Write, 100, 1, &mut old, 2),
    )
    .unwrap();
    // A read of block 0 goes first (to a, the idle mirror with the lowest
    // slot), then one of block 100 while it is outstanding: balancing
    // sends that one to b.
    let pair = |ch: &mut dyn bdev::IoChannel, tag: u64| {
        let (mut first, mut got) = (vec![0u8; 4096], vec![0u8; 4096]);
        ch.submit(rw(IoOp::Read, 0, 1, &mut first, tag)).unwrap();
        ch.submit(rw(IoOp::Read, 100, 1, &mut got, tag + 1))
            .unwrap();
        let (mut out, mut done) = (Vec::new(), 0);
        let t = std::time::Instant::now();
        while done < 2 {
            out.clear();
            done += ch.poll(&mut out);
            assert!(out.iter().all(|c| c.result.is_ok()));
            assert!(t.elapsed() < Duration::from_secs(10));
        }
        got[0]
    };
    assert_eq!(pair(ch.as_mut(), 10), 0x22, "balanced to b (no scrub)");
    r.member_set()
        .scrubbing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(pair(ch.as_mut(), 20), 0x11, "the reference mirror, a");
}

/// From an audit: a repair cut short (cancelled here; a member failing or
/// a rebuild taking a spare first do the same) cleared the flag that
/// sends reads of what may differ to the reference mirror, so reads went
/// to whichever mirror was least busy while they still differed: what a
/// guest read changed with no write. The flag stays until a repair
/// finishes; a check that is stopped owes nothing and clears it, unless a
/// repair still owes.
#[test]
fn a_repair_cut_short_keeps_reads_on_the_reference_mirror() {
    use appliance::raid::level::RaidDevice;
    use std::sync::atomic::Ordering;
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let dev = Arc::new(
        Raid1Device::new(
            "r1",
            vec![member(ram("a", 4096)), member(ram("b", 4096))],
            0,
            FailureSink::none(),
        )
        .unwrap(),
    );
    let flag = dev.member_set().scrubbing.clone();
    let (_tx, rx) = mpsc::channel();
    let volume = Volume::new(reactors.set(), "r1", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume, dev, rx, vec![]);
    // Slow enough to be stopped half-way.
    monitor.set_rate(0, 64 << 10).unwrap();
    // A check stopped owes nothing; a repair stopped does, and a check
    // after it (stopped or not: it repairs nothing) does not pay it (from
    // a later audit: it cleared the flag); a repair that finishes does.
    for (repair, stop, kept) in [
        (false, true, false),
        (true, true, true),
        (false, true, true),
        (true, false, false),
    ] {
        if !stop {
            monitor.set_rate(0, 0).unwrap();
        }
        let p = monitor.scrub(repair).unwrap();
        assert!(flag.load(Ordering::SeqCst));
        if stop {
            p.cancel.store(true, Ordering::SeqCst);
            appliance::raid::worker::wake(reactors.set());
        }
        let t = std::time::Instant::now();
        while !p.is_finished() {
            assert!(t.elapsed() < Duration::from_secs(60), "never stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(p.error().is_some(), stop);
        assert_eq!(flag.load(Ordering::SeqCst), kept, "repair {repair}");
    }
    reactors.shutdown().unwrap();
}

/// A device whose channels refuse one write (Busy, a full queue) once
/// `once` is set.
struct BusyOnce {
    inner: Arc<dyn BlockDevice>,
    once: Arc<std::sync::atomic::AtomicBool>,
}

struct BusyOnceChannel {
    inner: Box<dyn bdev::IoChannel>,
    once: Arc<std::sync::atomic::AtomicBool>,
}

impl BlockDevice for BusyOnce {
    fn info(&self) -> &bdev::DeviceInfo {
        self.inner.info()
    }
    fn open_channel(&self) -> Result<Box<dyn bdev::IoChannel>, bdev::BdevError> {
        Ok(Box::new(BusyOnceChannel {
            inner: self.inner.open_channel()?,
            once: self.once.clone(),
        }))
    }
}

impl bdev::IoChannel for BusyOnceChannel {
    fn submit(&mut self, req: bdev::IoRequest) -> Result<(), bdev::SubmitError> {
        if req.op == IoOp::Write && self.once.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(bdev::SubmitError::Busy(req));
        }
        self.inner.submit(req)
    }
    fn poll(&mut self, out: &mut Vec<bdev::Completion>) -> usize {
        self.inner.poll(out)
    }
    fn inflight(&self) -> usize {
        self.inner.inflight()
    }
}

/// From an audit: a repair counted a row's mismatches before its repair
/// write, and a row read again after that write was refused (a full
/// queue) counted them again.
#[test]
fn a_repair_counts_each_mismatch_once_when_its_write_is_retried() {
    use std::sync::atomic::Ordering;
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let b: Arc<dyn BlockDevice> = Arc::new(BusyOnce {
        inner: ram("b", 4096),
        once: once.clone(),
    });
    let dev = Arc::new(
        Raid1Device::new(
            "r1",
            vec![member(ram("a", 4096)), member(b.clone())],
            0,
            FailureSink::none(),
        )
        .unwrap(),
    );
    // Block 100 differs on b.
    let mut old = vec![0x22u8; 4096];
    run_one(
        b.open_channel().unwrap().as_mut(),
        rw(IoOp::Write, 100, 1, &mut old, 1),
    )
    .unwrap();
    let (_tx, rx) = mpsc::channel();
    let volume = Volume::new(reactors.set(), "r1", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume, dev, rx, vec![]);
    once.store(true, Ordering::SeqCst);
    let p = monitor.scrub(true).unwrap();
    let t = std::time::Instant::now();
    while !p.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(60), "never ended");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(p.error(), None);
    assert!(!once.load(Ordering::SeqCst), "no write was refused");
    assert_eq!(p.mismatches.load(Ordering::SeqCst), 1);
    reactors.shutdown().unwrap();
}

/// A mirror of two RAM devices behind fault injectors, with no monitor.
fn fault_mirrors() -> (Arc<FaultDevice>, Arc<FaultDevice>, Raid1Device) {
    let fa = Arc::new(FaultDevice::new(ram("a", 512)));
    let fb = Arc::new(FaultDevice::new(ram("b", 512)));
    let r = Raid1Device::new(
        "r1",
        vec![member(fa.clone()), member(fb.clone())],
        8,
        FailureSink::none(),
    )
    .unwrap();
    (fa, fb, r)
}

/// From an audit: a read that failed on one mirror went to the other once,
/// and if that member's queue was full it was answered with the first
/// error: a guest IO error on a mirror that survived, at the very moment
/// every read in flight on the failed one moves over. A full queue is
/// back-pressure: the read goes again at a later poll.
#[test]
fn a_read_moved_to_a_busy_mirror_waits_for_it_instead_of_failing() {
    let (fa, fb, r) = fault_mirrors();
    let mut ch = r.open_channel().unwrap();
    let mut data: Vec<u8> = (0..4 * 4096).map(|i| (i % 249) as u8).collect();
    run_one(ch.as_mut(), rw(IoOp::Write, 0, 4, &mut data, 1)).unwrap();
    fa.control().fail_reads(0, u64::MAX);
    fb.control().busy(true);
    let mut got = vec![0u8; 4 * 4096];
    // The first choice is the first member (nothing outstanding on either).
    ch.submit(rw(IoOp::Read, 0, 4, &mut got, 2)).unwrap();
    let mut out = Vec::new();
    let mut polls = 0u64;
    while fb.control().busy_refusals() == 0 {
        ch.poll(&mut out);
        polls += 1;
        assert!(
            polls < 1_000_000,
            "the read never moved to the other mirror"
        );
    }
    // A few more rounds while the queue stays full: nothing is answered.
    for _ in 0..100 {
        ch.poll(&mut out);
    }
    assert!(
        out.is_empty(),
        "answered while the mirror was busy: {:?}",
        out[0].result
    );
    fb.control().busy(false);
    let t = std::time::Instant::now();
    while out.is_empty() {
        ch.poll(&mut out);
        assert!(t.elapsed() < Duration::from_secs(30), "never answered");
    }
    assert_eq!(out[0].tag, 2);
    assert_eq!(out[0].result, Ok(()));
    assert!(got == data, "the other mirror's copy");
}

/// From an audit: a write that only a rebuild's target took (the member in
/// sync failed it) was acknowledged, though that device holds garbage
/// above its cursor and is failed with the rebuild; and a read then found
/// no member to go to but was answered busy, again and again. md counts a
/// write done on members in sync only.
#[test]
fn a_write_only_a_rebuilding_member_took_is_not_acknowledged() {
    use appliance::raid::monitor::RaidDevice;
    let fa = Arc::new(FaultDevice::new(ram("a", 512)));
    let r = Raid1Device::new(
        "r1",
        vec![
            member(fa.clone()),
            Member::new(ram("b", 512), MemberState::Failed),
        ],
        8,
        FailureSink::none(),
    )
    .unwrap();
    // A new device in the failed slot, its rebuild not begun.
    let r = r.with_member_replaced(1, ram("c", 512), 0).unwrap();
    let mut ch = r.open_channel().unwrap();
    let mut data = vec![0x5au8; 4096];
    run_one(ch.as_mut(), rw(IoOp::Write, 0, 1, &mut data, 1)).unwrap();
    fa.control().pull();
    assert!(
        run_one(ch.as_mut(), rw(IoOp::Write, 8, 1, &mut data, 2)).is_err(),
        "acknowledged on the rebuild's target alone"
    );
    let mut got = vec![0u8; 4096];
    assert_eq!(
        run_one(ch.as_mut(), rw(IoOp::Read, 0, 1, &mut got, 3)),
        Err(bdev::IoError::DeviceFailed),
        "no member in sync is left to read"
    );
}

/// From an audit: a bad block on the last mirror in sync failed that
/// member, and with it the whole volume, though every other block was
/// readable. md's RAID1 never fails its last member in sync: the request
/// fails alone. With a second mirror in sync the member is failed as
/// before (its copy is elsewhere).
#[test]
fn a_bad_block_on_the_last_mirror_in_sync_fails_only_its_request() {
    let fa = Arc::new(FaultDevice::new(ram("a", 512)));
    let (tx, rx) = mpsc::channel();
    let r = Raid1Device::new(
        "r1",
        vec![
            member(fa.clone()),
            Member::new(ram("b", 512), MemberState::Failed),
        ],
        8,
        FailureSink::new(tx),
    )
    .unwrap();
    let mut ch = r.open_channel().unwrap();
    let mut data: Vec<u8> = (0..8 * 4096).map(|i| (i % 241) as u8).collect();
    run_one(ch.as_mut(), rw(IoOp::Write, 0, 8, &mut data, 1)).unwrap();
    // Block 3 of the volume (the data area starts at block 8).
    fa.control().fail_reads(11, 12);
    let mut got = vec![0u8; 4096];
    assert!(matches!(
        run_one(ch.as_mut(), rw(IoOp::Read, 3, 1, &mut got, 2)),
        Err(bdev::IoError::Media(_))
    ));
    assert!(rx.try_recv().is_err(), "the last mirror in sync was failed");
    for lba in [0u64, 4, 7] {
        run_one(ch.as_mut(), rw(IoOp::Read, lba, 1, &mut got, 3 + lba)).unwrap();
        assert!(
            got[..] == data[lba as usize * 4096..][..4096],
            "block {lba}"
        );
    }

    // Two mirrors in sync: the read is served by the other, the bad one
    // is failed.
    use appliance::raid::monitor::RaidDevice;
    let fa = Arc::new(FaultDevice::new(ram("a", 512)));
    let r = Raid1Device::new(
        "r1",
        vec![member(fa.clone()), member(ram("b", 512))],
        8,
        FailureSink::none(),
    )
    .unwrap();
    let mut ch = r.open_channel().unwrap();
    run_one(ch.as_mut(), rw(IoOp::Write, 0, 8, &mut data, 1)).unwrap();
    fa.control().fail_reads(0, u64::MAX);
    run_one(ch.as_mut(), rw(IoOp::Read, 3, 1, &mut got, 2)).unwrap();
    assert!(got[..] == data[3 * 4096..][..4096]);
    assert!(
        r.member_set().members[0].is_gone(),
        "the mirror with the bad block is failed"
    );
}

/// From an audit: a rebuild that met a bad block on its only source
/// failed the source, and the volume with it. The rebuild stops there
/// (md stops its recovery), naming the row; the source stays in sync and
/// the volume serves what it can read.
#[test]
fn a_rebuild_stops_at_a_bad_block_of_its_only_source_and_keeps_it() {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let fa = Arc::new(FaultDevice::new(ram("a", 4096)));
    let b = ram("b", 4096);
    let (tx, rx) = mpsc::channel();
    let dev = Arc::new(
        Raid1Device::new(
            "r1",
            vec![member(fa.clone()), Member::new(b, MemberState::Failed)],
            8,
            FailureSink::new(tx),
        )
        .unwrap(),
    );
    let volume = Volume::new(reactors.set(), "r1", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    fa.control().fail_reads(2048, 2049);
    monitor.add_spare(ram("spare", 4096)).unwrap();
    let t = std::time::Instant::now();
    let progress = loop {
        if let Some(p) = monitor.rebuild().filter(|p| p.is_finished()) {
            if monitor.idle() {
                break p;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the rebuild never ended: {:?}",
            monitor.member_states()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let why = progress.error().expect("the rebuild stopped with an error");
    assert!(why.contains("last in sync"), "{why}");
    assert_eq!(
        monitor.member_states(),
        vec![MemberState::InSync, MemberState::Failed],
        "the source stays, the slot is failed again"
    );
    // The volume still reads what its member can.
    let w = Workload::start_on_volume(
        reactors.set(),
        &volume,
        WorkloadParams {
            span_bytes: 4 << 20,
            ..WorkloadParams::default()
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let totals = w.stop(Duration::from_secs(10)).unwrap();
    assert!(totals.clean(), "{totals:?}");
    reactors.shutdown().unwrap();
}

/// From review: a write the first mirror took, whose copy on the second
/// came back with a bad block after the first had failed (another
/// request's error), was acknowledged: the second was kept as the last
/// member in sync, and no member left held the write. A write is done
/// only while a member that took it is still there.
#[test]
fn a_write_whose_only_holder_failed_meanwhile_is_not_acknowledged() {
    use appliance::raid::monitor::RaidDevice;
    let (fa, fb, r) = fault_mirrors();
    let mut ch = r.open_channel().unwrap();
    let mut out = Vec::new();
    let poll_until = |ch: &mut Box<dyn bdev::IoChannel>,
                      out: &mut Vec<_>,
                      what: &str,
                      done: &dyn Fn(&Vec<bdev::Completion>) -> bool| {
        let t = std::time::Instant::now();
        while !done(out) {
            ch.poll(out);
            assert!(t.elapsed() < Duration::from_secs(30), "never: {what}");
        }
    };
    // The write's copy on b is held; a takes it.
    fb.control().hold(Some(IoOp::Write), 0, u64::MAX, 1);
    let mut data = vec![0x77u8; 4096];
    ch.submit(rw(IoOp::Write, 0, 1, &mut data, 1)).unwrap();
    assert!(fb.control().wait_held(1, Duration::from_secs(30)));
    // a goes: a read it cannot serve fails it (b is in sync then).
    fa.control().fail_reads(0, u64::MAX);
    let mut got = vec![0u8; 4096];
    ch.submit(rw(IoOp::Read, 4, 1, &mut got, 2)).unwrap();
    let set = r.member_set();
    poll_until(&mut ch, &mut out, "a failed", &|_| set.members[0].is_gone());
    // b cannot take the write after all: a bad block, b kept (the last).
    fb.control().fail_writes(0, u64::MAX);
    fb.control().release();
    poll_until(&mut ch, &mut out, "the write answered", &|o| {
        o.iter().any(|c| c.tag == 1)
    });
    let w = out.iter().find(|c| c.tag == 1).unwrap();
    assert!(w.result.is_err(), "acknowledged with no member holding it");
    assert!(!set.members[1].is_gone(), "b stays, the last in sync");
}

/// From an audit: with its regions locked (serialize_policy here; a
/// rebuild or scrub does the same), a discard over more than 46,368
/// regions touched two regions of one lock bucket and took it twice: it
/// failed every time, so it never went through, and the writes behind it
/// waited for ever. A host's discard of a whole large volume does that.
#[test]
fn a_discard_across_regions_sharing_a_lock_goes_through() {
    use appliance::raid::level::RaidDevice;
    let blocks = 47_000 * 256 + 512;
    let null = |n: &str| -> Arc<dyn BlockDevice> {
        Arc::new(bdev::NullDevice::new(n, 4096, blocks).unwrap())
    };
    let r = Raid1Device::new(
        "r1",
        vec![member(null("a")), member(null("b"))],
        256,
        FailureSink::none(),
    )
    .unwrap();
    r.member_set()
        .serialize
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut ch = r.open_channel().unwrap();
    let discard = bdev::IoRequest::range(IoOp::Discard, 0, 47_000 * 256, 1);
    run_one(ch.as_mut(), discard).unwrap();
    let mut buf = vec![0x5au8; 4096];
    run_one(ch.as_mut(), rw(IoOp::Write, 0, 1, &mut buf, 2)).unwrap();
}

/// From an audit: a disk whose driver cannot zero a range answers a
/// discard "not supported", and that failed the member; fstrim or mkfs
/// failed both mirrors, and the volume with them. As md does, a discard's
/// error fails no member.
#[test]
fn a_discard_the_members_refuse_fails_no_member() {
    let (fa, fb) = (
        Arc::new(FaultDevice::new(ram("a", 4096))),
        Arc::new(FaultDevice::new(ram("b", 4096))),
    );
    let (tx, rx) = mpsc::channel();
    let r = Raid1Device::new(
        "r1",
        vec![member(fa.clone()), member(fb.clone())],
        8,
        FailureSink::new(tx),
    )
    .unwrap();
    for f in [&fa, &fb] {
        f.control().refuse_discards(true);
    }
    let mut ch = r.open_channel().unwrap();
    run_one(ch.as_mut(), bdev::IoRequest::range(IoOp::Discard, 0, 32, 1)).unwrap();
    assert!(rx.try_recv().is_err(), "a member was failed");
    for f in [&fa, &fb] {
        f.control().heal();
    }
    let mut buf = vec![0x5au8; 4096];
    run_one(ch.as_mut(), rw(IoOp::Write, 0, 1, &mut buf, 2)).unwrap();
    let mut got = vec![0u8; 4096];
    run_one(ch.as_mut(), rw(IoOp::Read, 0, 1, &mut got, 3)).unwrap();
    assert_eq!(got, buf);
    // A member that fails a discard otherwise (a medium error) is failed,
    // as for any write.
    fb.control().fail_writes(0, 64);
    ch.submit(bdev::IoRequest::range(IoOp::Discard, 0, 32, 4))
        .unwrap();
    let t = std::time::Instant::now();
    let mut out = Vec::new();
    while rx.try_recv().is_err() {
        ch.poll(&mut out);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the failing member is kept"
        );
    }
}
