//! `volume examine`: what a device's RAID metadata says, whoever wrote
//! it (like `mdadm --examine`). Looks where each format keeps its
//! superblock: md 1.2 at 4 KiB, md 1.1 at the start, md 1.0 and 0.90 near
//! the end, and the appliance's first format at the start.

use bdev::BlockDevice;

use super::md::bitmap::MdBitmap;
use super::md::examine::md_report;
use super::md::superblock::{self as mdsb, MdSuperblock, MdSuperblockError};
use super::md::SECTOR;
use super::metaio;
use super::superblock::{Superblock, SuperblockError};
use super::RaidError;

/// Most bytes of md bitmap read to count its dirty bits (a 16 TiB member
/// at md's 64 MiB chunk needs 32 KiB; this allows 4 KiB chunks on 16 TiB).
const MAX_BITMAP_BYTES: u64 = 4 << 20;

/// What a device's metadata says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Examined {
    /// "md 1.2", "appliance 1", "none", or what was found and not read.
    pub format: String,
    /// Label / value lines, in mdadm's words where md has them.
    pub lines: Vec<(String, String)>,
}

fn lines(v: Vec<(&'static str, String)>) -> Vec<(String, String)> {
    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Read and describe `dev`'s RAID metadata. Only IO errors are errors: a
/// corrupt or foreign superblock is described, not refused.
pub fn examine(dev: &dyn BlockDevice) -> Result<Examined, RaidError> {
    let info = dev.info();
    let sectors = info.num_blocks * u64::from(info.block_size) / SECTOR;
    let head = metaio::read_bytes(dev, 0, 2 * mdsb::BYTES as u64)?;
    // md 1.2, then 1.1, then 1.0 (all one layout, in different places).
    let end_v1_0 = mdsb::v1_0_offset(sectors);
    let candidates = [("1.2", mdsb::V1_2_OFFSET), ("1.1", 0), ("1.0", end_v1_0)];
    let mut problems = Vec::new();
    for (version, at) in candidates {
        let raw = if at == 0 || at == mdsb::V1_2_OFFSET {
            head[(at * SECTOR) as usize..][..mdsb::BYTES].to_vec()
        } else {
            metaio::read_bytes(dev, at * SECTOR, mdsb::BYTES as u64)?
        };
        match MdSuperblock::decode(&raw, at, sectors) {
            Ok(sb) => return md_examined(dev, version, &sb),
            Err(MdSuperblockError::NotMd(_)) => {}
            Err(e) => problems.push((format!("md {version}"), e.to_string())),
        }
    }
    if let Some((format, why)) = problems.into_iter().next() {
        return Ok(Examined {
            format: format!("{format} (unreadable)"),
            lines: vec![("Problem".into(), why)],
        });
    }
    match Superblock::decode_legacy(&head) {
        Ok(sb) => {
            return Ok(Examined {
                format: "appliance 1 (converted to md 1.2 at its next assembly)".into(),
                lines: lines(sb.report()),
            })
        }
        Err(SuperblockError::Foreign) => {}
        Err(e) => {
            return Ok(Examined {
                format: "appliance (unreadable)".into(),
                lines: vec![("Problem".into(), e.to_string())],
            })
        }
    }
    if let Some((format, what)) = foreign_metadata(dev)? {
        return Ok(Examined {
            format: format.into(),
            lines: vec![("Appliance Can Serve".into(), format!("no: {what}"))],
        });
    }
    Ok(Examined {
        format: "none".into(),
        lines: Vec::new(),
    })
}

/// RAID metadata near the end of `dev` that the appliance does not
/// serve: md's 0.90 superblock, and the external formats mdadm manages in
/// containers (Intel IMSM, SNIA DDF). The format, and why not.
pub fn foreign_metadata(
    dev: &dyn BlockDevice,
) -> Result<Option<(&'static str, &'static str)>, RaidError> {
    let info = dev.info();
    let bytes = info.num_blocks * u64::from(info.block_size);
    if bytes < 128 << 10 {
        return Ok(None);
    }
    // md 0.90: 4 KiB at the last 64 KiB boundary but one.
    let at = mdsb::v0_90_byte(bytes);
    if metaio::read_bytes(dev, at, 8)?[..4] == mdsb::MAGIC.to_le_bytes() {
        return Ok(Some((
            "md 0.90",
            "md's 0.90 superblock (mdadm converts it to 1.0; the appliance serves 1.2)",
        )));
    }
    // The last two sectors: IMSM's anchor in the first, DDF's in the last.
    let tail = metaio::read_bytes(dev, bytes - 2 * SECTOR, 2 * SECTOR)?;
    if tail.starts_with(b"Intel Raid ISM Cfg Sig. ") {
        return Ok(Some((
            "Intel IMSM",
            "external metadata (Intel IMSM, an mdadm container)",
        )));
    }
    if tail[SECTOR as usize..].starts_with(&[0xde, 0x11, 0xde, 0x11]) {
        return Ok(Some((
            "SNIA DDF",
            "external metadata (SNIA DDF, an mdadm container)",
        )));
    }
    Ok(None)
}

fn md_examined(
    dev: &dyn BlockDevice,
    version: &str,
    sb: &MdSuperblock,
) -> Result<Examined, RaidError> {
    let mut bitmap_problem = None;
    let mut report = None;
    if let Some(off) = sb.bitmap_sectors() {
        let at = (sb.super_offset as i64 + off).max(0) as u64;
        // The bitmap runs up to the data (1.1, 1.2) or the superblock (1.0).
        let limit = if sb.super_offset < sb.data_offset {
            sb.data_offset
        } else {
            sb.super_offset
        };
        let room = limit.saturating_sub(at);
        let head = metaio::read_bytes(dev, at * SECTOR, super::md::bitmap::HEADER as u64)?;
        match MdBitmap::decode(&head, room) {
            Ok(bm) => {
                let len = bm.bytes().min(MAX_BITMAP_BYTES);
                let area = metaio::read_bytes(dev, at * SECTOR, len)?;
                report = Some(md_report(sb, Some((&bm, &area))));
            }
            Err(e) => bitmap_problem = Some(e.to_string()),
        }
    }
    let mut out = lines(report.unwrap_or_else(|| md_report(sb, None)));
    if let Some(p) = bitmap_problem {
        out.push(("Bitmap Problem".into(), p));
    }
    Ok(Examined {
        format: format!("md {version}"),
        lines: out,
    })
}
