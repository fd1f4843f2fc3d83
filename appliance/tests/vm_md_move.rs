//! Arrays move between Linux md and the appliance with no copy and no
//! option beyond naming the members: md makes RAID5 arrays (all four
//! layouts, 16K and 64K chunks, with and without a bitmap) and a RAID1
//! with a write-mostly member, one with a spare and a degraded one; the appliance assembles them from md's own
//! superblocks, reads md's data, writes its own and stops; md assembles
//! them again with plain `mdadm --assemble`, finds everything, and its
//! check finds no mismatch. The same for a RAID5 the appliance creates.
//! Then the appliance reads what md wrote last.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::raid::assembly::{assemble, create, write_spare_superblocks, Assembled, VolumeSpec};
use appliance::raid::bitmap::BitmapDaemon;
use appliance::raid::members::{FailureSink, MemberState};
use appliance::raid::superblock::Level;
use bdev::conformance::{run_one, rw};
use bdev::{BlockDevice, FileDevice, IoOp, IoRequest};

mod common;
use common::{blank_disks, boot, guest, random, run_with_disks};

const DISK_BYTES: u64 = 64 << 20;
const P: usize = 8 << 20;
const BS: u64 = 4096;

fn open(paths: &[PathBuf]) -> Vec<Arc<dyn BlockDevice>> {
    paths
        .iter()
        .map(|p| Arc::new(FileDevice::open(p, BS as u32).unwrap()) as Arc<dyn BlockDevice>)
        .collect()
}

fn io(dev: &dyn BlockDevice, op: IoOp, at: u64, buf: &mut [u8]) {
    let mut ch = dev.open_channel().unwrap();
    let n = buf.len() as u64 / BS;
    run_one(ch.as_mut(), rw(op, at / BS, n, buf, 1)).unwrap();
    run_one(ch.as_mut(), IoRequest::flush(2)).unwrap();
}

/// The guest with the disks, in `phase`; its serial log.
fn run_guest(dir: &Path, disks: &[PathBuf], phase: &str) -> String {
    std::fs::write(dir.join("phase"), phase).unwrap();
    let log = dir.join(format!("serial-{phase}.log"));
    let files: Vec<PathBuf> = ["phase", "p1.bin", "p2.bin", "p3.bin", "p4.bin"]
        .iter()
        .map(|f| dir.join(f))
        .collect();
    let guest = guest();
    let cmd = boot(&guest, "md-move-guest.sh", &files, &log, &["--mem", "768"]);
    run_with_disks(cmd, disks, &log)
}

/// Serve `v` for a moment as the appliance does: mark it in use, run its
/// bitmap, do `work`, let the bitmap clear, and record a clean stop (its
/// `spares` marked md's spares, as the monitor's close does).
fn serve(mut v: Assembled, spares: &[Arc<dyn BlockDevice>], work: impl FnOnce(&dyn BlockDevice)) {
    v.meta.record(v.device.as_ref(), false).unwrap();
    let daemon = v.device.member_set().bitmap.clone().map(|b| {
        b.set_clear_every(Duration::from_millis(10));
        BitmapDaemon::start("moved", b).unwrap()
    });
    work(v.device.as_ref());
    if let Some(d) = &daemon {
        let t = Instant::now();
        while d.bitmap().dirty_regions() > 0 {
            assert!(t.elapsed() < Duration::from_secs(30), "bits never cleared");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    drop(daemon);
    v.meta.record(v.device.as_ref(), true).unwrap();
    write_spare_superblocks(&v.meta.template, spares);
}

#[test]
fn arrays_move_between_md_and_the_appliance_both_ways() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let disks = blank_disks(dir.path(), 'a'..='t', DISK_BYTES);
    let p: Vec<Vec<u8>> = (0..4).map(|_| random(P)).collect();
    for (i, data) in p.iter().enumerate() {
        std::fs::write(dir.path().join(format!("p{}.bin", i + 1)), data).unwrap();
    }

    // md makes three arrays and writes p1 to each.
    let serial = run_guest(dir.path(), &disks, "create");
    assert!(serial.contains("MD-CREATED OK"));

    // The appliance assembles each from md's superblocks alone.
    // md0's spare (vdt) is given with its members: assembly leaves it out.
    let with_spare: Vec<PathBuf> = disks[0..3].iter().chain(&disks[19..20]).cloned().collect();
    let groups: [(&str, Vec<PathBuf>, Level); 6] = [
        ("r5a", with_spare, Level::Raid5),
        ("r5b", disks[3..6].to_vec(), Level::Raid5),
        ("r1", disks[6..8].to_vec(), Level::Raid1),
        ("r5c", disks[11..14].to_vec(), Level::Raid5),
        ("r5d", disks[14..17].to_vec(), Level::Raid5),
        ("r5e", disks[17..19].to_vec(), Level::Raid5),
    ];
    for (name, paths, level) in groups.clone() {
        let devs = open(&paths);
        let mut report = assemble(&devs, |_| FailureSink::none());
        assert!(report.problems.is_empty(), "{name}: {:?}", report.problems);
        assert_eq!(report.volumes.len(), 1, "{name}");
        let v = report.volumes.remove(0);
        assert!(v.was_clean, "{name}: md stopped it clean");
        assert!(
            v.meta.template.name.ends_with(name),
            "{}",
            v.meta.template.name
        );
        assert_eq!(v.meta.template.level, level);
        let states = v.device.member_states();
        if name == "r5e" {
            assert_eq!(states[2], MemberState::Failed, "md's missing member");
        } else {
            assert!(states.iter().all(|s| *s == MemberState::InSync), "{name}");
        }
        if name == "r1" {
            assert!(
                v.device.member_set().members[1].write_mostly,
                "md's --write-mostly"
            );
        }
        // md0's spare is the volume's spare.
        let spares: Vec<Arc<dyn BlockDevice>> = devs
            .iter()
            .filter(|d| d.info().name.ends_with("vdt.img"))
            .cloned()
            .collect();
        serve(v, &spares, |dev| {
            let mut back = vec![0u8; P];
            io(dev, IoOp::Read, 0, &mut back);
            assert!(
                back == p[0],
                "{name}: the appliance does not read md's data"
            );
            io(dev, IoOp::Write, 16 << 20, &mut p[1].clone());
        });
    }
    // The appliance makes a RAID5 of its own (left-symmetric, 64K, bitmap).
    {
        let devs = open(&disks[8..11]);
        let mut spec = VolumeSpec::new("ours", Level::Raid5, devs.clone());
        spec.bitmap_chunk_bytes = 4 << 20;
        let (device, _) = create(&spec, FailureSink::none(), false).unwrap();
        drop(device);
        let mut report = assemble(&devs, |_| FailureSink::none());
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        serve(report.volumes.remove(0), &[], |dev| {
            io(dev, IoOp::Write, 0, &mut p[2].clone());
        });
    }

    // md assembles all four with no options and finds everything.
    let serial = run_guest(dir.path(), &disks, "assemble");
    assert!(serial.contains("MD-ASSEMBLED OK"), "guest did not finish");
    for md in ["md0", "md1", "md2", "md4", "md5", "md6"] {
        for want in [
            format!("MD-READS-P1 {md} OK"),
            format!("MD-READS-P2 {md} OK"),
        ] {
            assert!(serial.contains(&want), "no {want}");
        }
    }
    assert!(serial.contains("MD-READS-P3 md3 OK"));
    for md in ["md0", "md1", "md2", "md3", "md4", "md5"] {
        assert!(
            serial.contains(&format!("MISMATCH {md} 0")),
            "md's check found mismatches on {md}"
        );
        let clean = serial
            .lines()
            .any(|l| l.starts_with(&format!("DETAIL {md}")) && l.contains("State : clean"));
        assert!(clean, "{md} not clean in mdadm --detail");
    }

    let detail = |md: &str, what: &str| {
        serial
            .lines()
            .any(|l| l.starts_with(&format!("DETAIL {md} ")) && l.contains(what))
    };
    assert!(
        detail("md6", "Active Devices : 2"),
        "md assembles the degraded array degraded"
    );
    assert!(
        detail("md0", "Spare Devices : 1"),
        "md counts its spare again"
    );
    // And the appliance reads what md wrote last.
    let ours = ("ours", disks[8..11].to_vec(), Level::Raid5);
    for (name, paths, _) in groups.iter().cloned().chain([ours]) {
        let devs = open(&paths);
        let mut report = assemble(&devs, |_| FailureSink::none());
        assert!(report.problems.is_empty(), "{name}: {:?}", report.problems);
        let v = report.volumes.remove(0);
        assert!(v.was_clean, "{name}");
        let mut back = vec![0u8; P];
        io(v.device.as_ref(), IoOp::Read, 32 << 20, &mut back);
        assert!(
            back == p[3],
            "{name}: the appliance does not read md's last write"
        );
    }
}

/// The appliance's RAID5 with a bitmap loses power with bits set: md
/// takes the bitmap as current (not stale), loads exactly the bits the
/// appliance set, resyncs those chunks, and its check finds parity whole.
#[test]
fn after_a_power_cut_md_resyncs_what_the_appliance_bitmap_marks() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let disks = blank_disks(dir.path(), 'a'..='c', DISK_BYTES);
    let devs = open(&disks);
    let mut spec = VolumeSpec::new("cut", Level::Raid5, devs.clone());
    spec.bitmap_chunk_bytes = 1 << 20;
    let (device, mut meta) = create(&spec, FailureSink::none(), false).unwrap();
    // In use, writes in three regions far apart, then the power goes: no
    // clean record, the bits never cleared.
    meta.record(device.as_ref(), false).unwrap();
    let b = device.member_set().bitmap.clone().unwrap();
    b.set_clear_every(Duration::from_secs(3600));
    let daemon = BitmapDaemon::start("cut", b.clone()).unwrap();
    for mib in [0u64, 40, 100] {
        io(
            device.as_ref(),
            IoOp::Write,
            mib << 20,
            &mut random(64 << 10),
        );
    }
    let dirty = b.dirty_regions();
    let bits = b.bits();
    assert!(dirty >= 3 && dirty < bits, "{dirty} of {bits}");
    drop(daemon);
    drop(device);

    let log = dir.path().join("serial.log");
    let cmd = boot(&guest(), "md-bitmap-guest.sh", &[], &log, &[]);
    let serial = run_with_disks(cmd, &disks, &log);
    assert!(serial.contains("MD-BITMAP DONE"));
    assert!(
        serial.contains("EXAMINE           State : active"),
        "md sees an unclean array"
    );
    assert!(
        serial.contains(&format!("{bits} bits (chunks), {dirty} dirty")),
        "mdadm -X shows the appliance's bits"
    );
    // A stale bitmap makes md say so and resync everything.
    assert!(
        !serial.contains("out of date"),
        "md took the bitmap for stale"
    );
    // The resync covers three 1 MiB chunks, md's check all 63: the
    // resync is the shorter by far (dmesg's own clock).
    let span = |start: &str, end: &str| -> f64 {
        let at = |what: &str| {
            serial
                .lines()
                .find(|l| l.starts_with("DMESG") && l.contains(what))
                .and_then(|l| l.split('[').nth(1))
                .and_then(|l| l.split(']').next())
                .and_then(|t| t.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no {what:?} in dmesg"))
        };
        at(end) - at(start)
    };
    let resync = span("resync of RAID array", "resync done");
    let check = span("data-check of RAID array", "data-check done");
    println!("md's resync after the power cut: {resync:.3} s; its check of the whole array: {check:.3} s");
    assert!(
        resync < check,
        "the resync ({resync} s) was not shorter than a pass over the array ({check} s)"
    );
    assert!(serial.contains("MISMATCH md0 0"));
}

/// md's RAID5 with a bitmap crashes with writes in flight: the appliance
/// takes md's bits as they are (folded onto its regions), resynchronises
/// only those regions, and md then assembles the array clean with its
/// data and its check finds parity whole.
#[test]
fn after_md_crashes_the_appliance_resyncs_what_md_bitmap_marks() {
    use appliance::raid::monitor::Monitor;
    use appliance::volume::Volume;
    use poller::{ReactorConfig, Reactors};
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let disks = blank_disks(dir.path(), 'a'..='c', DISK_BYTES);
    let p1 = random(P);
    std::fs::write(dir.path().join("p1.bin"), &p1).unwrap();
    let boot_phase = |phase: &str| {
        std::fs::write(dir.path().join("phase"), phase).unwrap();
        let log = dir.path().join(format!("serial-{phase}.log"));
        let files = [dir.path().join("phase"), dir.path().join("p1.bin")];
        (boot(&guest(), "md-crash-guest.sh", &files, &log, &[]), log)
    };
    // The guest dies in the middle: no exit status to check, only that it
    // got there.
    let (mut cmd, log) = boot_phase("crash");
    for p in &disks {
        cmd.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe",
            p.display()
        ));
    }
    let _ = cmd.status().unwrap();
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    println!("{serial}");
    assert!(
        serial.contains("MD-CRASHING"),
        "the guest did not get to the crash"
    );

    let devs = open(&disks);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut report = assemble(&devs, |_| FailureSink::new(tx.clone()));
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let v = report.volumes.remove(0);
    assert!(!v.was_clean, "md crashed with the array active");
    let b = v.device.member_set().bitmap.clone().expect("md's bitmap");
    let (dirty, bits) = (b.dirty_regions(), b.bits());
    println!("md's bitmap after the crash: {dirty} of {bits} regions dirty");
    assert!(dirty > 0 && dirty < bits, "{dirty} of {bits}");
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let volume = Volume::new(reactors.set(), "crash", v.device.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), v.device.clone(), rx, vec![]);
    monitor.set_meta(v.meta);
    let resync = monitor.open(false).unwrap().expect("a resync");
    let wait = |p: &appliance::raid::rebuild::RebuildProgress| {
        let t = Instant::now();
        while !p.is_finished() {
            assert!(t.elapsed() < Duration::from_secs(120), "never finished");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(p.error(), None);
    };
    wait(&resync);
    let resynced = resync.bytes.load(Ordering::SeqCst);
    let whole = v.device.info().num_blocks * BS;
    println!("the appliance resynchronised {resynced} of {whole} bytes");
    assert!(
        resynced > 0 && resynced < whole / 4,
        "{resynced} of {whole}"
    );
    let check = monitor.scrub(false).unwrap();
    wait(&check);
    assert_eq!(check.mismatches.load(Ordering::SeqCst), 0);
    monitor.close().unwrap();
    drop(monitor);
    drop(volume);
    reactors.shutdown().unwrap();

    let (cmd, log) = boot_phase("verify");
    let serial = run_with_disks(cmd, &disks, &log);
    for want in [
        "MD-READS-P1-AT-0 OK",
        "MD-READS-P1-AT-64 OK",
        "MISMATCH md0 0",
        "DETAIL              State : clean",
    ] {
        assert!(serial.contains(want), "no {want}");
    }
}
