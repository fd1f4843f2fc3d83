//! What every RAID member's superblock says: what the volume is, which
//! slot this member holds, and how current it is.
//!
//! On disk it is md's version-1.2 superblock (4 KiB from the start, see
//! `md::convert`). The appliance's first format, read here and converted
//! on a volume's first assembly, was its own: at byte 0, little-endian,
//! fixed layout, CRC32C over the whole 4 KiB with the CRC field zeroed. A
//! block without either magic is foreign (never overwritten without
//! force); one with a magic and a bad checksum is corrupt.

use super::geometry::Layout;

/// Bytes a superblock occupies.
pub const SUPERBLOCK_BYTES: usize = 4096;
/// "APPLRAID".
pub const MAGIC: [u8; 8] = *b"APPLRAID";
/// Format version written by this build.
pub const VERSION: u32 = 1;

/// Why a block is not a usable superblock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    /// No superblock of ours (blank, or another format).
    #[error("no appliance superblock (foreign or blank device)")]
    Foreign,
    /// Our magic, but the checksum does not match.
    #[error(
        "superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupt"
    )]
    Corrupt {
        /// CRC in the block.
        stored: u32,
        /// CRC of the contents.
        computed: u32,
    },
    /// md's metadata that the appliance cannot take as a member: another
    /// md version, an md feature it does not run, a spare.
    #[error("{0}")]
    Md(String),
    /// A spare of an md array (it holds no slot).
    #[error("a spare of md array {name:?}")]
    MdSpare {
        /// The array's UUID.
        array: [u8; 16],
        /// The array's name.
        name: String,
    },
    /// Written by a newer format.
    #[error("superblock format version {0} is newer than this appliance understands ({VERSION})")]
    Version(u32),
    /// A field holds an impossible value.
    #[error("superblock field {field} is invalid: {value}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

/// Event counts at or past this are refused: each recorded change adds
/// one, and a count read from disk must not wrap (a member at a wrapped
/// count would look older than stale ones). md's never gets near it.
pub const EVENTS_LIMIT: u64 = 1 << 62;

/// Counts read from disk are below [`EVENTS_LIMIT`] less this: a volume
/// started from one has this many changes left before its count would
/// reach the limit (where a change is refused). Taken up to the limit
/// itself, a crafted count just below it let the volume start and then
/// refused every record, a member failure included, and writes waiting
/// for it hung (review).
pub const EVENTS_SLACK: u64 = 1 << 20;

/// RAID level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Mirror.
    Raid1,
    /// Distributed parity.
    Raid5,
}

/// One member's superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Volume identity.
    pub volume_uuid: [u8; 16],
    /// This member's identity.
    pub member_uuid: [u8; 16],
    /// Volume name (at most 32 bytes).
    pub name: String,
    /// RAID level.
    pub level: Level,
    /// RAID5 layout (ignored for RAID1).
    pub layout: Layout,
    /// Chunk size in bytes (RAID5).
    pub chunk_bytes: u32,
    /// Number of member slots.
    pub members: u32,
    /// This member's slot.
    pub slot: u32,
    /// Logical block size of the members.
    pub block_size: u32,
    /// First data block on each member.
    pub data_offset: u64,
    /// Data blocks per member.
    pub data_blocks: u64,
    /// Bumped on every configuration change; a member with a lower value
    /// than its peers is stale.
    pub events: u64,
    /// Shut down cleanly (no resync needed).
    pub clean: bool,
    /// State of every slot as this member last saw it (0 in sync, 1
    /// failed, 2 rebuilding).
    pub slot_states: Vec<u8>,
    /// Rebuild checkpoint in stripes for the rebuilding slot.
    pub rebuild_checkpoint: u64,
    /// Write-intent bitmap: rebuild rows per bit, 0 for none. The bitmap
    /// itself is at byte 4096 of every member (see `bitmap`).
    pub bitmap_rows_per_bit: u64,
    /// Creation time, md's way (40-bit seconds, 24-bit microseconds).
    pub ctime: u64,
    /// Not clean, but rows before this one are in sync: a resync a clean
    /// stop cut short (md's resync_offset) goes on from here. 0 while the
    /// volume is in use (a crash may leave any row torn).
    pub resync_from: u64,
    /// md's write-behind limit, from md's bitmap (0: off or no bitmap).
    pub write_behind: u32,
    /// Read from the appliance's first format (at byte 0): the next write
    /// converts the member to md's.
    pub legacy: bool,
}

fn layout_code(l: Layout) -> u32 {
    match l {
        Layout::LeftAsymmetric => 0,
        Layout::RightAsymmetric => 1,
        Layout::LeftSymmetric => 2,
        Layout::RightSymmetric => 3,
    }
}

const MAX_SLOTS: usize = 64;

impl Superblock {
    /// Serialise in the first format, a 4 KiB block for byte 0 (what
    /// older appliances wrote; tests make old members with it).
    pub fn encode_legacy(&self) -> Vec<u8> {
        let mut b = vec![0u8; SUPERBLOCK_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_uuid);
        b[32..48].copy_from_slice(&self.member_uuid);
        let name = self.name.as_bytes();
        let n = name.len().min(32);
        b[48..48 + n].copy_from_slice(&name[..n]);
        b[80..84].copy_from_slice(
            &(match self.level {
                Level::Raid1 => 1u32,
                Level::Raid5 => 5,
            })
            .to_le_bytes(),
        );
        b[84..88].copy_from_slice(&layout_code(self.layout).to_le_bytes());
        b[88..92].copy_from_slice(&self.chunk_bytes.to_le_bytes());
        b[92..96].copy_from_slice(&self.members.to_le_bytes());
        b[96..100].copy_from_slice(&self.slot.to_le_bytes());
        b[100..104].copy_from_slice(&self.block_size.to_le_bytes());
        b[104..112].copy_from_slice(&self.data_offset.to_le_bytes());
        b[112..120].copy_from_slice(&self.data_blocks.to_le_bytes());
        b[120..128].copy_from_slice(&self.events.to_le_bytes());
        b[128] = self.clean as u8;
        b[136..144].copy_from_slice(&self.rebuild_checkpoint.to_le_bytes());
        b[144..152].copy_from_slice(&self.bitmap_rows_per_bit.to_le_bytes());
        let k = self.slot_states.len().min(MAX_SLOTS);
        b[192..192 + k].copy_from_slice(&self.slot_states[..k]);
        let crc = crc32c::crc32c(&b);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse a first-format 4 KiB block, checking magic, version, checksum
    /// and fields.
    pub fn decode_legacy(b: &[u8]) -> Result<Superblock, SuperblockError> {
        if b.len() < SUPERBLOCK_BYTES || b[0..8] != MAGIC {
            return Err(SuperblockError::Foreign);
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let stored = u32_at(12);
        let mut copy = b[..SUPERBLOCK_BYTES].to_vec();
        copy[12..16].fill(0);
        let computed = crc32c::crc32c(&copy);
        if stored != computed {
            return Err(SuperblockError::Corrupt { stored, computed });
        }
        let version = u32_at(8);
        if version > VERSION || version == 0 {
            return Err(SuperblockError::Version(version));
        }
        let invalid = |field, value: u64| SuperblockError::Invalid { field, value };
        let level = match u32_at(80) {
            1 => Level::Raid1,
            5 => Level::Raid5,
            v => return Err(invalid("level", v as u64)),
        };
        let layout = match u32_at(84) {
            0 => Layout::LeftAsymmetric,
            1 => Layout::RightAsymmetric,
            2 => Layout::LeftSymmetric,
            3 => Layout::RightSymmetric,
            v => return Err(invalid("layout", v as u64)),
        };
        let members = u32_at(92);
        if members == 0 || members as usize > MAX_SLOTS {
            return Err(invalid("members", members as u64));
        }
        let slot = u32_at(96);
        if slot >= members {
            return Err(invalid("slot", slot as u64));
        }
        let block_size = u32_at(100);
        if block_size != 512 && block_size != 4096 {
            return Err(invalid("block_size", block_size as u64));
        }
        let chunk_bytes = u32_at(88);
        if level == Level::Raid5
            && (!chunk_bytes.is_power_of_two() || !(4096..=1 << 20).contains(&chunk_bytes))
        {
            return Err(invalid("chunk_bytes", chunk_bytes as u64));
        }
        let name_bytes = &b[48..80];
        let end = name_bytes.iter().position(|&c| c == 0).unwrap_or(32);
        let name = String::from_utf8(name_bytes[..end].to_vec()).map_err(|_| invalid("name", 0))?;
        let events = u64_at(120);
        if events >= EVENTS_LIMIT - EVENTS_SLACK {
            return Err(invalid("events", events));
        }
        let mut volume_uuid = [0u8; 16];
        volume_uuid.copy_from_slice(&b[16..32]);
        let mut member_uuid = [0u8; 16];
        member_uuid.copy_from_slice(&b[32..48]);
        let slot_states = b[192..192 + members as usize].to_vec();
        // A state code (0..=2), and bit 7 for write-mostly.
        if let Some(&bad) = slot_states.iter().find(|&&s| s & 0x7f > 2) {
            return Err(invalid("slot_states", bad as u64));
        }
        Ok(Superblock {
            volume_uuid,
            member_uuid,
            name,
            level,
            layout,
            chunk_bytes,
            members,
            slot,
            block_size,
            data_offset: u64_at(104),
            data_blocks: u64_at(112),
            events,
            clean: b[128] != 0,
            slot_states,
            rebuild_checkpoint: u64_at(136),
            bitmap_rows_per_bit: u64_at(144),
            ctime: 0,
            resync_from: 0,
            write_behind: 0,
            legacy: true,
        })
    }
}

impl Superblock {
    /// Label / value lines for `volume examine`.
    pub fn report(&self) -> Vec<(&'static str, String)> {
        let hex = |u: &[u8; 16]| u.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let states: String = self
            .slot_states
            .iter()
            .map(|s| match s & 0x7f {
                0 => 'A',
                1 => '.',
                _ => 'R',
            })
            .collect();
        let mut out = vec![
            ("Volume UUID", hex(&self.volume_uuid)),
            ("Member UUID", hex(&self.member_uuid)),
            ("Name", self.name.clone()),
            (
                "Raid Level",
                match self.level {
                    Level::Raid1 => "raid1".into(),
                    Level::Raid5 => "raid5".into(),
                },
            ),
            ("Raid Devices", self.members.to_string()),
            ("Block Size", self.block_size.to_string()),
            ("Data Offset", format!("{} blocks", self.data_offset)),
            ("Data Blocks", self.data_blocks.to_string()),
            ("State", if self.clean { "clean" } else { "active" }.into()),
            ("Events", self.events.to_string()),
        ];
        if self.level == Level::Raid5 {
            out.push(("Layout", self.layout.name().into()));
            out.push(("Chunk Size", format!("{}K", self.chunk_bytes / 1024)));
        }
        out.push(("Device Role", format!("Active device {}", self.slot)));
        out.push(("Array State", states));
        if self.slot_states.iter().any(|s| s & 0x7f == 2) {
            out.push((
                "Rebuild Checkpoint",
                format!("{} rows", self.rebuild_checkpoint),
            ));
        }
        if self.bitmap_rows_per_bit != 0 {
            out.push((
                "Bitmap",
                format!("{} rows per bit", self.bitmap_rows_per_bit),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            volume_uuid: [1; 16],
            member_uuid: [2; 16],
            name: "vol0".into(),
            level: Level::Raid5,
            layout: Layout::LeftSymmetric,
            chunk_bytes: 65536,
            members: 4,
            slot: 2,
            block_size: 4096,
            data_offset: 256,
            data_blocks: 1 << 20,
            events: 42,
            clean: true,
            slot_states: vec![0, 1, 0, 2],
            rebuild_checkpoint: 99,
            bitmap_rows_per_bit: 1024,
            ctime: 0,
            resync_from: 0,
            write_behind: 0,
            legacy: true,
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(Superblock::decode_legacy(&s.encode_legacy()), Ok(s));
    }

    #[test]
    fn foreign_corrupt_and_invalid_blocks_are_told_apart() {
        assert_eq!(
            Superblock::decode_legacy(&[0u8; 4096]),
            Err(SuperblockError::Foreign)
        );
        assert_eq!(
            Superblock::decode_legacy(&[0u8; 100]),
            Err(SuperblockError::Foreign)
        );
        let mut b = sample().encode_legacy();
        b[200] ^= 1;
        assert!(matches!(
            Superblock::decode_legacy(&b),
            Err(SuperblockError::Corrupt { .. })
        ));
        // Every single-bit flip anywhere is caught.
        let good = sample().encode_legacy();
        for byte in (0..4096).step_by(97) {
            let mut b = good.clone();
            b[byte] ^= 0x10;
            assert!(
                Superblock::decode_legacy(&b).is_err(),
                "flip at {byte} not caught"
            );
        }
        // Well-formed checksum over impossible fields.
        let mut s = sample();
        s.slot = 9;
        assert!(matches!(
            Superblock::decode_legacy(&s.encode_legacy()),
            Err(SuperblockError::Invalid { field: "slot", .. })
        ));
        let mut s = sample();
        s.chunk_bytes = 3000;
        assert!(matches!(
            Superblock::decode_legacy(&s.encode_legacy()),
            Err(SuperblockError::Invalid {
                field: "chunk_bytes",
                ..
            })
        ));
        let mut b = sample().encode_legacy();
        b[8..12].copy_from_slice(&7u32.to_le_bytes());
        b[12..16].fill(0);
        let crc = crc32c::crc32c(&b);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Superblock::decode_legacy(&b),
            Err(SuperblockError::Version(7))
        );
    }
}
