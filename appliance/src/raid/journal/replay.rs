//! Replay after a start: every durable record since the last checkpoint
//! goes to the members again, write-through records first, then the
//! write-back data still newer than them (with parity brought along).

use crate::raid::RaidError;
use std::sync::Arc;

use bdev::{BlockDevice, IoOp};

use super::codec::{
    block_size_ok, seal, u32_at, u64_at, write_header, Entry, RecordCheck, MAX_ENTRIES, REC_MAGIC,
    VOLUME_RECORD,
};
use super::{superblock, Journal, Super};
use crate::raid::geometry::Raid5Geometry;
use crate::raid::metaio::sync;
use crate::raid::parity::xor_into;

/// What replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// Records written again to the members.
    pub records: u64,
    /// Blocks written.
    pub blocks: u64,
}

/// The log, read a window at a time: replay's memory does not grow with
/// the journal (a large NVMe journal would not fit in RAM).
struct LogReader<'a> {
    dev: &'a dyn BlockDevice,
    bs: usize,
    /// Log blocks.
    total: usize,
    /// Blocks one read may take.
    step: usize,
    window: Vec<u8>,
    /// Log block of the window's first block, and how many it holds.
    start: usize,
    len: usize,
}

/// Bytes of log read at once while scanning.
const WINDOW_BYTES: usize = 4 << 20;
/// Bytes of a record's data handled at once while replaying it.
const PIECE_BYTES: usize = 1 << 20;
/// Times over its whole log a scan may check blocks of candidate records.
const SCAN_PASSES: usize = 8;

impl<'a> LogReader<'a> {
    fn new(dev: &'a dyn BlockDevice, total: usize) -> LogReader<'a> {
        let bs = dev.info().block_size as usize;
        LogReader {
            dev,
            bs,
            total,
            step: (dev.info().max_transfer as usize / bs).clamp(1, 1024),
            window: Vec::new(),
            start: 0,
            len: 0,
        }
    }

    /// Log block `i` (`i < total`), through the window.
    fn block(&mut self, i: usize) -> Result<&[u8], RaidError> {
        if i < self.start || i >= self.start + self.len {
            let n = (WINDOW_BYTES / self.bs).max(1).min(self.total - i);
            self.window.resize(n * self.bs, 0);
            let mut buf = std::mem::take(&mut self.window);
            self.read(i, &mut buf)?;
            self.window = buf;
            (self.start, self.len) = (i, n);
        }
        let at = (i - self.start) * self.bs;
        Ok(&self.window[at..at + self.bs])
    }

    /// Log blocks from `i` into `out` (a whole number of blocks).
    fn read(&self, i: usize, out: &mut [u8]) -> Result<(), RaidError> {
        for (k, piece) in out.chunks_mut(self.step * self.bs).enumerate() {
            let at = 1 + (i + k * self.step) as u64;
            sync(self.dev, IoOp::Read, at, piece)?;
        }
        Ok(())
    }
}

/// A whole record found in the log: sequence, first log block, blocks,
/// whether it holds write-back data.
#[derive(Clone, Copy)]
struct Found {
    seq: u64,
    at: usize,
    blocks: usize,
    volume: bool,
    /// Entries, as validated by the scan (at most MAX_ENTRIES).
    entries: usize,
}

/// Every whole record of this journal after its checkpoint, oldest first.
/// A record is at most `largest` blocks (what the volume can write). A
/// header that passes the quick checks but not its checksum costs a read
/// of what it claims, and the scan moves on by one block: a crafted log
/// of such headers would cost the square of its size, so the blocks
/// checked are bounded (a real log checks each about once).
fn scan(log: &mut LogReader, s: &Super, largest: usize) -> Result<Vec<Found>, RaidError> {
    let (bs, total) = (log.bs, log.total);
    let mut found = Vec::new();
    let mut i = 0usize;
    let budget = total.saturating_mul(SCAN_PASSES).saturating_add(largest);
    let mut checked = 0usize;
    while i < total {
        let h = log.block(i)?.to_vec();
        let seq = u64_at(&h, 16);
        let blocks = u32_at(&h, 24) as usize;
        let entries = (u32_at(&h, 28) & !VOLUME_RECORD) as usize;
        let candidate = u64_at(&h, 0) == REC_MAGIC
            && u64_at(&h, 8) == s.nonce
            && seq > s.checkpoint_seq
            && seq < super::codec::SEQ_LIMIT
            && blocks >= 1
            && blocks <= total - i
            && blocks <= largest
            && entries <= MAX_ENTRIES;
        if candidate {
            checked = checked.saturating_add(blocks);
            if checked > budget {
                return Err(RaidError::Invalid(format!(
                    "journal {}: its log holds more overlapping record headers than a journal writes (crafted or damaged); start without it (--drop-journal) to use the volume",
                    log.dev.info().name
                )));
            }
            let mut check = RecordCheck::start(&h, bs);
            for k in 1..blocks {
                check.add(log.block(i + k)?);
            }
            if check.ok() {
                found.push(Found {
                    seq,
                    at: i,
                    blocks,
                    volume: u32_at(&h, 28) & VOLUME_RECORD != 0,
                    entries,
                });
                i += blocks;
                continue;
            }
        }
        i += 1;
    }
    found.sort_unstable_by_key(|f| (f.seq, f.at));
    Ok(found)
}

impl Journal {
    /// [`replay`](Self::replay), going on around a member whose IO fails
    /// it, as md runs an array without a member that fails: `fail(slot)`
    /// records that member failed (durably: nothing is replayed around it
    /// before), and the replay starts again without it (what it had
    /// logged of its own is replayed too). Only while the volume can lose
    /// it (no member missing yet), and only for a write or flush it
    /// refused; a failure of the journal device, of a second member, or
    /// one that may pass (a time-out, a read) is the replay's error.
    /// Refused, the volume did not start, and the way out it named
    /// (`--drop-journal`) lost the write-back data only the journal held
    /// (audit). Returns the slot it went around, if any.
    pub fn replay_around(
        dev: Arc<dyn BlockDevice>,
        members: &[Option<Arc<dyn BlockDevice>>],
        geo: &Raid5Geometry,
        mut fail: impl FnMut(usize) -> Result<(), RaidError>,
    ) -> Result<(Arc<Journal>, ReplayReport, Option<usize>), RaidError> {
        let mut slots = members.to_vec();
        let mut around = None;
        loop {
            let e = match Journal::replay(dev.clone(), &slots, Some(geo)) {
                Ok((j, report)) => return Ok((j, report, around)),
                Err(e) => e,
            };
            // Only a write or flush the member refused: a time-out, a
            // channel it had no room for, or a block it could not read may
            // pass, and failing the member for them costs a whole rebuild
            // with a member short (review); the start is refused then, and
            // can be tried again.
            let failed = match &e {
                RaidError::Io { device, what, .. } if what == "Write" || what == "Flush" => slots
                    .iter()
                    .position(|m| m.as_ref().is_some_and(|d| d.info().name == *device)),
                _ => None,
            };
            let Some(k) = failed.filter(|_| slots.iter().all(|m| m.is_some())) else {
                return Err(e);
            };
            fail(k)?;
            tracing::warn!(member = k, error = %e, "a member failed the journal's replay: it is failed, and the journal replayed around it");
            slots[k] = None;
            around = Some(k);
        }
    }

    /// Open the journal on `dev` after a start: write every record since
    /// the last checkpoint to `members` (by slot; `None` for a missing
    /// member, whose blocks are skipped: it is rebuilt later), flush them,
    /// and checkpoint. Write-back records need the volume's geometry, to
    /// update parity. Returns the journal, ready for service.
    ///
    /// Memory stays bounded whatever the journal's size: the log is
    /// scanned a window at a time, and each record is read again, a piece
    /// at a time, when it is replayed; the write-back blocks replay holds
    /// are at most twice what the cache holds, and with their parity and
    /// the records that log them (a degraded replay) come to about four
    /// times what it holds at most (1 GiB for a full 256 MiB cache: audit).
    /// Every length in it is checked against the log before it is used.
    pub fn replay(
        dev: Arc<dyn BlockDevice>,
        members: &[Option<Arc<dyn BlockDevice>>],
        geo: Option<&Raid5Geometry>,
    ) -> Result<(Arc<Journal>, ReplayReport), RaidError> {
        let bs = dev.info().block_size as usize;
        block_size_ok(dev.as_ref())?;
        let s = superblock::load(dev.as_ref())?;
        let total = usize::try_from(s.log_blocks).map_err(|_| {
            RaidError::Invalid(format!("{}: journal log too large", dev.info().name))
        })?;
        let mut log = LogReader::new(dev.as_ref(), total);
        // A stripe's record (every member's chunk and a header), or a
        // degraded replay's overlay record (256 blocks and a header).
        let largest = geo.map_or(total, |g| {
            (g.members() as usize)
                .saturating_mul(g.chunk_blocks() as usize)
                .saturating_add(1)
                .max(257)
        });
        let found = scan(&mut log, &s, largest)?;
        let mut report = ReplayReport::default();
        let mut max_seq = s.checkpoint_seq;
        // Pass 1: write-through records (data and parity, as they went to
        // the members), in order.
        // Pass 2: the write-back data no later record replaced, with
        // parity brought along (members never saw it before a reclaim).
        let live = live_write_back(&mut log, &s, &found, bs)?;
        // Write-back data needs its rows' parity brought along: a crash in
        // the middle of writing them leaves rows whose data is new and
        // parity old, which a second replay with a member missing would
        // read-modify-write into garbage for that member. So the results
        // are computed in memory first, logged as write-through records
        // (which a second replay applies instead), and only then written
        // to the members.
        let degraded = members.iter().any(|m| m.is_none());
        let mut overlay = Overlay {
            bs,
            blocks: Default::default(),
            direct: false,
        };
        let piece_blocks = (PIECE_BYTES / bs).max(1);
        let mut h = vec![0u8; bs];
        let mut piece = Vec::new();
        for pass in [false, true] {
            for f in found.iter().filter(|f| f.volume == pass) {
                let seq = f.seq;
                log.read(f.at, &mut h)?;
                // The scan checked this header (a device that reads back
                // something else now gets at most the entries it checked).
                let entries = f.entries;
                // Log block of the next run's data, and the record's end.
                let mut data = f.at + 1;
                let end = f.at + f.blocks;
                for k in 0..entries {
                    let (member, count, block) = entry_at(&h, k);
                    if count > end - data || block.checked_add(count as u64).is_none() {
                        return Err(RaidError::Invalid(format!(
                            "journal record {seq} is inconsistent"
                        )));
                    }
                    let run = data;
                    data += count;
                    // Inside the members' data area: a crafted record must
                    // not reach superblocks, bitmaps or md metadata.
                    if let Some(g) = geo.filter(|_| !f.volume) {
                        let area =
                            g.data_offset()..g.data_offset() + g.stripes() * g.chunk_blocks();
                        if member >= g.members() as usize
                            || !area.contains(&block)
                            || block + count as u64 > area.end
                        {
                            return Err(RaidError::Invalid(format!(
                                "journal record {seq} names member {member} blocks {block}+{count}, outside the volume"
                            )));
                        }
                    }
                    if !f.volume {
                        if let Some(Some(m)) = members.get(member) {
                            for k0 in (0..count).step_by(piece_blocks) {
                                let n = piece_blocks.min(count - k0);
                                piece.resize(n * bs, 0);
                                log.read(run + k0, &mut piece)?;
                                sync(m.as_ref(), IoOp::Write, block + k0 as u64, &mut piece)?;
                            }
                            report.blocks += count as u64;
                        }
                        continue;
                    }
                    let geo = geo.ok_or_else(|| {
                        RaidError::Invalid(format!("journal record {seq} holds write-back data, which needs a RAID5 volume's geometry"))
                    })?;
                    // Sub-runs of blocks no later record wrote, a piece
                    // at a time.
                    let mut k0 = 0;
                    while k0 < count {
                        let fresh = |k: usize| live.get(&(member, block + k as u64)) == Some(&seq);
                        if !fresh(k0) {
                            k0 += 1;
                            continue;
                        }
                        // Pieces end at chunk ends: a run is one chunk's
                        // as the writer makes it, and one that is not (a
                        // damaged or crafted log) is replayed stripe by
                        // stripe, each with its own parity.
                        let at = (block + k0 as u64).saturating_sub(geo.data_offset());
                        let to_chunk_end = (geo.chunk_blocks() - at % geo.chunk_blocks()) as usize;
                        let mut k1 = k0 + 1;
                        while k1 < count && k1 - k0 < piece_blocks.min(to_chunk_end) && fresh(k1) {
                            k1 += 1;
                        }
                        piece.resize((k1 - k0) * bs, 0);
                        log.read(run + k0, &mut piece)?;
                        replay_volume_run(
                            geo,
                            members,
                            &mut overlay,
                            member,
                            block + k0 as u64,
                            &piece,
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
            match log_overlay(&dev, &s, &found, &overlay, max_seq) {
                Ok(seq) => max_seq = seq,
                // With every member there, the results can go straight to
                // the members as before (only a crash in this replay and a
                // member lost at the next start would hurt); degraded,
                // they must not.
                Err(e) if !degraded => {
                    tracing::warn!(journal = %dev.info().name, error = %e, "the replay's results could not be logged first; written to the members directly");
                }
                Err(e) => return Err(e),
            }
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
        // The replay is on the members and the first copy says so: a
        // second copy the device cannot take fails the journal (the
        // volume starts and goes on without it), rather than refusing
        // every start from now on.
        let second = superblock::store_copies(dev.as_ref(), &s)?;
        let j = Self::with(dev, &s);
        if let Err(e) = second {
            tracing::error!(journal = %j.dev.info().name, error = %e, "the journal's second superblock copy cannot be written: the journal is failed");
            j.set_failed();
        }
        Ok((j, report))
    }
}

/// Entry `k` of the record header `h`: member, blocks, first block.
fn entry_at(h: &[u8], k: usize) -> (usize, usize, u64) {
    let e = 32 + k * 16;
    (
        u32_at(h, e) as usize,
        u32_at(h, e + 4) as usize,
        u64_at(h, e + 8),
    )
}

/// The write-back blocks no later record replaced, each with the
/// sequence of its newest write-back record, from the records in `found`
/// in sequence order. Replay holds each of them, and its parity, in memory
/// (see `Overlay`), so their number is bounded: they are what the cache
/// held when the log ended (a block leaves the cache through a
/// write-through record that names it: a reclaim, or a write that went
/// to the members over it), and a log leaving more than twice that is
/// crafted or damaged. Refused then, rather than take the daemon's memory.
fn live_write_back(
    log: &mut LogReader,
    s: &Super,
    found: &[Found],
    bs: usize,
) -> Result<std::collections::HashMap<(usize, u64), u64>, RaidError> {
    let limit = 2 * super::cache_limit(s, bs as u32);
    let mut live = std::collections::HashMap::new();
    if !found.iter().any(|f| f.volume) {
        return Ok(live);
    }
    let mut h = vec![0u8; bs];
    for f in found {
        log.read(f.at, &mut h)?;
        // The entries' runs share the record's data blocks: their sum is
        // checked as the replay checks it, so a crafted record costs at
        // most its size.
        let mut left = f.blocks - 1;
        for k in 0..f.entries {
            let (member, count, block) = entry_at(&h, k);
            if count > left || block.checked_add(count as u64).is_none() {
                return Err(RaidError::Invalid(format!(
                    "journal record {} is inconsistent",
                    f.seq
                )));
            }
            left -= count;
            for b in block..block + count as u64 {
                if f.volume {
                    live.insert((member, b), f.seq);
                } else {
                    live.remove(&(member, b));
                }
            }
            if live.len() as u64 > limit {
                return Err(RaidError::Invalid(format!(
                    "journal {}: its log leaves write-back data for more than {limit} blocks, more than its cache ever holds (crafted or damaged); start without it (--drop-journal) to use the volume",
                    log.dev.info().name
                )));
            }
        }
    }
    Ok(live)
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
) -> Result<(), RaidError> {
    if block < geo.data_offset() || member >= geo.members() as usize {
        return Err(RaidError::Invalid(format!(
            "write-back record names member {member} block {block}, outside the volume"
        )));
    }
    let stripe = (block - geo.data_offset()) / geo.chunk_blocks();
    // Inside the volume (the caller ends pieces at chunk ends, so the
    // parity below, the first block's stripe's, is the whole piece's).
    if stripe >= geo.stripes() {
        return Err(RaidError::Invalid(format!(
            "write-back record at member {member} block {block} lies beyond the volume's stripes"
        )));
    }
    let parity = geo.parity_member(stripe) as usize;
    if parity == member {
        return Err(RaidError::Invalid(format!(
            "write-back record puts data on the parity member of stripe {stripe}"
        )));
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
                    return Err(RaidError::Invalid(format!(
                        "stripe {stripe} misses two members; its write-back data cannot be placed"
                    )));
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
    ) -> Result<Vec<u8>, RaidError> {
        let dev = members
            .get(m)
            .and_then(|d| d.as_ref())
            .ok_or_else(|| RaidError::Invalid(format!("replay read of missing member {m}")))?;
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
    ) -> Result<(), RaidError> {
        if self.direct {
            let dev = members
                .get(m)
                .and_then(|d| d.as_ref())
                .ok_or_else(|| RaidError::Invalid(format!("replay write to missing member {m}")))?;
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
    found: &[Found],
    overlay: &Overlay,
    max_seq: u64,
) -> Result<u64, RaidError> {
    let bs = overlay.bs;
    let total = s.log_blocks as usize;
    // Records of whole rows (every member's block at one block number),
    // at most 256 blocks and MAX_ENTRIES runs each: a crash between two
    // records leaves a row's new data and its parity both logged or both
    // not. Cut by member first, a row's data could be logged and its
    // parity not, and the next replay took the data as written and never
    // brought the parity along (review).
    let mut rows: std::collections::BTreeMap<u64, Vec<(usize, &[u8])>> = Default::default();
    for (&(m, b), data) in &overlay.blocks {
        rows.entry(b).or_default().push((m, data));
    }
    let mut records: Vec<Vec<u8>> = Vec::new();
    let record = |group: &mut Vec<(usize, u64, &[u8])>| {
        // Entries are runs of consecutive blocks of one member.
        group.sort_unstable_by_key(|&(m, b, _)| (m, b));
        let mut entries: Vec<Entry> = Vec::new();
        for &(m, b, _) in group.iter() {
            match entries.last_mut() {
                Some(e) if e.member as usize == m && e.block + e.count as u64 == b => e.count += 1,
                _ => entries.push(Entry {
                    member: m as u32,
                    count: 1,
                    block: b,
                }),
            }
        }
        let mut r = Vec::new();
        write_header(&mut r, bs, s.nonce, &entries, group.len(), false);
        for (k, (_, _, d)) in group.iter().enumerate() {
            r[(1 + k) * bs..(2 + k) * bs].copy_from_slice(d);
        }
        group.clear();
        r
    };
    let mut group: Vec<(usize, u64, &[u8])> = Vec::new();
    // Each member's last block in the group, and the runs so far.
    let mut last: std::collections::HashMap<usize, u64> = Default::default();
    let mut runs = 0;
    // Whether member `m`'s block `b` starts a run (block 0 always does:
    // review).
    let starts = |last: &std::collections::HashMap<usize, u64>, m: usize, b: u64| {
        last.get(&m).map(|l| l + 1) != Some(b)
    };
    for (&b, row) in &rows {
        let new_runs = row.iter().filter(|(m, _)| starts(&last, *m, b)).count();
        if group.len() + row.len() > 256 || runs + new_runs > MAX_ENTRIES {
            records.push(record(&mut group));
            last.clear();
            runs = 0;
        }
        for &(m, d) in row {
            if starts(&last, m, b) {
                runs += 1;
            }
            last.insert(m, b);
            group.push((m, b, d));
        }
    }
    if !group.is_empty() {
        records.push(record(&mut group));
    }
    // The free space runs from the end of the newest live record to the
    // start of the oldest, around the ring; a record never wraps.
    let newest = found.iter().max_by_key(|r| r.seq);
    let oldest = found.iter().min_by_key(|r| r.seq);
    let (mut pos, limit) = match (newest, oldest) {
        (Some(n), Some(o)) => {
            let head = n.at + n.blocks;
            let tail = if o.at >= head { o.at } else { o.at + total };
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
            return Err(RaidError::Invalid(format!(
                "the journal has no free room to log the replay of a degraded volume ({} blocks needed)",
                blocks
            )));
        }
        seq += 1;
        // (Past the limit, a later replay would not see it.)
        if seq >= super::codec::SEQ_LIMIT {
            return Err(RaidError::Invalid(
                "the journal's sequence numbers are spent: it cannot log the replay of a degraded volume".into(),
            ));
        }
        seal(r, bs, seq);
        sync(dev.as_ref(), IoOp::Write, 1 + (pos % total) as u64, r)?;
        pos += blocks;
    }
    sync(dev.as_ref(), IoOp::Flush, 0, &mut [])?;
    Ok(seq)
}
