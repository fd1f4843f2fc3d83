//! Rebuild and scrub rate limits (md's sync_speed_max and sync_speed_min):
//! a rebuild yields to guest IO down to the minimum and runs at full speed
//! once the IO stops; a scrub keeps under the maximum. The limits are
//! token buckets holding at most 50 ms of the rate (or a row), so "at most
//! rate x time, plus that, plus the row started when timing began" holds
//! exactly.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use appliance::raid::assembly::{self, VolumeSpec};
use appliance::raid::members::FailureSink;
use appliance::raid::monitor::Monitor;
use appliance::raid::rebuild::RebuildProgress;
use appliance::raid::superblock::Level;
use appliance::volume::Volume;
use appliance::workload::{Workload, WorkloadParams};
use bdev::{BlockDevice, RamDevice};
use poller::{ReactorConfig, Reactors};

const MEMBER_MIB: u64 = 128;
const ROW: u64 = 64 << 10;

fn ram(name: &str) -> Arc<dyn BlockDevice> {
    Arc::new(RamDevice::new(name, 4096, 256 + (MEMBER_MIB << 20) / 4096).unwrap())
}

/// Bytes done in the next `secs`, and the seconds it really was. Counted
/// from now, not from the start: the job may have begun before the call
/// that started it returned (it runs once the change is published, and the
/// call still records it).
fn done_within(p: &RebuildProgress, secs: f64) -> (u64, f64) {
    let before = p.bytes.load(Ordering::SeqCst);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let bytes = p.bytes.load(Ordering::SeqCst) - before;
    (bytes, t0.elapsed().as_secs_f64())
}

#[test]
fn a_rebuild_yields_to_guest_io_down_to_the_minimum_and_a_scrub_keeps_under_the_maximum() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let devs: Vec<Arc<dyn BlockDevice>> = (0..4).map(|i| ram(&format!("m{i}"))).collect();
    let spec = VolumeSpec {
        chunk_bytes: ROW as u32,
        ..VolumeSpec::new("rate", Level::Raid5, devs)
    };
    let (tx, rx) = mpsc::channel();
    let (dev, meta) = assembly::create(&spec, FailureSink::new(tx), false).unwrap();
    let volume = Volume::new(reactors.set(), "rate", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![ram("s0")]);
    monitor.set_meta(meta);
    monitor.open(true).unwrap();

    // Guest IO runs: the rebuild goes at the minimum (no maximum set).
    let min = 2u64 << 20;
    monitor.set_rate(min, 0).unwrap();
    let w = Workload::start_on_volume(
        reactors.set(),
        &volume,
        WorkloadParams {
            queue_depth: 8,
            ..Default::default()
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    monitor.fail_member("m1").unwrap();
    let p = monitor.rebuild().expect("the spare is rebuilt");
    let (bytes, secs) = done_within(&p, 1.0);
    eprintln!("under guest IO: {bytes} bytes in {secs:.2} s (minimum {min} B/s)");
    assert!(bytes > 0, "it still progresses");
    assert!(
        bytes as f64 <= min as f64 * (secs + 0.05) + 2.0 * ROW as f64,
        "{bytes} bytes in {secs:.2} s is above the minimum it yields to"
    );
    let totals = w.stop(Duration::from_secs(30)).unwrap();
    assert!(totals.clean(), "{totals:?}");

    // No guest IO: full speed. At the minimum the rest would take a minute.
    let t = Instant::now();
    while !monitor.snapshot().settled() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the rebuild did not speed up once the IO stopped ({} of {} rows)",
            p.cursor.load(Ordering::SeqCst),
            p.total
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(p.error(), None);

    // A scrub under the maximum, IO or not.
    let max = 4u64 << 20;
    monitor.set_rate(0, max).unwrap();
    let s = monitor.scrub(false).unwrap();
    let (bytes, secs) = done_within(&s, 1.0);
    eprintln!("scrub: {bytes} bytes in {secs:.2} s (maximum {max} B/s)");
    assert!(bytes > 0);
    assert!(
        bytes as f64 <= max as f64 * (secs + 0.05) + 2.0 * ROW as f64,
        "{bytes} bytes in {secs:.2} s is above the maximum"
    );
    s.cancel.store(true, Ordering::SeqCst);
    while !s.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    monitor.close().unwrap();
    reactors.shutdown().unwrap();
}
