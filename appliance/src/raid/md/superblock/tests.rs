use super::*;
use proptest::prelude::*;

/// A valid superblock of a 1.2 member on a device of `DEVICE` sectors.
const DEVICE: u64 = 1 << 24;

fn sample() -> MdSuperblock {
    let mut set_name = [0u8; 32];
    set_name[..6].copy_from_slice(b"host:0");
    MdSuperblock {
        feature_map: feature::BITMAP_OFFSET,
        set_uuid: [0x11; 16],
        set_name,
        ctime: 1_700_000_000 | 123_456 << 40,
        level: 5,
        layout: 2,
        size: 200_000,
        chunk_sectors: 128,
        raid_disks: 3,
        bitmap_offset: 8,
        data_offset: 2048,
        data_size: 200_704,
        super_offset: V1_2_OFFSET,
        recovery_offset: 0,
        dev_number: 1,
        device_uuid: [0x22; 16],
        devflags: 0,
        bblog_size: 8,
        bblog_offset: 16,
        utime: 1_700_000_100,
        events: 18,
        resync_offset: MAX_SECTOR,
        dev_roles: vec![0, 1, 2, ROLE_SPARE],
        ..Default::default()
    }
}

prop_compose! {
    fn valid()(
        level in prop_oneof![Just(1i32), Just(5)],
        layout in 0u32..4,
        chunk_shift in 3u32..12,
        raid_disks in 1u32..12,
        extra_devs in 0usize..20,
        dev_pick in any::<prop::sample::Index>(),
        data_offset in 16u64..10_000,
        data_size in 1u64..1_000_000,
        used in any::<prop::sample::Index>(),
        events in 0u64..(1 << 62),
        resync in prop_oneof![Just(None), any::<prop::sample::Index>().prop_map(Some)],
        recovery in prop_oneof![Just(None), any::<prop::sample::Index>().prop_map(Some)],
    )(
        level in Just(level), layout in Just(layout), chunk_shift in Just(chunk_shift),
        raid_disks in Just(raid_disks), extra_devs in Just(extra_devs), dev_pick in Just(dev_pick),
        data_offset in Just(data_offset), data_size in Just(data_size), used in Just(used),
        events in Just(events), resync in Just(resync), recovery in Just(recovery),
        uuids in any::<([u8; 16], [u8; 16])>(),
        name in "[a-z0-9:_-]{0,32}",
        times in (0u64..1 << 40, 0u64..1_000_000, 0u64..1 << 40, 0u64..1_000_000),
        devflags in 0u8..4,
        bitmap in prop_oneof![Just(None), (8u64..64).prop_map(Some)],
        roles_seed in prop::collection::vec(any::<u16>(), 32),
        cnt in any::<u32>(),
    ) -> MdSuperblock {
        let max_dev = raid_disks as usize + extra_devs;
        let size = used.index(data_size as usize + 1) as u64;
        let mut set_name = [0u8; 32];
        set_name[..name.len()].copy_from_slice(name.as_bytes());
        // Every slot held once, the rest spare or faulty, in any order.
        let mut dev_roles: Vec<u16> = (0..max_dev)
            .map(|i| if i < raid_disks as usize { i as u16 } else if roles_seed[i % 32] % 2 == 0 { ROLE_SPARE } else { ROLE_FAULTY })
            .collect();
        for i in (1..max_dev).rev() {
            dev_roles.swap(i, roles_seed[i % 32] as usize % (i + 1));
        }
        let mut feature_map = 0;
        let bitmap_offset = match bitmap {
            Some(b) if b < data_offset - V1_2_OFFSET => {
                feature_map |= feature::BITMAP_OFFSET;
                b as u32
            }
            _ => 0,
        };
        let recovery_offset = match recovery {
            Some(i) => {
                feature_map |= feature::RECOVERY_OFFSET;
                i.index(data_size as usize + 1) as u64
            }
            None => 0,
        };
        MdSuperblock {
            feature_map,
            set_uuid: uuids.0,
            set_name,
            ctime: times.0 | times.1 << 40,
            level,
            layout: if level == 5 { layout } else { 0 },
            size,
            chunk_sectors: if level == 5 { 1 << chunk_shift } else { 0 },
            raid_disks,
            bitmap_offset,
                                    data_offset,
            data_size,
            super_offset: V1_2_OFFSET,
            recovery_offset,
            dev_number: dev_pick.index(max_dev) as u32,
            cnt_corrected_read: cnt,
            device_uuid: uuids.1,
            devflags,
                        utime: times.2 | times.3 << 40,
            events,
            resync_offset: resync.map_or(MAX_SECTOR, |i| i.index(size as usize + 1) as u64),
            dev_roles,
            ..Default::default()
        }
    }
}

proptest! {
    #[test]
    fn every_valid_superblock_round_trips(sb in valid()) {
        let b = sb.encode();
        prop_assert_eq!(b.len(), BYTES);
        prop_assert_eq!(MdSuperblock::decode(&b, V1_2_OFFSET, DEVICE), Ok(sb));
    }

    /// A flipped bit inside what the checksum covers is caught; past it
    /// (the unused rest of the 4 KiB) it changes nothing.
    #[test]
    fn a_flipped_bit_is_caught_or_changes_nothing(sb in valid(), at in 0usize..BYTES, bit in 0u8..8) {
        let mut b = sb.encode();
        b[at] ^= 1 << bit;
        match MdSuperblock::decode(&b, V1_2_OFFSET, DEVICE) {
            Ok(got) => {
                prop_assert!(at >= 256 + 2 * sb.max_dev(), "flip at {} not caught", at);
                prop_assert_eq!(got, sb);
            }
            Err(_) => prop_assert!(at < 256 + 2 * sb.max_dev()),
        }
    }

    /// Whatever the bytes (with md's magic, version and a checksum that
    /// matches them), decoding never panics, and what decodes encodes to
    /// the same superblock.
    #[test]
    fn arbitrary_checksummed_bytes_never_panic(mut b in prop::collection::vec(any::<u8>(), BYTES), max_dev in 0u32..2000) {
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[220..224].copy_from_slice(&max_dev.to_le_bytes());
        let md = (max_dev as usize).min(MAX_DEVS);
        let c = checksum(&b, md);
        b[216..220].copy_from_slice(&c.to_le_bytes());
        if let Ok(sb) = MdSuperblock::decode(&b, V1_2_OFFSET, DEVICE) {
            prop_assert_eq!(MdSuperblock::decode(&sb.encode(), V1_2_OFFSET, DEVICE), Ok(sb));
        }
    }
}

#[test]
fn the_sample_round_trips_and_answers_its_questions() {
    let sb = sample();
    let got = MdSuperblock::decode(&sb.encode(), V1_2_OFFSET, DEVICE).unwrap();
    assert_eq!(got, sb);
    assert_eq!(got.name(), "host:0");
    assert_eq!(got.slot(), Some(1));
    assert_eq!(got.bitmap_sectors(), Some(8));
    assert_eq!(got.minor_version(), 2);
    assert!(got.clean());
}

/// Checks one field change is refused with that field named.
fn refused(change: impl FnOnce(&mut MdSuperblock), field: &str) {
    let mut sb = sample();
    change(&mut sb);
    match MdSuperblock::decode(&sb.encode(), V1_2_OFFSET, DEVICE) {
        Err(MdSuperblockError::Invalid { field: f, .. }) => assert_eq!(f, field),
        other => panic!("{field}: expected Invalid, got {other:?}"),
    }
}

#[test]
fn impossible_fields_are_named() {
    refused(|s| s.feature_map |= 1 << 20, "feature_map");
    refused(|s| s.super_offset = 0, "super_offset");
    refused(|s| s.dev_number = 4, "dev_number");
    refused(|s| s.raid_disks = 0, "raid_disks");
    refused(|s| s.dev_roles[3] = 7, "dev_roles");
    refused(|s| s.chunk_sectors = 100, "chunksize");
    refused(|s| s.ctime |= 1_000_000 << 40, "ctime");
    refused(|s| s.data_size = DEVICE, "data_size");
    refused(|s| s.data_offset = 12, "data_offset");
    refused(|s| s.size = s.data_size + 1, "size");
    refused(
        |s| {
            s.feature_map |= feature::RECOVERY_OFFSET;
            s.recovery_offset = s.data_size + 1;
        },
        "recovery_offset",
    );
    refused(|s| s.resync_offset = s.size + 1, "resync_offset");
    refused(|s| s.bitmap_offset = 4, "bitmap_offset");
    refused(|s| s.bitmap_offset = 2048, "bitmap_offset");
    refused(|s| s.bitmap_offset = -8i32 as u32, "bitmap_offset");
}

#[test]
fn foreign_corrupt_and_other_versions_are_told_apart() {
    assert_eq!(
        MdSuperblock::decode(&[0u8; BYTES], V1_2_OFFSET, DEVICE),
        Err(MdSuperblockError::NotMd(0))
    );
    assert_eq!(
        MdSuperblock::decode(&[0u8; 10], V1_2_OFFSET, DEVICE),
        Err(MdSuperblockError::NotMd(0))
    );
    let mut b = sample().encode();
    b[4] = 0;
    assert_eq!(
        MdSuperblock::decode(&b, V1_2_OFFSET, DEVICE),
        Err(MdSuperblockError::MajorVersion(0))
    );
    let mut b = sample().encode();
    b[100] ^= 4;
    assert!(matches!(
        MdSuperblock::decode(&b, V1_2_OFFSET, DEVICE),
        Err(MdSuperblockError::Corrupt { .. })
    ));
    let mut b = sample().encode();
    b[220..224].copy_from_slice(&5000u32.to_le_bytes());
    assert!(matches!(
        MdSuperblock::decode(&b, V1_2_OFFSET, DEVICE),
        Err(MdSuperblockError::Invalid {
            field: "max_dev",
            ..
        })
    ));
}

/// md's checksum folds the carry of the 64-bit sum back in, and counts a
/// trailing half word when max_dev is odd.
#[test]
fn the_checksum_folds_the_carry_and_counts_an_odd_role() {
    let mut b = vec![0u8; BYTES];
    for o in (0..256).step_by(4) {
        b[o..o + 4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
    }
    b[256..258].copy_from_slice(&7u16.to_le_bytes());
    // 63 words (the checksum word is skipped) of 0xfffffff0.
    let sum: u64 = 63 * 0xffff_fff0;
    let folded = ((sum & 0xffff_ffff) + (sum >> 32)) as u32;
    assert_eq!(checksum(&b, 0), folded);
    assert_eq!(checksum(&b, 1), folded.wrapping_add(7));
}
