//! Changes of a volume racing its IO and its background work, each race
//! made exact by a member that holds a chosen request until the test lets
//! it go (`FaultControl::hold`): no sleep decides an interleaving. Each
//! test is one of the findings of the transaction issue (the number in its
//! comment), and failed before the one change path.

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::raid::assembly::{self, VolumeSpec};
use appliance::raid::journal::{Journal, JournalMode};
use appliance::raid::members::{Event, FailureSink, MemberState, Run};
use appliance::raid::monitor::{Monitor, OpError};
use appliance::raid::superblock::{Level, Superblock};
use appliance::volume::{Volume, VolumeError};
use bdev::{BlockDevice, FaultDevice, IoOp, RamDevice};
use poller::{ReactorConfig, Reactors};

const BS: usize = 4096;
/// Member blocks before the data (md's 1 MiB at 4 KiB blocks).
const DATA: u64 = 256;
const LONG: Duration = Duration::from_secs(30);

fn ram(name: &str) -> Arc<dyn BlockDevice> {
    Arc::new(RamDevice::new(name, BS as u32, DATA + 4096).unwrap())
}

struct Rig {
    reactors: Reactors,
    raw: Vec<Arc<dyn BlockDevice>>,
    faults: Vec<Arc<FaultDevice>>,
    volume: Volume,
    monitor: Monitor,
}

impl Rig {
    /// A volume of `level` over `n` members (fault-wrapped RAM, named m0..)
    /// with `spares` spares (s0..), its monitor started and opened.
    fn new(level: Level, n: usize, spares: usize, bitmap: bool) -> Rig {
        let reactors = Reactors::start(ReactorConfig {
            count: 2,
            ..Default::default()
        })
        .unwrap();
        let names: Vec<String> = (0..n)
            .map(|i| format!("m{i}"))
            .chain((0..spares).map(|i| format!("s{i}")))
            .collect();
        let raw: Vec<Arc<dyn BlockDevice>> = names.iter().map(|n| ram(n)).collect();
        let faults: Vec<Arc<FaultDevice>> = raw
            .iter()
            .map(|d| Arc::new(FaultDevice::new(d.clone())))
            .collect();
        let devs: Vec<Arc<dyn BlockDevice>> = faults
            .iter()
            .map(|f| f.clone() as Arc<dyn BlockDevice>)
            .collect();
        let mut spec = VolumeSpec::new("v", level, devs[..n].to_vec());
        if level == Level::Raid5 {
            spec.chunk_bytes = 16 << 10;
        }
        if bitmap {
            spec.bitmap_chunk_bytes = 1 << 20;
        }
        let (tx, rx) = mpsc::channel();
        let (dev, meta) = assembly::create(&spec, FailureSink::new(tx), false).unwrap();
        let volume = Volume::new_raid(reactors.set(), "v", dev.clone());
        let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, devs[n..].to_vec());
        monitor.set_meta(meta);
        monitor.open(true).unwrap();
        Rig {
            reactors,
            raw,
            faults,
            volume,
            monitor,
        }
    }

    fn write(&self, lba: u64, blocks: usize, byte: u8) -> Result<(), VolumeError> {
        self.volume
            .io(IoOp::Write, lba, vec![byte; blocks * BS], LONG)
            .map(|_| ())
    }

    fn read(&self, lba: u64, blocks: usize) -> Vec<u8> {
        self.volume
            .io(IoOp::Read, lba, vec![0; blocks * BS], LONG)
            .unwrap()
    }

    /// A flush through the volume held by member `m` until released: IO in
    /// flight that no suspend can drain meanwhile.
    fn stuck_flush(&self, m: usize) -> std::thread::JoinHandle<Result<(), VolumeError>> {
        self.faults[m].control().hold(Some(IoOp::Flush), 0, 1, 1);
        let v = self.volume.clone();
        let t = std::thread::spawn(move || v.flush_on_reactor(LONG));
        assert!(self.faults[m].control().wait_held(1, LONG));
        t
    }

    fn states(&self) -> Vec<MemberState> {
        self.monitor.member_states()
    }

    /// The names of the devices in the slots.
    fn member_names(&self) -> Vec<String> {
        self.monitor
            .member_devices()
            .iter()
            .map(|d| d.info().name.clone())
            .collect()
    }

    fn stop(self) {
        drop(self.monitor);
        drop(self.volume);
        self.reactors.shutdown().unwrap();
    }
}

/// Wait for `what` (the code under test makes it happen; the limit is only
/// there so a failure ends).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < LONG, "never: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn superblock(dev: &dyn BlockDevice) -> Superblock {
    assembly::read_superblock(dev).unwrap().unwrap()
}

/// Finding 1: a repairing scrub of a mirror must never copy a failed
/// member's stale data over a write that reached only the survivor.
#[test]
fn a_scrub_never_copies_a_failed_mirror_over_a_write_that_skipped_it() {
    let rig = Rig::new(Level::Raid1, 2, 0, false);
    // Row 5 (blocks 1280..1536) holds A on both mirrors.
    rig.write(5 * 256, 4, 0xaa).unwrap();
    // The scrub's first read of row 0 on m1 is held: the scrub is running.
    rig.faults[1]
        .control()
        .hold(Some(IoOp::Read), DATA, DATA + 256, 1);
    let p = rig.monitor.scrub(true).unwrap();
    assert!(rig.faults[1].control().wait_held(1, LONG));
    // m0 now takes no writes (its reads still answer, with old data), and
    // a write to row 5 reaches m1 only.
    rig.faults[0].control().fail_writes(0, u64::MAX);
    rig.write(5 * 256, 4, 0xbb).unwrap();
    rig.faults[1].control().release();
    eventually("the scrub ends", || p.is_finished());
    eventually("m0 is failed", || rig.states()[0] == MemberState::Failed);
    assert_eq!(
        rig.read(5 * 256, 4),
        vec![0xbb; 4 * BS],
        "the write survived"
    );
    let why = p.error().unwrap_or_default();
    assert!(why.contains("interrupted"), "{why}");
    rig.stop();
}

/// Finding 2: a member failure that cannot be published in time is kept
/// and applied later, and is on disk before any write relies on it.
#[test]
fn a_failure_that_hits_the_deadline_is_recorded_kept_and_applied_later() {
    let rig = Rig::new(Level::Raid5, 3, 0, false);
    rig.monitor.set_timeout(Duration::from_millis(200));
    rig.write(0, 64, 0x11).unwrap();
    let stuck = rig.stuck_flush(2);
    // m0 goes; a write finds out (and is acknowledged, degraded).
    rig.faults[0].control().pull();
    rig.write(0, 64, 0x22).unwrap();
    // The write waited for the failure to be recorded on the others.
    let sb = superblock(rig.raw[1].as_ref());
    assert_eq!(sb.slot_states[0] & 0x7f, MemberState::Failed.code());
    // Its publish cannot drain the stuck flush: put off, not dropped.
    eventually("the change was deferred", || {
        rig.monitor.snapshot().deferred >= 1
    });
    assert_eq!(rig.states()[0], MemberState::InSync, "not published yet");
    rig.faults[2].control().release();
    // (The flush only had to be in flight: whether it met m0 before or
    // after the pull decides its result.)
    let _ = stuck.join().unwrap();
    eventually("m0 is failed", || rig.states()[0] == MemberState::Failed);
    // (Published inside the change, taken off the queue after it.)
    eventually("the change is off the queue", || rig.monitor.idle());
    let raw = rig.raw.clone();
    rig.stop();
    // A restart reads nothing stale from m0.
    let mut report = assembly::assemble(&raw, |_| FailureSink::none());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let v = report.volumes.remove(0);
    assert_eq!(v.device.member_states()[0], MemberState::Failed);
    let mut ch = v.device.open_channel().unwrap();
    let mut buf = vec![0u8; 64 * BS];
    bdev::conformance::run_one(
        ch.as_mut(),
        bdev::conformance::rw(IoOp::Read, 0, 64, &mut buf, 1),
    )
    .unwrap();
    assert_eq!(buf, vec![0x22; 64 * BS]);
}

/// Finding 2: a rebuild that finishes while the volume cannot quiesce
/// is not left "rebuilding" for good.
#[test]
fn a_finished_rebuild_that_hits_the_deadline_is_applied_later() {
    let rig = Rig::new(Level::Raid1, 2, 1, false);
    rig.write(0, 64, 0x33).unwrap();
    rig.monitor.set_timeout(Duration::from_millis(200));
    // The rebuild onto the spare waits at its first write ...
    rig.faults[2]
        .control()
        .hold(Some(IoOp::Write), DATA, u64::MAX, 1);
    rig.monitor.fail_member("m1").unwrap();
    assert!(rig.faults[2].control().wait_held(1, LONG));
    // ... until a flush is stuck, then runs to its end: its last step
    // cannot quiesce.
    let stuck = rig.stuck_flush(0);
    let p = rig.monitor.rebuild().unwrap();
    rig.faults[2].control().release();
    eventually("the rebuild finished", || p.is_finished());
    eventually("the change was deferred", || {
        rig.monitor.snapshot().deferred >= 1
    });
    assert_eq!(rig.states()[1], MemberState::Rebuilding);
    rig.faults[0].control().release();
    stuck.join().unwrap().unwrap();
    eventually("the spare is in sync", || {
        rig.states()[1] == MemberState::InSync
    });
    assert_eq!(rig.read(0, 64), vec![0x33; 64 * BS]);
    rig.stop();
}

/// Finding 3: taking a write-back journal away never drops a write that
/// was admitted to the cache but not yet in it.
#[test]
fn removing_a_write_back_journal_keeps_a_write_admitted_but_not_yet_cached() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let members: Vec<Arc<dyn BlockDevice>> = (0..3).map(|i| ram(&format!("m{i}"))).collect();
    let jfault = Arc::new(FaultDevice::new(Arc::new(
        RamDevice::new("j", BS as u32, 4096).unwrap(),
    )));
    let mut spec = VolumeSpec::new("v", Level::Raid5, members);
    spec.chunk_bytes = 16 << 10;
    let (tx, rx) = mpsc::channel();
    let (dev, meta) = assembly::create(&spec, FailureSink::new(tx), false).unwrap();
    let j = Journal::format_with(jfault.clone(), JournalMode::WriteBack).unwrap();
    let dev = dev.with_journal(j.clone()).unwrap();
    let volume = Volume::new_raid(reactors.set(), "v", dev.clone());
    let monitor = Arc::new(Monitor::start(
        reactors.set(),
        volume.clone(),
        dev,
        rx,
        vec![],
    ));
    monitor.set_meta(meta);
    monitor.open(true).unwrap();
    // Rewrite a block so the cache admits it (a recent block), with its
    // record's write held.
    volume.io(IoOp::Write, 40, vec![0x44; BS], LONG).unwrap();
    jfault.control().hold(Some(IoOp::Write), 1, u64::MAX, 1);
    let v = volume.clone();
    let writer = std::thread::spawn(move || v.io(IoOp::Write, 40, vec![0x55; BS], LONG));
    assert!(jfault.control().wait_held(1, LONG));
    assert!(j.cache().pending() > 0, "admitted to the cache");
    let m = monitor.clone();
    let remover = std::thread::spawn(move || m.set_journal(None));
    eventually("the removal suspends the volume", || {
        volume.quiesce().is_suspended()
    });
    jfault.control().release();
    writer.join().unwrap().unwrap();
    remover.join().unwrap().unwrap();
    assert!(monitor.journal().is_none());
    let back = volume.io(IoOp::Read, 40, vec![0; BS], LONG).unwrap();
    assert_eq!(
        back,
        vec![0x55; BS],
        "the acknowledged write is on the members"
    );
    drop(monitor);
    drop(volume);
    reactors.shutdown().unwrap();
}

/// Finding 5: a change that cannot quiesce leaves the bitmap's members as
/// they were: a spare that did not join gets no bitmap write.
#[test]
fn a_spare_that_did_not_join_gets_no_bitmap_write() {
    let rig = Rig::new(Level::Raid1, 2, 0, true);
    rig.monitor.fail_member("m1").unwrap();
    rig.monitor.set_timeout(Duration::from_millis(200));
    let stuck = rig.stuck_flush(0);
    let spare = ram("s9");
    assert!(rig.monitor.add_spare(spare.clone()).is_err());
    assert!(rig.monitor.snapshot().spares.is_empty(), "nothing changed");
    rig.faults[0].control().release();
    stuck.join().unwrap().unwrap();
    // A write to a fresh region: its bit is on disk before it completes.
    rig.write(3000, 1, 0x66).unwrap();
    let mut ch = spare.open_channel().unwrap();
    let mut bits = vec![0u8; BS];
    bdev::conformance::run_one(
        ch.as_mut(),
        bdev::conformance::rw(IoOp::Read, 1, 1, &mut bits, 1),
    )
    .unwrap();
    assert!(bits.iter().all(|&b| b == 0), "no bitmap on the spare");
    rig.stop();
}

/// Finding 8: a flush parked on a volume that is then removed ends with
/// an error at once, instead of polling a gate that never opens again.
#[test]
fn a_flush_waiting_on_a_removed_volume_ends_with_an_error() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let volume = Volume::new(reactors.set(), "v", ram("d"));
    let held = volume.suspend(LONG).unwrap();
    let v = volume.clone();
    let t = Instant::now();
    let flush = std::thread::spawn(move || v.flush_on_reactor(LONG));
    volume.quiesce().remove(LONG).unwrap();
    drop(held);
    let r = flush.join().unwrap();
    assert!(
        matches!(
            r,
            Err(VolumeError::Removed(_)) | Err(VolumeError::Quiesce(_))
        ),
        "{r:?}"
    );
    assert!(t.elapsed() < LONG / 2, "it did not wait for its timeout");
    reactors.shutdown().unwrap();
}

/// Finding 10: a rebuild that cannot start (its new device refuses
/// channels) leaves no slot "rebuilding" with nothing running.
#[test]
fn a_rebuild_that_cannot_start_leaves_no_slot_rebuilding() {
    let rig = Rig::new(Level::Raid1, 2, 1, false);
    rig.write(0, 8, 0x77).unwrap();
    rig.faults[2].control().refuse_channels(true);
    rig.monitor.fail_member("m1").unwrap();
    eventually("the slot is failed again", || {
        let s = rig.monitor.snapshot();
        s.settled() && !s.states.contains(&MemberState::Rebuilding)
    });
    let p = rig.monitor.rebuild().unwrap();
    assert!(p.error().is_some());
    assert_eq!(rig.states()[1], MemberState::Failed);
    assert_eq!(rig.read(0, 8), vec![0x77; 8 * BS], "degraded, whole");
    rig.stop();
}

/// Make device `f` refuse channels from the end of the next superblock
/// record that writes it on (its last IO there, the check of block 0 for
/// a first-format leftover, is held until then): gone after the change
/// wrote it, before background work reopens its channels.
fn refuse_after_its_record(f: &FaultDevice, record: impl FnOnce() + Send) {
    f.control().hold(Some(IoOp::Read), 0, 1, 1);
    std::thread::scope(|s| {
        let change = s.spawn(record);
        assert!(f.control().wait_held(1, LONG));
        f.control().refuse_channels(true);
        f.control().release();
        change.join().unwrap();
    });
}

/// From an audit: a spare whose device refuses channels (gone before any
/// IO noticed) stopped its rebuild, which failed the slot again with no
/// event handing it the next spare: the volume stayed degraded beside a
/// hot spare until a restart. The refusing spare is failed as a member
/// failing an IO is, and the next spare takes the slot.
#[test]
fn a_spare_that_refuses_a_channel_hands_the_slot_to_the_next_spare() {
    let rig = Rig::new(Level::Raid1, 2, 2, false);
    rig.write(0, 64, 0x5a).unwrap();
    // s0 takes the slot, and goes after the change recorded it.
    refuse_after_its_record(&rig.faults[2], || {
        rig.monitor.fail_member("m1").unwrap();
        eventually("s0 takes the slot", || rig.member_names()[1] == "s0");
    });
    // No guest IO from here on: only the rebuild opens the spare.
    eventually("the second spare is in sync", || {
        rig.monitor.snapshot().settled()
            && rig.states() == vec![MemberState::InSync, MemberState::InSync]
    });
    assert_eq!(rig.member_names(), vec!["m0", "s1"]);
    assert_eq!(rig.monitor.spares(), 0);
    assert_eq!(rig.read(0, 64), vec![0x5a; 64 * BS]);
    assert_eq!(rig.raw[3].info().name, "s1");
    let mut copy = vec![0u8; 64 * BS];
    let mut ch = rig.raw[3].open_channel().unwrap();
    bdev::conformance::run_one(
        ch.as_mut(),
        bdev::conformance::rw(IoOp::Read, DATA, 64, &mut copy, 1),
    )
    .unwrap();
    assert_eq!(copy, vec![0x5a; 64 * BS], "s1 was rebuilt");
    rig.stop();
}

/// From an audit: a rebuild source whose device refuses a channel when a
/// new generation opens them stopped the rebuild and failed its target
/// (the partly rebuilt spare used up), while the source that broke stayed
/// in sync. The source is failed and the rebuild goes on from the mirror
/// left.
#[test]
fn a_rebuild_source_that_refuses_a_channel_is_failed_not_the_target() {
    let rig = Rig::new(Level::Raid1, 3, 1, false);
    rig.write(0, 512, 0x6b).unwrap();
    // Hold the rebuild in its second row, writing the spare.
    rig.faults[3]
        .control()
        .hold(Some(IoOp::Write), DATA + 256, u64::MAX, 1);
    rig.monitor.fail_member("m2").unwrap();
    assert!(rig.faults[3].control().wait_held(1, LONG));
    let p = rig.monitor.rebuild().unwrap();
    // A change's new generation (m1 write-mostly: m0 stays the source)
    // makes the rebuild reopen its channels (the suspend waits for the
    // held row); m0 goes after the change recorded it.
    refuse_after_its_record(&rig.faults[0], || {
        std::thread::scope(|s| {
            let change = s.spawn(|| rig.monitor.set_write_mostly("m1", true));
            eventually("the change suspends the volume", || {
                rig.volume.quiesce().is_suspended()
            });
            rig.faults[3].control().release();
            change.join().unwrap().unwrap();
        })
    });
    eventually("the rebuild ends", || {
        rig.monitor.snapshot().settled() && !rig.states().contains(&MemberState::Rebuilding)
    });
    assert_eq!(p.error(), None, "it went on");
    assert_eq!(
        rig.states(),
        vec![
            MemberState::Failed,
            MemberState::InSync,
            MemberState::InSync
        ]
    );
    assert_eq!(rig.member_names(), vec!["m0", "m1", "s0"]);
    assert_eq!(rig.read(0, 512), vec![0x6b; 512 * BS]);
    rig.stop();
}

/// Background work follows the member set: a rebuild of a three-way
/// mirror whose source fails goes on from its cursor with the mirror left
/// (md's MD_RECOVERY_INTR), and the result is consistent.
#[test]
fn a_rebuild_whose_source_fails_goes_on_from_another_mirror() {
    let rig = Rig::new(Level::Raid1, 3, 1, false);
    rig.write(0, 512, 0x88).unwrap();
    // Hold the rebuild at its second row, reading its source.
    rig.faults[0]
        .control()
        .hold(Some(IoOp::Read), DATA + 256, DATA + 512, 1);
    rig.monitor.fail_member("m2").unwrap();
    assert!(rig.faults[0].control().wait_held(1, LONG));
    let p = rig.monitor.rebuild().unwrap();
    rig.faults[0].control().pull();
    rig.faults[0].control().release();
    eventually("the rebuild ends", || rig.monitor.snapshot().settled());
    assert_eq!(p.error(), None, "it went on");
    assert_eq!(
        rig.states(),
        vec![
            MemberState::Failed,
            MemberState::InSync,
            MemberState::InSync
        ]
    );
    assert_eq!(rig.read(0, 512), vec![0x88; 512 * BS]);
    let check = rig.monitor.scrub(false).unwrap();
    eventually("the check ends", || check.is_finished());
    assert_eq!(
        check.mismatches.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    rig.stop();
}

/// The superblocks never say a rebuild is further than it is: a second
/// rebuild starts recorded at row 0, not at the first one's checkpoint.
#[test]
fn a_new_rebuild_is_recorded_from_its_first_row() {
    let rig = Rig::new(Level::Raid1, 2, 2, false);
    rig.write(0, 8, 0x99).unwrap();
    // The first rebuild stops at row 3 until its cursor is checkpointed.
    rig.faults[2]
        .control()
        .hold(Some(IoOp::Write), DATA + 3 * 256, u64::MAX, 1);
    rig.monitor.fail_member("m1").unwrap();
    assert!(rig.faults[2].control().wait_held(1, LONG));
    // md keeps a recovery's progress on the recovering device.
    eventually("the cursor is checkpointed", || {
        superblock(rig.raw[2].as_ref()).rebuild_checkpoint > 0
    });
    rig.faults[2].control().release();
    eventually("s0 in sync", || rig.monitor.snapshot().settled());
    // The second rebuild, held at its first write: recorded from row 0.
    rig.faults[3]
        .control()
        .hold(Some(IoOp::Write), DATA, u64::MAX, 1);
    rig.monitor.fail_member("m0").unwrap();
    assert!(rig.faults[3].control().wait_held(1, LONG));
    let sb = superblock(rig.raw[3].as_ref());
    assert_eq!(sb.slot, 0);
    assert_eq!(sb.slot_states[0] & 0x7f, MemberState::Rebuilding.code());
    assert_eq!(sb.rebuild_checkpoint, 0);
    rig.faults[3].control().release();
    eventually("s1 in sync", || rig.monitor.snapshot().settled());
    assert_eq!(rig.read(0, 8), vec![0x99; 8 * BS]);
    rig.stop();
}

/// Finding 4: a queue that cannot open the channel of the volume's new
/// generation fails its requests; it never serves the old generation.
#[test]
fn a_queue_that_cannot_open_the_new_generation_fails_its_requests() {
    use appliance::export::{Export, ExportOptions};
    use appliance::volume::VolumeConfig;
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let old = ram("old");
    let volume = Volume::new(reactors.set(), "v", old.clone());
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("v.sock");
    let export =
        Export::create(reactors.set(), &volume, ExportOptions::new(sock.clone(), 1)).unwrap();
    let mut disk = common::Disk::connect(&sock).unwrap();
    disk.buf()[..BS].fill(0xa1);
    assert_eq!(disk.write(0, BS), 0);
    // The next generation's device refuses channels.
    let new = Arc::new(FaultDevice::new(ram("new")));
    new.control().refuse_channels(true);
    let next: Arc<dyn BlockDevice> = new.clone();
    volume
        .quiesce()
        .reconfigure(LONG, |_| Ok::<_, ()>((VolumeConfig::plain(next), ())))
        .unwrap();
    disk.buf()[..BS].fill(0xb2);
    assert_ne!(disk.write(0, BS), 0, "the write fails");
    let mut ch = old.open_channel().unwrap();
    let mut back = vec![0u8; BS];
    bdev::conformance::run_one(
        ch.as_mut(),
        bdev::conformance::rw(IoOp::Read, 0, 1, &mut back, 1),
    )
    .unwrap();
    assert_eq!(back, vec![0xa1; BS], "nothing reached the old generation");
    // Once the device opens again, the next generation is served.
    new.control().refuse_channels(false);
    let next: Arc<dyn BlockDevice> = new.clone();
    volume
        .quiesce()
        .reconfigure(LONG, |_| Ok::<_, ()>((VolumeConfig::plain(next), ())))
        .unwrap();
    disk.buf()[..BS].fill(0xc3);
    assert_eq!(disk.write(0, BS), 0);
    assert_eq!(disk.read(0, BS), 0);
    assert_eq!(&disk.buf()[..BS], &vec![0xc3; BS][..]);
    drop(disk);
    drop(export);
    reactors.shutdown().unwrap();
}

/// Review finding: a hot replacement whose new device failed a guest
/// write after its copy finished never takes the slot, even when the
/// copy's end could not be applied at once.
#[test]
fn a_replacement_that_missed_a_write_never_takes_the_slot() {
    let rig = Rig::new(Level::Raid1, 2, 0, false);
    rig.write(0, 8, 0x10).unwrap();
    rig.monitor.set_timeout(Duration::from_millis(200));
    let x = Arc::new(FaultDevice::new(ram("x")));
    // The copy waits at its first write until a flush is stuck, so its
    // end meets a volume that cannot quiesce.
    x.control().hold(Some(IoOp::Write), DATA, u64::MAX, 1);
    let p = rig.monitor.replace_member("m1", x.clone()).unwrap();
    assert!(x.control().wait_held(1, LONG));
    let stuck = rig.stuck_flush(0);
    x.control().release();
    eventually("the copy finished", || p.is_finished());
    eventually("its end was put off", || {
        rig.monitor.snapshot().deferred >= 1
    });
    // A write now fails on the new device and is acknowledged without it.
    x.control().fail_writes(0, u64::MAX);
    rig.write(0, 8, 0x20).unwrap();
    rig.faults[0].control().release();
    stuck.join().unwrap().unwrap();
    eventually("the replacement is given up", || {
        let s = rig.monitor.snapshot();
        s.settled() && s.replacing.is_none()
    });
    let names = rig.member_names();
    assert_eq!(names, vec!["m0".to_string(), "m1".into()]);
    assert_eq!(rig.read(0, 8), vec![0x20; 8 * BS]);
    rig.stop();
}

/// Review finding: a queue holding writes to a suspended range does not
/// move (they were taken from the ring: a queue started elsewhere would
/// never answer them); once the range is resumed it does, and the write
/// lands.
#[test]
fn a_queue_holding_writes_to_a_suspended_range_does_not_move() {
    use appliance::export::{Export, ExportOptions};
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let volume = Volume::new(reactors.set(), "v", ram("d"));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("v.sock");
    let export =
        Export::create(reactors.set(), &volume, ExportOptions::new(sock.clone(), 1)).unwrap();
    let mut disk = common::Disk::connect(&sock).unwrap();
    volume.suspend_range(0, 256, LONG).unwrap();
    let writer = std::thread::spawn(move || {
        disk.buf()[..BS].fill(0x51);
        let r = disk.write(0, BS);
        (r, disk)
    });
    eventually("the write is held", || export.parked_writes() == 1);
    let e = export.move_queue(0, 1, 2).unwrap_err();
    assert!(e.to_string().contains("suspended range"), "{e}");
    assert_eq!(export.queue_cores(), vec![0]);
    volume.resume_range();
    let (r, mut disk) = writer.join().unwrap();
    assert_eq!(r, 0);
    export.move_queue(0, 1, 2).unwrap();
    assert_eq!(export.queue_cores(), vec![1]);
    assert_eq!(disk.read(0, BS), 0);
    assert!(disk.buf()[..BS].iter().all(|&b| b == 0x51));
    drop(disk);
    drop(export);
    reactors.shutdown().unwrap();
}

/// A member whose device refuses a channel when a new generation opens
/// (a controller gone before any IO noticed) is failed like one that
/// failed an IO: the volume goes on degraded on every core rather than
/// refuse every request there.
#[test]
fn a_member_that_refuses_a_channel_is_failed_and_the_volume_goes_on() {
    let rig = Rig::new(Level::Raid1, 2, 0, false);
    rig.write(0, 8, 0x31).unwrap();
    rig.faults[1].control().refuse_channels(true);
    // Any change publishes a new generation: every core opens channels.
    rig.monitor.set_serialize(true).unwrap();
    rig.write(0, 8, 0x32).unwrap();
    eventually("the member is recorded failed", || {
        let s = rig.monitor.snapshot();
        s.settled() && rig.states() == vec![MemberState::InSync, MemberState::Failed]
    });
    assert_eq!(rig.read(0, 8), vec![0x32; 8 * BS]);
    // What the superblock of the member left says.
    assert_eq!(
        superblock(rig.faults[0].as_ref()).slot_states[1] & 0x7f,
        MemberState::Failed.code()
    );
    rig.stop();
}

/// Found by the chaos run: a bitmap turned on while a member's device was
/// already gone (no IO had noticed) was refused as an internal error. As
/// md faults a member whose bitmap write fails, the member is failed and
/// the bitmap goes on the others.
#[test]
fn a_bitmap_turned_on_with_a_member_gone_fails_that_member() {
    let rig = Rig::new(Level::Raid1, 2, 0, false);
    rig.write(0, 8, 0x41).unwrap();
    rig.faults[1].control().pull();
    rig.monitor.set_bitmap(Some(1 << 20)).unwrap();
    eventually("the member is recorded failed", || {
        rig.monitor.snapshot().settled()
            && rig.states() == vec![MemberState::InSync, MemberState::Failed]
    });
    let sb = superblock(rig.faults[0].as_ref());
    assert!(sb.bitmap_rows_per_bit > 0, "the survivor names the bitmap");
    assert_eq!(sb.slot_states[1] & 0x7f, MemberState::Failed.code());
    rig.write(8, 8, 0x42).unwrap();
    assert_eq!(rig.read(0, 8), vec![0x41; 8 * BS]);
    assert_eq!(rig.read(8, 8), vec![0x42; 8 * BS]);
    rig.stop();
}

/// From review: an operator's fail was checked against losing data before
/// the suspend only. Another member that failed in the IO path while the
/// volume drained (a slow drain is often that member dying) was not seen,
/// and the volume lost two members. The fail is checked again inside the
/// suspend, and refused.
#[test]
fn an_operator_fail_is_checked_again_after_the_drain() {
    let rig = Rig::new(Level::Raid5, 3, 0, false);
    rig.write(0, 64, 0x31).unwrap();
    let stuck = rig.stuck_flush(1);
    let failed = std::thread::scope(|s| {
        let fail = s.spawn(|| rig.monitor.fail_member("m0"));
        eventually("the fail's suspend waits for the flush", || {
            rig.volume.quiesce().is_suspended()
        });
        // m1 dies under the held flush, which then fails.
        rig.faults[1].control().pull();
        rig.faults[1].control().release();
        fail.join().unwrap()
    });
    let _ = stuck.join().unwrap();
    match failed {
        Err(OpError::FailedPrecondition(why)) => {
            assert!(why.contains("would lose data"), "{why}")
        }
        other => panic!("the fail went through: {other:?}"),
    }
    eventually("m1 is failed", || rig.states()[1] == MemberState::Failed);
    assert_eq!(rig.states()[0], MemberState::InSync);
    assert_eq!(rig.read(0, 64), vec![0x31; 64 * BS], "served degraded");
    rig.stop();
}

/// From an audit: a mirror repair copies from the first mirror that is not
/// write-mostly, and reads of what the mirrors may still hold differently
/// go there; a write-mostly change during the repair moved both to the
/// other mirror, so a block read before the change read differently after
/// it, with no write. The reference is pinned for the repair's life.
#[test]
fn a_write_mostly_change_during_a_repair_keeps_what_reads_return() {
    let rig = Rig::new(Level::Raid1, 2, 0, false);
    rig.write(0, 4096, 0x6c).unwrap();
    // m1 silently differs in row 10 (a torn write at a crash, say).
    let mut junk = vec![0xa5u8; 4 * BS];
    let mut ch = rig.raw[1].open_channel().unwrap();
    bdev::conformance::run_one(
        ch.as_mut(),
        bdev::conformance::rw(IoOp::Write, DATA + 10 * 256, 4, &mut junk, 1),
    )
    .unwrap();
    drop(ch);
    // The repair is held in row 5, before it.
    rig.faults[1]
        .control()
        .hold(Some(IoOp::Read), DATA + 5 * 256, u64::MAX, 1);
    let p = rig.monitor.scrub(true).unwrap();
    assert!(rig.faults[1].control().wait_held(1, LONG));
    let before = rig.read(10 * 256, 4);
    assert_eq!(before, vec![0x6c; 4 * BS], "the reference mirror, m0");
    std::thread::scope(|s| {
        let change = s.spawn(|| rig.monitor.set_write_mostly("m0", true));
        eventually("the change suspends the volume", || {
            rig.volume.quiesce().is_suspended()
        });
        rig.faults[1].control().release();
        change.join().unwrap().unwrap();
    });
    assert_eq!(
        rig.read(10 * 256, 4),
        before,
        "read again during the repair"
    );
    eventually("the repair ends", || {
        p.is_finished() && rig.monitor.snapshot().settled()
    });
    assert_eq!(p.error(), None);
    assert_eq!(rig.read(10 * 256, 4), before, "read after the repair");
    assert_eq!(rig.read(0, 4096), vec![0x6c; 4096 * BS]);
    rig.stop();
}

/// From an audit: a replacement was checked against a degraded volume
/// before the suspend only; a member that failed in the IO path while
/// the volume drained was not seen, and the copy started on a degraded
/// volume (md rebuilds first). It is checked again inside the suspend.
#[test]
fn a_replacement_is_checked_again_after_the_drain() {
    let rig = Rig::new(Level::Raid5, 3, 0, false);
    rig.write(0, 64, 0x31).unwrap();
    let stuck = rig.stuck_flush(1);
    let started = std::thread::scope(|s| {
        let replace = s.spawn(|| rig.monitor.replace_member("m0", ram("n0")));
        eventually("the replacement's suspend waits for the flush", || {
            rig.volume.quiesce().is_suspended()
        });
        rig.faults[1].control().pull();
        rig.faults[1].control().release();
        replace.join().unwrap()
    });
    let _ = stuck.join().unwrap();
    match started {
        Err(OpError::FailedPrecondition(why)) => assert!(why.contains("degraded"), "{why}"),
        Err(e) => panic!("refused, but not as degraded: {e:?}"),
        Ok(_) => panic!("a replacement started on a degraded volume"),
    }
    eventually("m1 is failed", || rig.states()[1] == MemberState::Failed);
    assert!(rig.monitor.snapshot().replacing.is_none());
    assert_eq!(rig.read(0, 64), vec![0x31; 64 * BS], "served degraded");
    rig.stop();
}

/// From review: a bitmap turned on while a member's failure was not yet
/// published (here, put off by a drain that cannot finish) did not mark
/// what that member missed before it, yet the published failure then
/// counted the member re-addable from it: a re-add would copy only the
/// marked regions and the mirrors would differ. Refused until the
/// failure is recorded.
#[test]
fn a_bitmap_waits_for_a_member_failure_to_be_recorded() {
    let rig = Rig::new(Level::Raid1, 3, 0, false);
    rig.monitor.set_timeout(Duration::from_millis(200));
    rig.write(0, 64, 0x41).unwrap();
    let stuck = rig.stuck_flush(2);
    rig.faults[0].control().pull();
    rig.write(0, 64, 0x42).unwrap();
    eventually("the failure was put off", || {
        rig.monitor.snapshot().deferred >= 1
    });
    match rig.monitor.set_bitmap(Some(1 << 20)) {
        Err(OpError::FailedPrecondition(why)) => {
            assert!(why.contains("not recorded yet"), "{why}")
        }
        other => panic!("a bitmap over an unrecorded failure: {other:?}"),
    }
    rig.faults[2].control().release();
    let _ = stuck.join().unwrap();
    eventually("m0 is failed", || rig.states()[0] == MemberState::Failed);
    rig.monitor.set_bitmap(Some(1 << 20)).unwrap();
    rig.stop();
}

/// Send `ev` to the monitor as a late report comes, and wait until it was
/// taken and applied (or found stale).
fn late_event(rig: &Rig, ev: Event) {
    rig.monitor.device().member_set().failures.event(ev);
    eventually("the event was taken", || rig.monitor.idle());
}

/// The rebuild in progress of `rig`'s volume, as the run its events name.
fn rebuild_run(rig: &Rig) -> Run {
    let device = rig.monitor.device();
    let (_, cursor) = device
        .member_set()
        .rebuilding
        .as_ref()
        .expect("a rebuild runs");
    Run::of(cursor)
}

/// A rebuild's end named only its slot. Queued while an operator failed
/// the device being rebuilt and took it back (md's re-add), it met a new
/// rebuild of the same slot onto the same device; only the check that the
/// cursor had reached the end kept it from marking that one in sync (and
/// it was logged as a failed change). The end names its run now, and a
/// late one is recognised and ignored.
#[test]
fn a_late_rebuild_end_never_marks_a_newer_rebuild_in_sync() {
    let rig = Rig::new(Level::Raid1, 2, 1, false);
    rig.write(0, 512, 0x5a).unwrap();
    // The first rebuild (of slot 1 onto s0), held at its first write.
    rig.faults[2]
        .control()
        .hold(Some(IoOp::Write), DATA, u64::MAX, 1);
    rig.monitor.fail_member("m1").unwrap();
    assert!(rig.faults[2].control().wait_held(1, LONG));
    let first = rebuild_run(&rig);
    rig.faults[2].control().release();
    eventually("s0 in sync", || {
        rig.monitor.snapshot().settled() && rig.states()[1] == MemberState::InSync
    });
    // s0 fails and comes back as a spare: a second rebuild onto the same
    // device, held at its first write.
    rig.monitor.fail_member("s0").unwrap();
    rig.faults[2]
        .control()
        .hold(Some(IoOp::Write), DATA, u64::MAX, 1);
    rig.monitor.add_spare(rig.faults[2].clone()).unwrap();
    assert!(rig.faults[2].control().wait_held(1, LONG));
    assert!(rebuild_run(&rig) != first, "a new run");
    // The first rebuild's end arrives late.
    late_event(&rig, Event::Rebuilt(1, first));
    assert_eq!(rig.states()[1], MemberState::Rebuilding);
    rig.faults[2].control().release();
    eventually("s0 in sync again", || {
        rig.monitor.snapshot().settled() && rig.states()[1] == MemberState::InSync
    });
    // Each mirror alone holds the data.
    rig.faults[0].control().pull();
    assert_eq!(rig.read(0, 512), vec![0x5a; 512 * BS]);
    rig.stop();
}

/// From review: a replacement's abort named nothing. A second report of
/// one abort (a guest write and the copy both fail on the new device)
/// queued behind an operator's next replacement of the same slot ended
/// that one. The abort names its run now; a late one is ignored.
#[test]
fn a_late_replacement_abort_leaves_a_newer_replacement_alone() {
    let rig = Rig::new(Level::Raid1, 2, 0, false);
    rig.write(0, 512, 0x6b).unwrap();
    let x = Arc::new(FaultDevice::new(ram("x")));
    let y = Arc::new(FaultDevice::new(ram("y")));
    // The first replacement (m1 by x) fails at its first copy write.
    x.control().fail_writes(DATA, u64::MAX);
    let p = rig.monitor.replace_member("m1", x.clone()).unwrap();
    // (A copy that stopped counts as settled before its abort is
    // applied: wait for the replacement itself to go.)
    eventually("the first replacement is given up", || {
        p.is_finished() && rig.monitor.idle() && rig.monitor.snapshot().replacing.is_none()
    });
    let first = p.cursor.clone();
    // The second (m1 by y), held at its first copy write.
    y.control().hold(Some(IoOp::Write), DATA, u64::MAX, 1);
    let q = rig.monitor.replace_member("m1", y.clone()).unwrap();
    assert!(y.control().wait_held(1, LONG));
    // The first one's abort, reported again.
    late_event(
        &rig,
        Event::RebuildAborted(2, Run::of(&first), "late".into()),
    );
    assert!(rig.monitor.snapshot().replacing.is_some(), "still running");
    y.control().release();
    eventually("the copy finished", || q.is_finished());
    eventually("y took the slot", || {
        let s = rig.monitor.snapshot();
        s.settled() && s.replacing.is_none()
    });
    assert_eq!(q.error(), None);
    let names = rig.member_names();
    assert_eq!(names, vec!["m0".to_string(), "y".into()]);
    rig.faults[0].control().pull();
    assert_eq!(rig.read(0, 512), vec![0x6b; 512 * BS]);
    rig.stop();
}

/// From an audit: failing a replacement's new device cancelled its copy
/// before the change that gives the replacement up. When that change ran
/// out of time (a flush stuck on a member), the call said nothing changed,
/// but the copy had stopped for good: the replacement stayed recorded,
/// writes kept going to the new device, and a new replacement or a scrub
/// was refused as "a replacement is already running". The copy goes on
/// now, and ends in its slot.
#[test]
fn failing_the_replacement_device_past_the_deadline_leaves_the_copy_going() {
    let rig = Rig::new(Level::Raid5, 3, 0, false);
    rig.write(0, 64, 0x44).unwrap();
    // Slow enough not to end before the call below.
    rig.monitor.set_rate(1 << 20, 1 << 20).unwrap();
    let p = rig.monitor.replace_member("m1", ram("n1")).unwrap();
    let stuck = rig.stuck_flush(0);
    rig.monitor.set_timeout(Duration::from_millis(200));
    let r = rig.monitor.fail_member("n1");
    assert!(matches!(r, Err(OpError::DeadlineExceeded(_))), "{r:?}");
    assert!(rig.monitor.snapshot().replacing.is_some());
    rig.faults[0].control().release();
    stuck.join().unwrap().unwrap();
    rig.monitor.set_timeout(LONG);
    rig.monitor.set_rate(0, 0).unwrap();
    eventually("the copy ends in its slot", || {
        rig.member_names()[1] == "n1"
    });
    assert!(p.is_finished());
    assert!(p.error().is_none(), "{:?}", p.error());
    assert_eq!(rig.read(0, 64), vec![0x44; 64 * BS]);
    rig.stop();
}

/// From an audit: a new spare was first read (to erase what it held)
/// after the volume was suspended, so one that did not answer held every
/// guest IO for the metadata IO's time-out (30 s; a replacement the same).
/// It is read first now, while guest IO goes on.
#[test]
fn a_new_spare_that_does_not_answer_does_not_hold_guest_io() {
    let rig = Rig::new(Level::Raid1, 2, 0, false);
    let spare = Arc::new(FaultDevice::new(ram("n0")));
    spare.control().hold(Some(IoOp::Read), 0, u64::MAX, 1);
    std::thread::scope(|s| {
        let adding = s.spawn(|| rig.monitor.add_spare(spare.clone()));
        assert!(spare.control().wait_held(1, LONG));
        // Guest IO goes on while the spare's first read is held.
        rig.write(0, 16, 0x55).unwrap();
        assert_eq!(rig.read(0, 16), vec![0x55; 16 * BS]);
        spare.control().release();
        adding.join().unwrap().unwrap();
    });
    assert!(rig.monitor.snapshot().spares.iter().any(|d| d == "n0"));
    rig.stop();
}
