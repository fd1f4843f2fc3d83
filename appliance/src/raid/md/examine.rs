//! What a member's md metadata says, as `mdadm --examine` and
//! `mdadm --examine-bitmap` show it: label / value lines an operator
//! compares with md's own output.

use std::time::{Duration, UNIX_EPOCH};

use super::bitmap::MdBitmap;
use super::superblock::{
    feature, MdSuperblock, DEVFLAG_FAILFAST, DEVFLAG_WRITE_MOSTLY, MAX_SECTOR, ROLE_FAULTY,
    ROLE_JOURNAL, ROLE_SPARE,
};
use super::support::{check, layout_name, level_name};
use super::{time_parts, uuid_text, SECTOR};

/// One line of the report.
pub type Line = (&'static str, String);

fn when(t: u64) -> String {
    let (secs, micros) = time_parts(t);
    // httpdate stops at the year 9999.
    if secs > 253_402_300_799 {
        return format!("{secs} s after 1970");
    }
    let at = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.into());
    httpdate::fmt_http_date(at)
}

fn sectors(n: u64) -> String {
    format!(
        "{n} sectors ({:.2} MiB)",
        n as f64 * SECTOR as f64 / (1 << 20) as f64
    )
}

fn role(code: u16, raid_disks: u32) -> String {
    match code {
        ROLE_SPARE => "spare".into(),
        ROLE_FAULTY => "faulty".into(),
        ROLE_JOURNAL => "journal".into(),
        r if u32::from(r) < raid_disks => format!("Active device {r}"),
        r => format!("role {r}"),
    }
}

/// md's array state string: one character per slot, `A` when some device
/// holds it, `R` when a replacement is also on it, `.` when none does.
pub fn array_state(sb: &MdSuperblock) -> String {
    let mut holders = vec![0u32; sb.raid_disks as usize];
    for &r in &sb.dev_roles {
        if let Some(h) = holders.get_mut(r as usize) {
            *h += 1;
        }
    }
    holders
        .iter()
        .map(|&h| match h {
            0 => '.',
            1 => 'A',
            _ => 'R',
        })
        .collect()
}

/// The report for superblock `sb` and, when it has one, its bitmap (with
/// the bitmap area as read, superblock and bits).
pub fn md_report(sb: &MdSuperblock, bitmap: Option<(&MdBitmap, &[u8])>) -> Vec<Line> {
    let mut out: Vec<Line> = vec![
        ("Magic", format!("{:08x}", super::superblock::MAGIC)),
        ("Version", format!("1.{}", sb.minor_version())),
        ("Feature Map", format!("{:#x}", sb.feature_map)),
        ("Array UUID", uuid_text(&sb.set_uuid)),
        ("Name", sb.name()),
        ("Creation Time", when(sb.ctime)),
        ("Raid Level", level_name(sb.level)),
        ("Raid Devices", sb.raid_disks.to_string()),
        ("Avail Dev Size", sectors(sb.data_size)),
    ];
    let data_disks = match sb.level {
        4 | 5 => u64::from(sb.raid_disks.saturating_sub(1)),
        6 => u64::from(sb.raid_disks.saturating_sub(2)),
        _ => 1,
    };
    let kib = sb.size.saturating_mul(data_disks) / 2;
    out.push((
        "Array Size",
        format!(
            "{kib} KiB ({:.2} MiB {:.2} MB)",
            kib as f64 / 1024.0,
            kib as f64 * 1024.0 / 1e6
        ),
    ));
    out.push(("Used Dev Size", sectors(sb.size)));
    out.push(("Data Offset", format!("{} sectors", sb.data_offset)));
    out.push(("Super Offset", format!("{} sectors", sb.super_offset)));
    if sb.has(feature::RECOVERY_OFFSET) {
        out.push(("Recovery Offset", format!("{} sectors", sb.recovery_offset)));
    }
    let state = if sb.resync_offset == MAX_SECTOR {
        "clean".to_string()
    } else {
        format!("active (resync from sector {})", sb.resync_offset)
    };
    out.push(("State", state));
    out.push(("Device UUID", uuid_text(&sb.device_uuid)));
    let mut flags = Vec::new();
    if sb.devflags & DEVFLAG_WRITE_MOSTLY != 0 {
        flags.push("write-mostly");
    }
    if sb.devflags & DEVFLAG_FAILFAST != 0 {
        flags.push("failfast");
    }
    if !flags.is_empty() {
        out.push(("Flags", flags.join(" ")));
    }
    if let Some(off) = sb.bitmap_sectors() {
        out.push(("Internal Bitmap", format!("{off} sectors from superblock")));
    }
    if let Some((off, size)) = sb.ppl() {
        out.push(("PPL", format!("{size} sectors at offset {off} sectors")));
    }
    out.push(("Update Time", when(sb.utime)));
    if sb.bblog_size != 0 {
        let bad = if sb.has(feature::BAD_BLOCKS) {
            " (not empty)"
        } else {
            ""
        };
        out.push((
            "Bad Block Log",
            format!(
                "{} entries available at offset {} sectors{bad}",
                u32::from(sb.bblog_size) * 512 / 8,
                sb.bblog_offset as i32
            ),
        ));
    }
    let b = sb.encode();
    let csum = u32::from_le_bytes([b[216], b[217], b[218], b[219]]);
    out.push(("Checksum", format!("{csum:x} - correct")));
    out.push(("Events", sb.events.to_string()));
    if matches!(sb.level, 4..=6 | 10) {
        out.push(("Layout", layout_name(sb.level, sb.layout)));
    }
    if sb.chunk_sectors != 0 {
        out.push(("Chunk Size", format!("{}K", sb.chunk_sectors / 2)));
    }
    out.push(("Device Role", role(sb.role_code(), sb.raid_disks)));
    out.push(("Array State", array_state(sb)));
    if let Some((bm, area)) = bitmap {
        out.extend(bitmap_report(bm, area));
    }
    let support = match check(sb, bitmap.map(|(b, _)| b)) {
        Ok(()) => "yes".to_string(),
        Err(e) => format!("no: {}", e.what),
    };
    out.push(("Appliance Can Serve", support));
    out
}

/// A bitmap chunk size as mdadm prints it ("64 MB" for 64 MiB).
fn human(bytes: u32) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{} MB", b >> 20),
        b if b >= 1 << 10 => format!("{} KB", b >> 10),
        b => format!("{b} B"),
    }
}

/// `mdadm --examine-bitmap`'s lines for bitmap `bm` (`area` holds its
/// superblock and bits).
pub fn bitmap_report(bm: &MdBitmap, area: &[u8]) -> Vec<Line> {
    let bits = bm.bits();
    let dirty = bm.dirty(area);
    let mut out: Vec<Line> = vec![
        ("Bitmap Version", bm.version.to_string()),
        ("Bitmap Events", bm.events.to_string()),
        ("Events Cleared", bm.events_cleared.to_string()),
        ("Chunksize", human(bm.chunksize)),
        ("Daemon", format!("{}s flush period", bm.daemon_sleep)),
    ];
    let mode = if bm.write_behind == 0 {
        "Normal".to_string()
    } else {
        format!("Allow write behind, max {}", bm.write_behind)
    };
    out.push(("Write Mode", mode));
    out.push(("Sync Size", format!("{} KiB", bm.sync_size / 2)));
    out.push((
        "Bitmap",
        format!(
            "{bits} bits (chunks), {dirty} dirty ({:.1}%)",
            if bits == 0 {
                0.0
            } else {
                dirty as f64 * 100.0 / bits as f64
            }
        ),
    ));
    if bm.state & super::bitmap::STATE_STALE != 0 {
        out.push(("Bitmap State", "stale (full resync needed)".into()));
    }
    out
}
