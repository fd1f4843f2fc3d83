//! Where each member's metadata lives and how it is read and written:
//! md's 1.2 superblock at 4 KiB (the appliance's first format at byte 0
//! is still read), spares marked as md's, superblocks erased. Synchronous,
//! on a control thread, with a channel of its own.

use std::sync::Arc;

use bdev::{BlockDevice, IoOp};

use super::assembly::AssemblyError;
use super::md::{
    self,
    bitmap::MdBitmap,
    superblock::{MdSuperblock, MdSuperblockError, V1_2_OFFSET},
};
use super::superblock::{Superblock, SuperblockError, SUPERBLOCK_BYTES};
use super::RaidError;

/// Metadata IO of `buf` at byte `at` (a whole number of blocks); a write
/// is followed by a flush.
fn sync_io(dev: &dyn BlockDevice, op: IoOp, at: u64, buf: &mut [u8]) -> Result<(), RaidError> {
    let bs = u64::from(dev.info().block_size);
    super::metaio::sync(dev, op, at / bs, buf)?;
    if op == IoOp::Write {
        super::metaio::sync(dev, IoOp::Flush, 0, &mut [])?;
    }
    Ok(())
}

/// `len` bytes from byte `at`, or `None` past the end of the device.
fn read_at(dev: &dyn BlockDevice, at: u64, len: usize) -> Result<Option<Vec<u8>>, RaidError> {
    let info = dev.info();
    if at + len as u64 > info.num_blocks * u64::from(info.block_size) {
        return Ok(None);
    }
    super::metaio::read_bytes(dev, at, len as u64).map(Some)
}

/// Read a device's superblock: md's 1.2 at 4 KiB (and its bitmap's chunk
/// size), else the appliance's first format at byte 0. Other md versions
/// are named as such (never taken for blank).
pub fn read_superblock(
    dev: &dyn BlockDevice,
) -> Result<Result<Superblock, SuperblockError>, RaidError> {
    let info = dev.info();
    let bs = info.block_size;
    let sectors = info.num_blocks * u64::from(bs) / md::SECTOR;
    let Some(head) = read_at(dev, 0, 2 * SUPERBLOCK_BYTES)? else {
        return Ok(Err(SuperblockError::Foreign));
    };
    let md_magic = md::superblock::MAGIC.to_le_bytes();
    let legacy = Superblock::decode_legacy(&head);
    // md's superblock wins over the first format's of the same volume (a
    // conversion writes md's before erasing the old). Of another volume,
    // either may be the disk's earlier life: md leaves the first 4 KiB
    // alone, and the first format never wrote at 4 KiB without a bitmap.
    // Taking the first format's made the disk a member of that volume
    // again and wrote over an md array's; which is newer cannot be told,
    // so the device is not used until one of them is wiped.
    let other = |m: &MdSuperblock| legacy.as_ref().ok().filter(|l| l.volume_uuid != m.set_uuid);
    if head[SUPERBLOCK_BYTES..SUPERBLOCK_BYTES + 4] == md_magic {
        let m = match MdSuperblock::decode(&head[SUPERBLOCK_BYTES..], V1_2_OFFSET, sectors) {
            Ok(m) if other(&m).is_some() => {
                let l = other(&m).map_or(String::new(), |l| l.name.clone());
                return Ok(Err(SuperblockError::Md(format!(
                    "two superblocks: the appliance's first format of volume {l:?} at 0 and md's of array {:?} at 4 KiB, and which is newer cannot be told: wipe the stale one (md's with `wipefs -a -t linux_raid_member`, the appliance's is its first 4 KiB)",
                    m.name()
                ))));
            }
            Ok(m) => m,
            // A conversion of this volume cut short in its md write (the
            // volume's own UUID, the rest torn: a checksum that fails, or
            // the version or size read before it: review) leaves the
            // first format in charge. Anything else beside a first-format
            // block is an md superblock md would still take: another
            // array's, or this one's read whole but refused (md changed
            // the array since), one with a feature or size this reader
            // refuses: taking the old volume's wrote over it (audit).
            Err(
                MdSuperblockError::Corrupt { .. }
                | MdSuperblockError::MajorVersion(_)
                | MdSuperblockError::Invalid {
                    field: "max_dev", ..
                },
            ) if legacy.as_ref().is_ok_and(|l| {
                    head[SUPERBLOCK_BYTES + 16..SUPERBLOCK_BYTES + 32] == l.volume_uuid
                }) =>
            {
                return Ok(legacy)
            }
            Err(e) if legacy.is_ok() => {
                return Ok(Err(SuperblockError::Md(format!(
                    "two superblocks: the appliance's first format at 0 and an md superblock at 4 KiB this appliance cannot read ({e}); which is newer cannot be told: wipe the stale one (md's with `wipefs -a -t linux_raid_member`, the appliance's is its first 4 KiB)"
                ))))
            }
            Err(MdSuperblockError::Corrupt { stored, computed }) => {
                return Ok(Err(SuperblockError::Corrupt { stored, computed }))
            }
            Err(e) => return Ok(Err(SuperblockError::Md(e.to_string()))),
        };
        let bitmap = match m.bitmap_sectors() {
            Some(off) => {
                let at = (V1_2_OFFSET as i64 + off).max(0) as u64;
                let room = m.data_offset.saturating_sub(at);
                read_at(dev, at * md::SECTOR, bs.max(512) as usize)?
                    .and_then(|b| MdBitmap::decode(&b, room).ok())
                    // Another array's block (a device's earlier life) is
                    // no bitmap of this one: unreadable, not a refusal.
                    .filter(|b| b.uuid == m.set_uuid)
            }
            None => None,
        };
        return Ok(
            md::convert::from_md(&m, bs, bitmap.as_ref()).map_err(|e| match e {
                md::convert::FromMdError::NotActive { role: "spare", .. } => {
                    SuperblockError::MdSpare {
                        array: m.set_uuid,
                        name: m.name(),
                    }
                }
                e => SuperblockError::Md(e.to_string()),
            }),
        );
    }
    match legacy {
        Err(SuperblockError::Foreign) => {}
        other => return Ok(other),
    }
    // md's other versions: 1.1 at the start, 1.0 near the end.
    let end = md::superblock::v1_0_offset(sectors) * md::SECTOR;
    let tail = read_at(dev, end, SUPERBLOCK_BYTES)?;
    for (version, b) in [("1.1", Some(&head)), ("1.0", tail.as_ref())] {
        if b.is_some_and(|b| b[..4] == md_magic) {
            return Ok(Err(SuperblockError::Md(format!(
                "an md superblock version {version} (the appliance serves md 1.2)"
            ))));
        }
    }
    // md 0.90 and external metadata: never taken for blank.
    if let Some((_, what)) = super::examine::foreign_metadata(dev)? {
        return Ok(Err(SuperblockError::Md(what.into())));
    }
    Ok(Err(SuperblockError::Foreign))
}

/// Write `sb` as md's 1.2 superblock; a member still in the first format
/// loses its old superblock once the new one is durable.
pub fn write_superblock(dev: &dyn BlockDevice, sb: &Superblock) -> Result<(), AssemblyError> {
    let io = |e: RaidError| AssemblyError::Io {
        device: dev.info().name.clone(),
        reason: e.to_string(),
    };
    let mut buf = md::convert::to_md(sb, sb.slot).encode();
    sync_io(dev, IoOp::Write, md::convert::SUPERBLOCK_BYTE, &mut buf).map_err(io)?;
    // The first format's superblock goes once md's is durable; also one a
    // conversion cut short left behind (this volume's only: the first 4 KiB
    // are not ours otherwise, md leaves them to boot loaders).
    let leftover = sb.legacy
        || read_at(dev, 0, SUPERBLOCK_BYTES)
            .map_err(io)?
            .is_some_and(|b| {
                Superblock::decode_legacy(&b).is_ok_and(|l| l.volume_uuid == sb.volume_uuid)
            });
    if leftover {
        let mut zero = vec![0u8; SUPERBLOCK_BYTES];
        sync_io(dev, IoOp::Write, 0, &mut zero).map_err(io)?;
    }
    Ok(())
}

/// At a clean stop, mark each of `spares` md's spare of the volume
/// `template` describes (device numbers after the slots), so md assembles
/// them as its spares; the appliance reads them as blank spares again.
/// Best effort: a spare that cannot take it is only logged.
pub fn write_spare_superblocks(template: &Superblock, spares: &[Arc<dyn BlockDevice>]) {
    for (i, dev) in spares.iter().enumerate() {
        let md = md::convert::spare_to_md(template, template.members + i as u32);
        let mut buf = md.encode();
        if let Err(e) = sync_io(
            dev.as_ref(),
            IoOp::Write,
            md::convert::SUPERBLOCK_BYTE,
            &mut buf,
        ) {
            tracing::warn!(device = %dev.info().name, error = %e, "spare's md superblock not written");
        }
    }
}

/// Erase `dev`'s superblock, if it carries one: a device that becomes a
/// spare (or a replacement being copied to) is blank until it takes a
/// slot, as md's --add writes its own metadata over what was there. So a
/// restart finds it blank (a spare again), never a stale member of this or
/// another volume.
///
/// What else a forced add leaves it holding goes too (only then can it be
/// there): md's metadata at the end of the device (1.0, 0.90, IMSM and
/// DDF anchors: udev's `mdadm -I` would assemble the old array over it
/// at the next boot) and a journal's superblocks. A former member of the
/// same volume keeps everything past its first 8 KiB: a re-add copies
/// only what its bitmap marks.
pub fn erase_superblock(dev: &dyn BlockDevice) -> Result<(), AssemblyError> {
    let io = |e: RaidError| AssemblyError::Io {
        device: dev.info().name.clone(),
        reason: e.to_string(),
    };
    let found = read_superblock(dev).map_err(io)?;
    let journal = super::journal::holds_journal(dev);
    if matches!(found, Err(SuperblockError::Foreign)) && !journal {
        return Ok(());
    }
    // Both formats' places: the first format's at 0, md's at 4 KiB.
    let mut zero = vec![0u8; 2 * SUPERBLOCK_BYTES];
    sync_io(dev, IoOp::Write, 0, &mut zero).map_err(io)?;
    if matches!(found, Err(SuperblockError::Md(_))) {
        let bytes = dev.info().num_blocks * u64::from(dev.info().block_size);
        // md 1.0's superblock and 0.90's, and the last 64 KiB (IMSM's and
        // DDF's anchors, 1.0's among them on small devices).
        let sectors = bytes / md::SECTOR;
        let v10 = md::superblock::v1_0_offset(sectors) * md::SECTOR;
        let v090 = md::superblock::v0_90_byte(bytes);
        let tail = bytes.saturating_sub(64 << 10);
        for (at, len) in [(v10, 4096), (v090, 4096), (tail, bytes - tail)] {
            if at >= 2 * SUPERBLOCK_BYTES as u64 && len > 0 {
                let mut zero = vec![0u8; len as usize];
                sync_io(dev, IoOp::Write, at, &mut zero).map_err(io)?;
            }
        }
    }
    if journal {
        super::journal::erase(dev).map_err(io)?;
    }
    Ok(())
}

/// The places [`erase_superblock`] and a journal's format write, as they
/// were read: a forced call that writes them and is then refused (its
/// change ran out of time) puts them back, leaving the device as it was.
pub struct MetadataPlaces {
    head: Vec<u8>,
    tail_at: u64,
    tail: Vec<u8>,
}

impl MetadataPlaces {
    /// The first 8 KiB (both formats' superblocks, a journal's first
    /// copy) and the last 128 KiB (md 1.0's and 0.90's superblocks, other
    /// RAID formats' anchors, a journal's second copy) of `dev`.
    pub fn read(dev: &dyn BlockDevice) -> Result<MetadataPlaces, RaidError> {
        let bs = u64::from(dev.info().block_size.max(1));
        let bytes = dev.info().num_blocks * bs;
        let head_len = (2 * SUPERBLOCK_BYTES as u64).div_ceil(bs) * bs;
        let head_len = head_len.min(bytes);
        let tail_at = (bytes.saturating_sub(128 << 10) / bs * bs).max(head_len);
        let mut head = vec![0u8; head_len as usize];
        let mut tail = vec![0u8; (bytes - tail_at) as usize];
        sync_io(dev, IoOp::Read, 0, &mut head)?;
        if !tail.is_empty() {
            sync_io(dev, IoOp::Read, tail_at, &mut tail)?;
        }
        Ok(MetadataPlaces {
            head,
            tail_at,
            tail,
        })
    }

    /// Write them back as they were read.
    pub fn restore(&self, dev: &dyn BlockDevice) -> Result<(), RaidError> {
        sync_io(dev, IoOp::Write, 0, &mut self.head.clone())?;
        if !self.tail.is_empty() {
            sync_io(dev, IoOp::Write, self.tail_at, &mut self.tail.clone())?;
        }
        Ok(())
    }
}

/// What `dev` holds that is not ours to overwrite, said as "{device}
/// ...": another volume's superblock (ours or md's), md's or other RAID
/// metadata, or a superblock that cannot be used (damaged, or of a newer
/// format: a damaged member of a real volume is not a blank device). The
/// superblock (or md spare mark) of volume `own` is no reason to refuse:
/// a former member coming back. None: blank.
pub fn foreign_holder(dev: &dyn BlockDevice, own: Option<[u8; 16]>) -> Option<String> {
    match read_superblock(dev) {
        Ok(Err(SuperblockError::Foreign)) => None,
        Ok(Ok(sb)) if own == Some(sb.volume_uuid) => None,
        Ok(Err(SuperblockError::MdSpare { array, .. })) if own == Some(array) => None,
        Ok(Ok(sb)) => Some(format!("already belongs to volume {:?}", sb.name)),
        Ok(Err(e @ (SuperblockError::Md(_) | SuperblockError::MdSpare { .. }))) => {
            Some(format!("holds md metadata ({e})"))
        }
        Ok(Err(e)) => Some(format!("holds a superblock that cannot be used ({e})")),
        Err(e) => Some(format!("cannot be read to see what it holds ({e})")),
    }
}
