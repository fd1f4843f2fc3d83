//! Rebuild: reconstruct a replaced member stripe by stripe, in the
//! background on a reactor, while IO goes on.
//!
//! Each stripe is locked (the same lock table writes use), the chunk row of
//! every other member is read, XORed, and written to the new member; then
//! the shared cursor moves past the stripe and the lock is released. IO
//! treats the new member as valid below the cursor and missing above it,
//! so writes never race the reconstruction of the stripe they touch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bdev::{Completion, IoChannel, IoError, IoOp, IoRequest, SubmitError};
use poller::PollState;

use super::geometry::Raid5Geometry;
use super::members::{Event, FailureSink};
use super::parity::xor_gen;
use super::raid5::StripeLocks;
use super::sg;

/// What operators see of a rebuild.
pub struct RebuildProgress {
    /// The slot being rebuilt.
    pub slot: usize,
    /// Stripes to do.
    pub total: u64,
    /// Stripes done (the cursor).
    pub cursor: Arc<AtomicU64>,
    /// Bytes written to the new member.
    pub bytes: AtomicU64,
    /// Upper rate limit in bytes per second (0: none), like md's
    /// sync_speed_max.
    pub max_bytes_per_sec: AtomicU64,
    /// While the volume serves guest IO, the rate drops to this (md's
    /// sync_speed_min: the floor it yields down to); 0: it does not yield.
    pub min_bytes_per_sec: AtomicU64,
    started: Instant,
    /// Set to stop the rebuild at the next stripe.
    pub cancel: AtomicBool,
    /// Blocks whose parity did not match (scrub).
    pub mismatches: AtomicU64,
    finished: AtomicBool,
    error: Mutex<Option<String>>,
}

impl RebuildProgress {
    /// A rebuild of `slot` over `total` stripes, starting at `cursor`.
    pub fn new(slot: usize, total: u64, cursor: Arc<AtomicU64>) -> RebuildProgress {
        RebuildProgress {
            slot,
            total,
            cursor,
            bytes: AtomicU64::new(0),
            max_bytes_per_sec: AtomicU64::new(0),
            min_bytes_per_sec: AtomicU64::new(0),
            started: Instant::now(),
            cancel: AtomicBool::new(false),
            mismatches: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }

    /// Fraction done, 0..=1.
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            return 1.0;
        }
        self.cursor.load(Ordering::Relaxed) as f64 / self.total as f64
    }

    /// Estimated time left at the rate so far.
    pub fn eta(&self) -> Option<Duration> {
        let f = self.fraction();
        if f <= 0.0 {
            return None;
        }
        let spent = self.started.elapsed().as_secs_f64();
        Some(Duration::from_secs_f64(spent * (1.0 - f) / f))
    }

    /// Whether it ended (successfully or not).
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    #[cfg(test)]
    pub(crate) fn mark_finished(&self, error: Option<&str>) {
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = error.map(str::to_string);
        self.finished.store(true, Ordering::SeqCst);
    }

    /// Why it stopped, if it failed.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The rows a rebuild walks: `count` rows of `blocks` blocks from `offset`
/// on every member; the last row may be shorter (`total` blocks in all).
#[derive(Debug, Clone, Copy)]
pub struct Rows {
    /// Number of rows.
    pub count: u64,
    /// Blocks per row.
    pub blocks: u64,
    /// First block of row 0 on every member.
    pub offset: u64,
    /// Blocks covered by all rows.
    pub total: u64,
    /// Bytes per block.
    pub block_size: usize,
}

impl Rows {
    /// The rows of a RAID5: one per stripe, a chunk each.
    pub fn of_raid5(geo: &Raid5Geometry, block_size: usize) -> Rows {
        Rows {
            count: geo.stripes(),
            blocks: geo.chunk_blocks(),
            offset: geo.data_offset(),
            total: geo.stripes() * geo.chunk_blocks(),
            block_size,
        }
    }

    fn block(&self, row: u64) -> u64 {
        self.offset + row * self.blocks
    }

    fn len(&self, row: u64) -> u64 {
        self.blocks.min(self.total - row * self.blocks)
    }
}

enum Step {
    Lock,
    Reading,
    Writing,
    Draining,
}

/// Where a write's data comes from.
#[derive(Clone, Copy)]
enum Source {
    /// The computed row.
    Out,
    /// A member's row as read.
    Read(usize),
}

/// What a rebuild and a scrub share: walking rows under their locks, one
/// read buffer per member plus one computed row, and the IO bookkeeping.
struct RowWalk {
    rows: Rows,
    channels: Vec<Box<dyn IoChannel>>,
    locks: Arc<StripeLocks>,
    progress: Arc<RebuildProgress>,
    row: u64,
    step: Step,
    pending: usize,
    bufs: Vec<Vec<u8>>,
    out: Vec<u8>,
    comps: Vec<Completion>,
    /// Rate limiting: a token bucket in bytes, refilled at the limit.
    tokens: f64,
    refilled: Instant,
    /// Guest IO on the volume: seen changing means "busy" for a while.
    activity: Option<Arc<super::members::Activity>>,
    seen: u64,
    busy_until: Instant,
    next_look: Instant,
}

impl RowWalk {
    fn new(
        rows: Rows,
        channels: Vec<Box<dyn IoChannel>>,
        locks: Arc<StripeLocks>,
        progress: Arc<RebuildProgress>,
    ) -> RowWalk {
        let chunk = rows.blocks as usize * rows.block_size;
        RowWalk {
            row: progress.cursor.load(Ordering::SeqCst),
            bufs: (0..channels.len()).map(|_| vec![0u8; chunk]).collect(),
            out: vec![0u8; chunk],
            rows,
            channels,
            locks,
            progress,
            step: Step::Lock,
            pending: 0,
            comps: Vec::new(),
            tokens: (chunk) as f64,
            refilled: Instant::now(),
            activity: None,
            seen: 0,
            busy_until: Instant::now(),
            next_look: Instant::now(),
        }
    }

    /// Whether the next row may start under the rate limits: the maximum,
    /// or while guest IO runs on the volume, the minimum (md's
    /// sync_speed_min/max). Busy, not idle, while it waits: a sleeping
    /// reactor would not wake for it.
    fn may_go(&mut self) -> bool {
        let now = Instant::now();
        if let Some(a) = &self.activity {
            if now >= self.next_look {
                // Look every 10 ms; IO seen keeps the volume busy 100 ms.
                self.next_look = now + Duration::from_millis(10);
                let t = a.total();
                if t != self.seen {
                    self.seen = t;
                    self.busy_until = now + Duration::from_millis(100);
                }
            }
        }
        let max = self.progress.max_bytes_per_sec.load(Ordering::Relaxed);
        let min = self.progress.min_bytes_per_sec.load(Ordering::Relaxed);
        let limit = match (now < self.busy_until && min > 0, max) {
            (true, 0) => min,
            (true, max) => min.min(max),
            (false, max) => max,
        };
        let row = (self.rows.blocks as usize * self.rows.block_size) as f64;
        let dt = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        if limit == 0 {
            self.tokens = row;
            return true;
        }
        // At most a row's worth (or 50 ms of the rate) saved up.
        self.tokens = (self.tokens + limit as f64 * dt).min(row.max(limit as f64 * 0.05));
        if self.tokens < row {
            return false;
        }
        self.tokens -= row;
        true
    }

    fn done(&self) -> bool {
        self.row >= self.rows.count
    }

    /// Blocks and bytes of the current row.
    fn size(&self) -> (u64, usize) {
        let n = self.rows.len(self.row);
        (n, n as usize * self.rows.block_size)
    }

    /// Lock the current row and read it from `members`. `Ok(false)`: the
    /// row is locked by someone else, try again; `Err(m)`: `m` refused.
    fn read(&mut self, members: &[usize]) -> Result<bool, usize> {
        // Busy, not idle, when locked out: nothing wakes a sleeping
        // reactor when another core releases the lock.
        if !self.locks.try_lock(self.row) {
            return Ok(false);
        }
        self.step = Step::Reading;
        let (n, len) = self.size();
        for &m in members {
            let req = IoRequest {
                op: IoOp::Read,
                offset_blocks: self.rows.block(self.row),
                num_blocks: n,
                sg: sg::of(&mut self.bufs[m], 0, len),
                tag: m as u64,
            };
            if let Err(SubmitError::Busy(_)) = self.channels[m].submit(req) {
                return Err(m);
            }
            self.pending += 1;
        }
        Ok(true)
    }

    /// Write the current row to `m`. `Err(m)` if it refused.
    fn write(&mut self, m: usize, from: Source) -> Result<(), usize> {
        self.step = Step::Writing;
        let (n, len) = self.size();
        let src = match from {
            Source::Out => &mut self.out,
            Source::Read(r) => &mut self.bufs[r],
        };
        let req = IoRequest {
            op: IoOp::Write,
            offset_blocks: self.rows.block(self.row),
            num_blocks: n,
            sg: sg::of(src, 0, len),
            tag: m as u64,
        };
        if let Err(SubmitError::Busy(_)) = self.channels[m].submit(req) {
            return Err(m);
        }
        self.pending += 1;
        Ok(())
    }

    /// Collect completions: `Ok(true)` when the step's IO is all back,
    /// `Err` with the first member that failed.
    fn collect(&mut self) -> Result<bool, (usize, IoError)> {
        let mut comps = std::mem::take(&mut self.comps);
        for ch in self.channels.iter_mut() {
            if ch.inflight() > 0 {
                ch.poll(&mut comps);
            }
        }
        self.pending -= comps.len();
        let failure = comps
            .iter()
            .find_map(|c| c.result.err().map(|e| (c.tag as usize, e)));
        comps.clear();
        self.comps = comps;
        match failure {
            Some(f) => Err(f),
            None => Ok(self.pending == 0),
        }
    }

    /// The row is done: count it, move the cursor past it, unlock it.
    fn advance(&mut self) {
        let (_, len) = self.size();
        self.progress.bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.row += 1;
        self.progress.cursor.store(self.row, Ordering::SeqCst);
        self.locks.unlock(self.row - 1);
        self.step = Step::Lock;
    }

    /// Give up the current row (its lock) and start draining.
    fn stop(&mut self, why: Option<String>) {
        if matches!(self.step, Step::Reading | Step::Writing) {
            self.locks.unlock(self.row);
        }
        if let Some(why) = why {
            *self
                .progress
                .error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
        self.step = Step::Draining;
    }

    /// True once nothing of ours is in flight (the buffers are ours, so the
    /// walk may only end then).
    fn drained(&mut self) -> bool {
        let mut comps = std::mem::take(&mut self.comps);
        for ch in self.channels.iter_mut() {
            if ch.inflight() > 0 {
                ch.poll(&mut comps);
            }
        }
        comps.clear();
        self.comps = comps;
        self.channels.iter().all(|c| c.inflight() == 0)
    }
}

/// The reactor-side rebuild state machine: each row of the new member is
/// the XOR of the same row of the `sources` (all other members for RAID5,
/// one in-sync mirror for RAID1, where the XOR is a copy).
pub struct Rebuilder {
    walk: RowWalk,
    ids: Vec<usize>,
    sources: Vec<usize>,
    slot: usize,
    events: FailureSink,
}

impl Rebuilder {
    /// Rebuild `slot` from the other members' channels (with their device
    /// identities), indexed by slot; the rebuilt member's at `slot`.
    pub fn new(
        rows: Rows,
        slot: usize,
        sources: Vec<usize>,
        members: Vec<(Box<dyn IoChannel>, usize)>,
        locks: Arc<StripeLocks>,
        progress: Arc<RebuildProgress>,
        events: FailureSink,
    ) -> Rebuilder {
        let (channels, ids): (Vec<_>, Vec<_>) = members.into_iter().unzip();
        Rebuilder {
            walk: RowWalk::new(rows, channels, locks, progress),
            ids,
            sources,
            slot,
            events,
        }
    }

    /// Yield to the guest IO `activity` counts (see `may_go`).
    pub fn watching(mut self, activity: Arc<super::members::Activity>) -> Rebuilder {
        self.walk.activity = Some(activity);
        self
    }

    fn abort(&mut self, why: String) -> PollState {
        tracing::error!(slot = self.slot, error = %why, "rebuild stopped");
        self.walk.stop(Some(why.clone()));
        self.events.event(Event::RebuildAborted(self.slot, why));
        self.poll()
    }

    /// One step; run as a reactor poller.
    pub fn poll(&mut self) -> PollState {
        loop {
            let w = &mut self.walk;
            match w.step {
                Step::Draining => {
                    if !w.drained() {
                        return PollState::Busy;
                    }
                    w.progress.finished.store(true, Ordering::SeqCst);
                    return PollState::Done;
                }
                Step::Lock => {
                    if w.progress.cancel.load(Ordering::SeqCst) {
                        return self.abort("cancelled".into());
                    }
                    if w.done() {
                        w.progress.finished.store(true, Ordering::SeqCst);
                        self.events.event(Event::Rebuilt(self.slot));
                        return PollState::Done;
                    }
                    if !w.may_go() {
                        return PollState::Busy;
                    }
                    match w.read(&self.sources) {
                        Ok(true) => {}
                        Ok(false) => return PollState::Busy,
                        Err(m) => return self.abort(format!("member {m} refused a rebuild read")),
                    }
                }
                Step::Reading | Step::Writing => {
                    match w.collect() {
                        Ok(true) => {}
                        Ok(false) => return PollState::Busy,
                        Err((m, e)) => {
                            self.events.report(m, self.ids[m], e);
                            return self
                                .abort(format!("member {m} failed during the rebuild: {e}"));
                        }
                    }
                    if matches!(w.step, Step::Reading) {
                        let (_, len) = w.size();
                        let srcs: Vec<&[u8]> =
                            self.sources.iter().map(|&m| &w.bufs[m][..len]).collect();
                        xor_gen(&mut w.out[..len], &srcs);
                        if w.write(self.slot, Source::Out).is_err() {
                            return self.abort("the new member refused a rebuild write".into());
                        }
                        continue;
                    }
                    // Written: move the cursor past the row, then unlock.
                    w.advance();
                    return PollState::Busy;
                }
            }
        }
    }
}

/// A consistency check (md's `check`) or repair (`repair`) of a healthy
/// volume, row by row under the row's lock. RAID5: the rows of all members
/// must XOR to zero, and repair rewrites parity from the data. RAID1: every
/// mirror must equal the first, and repair copies the first over the others
/// (md does the same).
pub struct Scrubber {
    walk: RowWalk,
    /// RAID5 geometry for parity placement; `None` for mirrors.
    parity: Option<Raid5Geometry>,
    /// Cleared when the scrub ends.
    flag: Option<Arc<AtomicBool>>,
    all: Vec<usize>,
    repair: bool,
    /// A resync of the regions a write-intent bitmap marks: the bits (as
    /// words) and rows per bit. The bitmap is thawed when it succeeds.
    only: Option<(Vec<u64>, u64, Arc<super::bitmap::Bitmap>)>,
}

impl Scrubber {
    /// Scrub with one channel per member, in slot order.
    pub fn new(
        rows: Rows,
        parity: Option<Raid5Geometry>,
        channels: Vec<Box<dyn IoChannel>>,
        locks: Arc<StripeLocks>,
        progress: Arc<RebuildProgress>,
        repair: bool,
    ) -> Scrubber {
        let all = (0..channels.len()).collect();
        Scrubber {
            walk: RowWalk::new(rows, channels, locks, progress),
            parity,
            flag: None,
            all,
            repair,
            only: None,
        }
    }

    /// Read and compare only `members` (slots; the in-sync mirrors of a
    /// degraded mirror), the first being the reference a repair copies.
    pub fn reading(mut self, members: Vec<usize>) -> Scrubber {
        self.all = members;
        self
    }

    /// Walk only the regions `bitmap` marks dirty now, and let it clear
    /// them once every one was walked.
    pub fn only_dirty(mut self, bitmap: Arc<super::bitmap::Bitmap>) -> Scrubber {
        self.only = Some((bitmap.snapshot(), bitmap.rows_per_bit(), bitmap));
        self
    }

    /// Move the walk past rows outside the dirty regions.
    fn skip_clean(&mut self) {
        let Some((bits, rpb, _)) = &self.only else {
            return;
        };
        let w = &mut self.walk;
        while !w.done() {
            let r = w.row / rpb;
            if bits
                .get((r / 64) as usize)
                .is_some_and(|x| x & (1 << (r % 64)) != 0)
            {
                break;
            }
            w.row = ((r + 1) * rpb).min(w.rows.count);
        }
        w.progress.cursor.store(w.row, Ordering::SeqCst);
    }

    /// Yield to the guest IO `activity` counts (see `may_go`).
    pub fn watching(mut self, activity: Arc<super::members::Activity>) -> Scrubber {
        self.walk.activity = Some(activity);
        self
    }

    /// Clear `flag` when the scrub ends (however it ends).
    pub fn clearing_when_done(mut self, flag: Arc<AtomicBool>) -> Scrubber {
        self.flag = Some(flag);
        self
    }

    fn stop(&mut self, why: Option<String>) -> PollState {
        self.walk.stop(why);
        self.poll()
    }

    /// Count the row's blocks whose parity does not match; with repair,
    /// the parity write to issue.
    fn check_parity(&mut self, geo: &Raid5Geometry, len: usize) -> Vec<(usize, Source)> {
        let w = &mut self.walk;
        let all: Vec<&[u8]> = w.bufs.iter().map(|b| &b[..len]).collect();
        xor_gen(&mut w.out[..len], &all);
        let bs = w.rows.block_size;
        let bad = w.out[..len]
            .chunks_exact(bs)
            .filter(|b| b.iter().any(|&x| x != 0))
            .count() as u64;
        if bad == 0 {
            return Vec::new();
        }
        w.progress.mismatches.fetch_add(bad, Ordering::Relaxed);
        if !self.repair {
            return Vec::new();
        }
        let parity = geo.parity_member(w.row) as usize;
        let data: Vec<&[u8]> = (0..w.bufs.len())
            .filter(|&m| m != parity)
            .map(|m| &w.bufs[m][..len])
            .collect();
        xor_gen(&mut w.out[..len], &data);
        vec![(parity, Source::Out)]
    }

    /// Count the row's blocks where a mirror differs from the first one
    /// read; with repair, the copies to issue (from that mirror's data).
    fn check_mirrors(&mut self, len: usize) -> Vec<(usize, Source)> {
        let w = &mut self.walk;
        let bs = w.rows.block_size;
        let Some((&reference, others)) = self.all.split_first() else {
            return Vec::new();
        };
        let mut bad = 0u64;
        let mut differ = vec![false; w.bufs.len()];
        for start in (0..len).step_by(bs) {
            let first = &w.bufs[reference][start..start + bs];
            let mut block_bad = false;
            for &m in others {
                if w.bufs[m][start..start + bs] != *first {
                    differ[m] = true;
                    block_bad = true;
                }
            }
            bad += block_bad as u64;
        }
        if bad == 0 {
            return Vec::new();
        }
        w.progress.mismatches.fetch_add(bad, Ordering::Relaxed);
        if !self.repair {
            return Vec::new();
        }
        others
            .iter()
            .filter(|&&m| differ[m])
            .map(|&m| (m, Source::Read(reference)))
            .collect()
    }

    /// One step; run as a reactor poller.
    pub fn poll(&mut self) -> PollState {
        loop {
            match self.walk.step {
                Step::Draining => {
                    if !self.walk.drained() {
                        return PollState::Busy;
                    }
                    if let Some(f) = &self.flag {
                        f.store(false, Ordering::SeqCst);
                    }
                    if let (Some((_, _, b)), None) = (&self.only, self.walk.progress.error()) {
                        b.thaw();
                    }
                    self.walk.progress.finished.store(true, Ordering::SeqCst);
                    return PollState::Done;
                }
                Step::Lock => {
                    if self.walk.progress.cancel.load(Ordering::SeqCst) {
                        return self.stop(Some("cancelled".into()));
                    }
                    self.skip_clean();
                    if self.walk.done() {
                        return self.stop(None);
                    }
                    if !self.walk.may_go() {
                        return PollState::Busy;
                    }
                    match self.walk.read(&self.all) {
                        Ok(true) => {}
                        Ok(false) => return PollState::Busy,
                        Err(m) => {
                            return self.stop(Some(format!("member {m} refused a scrub read")))
                        }
                    }
                }
                Step::Reading | Step::Writing => {
                    match self.walk.collect() {
                        Ok(true) => {}
                        Ok(false) => return PollState::Busy,
                        Err((m, e)) => {
                            return self
                                .stop(Some(format!("member {m} failed during the scrub: {e}")))
                        }
                    }
                    if matches!(self.walk.step, Step::Reading) {
                        let (_, len) = self.walk.size();
                        let writes = match self.parity {
                            Some(geo) => self.check_parity(&geo, len),
                            None => self.check_mirrors(len),
                        };
                        if !writes.is_empty() {
                            for (m, from) in writes {
                                if self.walk.write(m, from).is_err() {
                                    return self
                                        .stop(Some(format!("member {m} refused a repair write")));
                                }
                            }
                            continue;
                        }
                    }
                    self.walk.advance();
                    return PollState::Busy;
                }
            }
        }
    }
}
