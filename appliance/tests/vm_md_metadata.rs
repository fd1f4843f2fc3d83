//! The appliance reads md's own metadata exactly as mdadm does: Linux md
//! in the guest creates arrays the way an operator would (RAID5 with a
//! bitmap and a spare, RAID1 with a write-mostly member and write-behind,
//! a degraded RAID5 without a bitmap), and for every disk the host's
//! decoding of the same bytes agrees with `mdadm --examine` and
//! `mdadm --examine-bitmap` field by field, re-encodes to the bytes md
//! wrote, and renders `volume examine`'s lines with mdadm's values.

use std::collections::HashMap;
use std::path::PathBuf;

use appliance::raid::md::bitmap::MdBitmap;
use appliance::raid::md::examine::{bitmap_report, md_report};
use appliance::raid::md::superblock::{MdSuperblock, BYTES, V1_2_OFFSET};
use appliance::raid::md::support::{check, layout_name, level_name};
use appliance::raid::md::{uuid_text, SECTOR};

mod common;
use common::{boot, guest, run_with_disks};

const DISK_BYTES: u64 = 64 << 20;

/// mdadm's "Label : value" lines of one section of the serial log.
fn section(serial: &str, start: &str, end: &str) -> HashMap<String, String> {
    let body = serial
        .split(start)
        .nth(1)
        .and_then(|s| s.split(end).next())
        .unwrap_or_default();
    body.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(" : ")?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn first_word(s: &str) -> &str {
    s.split_whitespace().next().unwrap_or_default()
}

fn read_at(path: &PathBuf, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

#[test]
fn the_appliance_reads_md_metadata_as_mdadm_does() {
    let guest = guest();
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let disks: Vec<(char, PathBuf)> = ('a'..='h')
        .map(|c| (c, dir.path().join(format!("vd{c}.img"))))
        .collect();
    for (_, p) in &disks {
        std::fs::File::create(p)
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
    }
    let log = dir.path().join("serial.log");
    let cmd = boot(&guest, "md-examine-guest.sh", &[], &log, &[]);
    let paths: Vec<PathBuf> = disks.iter().map(|(_, p)| p.clone()).collect();
    let serial = run_with_disks(cmd, &paths, &log);
    assert!(serial.contains("MD-EXAMINE DONE"), "guest did not finish");

    let sectors = DISK_BYTES / SECTOR;
    let mut write_mostly = 0;
    let mut bitmaps = 0;
    let mut roles = Vec::new();
    for (c, path) in &disks {
        let md = section(
            &serial,
            &format!("=== EXAMINE vd{c} ==="),
            &format!("=== BITMAP vd{c} ==="),
        );
        let raw = read_at(path, V1_2_OFFSET * SECTOR, BYTES);
        let sb = MdSuperblock::decode(&raw, V1_2_OFFSET, sectors)
            .unwrap_or_else(|e| panic!("vd{c}: {e}\nmdadm said {md:?}"));
        let covered = 256 + 2 * sb.max_dev();
        assert_eq!(
            sb.encode()[..covered],
            raw[..covered],
            "vd{c}: re-encoding differs from md's bytes"
        );
        let want = |label: &str| {
            md.get(label)
                .unwrap_or_else(|| panic!("vd{c}: mdadm printed no {label}: {md:?}"))
                .clone()
        };
        assert_eq!(want("Magic"), "a92b4efc");
        assert_eq!(want("Version"), "1.2");
        assert_eq!(want("Array UUID"), uuid_text(&sb.set_uuid), "vd{c}");
        assert_eq!(want("Device UUID"), uuid_text(&sb.device_uuid), "vd{c}");
        // mdadm adds "  (local to host ...)".
        let name = want("Name");
        assert_eq!(name.split("  (").next(), Some(sb.name().as_str()), "vd{c}");
        assert_eq!(want("Raid Level"), level_name(sb.level), "vd{c}");
        assert_eq!(want("Raid Devices"), sb.raid_disks.to_string(), "vd{c}");
        assert_eq!(
            first_word(&want("Avail Dev Size")),
            sb.data_size.to_string()
        );
        assert_eq!(first_word(&want("Data Offset")), sb.data_offset.to_string());
        assert_eq!(first_word(&want("Super Offset")), "8");
        assert_eq!(want("Events"), sb.events.to_string(), "vd{c}");
        assert_eq!(
            want("Checksum"),
            format!(
                "{:x} - correct",
                u32::from_le_bytes(raw[216..220].try_into().unwrap())
            )
        );
        assert_eq!(want("State"), if sb.clean() { "clean" } else { "active" });
        if sb.level == 5 {
            assert_eq!(want("Layout"), layout_name(sb.level, sb.layout), "vd{c}");
            assert_eq!(want("Chunk Size"), format!("{}K", sb.chunk_sectors / 2));
        }
        assert_eq!(
            first_word(&want("Array State")),
            appliance::raid::md::examine::array_state(&sb),
            "vd{c}"
        );
        let role = want("Device Role");
        match sb.slot() {
            Some(s) => assert_eq!(role, format!("Active device {s}"), "vd{c}"),
            None => assert_eq!(role, "spare", "vd{c}"),
        }
        roles.push((sb.name(), role));
        if sb.devflags & 1 != 0 {
            write_mostly += 1;
            assert!(want("Flags").contains("write-mostly"), "vd{c}");
        }
        // The report `volume examine` prints agrees where it uses mdadm's
        // labels.
        let ours: HashMap<&str, String> = md_report(&sb, None).into_iter().collect();
        for label in [
            "Array UUID",
            "Device UUID",
            "Raid Level",
            "Raid Devices",
            "Events",
            "Layout",
            "Chunk Size",
            "Device Role",
            "Internal Bitmap",
            "Checksum",
            "Array Size",
        ] {
            if let Some(v) = ours.get(label) {
                assert_eq!(v, &want(label), "vd{c}: report line {label}");
            }
        }
        for label in ["Data Offset", "Super Offset", "Avail Dev Size"] {
            assert_eq!(
                first_word(&ours[label]),
                first_word(&want(label)),
                "vd{c}: {label}"
            );
        }
        assert!(check(&sb, None).is_ok(), "vd{c}: {:?}", check(&sb, None));

        // The bitmap, where md put one.
        let Some(off) = sb.bitmap_sectors() else {
            assert!(!md.contains_key("Internal Bitmap"), "vd{c}");
            continue;
        };
        assert_eq!(
            want("Internal Bitmap"),
            format!("{off} sectors from superblock")
        );
        bitmaps += 1;
        let x = section(
            &serial,
            &format!("=== BITMAP vd{c} ==="),
            &format!("=== END vd{c} ==="),
        );
        let at = (V1_2_OFFSET as i64 + off) as u64;
        let room = sb.data_offset - at;
        let area = read_at(path, at * SECTOR, (room * SECTOR) as usize);
        let bm = MdBitmap::decode(&area, room).unwrap_or_else(|e| panic!("vd{c}: {e}\n{x:?}"));
        assert_eq!(bm.encode()[..], area[..256], "vd{c}: bitmap re-encoding");
        let xwant = |label: &str| {
            x.get(label)
                .unwrap_or_else(|| panic!("vd{c}: mdadm -X printed no {label}: {x:?}"))
                .clone()
        };
        assert_eq!(bm.uuid, sb.set_uuid, "vd{c}");
        assert_eq!(xwant("Events"), bm.events.to_string());
        assert_eq!(xwant("Events Cleared"), bm.events_cleared.to_string());
        assert_eq!(
            first_word(&xwant("Sync Size")),
            (bm.sync_size / 2).to_string()
        );
        let ours: HashMap<&str, String> = bitmap_report(&bm, &area).into_iter().collect();
        for label in ["Chunksize", "Daemon", "Write Mode", "Bitmap"] {
            assert_eq!(
                ours[label],
                xwant(label),
                "vd{c}: bitmap report line {label}"
            );
        }
        assert_eq!(
            xwant("Daemon"),
            format!("{}s flush period", bm.daemon_sleep)
        );
        let bits = xwant("Bitmap");
        assert_eq!(
            bits,
            format!(
                "{} bits (chunks), {} dirty ({:.1}%)",
                bm.bits(),
                bm.dirty(&area),
                bm.dirty(&area) as f64 * 100.0 / bm.bits() as f64
            ),
            "vd{c}"
        );
        if bm.write_behind != 0 {
            assert_eq!(
                xwant("Write Mode"),
                format!("Allow write behind, max {}", bm.write_behind)
            );
        }
        assert!(check(&sb, Some(&bm)).is_ok());
    }
    assert_eq!(write_mostly, 1, "one write-mostly member");
    assert!(bitmaps >= 5, "md0's four disks and md1's two carry bitmaps");
    assert!(
        roles.contains(&("(none):degraded".into(), "Active device 1".into())),
        "{roles:?}"
    );
}
