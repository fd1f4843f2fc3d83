//! Rebuild and scrub: walk a volume's rows in the background on a
//! reactor, while IO goes on.
//!
//! Each row is locked (the same lock table writes use), read from the
//! members it needs, and written where it must be: a rebuild XORs the
//! others' rows into the new member, a scrub compares and repairs. Then the
//! shared cursor moves past the row and the lock is released. IO treats a
//! member being rebuilt as valid below the cursor and missing above it, so
//! writes never race the reconstruction of the row they touch.
//!
//! A walk runs for one configuration generation at a time (see
//! `worker`): between rows it is retargeted at the generation in force,
//! and a member that goes away mid-row makes it drop the row and wait for
//! the generation that says so (md's MD_RECOVERY_INTR).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bdev::{Completion, IoChannel, IoError, IoOp, IoRequest, SubmitError};
use poller::PollState;

use super::geometry::Raid5Geometry;
use super::locks::StripeLocks;
use super::members::{Event, FailureSink, Member, Run};
use super::parity::xor_gen;
use super::sg;
use super::window::{WinBuf, Windows};

mod rebuilder;
mod scrub;

pub use rebuilder::Rebuilder;
pub use scrub::Scrubber;

/// Why background work did not move to a new generation of members.
#[derive(Debug)]
pub enum Retarget {
    /// A device had no channel for now (its queue pairs all in use, which
    /// is not a failure): the same generation is tried again. Stopping
    /// failed the healthy rebuild target.
    Again(String),
    /// The work no longer applies (or a device failed to open).
    Stop(String),
}

impl From<String> for Retarget {
    fn from(why: String) -> Retarget {
        Retarget::Stop(why)
    }
}

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
    /// The cursor when this run started (a rebuild resumed from its
    /// checkpoint, a resync from where a clean stop left it).
    from: u64,
    /// Set to stop the rebuild at the next stripe.
    pub cancel: AtomicBool,
    /// Blocks whose parity did not match (scrub).
    pub mismatches: AtomicU64,
    /// Rows this run passed over as clean (a re-add's or a bitmap
    /// resync's): no measure of its speed.
    skipped: AtomicU64,
    finished: AtomicBool,
    error: Mutex<Option<String>>,
}

impl RebuildProgress {
    /// A rebuild of `slot` over `total` stripes, starting at `cursor`.
    pub fn new(slot: usize, total: u64, cursor: Arc<AtomicU64>) -> RebuildProgress {
        RebuildProgress {
            slot,
            total,
            from: cursor.load(Ordering::SeqCst),
            cursor,
            bytes: AtomicU64::new(0),
            max_bytes_per_sec: AtomicU64::new(0),
            min_bytes_per_sec: AtomicU64::new(0),
            started: Instant::now(),
            cancel: AtomicBool::new(false),
            mismatches: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
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

    /// Estimated time left at this run's rate so far (what an earlier
    /// run did before a restart is not this run's speed: a rebuild
    /// resumed at 90 % said almost nothing was left), over the rows it
    /// copied: clean rows passed over in microseconds said a re-add that
    /// had skipped its first 90 % was nearly done (audit). At most, then:
    /// the rows left may be clean too.
    pub fn eta(&self) -> Option<Duration> {
        // Skipped rows are counted after the cursor passes them: read
        // first, they are never more than the cursor says (review).
        let skipped = self.skipped.load(Ordering::SeqCst);
        let cursor = self.cursor.load(Ordering::SeqCst).min(self.total);
        let done = cursor
            .checked_sub(self.from)?
            .checked_sub(skipped)
            .filter(|&d| d > 0)?;
        let spent = self.started.elapsed().as_secs_f64();
        Some(Duration::from_secs_f64(
            spent * (self.total - cursor) as f64 / done as f64,
        ))
    }

    /// `n` rows passed over as clean.
    pub(crate) fn skip_rows(&self, n: u64) {
        self.skipped.fetch_add(n, Ordering::SeqCst);
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

    /// The run was given up after it had ended (a replacement whose new
    /// device failed its last flush) or while it ran: it says why, unless
    /// it said so already.
    pub(crate) fn give_up(&self, why: &str) {
        self.error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| why.to_string());
    }

    /// Why it stopped, if it failed.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod progress_tests {
    use super::*;

    /// From an audit: the time this run spent was divided by the fraction
    /// done since the volume was made, a resumed run's earlier part
    /// included.
    #[test]
    fn a_resumed_run_has_no_eta_until_it_has_done_a_row_itself() {
        let p = RebuildProgress::new(0, 100, Arc::new(AtomicU64::new(90)));
        assert_eq!(p.eta(), None);
        std::thread::sleep(Duration::from_millis(20));
        p.cursor.store(91, Ordering::SeqCst);
        // Nine rows left at this run's one row per >= 20 ms.
        assert!(p.eta().unwrap() >= Duration::from_millis(9 * 20));
    }

    /// From an audit: rows passed over as clean counted as copied.
    #[test]
    fn rows_passed_over_as_clean_say_nothing_of_the_speed() {
        let p = RebuildProgress::new(0, 100, Arc::new(AtomicU64::new(0)));
        p.cursor.store(90, Ordering::SeqCst);
        p.skipped.store(90, Ordering::SeqCst);
        assert_eq!(p.eta(), None, "nothing copied yet");
        std::thread::sleep(Duration::from_millis(20));
        p.cursor.store(91, Ordering::SeqCst);
        assert!(p.eta().unwrap() >= Duration::from_millis(9 * 20));
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
/// The worker asks it (through [`Rebuilder::walk`] or [`Scrubber::walk`])
/// whether it is between rows, waiting for a generation, or cancelled.
pub struct RowWalk {
    rows: Rows,
    /// Channels by slot (and a replacement's new device after the
    /// members); `None` for members the walk does not use.
    channels: Vec<Option<Box<dyn IoChannel>>>,
    /// The members of the generation the channels are for.
    members: Arc<Vec<Member>>,
    events: FailureSink,
    locks: Arc<StripeLocks>,
    progress: Arc<RebuildProgress>,
    row: u64,
    step: Step,
    pending: usize,
    /// Row buffers, by slot, and the row computed for the target; from
    /// `windows`, so NVMe members DMA in place.
    bufs: Vec<WinBuf>,
    out: WinBuf,
    windows: Windows,
    comps: Vec<Completion>,
    /// A member it uses went away: no row until the next generation.
    blocked: bool,
    /// The current row cannot be finished (a request failed or was
    /// refused): the first failure, once its other requests are back.
    spoiled: Option<(usize, Option<IoError>)>,
    /// A member that failed a request but was not failed (see `kept`).
    kept: Option<usize>,
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
    fn new(rows: Rows, locks: Arc<StripeLocks>, progress: Arc<RebuildProgress>) -> RowWalk {
        let chunk = rows.blocks as usize * rows.block_size;
        let mut windows = Windows::default();
        RowWalk {
            row: progress.cursor.load(Ordering::SeqCst),
            bufs: Vec::new(),
            out: windows.take(chunk),
            windows,
            rows,
            channels: Vec::new(),
            members: Arc::new(Vec::new()),
            events: FailureSink::none(),
            locks,
            progress,
            step: Step::Lock,
            pending: 0,
            comps: Vec::new(),
            blocked: false,
            spoiled: None,
            kept: None,
            tokens: (chunk) as f64,
            refilled: Instant::now(),
            activity: None,
            seen: 0,
            busy_until: Instant::now(),
            next_look: Instant::now(),
        }
    }

    /// Use `members` (slots in `used`, and `extra` after them) from now
    /// on. Only between rows: nothing of the old channels is in flight.
    fn retarget(
        &mut self,
        members: Arc<Vec<Member>>,
        used: &[usize],
        extra: Option<&Arc<dyn bdev::BlockDevice>>,
        events: FailureSink,
    ) -> Result<(), Retarget> {
        let n = members.len() + extra.is_some() as usize;
        // The old generation's channels go first (nothing is in flight
        // between rows): each holds a queue pair of its device, and a
        // device with room for one only refused the new one for good.
        self.channels.clear();
        let mut channels: Vec<Option<Box<dyn IoChannel>>> = (0..n).map(|_| None).collect();
        let open = |d: &Arc<dyn bdev::BlockDevice>| {
            d.open_channel().map_err(|e| {
                let why = format!("opening {}: {e}", d.info().name);
                match e {
                    bdev::BdevError::Exhausted(_) => Retarget::Again(why),
                    _ => Retarget::Stop(why),
                }
            })
        };
        // A member that refuses a channel for good (its device went before
        // any IO noticed) is failed as a request failing on it would fail
        // it, and the walk waits for the generation without it: a source
        // refusing stopped the rebuild and failed its target instead, and
        // a target refusing failed its slot with no event that hands the
        // slot the next spare (audit). Only the replacement's new device
        // refusing ends the work: the slot keeps its own.
        let mut refused = false;
        for &m in used {
            let Some(member) = members.get(m) else {
                return Err(format!("no member in slot {m}").into());
            };
            match open(&member.dev) {
                Ok(ch) => channels[m] = Some(ch),
                Err(Retarget::Stop(why)) => {
                    tracing::warn!(member = m, reason = %why, "background work: a member refused a channel; it is failed");
                    events.report(m, member, IoError::DeviceFailed);
                    refused = true;
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(d) = extra {
            channels[n - 1] = Some(open(d)?);
        }
        let chunk = self.rows.blocks as usize * self.rows.block_size;
        self.bufs.resize_with(n, WinBuf::default);
        for (m, b) in self.bufs.iter_mut().enumerate() {
            if channels[m].is_some() && b.len() != chunk {
                let old = std::mem::replace(b, self.windows.take(chunk));
                self.windows.give(old);
            }
        }
        self.channels = channels;
        self.members = members;
        self.events = events;
        self.blocked = refused;
        Ok(())
    }

    /// Whether slot `m` (a member, or the extra device) was reported gone.
    fn gone(&self, m: usize) -> bool {
        self.members.get(m).is_some_and(|x| x.is_gone())
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

    /// Submit one request of the current row to `m`; `false` if `m` is
    /// gone or has no channel, or its queue refused.
    fn submit(&mut self, m: usize, op: IoOp, from: Option<Source>) -> bool {
        if self.gone(m) {
            return false;
        }
        let (n, len) = self.size();
        let buf = match from {
            None => &mut self.bufs[m],
            Some(Source::Out) => &mut self.out,
            Some(Source::Read(r)) => &mut self.bufs[r],
        };
        let req = IoRequest {
            op,
            offset_blocks: self.rows.block(self.row),
            num_blocks: n,
            sg: sg::of(buf, 0, len),
            tag: m as u64,
        };
        let Some(ch) = self.channels.get_mut(m).and_then(|c| c.as_mut()) else {
            return false;
        };
        if let Err(SubmitError::Busy(_)) = ch.submit(req) {
            return false;
        }
        self.pending += 1;
        true
    }

    /// Lock the current row and read it from `members`; false when the
    /// row is locked by someone else (try again).
    fn read(&mut self, members: &[usize]) -> bool {
        // Busy, not idle, when locked out: nothing wakes a sleeping
        // reactor when another core releases the lock.
        if !self.locks.try_lock(self.row) {
            return false;
        }
        self.step = Step::Reading;
        for &m in members {
            if !self.submit(m, IoOp::Read, None) {
                self.refused(m);
                break;
            }
        }
        true
    }

    /// Write the current row to `m` (a refusal spoils the row).
    fn write(&mut self, m: usize, from: Source) {
        self.step = Step::Writing;
        if !self.submit(m, IoOp::Write, Some(from)) {
            self.refused(m);
        }
    }

    fn poll_channels(&mut self) {
        let mut comps = std::mem::take(&mut self.comps);
        for ch in self.channels.iter_mut().flatten() {
            if ch.inflight() > 0 {
                ch.poll(&mut comps);
            }
        }
        self.comps = comps;
    }

    /// Collect completions: `None` while the step's IO is out, then
    /// `Some(Ok)` or, if a request failed or was refused, `Some(Err)` with
    /// the first (slot, error; no error for a refusal).
    fn collect(&mut self) -> Option<Result<(), (usize, Option<IoError>)>> {
        self.poll_channels();
        self.pending -= self.comps.len();
        let failure = self
            .comps
            .iter()
            .find_map(|c| c.result.err().map(|e| (c.tag as usize, e)));
        self.comps.clear();
        if let Some((m, e)) = failure {
            // Every core stops using it now; the monitor is told. Not the
            // last member in sync for a bad block (md's RAID1 rule): the
            // run stops instead (`kept`).
            if m < self.members.len() && !self.events.report_in(&self.members, m, e) {
                self.kept = Some(m);
            }
            self.spoiled.get_or_insert((m, Some(e)));
        }
        if self.pending > 0 {
            return None;
        }
        Some(match self.spoiled.take() {
            Some(f) => Err(f),
            None => Ok(()),
        })
    }

    /// Why the run stops if `m` failed a request of the row but was kept
    /// as the last member in sync (no later try of the row reads it
    /// better); `None` otherwise.
    fn unreadable(&self, m: usize, e: IoError) -> Option<String> {
        (self.kept == Some(m)).then(|| {
            format!(
                "row {} cannot be read from member {m}, the last in sync: {e}",
                self.row
            )
        })
    }

    /// A request of the row to `m` could not be sent.
    fn refused(&mut self, m: usize) {
        self.spoiled.get_or_insert((m, None));
    }

    /// The row failed at `m`: if a member went away, drop the row and
    /// wait for the next generation (`Idle`); if a queue was only full,
    /// try the row again (`Busy`).
    fn row_failed(&mut self, m: usize, used: &[usize]) -> PollState {
        if self.gone(m) || self.any_gone(used) {
            self.drop_row();
            PollState::Idle
        } else {
            self.locks.unlock(self.row);
            self.step = Step::Lock;
            PollState::Busy
        }
    }

    /// Whether any of `used` went away (reported by any core): the row
    /// just read or written may have missed a write, so it is dropped.
    fn any_gone(&self, used: &[usize]) -> bool {
        used.iter().any(|&m| self.gone(m))
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

    /// Move past the current row (locked) without copying it: its copy on
    /// the target is known good.
    fn skip(&mut self) {
        self.row += 1;
        self.progress.cursor.store(self.row, Ordering::SeqCst);
        self.progress.skip_rows(1);
        self.locks.unlock(self.row - 1);
        self.step = Step::Lock;
    }

    /// Give the current row up undone (a member went away) and wait for
    /// the generation that says so. Nothing of it is in flight.
    fn drop_row(&mut self) {
        if matches!(self.step, Step::Reading | Step::Writing) {
            self.locks.unlock(self.row);
        }
        self.step = Step::Lock;
        self.blocked = true;
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
        self.poll_channels();
        self.comps.clear();
        self.channels.iter().flatten().all(|c| c.inflight() == 0)
    }

    /// Between rows: no IO in flight, no row locked.
    pub fn at_boundary(&self) -> bool {
        matches!(self.step, Step::Lock)
    }

    /// Waiting for a new generation (a member it uses went away) and not
    /// asked to stop.
    pub fn waits_for_generation(&self) -> bool {
        self.blocked && !self.cancelled()
    }

    /// Asked to stop.
    pub fn cancelled(&self) -> bool {
        self.progress.cancel.load(Ordering::SeqCst)
    }
}
