//! Where RAID5 puts data and parity: Linux md's four layouts, so a member
//! set written here reads back under md with the same geometry, and the
//! other way round. Pure arithmetic, in volume blocks.

use std::fmt;

/// md's RAID5 parity layouts (mdadm `--layout` names, md algorithm numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `left-asymmetric` (md algorithm 0).
    LeftAsymmetric,
    /// `right-asymmetric` (1).
    RightAsymmetric,
    /// `left-symmetric` (2), md's default.
    LeftSymmetric,
    /// `right-symmetric` (3).
    RightSymmetric,
}

impl Layout {
    /// The mdadm name.
    pub fn name(self) -> &'static str {
        match self {
            Layout::LeftAsymmetric => "left-asymmetric",
            Layout::RightAsymmetric => "right-asymmetric",
            Layout::LeftSymmetric => "left-symmetric",
            Layout::RightSymmetric => "right-symmetric",
        }
    }

    /// Parse an mdadm name.
    pub fn parse(s: &str) -> Result<Layout, GeometryError> {
        Ok(match s {
            "left-asymmetric" | "la" => Layout::LeftAsymmetric,
            "right-asymmetric" | "ra" => Layout::RightAsymmetric,
            "left-symmetric" | "ls" => Layout::LeftSymmetric,
            "right-symmetric" | "rs" => Layout::RightSymmetric,
            _ => return Err(GeometryError(format!("unknown RAID5 layout {s:?}"))),
        })
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A geometry that cannot be built, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid RAID geometry: {0}")]
pub struct GeometryError(pub String);

/// RAID5 geometry over `members` equal members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raid5Geometry {
    members: u32,
    chunk_blocks: u64,
    layout: Layout,
    data_offset: u64,
    stripes: u64,
}

/// Where one volume block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Stripe number (also the chunk row on every member).
    pub stripe: u64,
    /// Member holding the block.
    pub member: u32,
    /// Block on that member (data offset included).
    pub member_block: u64,
    /// Member holding the stripe's parity.
    pub parity: u32,
    /// Index of the block's chunk among the stripe's data chunks.
    pub data_index: u32,
    /// Offset of the block inside its chunk.
    pub chunk_offset: u64,
}

impl Raid5Geometry {
    /// `members` (2..=64; two is md's degenerate RAID5) of `member_blocks` blocks each, chunks of
    /// `chunk_bytes` (a power of two, 4 KiB..=1 MiB) of `block_size`-byte
    /// blocks, data starting `data_offset_blocks` into each member.
    pub fn new(
        members: u32,
        block_size: u32,
        chunk_bytes: u32,
        layout: Layout,
        data_offset_blocks: u64,
        member_blocks: u64,
    ) -> Result<Raid5Geometry, GeometryError> {
        // Two members are md's degenerate RAID5 (parity is a copy of the
        // one data chunk), what a RAID1 becomes by takeover.
        if !(2..=64).contains(&members) {
            return Err(GeometryError(format!(
                "RAID5 needs 2..=64 members, got {members}"
            )));
        }
        if !chunk_bytes.is_power_of_two() || !(4096..=1 << 20).contains(&chunk_bytes) {
            return Err(GeometryError(format!(
                "chunk must be a power of two from 4 KiB to 1 MiB, got {chunk_bytes} bytes"
            )));
        }
        if block_size == 0 || !chunk_bytes.is_multiple_of(block_size) {
            return Err(GeometryError(format!(
                "chunk {chunk_bytes} is not a multiple of the block size {block_size}"
            )));
        }
        let chunk_blocks = (chunk_bytes / block_size) as u64;
        let usable = member_blocks
            .checked_sub(data_offset_blocks)
            .ok_or_else(|| {
                GeometryError(format!(
                    "data offset {data_offset_blocks} is past the member size {member_blocks}"
                ))
            })?;
        let stripes = usable / chunk_blocks;
        if stripes == 0 {
            return Err(GeometryError(
                "members are smaller than one chunk after the data offset".into(),
            ));
        }
        Ok(Raid5Geometry {
            members,
            chunk_blocks,
            layout,
            data_offset: data_offset_blocks,
            stripes,
        })
    }

    /// Number of members.
    pub fn members(&self) -> u32 {
        self.members
    }

    /// Data chunks per stripe.
    pub fn data_members(&self) -> u32 {
        self.members - 1
    }

    /// Blocks per chunk.
    pub fn chunk_blocks(&self) -> u64 {
        self.chunk_blocks
    }

    /// Data blocks per stripe (the optimal IO size).
    pub fn stripe_blocks(&self) -> u64 {
        self.chunk_blocks * self.data_members() as u64
    }

    /// Stripes on the volume.
    pub fn stripes(&self) -> u64 {
        self.stripes
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// First data block on each member.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Volume size in blocks.
    pub fn volume_blocks(&self) -> u64 {
        self.stripes * self.stripe_blocks()
    }

    /// The parity member of `stripe`.
    pub fn parity_member(&self, stripe: u64) -> u32 {
        let n = self.members as u64;
        let d = n - 1;
        (match self.layout {
            Layout::LeftAsymmetric | Layout::LeftSymmetric => d - stripe % n,
            Layout::RightAsymmetric | Layout::RightSymmetric => stripe % n,
        }) as u32
    }

    /// The member holding data chunk `data_index` of `stripe`.
    pub fn data_member(&self, stripe: u64, data_index: u32) -> u32 {
        let pd = self.parity_member(stripe);
        match self.layout {
            Layout::LeftAsymmetric | Layout::RightAsymmetric => {
                if data_index >= pd {
                    data_index + 1
                } else {
                    data_index
                }
            }
            Layout::LeftSymmetric | Layout::RightSymmetric => (pd + 1 + data_index) % self.members,
        }
    }

    /// The data index a member holds in `stripe` (None for the parity member).
    pub fn data_index_of(&self, stripe: u64, member: u32) -> Option<u32> {
        (0..self.data_members()).find(|&i| self.data_member(stripe, i) == member)
    }

    /// Where volume block `block` lives (block < volume_blocks()).
    pub fn locate(&self, block: u64) -> Location {
        let chunk = block / self.chunk_blocks;
        let chunk_offset = block % self.chunk_blocks;
        let d = self.data_members() as u64;
        let stripe = chunk / d;
        let data_index = (chunk % d) as u32;
        Location {
            stripe,
            member: self.data_member(stripe, data_index),
            member_block: self.member_block(stripe, chunk_offset),
            parity: self.parity_member(stripe),
            data_index,
            chunk_offset,
        }
    }

    /// The member block of `stripe` at `chunk_offset` (any member).
    pub fn member_block(&self, stripe: u64, chunk_offset: u64) -> u64 {
        self.data_offset + stripe * self.chunk_blocks + chunk_offset
    }

    /// The volume block of data chunk `data_index` of `stripe`, at `chunk_offset`.
    pub fn volume_block(&self, stripe: u64, data_index: u32, chunk_offset: u64) -> u64 {
        (stripe * self.data_members() as u64 + data_index as u64) * self.chunk_blocks + chunk_offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_layouts() -> [Layout; 4] {
        [
            Layout::LeftAsymmetric,
            Layout::RightAsymmetric,
            Layout::LeftSymmetric,
            Layout::RightSymmetric,
        ]
    }

    #[test]
    fn left_symmetric_matches_md_on_four_disks() {
        // md's left-symmetric with 4 disks (D = data chunk number, P = parity):
        //   stripe 0:  D0  D1  D2  P
        //   stripe 1:  D4  D5  P   D3
        //   stripe 2:  D8  P   D6  D7
        //   stripe 3:  P   D9  D10 D11
        let g = Raid5Geometry::new(4, 4096, 4096, Layout::LeftSymmetric, 0, 100).unwrap();
        let rows = [[0, 1, 2, 99], [4, 5, 99, 3], [8, 99, 6, 7], [99, 9, 10, 11]];
        for (stripe, row) in rows.iter().enumerate() {
            for (member, &want) in row.iter().enumerate() {
                if want == 99 {
                    assert_eq!(g.parity_member(stripe as u64), member as u32);
                } else {
                    let loc = g.locate(want);
                    assert_eq!(
                        (loc.stripe, loc.member),
                        (stripe as u64, member as u32),
                        "chunk {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_other_layouts_match_md() {
        // left-asymmetric, 4 disks:  D0 D1 D2 P | D3 D4 P D5 | D6 P D7 D8 | P D9 D10 D11
        let g = Raid5Geometry::new(4, 4096, 4096, Layout::LeftAsymmetric, 0, 100).unwrap();
        let members: Vec<u32> = (0..12).map(|c| g.locate(c).member).collect();
        assert_eq!(members, vec![0, 1, 2, 0, 1, 3, 0, 2, 3, 1, 2, 3]);
        // right-asymmetric: P D0 D1 D2 | D3 P D4 D5 | D6 D7 P D8 | D9 D10 D11 P
        let g = Raid5Geometry::new(4, 4096, 4096, Layout::RightAsymmetric, 0, 100).unwrap();
        let members: Vec<u32> = (0..12).map(|c| g.locate(c).member).collect();
        assert_eq!(members, vec![1, 2, 3, 0, 2, 3, 0, 1, 3, 0, 1, 2]);
        // right-symmetric: P D0 D1 D2 | D5 P D3 D4 | D7 D8 P D6 | D9 D10 D11 P
        let g = Raid5Geometry::new(4, 4096, 4096, Layout::RightSymmetric, 0, 100).unwrap();
        let members: Vec<u32> = (0..12).map(|c| g.locate(c).member).collect();
        assert_eq!(members, vec![1, 2, 3, 2, 3, 0, 3, 0, 1, 0, 1, 2]);
    }

    #[test]
    fn every_block_has_one_home_and_parity_never_collides() {
        for layout in all_layouts() {
            for members in 2..=7u32 {
                let g = Raid5Geometry::new(members, 512, 8192, layout, 16, 16 + 16 * 10).unwrap();
                let mut seen = std::collections::HashSet::new();
                for b in 0..g.volume_blocks() {
                    let l = g.locate(b);
                    assert_ne!(l.member, l.parity);
                    assert!(l.member < members);
                    assert!(l.member_block >= 16 && l.member_block < 16 + 16 * 10);
                    assert!(
                        seen.insert((l.member, l.member_block)),
                        "two blocks in one place"
                    );
                    assert_eq!(g.volume_block(l.stripe, l.data_index, l.chunk_offset), b);
                    assert_eq!(g.data_index_of(l.stripe, l.member), Some(l.data_index));
                    assert_eq!(g.data_index_of(l.stripe, l.parity), None);
                }
                // Parity takes the remaining place of each row.
                assert_eq!(
                    seen.len() as u64,
                    g.stripes() * g.chunk_blocks() * (members as u64 - 1)
                );
            }
        }
    }

    #[test]
    fn bad_geometry_is_refused() {
        assert!(Raid5Geometry::new(1, 4096, 65536, Layout::LeftSymmetric, 0, 1000).is_err());
        assert!(Raid5Geometry::new(65, 4096, 65536, Layout::LeftSymmetric, 0, 1000).is_err());
        assert!(Raid5Geometry::new(3, 4096, 3000, Layout::LeftSymmetric, 0, 1000).is_err());
        assert!(Raid5Geometry::new(3, 4096, 2 << 20, Layout::LeftSymmetric, 0, 1000).is_err());
        assert!(Raid5Geometry::new(3, 4096, 65536, Layout::LeftSymmetric, 2000, 1000).is_err());
        assert!(Raid5Geometry::new(3, 4096, 65536, Layout::LeftSymmetric, 0, 8).is_err());
        assert!(Layout::parse("diagonal").is_err());
        assert_eq!(Layout::parse("left-symmetric"), Ok(Layout::LeftSymmetric));
    }
}
