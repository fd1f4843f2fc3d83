//! An operator takes over md arrays in the middle of a recovery and of a
//! resync with `applctl volume import`, naming their devices only: the
//! appliance continues each from where md stopped (md's recovery_offset
//! and resync_offset, not from zero), and after `volume delete` md
//! assembles the devices with plain `mdadm --assemble`, clean, the data
//! whole and its checks finding no mismatch.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use appliance::raid::assembly::read_superblock;
use appliance::raid::members::MemberState;
use bdev::FileDevice;

mod common;
#[path = "cli/daemon.rs"]
mod daemon;
use common::{blank_disks, boot, guest, random, run_with_disks};
use daemon::*;

const DISK_BYTES: u64 = 64 << 20;

fn run_guest(dir: &Path, disks: &[PathBuf], phase: &str) -> String {
    std::fs::write(dir.join("phase"), phase).unwrap();
    let log = dir.join(format!("serial-{phase}.log"));
    let files = [dir.join("phase"), dir.join("p1.bin")];
    let cmd = boot(&guest(), "md-recovery-guest.sh", &files, &log, &[]);
    run_with_disks(cmd, disks, &log)
}

#[test]
fn an_md_recovery_is_imported_finished_by_the_appliance_and_handed_back() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let disks = blank_disks(dir.path(), 'a'..='f', DISK_BYTES);
    let p1 = random(8 << 20);
    std::fs::write(dir.path().join("p1.bin"), &p1).unwrap();
    let serial = run_guest(dir.path(), &disks, "start");
    assert!(serial.contains("MD-STOPPED-MID-RECOVERY OK"));
    let md_offset: u64 = serial
        .lines()
        .find_map(|l| l.trim().strip_prefix("Recovery Offset : "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("mdadm --examine shows vdd's recovery offset");
    assert!(md_offset >= 8192, "md stopped at {md_offset} sectors");
    assert!(serial.contains("MD-STOPPED-MID-RESYNC OK"));
    // (mdadm --examine says only "active"; the guest read the field.)
    let md_resync: u64 = serial
        .lines()
        .find_map(|l| l.trim().strip_prefix("RESYNC OFFSET "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the guest shows vde's resync_offset");
    assert!(
        md_resync >= 8192,
        "md stopped its resync at {md_resync} sectors"
    );

    // What md left on vdd, as the appliance reads it: slot 2, being
    // recovered, up to md's offset in 64 KiB rows.
    let vdd = FileDevice::open(&disks[3], 4096).unwrap();
    let sb = read_superblock(&vdd).unwrap().unwrap();
    assert_eq!(sb.slot, 2);
    assert_eq!(sb.slot_states[2] & 0x7f, MemberState::Rebuilding.code());
    assert_eq!(
        sb.rebuild_checkpoint,
        md_offset / 128,
        "rows of 128 sectors"
    );
    drop(vdd);

    // The operator attaches the three devices and imports them.
    let config = dir.path().join("init.toml");
    let mut toml = String::new();
    for c in ['a', 'b', 'd', 'e', 'f'] {
        toml += &format!(
            "[[device]]\nname = \"vd{c}\"\nspec = \"file:{}\"\n\n",
            dir.path().join(format!("vd{c}.img")).display()
        );
    }
    std::fs::write(&config, toml).unwrap();
    let api = dir.path().join("api.sock");
    let log = dir.path().join("daemon.log");
    // The daemon's start with the operator's configuration, its log kept.
    let mut daemon = restart(
        dir.path(),
        &api,
        &["--config", config.to_str().unwrap()],
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    let _reap = KillOnPanic(daemon.id());
    wait_up(&api, &mut daemon);
    let examined = ok(&applctl(&api, &["volume", "examine", "vdd"]));
    assert!(
        examined.contains(&format!("Recovery Offset : {md_offset} sectors")),
        "{examined}"
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&applctl(
        &api,
        &[
            "--json",
            "volume",
            "import",
            "rec",
            "--devices",
            "vdd,vdb,vda",
        ],
    )))
    .unwrap();
    assert_eq!(v["chunk_kib"], 64, "{v}");
    let t = Instant::now();
    loop {
        let out = ok(&applctl(&api, &["--json", "volume", "show", "rec"]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let members = v["members"].as_array().unwrap().clone();
        let names: Vec<&str> = members
            .iter()
            .map(|m| m["device"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["vda", "vdb", "vdd"], "slots as md had them: {out}");
        if members.iter().all(|m| m["state"] == "MEMBER_STATE_IN_SYNC") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "never in sync: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The mirror in the middle of md's first resync.
    let examined = ok(&applctl(&api, &["volume", "examine", "vde"]));
    assert!(
        examined.contains(&format!("State : active (resync from sector {md_resync})")),
        "{examined}"
    );
    ok(&applctl(
        &api,
        &["volume", "import", "mir", "--devices", "vdf,vde"],
    ));
    let t = Instant::now();
    loop {
        let out = ok(&applctl(&api, &["--json", "volume", "show", "mir"]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        if v["progress"]["finished"] == true {
            assert_eq!(v["progress"]["error"], "", "{out}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "resync never ended: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    // RAID1 rows are 1 MiB (2048 sectors).
    let went_on = text
        .lines()
        .find(|l| l.contains("md's resync_offset"))
        .unwrap_or_else(|| panic!("no resync start in the log:\n{text}"));
    assert!(
        went_on.contains(&format!("row={}", md_resync / 2048)),
        "{went_on}"
    );
    println!("resync went on from md's offset {md_resync} sectors: {went_on}");
    ok(&applctl(&api, &["volume", "delete", "mir"]));
    let resumed = text
        .lines()
        .find(|l| l.contains("resumes from its checkpoint"))
        .unwrap_or_else(|| panic!("no resume in the log:\n{text}"));
    assert!(
        resumed.contains(&format!("row={}", md_offset / 128)),
        "{resumed}"
    );
    println!("resumed at md's offset {md_offset} sectors: {resumed}");
    ok(&applctl(&api, &["volume", "delete", "rec"]));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());

    let serial = run_guest(dir.path(), &disks, "verify");
    for want in [
        "MD-READS-P1-MIRROR OK",
        "MISMATCH md1 0",
        "DETAIL-MIR              State : clean",
        "MD-READS-P1-AT-0 OK",
        "MD-READS-P1-AT-96M OK",
        "MISMATCH md0 0",
        "MD-VERIFIED OK",
    ] {
        assert!(serial.contains(want), "no {want}");
    }
    assert!(serial
        .lines()
        .any(|l| l.starts_with("DETAIL") && l.contains("Active Devices : 3")));
}
