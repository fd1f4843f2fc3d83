//! `applctl volume examine` and `volume import` against a daemon process,
//! on devices carrying md's metadata: what md's superblock and bitmap say
//! in mdadm's words, and taking over an md array by its devices.

#[path = "cli/daemon.rs"]
mod daemon;

use daemon::*;

use std::path::Path;
use std::process::Stdio;

/// md's superblock of device `dev_number` of array `uuid` (`roles` by
/// device number), data from 1 MiB on 64 MiB devices, superblock at
/// `at_sector`.
fn md_sb(
    uuid: u8,
    name: &str,
    level: i32,
    dev_number: u32,
    roles: Vec<u16>,
    at_sector: u64,
) -> appliance::raid::md::superblock::MdSuperblock {
    use appliance::raid::md::superblock::{MdSuperblock, MAX_SECTOR};
    let mut set_name = [0u8; 32];
    set_name[..name.len()].copy_from_slice(name.as_bytes());
    let raid_disks = roles.iter().filter(|&&r| r < 0xfff0).count() as u32;
    MdSuperblock {
        feature_map: 0,
        set_uuid: [uuid; 16],
        set_name,
        ctime: 1_700_000_000,
        level,
        layout: if level == 1 { 0 } else { 3 },
        size: 129_024,
        chunk_sectors: if level == 1 { 0 } else { 32 },
        raid_disks,
        bitmap_offset: 0,
        data_offset: 2048,
        data_size: 129_024,
        super_offset: at_sector,
        recovery_offset: 0,
        dev_number,
        device_uuid: [0xc0 + dev_number as u8; 16],
        devflags: 0,
        utime: 1_700_000_100,
        events: 42,
        resync_offset: MAX_SECTOR,
        dev_roles: roles,
        ..Default::default()
    }
}

/// A sparse 64 MiB device file holding `sb` where it says.
fn md_device(path: &Path, sb: &appliance::raid::md::superblock::MdSuperblock) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(&sb.encode(), sb.super_offset * 512).unwrap();
}

/// An md 1.2 superblock (slot 1 of a 3-disk RAID5, 16 KiB chunks,
/// right-symmetric) and a bitmap with bits 0, 2 and 63 set, as md would
/// leave a member, written into `path` (64 MiB).
fn md_member(path: &Path, at_sector: u64) {
    use appliance::raid::md::bitmap::{MdBitmap, HEADER};
    use appliance::raid::md::superblock::{feature, ROLE_SPARE};
    let mut sb = md_sb(0xab, "host:r5", 5, 1, vec![0, 1, 2, ROLE_SPARE], at_sector);
    sb.feature_map = feature::BITMAP_OFFSET;
    sb.bitmap_offset = 8;
    sb.device_uuid = [0xcd; 16];
    let bm = MdBitmap {
        version: 4,
        uuid: [0xab; 16],
        events: 42,
        events_cleared: 40,
        sync_size: 129_024,
        state: 0,
        chunksize: 1 << 20,
        daemon_sleep: 5,
        write_behind: 0,
        sectors_reserved: 0,
        nodes: 0,
        cluster_name: [0; 64],
    };
    let mut img = vec![0u8; 64 << 20];
    let at = (at_sector * 512) as usize;
    img[at..at + 4096].copy_from_slice(&sb.encode());
    let b = at + 8 * 512;
    img[b..b + HEADER].copy_from_slice(&bm.encode());
    img[b + HEADER] = 0b101;
    img[b + HEADER + 7] = 0x80;
    std::fs::write(path, img).unwrap();
}

/// `volume examine` shows what md's metadata says (the same labels as
/// mdadm --examine and --examine-bitmap), the appliance's members (md's
/// format too) while in use, names what the appliance cannot serve, says "none" on
/// a blank device, and fails with NotFound's exit code for no device.
#[test]
fn volume_examine_shows_md_and_appliance_metadata() {
    let dir = tempfile::tempdir().unwrap();
    md_member(&dir.path().join("md12.img"), 8);
    md_member(&dir.path().join("md11.img"), 0);
    let config = dir.path().join("init.toml");
    let file = |n: &str| dir.path().join(n).display().to_string();
    std::fs::write(
        &config,
        format!(
            "[[device]]\nname = \"md12\"\nspec = \"file:{}\"\n\n\
             [[device]]\nname = \"md11\"\nspec = \"file:{}\"\n\n\
             [[device]]\nname = \"blank\"\nspec = \"file:{}:16M\"\n\n\
             [[device]]\nname = \"a\"\nspec = \"ram:16M\"\n\n\
             [[device]]\nname = \"b\"\nspec = \"ram:16M\"\n\n\
             [[volume]]\nname = \"mirror\"\nlevel = \"raid1\"\nmembers = [\"a\", \"b\"]\n",
            file("md12.img"),
            file("md11.img"),
            file("blank.img")
        ),
    )
    .unwrap();
    let (mut daemon, api) = start(dir.path(), &config, "127.0.0.1:0");
    let _reap = KillOnPanic(daemon.id());

    let md = ok(&applctl(&api, &["volume", "examine", "md12"]));
    for line in [
        "Metadata Format : md 1.2",
        "Array UUID : abababab:abababab:abababab:abababab",
        "Name : host:r5",
        "Raid Level : raid5",
        "Raid Devices : 3",
        "Layout : right-symmetric",
        "Chunk Size : 16K",
        "Events : 42",
        "Device Role : Active device 1",
        "Array State : AAA",
        "Internal Bitmap : 8 sectors from superblock",
        "Events Cleared : 40",
        // 129024 sectors in 1 MiB chunks: 63 bits; the set bit 63 is past
        // them and not counted.
        "Bitmap : 63 bits (chunks), 2 dirty (3.2%)",
        "Appliance Can Serve : yes",
    ] {
        assert!(md.contains(line), "no {line:?} in:\n{md}");
    }
    let old = ok(&applctl(&api, &["volume", "examine", "md11"]));
    assert!(
        old.contains("Metadata Format : md 1.1")
            && old.contains("no: md superblock version 1.1 (the appliance serves 1.2)"),
        "{old}"
    );
    let ours = ok(&applctl(&api, &["--json", "volume", "examine", "b"]));
    let v: serde_json::Value = serde_json::from_str(&ours).unwrap();
    assert_eq!(v["format"], "md 1.2", "{ours}");
    let line = |label: &str| {
        v["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["label"] == label)
            .map(|l| l["value"].clone())
    };
    assert_eq!(line("Name"), Some("mirror".into()), "{ours}");
    assert_eq!(line("Device Role"), Some("Active device 1".into()));
    let blank = ok(&applctl(&api, &["volume", "examine", "blank"]));
    assert!(blank.contains("Metadata Format : none"), "{blank}");
    assert_eq!(
        applctl(&api, &["volume", "examine", "nosuch"])
            .status
            .code(),
        Some(3)
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
}

/// `volume import` takes over an md array by naming its devices in any
/// order (md's spare becomes a spare), keeps md's identity through a
/// restart and a delete, and refuses, naming the device and the reason,
/// a blank device, one of another array, and an array it cannot serve.
#[test]
fn volume_import_takes_an_md_array_by_its_devices() {
    use appliance::raid::md::superblock::ROLE_SPARE;
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(format!("{n}.img"));
    let mirror = |dev| md_sb(0x11, "host:mir", 1, dev, vec![0, 1, ROLE_SPARE], 8);
    md_device(&path("m0"), &mirror(0));
    md_device(&path("m1"), &mirror(1));
    md_device(&path("sp"), &mirror(2));
    md_device(&path("other"), &md_sb(0x22, "host:x", 1, 0, vec![0, 1], 8));
    md_device(
        &path("r6"),
        &md_sb(0x33, "host:r6", 6, 0, vec![0, 1, 2, 3], 8),
    );
    std::fs::File::create(path("blank"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let config = dir.path().join("init.toml");
    let mut toml = String::new();
    for n in ["m0", "m1", "sp", "other", "r6", "blank"] {
        toml += &format!(
            "[[device]]\nname = \"{n}\"\nspec = \"file:{}\"\n\n",
            path(n).display()
        );
    }
    std::fs::write(&config, toml).unwrap();
    let (mut daemon, api) = start(dir.path(), &config, "127.0.0.1:0");
    let _reap = KillOnPanic(daemon.id());
    let refused = |devices: &str, why: &str| {
        let out = applctl(&api, &["volume", "import", "bad", "--devices", devices]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(5), "{devices}: {err}");
        assert!(err.contains(why), "{devices}: {err}");
    };
    refused("m0,blank", "blank carries no RAID superblock");
    refused("m0,other", "other belongs to array \"host:x\"");
    refused("r6", "level raid6 is not supported");
    refused("sp", "spares only");
    refused("m0,sp", "slot 1 of array \"host:mir\" is in use");
    // The request's own field is named (it said "members").
    let out = applctl(&api, &["volume", "import", "bad", "--devices", "m0,a.b/c"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("devices"), "{err}");
    // Nothing was taken by the refusals.
    let list = ok(&applctl(&api, &["--json", "device", "list"]));
    assert!(!list.contains("\"volume bad\""), "{list}");

    let v: serde_json::Value = serde_json::from_str(&ok(&applctl(
        &api,
        &[
            "--json",
            "volume",
            "import",
            "mirror",
            "--devices",
            "sp,m1,m0",
        ],
    )))
    .unwrap();
    assert_eq!(v["level"], "LEVEL_RAID1", "{v}");
    assert_eq!(v["members"][0]["device"], "m0", "{v}");
    assert_eq!(v["members"][1]["device"], "m1", "{v}");
    assert_eq!(v["spares"], serde_json::json!(["sp"]), "{v}");
    assert_eq!(v["state"], "VOLUME_STATE_OPTIMAL", "{v}");
    // md's name and identity stay.
    let e = ok(&applctl(&api, &["volume", "examine", "m1"]));
    assert!(
        e.contains("Name : host:mir") && e.contains("Array UUID : 11111111:"),
        "{e}"
    );

    // A restart finds it by md's name.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    let mut daemon = restart(dir.path(), &api, &[], Stdio::null());
    let _reap = KillOnPanic(daemon.id());
    wait_up(&api, &mut daemon);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&applctl(&api, &["--json", "volume", "show", "mirror"]))).unwrap();
    assert_eq!(v["state"], "VOLUME_STATE_OPTIMAL", "{v}");
    ok(&applctl(&api, &["volume", "delete", "mirror"]));
    let e = ok(&applctl(&api, &["volume", "examine", "m0"]));
    assert!(
        e.contains("Metadata Format : md 1.2") && e.contains("State : clean"),
        "{e}"
    );
    // The spare is md's spare again, as current as the members.
    let events = |e: &str| {
        e.lines()
            .find_map(|l| l.trim().strip_prefix("Events : "))
            .map(str::to_string)
    };
    let s = ok(&applctl(&api, &["volume", "examine", "sp"]));
    assert!(s.contains("Device Role : spare"), "{s}");
    assert_eq!(events(&s), events(&e), "{s}");
    // SAFETY: as above.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
}
