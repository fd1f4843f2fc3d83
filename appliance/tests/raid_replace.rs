//! Hot replacement of an in-sync member (md's --replace): under verified
//! IO on both reactors the volume never goes degraded, the new device
//! takes the slot with the slot's data, a check scrub finds the volume
//! consistent, and the members as they are after assemble again. A new
//! device that fails a write ends the replacement and leaves the volume as
//! it was.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use appliance::raid::assembly::{self, VolumeSpec};
use appliance::raid::members::{FailureSink, MemberState};
use appliance::raid::monitor::{Monitor, OpError};
use appliance::raid::rebuild::RebuildProgress;
use appliance::raid::superblock::Level;
use appliance::volume::Volume;
use appliance::workload::{Workload, WorkloadParams};
use bdev::{BlockDevice, FaultDevice, RamDevice};
use poller::{ReactorConfig, Reactors};

mod common;

fn ram(name: &str) -> Arc<dyn BlockDevice> {
    Arc::new(RamDevice::new(name, 4096, 256 + 8192).unwrap())
}

fn spec(members: Vec<Arc<dyn BlockDevice>>, level: Level) -> VolumeSpec {
    VolumeSpec::new("r", level, members)
}

/// A volume of `devs` at `level` on two reactors, created and opened.
fn started(devs: Vec<Arc<dyn BlockDevice>>, level: Level) -> (Reactors, Volume, Monitor) {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let (dev, meta) = assembly::create(&spec(devs, level), FailureSink::new(tx), false).unwrap();
    let volume = Volume::new(reactors.set(), "r", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    monitor.set_meta(meta);
    monitor.open(true).unwrap();
    (reactors, volume, monitor)
}

fn settle(monitor: &Monitor, p: &RebuildProgress) {
    let t = Instant::now();
    while !monitor.snapshot().settled() {
        assert!(t.elapsed() < Duration::from_secs(60), "replacement stuck");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(p.is_finished());
}

fn replace_under_io(level: Level, n: usize) {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let devs: Vec<Arc<dyn BlockDevice>> = (0..n).map(|i| ram(&format!("m{i}"))).collect();
    let (tx, rx) = mpsc::channel();
    let (dev, meta) =
        assembly::create(&spec(devs.clone(), level), FailureSink::new(tx), false).unwrap();
    let volume = Volume::new(reactors.set(), "r", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    monitor.set_meta(meta);
    monitor.open(true).unwrap();
    let w = Workload::start_on_volume(
        reactors.set(),
        &volume,
        WorkloadParams {
            queue_depth: 16,
            io_bytes: 16384,
            read_percent: 50,
            verify: true,
            span_bytes: 0,
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // Bad requests change nothing.
    let new = ram("n1");
    assert!(matches!(
        monitor.replace_member("nope", new.clone()),
        Err(OpError::NotFound(_))
    ));
    assert!(matches!(
        monitor.replace_member("m1", devs[0].clone()),
        Err(OpError::AlreadyExists(_))
    ));
    let small: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("small", 4096, 300).unwrap());
    assert!(matches!(
        monitor.replace_member("m1", small),
        Err(OpError::FailedPrecondition(_))
    ));
    // Slow copy, so the IO runs against every stage of it.
    monitor.set_rate(0, 16 << 20).unwrap();
    let p = monitor.replace_member("m1", new.clone()).unwrap();
    assert!(matches!(
        monitor.replace_member("m0", ram("n0")),
        Err(OpError::FailedPrecondition(_))
    ));
    let mut never_degraded = true;
    while !monitor.snapshot().settled() {
        never_degraded &= monitor
            .member_states()
            .iter()
            .all(|&s| s == MemberState::InSync);
        std::thread::sleep(Duration::from_millis(5));
    }
    settle(&monitor, &p);
    assert_eq!(p.error(), None);
    assert!(never_degraded, "a replacement never degrades the volume");
    std::thread::sleep(Duration::from_millis(100));
    let totals = w.stop(Duration::from_secs(30)).unwrap();
    assert!(totals.clean(), "{totals:?}");
    assert!(totals.reads_verified > 100, "{totals:?}");
    let names: Vec<String> = monitor
        .member_devices()
        .iter()
        .map(|d| d.info().name.clone())
        .collect();
    assert_eq!(names[1], "n1", "{names:?}");
    assert!(monitor
        .member_states()
        .iter()
        .all(|&s| s == MemberState::InSync));
    let check = monitor.scrub(false).unwrap();
    let t = Instant::now();
    while !check.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        check.mismatches.load(Ordering::SeqCst),
        0,
        "consistent after the swap"
    );
    monitor.close().unwrap();
    drop(monitor);
    drop(volume);

    // The members as they are now assemble, clean; the old device's
    // superblock is stale and left out.
    let mut now = devs.clone();
    now[1] = new;
    now.push(devs[1].clone());
    let mut report = assembly::assemble(&now, |_| FailureSink::none());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let v = report.volumes.remove(0);
    assert!(v.was_clean);
    assert_eq!(v.stale, vec!["m1".to_string()]);
    assert!(v
        .device
        .member_states()
        .iter()
        .all(|&s| s == MemberState::InSync));
    reactors.shutdown().unwrap();
}

#[test]
fn a_raid5_member_is_replaced_under_verified_io_without_going_degraded() {
    replace_under_io(Level::Raid5, 4);
}

#[test]
fn a_mirror_member_is_replaced_under_verified_io_without_going_degraded() {
    replace_under_io(Level::Raid1, 2);
}

#[test]
fn a_replacement_that_fails_a_write_is_given_up_and_the_volume_stays_whole() {
    let devs: Vec<Arc<dyn BlockDevice>> = (0..3).map(|i| ram(&format!("m{i}"))).collect();
    let (reactors, volume, monitor) = started(devs, Level::Raid5);
    let bad = Arc::new(FaultDevice::new(ram("bad")));
    bad.control().fail_writes(0, u64::MAX);
    let w = Workload::start_on_volume(reactors.set(), &volume, WorkloadParams::default()).unwrap();
    let p = monitor.replace_member("m2", bad).unwrap();
    settle(&monitor, &p);
    assert!(p.error().is_some(), "the copy stopped");
    std::thread::sleep(Duration::from_millis(100));
    let totals = w.stop(Duration::from_secs(30)).unwrap();
    assert!(totals.clean(), "the guest saw nothing: {totals:?}");
    let snap = monitor.snapshot();
    assert!(snap.replacing.is_none());
    assert_eq!(snap.members[2], "m2");
    assert!(snap.states.iter().all(|&s| s == MemberState::InSync));
    monitor.close().unwrap();
    reactors.shutdown().unwrap();
}

/// From an audit: a discard the new device of a mirror's replacement
/// answered "not supported" (a disk that cannot deallocate the range)
/// gave the replacement up, though on a member such an answer fails
/// nothing: one fstrim threw away the copying.
#[test]
fn a_discard_the_replacement_cannot_take_does_not_end_it() {
    let devs: Vec<Arc<dyn BlockDevice>> = (0..2).map(|i| ram(&format!("m{i}"))).collect();
    let (reactors, volume, monitor) = started(devs, Level::Raid1);
    let new = Arc::new(FaultDevice::new(ram("n1")));
    // The copy stops in the second half, with the first copied.
    new.control()
        .hold(Some(bdev::IoOp::Write), 256 + 4096, u64::MAX, u64::MAX);
    new.control().refuse_discards(true);
    let p = monitor.replace_member("m1", new.clone()).unwrap();
    assert!(new.control().wait_held(1, Duration::from_secs(30)));
    let t = Duration::from_secs(30);
    volume
        .io(bdev::IoOp::Discard, 0, vec![0u8; 8 * 4096], t)
        .expect("the discard");
    new.control().hold(None, 0, 0, 0);
    new.control().release();
    settle(&monitor, &p);
    assert_eq!(p.error(), None, "the replacement was given up");
    assert_eq!(monitor.snapshot().members[1], "n1");
    monitor.close().unwrap();
    drop(volume);
    reactors.shutdown().unwrap();
}

/// From an audit: a spare added to a degraded volume while one of its
/// members was being replaced started a rebuild beside the copy; the
/// rebuild's progress took the replacement's place, so a stop, the view
/// and the close's wait lost the copy, which kept writing. (Made to wait,
/// the spare idled for the whole copy with no redundancy, from review.)
/// A degraded volume is rebuilt first, as md does: no replacement starts
/// on it.
#[test]
fn no_replacement_starts_on_a_degraded_volume() {
    let devs: Vec<Arc<dyn BlockDevice>> = (0..3).map(|i| ram(&format!("m{i}"))).collect();
    let (reactors, _volume, monitor) = started(devs, Level::Raid1);
    monitor.fail_member("m2").unwrap();
    assert!(matches!(
        monitor.replace_member("m0", ram("n0")),
        Err(OpError::FailedPrecondition(_))
    ));
    // Rebuilt, it may.
    monitor.add_spare(ram("s0")).unwrap();
    let t = Instant::now();
    let p = loop {
        if let Some(p) = monitor.rebuild() {
            break p;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no rebuild");
        std::thread::sleep(Duration::from_millis(5));
    };
    settle(&monitor, &p);
    let p = monitor.replace_member("m0", ram("n0")).unwrap();
    settle(&monitor, &p);
    assert_eq!(p.error(), None);
    assert_eq!(monitor.snapshot().members, ["n0", "m1", "s0"]);
    monitor.close().unwrap();
    // A change that reaches it closed (the daemon's stop) may be made
    // again once the daemon serves: not refused for what it asked.
    let r = monitor.replace_member("n0", ram("n1")).map(|_| ());
    assert!(matches!(r, Err(OpError::Stopped(_))), "{r:?}");
    reactors.shutdown().unwrap();
}

/// A device with no channel for the last reactor (where background work
/// runs) while `refuse` is set, as a controller whose queue pairs are all
/// in use refuses one.
struct NoChannelThere {
    inner: Arc<dyn BlockDevice>,
    refuse: Arc<std::sync::atomic::AtomicBool>,
    refused: Arc<std::sync::atomic::AtomicU64>,
}

impl BlockDevice for NoChannelThere {
    fn info(&self) -> &bdev::DeviceInfo {
        self.inner.info()
    }
    fn open_channel(&self) -> Result<Box<dyn bdev::IoChannel>, bdev::BdevError> {
        if self.refuse.load(Ordering::SeqCst) && poller::current_reactor() == Some(1) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(bdev::BdevError::Exhausted("no queue pair free".into()));
        }
        self.inner.open_channel()
    }
}

/// From an audit: a rebuild moving to a new generation of members (any
/// change, here a member marked write-mostly) that could not open a
/// channel to a source for now stopped, and its healthy, partly rebuilt
/// target was failed: the volume stayed degraded. A channel refused for
/// lack of room is not a failure: the move is tried again.
#[test]
fn a_rebuild_that_finds_no_channel_for_now_waits_and_goes_on() {
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let m0: Arc<dyn BlockDevice> = Arc::new(NoChannelThere {
        inner: ram("m0"),
        refuse: refuse.clone(),
        refused: refused.clone(),
    });
    let devs = vec![m0, ram("m1"), ram("m2")];
    let (reactors, _volume, monitor) = started(devs, Level::Raid1);
    monitor.fail_member("m2").unwrap();
    monitor.set_rate(0, 64 << 10).unwrap();
    monitor.add_spare(ram("s0")).unwrap();
    let p = monitor.rebuild().expect("a rebuild");
    assert_eq!(p.slot, 2);
    refuse.store(true, Ordering::SeqCst);
    monitor.set_write_mostly("m1", true).unwrap();
    let t = Instant::now();
    while refused.load(Ordering::SeqCst) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no channel was asked for"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    refuse.store(false, Ordering::SeqCst);
    monitor.set_rate(0, 0).unwrap();
    settle(&monitor, &p);
    assert_eq!(p.error(), None);
    let snap = monitor.snapshot();
    assert!(
        snap.states.iter().all(|&s| s == MemberState::InSync),
        "{:?}",
        snap.states
    );
    assert_eq!(snap.members[2], "s0");
    monitor.close().unwrap();
    reactors.shutdown().unwrap();
}

/// From an audit: a volume deleted while a replacement's end was being
/// recorded (its superblocks written, not yet published) had its record
/// put back to the generation before, and the close wrote that over the
/// superblocks: the old device and the new one both claimed the slot at
/// the same events, and the devices assembled no more.
#[test]
fn a_volume_removed_while_a_replacement_is_recorded_still_assembles() {
    let m0 = Arc::new(FaultDevice::new(ram("m0")));
    let c0 = m0.control();
    let (m1, n1) = (ram("m1"), ram("n1"));
    let devs: Vec<Arc<dyn BlockDevice>> = vec![m0.clone(), m1.clone()];
    let (reactors, volume, monitor) = started(devs, Level::Raid1);
    // The first metadata write to m0 after this: the end's record (a
    // replacement keeps no checkpoint).
    c0.hold(Some(bdev::IoOp::Write), 0, 256, 1);
    monitor.replace_member("m1", n1.clone()).unwrap();
    assert!(c0.wait_held(1, Duration::from_secs(30)));
    // The deletion: the volume's IO object goes (its suspend nests in the
    // change's), then the monitor closes once the change is over.
    volume.quiesce().remove(Duration::from_secs(30)).unwrap();
    c0.release();
    let _ = monitor.close();
    drop(monitor);
    let report = assembly::assemble(&[m0.clone() as Arc<dyn BlockDevice>, m1, n1], |_| {
        FailureSink::none()
    });
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.volumes.len(), 1);
    // As the superblocks said when the deletion came: the copy took the slot.
    let names: Vec<String> = report.volumes[0]
        .members
        .iter()
        .map(|m| m.as_ref().map_or(String::new(), |d| d.info().name.clone()))
        .collect();
    assert_eq!(names, ["m0", "n1"]);
    reactors.shutdown().unwrap();
}

/// A device with room for one channel on reactor 1 (where background
/// work runs) once `limit` is set; elsewhere (metadata IO) any number.
struct OneOnReactor1 {
    inner: Arc<dyn BlockDevice>,
    open: Arc<std::sync::atomic::AtomicU64>,
    limit: Arc<std::sync::atomic::AtomicBool>,
    refused: Arc<std::sync::atomic::AtomicU64>,
}

struct Counted {
    inner: Box<dyn bdev::IoChannel>,
    open: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl bdev::IoChannel for Counted {
    fn submit(&mut self, req: bdev::IoRequest) -> Result<(), bdev::SubmitError> {
        self.inner.submit(req)
    }
    fn poll(&mut self, out: &mut Vec<bdev::Completion>) -> usize {
        self.inner.poll(out)
    }
    fn inflight(&self) -> usize {
        self.inner.inflight()
    }
}

impl BlockDevice for OneOnReactor1 {
    fn info(&self) -> &bdev::DeviceInfo {
        self.inner.info()
    }
    fn open_channel(&self) -> Result<Box<dyn bdev::IoChannel>, bdev::BdevError> {
        if poller::current_reactor() != Some(1) {
            return self.inner.open_channel();
        }
        if self.limit.load(Ordering::SeqCst) && self.open.load(Ordering::SeqCst) >= 1 {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(bdev::BdevError::Exhausted("one queue pair".into()));
        }
        self.open.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(Counted {
            inner: self.inner.open_channel()?,
            open: self.open.clone(),
        }))
    }
}

/// From review: a rebuild opened its channels to the new generation
/// before letting the old ones go, so a source with room for one channel
/// (the rebuild's own) refused the new one every time: the move could
/// never succeed. The old ones go first.
#[test]
fn a_rebuild_moves_to_a_new_generation_on_a_device_with_room_for_one_channel() {
    let limit = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let m0: Arc<dyn BlockDevice> = Arc::new(OneOnReactor1 {
        inner: ram("m0"),
        open: Default::default(),
        limit: limit.clone(),
        refused: refused.clone(),
    });
    let devs = vec![m0, ram("m1"), ram("m2")];
    let (reactors, _volume, monitor) = started(devs, Level::Raid1);
    monitor.fail_member("m2").unwrap();
    monitor.set_rate(0, 64 << 10).unwrap();
    monitor.add_spare(ram("s0")).unwrap();
    let p = monitor.rebuild().expect("a rebuild");
    limit.store(true, Ordering::SeqCst);
    monitor.set_write_mostly("m1", true).unwrap();
    monitor.set_rate(0, 0).unwrap();
    settle(&monitor, &p);
    assert_eq!(
        p.error(),
        None,
        "refused {}",
        refused.load(Ordering::SeqCst)
    );
    let snap = monitor.snapshot();
    assert!(
        snap.states.iter().all(|&s| s == MemberState::InSync),
        "{:?}",
        snap.states
    );
    monitor.close().unwrap();
    reactors.shutdown().unwrap();
}

/// Found with the test above: a superblock write to a member with no
/// channel free for now (its queue pairs all in use, not a failure) failed
/// the member. It waits for one.
#[test]
fn a_superblock_write_waits_for_a_channel_the_member_has_no_room_for_now() {
    let m0 = Arc::new(FaultDevice::new(ram("m0")));
    let c0 = m0.control();
    let devs: Vec<Arc<dyn BlockDevice>> = vec![m0.clone(), ram("m1")];
    let (reactors, _volume, monitor) = started(devs, Level::Raid1);
    // Every channel m0 has room for is taken (by the test).
    let taken = m0.open_channel().unwrap();
    c0.limit_channels(c0.open_channels());
    std::thread::scope(|s| {
        let change = s.spawn(|| monitor.set_write_mostly("m1", true));
        let t = Instant::now();
        while c0.refused() == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no channel asked for"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(taken);
        change.join().unwrap().unwrap();
    });
    // A failure reported meanwhile is recorded by the monitor's thread.
    let t = Instant::now();
    while !monitor.idle() || !monitor.snapshot().settled() {
        assert!(t.elapsed() < Duration::from_secs(30), "never idle");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        monitor
            .member_states()
            .iter()
            .all(|&s| s == MemberState::InSync),
        "{:?}",
        monitor.member_states()
    );
    monitor.close().unwrap();
    reactors.shutdown().unwrap();
}

/// A RAM device that says it takes less than RAM does.
struct Limited {
    inner: Arc<dyn BlockDevice>,
    info: bdev::DeviceInfo,
}

impl BlockDevice for Limited {
    fn info(&self) -> &bdev::DeviceInfo {
        &self.info
    }
    fn open_channel(&self) -> Result<Box<dyn bdev::IoChannel>, bdev::BdevError> {
        self.inner.open_channel()
    }
}

fn limited(
    name: &str,
    max_transfer: u32,
    discard: bool,
    write_zeroes: bool,
) -> Arc<dyn BlockDevice> {
    let inner = ram(name);
    let info = bdev::DeviceInfo {
        max_transfer,
        discard,
        write_zeroes,
        ..inner.info().clone()
    };
    Arc::new(Limited { inner, info })
}

/// A mirror passes guest requests on whole, so a spare or replacement
/// that refuses some the volume takes (no discard, no write zeroes, less
/// than one of the rows its rebuild copies whole) would be failed by the
/// first such request, healthy as it is: it is refused up front, and the
/// volume is left as it was. RAID5 sends members chunk pieces and writes
/// zeroes as data, so there such a device is fine.
#[test]
fn a_device_that_takes_less_than_the_members_is_refused_as_spare_or_replacement() {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    for level in [Level::Raid1, Level::Raid5] {
        let devs: Vec<Arc<dyn BlockDevice>> = (0..3).map(|i| ram(&format!("m{i}"))).collect();
        let (tx, rx) = mpsc::channel();
        let (dev, meta) =
            assembly::create(&spec(devs, level), FailureSink::new(tx), false).unwrap();
        let volume = Volume::new(reactors.set(), "r", dev.clone());
        let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
        monitor.set_meta(meta);
        monitor.open(true).unwrap();
        for (i, (transfer, discard, zeroes)) in [
            (512 << 10, true, true),
            (128 << 20, false, true),
            (128 << 20, true, false),
        ]
        .into_iter()
        .enumerate()
        {
            let d = limited(&format!("s{i}"), transfer, discard, zeroes);
            let spare = monitor.add_spare(d.clone());
            let replace =
                monitor.replace_member("m1", limited(&format!("n{i}"), transfer, discard, zeroes));
            if level == Level::Raid1 {
                for r in [spare.map(|_| ()), replace.map(|_| ())] {
                    match r {
                        Err(OpError::FailedPrecondition(m)) => {
                            assert!(m.contains("cannot stand in"), "{m}")
                        }
                        other => panic!("{level:?} {i}: {other:?}"),
                    }
                }
                let snap = monitor.snapshot();
                assert!(snap.spares.is_empty() && snap.replacing.is_none());
            } else {
                spare.unwrap();
                let p = replace.unwrap();
                settle(&monitor, &p);
                assert!(p.error().is_none());
                monitor.remove_spare(&format!("s{i}")).unwrap();
                // The replacement took m1's slot; put a full device back.
                let p = monitor.replace_member(&format!("n{i}"), ram("m1")).unwrap();
                settle(&monitor, &p);
            }
        }
        monitor.close().unwrap();
    }
    reactors.shutdown().unwrap();
}

/// A spare a RAID5 took (it needs neither discard nor write zeroes) is
/// passed over, not promoted, once a takeover has made the volume a
/// mirror that sends its members both: the slot stays failed and the
/// spare stays a spare.
#[test]
fn a_spare_that_a_takeover_made_unfit_is_not_used() {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let devs: Vec<Arc<dyn BlockDevice>> = (0..2).map(|i| ram(&format!("m{i}"))).collect();
    let (tx, rx) = mpsc::channel();
    let (dev, meta) =
        assembly::create(&spec(devs, Level::Raid1), FailureSink::new(tx), false).unwrap();
    let volume = Volume::new(reactors.set(), "r", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    monitor.set_meta(meta);
    monitor.open(true).unwrap();
    monitor.takeover(Level::Raid5, 65536).unwrap();
    monitor
        .add_spare(limited("s", 128 << 20, false, false))
        .unwrap();
    monitor.takeover(Level::Raid1, 65536).unwrap();
    monitor.fail_member("m0").unwrap();
    assert_eq!(monitor.spares(), 1, "the spare stays a spare");
    assert_eq!(monitor.member_states()[0], MemberState::Failed);
    assert!(monitor.rebuild().is_none_or(|p| p.is_finished()));
    monitor.close().unwrap();
    reactors.shutdown().unwrap();
}

/// From an audit: nothing but failing the member being copied (the volume
/// degraded) or deleting the volume stopped a replacement. Failing its new
/// device gives it up, as md's --fail of the replacement does: the copy
/// stops, the slot keeps its member, the volume stays whole.
#[test]
fn failing_the_replacement_device_gives_the_replacement_up() {
    let devs: Vec<Arc<dyn BlockDevice>> = (0..3).map(|i| ram(&format!("m{i}"))).collect();
    let (reactors, _volume, monitor) = started(devs, Level::Raid5);
    // Too slow to finish meanwhile.
    monitor.set_rate(1 << 20, 1 << 20).unwrap();
    let p = monitor.replace_member("m1", ram("n1")).unwrap();
    monitor.fail_member("n1").unwrap();
    assert!(monitor.snapshot().replacing.is_none());
    let t = Instant::now();
    while !p.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(30), "the copy goes on");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        monitor.member_devices()[1].info().name,
        "m1",
        "the slot keeps its member"
    );
    assert!(monitor
        .member_states()
        .iter()
        .all(|&s| s == MemberState::InSync));
    // A new replacement can start.
    monitor.set_rate(0, 0).unwrap();
    let p = monitor.replace_member("m1", ram("n2")).unwrap();
    settle(&monitor, &p);
    assert_eq!(monitor.member_devices()[1].info().name, "n2");
    reactors.shutdown().unwrap();
}

/// From an audit: a replacement whose copy had reached its end, its new
/// device then failing its flush, was given up and still said finished
/// with no error: a caller that waited for its end saw success, the old
/// device still in the slot. It says why it was given up now.
#[test]
fn a_replacement_given_up_after_its_copy_ended_says_why() {
    use bdev::IoOp;
    let (reactors, _volume, monitor) = started(vec![ram("m0"), ram("m1")], Level::Raid1);
    let n1 = Arc::new(FaultDevice::new(ram("n1")));
    let fault = n1.control();
    // The copy's first write waits until the flush is set to fail: the
    // replacement's own start has flushed by then.
    fault.hold(Some(IoOp::Write), 0, u64::MAX, 1);
    let p = monitor.replace_member("m1", n1.clone()).unwrap();
    assert!(fault.wait_held(1, Duration::from_secs(30)));
    fault.fail_flushes(1);
    fault.release();
    settle(&monitor, &p);
    assert_eq!(
        monitor.member_devices()[1].info().name,
        "m1",
        "the slot keeps its member"
    );
    let why = p.error().expect("the given-up replacement says why");
    assert!(why.contains("flush"), "{why}");
    assert!(monitor
        .member_states()
        .iter()
        .all(|&s| s == MemberState::InSync));
    reactors.shutdown().unwrap();
}

/// From an audit: a rebuild's checkpoint flush that failed was only
/// logged. A device that tells a lost write-back once (a file's writeback
/// error goes to one fsync) then took its later flushes, and the rebuilt
/// member was trusted in sync without the rows it lost. The target fails.
#[test]
fn a_rebuild_target_whose_checkpoint_flush_fails_is_failed() {
    let devs: Vec<Arc<dyn BlockDevice>> = (0..2).map(|i| ram(&format!("m{i}"))).collect();
    let (reactors, _volume, monitor) = started(devs, Level::Raid1);
    // Slow enough for a checkpoint (one a second) before it ends.
    monitor.set_rate(4 << 20, 4 << 20).unwrap();
    let spare = Arc::new(FaultDevice::new(ram("spare")));
    monitor.add_spare(spare.clone()).unwrap();
    monitor.fail_member("m1").unwrap();
    // The rebuild onto it runs (its superblock written); the next flush
    // is the checkpoint's.
    assert!(monitor.rebuild().is_some_and(|p| !p.is_finished()));
    spare.control().fail_flushes(1);
    let t = Instant::now();
    while !monitor.snapshot().settled() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the rebuild never ended"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let names: Vec<String> = monitor
        .member_devices()
        .iter()
        .map(|d| d.info().name.clone())
        .collect();
    let states = monitor.member_states();
    assert!(
        !(names[1] == "spare" && states[1] == MemberState::InSync),
        "{names:?} {states:?}: the target that lost rows is in sync"
    );
    assert_eq!(states[0], MemberState::InSync);
    reactors.shutdown().unwrap();
}

/// From an audit: a mirror took at once what its members did when it was
/// made, and refused any device that took less. A RAID1 started with its
/// 8 MiB remote leg missing took what the local one did (128 MiB: the
/// missing leg's stand-in is shaped like a present member), and refused
/// the leg back for good. A mirror now takes a device that takes at least
/// one of its rows, and then takes at once what that device does: larger
/// requests are refused by the volume (exports split by its limit),
/// never failed by the member.
#[test]
fn a_mirror_takes_a_device_that_takes_less_at_once_and_says_so() {
    use bdev::IoOp;
    let (reactors, volume, monitor) = started(vec![ram("m0"), ram("m1")], Level::Raid1);
    assert!(volume.info().max_transfer >= 128 << 20);
    let n1 = Arc::new(FaultDevice::new(ram("n1")));
    let fault = n1.control();
    // The copy's first write to the new device waits, so the replacement
    // is under way while the volume is used (review).
    fault.hold(Some(IoOp::Write), 0, u64::MAX, 1);
    let p = monitor
        .replace_member("m1", common::Small::device(n1, 8 << 20))
        .unwrap();
    assert!(fault.wait_held(1, Duration::from_secs(30)));
    assert_eq!(volume.info().max_transfer, 8 << 20);
    let t = Duration::from_secs(10);
    // A write larger than the new device takes is the volume's to refuse:
    // sent on to the replacement, it failed the replacement.
    // (Refused by the device, not given up on after the time-out.)
    let r = volume.io(IoOp::Write, 2048, vec![0x33; 16 << 20], t);
    assert!(
        matches!(r, Err(appliance::volume::VolumeError::Io { .. })),
        "{:?}",
        r.map(|_| ())
    );
    fault.release();
    settle(&monitor, &p);
    assert!(p.error().is_none(), "{:?}", p.error());
    assert_eq!(volume.info().max_transfer, 8 << 20);
    volume.io(IoOp::Write, 0, vec![0x11; 8 << 20], t).unwrap();
    assert!(volume.io(IoOp::Write, 0, vec![0x22; 16 << 20], t).is_err());
    let back = volume.io(IoOp::Read, 0, vec![0; 8 << 20], t).unwrap();
    assert!(back.iter().all(|&b| b == 0x11));
    let snap = monitor.snapshot();
    assert!(
        snap.states.iter().all(|s| *s == MemberState::InSync),
        "{:?} {:?}",
        snap.members,
        snap.states
    );
    monitor.close().unwrap();
    reactors.shutdown().unwrap();
}
