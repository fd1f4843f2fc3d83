//! The appliance's view of a member ([`Superblock`]) written as md's
//! version-1.2 superblock and read back from one, so md and the appliance
//! share members with no copy.
//!
//! What md keeps per device is taken from (and written to) that device's
//! own superblock only, as md does: whether it is write-mostly
//! (`devflags`) and how far its recovery got (`recovery_offset` with the
//! RECOVERY_OFFSET feature). Every member's superblock carries the role
//! of every slot (`dev_roles`): a slot no device holds is failed. Device
//! numbers are slots: a device taking a slot takes its number, and a
//! stale device still claiming it loses on events, as in mdadm.

use std::time::{SystemTime, UNIX_EPOCH};

use super::bitmap::MdBitmap;
use super::superblock::{
    feature, MdSuperblock, DEVFLAG_WRITE_MOSTLY, MAX_SECTOR, ROLE_FAULTY, ROLE_SPARE, V1_2_OFFSET,
};
use super::support::{check, raid5_algorithm, raid5_layout};
use super::SECTOR;
use crate::raid::members::{MemberState, WRITE_MOSTLY};
use crate::raid::superblock::{Level, Superblock};

/// Where the appliance puts md's internal bitmap: 8 sectors after the
/// superblock (4 KiB after it, mdadm's choice).
pub const BITMAP_OFFSET_SECTORS: u64 = 8;
/// Byte offset of the superblock on every member.
pub const SUPERBLOCK_BYTE: u64 = V1_2_OFFSET * SECTOR;
/// Byte offset of the bitmap on every member.
pub const BITMAP_BYTE: u64 = (V1_2_OFFSET + BITMAP_OFFSET_SECTORS) * SECTOR;
/// Rows of a RAID1 rebuild, in member blocks (the mirror's rebuild unit).
pub const RAID1_ROW_BLOCKS: u64 = 256;

/// Member bytes per rebuild row: a chunk for RAID5, 256 blocks for RAID1.
pub fn row_bytes(sb: &Superblock) -> u64 {
    match sb.level {
        Level::Raid5 => u64::from(sb.chunk_bytes),
        Level::Raid1 => RAID1_ROW_BLOCKS * u64::from(sb.block_size),
    }
}

/// md's time stamp of now.
pub fn now() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    d.as_secs() & ((1 << 40) - 1) | u64::from(d.subsec_micros()) << 40
}

/// Sectors of each member the array uses: md rounds a RAID5's down to
/// whole chunks.
fn used_sectors(sb: &Superblock) -> u64 {
    let s = sb.data_blocks.saturating_mul(u64::from(sb.block_size)) / SECTOR;
    match sb.level {
        Level::Raid5 => {
            let c = u64::from(sb.chunk_bytes) / SECTOR;
            s / c * c
        }
        Level::Raid1 => s,
    }
}

/// md's superblock for the member in `slot` of the volume `sb` describes.
pub fn to_md(sb: &Superblock, slot: u32) -> MdSuperblock {
    let code = |s: usize| sb.slot_states.get(s).copied().unwrap_or(0);
    let own = code(slot as usize);
    let mut feature_map = 0;
    let mut recovery_offset = 0;
    if sb.bitmap_rows_per_bit > 0 {
        feature_map |= feature::BITMAP_OFFSET;
    }
    if own & !WRITE_MOSTLY == MemberState::Rebuilding.code() {
        feature_map |= feature::RECOVERY_OFFSET;
        recovery_offset = sb.rebuild_checkpoint.saturating_mul(row_bytes(sb)) / SECTOR;
    }
    let mut set_name = [0u8; 32];
    let n = sb.name.len().min(32);
    set_name[..n].copy_from_slice(&sb.name.as_bytes()[..n]);
    let bs = u64::from(sb.block_size);
    MdSuperblock {
        feature_map,
        set_uuid: sb.volume_uuid,
        set_name,
        ctime: sb.ctime,
        level: match sb.level {
            Level::Raid1 => 1,
            Level::Raid5 => 5,
        },
        layout: match sb.level {
            Level::Raid1 => 0,
            Level::Raid5 => raid5_algorithm(sb.layout),
        },
        size: used_sectors(sb),
        chunk_sectors: match sb.level {
            Level::Raid1 => 0,
            Level::Raid5 => sb.chunk_bytes / SECTOR as u32,
        },
        raid_disks: sb.members,
        bitmap_offset: if sb.bitmap_rows_per_bit > 0 {
            BITMAP_OFFSET_SECTORS as u32
        } else {
            0
        },
        data_offset: sb.data_offset.saturating_mul(bs) / SECTOR,
        data_size: sb.data_blocks.saturating_mul(bs) / SECTOR,
        super_offset: V1_2_OFFSET,
        recovery_offset: recovery_offset.min(sb.data_blocks.saturating_mul(bs) / SECTOR),
        dev_number: slot,
        device_uuid: sb.member_uuid,
        devflags: if own & WRITE_MOSTLY != 0 {
            DEVFLAG_WRITE_MOSTLY
        } else {
            0
        },
        utime: now(),
        events: sb.events,
        resync_offset: if sb.clean {
            MAX_SECTOR
        } else {
            (sb.resync_from.saturating_mul(row_bytes(sb)) / SECTOR).min(used_sectors(sb))
        },
        dev_roles: (0..sb.members as usize)
            .map(|s| {
                if code(s) & !WRITE_MOSTLY == MemberState::Failed.code() {
                    ROLE_FAULTY
                } else {
                    s as u16
                }
            })
            .collect(),
        ..Default::default()
    }
}

/// md's superblock for a spare of the volume `sb` describes, device
/// number `dev_number` (past the slots): role spare, as current as the
/// members, so md assembles it as the array's spare.
pub fn spare_to_md(sb: &Superblock, dev_number: u32) -> MdSuperblock {
    let mut md = to_md(sb, 0);
    md.feature_map &= !feature::RECOVERY_OFFSET;
    md.recovery_offset = 0;
    md.devflags = 0;
    md.dev_number = dev_number;
    md.device_uuid = *uuid::Uuid::new_v4().as_bytes();
    let n = (dev_number as usize + 1).max(md.dev_roles.len());
    md.dev_roles.resize(n, ROLE_SPARE);
    md.dev_roles[dev_number as usize] = ROLE_SPARE;
    md
}

/// Why an md superblock does not describe a member the appliance can
/// take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FromMdError {
    /// A feature the appliance does not run.
    #[error("{0}")]
    Unsupported(String),
    /// A spare, faulty or journal device, not an active member.
    #[error("md array {array}: this device is a {role}, not an active member")]
    NotActive {
        /// The array's name.
        array: String,
        /// Its role.
        role: &'static str,
    },
    /// md's numbers do not fit the appliance's blocks.
    #[error("md array {array}: {what}")]
    Geometry {
        /// The array's name.
        array: String,
        /// What does not fit.
        what: String,
    },
}

/// The appliance's view of a member md describes, on a device of
/// `block_size`-byte blocks, with the array's bitmap superblock (if it has
/// a bitmap and it could be read).
pub fn from_md(
    md: &MdSuperblock,
    block_size: u32,
    bitmap: Option<&MdBitmap>,
) -> Result<Superblock, FromMdError> {
    check(md, bitmap).map_err(|e| FromMdError::Unsupported(e.to_string()))?;
    let array = md.name();
    let Some(slot) = md.slot() else {
        let role = match md.role_code() {
            ROLE_SPARE => "spare",
            ROLE_FAULTY => "faulty device",
            _ => "journal device",
        };
        return Err(FromMdError::NotActive { array, role });
    };
    let geometry = |what: String| FromMdError::Geometry {
        array: array.clone(),
        what,
    };
    let bs = u64::from(block_size);
    let blocks = |field: &str, sectors: u64| {
        if !(sectors * SECTOR).is_multiple_of(bs) {
            Err(geometry(format!(
                "{field} of {sectors} sectors is not a whole number of {bs}-byte blocks"
            )))
        } else {
            Ok(sectors * SECTOR / bs)
        }
    };
    let level = if md.level == 1 {
        Level::Raid1
    } else {
        Level::Raid5
    };
    let chunk_bytes = if level == Level::Raid5 {
        // At most 1 MiB (support::check).
        md.chunk_sectors * SECTOR as u32
    } else {
        0
    };
    let mut slot_states: Vec<u8> = (0..md.raid_disks)
        .map(|s| {
            if md.dev_roles.contains(&(s as u16)) {
                MemberState::InSync.code()
            } else {
                MemberState::Failed.code()
            }
        })
        .collect();
    let recovering = md.has(feature::RECOVERY_OFFSET);
    if recovering {
        slot_states[slot as usize] = MemberState::Rebuilding.code();
    }
    if md.devflags & DEVFLAG_WRITE_MOSTLY != 0 {
        slot_states[slot as usize] |= WRITE_MOSTLY;
    }
    let mut sb = Superblock {
        volume_uuid: md.set_uuid,
        member_uuid: md.device_uuid,
        name: array.clone(),
        level,
        layout: raid5_layout(md.layout).unwrap_or(crate::raid::geometry::Layout::LeftSymmetric),
        chunk_bytes,
        members: md.raid_disks,
        slot,
        block_size,
        data_offset: blocks("data offset", md.data_offset)?,
        data_blocks: blocks("array size per device", md.size)?,
        events: md.events,
        clean: md.resync_offset == MAX_SECTOR,
        slot_states,
        rebuild_checkpoint: 0,
        bitmap_rows_per_bit: 0,
        ctime: md.ctime,
        resync_from: 0,
        write_behind: bitmap.map_or(0, |b| b.write_behind),
        legacy: false,
    };
    let row = row_bytes(&sb);
    if !sb.clean {
        sb.resync_from = md.resync_offset * SECTOR / row;
    }
    if recovering {
        sb.rebuild_checkpoint = md.recovery_offset * SECTOR / row;
    }
    if let Some(off) = md.bitmap_sectors() {
        // The appliance keeps the bitmap where mdadm puts it, in one 4 KiB
        // block: elsewhere it could not be kept up without moving it.
        let room = md
            .data_offset
            .saturating_sub(V1_2_OFFSET + BITMAP_OFFSET_SECTORS);
        if off != BITMAP_OFFSET_SECTORS as i64 || room * SECTOR < 4096 {
            return Err(geometry(format!(
                "its bitmap is {off} sectors from the superblock with {room} sectors before the data; the appliance keeps it 8 sectors from the superblock in 4 KiB (mdadm --grow --bitmap=none, then add one back)"
            )));
        }
        // A bit covers at least one row, a power of two of them; md's
        // finer bits are folded in when the bitmap is read. An unreadable
        // bitmap gets md's default region (and is read as all dirty).
        let chunk = bitmap.map_or(64 << 20, |b| u64::from(b.chunksize));
        sb.bitmap_rows_per_bit = 1 << (chunk / row).max(1).ilog2();
    }
    Ok(sb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raid::geometry::Layout;

    fn ours() -> Superblock {
        Superblock {
            volume_uuid: [1; 16],
            member_uuid: [2; 16],
            name: "vol0".into(),
            level: Level::Raid5,
            layout: Layout::RightAsymmetric,
            chunk_bytes: 64 << 10,
            members: 4,
            slot: 2,
            block_size: 4096,
            data_offset: 256,
            data_blocks: 16 * 1024,
            events: 42,
            clean: true,
            slot_states: vec![0, 1, 2 | WRITE_MOSTLY, 0],
            rebuild_checkpoint: 99,
            bitmap_rows_per_bit: 1024,
            ctime: 1_700_000_000,
            resync_from: 0,
            write_behind: 0,
            legacy: false,
        }
    }

    fn bitmap_of(md: &MdSuperblock) -> MdBitmap {
        MdBitmap {
            version: 4,
            uuid: md.set_uuid,
            events: md.events,
            events_cleared: md.events,
            sync_size: md.size,
            state: 0,
            chunksize: 64 << 20,
            daemon_sleep: 5,
            write_behind: 0,
            sectors_reserved: 8,
            nodes: 0,
            cluster_name: [0; 64],
        }
    }

    #[test]
    fn a_member_survives_md_and_back() {
        let sb = ours();
        let md = to_md(&sb, 2);
        let bytes = md.encode();
        let md = MdSuperblock::decode(&bytes, V1_2_OFFSET, 1 << 30).unwrap();
        assert_eq!(md.slot(), Some(2));
        assert_eq!(md.dev_roles, vec![0, ROLE_FAULTY, 2, 3]);
        assert!(md.has(feature::RECOVERY_OFFSET) && md.has(feature::BITMAP_OFFSET));
        assert_eq!(md.recovery_offset, 99 * 128);
        assert_eq!(super::super::examine::array_state(&md), "A.AA");
        let mut bm = bitmap_of(&md);
        let back = from_md(&md, 4096, Some(&bm)).unwrap();
        assert_eq!(back, sb);
        // md's write-behind limit comes with its bitmap.
        bm.write_behind = 256;
        assert_eq!(from_md(&md, 4096, Some(&bm)).unwrap().write_behind, 256);
        // Another member's superblock knows only that slot 2 is held.
        let peer = from_md(
            &MdSuperblock::decode(&to_md(&sb, 0).encode(), V1_2_OFFSET, 1 << 30).unwrap(),
            4096,
            Some(&bm),
        )
        .unwrap();
        assert_eq!(peer.slot_states, vec![0, 1, 0, 0]);
        assert_eq!(peer.rebuild_checkpoint, 0);
    }

    #[test]
    fn a_resync_cut_short_is_mds_resync_offset() {
        let mut sb = ours();
        sb.clean = false;
        sb.resync_from = 5;
        let md = to_md(&sb, 0);
        assert_eq!(md.resync_offset, 5 * 128, "rows of 64 KiB");
        assert_eq!(
            from_md(&md, 4096, Some(&bitmap_of(&md)))
                .unwrap()
                .resync_from,
            5
        );
        // In use (md's "active" with no offset): everything.
        sb.resync_from = 0;
        assert_eq!(to_md(&sb, 0).resync_offset, 0);
        // Clean: md's MaxSector, whatever was left.
        sb.clean = true;
        sb.resync_from = 9;
        let md = to_md(&sb, 0);
        assert_eq!(md.resync_offset, MAX_SECTOR);
        assert_eq!(from_md(&md, 4096, None).unwrap().resync_from, 0);
    }

    #[test]
    fn spares_and_odd_geometry_are_refused_by_name() {
        let mut md = to_md(&ours(), 0);
        md.dev_roles.push(ROLE_SPARE);
        md.dev_number = 4;
        assert!(matches!(
            from_md(&md, 4096, None),
            Err(FromMdError::NotActive { role: "spare", .. })
        ));
        let mut md = to_md(&ours(), 0);
        md.data_offset = 2049;
        assert!(matches!(
            from_md(&md, 4096, None),
            Err(FromMdError::Geometry { .. })
        ));
        // A bitmap elsewhere than 8 sectors from the superblock.
        let mut md = to_md(&ours(), 0);
        md.bitmap_offset = 16;
        assert!(matches!(
            from_md(&md, 4096, None),
            Err(FromMdError::Geometry { what, .. }) if what.contains("bitmap is 16 sectors")
        ));
        let mut md = to_md(&ours(), 0);
        md.level = 6;
        assert!(matches!(
            from_md(&md, 4096, None),
            Err(FromMdError::Unsupported(w)) if w.contains("raid6")
        ));
    }
}
