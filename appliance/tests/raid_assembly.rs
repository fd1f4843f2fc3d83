//! Superblocks and assembly: a volume comes back from its members after a
//! restart, degraded when a member failed (its older superblock marks it
//! stale), and corrupt or foreign superblocks are reported, never
//! overwritten without force.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use appliance::raid::assembly::{assemble, create, AssemblyError, VolumeSpec};
use appliance::raid::geometry::Layout;
use appliance::raid::members::{FailureSink, MemberState};
use appliance::raid::monitor::Monitor;
use appliance::raid::superblock::Level;
use appliance::volume::Volume;
use bdev::conformance::{run_one, rw};
use bdev::{BlockDevice, IoOp, RamDevice};
use poller::{ReactorConfig, Reactors};

mod common;
use common::behind_faults;

fn rams(n: usize) -> Vec<Arc<dyn BlockDevice>> {
    (0..n)
        .map(|i| {
            Arc::new(RamDevice::new(&format!("m{i}"), 4096, 2048 + 256).unwrap())
                as Arc<dyn BlockDevice>
        })
        .collect()
}

fn spec(members: Vec<Arc<dyn BlockDevice>>, level: Level) -> VolumeSpec {
    VolumeSpec::new("vol0", level, members)
}

/// `n` RAM devices holding a new RAID5 volume.
fn raid5_on(n: usize) -> Vec<Arc<dyn BlockDevice>> {
    let devs = rams(n);
    create(
        &spec(devs.clone(), Level::Raid5),
        FailureSink::none(),
        false,
    )
    .unwrap();
    devs
}

/// A new volume over `members` on `reactors`, its monitor running.
fn created(
    reactors: &Reactors,
    members: Vec<Arc<dyn BlockDevice>>,
    level: Level,
) -> (Volume, Monitor) {
    let (tx, rx) = mpsc::channel();
    let (dev, meta) = create(&spec(members, level), FailureSink::new(tx), false).unwrap();
    let volume = Volume::new(reactors.set(), "vol0", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    monitor.set_meta(meta);
    (volume, monitor)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i / 4096) as u8 ^ seed ^ (i as u8))
        .collect()
}

fn write(dev: &dyn BlockDevice, lba: u64, data: &[u8]) {
    let mut ch = dev.open_channel().unwrap();
    let mut buf = data.to_vec();
    run_one(
        ch.as_mut(),
        rw(IoOp::Write, lba, (data.len() / 4096) as u64, &mut buf, 1),
    )
    .unwrap();
}

fn read(dev: &dyn BlockDevice, lba: u64, len: usize) -> Vec<u8> {
    let mut ch = dev.open_channel().unwrap();
    let mut buf = vec![0u8; len];
    run_one(
        ch.as_mut(),
        rw(IoOp::Read, lba, (len / 4096) as u64, &mut buf, 1),
    )
    .unwrap();
    buf
}

#[test]
fn a_volume_reassembles_from_its_members() {
    for level in [Level::Raid1, Level::Raid5] {
        let devs = rams(4);
        let (vol, _) = create(&spec(devs.clone(), level), FailureSink::none(), false).unwrap();
        let data = pattern(1 << 20, 3);
        write(vol.as_ref(), 100, &data);
        drop(vol);
        // Restart: only the devices remain, in any order.
        let shuffled = vec![
            devs[2].clone(),
            devs[0].clone(),
            devs[3].clone(),
            devs[1].clone(),
        ];
        let report = assemble(&shuffled, |_| FailureSink::none());
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.volumes.len(), 1);
        let v = &report.volumes[0];
        assert!(v.was_clean);
        assert!(v.stale.is_empty());
        assert!(v
            .device
            .member_states()
            .iter()
            .all(|s| *s == MemberState::InSync));
        assert_eq!(read(v.device.as_ref(), 100, 1 << 20), data, "{level:?}");
    }
}

#[test]
fn members_of_a_volume_are_not_reused_without_force() {
    let devs = raid5_on(3);
    match create(
        &spec(devs.clone(), Level::Raid5),
        FailureSink::none(),
        false,
    ) {
        Err(AssemblyError::InUse { volume, .. }) => assert_eq!(volume, "vol0"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("re-created over live members"),
    }
    assert!(
        create(&spec(devs, Level::Raid5), FailureSink::none(), true).is_ok(),
        "force"
    );
    let e = create(
        &VolumeSpec {
            data_offset: 0,
            ..spec(rams(3), Level::Raid5)
        },
        FailureSink::none(),
        false,
    );
    assert!(e.err().unwrap().to_string().contains("superblock"));
}

#[test]
fn a_failed_member_is_stale_after_restart_and_the_volume_starts_degraded() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let raw = rams(4);
    let (faults, members) = behind_faults(&raw);
    let (volume, monitor) = created(&reactors, members, Level::Raid5);
    let before = pattern(512 << 10, 1);
    write(volume.info_device().as_ref(), 0, &before);
    faults[2].control().pull();
    // IO notices the failure; the monitor fails the member and records it.
    let after = pattern(512 << 10, 2);
    write(volume.info_device().as_ref(), 1000, &after);
    let t = std::time::Instant::now();
    while monitor.member_states()[2] != MemberState::Failed {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    // Writes after the failure go to the degraded volume.
    let later = pattern(256 << 10, 5);
    write(volume.info_device().as_ref(), 3000, &later);
    std::thread::sleep(Duration::from_millis(100));
    drop(volume);
    reactors.shutdown().unwrap();
    // Restart from the raw devices: member 2 missed the change.
    let report = assemble(&raw, |_| FailureSink::none());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let v = &report.volumes[0];
    assert_eq!(v.stale, vec!["m2".to_string()]);
    assert_eq!(v.device.member_states()[2], MemberState::Failed);
    assert!(!v.was_clean);
    assert_eq!(read(v.device.as_ref(), 0, 512 << 10), before);
    assert_eq!(read(v.device.as_ref(), 1000, 512 << 10), after);
    assert_eq!(read(v.device.as_ref(), 3000, 256 << 10), later);
}

#[test]
fn corrupt_superblocks_are_reported_and_left_alone() {
    let devs = rams(4);
    create(
        &spec(devs.clone(), Level::Raid5),
        FailureSink::none(),
        false,
    )
    .unwrap();
    // Flip a byte in member 1's superblock (md's, at 4 KiB).
    let mut sb = read(devs[1].as_ref(), 1, 4096);
    sb[100] ^= 0xff;
    write(devs[1].as_ref(), 1, &sb);
    let report = assemble(&devs, |_| FailureSink::none());
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.problems[0].0, "m1");
    assert!(
        report.problems[0].1.contains("checksum"),
        "{}",
        report.problems[0].1
    );
    assert_eq!(
        report.volumes.len(),
        1,
        "three of four members still start the volume"
    );
    assert_eq!(
        report.volumes[0].device.member_states()[1],
        MemberState::Failed
    );
    assert_eq!(
        read(devs[1].as_ref(), 1, 4096),
        sb,
        "the corrupt superblock was not touched"
    );
    // A second corrupt member is more than RAID5 can lose.
    let mut sb3 = read(devs[3].as_ref(), 1, 4096);
    sb3[64] ^= 1;
    write(devs[3].as_ref(), 1, &sb3);
    let report = assemble(&devs, |_| FailureSink::none());
    assert!(report.volumes.is_empty());
    assert!(
        report
            .problems
            .iter()
            .any(|(_, why)| why.contains("cannot start")),
        "{:?}",
        report.problems
    );
    // Blank devices are simply not members.
    let report = assemble(&rams(2), |_| FailureSink::none());
    assert!(report.volumes.is_empty() && report.problems.is_empty());
}

#[test]
fn an_unclean_shutdown_is_noticed_and_parity_resynchronised() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let devs = rams(4);
    let (dev, meta) = create(
        &spec(devs.clone(), Level::Raid5),
        FailureSink::none(),
        false,
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    drop(tx);
    let volume = Volume::new(reactors.set(), "vol0", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev.clone(), rx, vec![]);
    monitor.set_meta(meta);
    assert!(
        monitor.open(true).unwrap().is_none(),
        "a clean start needs no resync"
    );
    let data = pattern(2 << 20, 9);
    write(dev.as_ref(), 0, &data);
    // The crash hits a write half-way: data reached a member, parity did
    // not. (Simulated by writing a data chunk behind the volume's back.)
    let loc = appliance::raid::geometry::Raid5Geometry::new(
        4,
        4096,
        65536,
        Layout::LeftSymmetric,
        256,
        2048 + 256,
    )
    .unwrap()
    .locate(40);
    write(
        devs[loc.member as usize].as_ref(),
        loc.member_block,
        &pattern(4096, 77),
    );
    drop(monitor);
    drop(volume);
    reactors.shutdown().unwrap();
    // Restart: the superblocks say dirty.
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let mut report = assemble(&devs, |_| FailureSink::none());
    let v = report.volumes.remove(0);
    assert!(!v.was_clean, "the crash is noticed");
    let (_tx, rx) = mpsc::channel();
    let volume = Volume::new(reactors.set(), "vol0", v.device.clone());
    let monitor = Monitor::start(reactors.set(), volume, v.device.clone(), rx, vec![]);
    monitor.set_meta(v.meta);
    let resync = monitor.open(v.was_clean).unwrap().expect("a resync runs");
    let t = std::time::Instant::now();
    while !resync.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        resync.mismatches.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the torn stripe was found"
    );
    monitor.close().unwrap();
    // The next start is clean, and a check finds nothing.
    let mut report = assemble(&devs, |_| FailureSink::none());
    let v = report.volumes.remove(0);
    assert!(v.was_clean);
    let (_tx2, rx) = mpsc::channel();
    let volume = Volume::new(reactors.set(), "vol0", v.device.clone());
    let monitor = Monitor::start(reactors.set(), volume, v.device.clone(), rx, vec![]);
    let check = monitor.scrub(false).unwrap();
    let t = std::time::Instant::now();
    while !check.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        check.mismatches.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    reactors.shutdown().unwrap();
}

#[test]
fn an_interrupted_rebuild_resumes_from_its_checkpoint_after_a_restart() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let raw = rams(4);
    let spare =
        Arc::new(RamDevice::new("spare", 4096, 2048 + 256).unwrap()) as Arc<dyn BlockDevice>;
    let (_, members) = behind_faults(&raw);
    let (tx, rx) = mpsc::channel();
    let (dev, meta) = create(&spec(members, Level::Raid5), FailureSink::new(tx), false).unwrap();
    let data = pattern(6 << 20, 4);
    write(dev.as_ref(), 0, &data);
    let volume = Volume::new(reactors.set(), "vol0", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![spare.clone()]);
    monitor.set_meta(meta);
    monitor.open(true).unwrap();
    // Fail member 1 by hand; the spare takes the slot and the rebuild
    // starts, throttled so the restart catches it half-way.
    monitor.fail_member("m1").unwrap();
    let p = monitor.rebuild().expect("rebuild started");
    p.max_bytes_per_sec
        .store(2 << 20, std::sync::atomic::Ordering::SeqCst);
    let t = std::time::Instant::now();
    while p.cursor.load(std::sync::atomic::Ordering::SeqCst) < 20
        || t.elapsed() < Duration::from_millis(2500)
    {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!p.is_finished(), "the throttle should keep it running");
    // Crash: no close, no clean superblocks. It tore a stripe the
    // rebuild had passed: row 0's parity (left-symmetric: the last
    // member's chunk) did not get its write.
    drop(monitor);
    drop(volume);
    reactors.shutdown().unwrap();
    write(raw[3].as_ref(), 256 + 1, &pattern(4096, 77));
    let mut devs = raw.clone();
    devs.push(spare.clone());
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    // The volume's events (the rebuild's end among them) go to its monitor.
    let (tx, rx) = mpsc::channel();
    let mut report = assemble(&devs, move |_| FailureSink::new(tx.clone()));
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let v = report.volumes.remove(0);
    assert_eq!(
        v.stale,
        vec!["m1".to_string()],
        "the replaced member is stale"
    );
    assert_eq!(v.device.member_states()[1], MemberState::Rebuilding);
    let checkpoint = v.meta.template.rebuild_checkpoint;
    assert!(checkpoint > 0, "a checkpoint was recorded");
    let volume = Volume::new(reactors.set(), "vol0", v.device.clone());
    let monitor = Monitor::start(reactors.set(), volume, v.device.clone(), rx, vec![]);
    monitor.set_meta(v.meta);
    let resumed = monitor
        .open(v.was_clean)
        .unwrap()
        .expect("the rebuild resumes");
    // From an audit: until the resync owed after the crash has run,
    // writes compute parity from the data (a read-modify-write carried a
    // torn stripe's stale parity forward); the resync's end clears it.
    let owed = v.device.member_set().scrubbing.clone();
    assert!(owed.load(std::sync::atomic::Ordering::SeqCst));
    let t = std::time::Instant::now();
    while !monitor
        .member_states()
        .iter()
        .all(|s| *s == MemberState::InSync)
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{:?}",
            monitor.member_states()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(resumed.error().is_none());
    // Only the rows past the checkpoint were rebuilt this time.
    let rows = resumed.total;
    assert_eq!(
        resumed.bytes.load(std::sync::atomic::Ordering::SeqCst),
        (rows - checkpoint) * 65536,
        "resumed at row {checkpoint} of {rows}, not from the start"
    );
    // From review: the rows below the checkpoint were never resynced
    // after such a restart (the resume returned before the unclean
    // start's resync, and the rebuild's end thawed the bitmap). A resync
    // follows the rebuild and finds the torn stripe.
    let t = std::time::Instant::now();
    let resync = loop {
        if let Some(p) = monitor.rebuild().filter(|p| !Arc::ptr_eq(p, &resumed)) {
            break p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no resync after the rebuild"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    while !resync.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        resync.mismatches.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the torn stripe was found"
    );
    assert!(!owed.load(std::sync::atomic::Ordering::SeqCst));
    // Everything reads back, from a volume whose slot 1 is the spare.
    assert_eq!(read(v.device.as_ref(), 0, 6 << 20), data);
    let now = monitor.member_devices();
    assert_eq!(now[1].info().name, "spare");
    reactors.shutdown().unwrap();
}

#[test]
fn a_degraded_three_way_mirror_is_resynchronised_after_an_unclean_shutdown() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let raw = rams(3);
    let (faults, members) = behind_faults(&raw);
    let (volume, monitor) = created(&reactors, members, Level::Raid1);
    assert!(monitor.open(true).unwrap().is_none());
    let data = pattern(256 << 10, 3);
    write(volume.info_device().as_ref(), 0, &data);
    // The first mirror fails: the two left are the ones to compare.
    faults[0].control().pull();
    write(volume.info_device().as_ref(), 100, &pattern(64 << 10, 4));
    let t = std::time::Instant::now();
    while monitor.member_states()[0] != MemberState::Failed {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    // The crash tears a write: it reached mirror 2, not mirror 1.
    write(raw[2].as_ref(), 256 + 10, &pattern(8192, 99));
    drop(monitor);
    drop(volume);
    reactors.shutdown().unwrap();

    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let mut report = assemble(&raw, |_| FailureSink::none());
    let v = report.volumes.remove(0);
    assert!(!v.was_clean, "the crash is noticed");
    assert_eq!(v.device.member_states()[0], MemberState::Failed);
    let (_tx, rx) = mpsc::channel();
    let volume = Volume::new(reactors.set(), "vol0", v.device.clone());
    let monitor = Monitor::start(reactors.set(), volume, v.device.clone(), rx, vec![]);
    monitor.set_meta(v.meta);
    let resync = monitor
        .open(v.was_clean)
        .unwrap()
        .expect("the two mirrors left are resynchronised");
    let t = std::time::Instant::now();
    while !resync.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(resync.error(), None);
    assert_eq!(
        resync.mismatches.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the two torn blocks were found"
    );
    assert_eq!(
        read(raw[1].as_ref(), 256 + 10, 8192),
        read(raw[2].as_ref(), 256 + 10, 8192),
        "the mirrors left still differ"
    );
    // A check of the degraded mirror now finds nothing.
    let check = monitor.scrub(false).unwrap();
    let t = std::time::Instant::now();
    while !check.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        check.mismatches.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    monitor.close().unwrap();
    reactors.shutdown().unwrap();
}

/// A volume in the appliance's first format (its own superblock at byte
/// 0, its own bitmap at 4 KiB) is assembled as it was, bitmap bits
/// included, and its first record converts every member to md's 1.2
/// format: md's bitmap written first, then md's superblock over the old
/// bitmap, then the old superblock erased. A conversion cut short after
/// one member still assembles (the others are one event behind).
#[test]
fn a_raid5_in_the_first_format_is_converted_to_md_on_its_first_record() {
    first_format_conversion(Level::Raid5);
}

/// The same for a mirror, whose first-format superblocks recorded a chunk
/// and layout md's do not (a conversion cut short must not read as a
/// geometry disagreement).
#[test]
fn a_raid1_in_the_first_format_is_converted_to_md_on_its_first_record() {
    first_format_conversion(Level::Raid1);
}

fn first_format_conversion(level: Level) {
    use appliance::raid::assembly::{read_superblock, write_superblock};
    use appliance::raid::bitmap::{rows_per_bit, Bitmap};
    use appliance::raid::md::bitmap::MdBitmap;
    use appliance::raid::md::superblock::{MdSuperblock, V1_2_OFFSET};

    let devs = rams(3);
    let (dev, _) = create(&spec(devs.clone(), level), FailureSink::none(), false).unwrap();
    let data = pattern(512 << 10, 7);
    write(dev.as_ref(), 100, &data);
    let rows = dev.rows();
    drop(dev);
    let rpb = rows_per_bit(&rows, 256 << 10);
    // As an older appliance left the members: unclean, bits 0 and 3 set.
    let to_first_format = || {
        for d in &devs {
            let mut sb = read_superblock(d.as_ref()).unwrap().unwrap();
            sb.clean = false;
            if level == Level::Raid1 {
                // What the first format recorded for a mirror.
                sb.chunk_bytes = 64 << 10;
                sb.layout = Layout::LeftSymmetric;
            }
            sb.bitmap_rows_per_bit = rpb;
            write(d.as_ref(), 0, &sb.encode_legacy());
            let old = Bitmap::new(&rows, rpb, sb.volume_uuid).unwrap();
            write(d.as_ref(), 1, &old.encode_legacy(&[0b1001]));
            write(d.as_ref(), 2, &[0u8; 4096]);
        }
    };
    to_first_format();
    let mut report = assemble(&devs, |_| FailureSink::none());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let mut v = report.volumes.remove(0);
    assert!(v.meta.template.legacy && !v.was_clean);
    let b = v.device.member_set().bitmap.clone().expect("the bitmap");
    assert_eq!(b.snapshot()[0], 0b1001, "the first format's bits were read");
    assert_eq!(read(v.device.as_ref(), 100, 512 << 10), data);

    v.meta.record(v.device.as_ref(), false).unwrap();
    let events = v.meta.template.events;
    for d in &devs {
        assert_eq!(
            read(d.as_ref(), 0, 4096),
            vec![0u8; 4096],
            "old superblock erased"
        );
        let raw = read(d.as_ref(), 1, 4096);
        let md = MdSuperblock::decode(&raw, V1_2_OFFSET, 2304 * 8).unwrap();
        assert_eq!(
            (md.events, md.level, md.bitmap_sectors()),
            (events, if level == Level::Raid5 { 5 } else { 1 }, Some(8))
        );
        let area = read(d.as_ref(), 2, 4096);
        let bm = MdBitmap::decode(&area, 8).unwrap();
        assert_eq!(bm.events, events, "the bitmap is as current as md needs");
        assert_eq!(bm.uuid, md.set_uuid);
        assert!(MdBitmap::is_set(&area, 0) && MdBitmap::is_set(&area, 3));
        assert_eq!(bm.dirty(&area), 2);
        let sb = read_superblock(d.as_ref()).unwrap().unwrap();
        assert!(!sb.legacy && sb.bitmap_rows_per_bit == rpb);
    }
    drop(v);
    let mut report = assemble(&devs, |_| FailureSink::none());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let v = report.volumes.remove(0);
    assert!(!v.meta.template.legacy);
    let b = v.device.member_set().bitmap.clone().expect("the bitmap");
    assert_eq!(b.snapshot()[0], 0b1001, "md's bits were read back");
    assert_eq!(read(v.device.as_ref(), 100, 512 << 10), data);
    drop(v);

    // Cut short: only member 0 got md's superblock, and its old one was
    // not erased yet.
    to_first_format();
    let mut sb = read_superblock(devs[0].as_ref()).unwrap().unwrap();
    assert!(sb.legacy);
    sb.events += 1;
    let old = read(devs[0].as_ref(), 0, 4096);
    write_superblock(devs[0].as_ref(), &sb).unwrap();
    write(devs[0].as_ref(), 0, &old);
    let mut report = assemble(&devs, |_| FailureSink::none());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let v = &report.volumes[0];
    assert!(v.stale.is_empty(), "{:?}", v.stale);
    assert!(v
        .device
        .member_states()
        .iter()
        .all(|s| *s == MemberState::InSync));
    assert_eq!(read(v.device.as_ref(), 100, 512 << 10), data);
    // The next record erases the leftover.
    let mut v = report.volumes.remove(0);
    v.meta.record(v.device.as_ref(), true).unwrap();
    for d in &devs {
        assert_eq!(
            read(d.as_ref(), 0, 4096),
            vec![0u8; 4096],
            "leftover erased"
        );
    }
}

/// Devices of RAID formats the appliance does not serve are never taken
/// for blank: md's 0.90 and 1.1 superblocks and the external formats
/// mdadm manages (Intel IMSM, SNIA DDF) are named, and `create` refuses
/// them without force.
#[test]
fn other_raid_formats_are_named_and_never_overwritten_unasked() {
    use appliance::raid::assembly::read_superblock;
    use appliance::raid::superblock::SuperblockError;
    let blocks = 2048 + 256;
    let end = blocks * 4096;
    let cases: [(&str, u64, Vec<u8>); 4] = [
        (
            "0.90",
            (end & !0xffff) - 65536,
            0xa92b_4efcu32.to_le_bytes().to_vec(),
        ),
        ("1.1", 0, 0xa92b_4efcu32.to_le_bytes().to_vec()),
        ("IMSM", end - 1024, b"Intel Raid ISM Cfg Sig. ".to_vec()),
        ("DDF", end - 512, vec![0xde, 0x11, 0xde, 0x11]),
    ];
    for (what, at, bytes) in cases {
        let devs = rams(3);
        let mut block = read(devs[0].as_ref(), at / 4096, 4096);
        let o = (at % 4096) as usize;
        block[o..o + bytes.len()].copy_from_slice(&bytes);
        write(devs[0].as_ref(), at / 4096, &block);
        match read_superblock(devs[0].as_ref()).unwrap() {
            Err(SuperblockError::Md(why)) => assert!(why.contains(what), "{what}: {why}"),
            other => panic!("{what}: {other:?}"),
        }
        match create(
            &spec(devs.clone(), Level::Raid5),
            FailureSink::none(),
            false,
        ) {
            Err(AssemblyError::Holds { device, what: held }) => {
                assert_eq!(device, "m0");
                assert!(held.contains(what), "{held}");
            }
            other => panic!("{what}: created over it: {:?}", other.err()),
        }
        assert!(create(&spec(devs, Level::Raid5), FailureSink::none(), true).is_ok());
    }
}

/// A disk with the appliance's first-format superblock of one volume at 0
/// and md's of another array at 4 KiB: md leaves the first 4 KiB alone,
/// so the disk may have gone to md since; taken as the old volume's
/// member, its next record wrote over the md array's superblock. Which is
/// newer cannot be told: the device is not used, and says why.
#[test]
fn a_first_format_superblock_beside_another_arrays_md_superblock_is_not_taken() {
    use appliance::raid::assembly::read_superblock;
    use appliance::raid::md::superblock::{MdSuperblock, V1_2_OFFSET};
    use appliance::raid::superblock::SuperblockError;
    let devs = raid5_on(3);
    let d = devs[0].as_ref();
    let sb = read_superblock(d).unwrap().unwrap();
    write(d, 0, &sb.encode_legacy());
    let mut md = MdSuperblock::decode(&read(d, 1, 4096), V1_2_OFFSET, 2304 * 8).unwrap();
    md.set_uuid = [0x77; 16];
    md.set_name[..8].copy_from_slice(b"host:new");
    write(d, 1, &md.encode());
    let before = read(d, 1, 4096);
    match read_superblock(d).unwrap() {
        Err(SuperblockError::Md(why)) => assert!(why.contains("cannot be told"), "{why}"),
        other => panic!("taken: {other:?}"),
    }
    let report = assemble(&devs, |_| FailureSink::none());
    assert!(
        report.problems.iter().any(|(n, _)| n == "m0"),
        "{:?}",
        report.problems
    );
    assert_eq!(read(d, 1, 4096), before, "md's superblock written over");
    // Nor one this reader refuses though md would take it (a feature it
    // does not know, its checksum sound): the old volume was taken then
    // (audit).
    md.feature_map |= 1 << 13;
    write(d, 1, &md.encode());
    match read_superblock(d).unwrap() {
        Err(SuperblockError::Md(why)) => assert!(why.contains("cannot be told"), "{why}"),
        other => panic!("taken: {other:?}"),
    }
    // A conversion of the old volume cut short in its md write (its own
    // UUID, the checksum failing) still leaves the first format in charge.
    let mut torn = md.encode();
    torn[16..32].copy_from_slice(&sb.volume_uuid);
    torn[8] ^= 0x55;
    write(d, 1, &torn);
    assert_eq!(
        read_superblock(d).unwrap().map(|s| s.volume_uuid),
        Ok(sb.volume_uuid)
    );
}

/// Members that grew (a file extended, a disk replaced by a larger one)
/// do not grow the volume: it keeps the size its superblocks record, as
/// md keeps its `size`, so nothing is written where md would not look.
#[test]
fn a_volume_keeps_its_recorded_size_when_its_members_grow() {
    use bdev::FileDevice;
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..2).map(|i| dir.path().join(format!("m{i}"))).collect();
    let open = || -> Vec<Arc<dyn BlockDevice>> {
        paths
            .iter()
            .map(|p| Arc::new(FileDevice::open(p, 4096).unwrap()) as Arc<dyn BlockDevice>)
            .collect()
    };
    for p in &paths {
        FileDevice::create(p, 4096, 8 << 20).unwrap();
    }
    let (dev, _) = create(&spec(open(), Level::Raid1), FailureSink::none(), false).unwrap();
    let blocks = dev.info().num_blocks;
    drop(dev);
    for p in &paths {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
    }
    let report = assemble(&open(), |_| FailureSink::none());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.volumes[0].device.info().num_blocks, blocks);
}

/// A member whose bitmap block is still another array's (a device that
/// joined before its first bitmap write) keeps a usable superblock: the
/// block is an unreadable bitmap, not a reason to refuse the member.
#[test]
fn another_arrays_bitmap_block_does_not_refuse_the_member() {
    use appliance::raid::assembly::read_superblock;
    use appliance::raid::bitmap::Bitmap;
    let devs = rams(3);
    let mut s = spec(devs.clone(), Level::Raid5);
    s.bitmap_chunk_bytes = 256 << 10;
    let (dev, _) = create(&s, FailureSink::none(), false).unwrap();
    let rows = dev.rows();
    drop(dev);
    let other = Bitmap::new(&rows, 4, [0x5a; 16]).unwrap();
    other.set_events(99);
    write(devs[1].as_ref(), 2, &other.encode(&[0b1]));
    let sb = read_superblock(devs[1].as_ref()).unwrap();
    assert!(sb.is_ok_and(|sb| sb.bitmap_rows_per_bit > 0));
    let report = assemble(&devs, |_| FailureSink::none());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.volumes.len(), 1);
}
