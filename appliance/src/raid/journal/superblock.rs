//! Where the journal's superblock lives: two copies, one in the device's
//! first block and one in its last, so that a write torn by a power cut
//! (or a bad sector) in one leaves the other. They are written one after
//! the other, each flushed, the first copy first: whichever is read back
//! is a whole superblock, the newer one when the first copy is whole.
//! Journals formatted before the second copy (their log runs to the last
//! block) keep a single copy and still open.

use bdev::{BlockDevice, IoOp};

use super::codec::{decode_super, encode_super, Super};
use crate::raid::metaio::sync;
use crate::raid::RaidError;

/// Blocks a journal of `num_blocks` gives its log: all but the two
/// superblock copies.
pub(super) fn log_blocks_for(num_blocks: u64) -> u64 {
    num_blocks.saturating_sub(2)
}

/// The block of the second copy, if this journal has one (its log leaves
/// the last block free).
fn second_copy(dev: &dyn BlockDevice, log_blocks: u64) -> Option<u64> {
    let at = log_blocks.checked_add(1)?;
    (at < dev.info().num_blocks).then_some(dev.info().num_blocks - 1)
}

/// Check what a superblock says against the device it is on.
fn fits(dev: &dyn BlockDevice, s: &Super) -> Result<(), RaidError> {
    if s.log_blocks
        .checked_add(1)
        .is_none_or(|end| end > dev.info().num_blocks)
        || s.log_blocks < 2
    {
        return Err(RaidError::Invalid(format!(
            "{}: journal superblock claims a log of {} blocks on a device of {}",
            dev.info().name,
            s.log_blocks,
            dev.info().num_blocks
        )));
    }
    Ok(())
}

/// Read the superblock: the first copy, or the second when the first is
/// torn or unreadable.
pub(super) fn load(dev: &dyn BlockDevice) -> Result<Super, RaidError> {
    let bs = dev.info().block_size as usize;
    let read = |at: u64| -> Result<Super, RaidError> {
        let mut b = vec![0u8; bs];
        sync(dev, IoOp::Read, at, &mut b)?;
        let s = decode_super(&b)
            .map_err(|e| RaidError::Invalid(format!("{}: {e}", dev.info().name)))?;
        fits(dev, &s)?;
        Ok(s)
    };
    let first = match read(0) {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    let last = dev.info().num_blocks.saturating_sub(1);
    match read(last) {
        // Only a copy where a second copy belongs counts.
        Ok(s) if second_copy(dev, s.log_blocks) == Some(last) => {
            tracing::warn!(journal = %dev.info().name, error = %first, "the journal's first superblock copy is unusable; using the second");
            Ok(s)
        }
        _ => Err(first),
    }
}

/// Write `s` to both copies (one, for a journal formatted with one): the
/// first, then the second. A failure of either is the device's: a second
/// copy left behind would be read after the first is torn, and its old
/// checkpoint replay records whose space was reused since over newer
/// data (the caller fails the journal).
pub(super) fn store(dev: &dyn BlockDevice, s: &Super) -> Result<(), RaidError> {
    store_copies(dev, s)?
}

/// [`store`], telling the first copy's failure (the outer error: nothing
/// changed) from the second's (the inner one: the first is current).
pub(super) fn store_copies(
    dev: &dyn BlockDevice,
    s: &Super,
) -> Result<Result<(), RaidError>, RaidError> {
    write_copy(dev, s, 0)?;
    Ok(match second_copy(dev, s.log_blocks) {
        Some(at) => write_copy(dev, s, at),
        None => Ok(()),
    })
}

/// Write a new journal's superblock: the second copy first, so that a
/// crash in between leaves the device as it was (its first copy, of
/// whatever was there before), never a first copy of this journal with a
/// second of another.
pub(super) fn store_new(dev: &dyn BlockDevice, s: &Super) -> Result<(), RaidError> {
    if let Some(at) = second_copy(dev, s.log_blocks) {
        write_copy(dev, s, at)?;
    }
    write_copy(dev, s, 0)
}

/// Zero both places a superblock may be (a removed journal: nothing in
/// its log is needed any more, and the device is free).
pub(super) fn erase(dev: &dyn BlockDevice) -> Result<(), RaidError> {
    let mut zero = vec![0u8; dev.info().block_size as usize];
    sync(dev, IoOp::Write, 0, &mut zero)?;
    let last = dev.info().num_blocks.saturating_sub(1);
    sync(dev, IoOp::Write, last, &mut zero)?;
    sync(dev, IoOp::Flush, 0, &mut [])
}

fn write_copy(dev: &dyn BlockDevice, s: &Super, at: u64) -> Result<(), RaidError> {
    let mut b = encode_super(s, dev.info().block_size as usize);
    sync(dev, IoOp::Write, at, &mut b)?;
    sync(dev, IoOp::Flush, 0, &mut [])
}
