//! The RAID5 write journal, write-through mode (like md's raid5-cache in
//! write-through): every stripe update (the data and parity blocks about to
//! go to the members) is first written to the journal device as one record
//! and made durable with a flush; only then are the members written. After
//! a crash, replay writes every durable record's blocks to the members
//! again, so no stripe is left with parity that does not match its data:
//! the RAID5 write hole is closed even when a member is missing.
//!
//! Layout on the journal device: block 0 is the journal superblock; the
//! rest is a circular log of records. A record is a header block (magic,
//! the journal's secret nonce, sequence number, length, where each run of
//! blocks goes) followed by the blocks, with a CRC32C over the header's
//! fields and entries and all the blocks (not the header block's unused
//! rest: a 4 KiB write would checksum 8 KiB otherwise). Every
//! channel (one per reactor) appends to the shared log: space and sequence
//! numbers come from one atomic counter, taken while the piece holds its
//! stripe lock, so two records of one stripe are ordered by sequence.
//!
//! Replay scans the whole log: records are accepted by magic, nonce, CRC
//! and a sequence above the last checkpoint, and applied in sequence
//! order. A torn record fails its CRC and is skipped; its member writes
//! never started (they wait for the journal flush), so skipping is right.
//! The nonce is random per journal, so guest data inside old records cannot
//! pass for a record. Replay is idempotent: a crash during it replays again.
//!
//! Space comes back at a checkpoint, without stopping IO: the checkpoint
//! closes the current epoch (records reserved so far), waits until every
//! record of that epoch has reached the members, flushes the members, and
//! records the epoch's last sequence in the superblock; the log before it
//! is free. While the log is full, pieces wait for the next checkpoint.
//! (Suspending the volume instead would deadlock: pieces waiting for log
//! space are IO in flight that a suspend waits for.)
//!
//! Write-back mode (the mode is kept in the journal superblock): a write's
//! data alone goes to the log as a *volume record* and is acknowledged once
//! that is durable; the blocks stay in the [`WriteCache`] until reclaim
//! writes them to the members through the write-through path (a record of
//! data and parity first). Guest records leave room in the log for
//! reclaiming every cached block, so reclaim always finds room for its own
//! records. A checkpoint also waits
//! until no block of the closed epoch is left in the cache. Replay applies
//! all records in sequence order; a volume record's blocks go to their
//! member with a parity update (read-modify-write, or reconstruct-write
//! when the member is missing), which leaves every row consistent and is
//! idempotent too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bdev::{BlockDevice, IoOp, IoRequest, IoVec, SgList, SubmitError};

use super::cache::WriteCache;
use super::geometry::Raid5Geometry;
use super::parity::xor_into;

const SB_MAGIC: u64 = 0x3259_4c4e_5254_4f4a; // "JORTNLY2"
/// The superblock of a journal whose records are checksummed whole (before
/// the checksum skipped the header's unused rest). Still read; a replay
/// rewrites it as SB_MAGIC, so a binary from before that change refuses the
/// journal ("not a journal") rather than skipping its records as torn.
const SB_MAGIC_V1: u64 = 0x3159_4c4e_5254_4f4a; // "JORTNLY1"
/// The smallest journal block: a record header with MAX_ENTRIES entries.
const MIN_BLOCK: usize = 32 + 16 * MAX_ENTRIES + 4;
const REC_MAGIC: u64 = 0x3152_4543_4c4e_524a; // "JRNLCER1"
/// Runs of blocks a record can describe (one per member written).
pub const MAX_ENTRIES: usize = 200;
/// In a record header's entry count: the record holds write-back data,
/// whose parity was not computed.
const VOLUME_RECORD: u32 = 1 << 31;

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JournalMode {
    /// After the members are written (the journal only closes the hole).
    #[default]
    WriteThrough,
    /// Once the data is durable in the journal.
    WriteBack,
}

impl JournalMode {
    /// Its name in configs and the API.
    pub fn name(self) -> &'static str {
        match self {
            JournalMode::WriteThrough => "write-through",
            JournalMode::WriteBack => "write-back",
        }
    }

    /// From [`name`](Self::name) (empty: write-through).
    pub fn parse(s: &str) -> Result<JournalMode, String> {
        match s {
            "" | "write-through" => Ok(JournalMode::WriteThrough),
            "write-back" => Ok(JournalMode::WriteBack),
            _ => Err(format!(
                "unknown journal mode {s:?} (write-through or write-back)"
            )),
        }
    }
}

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
struct Super {
    nonce: u64,
    log_blocks: u64,
    checkpoint_seq: u64,
    mode: JournalMode,
}

fn encode_super(s: &Super, bs: usize) -> Vec<u8> {
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
fn write_header(
    r: &mut Vec<u8>,
    bs: usize,
    nonce: u64,
    entries: &[Entry],
    blocks: usize,
    volume: bool,
) {
    // Only what the checksum covers is zeroed: the caller writes every
    // data block, and the header block's rest is never read.
    r.resize(bs * (1 + blocks), 0);
    r[..header_len(entries.len(), bs)].fill(0);
    r[0..8].copy_from_slice(&REC_MAGIC.to_le_bytes());
    r[8..16].copy_from_slice(&nonce.to_le_bytes());
    r[24..28].copy_from_slice(&((1 + blocks) as u32).to_le_bytes());
    let flag = if volume { VOLUME_RECORD } else { 0 };
    r[28..32].copy_from_slice(&(entries.len() as u32 | flag).to_le_bytes());
    for (i, e) in entries.iter().take(MAX_ENTRIES).enumerate() {
        let at = 32 + i * 16;
        r[at..at + 4].copy_from_slice(&e.member.to_le_bytes());
        r[at + 4..at + 8].copy_from_slice(&e.count.to_le_bytes());
        r[at + 8..at + 16].copy_from_slice(&e.block.to_le_bytes());
    }
}

/// Bytes of a header block that hold something: the fixed fields and
/// `entries` entries.
fn header_len(entries: usize, bs: usize) -> usize {
    (32 + 16 * entries.min(MAX_ENTRIES)).min(bs - 4)
}

/// A record's checksum: CRC32C over its header's fields and entries, then
/// its blocks. It goes in the header block's last 4 bytes.
fn record_crc(record: &[u8], bs: usize) -> u32 {
    let entries = (u32_at(record, 28) & !VOLUME_RECORD) as usize;
    let head = crc32c::crc32c(&record[..header_len(entries, bs)]);
    crc32c::crc32c_append(head, &record[bs..])
}

/// Whether `record` carries its checksum. Records written before the
/// checksum skipped the header's unused rest covered the whole record
/// (with the checksum's own 4 bytes zeroed); those are accepted too, so a
/// journal left by an older version still replays.
fn record_ok(record: &[u8], bs: usize) -> bool {
    let want = u32_at(record, bs - 4);
    if record_crc(record, bs) == want {
        return true;
    }
    let head = crc32c::crc32c(&record[..bs - 4]);
    let head = crc32c::crc32c_append(head, &[0; 4]);
    crc32c::crc32c_append(head, &record[bs..]) == want
}

/// Give a record its sequence number and its checksum.
fn seal(record: &mut [u8], bs: usize, seq: u64) {
    record[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = record_crc(record, bs);
    record[bs - 4..bs].copy_from_slice(&crc.to_le_bytes());
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

fn decode_super(b: &[u8]) -> Result<Super, String> {
    let bs = b.len();
    if bs < 64 || ![SB_MAGIC, SB_MAGIC_V1].contains(&u64_at(b, 0)) {
        return Err("not a journal (no journal superblock)".into());
    }
    if crc32c::crc32c(&b[..bs - 4]) != u32_at(b, bs - 4) {
        return Err("journal superblock checksum mismatch".into());
    }
    Ok(Super {
        nonce: u64_at(b, 8),
        log_blocks: u64_at(b, 16),
        checkpoint_seq: u64_at(b, 24),
        mode: match b[32] {
            0 => JournalMode::WriteThrough,
            1 => JournalMode::WriteBack,
            x => return Err(format!("journal superblock names unknown mode {x}")),
        },
    })
}

/// A journal block must hold a record header with every entry a record may
/// have (a 512-byte block holds 29, fewer than a wide RAID5 writes).
pub fn block_size_ok(dev: &dyn BlockDevice) -> Result<(), String> {
    let bs = dev.info().block_size as usize;
    if bs < MIN_BLOCK {
        return Err(format!(
            "{}: a journal needs 4096-byte blocks, this device has {bs}",
            dev.info().name
        ));
    }
    Ok(())
}

/// Synchronous IO on a fresh channel (control threads only: journal and
/// superblock IO, never the data path).
pub(crate) fn sync(
    dev: &dyn BlockDevice,
    op: IoOp,
    block: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    let bs = dev.info().block_size as usize;
    let mut ch = dev.open_channel().map_err(|e| e.to_string())?;
    let req = if op == IoOp::Flush {
        IoRequest::flush(1)
    } else {
        let mut sg = SgList::new();
        // SAFETY: `buf` outlives the request: we wait for its completion.
        sg.push(unsafe { IoVec::new(buf.as_mut_ptr(), buf.len()) });
        IoRequest {
            op,
            offset_blocks: block,
            num_blocks: (buf.len() / bs) as u64,
            sg,
            tag: 1,
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending = Some(req);
    let mut out = Vec::new();
    while let Some(r) = pending.take() {
        if let Err(SubmitError::Busy(r)) = ch.submit(r) {
            pending = Some(r);
            ch.poll(&mut out);
        }
    }
    while out.is_empty() {
        ch.poll(&mut out);
        if Instant::now() > deadline {
            return Err(format!("{}: {op:?} timed out", dev.info().name));
        }
        std::thread::yield_now();
    }
    out[0]
        .result
        .map_err(|e| format!("{}: {op:?}: {e}", dev.info().name))
}

/// A journal in service.
pub struct Journal {
    dev: Arc<dyn BlockDevice>,
    bs: usize,
    nonce: u64,
    log_blocks: u64,
    /// Logical log positions (blocks, monotonic): next free, oldest needed.
    head: AtomicU64,
    tail: AtomicU64,
    seq: AtomicU64,
    /// Serializes reservations (a short critical section on the control of
    /// head and seq together; taken once per journalled write).
    reserve_lock: Mutex<()>,
    /// Journal IO failed: the volume refuses writes rather than skip it.
    failed: AtomicBool,
    /// Checkpoint epoch, and records of the current and the previous epoch
    /// not yet on the members.
    epoch: AtomicU64,
    outstanding: [AtomicU64; 2],
    /// Write-back (else write-through); switchable online.
    write_back: AtomicBool,
    /// Blocks not on the members yet (write-back, or left over from it
    /// while a switch to write-through drains).
    cache: WriteCache,
    /// A checkpoint waits for the cache to give up an epoch, or a switch
    /// to write-through drains it: writes and flushes take reclaim along.
    reclaim_wanted: AtomicBool,
    draining: AtomicBool,
    /// What the superblock says (one writer at a time).
    checkpoint_seq: AtomicU64,
    super_lock: Mutex<()>,
}

/// What replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// Records written again to the members.
    pub records: u64,
    /// Blocks written.
    pub blocks: u64,
}

impl Journal {
    /// Write a fresh write-through journal on `dev` (everything on it is
    /// lost).
    pub fn format(dev: Arc<dyn BlockDevice>) -> Result<Arc<Journal>, String> {
        Self::format_with(dev, JournalMode::WriteThrough)
    }

    /// Write a fresh journal in `mode` on `dev`.
    pub fn format_with(
        dev: Arc<dyn BlockDevice>,
        mode: JournalMode,
    ) -> Result<Arc<Journal>, String> {
        let bs = dev.info().block_size as usize;
        block_size_ok(dev.as_ref())?;
        let log_blocks = dev.info().num_blocks.saturating_sub(1);
        if log_blocks < 64 {
            return Err(format!("{}: too small for a journal", dev.info().name));
        }
        let s = Super {
            nonce: u64::from_le_bytes(
                uuid::Uuid::new_v4().as_bytes()[..8]
                    .try_into()
                    .map_err(|_| "nonce".to_string())?,
            ),
            log_blocks,
            checkpoint_seq: 0,
            mode,
        };
        let mut b = encode_super(&s, bs);
        sync(dev.as_ref(), IoOp::Write, 0, &mut b)?;
        sync(dev.as_ref(), IoOp::Flush, 0, &mut [])?;
        Ok(Self::with(dev, &s))
    }

    fn with(dev: Arc<dyn BlockDevice>, s: &Super) -> Arc<Journal> {
        Arc::new(Journal {
            bs: dev.info().block_size as usize,
            dev,
            nonce: s.nonce,
            log_blocks: s.log_blocks,
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            seq: AtomicU64::new(s.checkpoint_seq),
            reserve_lock: Mutex::new(()),
            failed: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            outstanding: Default::default(),
            write_back: AtomicBool::new(s.mode == JournalMode::WriteBack),
            // Guest records leave room to reclaim the whole cache (up to
            // three log blocks a block: header, data, parity); a sixteenth
            // keeps that reserve under a fifth of the log.
            cache: WriteCache::new(s.log_blocks / 16),
            reclaim_wanted: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            checkpoint_seq: AtomicU64::new(s.checkpoint_seq),
            super_lock: Mutex::new(()),
        })
    }

    /// When writes are acknowledged.
    pub fn mode(&self) -> JournalMode {
        if self.write_back.load(Ordering::SeqCst) {
            JournalMode::WriteBack
        } else {
            JournalMode::WriteThrough
        }
    }

    /// The write cache (empty unless write-back is or was on).
    pub fn cache(&self) -> &WriteCache {
        &self.cache
    }

    /// Whether writes should take reclaim work along: a checkpoint waits
    /// for the cache, or a switch to write-through drains it. (A full
    /// cache alone does not reclaim: writes go write-through then, which
    /// costs no more than a reclaim would, and a hot set that fits keeps
    /// its overwrites in the cache.)
    pub fn reclaim_wanted(&self) -> bool {
        !self.cache.is_empty()
            && (self.reclaim_wanted.load(Ordering::Relaxed)
                || self.draining.load(Ordering::Relaxed))
    }

    /// Write the superblock as things are now.
    fn write_super(&self) -> Result<(), String> {
        self.write_super_mode(self.mode())
    }

    /// Write the superblock saying `mode`.
    pub(crate) fn write_super_mode(&self, mode: JournalMode) -> Result<(), String> {
        let _g = self.super_lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = Super {
            nonce: self.nonce,
            log_blocks: self.log_blocks,
            checkpoint_seq: self.checkpoint_seq.load(Ordering::SeqCst),
            mode,
        };
        let mut b = encode_super(&s, self.bs);
        sync(self.dev.as_ref(), IoOp::Write, 0, &mut b)?;
        sync(self.dev.as_ref(), IoOp::Flush, 0, &mut [])
    }

    /// Turn write-back on or off for new writes. Only with the volume
    /// suspended: a write admitted to the cache before is then inserted
    /// (or released) already, and none is admitted after. Off also starts
    /// draining what the cache holds (see [`drain`](Self::drain)).
    pub(crate) fn set_write_back(&self, on: bool) {
        self.write_back.store(on, Ordering::SeqCst);
        self.draining.store(!on, Ordering::SeqCst);
    }

    /// Switch modes online, through the volume's quiesce epoch (for a
    /// journal used without a monitor; a monitor does the same steps in its
    /// transaction). To write-back, the superblock says so first; to
    /// write-through, new writes stop using the cache at once and what it
    /// holds drains to the members within `timeout`, then the superblock
    /// says write-through (until then a restart comes back in write-back,
    /// which is safe).
    pub fn set_mode(
        &self,
        mode: JournalMode,
        volume: &crate::volume::Volume,
        timeout: Duration,
    ) -> Result<(), String> {
        if self.has_failed() {
            return Err("the journal device has failed".into());
        }
        let wb = mode == JournalMode::WriteBack;
        let guard = volume.suspend(timeout).map_err(|e| e.to_string())?;
        if wb {
            self.write_super_mode(mode)?;
        }
        self.set_write_back(wb);
        drop(guard);
        if wb {
            return Ok(());
        }
        self.drain(volume, timeout)
    }

    /// After write-back was turned off: drain the cache to the members
    /// (reclaim riding on flushes sent through the volume's gate, and on
    /// writes) within `timeout`; then the superblock says write-through.
    pub fn drain(&self, volume: &crate::volume::Volume, timeout: Duration) -> Result<(), String> {
        let t = Instant::now();
        let mut last_error = String::new();
        loop {
            if self.mode() == JournalMode::WriteBack {
                // Switched back meanwhile: nothing to drain.
                return Ok(());
            }
            if self.cache.is_empty() && self.cache.pending() == 0 {
                break;
            }
            if t.elapsed() > timeout {
                return Err(format!(
                    "{} blocks still to drain to the members after {timeout:?}{}; the volume stays write-back on disk and keeps draining as it writes",
                    self.cache.len(),
                    if last_error.is_empty() { String::new() } else { format!(" (last flush: {last_error})") }
                ));
            }
            // The flush only carries the reclaim: its own failure (a member
            // failing under it) does not stop the drain.
            if let Err(e) = volume.flush_on_reactor(timeout) {
                last_error = e.to_string();
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.draining.store(false, Ordering::SeqCst);
        if self.has_failed() {
            return Ok(());
        }
        self.write_super()
    }

    /// Block size of the log.
    pub fn block_size(&self) -> usize {
        self.bs
    }

    /// The journal device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Whether journal IO has failed.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Journal IO failed: writes go on without it, and what the cache
    /// holds drains to the members (reclaim, journal-less now, rides on
    /// writes and on the checkpointer's flushes).
    pub(crate) fn set_failed(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.write_back.store(false, Ordering::SeqCst);
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Fraction of the log in use.
    pub fn usage(&self) -> f64 {
        let used = self.head.load(Ordering::SeqCst) - self.tail.load(Ordering::SeqCst);
        used as f64 / self.log_blocks as f64
    }

    /// Build a record of `entries` whose blocks are `data` (in entry
    /// order); returns the buffer with the header's sequence left to
    /// [`reserve`](Self::reserve).
    pub fn record(&self, entries: &[Entry], data: &[&[u8]]) -> Vec<u8> {
        let mut r = Vec::new();
        self.record_into(&mut r, entries, data);
        r
    }

    /// [`record`](Self::record) into a reused buffer (large records would
    /// otherwise cost a fresh mapping and its page faults each time).
    pub fn record_into(&self, r: &mut Vec<u8>, entries: &[Entry], data: &[&[u8]]) {
        let bs = self.bs;
        let blocks: usize = data.iter().map(|d| d.len() / bs).sum();
        self.record_header(r, entries, blocks, false);
        let mut at = bs;
        for d in data {
            r[at..at + d.len()].copy_from_slice(d);
            at += d.len();
        }
    }

    /// Size `r` for a record of `blocks` data blocks and fill its header;
    /// the caller writes every block after it, in entry order. A `volume`
    /// record is write-back data without parity.
    pub fn record_header(&self, r: &mut Vec<u8>, entries: &[Entry], blocks: usize, volume: bool) {
        write_header(r, self.bs, self.nonce, entries, blocks, volume);
    }

    /// Give `record` its sequence number and checksum and a place in the
    /// log: the block to write it at and its epoch (hand that to
    /// [`done`](Self::done) once the record's blocks are on the members),
    /// or `None` while the log is full. A guest write's record (`guest`;
    /// reclaim's are not) leaves room for reclaiming the cache.
    pub fn reserve(&self, record: &mut [u8], guest: bool) -> Option<(u64, u64)> {
        let bs = self.bs;
        let blocks = (record.len() / bs) as u64;
        if blocks > self.log_blocks / 2 {
            return None;
        }
        let _g = self.reserve_lock.lock().unwrap_or_else(|e| e.into_inner());
        let pos = self.place(blocks, guest)?;
        self.head.store(pos + blocks, Ordering::SeqCst);
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let epoch = self.epoch.load(Ordering::SeqCst);
        self.outstanding[(epoch % 2) as usize].fetch_add(1, Ordering::SeqCst);
        seal(record, bs, seq);
        Some((1 + pos % self.log_blocks, epoch))
    }

    /// Log blocks a record may take up to: all of it for reclaim; for a
    /// guest write, what leaves room to reclaim every cached block (and
    /// every admitted one), up to three log blocks each. So reclaim always
    /// finds room, and a checkpoint waiting for it always makes progress.
    fn room(&self, guest: bool) -> u64 {
        if guest {
            self.log_blocks
                .saturating_sub(3 * (self.cache.len() + self.cache.pending()))
        } else {
            self.log_blocks
        }
    }

    /// Whether a record of `blocks` would find room now (see
    /// [`reserve`](Self::reserve)).
    pub fn has_room(&self, blocks: u64, guest: bool) -> bool {
        self.place(blocks, guest).is_some()
    }

    /// Where a record of `blocks` would go now (logical position), if it
    /// fits in the room its kind may use.
    fn place(&self, blocks: u64, guest: bool) -> Option<u64> {
        let mut pos = self.head.load(Ordering::SeqCst);
        // A record never wraps: skip to the start of the next lap.
        let off = pos % self.log_blocks;
        if off + blocks > self.log_blocks {
            pos += self.log_blocks - off;
        }
        (pos + blocks - self.tail.load(Ordering::SeqCst) <= self.room(guest)).then_some(pos)
    }

    /// A record of `epoch` has reached the members (or was abandoned).
    pub fn done(&self, epoch: u64) {
        self.outstanding[(epoch % 2) as usize].fetch_sub(1, Ordering::SeqCst);
    }

    /// Free the log up to now: close the epoch, wait for its records to
    /// reach the members (in write-back, also for its blocks to leave the
    /// cache), `flush_members`, record the checkpoint. One checkpoint at a
    /// time (the checkpointer thread). `Ok(false)`: the cache has not given
    /// up the epoch yet (reclaim rides on writes); call again later.
    pub fn checkpoint(
        &self,
        flush_members: impl FnOnce() -> Result<(), String>,
    ) -> Result<bool, String> {
        let c = &self.cache;
        let drained = |c: &WriteCache, epoch: u64| {
            let t = Instant::now();
            while c.in_epoch(epoch) > 0 {
                if t.elapsed() > Duration::from_secs(2) {
                    return false;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            true
        };
        // The cache counts epochs by parity: the epoch a previous call
        // closed must be gone before another is closed.
        let current = self.epoch.load(Ordering::SeqCst);
        if current > 0 && c.in_epoch(current - 1) > 0 {
            self.reclaim_wanted.store(true, Ordering::SeqCst);
            if !drained(c, current - 1) {
                return Ok(false);
            }
        }
        let (head, seq, old) = {
            let _g = self.reserve_lock.lock().unwrap_or_else(|e| e.into_inner());
            let old = self.epoch.fetch_add(1, Ordering::SeqCst);
            (
                self.head.load(Ordering::SeqCst),
                self.seq.load(Ordering::SeqCst),
                old,
            )
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.outstanding[(old % 2) as usize].load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                return Err("journal records did not reach the members within 30 s".into());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        self.reclaim_wanted.store(true, Ordering::SeqCst);
        if !drained(c, old) {
            return Ok(false);
        }
        self.reclaim_wanted.store(false, Ordering::SeqCst);
        flush_members()?;
        self.checkpoint_seq.fetch_max(seq, Ordering::SeqCst);
        self.write_super()?;
        self.tail.store(head, Ordering::SeqCst);
        Ok(true)
    }

    /// Open the journal on `dev` after a start: write every record since
    /// the last checkpoint to `members` (by slot; `None` for a missing
    /// member, whose blocks are skipped: it is rebuilt later), flush them,
    /// and checkpoint. Write-back records need the volume's geometry, to
    /// update parity. Returns the journal, ready for service.
    pub fn replay(
        dev: Arc<dyn BlockDevice>,
        members: &[Option<Arc<dyn BlockDevice>>],
        geo: Option<&Raid5Geometry>,
    ) -> Result<(Arc<Journal>, ReplayReport), String> {
        let bs = dev.info().block_size as usize;
        block_size_ok(dev.as_ref())?;
        let mut b = vec![0u8; bs];
        sync(dev.as_ref(), IoOp::Read, 0, &mut b)?;
        let s = decode_super(&b).map_err(|e| format!("{}: {e}", dev.info().name))?;
        if s.log_blocks + 1 > dev.info().num_blocks {
            return Err(format!(
                "{}: journal superblock claims a log larger than the device",
                dev.info().name
            ));
        }
        // Read the whole log, in pieces the device takes at once.
        let step = (dev.info().max_transfer as usize / bs).clamp(1, 1024);
        let mut log = vec![0u8; s.log_blocks as usize * bs];
        let mut at = 0;
        while at < s.log_blocks as usize {
            let n = step.min(s.log_blocks as usize - at);
            sync(
                dev.as_ref(),
                IoOp::Read,
                1 + at as u64,
                &mut log[at * bs..(at + n) * bs],
            )?;
            at += n;
        }
        // Find the valid records.
        let mut found: Vec<(u64, usize, usize)> = Vec::new();
        let mut i = 0usize;
        let total = s.log_blocks as usize;
        while i < total {
            let h = &log[i * bs..(i + 1) * bs];
            let ok = u64_at(h, 0) == REC_MAGIC && u64_at(h, 8) == s.nonce;
            let seq = u64_at(h, 16);
            let blocks = u32_at(h, 24) as usize;
            let entries = (u32_at(h, 28) & !VOLUME_RECORD) as usize;
            if ok
                && seq > s.checkpoint_seq
                && blocks >= 1
                && i + blocks <= total
                && entries <= MAX_ENTRIES
                && record_ok(&log[i * bs..(i + blocks) * bs], bs)
            {
                found.push((seq, i, blocks));
                i += blocks;
                continue;
            }
            i += 1;
        }
        found.sort_unstable();
        let mut report = ReplayReport::default();
        let mut max_seq = s.checkpoint_seq;
        // Pass 1: write-through records (data and parity, as they went to
        // the members), in order; remember the newest record of each block.
        // Pass 2: write-back data still newer than that, in order, with
        // parity brought along (members never saw it before a reclaim).
        let mut newest: std::collections::HashMap<(usize, u64), u64> = Default::default();
        // A degraded volume's write-back data needs read-modify-write,
        // which a second replay after a crash in this one would apply to
        // half-written rows. So its results are computed in memory first,
        // logged as write-through records (which a second replay applies
        // instead), and only then written to the members.
        let degraded = members.iter().any(|m| m.is_none());
        let mut overlay = Overlay {
            bs,
            blocks: Default::default(),
            direct: !degraded,
        };
        for pass in [false, true] {
            for &(seq, i, blocks) in &found {
                let h = &log[i * bs..(i + 1) * bs];
                let volume = u32_at(h, 28) & VOLUME_RECORD != 0;
                if volume != pass {
                    continue;
                }
                let entries = (u32_at(h, 28) & !VOLUME_RECORD) as usize;
                let mut data = (i + 1) * bs;
                let end = (i + blocks) * bs;
                for k in 0..entries {
                    let e = 32 + k * 16;
                    let (member, count, block) = (
                        u32_at(h, e) as usize,
                        u32_at(h, e + 4) as usize,
                        u64_at(h, e + 8),
                    );
                    let len = count * bs;
                    if data + len > end {
                        return Err(format!("journal record {seq} is inconsistent"));
                    }
                    let run = &log[data..data + len];
                    data += len;
                    if !volume {
                        for b in block..block + count as u64 {
                            newest.insert((member, b), seq);
                        }
                        if let Some(Some(m)) = members.get(member) {
                            sync(m.as_ref(), IoOp::Write, block, &mut run.to_vec())?;
                            report.blocks += count as u64;
                        }
                        continue;
                    }
                    let geo = geo.ok_or_else(|| {
                        format!("journal record {seq} holds write-back data, which needs a RAID5 volume's geometry")
                    })?;
                    // Sub-runs of blocks no later write-through record wrote.
                    let mut k0 = 0;
                    while k0 < count {
                        let fresh = |k: usize| {
                            newest
                                .get(&(member, block + k as u64))
                                .is_none_or(|&w| w < seq)
                        };
                        if !fresh(k0) {
                            k0 += 1;
                            continue;
                        }
                        let mut k1 = k0 + 1;
                        while k1 < count && fresh(k1) {
                            k1 += 1;
                        }
                        replay_volume_run(
                            geo,
                            members,
                            &mut overlay,
                            member,
                            block + k0 as u64,
                            &run[k0 * bs..k1 * bs],
                        )?;
                        report.blocks += (k1 - k0) as u64;
                        k0 = k1;
                    }
                }
                report.records += 1;
                max_seq = max_seq.max(seq);
            }
        }
        if !overlay.blocks.is_empty() {
            max_seq = log_overlay(&dev, &s, &found, &overlay, max_seq)?;
            for (&(m, b), data) in &overlay.blocks {
                if let Some(Some(d)) = members.get(m) {
                    sync(d.as_ref(), IoOp::Write, b, &mut data.clone())?;
                }
            }
        }
        for m in members.iter().flatten() {
            sync(m.as_ref(), IoOp::Flush, 0, &mut [])?;
        }
        let s = Super {
            checkpoint_seq: max_seq,
            ..s
        };
        let mut b = encode_super(&s, bs);
        sync(dev.as_ref(), IoOp::Write, 0, &mut b)?;
        sync(dev.as_ref(), IoOp::Flush, 0, &mut [])?;
        Ok((Self::with(dev, &s), report))
    }
}

/// Put write-back data `new` for `member` at member block `block` (one
/// chunk's run, so one stripe row range) and make the rows' parity match:
/// from all the data, or read-modify-write when another data member is
/// missing (which needs the rows consistent before: a crash during the
/// replay of a degraded write-back volume can leave such rows wrong).
fn replay_volume_run(
    geo: &Raid5Geometry,
    members: &[Option<Arc<dyn BlockDevice>>],
    io: &mut Overlay,
    member: usize,
    block: u64,
    new: &[u8],
) -> Result<(), String> {
    if block < geo.data_offset() || member >= geo.members() as usize {
        return Err(format!(
            "write-back record names member {member} block {block}, outside the volume"
        ));
    }
    let stripe = (block - geo.data_offset()) / geo.chunk_blocks();
    let parity = geo.parity_member(stripe) as usize;
    if parity == member {
        return Err(format!(
            "write-back record puts data on the parity member of stripe {stripe}"
        ));
    }
    let dev = |m: usize| members.get(m).and_then(|d| d.as_ref());
    let len = new.len();
    let read = |io: &Overlay, m: usize| io.read(members, m, block, len);
    if dev(parity).is_none() {
        // No parity to keep: the data alone.
        if dev(member).is_some() {
            io.write(members, member, block, new)?;
        }
        return Ok(());
    };
    let others: Vec<usize> = (0..geo.members() as usize)
        .filter(|&m| m != member && m != parity)
        .collect();
    let par = match dev(member) {
        // Another data member is missing: only a read-modify-write can
        // keep its blocks recoverable (in memory first, see `Overlay`).
        Some(_) if others.iter().any(|&o| dev(o).is_none()) => {
            let mut par = read(io, parity)?;
            xor_into(&mut par, &[&read(io, member)?, new]);
            par
        }
        // Otherwise parity from all the data (reconstruct-write): right
        // whatever the row held, so replaying twice is harmless.
        _ => {
            let mut par = new.to_vec();
            for &o in &others {
                if dev(o).is_none() {
                    return Err(format!(
                        "stripe {stripe} misses two members; its write-back data cannot be placed"
                    ));
                }
                xor_into(&mut par, &[&read(io, o)?]);
            }
            par
        }
    };
    if dev(member).is_some() {
        io.write(members, member, block, new)?;
    }
    io.write(members, parity, block, &par)
}

/// Where replay's read-modify-writes go: straight to the members, or
/// (`direct` false) into memory, block by block, with reads seeing what
/// was put there.
struct Overlay {
    bs: usize,
    blocks: std::collections::BTreeMap<(usize, u64), Vec<u8>>,
    direct: bool,
}

impl Overlay {
    fn read(
        &self,
        members: &[Option<Arc<dyn BlockDevice>>],
        m: usize,
        block: u64,
        len: usize,
    ) -> Result<Vec<u8>, String> {
        let dev = members
            .get(m)
            .and_then(|d| d.as_ref())
            .ok_or_else(|| format!("replay read of missing member {m}"))?;
        let mut b = vec![0u8; len];
        sync(dev.as_ref(), IoOp::Read, block, &mut b)?;
        for (i, chunk) in b.chunks_exact_mut(self.bs).enumerate() {
            if let Some(o) = self.blocks.get(&(m, block + i as u64)) {
                chunk.copy_from_slice(o);
            }
        }
        Ok(b)
    }

    fn write(
        &mut self,
        members: &[Option<Arc<dyn BlockDevice>>],
        m: usize,
        block: u64,
        data: &[u8],
    ) -> Result<(), String> {
        if self.direct {
            let dev = members
                .get(m)
                .and_then(|d| d.as_ref())
                .ok_or_else(|| format!("replay write to missing member {m}"))?;
            return sync(dev.as_ref(), IoOp::Write, block, &mut data.to_vec());
        }
        for (i, chunk) in data.chunks_exact(self.bs).enumerate() {
            self.blocks.insert((m, block + i as u64), chunk.to_vec());
        }
        Ok(())
    }
}

/// Write `overlay`'s blocks into the log as write-through records with
/// sequence numbers after `max_seq`, in the free space after the newest
/// live record (`found`: sequence, position, blocks), and flush: a crash
/// after this replays them instead of the read-modify-writes. Returns the
/// last sequence used.
fn log_overlay(
    dev: &Arc<dyn BlockDevice>,
    s: &Super,
    found: &[(u64, usize, usize)],
    overlay: &Overlay,
    max_seq: u64,
) -> Result<u64, String> {
    let bs = overlay.bs;
    let total = s.log_blocks as usize;
    // Runs of consecutive blocks per member, then records of at most
    // MAX_ENTRIES runs and 256 blocks.
    let mut runs: Vec<(usize, u64, Vec<&[u8]>)> = Vec::new();
    for (&(m, b), data) in &overlay.blocks {
        match runs.last_mut() {
            Some((rm, rb, v)) if *rm == m && *rb + v.len() as u64 == b && v.len() < 256 => {
                v.push(data)
            }
            _ => runs.push((m, b, vec![data])),
        }
    }
    let mut records: Vec<Vec<u8>> = Vec::new();
    let mut batch: Vec<&(usize, u64, Vec<&[u8]>)> = Vec::new();
    let flush_batch = |batch: &mut Vec<&(usize, u64, Vec<&[u8]>)>, records: &mut Vec<Vec<u8>>| {
        if batch.is_empty() {
            return;
        }
        let blocks: usize = batch.iter().map(|r| r.2.len()).sum();
        let entries: Vec<Entry> = batch
            .iter()
            .map(|(m, b, data)| Entry {
                member: *m as u32,
                count: data.len() as u32,
                block: *b,
            })
            .collect();
        let mut r = Vec::new();
        write_header(&mut r, bs, s.nonce, &entries, blocks, false);
        for (k, d) in batch.iter().flat_map(|run| run.2.iter()).enumerate() {
            r[(1 + k) * bs..(2 + k) * bs].copy_from_slice(d);
        }
        records.push(r);
        batch.clear();
    };
    let mut in_batch = 0;
    for run in &runs {
        if batch.len() == MAX_ENTRIES || in_batch + run.2.len() > 256 {
            flush_batch(&mut batch, &mut records);
            in_batch = 0;
        }
        in_batch += run.2.len();
        batch.push(run);
    }
    flush_batch(&mut batch, &mut records);
    // The free space runs from the end of the newest live record to the
    // start of the oldest, around the ring; a record never wraps.
    let newest = found.iter().max_by_key(|r| r.0);
    let oldest = found.iter().min_by_key(|r| r.0);
    let (mut pos, limit) = match (newest, oldest) {
        (Some(n), Some(o)) => {
            let head = n.1 + n.2;
            let tail = if o.1 >= head { o.1 } else { o.1 + total };
            (head, tail)
        }
        _ => (0, total),
    };
    let mut seq = max_seq;
    for r in &mut records {
        let blocks = r.len() / bs;
        if pos % total + blocks > total {
            pos += total - pos % total;
        }
        if pos + blocks > limit {
            return Err(format!(
                "the journal has no free room to log the replay of a degraded volume ({} blocks needed)",
                blocks
            ));
        }
        seq += 1;
        seal(r, bs, seq);
        sync(dev.as_ref(), IoOp::Write, 1 + (pos % total) as u64, r)?;
        pos += blocks;
    }
    sync(dev.as_ref(), IoOp::Flush, 0, &mut [])?;
    Ok(seq)
}

/// Checkpoints a volume's journal when its log is half full. Stops when
/// dropped.
pub struct Checkpointer {
    journal: Arc<Journal>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Watch `journal` of `volume`.
    pub fn start(journal: Arc<Journal>, volume: crate::volume::Volume) -> Checkpointer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let kept = journal.clone();
        let thread = std::thread::Builder::new()
            .name(format!("journal-{}", volume.name()))
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    if journal.has_failed() {
                        // Nothing to checkpoint on a dead device: drain the
                        // cache to the members, then idle.
                        if !journal.cache().is_empty() {
                            if let Err(e) = volume.flush_on_reactor(Duration::from_secs(30)) {
                                if matches!(e, crate::volume::VolumeError::Removed(_)) {
                                    break;
                                }
                                tracing::warn!(volume = volume.name(), error = %e, "draining the cache of a failed journal");
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        } else {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        continue;
                    }
                    let usage = journal.usage();
                    if usage > 0.5 {
                        match checkpoint_now(&journal, &volume) {
                            Ok(true) => {}
                            // Reclaim rides on writes: an idle volume keeps
                            // its cache (durable in the log) until then.
                            // An idle volume: a flush through its gate
                            // carries the reclaim.
                            Ok(false) => {
                                if let Err(e) = volume.flush_on_reactor(Duration::from_secs(30)) {
                                    if matches!(e, crate::volume::VolumeError::Removed(_)) {
                                        break;
                                    }
                                    tracing::warn!(volume = volume.name(), error = %e, "journal reclaim flush");
                                    std::thread::sleep(Duration::from_millis(100));
                                }
                            }
                            Err(e) => {
                                tracing::error!(volume = volume.name(), error = %e, "journal checkpoint");
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    } else {
                        // Look often only while the log is filling, so an
                        // idle volume costs next to nothing.
                        let nap = if usage > 0.1 { 1 } else { 20 };
                        std::thread::sleep(Duration::from_millis(nap));
                    }
                }
            })
            .ok();
        Checkpointer {
            journal: kept,
            stop,
            thread,
        }
    }

    /// The journal it looks after.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }
}

/// One checkpoint of `journal`; the members are flushed by a flush of
/// the volume through its quiesce gate (a RAID5 flush goes to every
/// member), so a checkpoint is background work of the volume's current
/// generation like any other, held back by a suspend.
pub fn checkpoint_now(journal: &Journal, volume: &crate::volume::Volume) -> Result<bool, String> {
    journal.checkpoint(|| {
        volume
            .flush_on_reactor(Duration::from_secs(30))
            .map_err(|e| e.to_string())
    })
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdev::RamDevice;

    #[test]
    fn the_checksum_covers_header_fields_entries_and_blocks_and_old_records_still_pass() {
        let bs = 4096;
        let e = Entry {
            member: 1,
            count: 1,
            block: 5,
        };
        let mut r = vec![0x5a; 3 * bs];
        write_header(&mut r, bs, 7, &[e], 1, false);
        assert_eq!(r.len(), 2 * bs);
        r[bs..].fill(0xab);
        seal(&mut r, bs, 3);
        assert!(record_ok(&r, bs));
        // The header block's unused rest is not covered...
        r[bs / 2] ^= 1;
        assert!(record_ok(&r, bs));
        // ...the sequence, an entry and the data are.
        for at in [16, 40, bs + 100, 2 * bs - 1] {
            let mut t = r.clone();
            t[at] ^= 1;
            assert!(!record_ok(&t, bs), "a flipped bit at {at} passed");
        }
        // A record sealed the old way: CRC32C over the whole record with
        // the checksum's 4 bytes zeroed.
        r[bs - 4..bs].fill(0);
        let old = crc32c::crc32c(&r);
        r[bs - 4..bs].copy_from_slice(&old.to_le_bytes());
        assert!(record_ok(&r, bs));
        r[bs / 2] ^= 1;
        assert!(
            !record_ok(&r, bs),
            "the old checksum covers the whole header"
        );
    }

    #[test]
    fn small_blocks_are_refused_and_the_first_superblock_version_still_opens() {
        let small: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("s", 512, 1024).unwrap());
        let err = Journal::format(small.clone()).err().unwrap();
        assert!(err.contains("4096-byte blocks"), "{err}");
        let err = Journal::replay(small, &[], None).err().unwrap();
        assert!(err.contains("4096-byte blocks"), "{err}");
        // A journal whose superblock is the first version opens, and its
        // replay rewrites the superblock as the current one.
        let jdev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("j", 4096, 129).unwrap());
        Journal::format(jdev.clone()).unwrap();
        let mut b = vec![0u8; 4096];
        sync(jdev.as_ref(), IoOp::Read, 0, &mut b).unwrap();
        b[0..8].copy_from_slice(&SB_MAGIC_V1.to_le_bytes());
        let crc = crc32c::crc32c(&b[..4092]);
        b[4092..].copy_from_slice(&crc.to_le_bytes());
        sync(jdev.as_ref(), IoOp::Write, 0, &mut b).unwrap();
        Journal::replay(jdev.clone(), &[], None).unwrap();
        sync(jdev.as_ref(), IoOp::Read, 0, &mut b).unwrap();
        assert_eq!(u64_at(&b, 0), SB_MAGIC);
    }

    #[test]
    fn records_replay_in_order_and_torn_or_foreign_ones_are_skipped() {
        let jdev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("j", 4096, 129).unwrap());
        let m: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("m", 4096, 16).unwrap());
        let j = Journal::format(jdev.clone()).unwrap();
        let write = |rec: &[u8], at: u64| {
            let mut r = rec.to_vec();
            sync(jdev.as_ref(), IoOp::Write, at, &mut r).unwrap();
        };
        let e = |block| Entry {
            member: 0,
            count: 1,
            block,
        };
        // Two records for block 3 (the later wins), one for block 5.
        for (block, byte) in [(3u64, 1u8), (5, 2), (3, 3)] {
            let mut r = j.record(&[e(block)], &[&vec![byte; 4096]]);
            let (at, ep) = j.reserve(&mut r, false).unwrap();
            write(&r, at);
            j.done(ep);
        }
        // A torn record (bad CRC) for block 7.
        let mut r = j.record(&[e(7)], &[&vec![9u8; 4096]]);
        let (at, ep) = j.reserve(&mut r, false).unwrap();
        r[5000] ^= 1;
        write(&r, at);
        j.done(ep);
        let (j2, rep) = Journal::replay(jdev.clone(), &[Some(m.clone())], None).unwrap();
        assert_eq!(
            rep,
            ReplayReport {
                records: 3,
                blocks: 3
            }
        );
        let mut b = vec![0u8; 4096 * 16];
        sync(m.as_ref(), IoOp::Read, 0, &mut b).unwrap();
        assert!(b[3 * 4096..4 * 4096].iter().all(|&x| x == 3));
        assert!(b[5 * 4096..6 * 4096].iter().all(|&x| x == 2));
        assert!(b[7 * 4096..8 * 4096].iter().all(|&x| x == 0));
        // Replayed records are below the checkpoint: a second replay does
        // nothing, and new records continue the sequence.
        let (_, rep) = Journal::replay(jdev.clone(), &[Some(m.clone())], None).unwrap();
        assert_eq!(rep.records, 0);
        let mut r = j2.record(&[e(1)], &[&vec![4u8; 4096]]);
        assert!(j2.reserve(&mut r, false).is_some());
        assert_eq!(u64_at(&r, 16), 4, "after the last replayed record");
        // Not a journal.
        let blank: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("b", 4096, 129).unwrap());
        assert!(Journal::replay(blank, &[], None).is_err());
    }

    #[test]
    fn a_full_log_waits_for_a_checkpoint() {
        let jdev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("j", 4096, 65).unwrap());
        let j = Journal::format(jdev).unwrap();
        let e = Entry {
            member: 0,
            count: 7,
            block: 0,
        };
        let data = vec![1u8; 7 * 4096];
        let mut n = 0;
        let mut held = Vec::new();
        loop {
            let mut r = j.record(&[e], &[&data]);
            let Some((_, ep)) = j.reserve(&mut r, false) else {
                break;
            };
            held.push(ep);
            n += 1;
        }
        assert_eq!(n, 8, "8 records of 8 blocks fill a 64-block log");
        // The checkpoint waits for the records to reach the members.
        let flushed = AtomicBool::new(false);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                j.checkpoint(|| {
                    flushed.store(true, Ordering::SeqCst);
                    Ok(())
                })
            });
            std::thread::sleep(Duration::from_millis(20));
            assert!(
                !flushed.load(Ordering::SeqCst),
                "flushed before the records were done"
            );
            for ep in held.drain(..) {
                j.done(ep);
            }
            assert!(t.join().unwrap().unwrap());
        });
        assert!(flushed.load(Ordering::SeqCst));
        let mut r = j.record(&[e], &[&data]);
        assert!(j.reserve(&mut r, false).is_some());
    }
}
