//! A guest's flush through a RAID volume fails only when the volume has
//! lost data: a member that fails its flush is failed, and what was
//! acknowledged is on the other members, flushed. An error there made
//! guests abort (or remount read-only) a filesystem over a failure the
//! volume survives.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use appliance::raid::geometry::Layout;
use appliance::raid::members::{FailureSink, Member, MemberState};
use appliance::raid::monitor::Monitor;
use appliance::raid::raid5::Raid5Device;
use appliance::volume::Volume;
use bdev::{BlockDevice, FaultDevice, IoOp, RamDevice};
use poller::{ReactorConfig, Reactors};

const LONG: Duration = Duration::from_secs(30);

/// A RAID5 in 16 KiB chunks of `n` 4 MiB RAM members, each behind a fault
/// injector.
fn raid5_of_faults(n: usize, failures: FailureSink) -> (Vec<Arc<FaultDevice>>, Raid5Device) {
    let faults: Vec<Arc<FaultDevice>> = (0..n)
        .map(|i| {
            let ram: Arc<dyn BlockDevice> =
                Arc::new(RamDevice::new(&format!("m{i}"), 4096, 1024).unwrap());
            Arc::new(FaultDevice::new(ram))
        })
        .collect();
    let members = faults
        .iter()
        .map(|f| Member::new(f.clone() as Arc<dyn BlockDevice>, MemberState::InSync))
        .collect();
    let dev = Raid5Device::new("r5", members, 16384, Layout::LeftSymmetric, 0, failures).unwrap();
    (faults, dev)
}

#[test]
fn a_raid5_flush_survives_one_member_failing_it() {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let (faults, dev) = raid5_of_faults(4, FailureSink::new(tx));
    let dev = Arc::new(dev);
    let volume = Volume::new(reactors.set(), "r5", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    let block = vec![0x5au8; 4096];
    volume.io(IoOp::Write, 7, block.clone(), LONG).unwrap();
    // The first IO the dying member sees is the flush.
    faults[2].control().pull();
    volume
        .io(IoOp::Flush, 0, Vec::new(), LONG)
        .expect("one member failing its flush loses nothing");
    // Recorded by the monitor, after the flush's answer.
    let t = std::time::Instant::now();
    while monitor.member_states()[2] != MemberState::Failed {
        assert!(t.elapsed() < LONG, "the failure was never recorded");
        std::thread::sleep(Duration::from_millis(5));
    }
    volume.io(IoOp::Flush, 0, Vec::new(), LONG).unwrap();
    assert_eq!(
        volume.io(IoOp::Read, 7, vec![0u8; 4096], LONG).unwrap(),
        block
    );
    // A second member gone: data is lost, and the flush says so.
    faults[0].control().pull();
    assert!(volume.io(IoOp::Flush, 0, Vec::new(), LONG).is_err());
    reactors.shutdown().unwrap();
}

/// A journal's checkpointer flushes the volume through
/// `Volume::flush_helping_drain`, often. Each flush opened a channel of
/// its own, and so one to every member: on NVMe a queue pair made and
/// deleted by admin commands on the reactor each time, and each open
/// could be refused. The channel is now kept on its core for the
/// generation, and dropped when the core sees a suspend (a change may
/// need its queue pairs) or the removal.
#[test]
fn the_volumes_own_flushes_keep_one_channel_until_a_suspend() {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let (tx, _rx) = mpsc::channel();
    let (faults, dev) = raid5_of_faults(3, FailureSink::new(tx));
    let volume = Volume::new(reactors.set(), "r5", Arc::new(dev));
    let c = faults[1].control();
    for _ in 0..10 {
        volume.flush_helping_drain(LONG).unwrap();
    }
    volume.io(IoOp::Write, 3, vec![0x11; 4096], LONG).unwrap();
    assert_eq!(c.opened(), 1, "one channel served every request");
    assert_eq!(c.open_channels(), 1, "kept open between them");
    // A suspend drops it before the core acknowledges.
    let guard = volume.quiesce().suspend(LONG).unwrap();
    assert_eq!(c.open_channels(), 0, "held through a suspend");
    drop(guard);
    volume.flush_helping_drain(LONG).unwrap();
    assert_eq!((c.opened(), c.open_channels()), (2, 1));
    // And so does the removal, once the core sees it.
    volume.quiesce().remove(LONG).unwrap();
    let t = std::time::Instant::now();
    while c.open_channels() > 0 {
        assert!(t.elapsed() < LONG, "a removed volume's channel stays open");
        // Any message makes the reactor look at its gates.
        reactors.set().call(0, LONG, |_| ()).unwrap();
    }
    reactors.shutdown().unwrap();
}

/// From review: a volume's own request (a journal checkpoint's flush, a
/// control call's IO) whose new channel took nothing yet (Busy: a new
/// NVMe channel's queue still being made, a member's queue made again)
/// failed at once with "the volume's queue is full". It waits for the
/// channel, as guest IO does.
#[test]
fn a_volumes_own_request_waits_for_a_busy_new_channel() {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let ram: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("d", 4096, 1024).unwrap());
    let fault = Arc::new(FaultDevice::new(ram));
    let c = fault.control();
    let volume = Volume::new(reactors.set(), "v", fault.clone());
    c.busy(true);
    let writer = {
        let volume = volume.clone();
        std::thread::spawn(move || volume.io(IoOp::Write, 5, vec![0x5a; 4096], LONG))
    };
    let t = std::time::Instant::now();
    while c.busy_refusals() == 0 {
        assert!(t.elapsed() < LONG, "the write never reached the device");
        std::thread::yield_now();
    }
    c.busy(false);
    writer
        .join()
        .unwrap()
        .expect("the write, once the channel takes it");
    let got = volume.io(IoOp::Read, 5, vec![0; 4096], LONG).unwrap();
    assert!(got.iter().all(|&b| b == 0x5a));
    reactors.shutdown().unwrap();
}
