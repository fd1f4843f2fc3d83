//! The scrub: md's check and repair, and the resync of what a crash may
//! have torn, row by row.

use super::*;

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
    /// The members read, the first being a mirror repair's reference.
    all: Vec<usize>,
    repair: bool,
    /// A resync of the regions a write-intent bitmap marks: the bits (as
    /// words) and rows per bit. The bitmap is thawed when it succeeds.
    only: Option<(Vec<u64>, u64, Arc<crate::raid::bitmap::Bitmap>)>,
    /// A repair of every row: the volume's bitmap, thawed when it
    /// succeeds (it covered whatever the bitmap kept marked).
    thaw: Option<Arc<crate::raid::bitmap::Bitmap>>,
    /// Mismatches found in the row being walked, counted once it is done
    /// (a row read again after a refused repair write counted twice).
    row_bad: u64,
}

impl Scrubber {
    /// Scrub `rows`; channels come with `retarget`.
    pub fn new(
        rows: Rows,
        parity: Option<Raid5Geometry>,
        locks: Arc<StripeLocks>,
        progress: Arc<RebuildProgress>,
        repair: bool,
    ) -> Scrubber {
        Scrubber {
            walk: RowWalk::new(rows, locks, progress),
            parity,
            flag: None,
            all: Vec::new(),
            repair,
            only: None,
            thaw: None,
            row_bad: 0,
        }
    }

    /// Read and compare `read` of `members` (slots; the in-sync mirrors
    /// of a degraded mirror), the first being the reference a repair
    /// copies, from the next row on.
    pub fn retarget(
        &mut self,
        members: Arc<Vec<Member>>,
        read: Vec<usize>,
        events: FailureSink,
    ) -> Result<(), Retarget> {
        self.walk.retarget(members, &read, None, events)?;
        self.all = read;
        Ok(())
    }

    /// A whole repair: thaw `bitmap` when it succeeds. (A repair the
    /// operator starts is taken as the resync owed after a crash or a
    /// creation; without this, the bitmap it left frozen kept every
    /// region marked until a clean restart.)
    pub fn thawing_when_done(mut self, bitmap: Arc<crate::raid::bitmap::Bitmap>) -> Scrubber {
        self.thaw = Some(bitmap);
        self
    }

    /// Walk only the regions `bitmap` marks dirty now, and let it clear
    /// them once every one was walked.
    pub fn only_dirty(mut self, bitmap: Arc<crate::raid::bitmap::Bitmap>) -> Scrubber {
        self.only = Some((bitmap.snapshot(), bitmap.rows_per_bit(), bitmap));
        self
    }

    /// Its row walk (see `worker`).
    pub fn walk(&self) -> &RowWalk {
        &self.walk
    }

    /// Move the walk past rows outside the dirty regions.
    fn skip_clean(&mut self) {
        let Some((bits, rpb, _)) = &self.only else {
            return;
        };
        let w = &mut self.walk;
        let from = w.row;
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
        w.progress.skip_rows(w.row - from);
    }

    /// Yield to the guest IO `activity` counts (see `may_go`).
    pub fn watching(mut self, activity: Arc<crate::raid::members::Activity>) -> Scrubber {
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
        let all: Vec<&[u8]> = self.all.iter().map(|&m| &w.bufs[m][..len]).collect();
        xor_gen(&mut w.out[..len], &all);
        let bs = w.rows.block_size;
        let bad = w.out[..len]
            .chunks_exact(bs)
            .filter(|b| b.iter().any(|&x| x != 0))
            .count() as u64;
        self.row_bad = bad;
        if bad == 0 || !self.repair {
            return Vec::new();
        }
        let parity = geo.parity_member(w.row) as usize;
        let data: Vec<&[u8]> = self
            .all
            .iter()
            .filter(|&&m| m != parity)
            .map(|&m| &w.bufs[m][..len])
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
        self.row_bad = bad;
        if bad == 0 || !self.repair {
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
                    // A repair cut short (cancelled, a member failing, a
                    // rebuild taking a spare first) leaves mirrors that may
                    // still differ where it had not been: reads keep going
                    // to the reference there until a repair finishes (md
                    // keeps reading the first mirror while a resync is
                    // owed), rather than to whichever is least busy, which
                    // made what a guest reads change with no write.
                    if let Some(f) = &self.flag {
                        if !self.repair || self.walk.progress.error().is_none() {
                            f.store(false, Ordering::SeqCst);
                        }
                    }
                    if self.walk.progress.error().is_none() {
                        let only = self.only.as_ref().map(|(_, _, b)| b);
                        if let Some(b) = only.or(self.thaw.as_ref()) {
                            b.thaw();
                        }
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
                    if self.walk.blocked {
                        return PollState::Idle;
                    }
                    if !self.walk.may_go() || !self.walk.read(&self.all) {
                        return PollState::Busy;
                    }
                }
                Step::Reading | Step::Writing => {
                    match self.walk.collect() {
                        None => return PollState::Busy,
                        Some(Ok(())) => {}
                        Some(Err((m, e))) => {
                            if let Some(why) = e.and_then(|e| self.walk.unreadable(m, e)) {
                                return self.stop(Some(why));
                            }
                            return self.walk.row_failed(m, &self.all);
                        }
                    }
                    // A mirror that failed meanwhile (on any core) may miss
                    // a write the row lock let through before the scrub
                    // took it: comparing or copying it now could undo that
                    // write on the others. The next generation decides.
                    if self.walk.any_gone(&self.all) {
                        self.walk.drop_row();
                        return PollState::Idle;
                    }
                    if matches!(self.walk.step, Step::Reading) {
                        let (_, len) = self.walk.size();
                        let writes = match self.parity {
                            Some(geo) => self.check_parity(&geo, len),
                            None => self.check_mirrors(len),
                        };
                        if !writes.is_empty() {
                            for (m, from) in writes {
                                self.walk.write(m, from);
                            }
                            continue;
                        }
                    }
                    self.walk
                        .progress
                        .mismatches
                        .fetch_add(std::mem::take(&mut self.row_bad), Ordering::Relaxed);
                    self.walk.advance();
                    return PollState::Busy;
                }
            }
        }
    }

    /// Stop at once with `why` (between rows: nothing in flight).
    pub fn stop_now(&mut self, why: String) {
        self.walk.stop(Some(why));
    }
}
