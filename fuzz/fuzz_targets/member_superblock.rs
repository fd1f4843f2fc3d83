//! Fuzz the member superblock decoders: md's version-1 superblock (its
//! checksum fixed up first, so the fuzzer reaches the fields behind it),
//! the appliance's view of it, and the first format (CRC fixed up too).
//! Decoding never panics, and whatever decodes encodes to a block that
//! decodes to the same thing.
#![no_main]

use appliance::raid::md::convert::{from_md, to_md};
use appliance::raid::md::superblock::{checksum, MdSuperblock, MAGIC, MAX_DEVS, V1_2_OFFSET};
use appliance::raid::superblock::Superblock;
use libfuzzer_sys::fuzz_target;

const DEVICE_SECTORS: u64 = 1 << 24;

fuzz_target!(|data: &[u8]| {
    let mut b = vec![0u8; 4096];
    let n = data.len().min(4096);
    b[..n].copy_from_slice(&data[..n]);
    // md's: magic and major version set, checksum fixed up.
    let mut m = b.clone();
    m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    m[4..8].copy_from_slice(&1u32.to_le_bytes());
    let max_dev = (u32::from_le_bytes([m[220], m[221], m[222], m[223]]) as usize).min(MAX_DEVS);
    let c = checksum(&m, max_dev);
    m[216..220].copy_from_slice(&c.to_le_bytes());
    if let Ok(md) = MdSuperblock::decode(&m, V1_2_OFFSET, DEVICE_SECTORS) {
        let again = MdSuperblock::decode(&md.encode(), V1_2_OFFSET, DEVICE_SECTORS)
            .expect("an encoded md superblock decodes");
        assert_eq!(again, md);
        for bs in [512, 4096] {
            if let Ok(sb) = from_md(&md, bs, None) {
                let back = to_md(&sb, sb.slot);
                assert_eq!(back.set_uuid, md.set_uuid);
                assert_eq!(back.slot(), md.slot());
            }
        }
    }
    // The first format.
    b[12..16].fill(0);
    let crc = crc32c::crc32c(&b);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    if let Ok(sb) = Superblock::decode_legacy(&b) {
        let again =
            Superblock::decode_legacy(&sb.encode_legacy()).expect("an encoded superblock decodes");
        assert_eq!(again, sb);
    }
    let _ = Superblock::decode_legacy(&data[..n]);
    let _ = MdSuperblock::decode(&data[..n], V1_2_OFFSET, DEVICE_SECTORS);
});
