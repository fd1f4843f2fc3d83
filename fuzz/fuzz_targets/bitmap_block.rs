//! Fuzz the write-intent bitmap's block decoders: md's bitmap (magic set so
//! the fields behind it are reached) and the first format (checksum fixed
//! up): never a panic, and bit words only of this bitmap's size.
#![no_main]

use appliance::raid::bitmap::{Bitmap, BYTES};
use appliance::raid::md::bitmap::MAGIC;
use appliance::raid::rebuild::Rows;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rows = Rows {
        count: 1000,
        blocks: 16,
        offset: 256,
        total: 16000,
        block_size: 4096,
    };
    let Ok(bm) = Bitmap::new(&rows, 8, [7; 16]) else {
        return;
    };
    let words = 125usize.div_ceil(64);
    let mut b = vec![0u8; BYTES];
    let n = data.len().min(BYTES);
    b[..n].copy_from_slice(&data[..n]);
    let mut md = b.clone();
    md[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    md[8..24].copy_from_slice(&[7; 16]);
    if let Ok(w) = bm.decode(&md) {
        assert_eq!(w.len(), words);
    }
    b[12..16].fill(0);
    let crc = crc32c::crc32c(&b);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    if let Ok(w) = bm.decode_legacy(&b) {
        assert_eq!(w.len(), words);
    }
    let _ = bm.decode(&data[..n]);
    let _ = bm.decode_legacy(&data[..n]);
});
