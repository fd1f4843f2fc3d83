//! md's re-add from the bitmap on a mirror, and when it must not be used:
//! a member that failed while in sync comes back with only the marked
//! rows copied; one that failed during its own rebuild, or one whose
//! bitmap was made after it failed, is rebuilt in full.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appliance::config::{DeviceDecl, ExportDecl, VolumeDecl};
use appliance::manager::{Manager, VolumeView};
use bdev::{FaultControl, FaultDevice};
use common::Disk;
use poller::{ReactorConfig, Reactors};

const LONG: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

struct Rig {
    mgr: Manager,
    disk: Disk,
    fault: Arc<FaultControl>,
    _dir: tempfile::TempDir,
    _reactors: Reactors,
}

/// A RAID1 "m" over RAM devices a and b (b behind a fault injector),
/// with a 1 MiB-region bitmap if `bitmap`, exported to a blkio client.
fn rig(bitmap: bool) -> Rig {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let mgr = Manager::new(reactors.set(), None);
    let fault: Arc<Mutex<Option<Arc<FaultControl>>>> = Arc::default();
    let f = fault.clone();
    mgr.set_device_wrapper(Arc::new(move |dev| {
        if dev.info().name == "b" {
            let d = Arc::new(FaultDevice::new(dev));
            *f.lock().unwrap() = Some(d.control());
            d
        } else {
            dev
        }
    }));
    for d in ["a", "b"] {
        mgr.attach_device(DeviceDecl {
            name: d.into(),
            spec: "ram:64M".into(),
            block_size: 4096,
        })
        .unwrap();
    }
    let mut decl = VolumeDecl::new("m", "raid1", &["a", "b"]);
    decl.bitmap = bitmap;
    decl.bitmap_chunk_kib = 1024;
    mgr.create_volume(decl, false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    mgr.create_export(ExportDecl {
        name: "m".into(),
        volume: "m".into(),
        socket: sock.clone(),
        num_queues: 1,
        ..Default::default()
    })
    .unwrap();
    let disk = Disk::connect(&sock).unwrap();
    let fault = fault.lock().unwrap().clone().unwrap();
    Rig {
        mgr,
        disk,
        fault,
        _dir: dir,
        _reactors: reactors,
    }
}

impl Rig {
    fn write(&mut self, mib: u64, fill: u8) {
        self.disk.buf()[..65536].fill(fill);
        assert_eq!(self.disk.write(mib * MIB, 65536), 0);
    }

    /// Regions 0..16 written with `base + i`; what each holds.
    fn fill(&mut self, base: u8) -> Vec<u8> {
        (0..16u8)
            .map(|i| {
                self.write(i as u64, base + i);
                base + i
            })
            .collect()
    }

    fn wait_clean_bitmap(&self) {
        let t = Instant::now();
        while self
            .mgr
            .get_volume("m")
            .unwrap()
            .bitmap
            .is_some_and(|b| b.2 > 0)
        {
            assert!(t.elapsed() < LONG, "the bitmap never cleared");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Add b back and wait until the mirror is whole; what it copied.
    fn readd(&mut self) -> VolumeView {
        self.mgr.add_spare("m", "b", false).unwrap();
        let t = Instant::now();
        loop {
            let v = self.mgr.get_volume("m").unwrap();
            if v.state == "optimal" {
                return v;
            }
            assert!(t.elapsed() < LONG, "never in sync: {v:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Add b back, expect every row copied, and check b.
    fn readd_in_full(&mut self, want: &[u8]) {
        let v = self.readd();
        let size = v.size_bytes;
        assert!(
            copied(&v) >= size,
            "a full rebuild: {} of {size} bytes",
            copied(&v)
        );
        self.check_b(want);
    }

    /// Every region reads `want` from b alone (a failed, so reads go to b).
    fn check_b(&mut self, want: &[u8]) {
        self.mgr.fail_member("m", "a").unwrap();
        for (r, &w) in want.iter().enumerate() {
            assert_eq!(self.disk.read(r as u64 * MIB, 65536), 0);
            assert!(
                self.disk.buf()[..65536].iter().all(|&x| x == w),
                "region {r} on b"
            );
        }
    }
}

fn copied(v: &VolumeView) -> u64 {
    v.progress.as_ref().map_or(0, |p| p.bytes)
}

#[test]
fn a_member_that_failed_in_sync_is_resynchronised_from_the_bitmap() {
    let mut r = rig(true);
    let mut want = r.fill(0x10);
    r.wait_clean_bitmap();
    r.mgr.fail_member("m", "b").unwrap();
    for i in [3usize, 9] {
        want[i] = 0xc0 + i as u8;
        r.write(i as u64, want[i]);
    }
    let v = r.readd();
    assert_eq!(copied(&v), 2 * MIB, "only the two marked regions: {v:?}");
    r.check_b(&want);
}

#[test]
fn a_member_that_failed_during_its_own_rebuild_is_rebuilt_in_full() {
    let mut r = rig(true);
    let mut want = r.fill(0x20);
    r.wait_clean_bitmap();
    r.mgr.fail_member("m", "b").unwrap();
    want[5] = 0xd5;
    r.write(5, want[5]);
    // The re-add's copy fails on b (its writes refused everywhere): b
    // fails again, mid-rebuild.
    r.fault.fail_writes(0, u64::MAX);
    r.mgr.add_spare("m", "b", false).unwrap();
    let t = Instant::now();
    while r.mgr.get_volume("m").unwrap().members[1].1 != "failed" {
        assert!(t.elapsed() < LONG, "b never failed during its rebuild");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Back again: nothing says which rows it has, so all are copied.
    r.fault.heal();
    want[12] = 0xdc;
    r.write(12, want[12]);
    r.readd_in_full(&want);
}

#[test]
fn a_bitmap_made_after_the_failure_does_not_shorten_the_rebuild() {
    let mut r = rig(false);
    let mut want = r.fill(0x30);
    r.mgr.fail_member("m", "b").unwrap();
    // Written while degraded and before any bitmap: marked nowhere.
    want[6] = 0xe6;
    r.write(6, want[6]);
    r.mgr.set_bitmap("m", true, 1024).unwrap();
    r.readd_in_full(&want);
}

/// From an audit: a member dead but unnoticed (nothing touched it while
/// the volume was idle) failed its write of a bitmap being turned on. It
/// is failed and the bitmap goes on the others, as md does; but its
/// failure, recorded in the generation with the bitmap, made it
/// re-addable from a bitmap whose starting point it never had: anything
/// it lost before was marked nowhere. It is rebuilt in full.
#[test]
fn a_member_that_cannot_take_a_new_bitmap_is_rebuilt_in_full() {
    let mut r = rig(false);
    let mut want = r.fill(0x40);
    r.fault.fail_writes(0, u64::MAX);
    r.mgr.set_bitmap("m", true, 1024).unwrap();
    let t = Instant::now();
    while r.mgr.get_volume("m").unwrap().members[1].1 != "failed" {
        assert!(t.elapsed() < LONG, "b was never failed");
        std::thread::sleep(Duration::from_millis(10));
    }
    r.fault.heal();
    want[7] = 0xf7;
    r.write(7, want[7]);
    r.readd_in_full(&want);
}
