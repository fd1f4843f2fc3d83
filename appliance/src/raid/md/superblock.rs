//! md's version-1 superblock, `struct mdp_superblock_1`: 256 bytes of
//! array, device and state fields, then a 16-bit role per device number
//! (`dev_roles[max_dev]`), all little-endian. Versions 1.0, 1.1 and 1.2
//! share the layout and differ only in where it sits: at the end of the
//! device, at sector 0, or at sector 8 (4 KiB from the start). The
//! checksum is md's own: the 32-bit words of the first 256 + 2 * max_dev
//! bytes summed into 64 bits (with the checksum field zero), the two
//! halves then added.

use super::time_parts;
use crate::raid::journal::{u32_at, u64_at};

/// md's magic, little-endian at byte 0.
pub const MAGIC: u32 = 0xa92b_4efc;
/// Bytes a superblock area holds (mdadm reads and writes 4 KiB).
pub const BYTES: usize = 4096;
/// The fixed part before `dev_roles`.
const FIXED: usize = 256;
/// Most device numbers that fit in one 4 KiB superblock.
pub const MAX_DEVS: usize = (BYTES - FIXED) / 2;
/// Where a version-1.2 superblock sits, in sectors from the device start.
pub const V1_2_OFFSET: u64 = 8;
/// Where a version-1.0 superblock sits on a device of `device_sectors`:
/// 8 KiB or less from its end, 4 KiB aligned, in sectors.
pub fn v1_0_offset(device_sectors: u64) -> u64 {
    device_sectors.saturating_sub(16) & !7
}

/// Where a version-0.90 superblock sits on a device of `bytes` (at least
/// 128 KiB): the last 64 KiB boundary but one, in bytes.
pub fn v0_90_byte(bytes: u64) -> u64 {
    (bytes & !0xffff).saturating_sub(64 << 10)
}

/// md's "not known / everything" sector value (MaxSector).
pub const MAX_SECTOR: u64 = u64::MAX;

/// `dev_roles` value of a spare.
pub const ROLE_SPARE: u16 = 0xffff;
/// `dev_roles` value of a faulty device.
pub const ROLE_FAULTY: u16 = 0xfffe;
/// `dev_roles` value of a journal device (md's raid5-cache).
pub const ROLE_JOURNAL: u16 = 0xfffd;

/// `devflags`: reads avoid this device (md's --write-mostly).
pub const DEVFLAG_WRITE_MOSTLY: u8 = 1;
/// `devflags`: fail on the first error instead of retrying.
pub const DEVFLAG_FAILFAST: u8 = 2;

/// `feature_map` bits (md_p.h's MD_FEATURE_*).
pub mod feature {
    /// `bitmap_offset` locates an internal bitmap.
    pub const BITMAP_OFFSET: u32 = 1;
    /// `recovery_offset` is meaningful: the device is being recovered.
    pub const RECOVERY_OFFSET: u32 = 2;
    /// A reshape is in progress (`reshape_position` and the `new_*` fields).
    pub const RESHAPE_ACTIVE: u32 = 4;
    /// The bad block log is not empty.
    pub const BAD_BLOCKS: u32 = 8;
    /// This device is replacing an active device of the same role.
    pub const REPLACEMENT: u32 = 16;
    /// The reshape runs backwards.
    pub const RESHAPE_BACKWARDS: u32 = 32;
    /// `new_offset` is meaningful.
    pub const NEW_OFFSET: u32 = 64;
    /// The recovery may use the bitmap.
    pub const RECOVERY_BITMAP: u32 = 128;
    /// Clustered md.
    pub const CLUSTERED: u32 = 256;
    /// The array has a journal device (raid5-cache).
    pub const JOURNAL: u32 = 512;
    /// A partial parity log (PPL) instead of a bitmap.
    pub const PPL: u32 = 1024;
    /// Several PPLs.
    pub const MULTIPLE_PPLS: u32 = 2048;
    /// RAID0 with an explicit layout.
    pub const RAID0_LAYOUT: u32 = 4096;
    /// Every bit md defines; anything else is refused, as md does.
    pub const ALL: u32 = 8191;
}

/// Why a block is not a usable version-1 superblock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MdSuperblockError {
    /// No md magic: blank, or another format.
    #[error("no md superblock (magic {0:#010x})")]
    NotMd(u32),
    /// A version-0.90 or other major version.
    #[error("md superblock major version {0}, only version 1 is understood")]
    MajorVersion(u32),
    /// md's magic, but the checksum does not match.
    #[error("md superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupt")]
    Corrupt {
        /// Checksum in the block.
        stored: u32,
        /// Checksum of the contents.
        computed: u32,
    },
    /// A field holds an impossible value.
    #[error("md superblock field {field} = {value} is invalid: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// One device's version-1 superblock, every field md defines, in md's
/// units (sectors of 512 bytes). The default is all zero, as md writes
/// the fields it does not use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MdSuperblock {
    /// `MD_FEATURE_*` bits.
    pub feature_map: u32,
    /// The array's identity.
    pub set_uuid: [u8; 16],
    /// The array's name, NUL-padded ("host:name" as mdadm writes it).
    pub set_name: [u8; 32],
    /// Creation time (40-bit seconds, 24-bit microseconds).
    pub ctime: u64,
    /// RAID level (negative for linear, multipath, faulty).
    pub level: i32,
    /// Layout (RAID5's algorithm; 0 for RAID1).
    pub layout: u32,
    /// Sectors of each device the array uses.
    pub size: u64,
    /// Chunk size in sectors (0 for RAID1).
    pub chunk_sectors: u32,
    /// Active devices the array has.
    pub raid_disks: u32,
    /// The raw `bitmap_offset` word: with [`feature::BITMAP_OFFSET`], the
    /// bitmap's signed offset in sectors from the superblock; with
    /// [`feature::PPL`], the PPL's offset and size (see [`Self::ppl`]).
    pub bitmap_offset: u32,
    /// Reshape target level.
    pub new_level: u32,
    /// Next array sector the reshape works on.
    pub reshape_position: u64,
    /// Change in `raid_disks` (signed).
    pub delta_disks: u32,
    /// Reshape target layout.
    pub new_layout: u32,
    /// Reshape target chunk (sectors).
    pub new_chunk: u32,
    /// Signed sectors added to `data_offset` by the reshape.
    pub new_offset: u32,
    /// First data sector of this device.
    pub data_offset: u64,
    /// Sectors of this device usable for data.
    pub data_size: u64,
    /// Sector of this superblock.
    pub super_offset: u64,
    /// Sectors (from `data_offset`) already recovered onto this device
    /// (with [`feature::RECOVERY_OFFSET`]); a journal's tail otherwise.
    pub recovery_offset: u64,
    /// This device's permanent number: its index in `dev_roles`.
    pub dev_number: u32,
    /// Read errors corrected by rewriting.
    pub cnt_corrected_read: u32,
    /// This device's identity.
    pub device_uuid: [u8; 16],
    /// `DEVFLAG_*` bits.
    pub devflags: u8,
    /// Bad block log: shift from sectors to its block size.
    pub bblog_shift: u8,
    /// Bad block log size in sectors.
    pub bblog_size: u16,
    /// Bad block log offset in sectors from the superblock (signed).
    pub bblog_offset: u32,
    /// Last update time (as `ctime`).
    pub utime: u64,
    /// Bumped on every superblock update; the newest wins at assembly.
    pub events: u64,
    /// Array sectors (from data_offset) known in sync; [`MAX_SECTOR`] when
    /// the array is clean.
    pub resync_offset: u64,
    /// The role of each device number: a slot, or [`ROLE_SPARE`],
    /// [`ROLE_FAULTY`], [`ROLE_JOURNAL`]. Its length is `max_dev`.
    pub dev_roles: Vec<u16>,
}

/// md's checksum of a superblock (`calc_sb_1_csum`) whose `max_dev` is
/// `max_dev`, with the stored checksum taken as zero.
pub fn checksum(b: &[u8], max_dev: usize) -> u32 {
    let len = FIXED + 2 * max_dev;
    let mut sum: u64 = 0;
    let mut o = 0;
    while o + 4 <= len {
        if o != 216 {
            sum += u64::from(u32_at(b, o));
        }
        o += 4;
    }
    if o + 2 == len {
        sum += u64::from(u16::from_le_bytes([b[o], b[o + 1]]));
    }
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}

impl MdSuperblock {
    /// `max_dev`: how many device numbers the role table holds.
    pub fn max_dev(&self) -> usize {
        self.dev_roles.len()
    }

    /// The array name up to its first NUL, as text.
    pub fn name(&self) -> String {
        let end = self.set_name.iter().position(|&c| c == 0).unwrap_or(32);
        String::from_utf8_lossy(&self.set_name[..end]).into_owned()
    }

    /// Whether `feature` (one of [`feature`]) is set.
    pub fn has(&self, feature: u32) -> bool {
        self.feature_map & feature != 0
    }

    /// This device's role: `Some(slot)` for an active slot, `None` for a
    /// spare, faulty or journal device (see [`Self::role_code`]).
    pub fn slot(&self) -> Option<u32> {
        let r = self.role_code();
        (u32::from(r) < self.raid_disks && r < ROLE_JOURNAL).then_some(u32::from(r))
    }

    /// This device's raw `dev_roles` entry.
    pub fn role_code(&self) -> u16 {
        self.dev_roles
            .get(self.dev_number as usize)
            .copied()
            .unwrap_or(ROLE_SPARE)
    }

    /// The internal bitmap's offset in sectors from the superblock.
    pub fn bitmap_sectors(&self) -> Option<i64> {
        (self.has(feature::BITMAP_OFFSET) && !self.has(feature::PPL))
            .then_some(i64::from(self.bitmap_offset as i32))
    }

    /// The PPL's (offset from the superblock, size) in sectors.
    pub fn ppl(&self) -> Option<(i16, u16)> {
        self.has(feature::PPL).then_some((
            self.bitmap_offset as u16 as i16,
            (self.bitmap_offset >> 16) as u16,
        ))
    }

    /// Whether the array was shut down clean (no resync pending).
    pub fn clean(&self) -> bool {
        self.resync_offset == MAX_SECTOR
    }

    /// The format's minor version by where this superblock sits.
    pub fn minor_version(&self) -> u32 {
        match self.super_offset {
            0 => 1,
            V1_2_OFFSET => 2,
            _ => 0,
        }
    }

    /// Serialise into a 4 KiB block with md's checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BYTES];
        let mut put32 = |o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
        put32(0, MAGIC);
        put32(4, 1);
        put32(8, self.feature_map);
        put32(72, self.level as u32);
        put32(76, self.layout);
        put32(88, self.chunk_sectors);
        put32(92, self.raid_disks);
        put32(96, self.bitmap_offset);
        put32(100, self.new_level);
        put32(112, self.delta_disks);
        put32(116, self.new_layout);
        put32(120, self.new_chunk);
        put32(124, self.new_offset);
        put32(160, self.dev_number);
        put32(164, self.cnt_corrected_read);
        put32(188, self.bblog_offset);
        put32(220, self.dev_roles.len() as u32);
        let mut put64 = |o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        put64(64, self.ctime);
        put64(80, self.size);
        put64(104, self.reshape_position);
        put64(128, self.data_offset);
        put64(136, self.data_size);
        put64(144, self.super_offset);
        put64(152, self.recovery_offset);
        put64(192, self.utime);
        put64(200, self.events);
        put64(208, self.resync_offset);
        b[16..32].copy_from_slice(&self.set_uuid);
        b[32..64].copy_from_slice(&self.set_name);
        b[168..184].copy_from_slice(&self.device_uuid);
        b[184] = self.devflags;
        b[185] = self.bblog_shift;
        b[186..188].copy_from_slice(&self.bblog_size.to_le_bytes());
        for (i, r) in self.dev_roles.iter().take(MAX_DEVS).enumerate() {
            b[FIXED + 2 * i..FIXED + 2 * i + 2].copy_from_slice(&r.to_le_bytes());
        }
        let csum = checksum(&b, self.dev_roles.len().min(MAX_DEVS));
        b[216..220].copy_from_slice(&csum.to_le_bytes());
        b
    }

    /// Parse the superblock area read at sector `at` of a device of
    /// `device_sectors`, checking magic, version, checksum and every field
    /// against the others and the device.
    pub fn decode(
        b: &[u8],
        at: u64,
        device_sectors: u64,
    ) -> Result<MdSuperblock, MdSuperblockError> {
        if b.len() < FIXED {
            return Err(MdSuperblockError::NotMd(0));
        }
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(MdSuperblockError::NotMd(magic));
        }
        let major = u32_at(b, 4);
        if major != 1 {
            return Err(MdSuperblockError::MajorVersion(major));
        }
        let invalid = |field, value: u64, why| MdSuperblockError::Invalid { field, value, why };
        let max_dev = u32_at(b, 220) as usize;
        if max_dev > MAX_DEVS || FIXED + 2 * max_dev > b.len() {
            return Err(invalid(
                "max_dev",
                max_dev as u64,
                "the role table does not fit in 4 KiB",
            ));
        }
        let stored = u32_at(b, 216);
        let computed = checksum(b, max_dev);
        if stored != computed {
            return Err(MdSuperblockError::Corrupt { stored, computed });
        }
        let mut set_uuid = [0u8; 16];
        set_uuid.copy_from_slice(&b[16..32]);
        let mut set_name = [0u8; 32];
        set_name.copy_from_slice(&b[32..64]);
        let mut device_uuid = [0u8; 16];
        device_uuid.copy_from_slice(&b[168..184]);
        let sb = MdSuperblock {
            feature_map: u32_at(b, 8),
            set_uuid,
            set_name,
            ctime: u64_at(b, 64),
            level: u32_at(b, 72) as i32,
            layout: u32_at(b, 76),
            size: u64_at(b, 80),
            chunk_sectors: u32_at(b, 88),
            raid_disks: u32_at(b, 92),
            bitmap_offset: u32_at(b, 96),
            new_level: u32_at(b, 100),
            reshape_position: u64_at(b, 104),
            delta_disks: u32_at(b, 112),
            new_layout: u32_at(b, 116),
            new_chunk: u32_at(b, 120),
            new_offset: u32_at(b, 124),
            data_offset: u64_at(b, 128),
            data_size: u64_at(b, 136),
            super_offset: u64_at(b, 144),
            recovery_offset: u64_at(b, 152),
            dev_number: u32_at(b, 160),
            cnt_corrected_read: u32_at(b, 164),
            device_uuid,
            devflags: b[184],
            bblog_shift: b[185],
            bblog_size: u16::from_le_bytes([b[186], b[187]]),
            bblog_offset: u32_at(b, 188),
            utime: u64_at(b, 192),
            events: u64_at(b, 200),
            resync_offset: u64_at(b, 208),
            dev_roles: (0..max_dev)
                .map(|i| u16::from_le_bytes([b[FIXED + 2 * i], b[FIXED + 2 * i + 1]]))
                .collect(),
        };
        sb.validate(at, device_sectors)?;
        Ok(sb)
    }

    /// The checks [`decode`](Self::decode) makes past the checksum.
    pub fn validate(&self, at: u64, device_sectors: u64) -> Result<(), MdSuperblockError> {
        let invalid =
            |field, value: u64, why| Err(MdSuperblockError::Invalid { field, value, why });
        if self.feature_map & !feature::ALL != 0 {
            return invalid(
                "feature_map",
                self.feature_map.into(),
                "unknown feature bits",
            );
        }
        if self.events
            >= crate::raid::superblock::EVENTS_LIMIT - crate::raid::superblock::EVENTS_SLACK
        {
            return invalid("events", self.events, "past what a change count can reach");
        }
        if self.super_offset != at {
            return invalid(
                "super_offset",
                self.super_offset,
                "not where the superblock was read",
            );
        }
        if self.dev_number as usize >= self.dev_roles.len() {
            return invalid(
                "dev_number",
                self.dev_number.into(),
                "outside the role table (max_dev)",
            );
        }
        if self.raid_disks == 0 || self.raid_disks as usize > MAX_DEVS {
            return invalid(
                "raid_disks",
                self.raid_disks.into(),
                "zero or more than a superblock can describe",
            );
        }
        // A growing reshape already gives the new devices their roles.
        let growth = if self.has(feature::RESHAPE_ACTIVE) {
            (self.delta_disks as i32).max(0) as u32
        } else {
            0
        };
        for &r in &self.dev_roles {
            if r < ROLE_JOURNAL && u32::from(r) >= self.raid_disks.saturating_add(growth) {
                return invalid("dev_roles", r.into(), "a role beyond raid_disks");
            }
        }
        let striped_parity = matches!(self.level, 4..=6);
        if striped_parity && !self.chunk_sectors.is_power_of_two() {
            return invalid("chunksize", self.chunk_sectors.into(), "not a power of two");
        }
        for (field, t) in [("ctime", self.ctime), ("utime", self.utime)] {
            if time_parts(t).1 >= 1_000_000 {
                return invalid(field, t, "microseconds past 999999");
            }
        }
        // The data area lies after the superblock (1.1, 1.2) or before it
        // (1.0), and inside the device.
        let sb_end = self.super_offset + (BYTES as u64 / super::SECTOR);
        let Some(data_end) = self
            .data_offset
            .checked_add(self.data_size)
            .filter(|&e| e <= device_sectors)
        else {
            return invalid(
                "data_size",
                self.data_size,
                "data area past the end of the device",
            );
        };
        if self.super_offset < self.data_offset && self.data_offset < sb_end
            || self.super_offset >= self.data_offset && self.super_offset < data_end
        {
            return invalid(
                "data_offset",
                self.data_offset,
                "the data area overlaps the superblock",
            );
        }
        let redundant = matches!(self.level, 1 | 4..=6 | 10);
        if redundant && self.size > self.data_size {
            return invalid(
                "size",
                self.size,
                "the array uses more of the device than it has",
            );
        }
        if self.has(feature::RECOVERY_OFFSET) && self.recovery_offset > self.data_size {
            return invalid(
                "recovery_offset",
                self.recovery_offset,
                "past the data area",
            );
        }
        // md resyncs RAID1/4/5/6 in device sectors.
        let resync_end = if redundant && self.level != 10 {
            self.size
        } else {
            self.size.saturating_mul(self.raid_disks.into())
        };
        if self.resync_offset != MAX_SECTOR && self.resync_offset > resync_end {
            return invalid("resync_offset", self.resync_offset, "past the array");
        }
        if let Some(off) = self.bitmap_sectors() {
            // The bitmap lies between the superblock and the data (1.1,
            // 1.2) or before the superblock and after the data (1.0).
            let start = self.super_offset as i128 + off as i128;
            let ok = if self.super_offset < self.data_offset {
                off >= (BYTES as i64 / super::SECTOR as i64) && start < self.data_offset as i128
            } else {
                off < 0 && start >= data_end as i128
            };
            if !ok {
                return invalid(
                    "bitmap_offset",
                    off as u64,
                    "the bitmap is not between the superblock and the data",
                );
            }
        }
        if self.bblog_size != 0 && self.bblog_shift > 16 {
            return invalid("bblog_shift", self.bblog_shift.into(), "more than 16");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
