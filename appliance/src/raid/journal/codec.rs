//! The journal's on-disk format: its superblock and the records of its
//! log (header, entries, checksum), encoded and decoded with no IO.

use crate::raid::RaidError;
use bdev::BlockDevice;

use super::JournalMode;

pub(super) const SB_MAGIC: u64 = 0x3259_4c4e_5254_4f4a; // "JORTNLY2"
/// The superblock of a journal whose records are checksummed whole (before
/// the checksum skipped the header's unused rest). Still read; a replay
/// rewrites it as SB_MAGIC, so a binary from before that change refuses the
/// journal ("not a journal") rather than skipping its records as torn.
pub(super) const SB_MAGIC_V1: u64 = 0x3159_4c4e_5254_4f4a; // "JORTNLY1"
/// The smallest journal block: a record header with MAX_ENTRIES entries.
pub(super) const MIN_BLOCK: usize = 32 + 16 * MAX_ENTRIES + 4;
pub(super) const REC_MAGIC: u64 = 0x3152_4543_4c4e_524a; // "JRNLCER1"
/// Runs of blocks a record can describe (one per member written).
pub const MAX_ENTRIES: usize = 200;
/// In a record header's entry count: the record holds write-back data,
/// whose parity was not computed.
pub(super) const VOLUME_RECORD: u32 = 1 << 31;

/// One run of blocks in a record: `count` blocks to `member` at `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Member slot.
    pub member: u32,
    /// Blocks.
    pub count: u32,
    /// First member block.
    pub block: u64,
}

/// What the journal superblock holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Super {
    pub(super) nonce: u64,
    pub(super) log_blocks: u64,
    pub(super) checkpoint_seq: u64,
    pub(super) mode: JournalMode,
}

pub(super) fn encode_super(s: &Super, bs: usize) -> Vec<u8> {
    let mut b = vec![0u8; bs];
    b[0..8].copy_from_slice(&SB_MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&s.nonce.to_le_bytes());
    b[16..24].copy_from_slice(&s.log_blocks.to_le_bytes());
    b[24..32].copy_from_slice(&s.checkpoint_seq.to_le_bytes());
    b[32] = (s.mode == JournalMode::WriteBack) as u8;
    let crc = crc32c::crc32c(&b[..bs - 4]);
    b[bs - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Size `r` for a record of `blocks` data blocks of `bs` bytes and fill
/// its header (magic, `nonce`, size, `entries`); sequence and checksum are
/// left to [`seal`].
pub(super) fn write_header(
    r: &mut Vec<u8>,
    bs: usize,
    nonce: u64,
    entries: &[Entry],
    blocks: usize,
    volume: bool,
) {
    r.resize(bs * (1 + blocks), 0);
    fill_header(&mut r[..bs], nonce, entries, blocks, volume);
}

/// The header block `h` of a record of `blocks` data blocks (which may
/// live in a buffer of their own: a write-back record's data goes on to
/// the cache as it is).
pub(super) fn fill_header(
    h: &mut [u8],
    nonce: u64,
    entries: &[Entry],
    blocks: usize,
    volume: bool,
) {
    // Only what the checksum covers is zeroed: the caller writes every
    // data block, and the header block's rest is never read.
    let len = header_len(entries.len(), h.len());
    h[..len].fill(0);
    h[0..8].copy_from_slice(&REC_MAGIC.to_le_bytes());
    h[8..16].copy_from_slice(&nonce.to_le_bytes());
    h[24..28].copy_from_slice(&((1 + blocks) as u32).to_le_bytes());
    let flag = if volume { VOLUME_RECORD } else { 0 };
    h[28..32].copy_from_slice(&(entries.len() as u32 | flag).to_le_bytes());
    for (i, e) in entries.iter().take(MAX_ENTRIES).enumerate() {
        let at = 32 + i * 16;
        h[at..at + 4].copy_from_slice(&e.member.to_le_bytes());
        h[at + 4..at + 8].copy_from_slice(&e.count.to_le_bytes());
        h[at + 8..at + 16].copy_from_slice(&e.block.to_le_bytes());
    }
}

/// Bytes of a header block that hold something: the fixed fields and
/// `entries` entries.
pub(super) fn header_len(entries: usize, bs: usize) -> usize {
    (32 + 16 * entries.min(MAX_ENTRIES)).min(bs - 4)
}

/// A record's checksum: CRC32C over its header block's fields and
/// entries, then its data blocks. It goes in the header block's last 4
/// bytes.
pub(super) fn record_crc(header: &[u8], data: &[u8]) -> u32 {
    let entries = (u32_at(header, 28) & !VOLUME_RECORD) as usize;
    let head = crc32c::crc32c(&header[..header_len(entries, header.len())]);
    crc32c::crc32c_append(head, data)
}

/// Whether `record` carries its checksum (see [`RecordCheck`]).
#[cfg(test)]
pub(super) fn record_ok(record: &[u8], bs: usize) -> bool {
    let mut c = RecordCheck::start(&record[..bs], bs);
    for b in record[bs..].chunks(bs) {
        c.add(b);
    }
    c.ok()
}

/// A record's checksum, checked as its blocks stream past (replay never
/// holds a whole log, or a whole record, in memory). Records written
/// before the checksum skipped the header's unused rest covered the whole
/// record (with the checksum's own 4 bytes zeroed); those are accepted
/// too, so a journal left by an older version still replays.
pub(super) struct RecordCheck {
    current: u32,
    old: u32,
    want: u32,
}

impl RecordCheck {
    /// Start with the record's header block.
    pub(super) fn start(header: &[u8], bs: usize) -> RecordCheck {
        let entries = (u32_at(header, 28) & !VOLUME_RECORD) as usize;
        let old = crc32c::crc32c(&header[..bs - 4]);
        RecordCheck {
            current: crc32c::crc32c(&header[..header_len(entries, bs)]),
            old: crc32c::crc32c_append(old, &[0; 4]),
            want: u32_at(header, bs - 4),
        }
    }

    /// The record's next data block(s).
    pub(super) fn add(&mut self, data: &[u8]) {
        self.current = crc32c::crc32c_append(self.current, data);
        self.old = crc32c::crc32c_append(self.old, data);
    }

    /// Whether the record is whole.
    pub(super) fn ok(&self) -> bool {
        self.current == self.want || self.old == self.want
    }
}

/// Give a record (in one buffer: its header block, then its data blocks)
/// its sequence number and its checksum.
pub(super) fn seal(record: &mut [u8], bs: usize, seq: u64) {
    let (header, data) = record.split_at_mut(bs);
    seal_parts(header, data, seq);
}

/// [`seal`] for a record whose header block and data blocks are apart.
pub(super) fn seal_parts(header: &mut [u8], data: &[u8], seq: u64) {
    header[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = record_crc(header, data);
    let bs = header.len();
    header[bs - 4..].copy_from_slice(&crc.to_le_bytes());
}

/// The little-endian u64 at byte `at` of `b`.
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// The little-endian u32 at byte `at` of `b`.
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// Sequence numbers at or above this are no honest journal's (2^62
/// records: thousands of years at millions a second): a superblock or
/// record claiming one is crafted or corrupt, and counting on from it
/// would overflow (a panic on the IO path, or a wrap that hides every
/// later record from replay).
pub(super) const SEQ_LIMIT: u64 = 1 << 62;

/// The writer hands out no number this close to [`SEQ_LIMIT`]: the
/// journal is given up instead (as when a record can never fit). A
/// crafted checkpoint just below the limit made the next records' numbers
/// reach it, and a replay then dropped them: acknowledged writes lost
/// without a word (audit). The slack covers reservers racing the check
/// and the records a degraded replay logs.
pub(crate) const SEQ_SLACK: u64 = 1 << 20;

pub(super) fn decode_super(b: &[u8]) -> Result<Super, RaidError> {
    let bs = b.len();
    if bs < 64 || ![SB_MAGIC, SB_MAGIC_V1].contains(&u64_at(b, 0)) {
        return Err(RaidError::Invalid(
            "not a journal (no journal superblock)".into(),
        ));
    }
    if crc32c::crc32c(&b[..bs - 4]) != u32_at(b, bs - 4) {
        return Err(RaidError::Invalid(
            "journal superblock checksum mismatch".into(),
        ));
    }
    if u64_at(b, 24) >= SEQ_LIMIT {
        return Err(RaidError::Invalid(format!(
            "journal superblock's checkpoint sequence {} is out of range",
            u64_at(b, 24)
        )));
    }
    Ok(Super {
        nonce: u64_at(b, 8),
        log_blocks: u64_at(b, 16),
        checkpoint_seq: u64_at(b, 24),
        mode: match b[32] {
            0 => JournalMode::WriteThrough,
            1 => JournalMode::WriteBack,
            x => {
                return Err(RaidError::Invalid(format!(
                    "journal superblock names unknown mode {x}"
                )))
            }
        },
    })
}

/// A journal block must hold a record header with every entry a record may
/// have (a 512-byte block holds 29, fewer than a wide RAID5 writes).
pub fn block_size_ok(dev: &dyn BlockDevice) -> Result<(), RaidError> {
    let bs = dev.info().block_size as usize;
    if bs < MIN_BLOCK {
        return Err(RaidError::Invalid(format!(
            "{}: a journal needs 4096-byte blocks, this device has {bs}",
            dev.info().name
        )));
    }
    Ok(())
}
