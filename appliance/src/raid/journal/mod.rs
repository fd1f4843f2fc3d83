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

mod checkpoint;
mod codec;
mod mode;
mod replay;
mod superblock;

use crate::raid::RaidError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bdev::BlockDevice;

use super::cache::WriteCache;
pub use checkpoint::{checkpoint_now, Checkpointer};
pub use codec::{block_size_ok, Entry, MAX_ENTRIES};
use codec::{fill_header, seal, seal_parts, write_header, Super};
pub(crate) use codec::{u32_at, u64_at};
pub use mode::JournalMode;
use mode::StoredMode;
pub use replay::ReplayReport;

/// Whether a journal on a device of `num_blocks` can log every record of a
/// RAID5 of `members` with chunks of `chunk_blocks`: the largest, a whole
/// stripe's data and parity with its header, must fit half the log (the
/// most a checkpoint can free for it). Else such a write gives the journal
/// up at once.
pub fn holds_records(num_blocks: u64, members: u64, chunk_blocks: u64) -> Result<(), String> {
    let need = members.saturating_mul(chunk_blocks).saturating_add(1);
    let room = superblock::log_blocks_for(num_blocks) / 2;
    if need > room {
        return Err(format!(
            "its log takes records of up to {room} blocks; a whole stripe of this volume makes one of {need} (a journal of at least {} blocks is needed)",
            need.saturating_mul(2).saturating_add(2)
        ));
    }
    Ok(())
}

/// `Journal::given_up` stages.
const GIVEN_UP: u8 = 1;
const RECORDED: u8 = 2;

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
    /// Journal IO failed: writes go on without it.
    failed: AtomicBool,
    /// Failed, drained and left behind: the volume's recorded state names
    /// it no more (`GIVEN_UP`), and once that is on disk (`RECORDED`)
    /// writes made without it may be acknowledged.
    given_up: std::sync::atomic::AtomicU8,
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
    /// A record was refused room: a checkpoint is wanted whatever the
    /// log's usage (a record can be refused well below half full: the
    /// cache's reserve, a record that skips to the next lap).
    room_wanted: AtomicBool,
    draining: AtomicBool,
    /// What the superblock says (one writer at a time).
    checkpoint_seq: AtomicU64,
    super_lock: Mutex<StoredMode>,
    /// One checkpoint at a time, whoever calls it (a volume's monitor and
    /// anyone else): two that overlap would move the tail back when the
    /// one that closed the older epoch finishes last, and share the
    /// per-epoch counts of records not yet on the members.
    checkpoint_lock: Mutex<()>,
    /// Records and log blocks written, checkpoints recorded (metrics).
    counts: [AtomicU64; 3],
}

/// What a journal has done since it was opened, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalCounts {
    /// Records placed in the log.
    pub records: u64,
    /// Log blocks they take (headers and data).
    pub blocks: u64,
    /// Checkpoints recorded (the log freed up to them).
    pub checkpoints: u64,
}

/// For the fuzz targets: seal every record-looking block of a raw log
/// (its sequence as found) with the checksum its header claims, so that a
/// fuzzer gets past the checksums to the lengths and entries behind them.
#[doc(hidden)]
pub fn fuzz_seal_log(log: &mut [u8], bs: usize) {
    let blocks = log.len() / bs;
    for i in 0..blocks {
        let h = &log[i * bs..(i + 1) * bs];
        if codec::u64_at(h, 0) != codec::REC_MAGIC {
            continue;
        }
        let n = (codec::u32_at(h, 24) as usize).clamp(1, blocks - i);
        let seq = codec::u64_at(h, 16);
        seal(&mut log[i * bs..(i + n) * bs], bs, seq);
    }
}

/// For the fuzz targets: the whole device into `image`.
#[doc(hidden)]
pub fn fuzz_read(dev: &dyn BlockDevice, image: &mut [u8]) {
    let _ = crate::raid::metaio::sync(dev, bdev::IoOp::Read, 0, image);
}

/// For the fuzz targets: `image` onto the whole device.
#[doc(hidden)]
pub fn fuzz_write(dev: &dyn BlockDevice, image: &[u8]) {
    let _ = crate::raid::metaio::sync(dev, bdev::IoOp::Write, 0, &mut image.to_vec());
}

/// The most the write-back cache holds in memory, whatever the journal's
/// size (a sixteenth of a large NVMe journal would be gigabytes).
const CACHE_MAX_BYTES: u64 = 256 << 20;

/// Blocks the write-back cache of the journal `s` (of `bs`-byte blocks)
/// holds at most.
fn cache_limit(s: &Super, bs: u32) -> u64 {
    (s.log_blocks / 16).min(CACHE_MAX_BYTES / u64::from(bs.max(1)))
}

/// Whether `dev` holds a journal (of a volume running or stopped: its log
/// may hold writes not yet on that volume's members).
pub fn holds_journal(dev: &dyn BlockDevice) -> bool {
    superblock::load(dev).is_ok()
}

/// The identity of the journal on `dev` (its nonce, random per format),
/// as the state file keeps it (16 hex digits).
pub fn journal_id(dev: &dyn BlockDevice) -> Result<String, RaidError> {
    Ok(id_of(superblock::load(dev)?.nonce))
}

/// The mode the journal on `dev` says on disk: the one a restart takes.
pub fn stored_mode(dev: &dyn BlockDevice) -> Result<JournalMode, RaidError> {
    Ok(superblock::load(dev)?.mode)
}

/// A journal's identity as the state file keeps it.
fn id_of(nonce: u64) -> String {
    format!("{nonce:016x}")
}

/// Erase the journal on `dev` (one taken out of its volume, drained).
pub fn erase(dev: &dyn BlockDevice) -> Result<(), RaidError> {
    superblock::erase(dev)
}

impl Journal {
    /// Write a fresh write-through journal on `dev` (everything on it is
    /// lost).
    pub fn format(dev: Arc<dyn BlockDevice>) -> Result<Arc<Journal>, RaidError> {
        Self::format_with(dev, JournalMode::WriteThrough)
    }

    /// Write a fresh journal in `mode` on `dev`.
    pub fn format_with(
        dev: Arc<dyn BlockDevice>,
        mode: JournalMode,
    ) -> Result<Arc<Journal>, RaidError> {
        block_size_ok(dev.as_ref())?;
        let log_blocks = superblock::log_blocks_for(dev.info().num_blocks);
        if log_blocks < 64 {
            return Err(RaidError::Invalid(format!(
                "{}: too small for a journal",
                dev.info().name
            )));
        }
        let s = Super {
            nonce: u64::from_le_bytes(
                uuid::Uuid::new_v4().as_bytes()[..8]
                    .try_into()
                    .map_err(|_| RaidError::Invalid("nonce".into()))?,
            ),
            log_blocks,
            checkpoint_seq: 0,
            mode,
        };
        superblock::store_new(dev.as_ref(), &s)?;
        Ok(Self::with(dev, &s))
    }

    fn with(dev: Arc<dyn BlockDevice>, s: &Super) -> Arc<Journal> {
        let cache_blocks = cache_limit(s, dev.info().block_size);
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
            given_up: Default::default(),
            epoch: AtomicU64::new(0),
            outstanding: Default::default(),
            write_back: AtomicBool::new(s.mode == JournalMode::WriteBack),
            // Guest records leave room to reclaim the whole cache (up to
            // three log blocks a block: header, data, parity); a sixteenth
            // keeps that reserve under a fifth of the log.
            cache: WriteCache::new(cache_blocks),
            reclaim_wanted: AtomicBool::new(false),
            room_wanted: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            checkpoint_seq: AtomicU64::new(s.checkpoint_seq),
            super_lock: Mutex::new(StoredMode {
                mode: s.mode,
                switches: 0,
                drain_from: None,
            }),
            checkpoint_lock: Mutex::new(()),
            counts: Default::default(),
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
                || self.draining.load(Ordering::Relaxed)
                || self.failed.load(Ordering::Relaxed))
    }

    /// What it has done since it was opened.
    pub fn counts(&self) -> JournalCounts {
        let c = |i: usize| self.counts[i].load(Ordering::Relaxed);
        JournalCounts {
            records: c(0),
            blocks: c(1),
            checkpoints: c(2),
        }
    }

    /// Its block size.
    pub fn block_size(&self) -> usize {
        self.bs
    }

    /// The journal device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Whether its sequence numbers are all but spent: no record may be
    /// given one (see [`codec::SEQ_SLACK`]).
    pub fn numbers_spent(&self) -> bool {
        self.seq.load(Ordering::SeqCst) >= codec::SEQ_LIMIT - codec::SEQ_SLACK
    }

    /// Whether journal IO has failed.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Journal IO failed: writes go on without it, and what the cache
    /// holds drains to the members (reclaim, journal-less now, rides on
    /// writes and on the checkpointer's flushes). True the first time.
    pub(crate) fn set_failed(&self) -> bool {
        // The flag first: a switch to write-back that did not see it
        // looks again after its own stores (`set_write_back`), and one
        // that did not yet store is overridden by these.
        let first = !self.failed.swap(true, Ordering::SeqCst);
        self.write_back.store(false, Ordering::SeqCst);
        self.draining.store(true, Ordering::SeqCst);
        first
    }

    /// Whether the journal failed and was given up: what the volume
    /// records of itself (its state file) no longer names it, so no
    /// restart replays its records over writes made without it.
    pub fn given_up(&self) -> bool {
        self.given_up.load(Ordering::SeqCst) >= GIVEN_UP
    }

    /// Whether [`given_up`](Self::given_up) is on disk.
    pub fn given_up_recorded(&self) -> bool {
        self.given_up.load(Ordering::SeqCst) >= RECORDED
    }

    /// Mark a failed, drained journal given up (`recorded`: and that is
    /// on disk now).
    pub(crate) fn give_up(&self, recorded: bool) {
        let to = if recorded { RECORDED } else { GIVEN_UP };
        self.given_up.fetch_max(to, Ordering::SeqCst);
    }

    /// Whether a record was refused room since the last call (the
    /// checkpointer's cue besides usage).
    pub fn take_room_wanted(&self) -> bool {
        self.room_wanted.swap(false, Ordering::SeqCst)
    }

    /// Fraction of the log in use.
    pub fn usage(&self) -> f64 {
        // The tail first: it only ever moves up to a head already taken,
        // so a head read after it is never below it.
        let tail = self.tail.load(Ordering::SeqCst);
        let used = self.head.load(Ordering::SeqCst) - tail;
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

    /// Size `h` to one block and fill it as the header of a record of
    /// `blocks` data blocks held apart (a write-back record: its data
    /// buffer goes on to the cache once durable, without a copy).
    pub fn split_header(&self, h: &mut Vec<u8>, entries: &[Entry], blocks: usize, volume: bool) {
        h.resize(self.bs, 0);
        fill_header(h, self.nonce, entries, blocks, volume);
    }

    /// Whether a record of `blocks` can ever have room: one over half the
    /// log never does (a checkpoint frees at most the rest).
    pub fn record_fits(&self, blocks: u64) -> bool {
        blocks <= self.log_blocks / 2
    }

    /// Its identity (see [`journal_id`]).
    pub fn id(&self) -> String {
        id_of(self.nonce)
    }

    /// Blocks of its log.
    pub fn log_blocks(&self) -> u64 {
        self.log_blocks
    }

    /// Give `record` its sequence number and checksum and a place in the
    /// log: the block to write it at and its epoch (hand that to
    /// [`done`](Self::done) once the record's blocks are on the members),
    /// or `None` while the log is full. A guest write's record (`guest`;
    /// reclaim's are not) leaves room for reclaiming the cache.
    pub fn reserve(&self, record: &mut [u8], guest: bool) -> Option<(u64, u64)> {
        let (header, data) = record.split_at_mut(self.bs);
        self.reserve_parts(header, data, guest)
    }

    /// [`reserve`](Self::reserve) for a record whose header block and data
    /// blocks are in buffers of their own (see
    /// [`split_header`](Self::split_header)).
    pub fn reserve_parts(&self, header: &mut [u8], data: &[u8], guest: bool) -> Option<(u64, u64)> {
        let bs = self.bs;
        let blocks = (1 + data.len() / bs) as u64;
        if !self.record_fits(blocks) {
            return None;
        }
        let _g = self.reserve_lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pos) = self.place(blocks, guest) else {
            self.room_wanted.store(true, Ordering::SeqCst);
            return None;
        };
        self.head.store(pos + blocks, Ordering::SeqCst);
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let epoch = self.epoch.load(Ordering::SeqCst);
        self.outstanding[(epoch % 2) as usize].fetch_add(1, Ordering::SeqCst);
        seal_parts(header, data, seq);
        self.counts[0].fetch_add(1, Ordering::Relaxed);
        self.counts[1].fetch_add(blocks, Ordering::Relaxed);
        Some((1 + pos % self.log_blocks, epoch))
    }

    /// Log blocks a record may take up to: all of it for reclaim; for a
    /// guest write, what leaves room to reclaim every cached block (and
    /// every admitted one), up to three log blocks each, and the blocks a
    /// reclaim record skips at the end of a lap (see `place`). So reclaim
    /// always finds room, and a checkpoint waiting for it always makes
    /// progress. (Without the skip, the last reclaim could be refused; it
    /// waited holding its stripe, and the checkpoint that would have made
    /// room waited for it: an audit's 64-block log stopped every write.)
    fn room(&self, guest: bool) -> u64 {
        if guest {
            let cached = self.cache.len() + self.cache.pending();
            // A reclaim record holds a run of blocks inside one chunk
            // (header, data, parity: at most three log blocks a block), so
            // a skip wastes at most two blocks per block of the largest
            // run: of every cached block, or of a whole chunk of at most
            // 1 MiB in 512-byte blocks. The reserve is well under a lap,
            // so at most one skip falls in it.
            const LARGEST_RUN: u64 = (1 << 20) / 512;
            self.log_blocks
                .saturating_sub(3 * cached + 2 * cached.min(LARGEST_RUN))
        } else {
            self.log_blocks
        }
    }

    /// Whether a record of `blocks` would find room now (see
    /// [`reserve`](Self::reserve)).
    pub fn has_room(&self, blocks: u64, guest: bool) -> bool {
        let room = self.place(blocks, guest).is_some();
        if !room {
            // Still waiting: one checkpoint did not free enough (another
            // is wanted, whatever the usage).
            self.room_wanted.store(true, Ordering::SeqCst);
        }
        room
    }

    /// Where a record of `blocks` would go now (logical position), if it
    /// fits in the room its kind may use.
    fn place(&self, blocks: u64, guest: bool) -> Option<u64> {
        // The tail first (see `usage`): read after the head, a checkpoint
        // in between could move it past the head read, and this went
        // below zero (a debug build panicked).
        let tail = self.tail.load(Ordering::SeqCst);
        let mut pos = self.head.load(Ordering::SeqCst);
        // A record never wraps: skip to the start of the next lap.
        let off = pos % self.log_blocks;
        if off + blocks > self.log_blocks {
            pos += self.log_blocks - off;
        }
        (pos + blocks - tail <= self.room(guest)).then_some(pos)
    }

    /// A record of `epoch` has reached the members (or was abandoned).
    pub fn done(&self, epoch: u64) {
        self.outstanding[(epoch % 2) as usize].fetch_sub(1, Ordering::SeqCst);
    }

    /// Free the log up to now: close the epoch, wait for its records to
    /// reach the members (in write-back, also for its blocks to leave the
    /// cache), `flush_members`, record the checkpoint. Calls that overlap
    /// run one after the other. `Ok(false)`: the cache has not given up the
    /// epoch yet (reclaim rides on writes); call again later.
    pub fn checkpoint(
        &self,
        flush_members: impl FnOnce() -> Result<(), RaidError>,
    ) -> Result<bool, RaidError> {
        let _one = self
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
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
        // Records of the epoch an earlier call closed and then gave up on
        // (its 30 s below) still on their way: closing another epoch now
        // would count new records in their slot, and wait for neither.
        if current > 0 && self.outstanding[((current - 1) % 2) as usize].load(Ordering::SeqCst) > 0
        {
            return Ok(false);
        }
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
                return Err(RaidError::Invalid(
                    "journal records did not reach the members within 30 s".into(),
                ));
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
        if let Err(e) = self.write_super() {
            // The device cannot take its superblock: a failed journal (the
            // volume goes on without it, draining the cache), not a log
            // that never frees again and writes that wait for good.
            if self.set_failed() {
                tracing::error!(journal = %self.dev.info().name, error = %e, "the journal's superblock cannot be written: the journal is failed");
            }
            return Err(e);
        }
        self.tail.fetch_max(head, Ordering::SeqCst);
        self.counts[2].fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::codec::*;
    use super::*;

    #[test]
    fn a_journal_must_hold_a_whole_stripes_record_in_half_its_log() {
        // 4 members of 64 KiB chunks (16 blocks): 65 blocks a record, so a
        // log of 130 (a device of 132).
        assert!(holds_records(132, 4, 16).is_ok());
        let e = holds_records(131, 4, 16).unwrap_err();
        assert!(e.contains("at least 132 blocks"), "{e}");
        // The smallest journal the daemon takes (1025 blocks) and five
        // members of 512 KiB chunks: too small.
        assert!(holds_records(1025, 5, 128).is_err());
        assert!(holds_records(u64::MAX, u64::MAX, u64::MAX).is_err());
    }
    use crate::raid::metaio::sync;
    use bdev::{IoOp, RamDevice};

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
    fn a_record_with_its_data_apart_is_the_same_on_disk() {
        let bs = 4096;
        let entries = [
            Entry {
                member: 2,
                count: 1,
                block: 9,
            },
            Entry {
                member: 0,
                count: 2,
                block: 4,
            },
        ];
        let data: Vec<u8> = (0..3 * bs).map(|i| (i * 7 % 251) as u8).collect();
        let mut whole = Vec::new();
        write_header(&mut whole, bs, 11, &entries, 3, true);
        whole[bs..].copy_from_slice(&data);
        seal(&mut whole, bs, 42);
        // The write-back path: the header block in one buffer (holding
        // another record's leftovers), the data in another.
        let mut header = vec![0xee; bs];
        fill_header(&mut header, 11, &entries, 3, true);
        seal_parts(&mut header, &data, 42);
        let joined = [header, data].concat();
        // Only the header block's unused rest may differ.
        let used = header_len(entries.len(), bs);
        assert_eq!(joined[..used], whole[..used]);
        assert_eq!(joined[bs - 4..], whole[bs - 4..]);
        assert!(record_ok(&joined, bs));
    }

    #[test]
    fn small_blocks_are_refused_and_the_first_superblock_version_still_opens() {
        let small: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("s", 512, 1024).unwrap());
        let err = Journal::format(small.clone()).err().unwrap();
        assert!(err.to_string().contains("4096-byte blocks"), "{err}");
        let err = Journal::replay(small, &[], None).err().unwrap();
        assert!(err.to_string().contains("4096-byte blocks"), "{err}");
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

    /// From an audit: a log whose every block is a record header that
    /// passes the quick checks, claims the rest of the log and fails its
    /// checksum cost the square of the log's size to scan (a 1 GiB journal:
    /// about 140 TB of reads, a start that never ends). The scan stops
    /// with a clear error instead.
    #[test]
    fn a_log_of_crafted_overlapping_headers_is_refused_not_scanned_for_ever() {
        let jdev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("j", 4096, 1100).unwrap());
        Journal::format(jdev.clone()).unwrap();
        let sb = superblock::load(jdev.as_ref()).unwrap();
        let total = sb.log_blocks;
        let mut log = vec![0u8; total as usize * 4096];
        for (i, h) in log.chunks_mut(4096).enumerate() {
            h[0..8].copy_from_slice(&REC_MAGIC.to_le_bytes());
            h[8..16].copy_from_slice(&sb.nonce.to_le_bytes());
            h[16..24].copy_from_slice(&(sb.checkpoint_seq + 1).to_le_bytes());
            h[24..28].copy_from_slice(&((total as usize - i) as u32).to_le_bytes());
        }
        sync(jdev.as_ref(), IoOp::Write, 1, &mut log).unwrap();
        let err = Journal::replay(jdev, &[], None).err().expect("refused");
        assert!(err.to_string().contains("crafted or damaged"), "{err}");
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

    /// From an audit: the room guest records leave for reclaim did not
    /// count the blocks a record skips at the end of a lap, so the last
    /// reclaim was refused with no checkpoint able to make room.
    #[test]
    fn reclaim_finds_room_even_when_a_record_skips_to_the_next_lap() {
        // 64 log blocks.
        let jdev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("j", 4096, 66).unwrap());
        let j = Journal::format(jdev).unwrap();
        let e = |member, count| Entry {
            member,
            count,
            block: 0,
        };
        let one = vec![1u8; 4096];
        // The tail moves on to block 10.
        for _ in 0..5 {
            let mut r = j.record(&[e(0, 1)], &[&one]);
            let (_, ep) = j.reserve(&mut r, true).unwrap();
            j.done(ep);
        }
        assert!(j.checkpoint(|| Ok(())).unwrap());
        // Four blocks in the write-back cache, then guest records of two
        // log blocks until they are refused (the log up to block 62
        // before: the first reclaim skips two blocks to the next lap).
        let mut r = j.record(&[e(0, 1)], &[&one]);
        let (_, epoch) = j.reserve(&mut r, true).unwrap();
        j.done(epoch);
        for b in 0..4 {
            j.cache().insert(b, b, &one, epoch);
        }
        while let Some((_, ep)) = j.reserve(&mut j.record(&[e(0, 1)], &[&one]), true) {
            j.done(ep);
        }
        // Each cached block's reclaim (header, data, parity) finds room.
        for b in 0..4 {
            let mut r = j.record(&[e(0, 1), e(1, 1)], &[&one, &one]);
            assert!(j.reserve(&mut r, false).is_some(), "reclaim {b}");
        }
    }

    #[test]
    fn a_full_log_waits_for_a_checkpoint() {
        // 64 log blocks between the two superblock copies.
        let jdev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("j", 4096, 66).unwrap());
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

    /// Two checkpoints that overlap (a volume's monitor and another
    /// caller): the one that closed the older epoch must not finish last
    /// and move the tail back, which made the log look full and stalled
    /// writes until a suspend timed out.
    #[test]
    fn overlapping_checkpoints_never_move_the_tail_back() {
        let jdev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("j", 4096, 66).unwrap());
        let j = Journal::format(jdev).unwrap();
        let e = Entry {
            member: 0,
            count: 3,
            block: 0,
        };
        let data = vec![1u8; 3 * 4096];
        let add = |n: usize| {
            for _ in 0..n {
                let mut r = j.record(&[e], &[&data]);
                let (_, ep) = j.reserve(&mut r, false).unwrap();
                j.done(ep);
            }
        };
        add(2);
        let (in_flush, a_parked) = std::sync::mpsc::channel();
        let (release, a_waits) = std::sync::mpsc::channel::<()>();
        let (b_done, b_finished) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            // A closes the first epoch and stops in its flush.
            let j = &j;
            let a = s.spawn(move || {
                j.checkpoint(|| {
                    in_flush.send(()).unwrap();
                    a_waits.recv().unwrap();
                    Ok(())
                })
            });
            a_parked.recv().unwrap();
            // More records, then B checkpoints past them.
            add(3);
            let b = s.spawn(move || {
                let r = j.checkpoint(|| Ok(()));
                b_done.send(()).unwrap();
                r
            });
            // Give B the chance to finish first (it must not be able to);
            // the outcome is checked below whatever happens here.
            let _ = b_finished.recv_timeout(Duration::from_secs(1));
            release.send(()).unwrap();
            assert!(a.join().unwrap().unwrap());
            assert!(b.join().unwrap().unwrap());
        });
        assert_eq!(j.usage(), 0.0, "the tail went back behind B's checkpoint");
    }
}
