//! Fuzz journal replay with the journal device's contents: a superblock
//! and a log taken from the input (checksums sealed so the fuzzer reaches
//! the lengths and entries behind them), replayed onto two RAM members.
//! Replay may refuse the journal, never panic, and never write outside
//! its members.
#![no_main]

use std::sync::Arc;

use appliance::raid::journal::{fuzz_seal_log, Journal};
use bdev::{BlockDevice, RamDevice};
use libfuzzer_sys::fuzz_target;

const BS: usize = 4096;
const BLOCKS: u64 = 66;

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    // One journal device for every run: the image below overwrites all
    // of it.
    static JDEV: std::sync::OnceLock<Arc<RamDevice>> = std::sync::OnceLock::new();
    let jdev = JDEV
        .get_or_init(|| Arc::new(RamDevice::new("j", BS as u32, BLOCKS).unwrap()))
        .clone();
    // A freshly formatted journal's image, made once: formatting is not
    // what is fuzzed, and doing it every run cost most of the time.
    static FORMATTED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let mut image = FORMATTED
        .get_or_init(|| {
            let dev = Arc::new(RamDevice::new("f", BS as u32, BLOCKS).unwrap());
            drop(Journal::format(dev.clone()).expect("format"));
            let mut image = vec![0u8; BLOCKS as usize * BS];
            appliance::raid::journal::fuzz_read(dev.as_ref(), &mut image);
            image
        })
        .clone();
    // The superblock's log length from the input, then the log's blocks.
    let log_blocks = u64::from_le_bytes(data[0..8].try_into().unwrap());
    if data[8] & 1 == 1 {
        image[16..24].copy_from_slice(&log_blocks.to_le_bytes());
        let crc = crc32c::crc32c(&image[..BS - 4]);
        image[BS - 4..BS].copy_from_slice(&crc.to_le_bytes());
    }
    // Log blocks from the input, in the first eight blocks of the log, a
    // record header wherever the input puts one.
    let log = &data[16..];
    let n = log.len().min(8 * BS);
    image[BS..BS + n].copy_from_slice(&log[..n]);
    fuzz_seal_log(&mut image[BS..(BLOCKS as usize - 1) * BS], BS);
    appliance::raid::journal::fuzz_write(jdev.as_ref(), &image);
    let members: Vec<Option<Arc<dyn BlockDevice>>> = (0..2)
        .map(|i| {
            Some(Arc::new(RamDevice::new(&format!("m{i}"), BS as u32, 32).unwrap())
                as Arc<dyn BlockDevice>)
        })
        .collect();
    let _ = Journal::replay(jdev, &members, None);
});
