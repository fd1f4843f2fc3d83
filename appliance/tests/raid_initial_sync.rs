//! A new RAID volume on members that held old data (files of an earlier
//! use, disks overwritten with force) started "optimal" with parity that
//! did not match: a small write's read-modify-write carried the wrong
//! parity forward, and once a member failed, blocks the guest wrote were
//! rebuilt from it as garbage. As mdadm --create does, such a volume is
//! synchronised first (in the background, IO allowed); members known to
//! hold only zeros (RAM, files the attach made) need nothing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use appliance::config::{DeviceDecl, ExportDecl, VolumeDecl};
use appliance::manager::Manager;
use common::Disk;
use poller::{ReactorConfig, Reactors};

const MIB: u64 = 1 << 20;

/// A manager saving to `state` (if any), started from it if it exists.
fn manager_on(state: Option<&Path>) -> (Manager, Reactors) {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let mgr = Manager::new(reactors.set(), state.map(Path::to_path_buf));
    if let Some(state) = state.filter(|s| s.exists()) {
        let c = appliance::config::Config::load(state).unwrap();
        mgr.restore(&c, false).unwrap();
    }
    (mgr, reactors)
}

fn manager() -> (Manager, Reactors) {
    manager_on(None)
}

fn stop((mgr, reactors): (Manager, Reactors)) {
    mgr.shutdown();
    drop(mgr);
    let _ = reactors.shutdown();
}

/// Attach `names` as files in `dir`: filled with random bytes first (old
/// data) or made by the attach.
fn attach(mgr: &Manager, dir: &Path, names: &[&str], old_data: bool) {
    for n in names {
        let path = dir.join(n);
        let spec = if old_data {
            std::fs::write(&path, common::random((16 * MIB) as usize)).unwrap();
            format!("file:{}", path.display())
        } else {
            format!("file:{}:16M", path.display())
        };
        mgr.attach_device(DeviceDecl {
            name: n.to_string(),
            spec,
            block_size: 4096,
        })
        .unwrap();
    }
}

/// Wait until `volume` runs no background work; its last work's
/// mismatch count, if any ran.
fn settle(mgr: &Manager, volume: &str) -> Option<u64> {
    let t = Instant::now();
    loop {
        let v = mgr.get_volume(volume).unwrap();
        match &v.progress {
            Some(p) if !p.finished => {}
            p => return p.as_ref().map(|p| p.mismatches),
        }
        assert!(t.elapsed() < Duration::from_secs(300), "{v:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_raid5_on_members_with_old_data_is_synchronised_and_survives_a_member_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (mgr, reactors) = manager();
    let members = ["x0", "x1", "x2", "x3", "x4"];
    attach(&mgr, dir.path(), &members, true);
    mgr.create_volume(VolumeDecl::new("v", "raid5", &members), false)
        .unwrap();
    // The initial sync found the old data's parity wrong.
    assert!(settle(&mgr, "v").is_some_and(|m| m > 0));
    // A check now finds nothing.
    mgr.start_scrub("v", false).unwrap();
    assert_eq!(settle(&mgr, "v"), Some(0));

    let sock = dir.path().join("v.sock");
    mgr.create_export(ExportDecl {
        name: "e".into(),
        volume: "v".into(),
        socket: sock.clone(),
        ..Default::default()
    })
    .unwrap();
    let mut disk = Disk::connect(&sock).unwrap();
    // 4 KiB writes (read-modify-write with five members) in every chunk
    // of the first stripes, so each member holds some.
    let offsets: Vec<u64> = (0..32u64).map(|i| i * (64 << 10) + 4096).collect();
    for &off in &offsets {
        disk.buf()[..4096].copy_from_slice(&common::pattern(off, off, 4096));
        assert_eq!(disk.write(off, 4096), 0);
    }
    mgr.fail_member("v", "x1").unwrap();
    for &off in &offsets {
        assert_eq!(disk.read(off, 4096), 0);
        assert!(
            disk.buf()[..4096] == common::pattern(off, off, 4096)[..],
            "data at {off} lost after a member failed"
        );
    }
    drop(disk);
    stop((mgr, reactors));
}

#[test]
fn volumes_on_members_known_to_hold_only_zeros_start_without_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (mgr, reactors) = manager();
    attach(&mgr, dir.path(), &["a", "b", "c"], false);
    // A create refused after the devices were claimed wrote nothing of
    // them: the next one needs no sync either.
    let mut refused = VolumeDecl::new("v", "raid5", &["a", "b", "c"]);
    refused.journal_mode = "write-back".into();
    assert!(mgr.create_volume(refused, false).is_err());
    mgr.create_volume(VolumeDecl::new("v", "raid5", &["a", "b", "c"]), false)
        .unwrap();
    assert!(mgr.get_volume("v").unwrap().progress.is_none());
    // Once used, they hold data: a volume made on them again is synced.
    mgr.delete_volume("v").unwrap();
    mgr.create_volume(VolumeDecl::new("w", "raid1", &["a", "b", "c"]), true)
        .unwrap();
    assert!(settle(&mgr, "w").is_some());
    stop((mgr, reactors));
}

/// With a write-intent bitmap the sync is driven by it: every region
/// marked at the creation, so a restart before the sync ends goes on
/// with what is left instead of taking the volume for clean.
#[test]
fn a_bitmap_volume_on_old_data_is_synchronised_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.toml");
    let (mgr, reactors) = manager_on(Some(&state));
    let members = ["x0", "x1", "x2"];
    attach(&mgr, dir.path(), &members, true);
    let mut decl = VolumeDecl::new("v", "raid5", &members);
    decl.bitmap = true;
    // Slow enough that the stop below cuts the sync short.
    decl.max_rebuild_bytes_per_sec = 1 << 20;
    decl.min_rebuild_bytes_per_sec = 1 << 20;
    mgr.create_volume(decl, false).unwrap();
    let (_, regions, dirty) = mgr.get_volume("v").unwrap().bitmap.unwrap();
    assert_eq!(dirty, regions, "every region owed the sync");
    stop((mgr, reactors));

    let (mgr, reactors) = manager_on(Some(&state));
    mgr.set_rebuild_rate("v", 0, 0).unwrap();
    assert!(settle(&mgr, "v").is_some_and(|m| m > 0));
    mgr.start_scrub("v", false).unwrap();
    assert_eq!(settle(&mgr, "v"), Some(0));
    stop((mgr, reactors));
}

/// RAM devices start blank at every start: their volumes are made again
/// from the state file, with no sync.
#[test]
fn a_ram_volume_restarts_without_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.toml");
    for round in 0..2 {
        let (mgr, reactors) = manager_on(Some(&state));
        if round == 0 {
            for n in ["a", "b", "c"] {
                mgr.attach_device(DeviceDecl {
                    name: n.into(),
                    spec: "ram:16M".into(),
                    block_size: 4096,
                })
                .unwrap();
            }
            mgr.create_volume(VolumeDecl::new("v", "raid5", &["a", "b", "c"]), false)
                .unwrap();
        }
        assert!(mgr.get_volume("v").unwrap().progress.is_none(), "{round}");
        stop((mgr, reactors));
    }
}

/// From review: the initial sync stopped by the operator and a repair
/// run instead left the bitmap frozen with every region marked (only a
/// resync driven by the bitmap thawed it): a crash resynced everything
/// until a clean restart. A whole repair that succeeds thaws it.
#[test]
fn a_repair_that_takes_over_a_stopped_initial_sync_lets_the_bitmap_clear() {
    let dir = tempfile::tempdir().unwrap();
    let (mgr, reactors) = manager();
    let members = ["x0", "x1", "x2"];
    attach(&mgr, dir.path(), &members, true);
    let mut decl = VolumeDecl::new("v", "raid5", &members);
    decl.bitmap = true;
    decl.max_rebuild_bytes_per_sec = 1 << 20;
    decl.min_rebuild_bytes_per_sec = 1 << 20;
    mgr.create_volume(decl, false).unwrap();
    mgr.stop_background("v").unwrap();
    settle(&mgr, "v");
    mgr.set_rebuild_rate("v", 0, 0).unwrap();
    mgr.start_scrub("v", true).unwrap();
    assert!(settle(&mgr, "v").is_some_and(|m| m > 0));
    // The bitmap daemon clears idle regions every few seconds, once let.
    let t = Instant::now();
    while mgr.get_volume("v").unwrap().bitmap.unwrap().2 > 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "the bits stay set");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop((mgr, reactors));
}
