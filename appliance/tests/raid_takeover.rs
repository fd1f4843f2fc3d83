//! Takeover between a RAID1 of two and a RAID5 of two (md's level change),
//! online: verified IO runs on both reactors while the level switches back
//! and forth through the quiesce epoch; each level's check scrub finds the
//! members consistent; a restart assembles the last level; and a RAID5 of
//! two serves degraded like any RAID5.

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
use bdev::{BlockDevice, RamDevice};
use poller::{ReactorConfig, Reactors};

fn rams(n: usize) -> Vec<Arc<dyn BlockDevice>> {
    (0..n)
        .map(|i| {
            Arc::new(RamDevice::new(&format!("m{i}"), 4096, 256 + 4096).unwrap())
                as Arc<dyn BlockDevice>
        })
        .collect()
}

fn spec(members: Vec<Arc<dyn BlockDevice>>, level: Level) -> VolumeSpec {
    VolumeSpec::new("t", level, members)
}

fn wait(p: &RebuildProgress) -> u64 {
    let t = Instant::now();
    while !p.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(30), "scrub stuck");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(p.error(), None);
    p.mismatches.load(Ordering::SeqCst)
}

fn verified_io(reactors: &Reactors, volume: &Volume) -> Workload {
    Workload::start_on_volume(
        reactors.set(),
        volume,
        WorkloadParams {
            queue_depth: 16,
            io_bytes: 16384,
            read_percent: 50,
            verify: true,
            span_bytes: 0,
        },
    )
    .unwrap()
}

#[test]
fn a_mirror_of_two_becomes_a_raid5_and_back_under_verified_io() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let devs = rams(2);
    let (tx, rx) = mpsc::channel();
    let (dev, meta) = assembly::create(
        &spec(devs.clone(), Level::Raid1),
        FailureSink::new(tx),
        false,
    )
    .unwrap();
    let blocks = dev.info().num_blocks;
    let volume = Volume::new(reactors.set(), "t", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    monitor.set_meta(meta);
    monitor.open(true).unwrap();
    let e = monitor.takeover(Level::Raid1, 65536).unwrap_err();
    assert!(matches!(e, OpError::FailedPrecondition(_)), "{e:?}");

    let w = verified_io(&reactors, &volume);
    let generation = volume.quiesce().config().0;
    for (i, to) in [Level::Raid5, Level::Raid1, Level::Raid5]
        .into_iter()
        .enumerate()
    {
        std::thread::sleep(Duration::from_millis(150));
        monitor.takeover(to, 65536 >> i).unwrap();
        assert_eq!(volume.info().num_blocks, blocks, "same size as {to:?}");
        assert_eq!(
            volume.info().optimal_io_boundary,
            if to == Level::Raid5 { 16 >> i } else { 0 },
            "the device of the new level serves"
        );
    }
    std::thread::sleep(Duration::from_millis(150));
    let totals = w.stop(Duration::from_secs(30)).unwrap();
    assert!(totals.clean(), "{totals:?}");
    assert!(totals.reads_verified > 100, "{totals:?}");
    assert!(volume.quiesce().config().0 >= generation + 3);
    // RAID5 of two: every row's parity is the copy of its data.
    assert_eq!(wait(&monitor.scrub(false).unwrap()), 0);
    monitor.close().unwrap();
    drop(monitor);
    drop(volume);

    // The superblocks say RAID5 now; the data is still there.
    let mut report = assembly::assemble(&devs, |_| FailureSink::none());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let v = report.volumes.remove(0);
    assert!(v.was_clean);
    assert_eq!(v.meta.template.level, Level::Raid5);
    assert_eq!(v.meta.template.chunk_bytes, 16384);
    assert!(v.device.parity_geometry().is_some());
    let (tx, rx) = mpsc::channel();
    drop(tx);
    let volume = Volume::new(reactors.set(), "t", v.device.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), v.device.clone(), rx, vec![]);
    monitor.set_meta(v.meta);
    monitor.open(true).unwrap();
    monitor.takeover(Level::Raid1, 65536).unwrap();
    // As a mirror: both members equal.
    assert_eq!(wait(&monitor.scrub(false).unwrap()), 0);
    monitor.close().unwrap();
    reactors.shutdown().unwrap();
}

#[test]
fn a_raid5_of_two_serves_degraded_and_takeover_refuses_what_it_cannot_do() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    // Three members: md reshapes before a takeover; so do we (not built).
    let (tx, rx) = mpsc::channel();
    let (dev, meta) =
        assembly::create(&spec(rams(3), Level::Raid5), FailureSink::new(tx), false).unwrap();
    let volume = Volume::new(reactors.set(), "t", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume, dev, rx, vec![]);
    monitor.set_meta(meta);
    monitor.open(true).unwrap();
    let e = monitor.takeover(Level::Raid1, 65536).unwrap_err();
    assert!(
        matches!(&e, OpError::FailedPrecondition(m) if m.contains("exactly two")),
        "{e:?}"
    );
    monitor.close().unwrap();
    drop(monitor);

    // A mirror whose size is not a multiple of the chunk: refused, since
    // the volume would shrink under its users.
    let odd: Vec<Arc<dyn BlockDevice>> = (0..2)
        .map(|i| {
            Arc::new(RamDevice::new(&format!("o{i}"), 4096, 256 + 4096 + 3).unwrap())
                as Arc<dyn BlockDevice>
        })
        .collect();
    let (tx, rx) = mpsc::channel();
    let (dev, meta) =
        assembly::create(&spec(odd, Level::Raid1), FailureSink::new(tx), false).unwrap();
    let volume = Volume::new(reactors.set(), "t", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    monitor.set_meta(meta);
    monitor.open(true).unwrap();
    let e = monitor.takeover(Level::Raid5, 65536).unwrap_err();
    assert!(
        matches!(&e, OpError::FailedPrecondition(m) if m.contains("multiple of the chunk")),
        "{e:?}"
    );
    assert_eq!(volume.info().optimal_io_boundary, 0, "still the mirror");
    monitor.close().unwrap();
    drop(monitor);

    let devs = rams(2);
    let (tx, rx) = mpsc::channel();
    let (dev, meta) = assembly::create(
        &spec(devs.clone(), Level::Raid1),
        FailureSink::new(tx),
        false,
    )
    .unwrap();
    let volume = Volume::new(reactors.set(), "t", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    monitor.set_meta(meta);
    monitor.open(true).unwrap();
    monitor.set_bitmap(Some(1 << 20)).unwrap();
    let e = monitor.takeover(Level::Raid5, 65536).unwrap_err();
    assert!(
        matches!(&e, OpError::FailedPrecondition(m) if m.contains("bitmap")),
        "{e:?}"
    );
    monitor.set_bitmap(None).unwrap();
    monitor.takeover(Level::Raid5, 65536).unwrap();

    let w = verified_io(&reactors, &volume);
    std::thread::sleep(Duration::from_millis(100));
    monitor.fail_member("m1").unwrap();
    assert_eq!(
        monitor.member_states(),
        vec![MemberState::InSync, MemberState::Failed]
    );
    let e = monitor.takeover(Level::Raid1, 65536).unwrap_err();
    assert!(
        matches!(&e, OpError::FailedPrecondition(m) if m.contains("in sync")),
        "{e:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let totals = w.stop(Duration::from_secs(30)).unwrap();
    assert!(totals.clean(), "a RAID5 of two serves degraded: {totals:?}");
    monitor.close().unwrap();
    reactors.shutdown().unwrap();
}
