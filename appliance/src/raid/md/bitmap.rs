//! md's internal write-intent bitmap: a 256-byte `bitmap_super_t` at
//! `bitmap_offset` sectors from the superblock, followed at once by one
//! bit per bitmap chunk of the sync range (version 4: bit `i` is bit
//! `i % 8` of byte `i / 8`, whatever the host's byte order). A set bit
//! means writes to that chunk may not have reached every device.

use crate::raid::journal::{u32_at, u64_at};

/// `bitmap_super_t`'s magic ("bitm" little-endian).
pub const MAGIC: u32 = 0x6d74_6962;
/// Bytes of the bitmap superblock; the bits follow.
pub const HEADER: usize = 256;
/// Host-endian bits (what x86 wrote before version 4; the same bytes).
pub const VERSION_HOSTENDIAN: u32 = 3;
/// Little-endian bits: what md writes today.
pub const VERSION_LE: u32 = 4;
/// Clustered md's bitmap (one per node).
pub const VERSION_CLUSTERED: u32 = 5;
/// md's lockless bitmap (llbitmap).
pub const VERSION_LOCKLESS: u32 = 6;
/// `state`: the bitmap is out of date; a full resync is needed.
pub const STATE_STALE: u32 = 1 << 1;
/// `state`: a write to the bitmap failed.
pub const STATE_WRITE_ERROR: u32 = 1 << 2;
/// md's limit on outstanding write-behind writes (its COUNTER_MAX).
pub const MAX_WRITE_BEHIND: u32 = 16383;

/// Why a block is not a usable bitmap superblock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MdBitmapError {
    /// No bitmap magic.
    #[error("no md bitmap (magic {0:#010x})")]
    NotBitmap(u32),
    /// A field holds an impossible value.
    #[error("md bitmap field {field} = {value} is invalid: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// The bitmap superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MdBitmap {
    /// 3, 4 (md today), 5 (clustered) or 6 (lockless).
    pub version: u32,
    /// Must equal the array's set UUID.
    pub uuid: [u8; 16],
    /// The array events this bitmap was last written at.
    pub events: u64,
    /// The array events when bits were last cleared: a device whose
    /// events are at least this is behind only by the set bits.
    pub events_cleared: u64,
    /// Sectors of the sync range (per device for RAID1/5).
    pub sync_size: u64,
    /// `STATE_*` bits.
    pub state: u32,
    /// Bytes of the sync range per bit.
    pub chunksize: u32,
    /// Seconds between md's clears of quiet bits.
    pub daemon_sleep: u32,
    /// Outstanding writes allowed to write-mostly devices (0: none).
    pub write_behind: u32,
    /// Sectors reserved for the bitmap (0 when written by older md).
    pub sectors_reserved: u32,
    /// Cluster nodes (clustered only).
    pub nodes: u32,
    /// Cluster name, NUL-padded (clustered only).
    pub cluster_name: [u8; 64],
}

impl MdBitmap {
    /// Bits (bitmap chunks) covering the sync range.
    pub fn bits(&self) -> u64 {
        let per_bit = u64::from(self.chunksize / super::SECTOR as u32).max(1);
        self.sync_size.div_ceil(per_bit)
    }

    /// Bytes of superblock and bits together.
    pub fn bytes(&self) -> u64 {
        HEADER as u64 + self.bits().div_ceil(8)
    }

    /// Serialise the 256-byte superblock.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER];
        let mut put32 = |o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
        put32(0, MAGIC);
        put32(4, self.version);
        put32(48, self.state);
        put32(52, self.chunksize);
        put32(56, self.daemon_sleep);
        put32(60, self.write_behind);
        put32(64, self.sectors_reserved);
        put32(68, self.nodes);
        let mut put64 = |o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        put64(24, self.events);
        put64(32, self.events_cleared);
        put64(40, self.sync_size);
        b[8..24].copy_from_slice(&self.uuid);
        b[72..136].copy_from_slice(&self.cluster_name);
        b
    }

    /// Parse a bitmap superblock with `room` sectors available for it
    /// (from its start to the data or the next structure), checking every
    /// field.
    pub fn decode(b: &[u8], room: u64) -> Result<MdBitmap, MdBitmapError> {
        if b.len() < HEADER {
            return Err(MdBitmapError::NotBitmap(0));
        }
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(MdBitmapError::NotBitmap(magic));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[8..24]);
        let mut cluster_name = [0u8; 64];
        cluster_name.copy_from_slice(&b[72..136]);
        let bm = MdBitmap {
            version: u32_at(b, 4),
            uuid,
            events: u64_at(b, 24),
            events_cleared: u64_at(b, 32),
            sync_size: u64_at(b, 40),
            state: u32_at(b, 48),
            chunksize: u32_at(b, 52),
            daemon_sleep: u32_at(b, 56),
            write_behind: u32_at(b, 60),
            sectors_reserved: u32_at(b, 64),
            nodes: u32_at(b, 68),
            cluster_name,
        };
        bm.validate(room)?;
        Ok(bm)
    }

    /// The checks [`decode`](Self::decode) makes past the magic.
    pub fn validate(&self, room: u64) -> Result<(), MdBitmapError> {
        let invalid = |field, value: u64, why| Err(MdBitmapError::Invalid { field, value, why });
        if !(VERSION_HOSTENDIAN..=VERSION_LOCKLESS).contains(&self.version) {
            return invalid("version", self.version.into(), "not 3 to 6");
        }
        if !self.chunksize.is_power_of_two() || self.chunksize < super::SECTOR as u32 {
            return invalid(
                "chunksize",
                self.chunksize.into(),
                "not a power of two of at least 512",
            );
        }
        if self.write_behind > MAX_WRITE_BEHIND {
            return invalid(
                "write_behind",
                self.write_behind.into(),
                "more than md allows",
            );
        }
        // md refuses a bitmap daemon that never wakes.
        if self.daemon_sleep == 0 {
            return invalid("daemon_sleep", 0, "zero seconds");
        }
        if u64::from(self.sectors_reserved) > room {
            return invalid(
                "sectors_reserved",
                self.sectors_reserved.into(),
                "more than the space before the next structure",
            );
        }
        let need = self.bytes().div_ceil(super::SECTOR);
        if need > room || self.sectors_reserved != 0 && need > u64::from(self.sectors_reserved) {
            return invalid(
                "sync_size",
                self.sync_size,
                "its bits do not fit in the space reserved",
            );
        }
        Ok(())
    }

    /// Set bits among the first `bits()` of `area` (superblock and bits as
    /// read from disk).
    pub fn dirty(&self, area: &[u8]) -> u64 {
        let bits = self.bits();
        let bytes = &area[HEADER.min(area.len())..];
        let mut n = 0;
        for (i, &byte) in bytes.iter().enumerate() {
            let first = i as u64 * 8;
            if first >= bits {
                break;
            }
            let valid = (bits - first).min(8);
            let mask = if valid == 8 { 0xff } else { (1u8 << valid) - 1 };
            n += u64::from((byte & mask).count_ones());
        }
        n
    }

    /// Whether bit `i` is set in `area`.
    pub fn is_set(area: &[u8], i: u64) -> bool {
        let byte = HEADER as u64 + i / 8;
        area.get(byte as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> MdBitmap {
        MdBitmap {
            version: VERSION_LE,
            uuid: [0x11; 16],
            events: 20,
            events_cleared: 18,
            sync_size: 200_000,
            state: 0,
            chunksize: 64 << 10,
            daemon_sleep: 5,
            write_behind: 0,
            sectors_reserved: 8,
            nodes: 0,
            cluster_name: [0; 64],
        }
    }

    proptest! {
        #[test]
        fn every_valid_bitmap_round_trips(
            version in VERSION_HOSTENDIAN..=VERSION_LOCKLESS,
            uuid in any::<[u8; 16]>(),
            events in any::<u64>(),
            sync_size in 0u64..1 << 40,
            chunk_shift in 9u32..31,
            daemon_sleep in 1u32..1000,
            write_behind in 0..=MAX_WRITE_BEHIND,
            state in 0u32..8,
        ) {
            let mut bm = MdBitmap { version, uuid, events, events_cleared: events / 2, sync_size, state, chunksize: 1 << chunk_shift, daemon_sleep, write_behind, sectors_reserved: 0, nodes: 0, cluster_name: [0; 64] };
            let room = bm.bytes().div_ceil(512);
            bm.sectors_reserved = room as u32;
            prop_assert_eq!(MdBitmap::decode(&bm.encode(), room), Ok(bm));
        }

        #[test]
        fn dirty_counts_exactly_the_bits_in_range(bits in prop::collection::btree_set(0u64..3125, 0..50)) {
            let bm = sample();
            prop_assert_eq!(bm.bits(), 200_000 / 128 + 1);
            let mut area = bm.encode();
            area.resize(HEADER + 4096, 0);
            for &b in &bits {
                area[HEADER + (b / 8) as usize] |= 1 << (b % 8);
            }
            // Bits past the range are not counted.
            area[HEADER + 3125 / 8] |= 0xfe;
            let inside = bits.iter().filter(|&&b| b < bm.bits()).count() as u64;
            prop_assert_eq!(bm.dirty(&area), inside);
            for &b in &bits {
                prop_assert!(MdBitmap::is_set(&area, b));
            }
        }
    }

    #[test]
    fn impossible_fields_are_named() {
        let room = 8;
        let bad = |f: fn(&mut MdBitmap), field: &str| {
            let mut bm = sample();
            f(&mut bm);
            match MdBitmap::decode(&bm.encode(), room) {
                Err(MdBitmapError::Invalid { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        };
        bad(|b| b.version = 2, "version");
        bad(|b| b.chunksize = 3000, "chunksize");
        bad(|b| b.chunksize = 256, "chunksize");
        bad(|b| b.write_behind = 20000, "write_behind");
        bad(|b| b.daemon_sleep = 0, "daemon_sleep");
        bad(|b| b.sectors_reserved = 9, "sectors_reserved");
        bad(|b| b.chunksize = 512, "sync_size");
        assert_eq!(
            MdBitmap::decode(&[0u8; 256], room),
            Err(MdBitmapError::NotBitmap(0))
        );
        assert_eq!(MdBitmap::decode(&sample().encode(), room), Ok(sample()));
    }
}
