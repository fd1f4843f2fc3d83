//! Creating RAID volumes on fresh members, recording their state in the
//! members' superblocks, and assembling them again from what is on the
//! devices at start-up.
//!
//! Superblock IO here is synchronous, on the calling control thread, with a
//! channel of its own: it happens at creation, at start-up and after a
//! configuration change, never on the IO path.

use std::collections::BTreeMap;
use std::sync::Arc;

use bdev::BlockDevice;

use super::bitmap::{self, Bitmap};
use super::geometry::Layout;
use super::level::RaidDevice;
use super::md;
pub use super::member_meta::{
    erase_superblock, foreign_holder, read_superblock, write_spare_superblocks, write_superblock,
    MetadataPlaces,
};
use super::members::{FailureSink, Member, MemberSet, MemberState, WRITE_MOSTLY};
use super::raid1::Raid1Device;
use super::raid5::Raid5Device;
use super::superblock::{Level, Superblock, SuperblockError, SUPERBLOCK_BYTES};
use super::RaidError;

/// What to create.
#[derive(Clone)]
pub struct VolumeSpec {
    /// Volume name (at most 32 bytes).
    pub name: String,
    /// Level.
    pub level: Level,
    /// RAID5 layout.
    pub layout: Layout,
    /// RAID5 chunk in bytes.
    pub chunk_bytes: u32,
    /// First data block on each member (at least the superblock's 4 KiB).
    pub data_offset: u64,
    /// Members in slot order.
    pub members: Vec<Arc<dyn BlockDevice>>,
    /// Write-intent bitmap region in member bytes (0: no bitmap).
    pub bitmap_chunk_bytes: u64,
    /// The members hold only zeros, so parity and mirrors agree from the
    /// start. Otherwise the new volume is recorded dirty, its bitmap (if
    /// any) all marked, and it is owed a resync (md's initial sync), which
    /// opening it as not clean starts: a read-modify-write would carry the
    /// old data's parity forward, and a member lost later would be rebuilt
    /// from it as garbage.
    pub zeroed: bool,
}

impl VolumeSpec {
    /// A volume of `level` over `members` with md's defaults: left-symmetric
    /// layout, 64 KiB chunks, data from member block 256 (1 MiB of 4 KiB
    /// blocks: room for the superblock and a bitmap), no bitmap.
    pub fn new(name: &str, level: Level, members: Vec<Arc<dyn BlockDevice>>) -> VolumeSpec {
        VolumeSpec {
            name: name.into(),
            level,
            layout: Layout::LeftSymmetric,
            chunk_bytes: 64 << 10,
            data_offset: 256,
            members,
            bitmap_chunk_bytes: 0,
            zeroed: true,
        }
    }
}

/// The persistent identity of a volume and its members.
#[derive(Debug, Clone)]
pub struct VolumeMeta {
    /// Template superblock (slot, member uuid and states filled per write).
    pub template: Superblock,
    /// Member uuids by slot.
    pub member_uuids: Vec<[u8; 16]>,
}

/// Why creating or assembling failed.
#[derive(Debug, thiserror::Error)]
pub enum AssemblyError {
    /// A parameter is wrong.
    #[error("{0}")]
    Invalid(String),
    /// A member already carries a superblock and force was not given.
    #[error(
        "{device} already belongs to volume {volume:?}; refusing to overwrite it without force"
    )]
    InUse {
        /// The device.
        device: String,
        /// The volume named in its superblock.
        volume: String,
    },
    /// It holds metadata that is not blank but names no volume of ours:
    /// md's, or a superblock that cannot be used.
    #[error("{device} holds {what}; refusing to overwrite it without force")]
    Holds {
        /// The device.
        device: String,
        /// What it holds.
        what: String,
    },
    /// Superblock IO failed.
    #[error("{device}: superblock IO: {reason}")]
    Io {
        /// The device.
        device: String,
        /// What went wrong.
        reason: String,
    },
}

/// Whether `sb`'s layout fits the device it was read from: checked at
/// every assembly, not only at create (a superblock is the disk's word,
/// not ours).
pub fn fits_device(dev: &dyn BlockDevice, sb: &Superblock) -> Result<(), String> {
    let info = dev.info();
    let bad = |what: String| Err(format!("superblock of {:?}: {what}", sb.name));
    if sb.block_size != info.block_size {
        return bad(format!(
            "block size {} but the device has {}",
            sb.block_size, info.block_size
        ));
    }
    if sb
        .data_offset
        .checked_mul(sb.block_size as u64)
        .is_none_or(|b| b < SUPERBLOCK_BYTES as u64)
    {
        return bad(format!(
            "data offset {} overlaps the superblock",
            sb.data_offset
        ));
    }
    if sb.data_blocks == 0
        || sb
            .data_offset
            .checked_add(sb.data_blocks)
            .is_none_or(|end| end > info.num_blocks)
    {
        return bad(format!(
            "data at {}+{} blocks runs past the device's {}",
            sb.data_offset, sb.data_blocks, info.num_blocks
        ));
    }
    // A first-format volume is converted to md's by its next record: md's
    // superblock (and bitmap) must fit before the data.
    let need = md::convert::BITMAP_BYTE + if sb.bitmap_rows_per_bit > 0 { 4096 } else { 0 };
    if sb.legacy && sb.data_offset * u64::from(sb.block_size) < need {
        return bad(format!(
            "data offset {} blocks leaves no room for md's superblock and bitmap ({need} bytes): this version cannot take the volume over",
            sb.data_offset
        ));
    }
    Ok(())
}

impl VolumeMeta {
    /// Write the superblock of every member that is not failed (nor
    /// reported gone), with the events counter bumped: the record of
    /// `device`'s current state.
    pub fn record(&mut self, device: &dyn RaidDevice, clean: bool) -> Result<(), AssemblyError> {
        let codes = device
            .member_set()
            .members
            .iter()
            .map(|m| m.code())
            .collect();
        self.record_codes(device, codes, clean)
    }

    /// [`record`](Self::record) with the slot bytes given (a recorder that
    /// read the gone flags at a chosen moment). Every live member is
    /// written, whatever happens to the others; one whose write fails is
    /// reported failed (md marks a member whose superblock cannot be
    /// written faulty). An error only if no member took it, and then the
    /// record is as before.
    pub fn record_codes(
        &mut self,
        device: &dyn RaidDevice,
        codes: Vec<u8>,
        clean: bool,
    ) -> Result<(), AssemblyError> {
        // A count that would reach the limit is never written: every
        // member would be refused at the next start (a crafted count just
        // below it: audit). The change is refused instead, loudly.
        if self.template.events + 1 >= super::superblock::EVENTS_LIMIT {
            return Err(AssemblyError::Invalid(format!(
                "the volume's event count ({}) is at its limit: no change can be recorded",
                self.template.events
            )));
        }
        let before = (
            self.template.events,
            self.template.clean,
            self.template.slot_states.clone(),
        );
        self.template.events += 1;
        self.template.clean = clean;
        self.template.slot_states = codes;
        let set = device.member_set();
        // A member converted from the first format gets md's bitmap before
        // md's superblock overwrites the first format's bitmap.
        if let (true, Some(b)) = (self.template.legacy, &set.bitmap) {
            b.set_events(self.template.events);
            b.set_write_behind(set.behind.limit());
            b.rewrite();
        }
        let mut written = 0;
        let mut first_error = None;
        for (slot, m) in set.members.iter().enumerate() {
            let failed =
                self.template.slot_states[slot] & !WRITE_MOSTLY == MemberState::Failed.code();
            if failed || m.is_gone() {
                continue;
            }
            let mut sb = self.template.clone();
            sb.slot = slot as u32;
            sb.member_uuid = self.member_uuids[slot];
            match write_superblock(m.dev.as_ref(), &sb) {
                Ok(()) => written += 1,
                Err(e) => {
                    tracing::error!(device = %m.dev.info().name, error = %e, "superblock not written; the member is failed");
                    set.failures.report(slot, m, bdev::IoError::DeviceFailed);
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if written == 0 => {
                (
                    self.template.events,
                    self.template.clean,
                    self.template.slot_states,
                ) = before;
                Err(e)
            }
            _ => {
                self.template.legacy = false;
                // md takes a bitmap older than its superblock for stale.
                if let Some(b) = &set.bitmap {
                    b.set_events(self.template.events);
                    // md keeps a mirror's write-behind limit in its bitmap.
                    b.set_write_behind(set.behind.limit());
                    let (ok, errors) = b.rewrite();
                    if ok == 0 && !errors.is_empty() {
                        tracing::warn!(errors = ?errors, "bitmap events not brought up to date: md would resync the whole array");
                    }
                }
                Ok(())
            }
        }
    }
}

/// Create a volume on `spec.members`, writing fresh superblocks. Members
/// that already carry one of ours are refused unless `force`.
pub fn create(
    spec: &VolumeSpec,
    failures: FailureSink,
    force: bool,
) -> Result<(Arc<dyn RaidDevice>, VolumeMeta), AssemblyError> {
    if spec.name.is_empty() || spec.name.len() > 32 {
        return Err(AssemblyError::Invalid(
            "volume name must be 1..=32 bytes".into(),
        ));
    }
    let Some(first) = spec.members.first() else {
        return Err(AssemblyError::Invalid("no members".into()));
    };
    let bs = first.info().block_size;
    if spec.data_offset * (bs as u64) < md::convert::BITMAP_BYTE {
        return Err(AssemblyError::Invalid(format!(
            "data offset {} blocks leaves no room for md's superblock (4 KiB at 4 KiB)",
            spec.data_offset
        )));
    }
    for dev in &spec.members {
        match read_superblock(dev.as_ref()) {
            Ok(Ok(sb)) if !force => {
                return Err(AssemblyError::InUse {
                    device: dev.info().name.clone(),
                    volume: sb.name,
                })
            }
            // md's metadata, or a superblock of ours that cannot be used
            // (damaged, newer): what it belongs to is not known, it is
            // not blank.
            Ok(Err(SuperblockError::Foreign)) => {}
            Ok(Err(e)) if !force => {
                return Err(AssemblyError::Holds {
                    device: dev.info().name.clone(),
                    what: e.to_string(),
                })
            }
            Ok(_) => {}
            Err(e) => {
                return Err(AssemblyError::Io {
                    device: dev.info().name.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }
    let members: Vec<Member> = spec
        .members
        .iter()
        .map(|d| Member::new(d.clone(), MemberState::InSync))
        .collect();
    let device = build(spec, members, failures, None)?;
    let data_blocks = spec
        .members
        .iter()
        .map(|m| m.info().num_blocks)
        .min()
        .unwrap_or(0)
        - spec.data_offset;
    let mut meta = VolumeMeta {
        template: Superblock {
            volume_uuid: *uuid::Uuid::new_v4().as_bytes(),
            member_uuid: [0; 16],
            name: spec.name.clone(),
            level: spec.level,
            layout: spec.layout,
            chunk_bytes: spec.chunk_bytes,
            members: spec.members.len() as u32,
            slot: 0,
            block_size: bs,
            data_offset: spec.data_offset,
            data_blocks,
            events: 0,
            clean: spec.zeroed,
            slot_states: vec![0; spec.members.len()],
            rebuild_checkpoint: 0,
            bitmap_rows_per_bit: 0,
            ctime: md::convert::now(),
            resync_from: 0,
            write_behind: 0,
            legacy: false,
        },
        member_uuids: spec
            .members
            .iter()
            .map(|_| *uuid::Uuid::new_v4().as_bytes())
            .collect(),
    };
    let device = if spec.bitmap_chunk_bytes > 0 {
        let b = bitmap_in_memory(device.as_ref(), &meta.template, spec.bitmap_chunk_bytes)
            .map_err(|e| AssemblyError::Invalid(e.to_string()))?;
        if !spec.zeroed {
            // Every region owed the initial sync, kept (on disk too)
            // until it has covered them: a restart before it ends goes on
            // with what is left.
            b.load(&b.all_dirty());
            b.freeze();
        }
        write_bitmap(device.as_ref(), &b).map_err(|e| AssemblyError::Invalid(e.to_string()))?;
        meta.template.bitmap_rows_per_bit = b.rows_per_bit();
        device.with_member_set(device.member_set().with_bitmap(Some(b)))
    } else {
        device
    };
    meta.record(device.as_ref(), spec.zeroed)?;
    Ok((device, meta))
}

/// A clear write-intent bitmap of `chunk_bytes` regions for `device`, in
/// memory only (see [`write_bitmap`]).
pub fn bitmap_in_memory(
    device: &dyn RaidDevice,
    sb: &Superblock,
    chunk_bytes: u64,
) -> Result<Arc<Bitmap>, RaidError> {
    if !bitmap::fits(sb.data_offset, sb.block_size) {
        return Err(RaidError::Invalid(format!(
            "the data offset ({} blocks) leaves no room for a bitmap: it needs {} bytes after the superblock",
            sb.data_offset,
            bitmap::BYTES
        )));
    }
    let rows = device.rows();
    let rpb = bitmap::rows_per_bit(&rows, chunk_bytes);
    Ok(Arc::new(Bitmap::new(&rows, rpb, sb.volume_uuid)?))
}

/// Write bitmap `b` (clear, or all marked for a new volume owed its
/// initial sync) to `device`'s members that are not failed, and
/// hand it those that took it. A member that cannot take it is reported
/// failed, as one whose superblock cannot be written (md faults a member
/// whose bitmap write fails); an error only if none took it.
pub fn write_bitmap(device: &dyn RaidDevice, b: &Arc<Bitmap>) -> Result<(), RaidError> {
    let set = device.member_set();
    let bits = b.snapshot();
    let mut took = Vec::new();
    let mut errors = Vec::new();
    let mut missed = Vec::new();
    for (slot, m) in set.members.iter().enumerate() {
        if m.recorded_state() == MemberState::Failed {
            continue;
        }
        let (ok, e) = b.write_to(std::slice::from_ref(&m.dev), &bits);
        if ok == 1 {
            took.push(m.dev.clone());
        } else {
            tracing::error!(device = %m.dev.info().name, errors = ?e, "bitmap not written; the member is failed");
            set.failures.report(slot, m, bdev::IoError::DeviceFailed);
            missed.push(Arc::downgrade(&m.dev));
            errors.extend(e);
        }
    }
    if took.is_empty() && !errors.is_empty() {
        return Err(RaidError::Invalid(format!(
            "writing the bitmap: {}",
            errors.join("; ")
        )));
    }
    b.set_members(took);
    b.set_missed_first(missed);
    b.hold_for(&set.members, &set.failures);
    Ok(())
}

/// The devices of `device`'s members that are not failed.
pub fn live_members(device: &dyn RaidDevice) -> Vec<Arc<dyn BlockDevice>> {
    device
        .member_set()
        .members
        .iter()
        .filter(|m| m.recorded_state() != MemberState::Failed)
        .map(|m| m.dev.clone())
        .collect()
}

/// `device` with the bitmap its superblock `sb` names. After an unclean
/// shutdown its bits are read from the members (the union; every region
/// when none is readable), so the resync covers what they mark.
fn attach_bitmap(
    device: Arc<dyn RaidDevice>,
    sb: &Superblock,
) -> Result<Arc<dyn RaidDevice>, RaidError> {
    if sb.bitmap_rows_per_bit == 0 {
        return Ok(device);
    }
    let rows = device.rows();
    let (b, readable) = match Bitmap::new(&rows, sb.bitmap_rows_per_bit, sb.volume_uuid) {
        Ok(b) => (b, true),
        // A first-format geometry md's bitmap cannot hold (more bits than
        // fit after md's header, regions past 2 GiB): coarser regions, and
        // after a crash every one of them dirty.
        Err(e) => {
            let region = sb
                .bitmap_rows_per_bit
                .saturating_mul(rows.blocks * rows.block_size as u64);
            let rpb = bitmap::rows_per_bit(&rows, region);
            tracing::warn!(volume = sb.name, error = %e, rows_per_bit = rpb, "bitmap regions changed for md's format");
            (Bitmap::new(&rows, rpb, sb.volume_uuid)?, false)
        }
    };
    let b = Arc::new(b);
    b.set_events(sb.events);
    let members = live_members(device.as_ref());
    if !sb.clean && !readable {
        b.load(&b.all_dirty());
        b.freeze();
    } else if !sb.clean {
        let (dirty, problems) = b.read_union(&members, sb.legacy);
        if !problems.is_empty() {
            tracing::warn!(volume = sb.name, problems = ?problems, "write-intent bitmap not readable on every member");
        }
        b.load(&dirty);
        // The bits stay until a resync (or a rebuild) has covered them.
        b.freeze();
    }
    b.set_members(members);
    b.hold_for(&device.member_set().members, &device.member_set().failures);
    Ok(device.with_member_set(device.member_set().with_bitmap(Some(b))))
}

/// The device of `spec` over `members`, using at most `limit` blocks of
/// each (the recorded size; `None` for a new volume).
fn build(
    spec: &VolumeSpec,
    members: Vec<Member>,
    failures: FailureSink,
    limit: Option<u64>,
) -> Result<Arc<dyn RaidDevice>, AssemblyError> {
    let e = |e: bdev::BdevError| AssemblyError::Invalid(e.to_string());
    let set = MemberSet::new(members, failures).with_limit(limit);
    Ok(match spec.level {
        Level::Raid1 => Arc::new(Raid1Device::over(&spec.name, set, spec.data_offset).map_err(e)?),
        Level::Raid5 => Arc::new(
            Raid5Device::over(
                &spec.name,
                set,
                spec.chunk_bytes,
                spec.layout,
                spec.data_offset,
            )
            .map_err(e)?,
        ),
    })
}

/// A device and the superblock read from it.
type Found = (Arc<dyn BlockDevice>, Superblock);

/// A volume found on the devices.
pub struct Assembled {
    /// Its device, degraded where members are missing or stale.
    pub device: Arc<dyn RaidDevice>,
    /// Its identity, to record later changes.
    pub meta: VolumeMeta,
    /// Members by slot (a failed slot holds whatever device was there, or
    /// none).
    pub members: Vec<Option<Arc<dyn BlockDevice>>>,
    /// Devices whose superblock was older than their peers'.
    pub stale: Vec<String>,
    /// Whether the last shutdown was clean.
    pub was_clean: bool,
}

/// What assembly found.
#[derive(Default)]
pub struct AssemblyReport {
    /// Volumes that could start.
    pub volumes: Vec<Assembled>,
    /// Devices or volumes that could not be used, with the reason. Nothing
    /// here has been written to.
    pub problems: Vec<(String, String)>,
}

/// Find the volumes on `devices` and assemble them. Blank or foreign
/// devices are ignored; corrupt superblocks, stale members and volumes
/// missing too many members are reported, never overwritten.
pub fn assemble(
    devices: &[Arc<dyn BlockDevice>],
    failures: impl Fn(&str) -> FailureSink,
) -> AssemblyReport {
    let mut report = AssemblyReport::default();
    let mut groups: BTreeMap<[u8; 16], Vec<Found>> = BTreeMap::new();
    for dev in devices {
        let name = dev.info().name.clone();
        match read_superblock(dev.as_ref()) {
            Ok(Ok(sb)) => match fits_device(dev.as_ref(), &sb) {
                Ok(()) => groups
                    .entry(sb.volume_uuid)
                    .or_default()
                    .push((dev.clone(), sb)),
                Err(why) => report.problems.push((name, why)),
            },
            // md's spares hold no slot: spares are the caller's to name.
            Ok(Err(SuperblockError::Foreign | SuperblockError::MdSpare { .. })) => {}
            Ok(Err(e)) => report.problems.push((name, e.to_string())),
            Err(e) => report
                .problems
                .push((name, format!("reading the superblock: {e}"))),
        }
    }
    for (_, found) in groups {
        let Some(newest) = found.iter().map(|(_, sb)| sb.events).max() else {
            continue;
        };
        // The reference is an in-sync member's superblock where one is among
        // the newest (a member being rebuilt records the same events, and
        // it named a stale spare that had failed before it a split brain:
        // review), else the first of them.
        let own_in_sync = |sb: &Superblock| {
            sb.slot_states
                .get(sb.slot as usize)
                .is_some_and(|c| c & !WRITE_MOSTLY == MemberState::InSync.code())
        };
        let Some((auth_dev, auth)) = found
            .iter()
            .find(|(_, sb)| sb.events == newest && own_in_sync(sb))
            .or_else(|| found.iter().find(|(_, sb)| sb.events == newest))
        else {
            continue;
        };
        split_brain(auth_dev, auth, &found, &mut report.problems);
        let mut auth = auth.clone();
        let n = auth.members as usize;
        let mut slots: Vec<Option<Arc<dyn BlockDevice>>> = vec![None; n];
        let mut stale = Vec::new();
        let mut behind: Vec<(Arc<dyn BlockDevice>, usize)> = Vec::new();
        let mut ok = true;
        for (dev, sb) in &found {
            // A mirror has no chunk or layout (the first format recorded
            // the defaults, md's records none).
            let striped = auth.level == Level::Raid5;
            let same_geometry = sb.level == auth.level
                && sb.members == auth.members
                && (!striped || sb.chunk_bytes == auth.chunk_bytes)
                && (!striped || sb.layout == auth.layout)
                && sb.data_offset == auth.data_offset
                && sb.block_size == auth.block_size;
            if !same_geometry && sb.events < newest {
                // A leftover of the geometry before a change (a takeover
                // whose record a power cut kept from this member, a member
                // long gone) is stale, as md takes it; only a current one
                // disagrees.
                stale.push(dev.info().name.clone());
                continue;
            }
            if !same_geometry {
                report.problems.push((
                    dev.info().name.clone(),
                    format!(
                        "superblock of {:?} disagrees with its peers on the geometry",
                        auth.name
                    ),
                ));
                ok = false;
                continue;
            }
            // One event behind (md's margin): a power cut in the middle
            // of a superblock update, which writes members one after the
            // other before any IO of the new state. Such a member fills
            // its slot only if no up-to-date device claims it (below).
            if sb.events < newest {
                if sb.events + 1 == newest {
                    behind.push((dev.clone(), sb.slot as usize));
                } else {
                    stale.push(dev.info().name.clone());
                }
                continue;
            }
            let slot = sb.slot as usize;
            if slots[slot].is_some() {
                report.problems.push((
                    dev.info().name.clone(),
                    format!("two devices claim slot {slot} of {:?}", auth.name),
                ));
                ok = false;
                continue;
            }
            slots[slot] = Some(dev.clone());
        }
        for (dev, slot) in behind {
            // Only a slot the newest record still trusts (in sync or being
            // rebuilt): a member failed by the last update keeps the older
            // superblock, and stays stale.
            let code = auth.slot_states.get(slot).map(|c| c & !WRITE_MOSTLY);
            let trusted = code != Some(MemberState::Failed.code()) && code.is_some();
            if slots.get(slot).is_some_and(|s| s.is_none()) && trusted {
                tracing::warn!(device = %dev.info().name, volume = %auth.name, "member one event behind its peers (an interrupted superblock update): taken as current");
                slots[slot] = Some(dev);
            } else {
                stale.push(dev.info().name.clone());
            }
        }
        if !ok {
            continue;
        }
        // md keeps a device's recovery and write-mostly flag in its own
        // superblock only: the slot's holder says them.
        for (slot, holder) in slots.iter().enumerate() {
            let Some(dev) = holder else { continue };
            let Some((_, own)) = found.iter().find(|(d, _)| Arc::ptr_eq(d, dev)) else {
                continue;
            };
            let held = auth.slot_states[slot] & !WRITE_MOSTLY != MemberState::Failed.code();
            if own.legacy || !held {
                continue;
            }
            auth.slot_states[slot] = own.slot_states[slot];
            if own.slot_states[slot] & !WRITE_MOSTLY == MemberState::Rebuilding.code() {
                auth.rebuild_checkpoint = own.rebuild_checkpoint;
            }
        }
        let members: Vec<Member> = (0..n)
            .map(|slot| {
                let code = auth.slot_states.get(slot).copied().unwrap_or(0);
                let in_sync = code & !WRITE_MOSTLY == MemberState::InSync.code();
                let mut m = match (&slots[slot], in_sync) {
                    (Some(dev), true) => Member::new(dev.clone(), MemberState::InSync),
                    // Missing, stale, failed or only partly rebuilt: not
                    // trusted. A placeholder keeps the slot.
                    (dev, _) => Member::new(
                        dev.clone().unwrap_or_else(|| placeholder(&slots, &found)),
                        MemberState::Failed,
                    ),
                };
                m.write_mostly = code & WRITE_MOSTLY != 0;
                m
            })
            .collect();
        // A member that was being rebuilt resumes from its checkpoint.
        let resume = (0..n).find(|&slot| {
            auth.slot_states.get(slot).map(|c| c & !WRITE_MOSTLY)
                == Some(MemberState::Rebuilding.code())
                && slots[slot].is_some()
        });
        let missing = members
            .iter()
            .filter(|m| m.state == MemberState::Failed)
            .count();
        let tolerated = match auth.level {
            Level::Raid1 => n - 1,
            Level::Raid5 => 1,
        };
        if missing > tolerated {
            report.problems.push((
                auth.name.clone(),
                format!("cannot start: {missing} of {n} members missing or stale (at most {tolerated} tolerated)"),
            ));
            continue;
        }
        let spec = VolumeSpec {
            name: auth.name.clone(),
            level: auth.level,
            layout: auth.layout,
            chunk_bytes: auth.chunk_bytes,
            data_offset: auth.data_offset,
            members: members.iter().map(|m| m.dev.clone()).collect(),
            bitmap_chunk_bytes: 0,
            zeroed: false,
        };
        let member_uuids = (0..n)
            .map(|slot| {
                found
                    .iter()
                    .find(|(d, sb)| {
                        sb.slot as usize == slot
                            && slots[slot].as_ref().is_some_and(|s| Arc::ptr_eq(s, d))
                    })
                    .map_or_else(
                        || *uuid::Uuid::new_v4().as_bytes(),
                        |(_, sb)| sb.member_uuid,
                    )
            })
            .collect();
        let limit = auth.data_offset.saturating_add(auth.data_blocks);
        let built = build(&spec, members, failures(&auth.name), Some(limit))
            .and_then(|device| {
                // Each member is used up to the recorded size (the limit);
                // a volume of another size means the geometry and the
                // record disagree.
                let want = match auth.level {
                    Level::Raid1 => auth.data_blocks,
                    Level::Raid5 => (n as u64 - 1) * auth.data_blocks,
                };
                let have = device.info().num_blocks;
                if auth.legacy || have == want {
                    Ok(device)
                } else {
                    Err(AssemblyError::Invalid(format!(
                        "the array uses {} blocks of each member but the members would give a volume of {have} blocks, not {want}: arrays smaller than their members are not supported",
                        auth.data_blocks
                    )))
                }
            })
            .and_then(|device| match resume {
                Some(slot) => {
                    let dev = spec.members[slot].clone();
                    // A checkpoint at or past the last row would mark a
                    // member in sync that was never rebuilt: start over.
                    let rows = device.rows().count;
                    let cursor = if auth.rebuild_checkpoint < rows {
                        tracing::info!(volume = %auth.name, slot, row = auth.rebuild_checkpoint, rows, "the rebuild resumes from its checkpoint (md's recovery_offset)");
                        auth.rebuild_checkpoint
                    } else {
                        tracing::warn!(volume = %auth.name, checkpoint = auth.rebuild_checkpoint, rows, "rebuild checkpoint out of range: the rebuild starts over");
                        0
                    };
                    device
                        .with_member_replaced(slot, dev, cursor)
                        .map_err(|e| AssemblyError::Invalid(e.to_string()))
                }
                None => Ok(device),
            })
            .and_then(|device| {
                attach_bitmap(device, &auth).map_err(|e| AssemblyError::Invalid(e.to_string()))
            });
        match built {
            Ok(device) => report.volumes.push(Assembled {
                device,
                was_clean: auth.clean,
                meta: VolumeMeta {
                    template: auth.clone(),
                    member_uuids,
                },
                members: slots,
                stale,
            }),
            Err(e) => report.problems.push((auth.name.clone(), e.to_string())),
        }
    }
    report
}

/// A stand-in for a missing member, sized like a current one (a stale
/// device may be of another geometry). It is marked failed, so no IO
/// reaches it.
fn placeholder(slots: &[Option<Arc<dyn BlockDevice>>], found: &[Found]) -> Arc<dyn BlockDevice> {
    let like = slots.iter().flatten().next().unwrap_or(&found[0].0);
    super::members::MissingDevice::like(like.as_ref())
}

/// Members that each ran with the other failed (each one's superblock
/// says the other's slot failed: a start with only one of them readable,
/// then another with only the other) hold different writes since. The
/// reference (`auth`, the newest) is the volume, as md's assembly takes
/// it; the other's writes since are not in it. Said for each such member,
/// as mdadm says "ignoring X as it reports Y as failed": it was silent,
/// and a later rebuild over the other member lost its writes unremarked
/// (audit). The manager refuses the volume on it.
fn split_brain(
    auth_dev: &Arc<dyn BlockDevice>,
    auth: &Superblock,
    found: &[(Arc<dyn BlockDevice>, Superblock)],
    problems: &mut Vec<(String, String)>,
) {
    let failed = |sb: &Superblock, slot: u32| {
        sb.slot_states
            .get(slot as usize)
            .is_some_and(|c| c & !WRITE_MOSTLY == MemberState::Failed.code())
    };
    for (dev, sb) in found {
        if Arc::ptr_eq(dev, auth_dev) || sb.legacy || sb.slot == auth.slot {
            continue;
        }
        if failed(sb, auth.slot) && failed(auth, sb.slot) {
            problems.push((
                dev.info().name.clone(),
                format!(
                    "it and {} each ran with the other failed (split brain): {} ({} events) is the volume; what {} ({} events) took since is not in it",
                    auth_dev.info().name,
                    auth_dev.info().name,
                    auth.events,
                    dev.info().name,
                    sb.events
                ),
            ));
        }
    }
}
