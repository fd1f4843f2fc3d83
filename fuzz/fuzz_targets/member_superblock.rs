//! Fuzz the member superblock decoder. The checksum is fixed up first, so
//! the fuzzer reaches the fields behind it. Decoding never panics, and
//! whatever decodes encodes to a block that decodes to the same thing.
#![no_main]

use appliance::raid::superblock::Superblock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = vec![0u8; 4096];
    let n = data.len().min(4096);
    b[..n].copy_from_slice(&data[..n]);
    b[12..16].fill(0);
    let crc = crc32c::crc32c(&b);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    if let Ok(sb) = Superblock::decode(&b) {
        let again = Superblock::decode(&sb.encode()).expect("an encoded superblock decodes");
        assert_eq!(again, sb);
    }
    let _ = Superblock::decode(&data[..n]);
});
