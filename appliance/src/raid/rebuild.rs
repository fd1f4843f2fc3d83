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

use bdev::{Completion, IoChannel, IoOp, IoRequest, SubmitError};
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

    /// Why it stopped, if it failed.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

enum Step {
    Lock,
    Reading,
    Writing,
    Draining,
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

/// The reactor-side rebuild state machine: each row of the new member is
/// the XOR of the same row of the `sources` (all other members for RAID5,
/// one in-sync mirror for RAID1, where the XOR is a copy).
pub struct Rebuilder {
    ids: Vec<usize>,
    rows: Rows,
    sources: Vec<usize>,
    slot: usize,
    channels: Vec<Box<dyn IoChannel>>,
    locks: Arc<StripeLocks>,
    progress: Arc<RebuildProgress>,
    events: FailureSink,
    stripe: u64,
    step: Step,
    pending: usize,
    bufs: Vec<Vec<u8>>,
    out: Vec<u8>,
    comps: Vec<Completion>,
    block_size: usize,
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
        let block_size = rows.block_size;
        let chunk = rows.blocks as usize * block_size;
        let (channels, ids): (Vec<_>, Vec<_>) = members.into_iter().unzip();
        Rebuilder {
            ids,
            stripe: progress.cursor.load(Ordering::SeqCst),
            bufs: (0..channels.len()).map(|_| vec![0u8; chunk]).collect(),
            out: vec![0u8; chunk],
            rows,
            sources,
            slot,
            channels,
            locks,
            progress,
            events,
            step: Step::Lock,
            pending: 0,
            comps: Vec::new(),
            block_size,
        }
    }

    /// Stop: drain what is in flight (its buffers are ours), then end.
    fn abort(&mut self, why: String) -> PollState {
        if matches!(self.step, Step::Reading | Step::Writing) {
            self.locks.unlock(self.stripe);
        }
        self.step = Step::Draining;
        tracing::error!(slot = self.slot, error = %why, "rebuild stopped");
        *self
            .progress
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
        self.events.event(Event::RebuildAborted(self.slot, why));
        self.drain()
    }

    fn drain(&mut self) -> PollState {
        let mut comps = std::mem::take(&mut self.comps);
        for ch in self.channels.iter_mut() {
            if ch.inflight() > 0 {
                ch.poll(&mut comps);
            }
        }
        self.pending = self.pending.saturating_sub(comps.len());
        comps.clear();
        self.comps = comps;
        if self.channels.iter().all(|c| c.inflight() == 0) {
            // Only now: nothing of ours is in flight to the devices.
            self.progress.finished.store(true, Ordering::SeqCst);
            PollState::Done
        } else {
            PollState::Busy
        }
    }

    /// One step; run as a reactor poller.
    pub fn poll(&mut self) -> PollState {
        loop {
            match self.step {
                Step::Draining => return self.drain(),
                Step::Lock => {
                    if self.progress.cancel.load(Ordering::SeqCst) {
                        return self.abort("cancelled".into());
                    }
                    if self.stripe >= self.rows.count {
                        self.progress.finished.store(true, Ordering::SeqCst);
                        self.events.event(Event::Rebuilt(self.slot));
                        return PollState::Done;
                    }
                    let max = self.progress.max_bytes_per_sec.load(Ordering::Relaxed);
                    if max > 0 {
                        let allowed = max as f64 * self.progress.started.elapsed().as_secs_f64();
                        if self.progress.bytes.load(Ordering::Relaxed) as f64 > allowed {
                            return PollState::Busy;
                        }
                    }
                    if !self.locks.try_lock(self.stripe) {
                        // Busy, not idle: nothing wakes a sleeping reactor
                        // when another core releases the lock.
                        return PollState::Busy;
                    }
                    let block = self.rows.block(self.stripe);
                    let n = self.rows.len(self.stripe);
                    let len = n as usize * self.block_size;
                    self.step = Step::Reading;
                    for si in 0..self.sources.len() {
                        let m = self.sources[si];
                        let req = IoRequest {
                            op: IoOp::Read,
                            offset_blocks: block,
                            num_blocks: n,
                            sg: sg::of(&mut self.bufs[m], 0, len),
                            tag: m as u64,
                        };
                        if let Err(SubmitError::Busy(_)) = self.channels[m].submit(req) {
                            return self.abort(format!("member {m} refused a rebuild read"));
                        }
                        self.pending += 1;
                    }
                }
                Step::Reading | Step::Writing => {
                    let mut comps = std::mem::take(&mut self.comps);
                    for m in 0..self.channels.len() {
                        if self.channels[m].inflight() > 0 {
                            self.channels[m].poll(&mut comps);
                        }
                    }
                    let mut failure = None;
                    for c in comps.drain(..) {
                        self.pending -= 1;
                        if let Err(e) = c.result {
                            failure.get_or_insert((c.tag as usize, e));
                        }
                    }
                    self.comps = comps;
                    if let Some((m, e)) = failure {
                        self.events.report(m, self.ids[m], e);
                        return self.abort(format!("member {m} failed during the rebuild: {e}"));
                    }
                    if self.pending > 0 {
                        return PollState::Busy;
                    }
                    if matches!(self.step, Step::Reading) {
                        let n = self.rows.len(self.stripe);
                        let len = n as usize * self.block_size;
                        let srcs: Vec<&[u8]> =
                            self.sources.iter().map(|&m| &self.bufs[m][..len]).collect();
                        xor_gen(&mut self.out[..len], &srcs);
                        let req = IoRequest {
                            op: IoOp::Write,
                            offset_blocks: self.rows.block(self.stripe),
                            num_blocks: n,
                            sg: sg::of(&mut self.out, 0, len),
                            tag: self.slot as u64,
                        };
                        if let Err(SubmitError::Busy(_)) = self.channels[self.slot].submit(req) {
                            return self.abort("the new member refused a rebuild write".into());
                        }
                        self.pending = 1;
                        self.step = Step::Writing;
                        continue;
                    }
                    // Written: move the cursor past the stripe, then unlock.
                    let done = self.rows.len(self.stripe) as usize * self.block_size;
                    self.progress
                        .bytes
                        .fetch_add(done as u64, Ordering::Relaxed);
                    self.stripe += 1;
                    self.progress.cursor.store(self.stripe, Ordering::SeqCst);
                    self.locks.unlock(self.stripe - 1);
                    self.step = Step::Lock;
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
    rows: Rows,
    /// RAID5 geometry for parity placement; `None` for mirrors.
    parity: Option<Raid5Geometry>,
    /// Cleared when the scrub ends.
    flag: Option<Arc<AtomicBool>>,
    channels: Vec<Box<dyn IoChannel>>,
    locks: Arc<StripeLocks>,
    progress: Arc<RebuildProgress>,
    repair: bool,
    stripe: u64,
    step: Step,
    pending: usize,
    bufs: Vec<Vec<u8>>,
    out: Vec<u8>,
    comps: Vec<Completion>,
    block_size: usize,
}

impl Scrubber {
    /// Clear `flag` when the scrub ends (however it ends).
    pub fn clearing_when_done(mut self, flag: Arc<AtomicBool>) -> Scrubber {
        self.flag = Some(flag);
        self
    }

    /// Scrub with one channel per member, in slot order.
    pub fn new(
        rows: Rows,
        parity: Option<Raid5Geometry>,
        channels: Vec<Box<dyn IoChannel>>,
        locks: Arc<StripeLocks>,
        progress: Arc<RebuildProgress>,
        repair: bool,
    ) -> Scrubber {
        let block_size = rows.block_size;
        let chunk = rows.blocks as usize * block_size;
        Scrubber {
            bufs: (0..channels.len()).map(|_| vec![0u8; chunk]).collect(),
            out: vec![0u8; chunk],
            rows,
            parity,
            flag: None,
            channels,
            locks,
            progress,
            repair,
            stripe: 0,
            step: Step::Lock,
            pending: 0,
            comps: Vec::new(),
            block_size,
        }
    }

    fn stop(&mut self, why: Option<String>) -> PollState {
        if matches!(self.step, Step::Reading | Step::Writing) {
            self.locks.unlock(self.stripe);
        }
        if let Some(why) = why {
            *self
                .progress
                .error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
        self.step = Step::Draining;
        self.poll()
    }

    /// Count the row's blocks whose parity does not match; with repair,
    /// the parity write to issue (member, from `out`).
    fn check_parity(&mut self, geo: &Raid5Geometry, len: usize) -> Vec<(usize, bool)> {
        let all: Vec<&[u8]> = self.bufs.iter().map(|b| &b[..len]).collect();
        xor_gen(&mut self.out[..len], &all);
        let bs = self.block_size;
        let bad = self.out[..len]
            .chunks_exact(bs)
            .filter(|b| b.iter().any(|&x| x != 0))
            .count() as u64;
        if bad == 0 {
            return Vec::new();
        }
        self.progress.mismatches.fetch_add(bad, Ordering::Relaxed);
        if !self.repair {
            return Vec::new();
        }
        let parity = geo.parity_member(self.stripe) as usize;
        let data: Vec<&[u8]> = (0..self.bufs.len())
            .filter(|&m| m != parity)
            .map(|m| &self.bufs[m][..len])
            .collect();
        xor_gen(&mut self.out[..len], &data);
        vec![(parity, true)]
    }

    /// Count the row's blocks where a mirror differs from the first; with
    /// repair, the copies to issue (member, from the first mirror's data).
    fn check_mirrors(&mut self, len: usize) -> Vec<(usize, bool)> {
        let bs = self.block_size;
        let mut bad = 0u64;
        let mut differ = vec![false; self.bufs.len()];
        for start in (0..len).step_by(bs) {
            let first = &self.bufs[0][start..start + bs];
            let mut block_bad = false;
            for (m, d) in differ.iter_mut().enumerate().skip(1) {
                if self.bufs[m][start..start + bs] != *first {
                    *d = true;
                    block_bad = true;
                }
            }
            bad += block_bad as u64;
        }
        if bad == 0 {
            return Vec::new();
        }
        self.progress.mismatches.fetch_add(bad, Ordering::Relaxed);
        if !self.repair {
            return Vec::new();
        }
        (1..differ.len())
            .filter(|&m| differ[m])
            .map(|m| (m, false))
            .collect()
    }

    /// One step; run as a reactor poller.
    pub fn poll(&mut self) -> PollState {
        loop {
            match self.step {
                Step::Draining => {
                    let mut comps = std::mem::take(&mut self.comps);
                    for ch in self.channels.iter_mut() {
                        if ch.inflight() > 0 {
                            ch.poll(&mut comps);
                        }
                    }
                    comps.clear();
                    self.comps = comps;
                    if self.channels.iter().all(|c| c.inflight() == 0) {
                        if let Some(f) = &self.flag {
                            f.store(false, Ordering::SeqCst);
                        }
                        self.progress.finished.store(true, Ordering::SeqCst);
                        return PollState::Done;
                    }
                    return PollState::Busy;
                }
                Step::Lock => {
                    if self.progress.cancel.load(Ordering::SeqCst) {
                        return self.stop(Some("cancelled".into()));
                    }
                    if self.stripe >= self.rows.count {
                        return self.stop(None);
                    }
                    if !self.locks.try_lock(self.stripe) {
                        return PollState::Busy;
                    }
                    let block = self.rows.block(self.stripe);
                    let n = self.rows.len(self.stripe);
                    let len = n as usize * self.block_size;
                    self.step = Step::Reading;
                    for m in 0..self.channels.len() {
                        let req = IoRequest {
                            op: IoOp::Read,
                            offset_blocks: block,
                            num_blocks: n,
                            sg: sg::of(&mut self.bufs[m], 0, len),
                            tag: m as u64,
                        };
                        if let Err(SubmitError::Busy(_)) = self.channels[m].submit(req) {
                            return self.stop(Some(format!("member {m} refused a scrub read")));
                        }
                        self.pending += 1;
                    }
                }
                Step::Reading | Step::Writing => {
                    let mut comps = std::mem::take(&mut self.comps);
                    for ch in self.channels.iter_mut() {
                        if ch.inflight() > 0 {
                            ch.poll(&mut comps);
                        }
                    }
                    let failed = comps
                        .iter()
                        .find_map(|c| c.result.err().map(|e| (c.tag, e)));
                    self.pending -= comps.len();
                    comps.clear();
                    self.comps = comps;
                    if let Some((m, e)) = failed {
                        return self.stop(Some(format!("member {m} failed during the scrub: {e}")));
                    }
                    if self.pending > 0 {
                        return PollState::Busy;
                    }
                    if matches!(self.step, Step::Reading) {
                        let n = self.rows.len(self.stripe);
                        let len = n as usize * self.block_size;
                        let writes = match self.parity {
                            Some(geo) => self.check_parity(&geo, len),
                            None => self.check_mirrors(len),
                        };
                        if !writes.is_empty() {
                            let block = self.rows.block(self.stripe);
                            for (m, from_out) in writes {
                                let src = if from_out {
                                    &mut self.out
                                } else {
                                    &mut self.bufs[0]
                                };
                                let req = IoRequest {
                                    op: IoOp::Write,
                                    offset_blocks: block,
                                    num_blocks: n,
                                    sg: sg::of(src, 0, len),
                                    tag: m as u64,
                                };
                                if let Err(SubmitError::Busy(_)) = self.channels[m].submit(req) {
                                    return self
                                        .stop(Some(format!("member {m} refused a repair write")));
                                }
                                self.pending += 1;
                            }
                            self.step = Step::Writing;
                            continue;
                        }
                    }
                    let done = self.rows.len(self.stripe) as usize * self.block_size;
                    self.progress
                        .bytes
                        .fetch_add(done as u64, Ordering::Relaxed);
                    self.stripe += 1;
                    self.progress.cursor.store(self.stripe, Ordering::SeqCst);
                    self.locks.unlock(self.stripe - 1);
                    self.step = Step::Lock;
                    return PollState::Busy;
                }
            }
        }
    }
}
