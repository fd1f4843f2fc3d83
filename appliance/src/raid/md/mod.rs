//! Linux md's own on-disk metadata: the version-1 superblock
//! (`mdp_superblock_1` of the kernel's `md_p.h`) and the internal
//! write-intent bitmap (`bitmap_super_t` and its bit array), decoded and
//! encoded byte for byte, and what the appliance can serve of it.
//!
//! The codecs are pure (bytes in, values out) and check every field on
//! read: a member's metadata comes from a disk someone else wrote. What a
//! valid superblock describes but the appliance cannot run (RAID6, a
//! reshape, md's raid5-cache journal...) decodes fine, so `examine` can
//! show it; [`support::check`] names it when asked to serve it.

pub mod bitmap;
pub mod convert;
pub mod examine;
pub mod superblock;
pub mod support;

/// Bytes in md's unit of size and offset.
pub const SECTOR: u64 = 512;

/// A 40-bit seconds / 24-bit microseconds time stamp (ctime, utime).
pub fn time_parts(t: u64) -> (u64, u32) {
    (t & ((1 << 40) - 1), (t >> 40) as u32)
}

/// md's text form of a set or device UUID: four groups of eight hex
/// digits separated by colons (`mdadm --examine`'s "Array UUID").
pub fn uuid_text(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(35);
    for (i, b) in u.iter().enumerate() {
        if i > 0 && i % 4 == 0 {
            s.push(':');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}
