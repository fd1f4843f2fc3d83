//! A member change that cannot quiesce the volume in time (a write is
//! stuck on a slow member) is refused with DeadlineExceeded and leaves the
//! volume as it was; once the write completes the same change goes through.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::config::{DeviceDecl, ExportDecl, VolumeDecl};
use appliance::manager::{Manager, MgmtError};
use bdev::FaultDevice;
use poller::{ReactorConfig, Reactors};

#[test]
fn a_member_change_that_cannot_quiesce_in_time_is_deadline_exceeded_and_changes_nothing() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let mgr = Arc::new(Manager::new(reactors.set(), None));
    let mut faults: Vec<Arc<FaultDevice>> = Vec::new();
    for i in 0..3 {
        let decl = DeviceDecl {
            name: format!("d{i}"),
            spec: "ram:16M".into(),
            block_size: 4096,
        };
        mgr.attach_device_wrapped(decl, |d| {
            let f = Arc::new(FaultDevice::new(d));
            faults.push(f.clone());
            f
        })
        .unwrap();
    }
    mgr.create_volume(VolumeDecl::new("v", "raid5", &["d0", "d1", "d2"]), true)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("v.sock");
    mgr.create_export(ExportDecl {
        name: "v".into(),
        volume: "v".into(),
        socket: sock.clone(),
        num_queues: 1,
        read_only: false,
        serial: "deadline".into(),
        queue_cores: vec![],
        ..Default::default()
    })
    .unwrap();
    // Every member answers 40 s late: a write now stays in flight past the
    // 30 s quiesce deadline.
    for f in &faults {
        f.control().set_latency(Duration::from_secs(40));
    }
    let writer = std::thread::spawn(move || {
        let mut disk = common::Disk::connect(&sock).unwrap();
        disk.buf()[..4096].fill(0x5a);
        disk.write_up_to(0, 4096, Duration::from_secs(120))
    });
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let r = mgr.fail_member("v", "d1");
    assert!(matches!(r, Err(MgmtError::DeadlineExceeded(_))), "{r:?}");
    assert!(
        t.elapsed() >= Duration::from_secs(25),
        "it waited for the deadline"
    );
    let v = mgr.get_volume("v").unwrap();
    assert!(
        v.members.iter().all(|m| m.1 == "in_sync"),
        "nothing changed: {:?}",
        v.members
    );
    for f in &faults {
        f.control().set_latency(Duration::ZERO);
    }
    assert_eq!(
        writer.join().unwrap(),
        0,
        "the stuck write completes without error"
    );
    mgr.fail_member("v", "d1")
        .expect("with nothing in flight the change goes through");
    let v = mgr.get_volume("v").unwrap();
    assert_eq!(v.members.iter().filter(|m| m.1 == "in_sync").count(), 2);
    mgr.shutdown_without_saving();
    let _ = reactors.shutdown();
}
