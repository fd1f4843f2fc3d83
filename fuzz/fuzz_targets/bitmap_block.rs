//! Fuzz the write-intent bitmap's block decoder (checksum fixed up so the
//! fields behind it are reached): never a panic, and bit words only for a
//! block of this bitmap's geometry.
#![no_main]

use appliance::raid::bitmap::{Bitmap, BYTES};
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
    let mut b = vec![0u8; BYTES];
    let n = data.len().min(BYTES);
    b[..n].copy_from_slice(&data[..n]);
    b[12..16].fill(0);
    let crc = crc32c::crc32c(&b);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    if let Ok(words) = bm.decode(&b) {
        assert_eq!(words.len(), 125usize.div_ceil(64));
    }
    let _ = bm.decode(&data[..n]);
});
