//! The rebuild of one member (or a hot replacement's copy) row by row.

use super::*;

/// Clean rows a re-add's rebuild skips in one poll at most.
const SKIP_BATCH: usize = 4096;

/// The reactor-side rebuild state machine: each row of the new member is
/// the XOR of the same row of the `sources` (all other members for RAID5,
/// one in-sync mirror for RAID1, where the XOR is a copy). `slot` is the
/// member rebuilt, or for a hot replacement's copy the new device (after
/// the members), whose one source is the slot it takes over.
pub struct Rebuilder {
    walk: RowWalk,
    sources: Vec<usize>,
    slot: usize,
    /// md's re-add: the target is the member's own device, which missed
    /// only the writes the bitmap marks; other rows are skipped.
    only: Option<Arc<crate::raid::bitmap::Bitmap>>,
}

impl Rebuilder {
    /// Rebuild `slot` over `rows`; channels come with `retarget`.
    pub fn new(
        rows: Rows,
        slot: usize,
        locks: Arc<StripeLocks>,
        progress: Arc<RebuildProgress>,
    ) -> Rebuilder {
        Rebuilder {
            walk: RowWalk::new(rows, locks, progress),
            sources: Vec::new(),
            slot,
            only: None,
        }
    }

    /// Copy only the rows `bitmap` marks (md's re-add of a member's own
    /// device; the bitmap keeps its bits while the volume is degraded).
    pub fn only_dirty(mut self, bitmap: Arc<crate::raid::bitmap::Bitmap>) -> Rebuilder {
        self.only = Some(bitmap);
        self
    }

    /// Yield to the guest IO `activity` counts (see `may_go`).
    pub fn watching(mut self, activity: Arc<crate::raid::members::Activity>) -> Rebuilder {
        self.walk.activity = Some(activity);
        self
    }

    /// Read `sources` of `members` (and write the target: slot, or
    /// `extra` after the members) from the next row on.
    pub fn retarget(
        &mut self,
        members: Arc<Vec<Member>>,
        sources: Vec<usize>,
        extra: Option<&Arc<dyn bdev::BlockDevice>>,
        events: FailureSink,
    ) -> Result<(), Retarget> {
        let mut used = sources.clone();
        if extra.is_none() {
            used.push(self.slot);
        }
        self.walk.retarget(members, &used, extra, events)?;
        self.sources = sources;
        Ok(())
    }

    /// Which run this is (see [`Run`]).
    pub fn run(&self) -> Run {
        Run::of(&self.walk.progress.cursor)
    }

    fn abort(&mut self, why: String) -> PollState {
        tracing::error!(slot = self.slot, error = %why, "rebuild stopped");
        self.walk.stop(Some(why.clone()));
        self.walk
            .events
            .event(Event::RebuildAborted(self.slot, self.run(), why));
        self.poll()
    }

    /// One step; run as a reactor poller.
    pub fn poll(&mut self) -> PollState {
        let mut skipped = 0;
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
                        // Whoever cancelled it knows: no event.
                        w.stop(Some("cancelled".into()));
                        continue;
                    }
                    if w.done() {
                        w.progress.finished.store(true, Ordering::SeqCst);
                        let run = Run::of(&w.progress.cursor);
                        w.events.event(Event::Rebuilt(self.slot, run));
                        return PollState::Done;
                    }
                    if w.blocked {
                        return PollState::Idle;
                    }
                    if let Some(b) = &self.only {
                        // Under the row's lock: a write to the row either
                        // began before (its count or bit shows here) or
                        // waits for the lock and then finds the cursor
                        // past the row (so the target gets it too).
                        if !w.locks.try_lock(w.row) {
                            return PollState::Busy;
                        }
                        if !b.row_dirty(w.row) {
                            w.skip();
                            skipped += 1;
                            if skipped >= SKIP_BATCH {
                                // Let the reactor serve others between
                                // long clean stretches.
                                return PollState::Busy;
                            }
                            continue;
                        }
                        w.locks.unlock(w.row);
                    }
                    if !w.may_go() || !w.read(&self.sources) {
                        return PollState::Busy;
                    }
                }
                Step::Reading | Step::Writing => {
                    let mut used = self.sources.clone();
                    used.push(self.slot);
                    match w.collect() {
                        None => return PollState::Busy,
                        Some(Ok(())) => {}
                        Some(Err((m, Some(e)))) if m == w.members.len() => {
                            // The replacement's new device failed: the
                            // slot keeps its device, the copy ends.
                            w.locks.unlock(w.row);
                            w.step = Step::Lock;
                            return self
                                .abort(format!("the replacement device failed a write: {e}"));
                        }
                        Some(Err((m, e))) => {
                            if let Some(why) = e.and_then(|e| w.unreadable(m, e)) {
                                return self.abort(why);
                            }
                            return w.row_failed(m, &used);
                        }
                    }
                    if w.any_gone(&used) {
                        w.drop_row();
                        return PollState::Idle;
                    }
                    if matches!(w.step, Step::Reading) {
                        let (_, len) = w.size();
                        let srcs: Vec<&[u8]> =
                            self.sources.iter().map(|&m| &w.bufs[m][..len]).collect();
                        xor_gen(&mut w.out[..len], &srcs);
                        w.write(self.slot, Source::Out);
                        continue;
                    }
                    // Written: move the cursor past the row, then unlock.
                    w.advance();
                    return PollState::Busy;
                }
            }
        }
    }

    /// Its row walk (see `worker`).
    pub fn walk(&self) -> &RowWalk {
        &self.walk
    }

    /// Stop at once with `why` (between rows: nothing in flight).
    pub fn stop(&mut self, why: String) {
        self.walk.stop(Some(why));
    }
}
