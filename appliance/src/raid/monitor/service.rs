//! A volume going into service ([`Monitor::open`]: superblocks dirty,
//! an interrupted rebuild resumed, the resync an unclean stop owes) and
//! out of it ([`Monitor::close`]: background work stopped, members
//! flushed, "clean" recorded).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{lock, Change, Monitor, MonitorState, OpError};
use crate::raid::members::MemberState;
use crate::raid::rebuild::RebuildProgress;

impl Monitor {
    /// The volume goes into service: its superblocks say "dirty" until
    /// [`close`](Self::close), so a crash in between is noticed at the
    /// next assembly. A rebuild a restart interrupted goes on from its
    /// checkpoint; if the last shutdown was not clean, parity is
    /// resynchronised (md's resync: a repairing scrub, in the background,
    /// IO allowed).
    pub fn open(&self, was_clean: bool) -> Result<Option<Arc<RebuildProgress>>, OpError> {
        let mut s = self.inner.change_lock()?;
        // Where a resync a clean stop cut short left off; from now on,
        // in use, any row may be torn by a crash.
        let mut from = 0;
        {
            let mut rec = lock(&self.inner.meta);
            if let Some(r) = rec.as_mut() {
                from = std::mem::take(&mut r.meta.template.resync_from);
                r.meta
                    .record(s.current.as_ref(), false)
                    .map_err(|e| OpError::Internal(e.to_string()))?;
                r.device = s.current.clone();
                r.clean = false;
            }
        }
        // Said whatever starts below (a rebuild makes what it copies of
        // those stripes permanent).
        let degraded = s.current.scrub_members().is_err();
        if !was_clean && degraded {
            // A degraded RAID5 (or a mirror down to one) after a crash may
            // hold stripes whose parity does not match their data; nothing
            // can tell which. Say so.
            tracing::warn!(volume = self.inner.volume.name(), "unclean shutdown of a degraded volume: stripes written at the crash may be inconsistent");
        }
        if s.current.member_set().rebuilding.is_some() {
            s.resync_owed = !was_clean;
            owe_resync(&s);
            if let Some(p) = self.start_job(&mut s, Change::ResumeRebuild)? {
                tracing::info!(
                    volume = self.inner.volume.name(),
                    slot = p.slot,
                    from = p.cursor.load(Ordering::SeqCst),
                    "rebuild resumed"
                );
                return Ok(Some(p));
            }
        }
        if s.current.member_set().rebuilding.is_none()
            && !s.spares.is_empty()
            && s.current.member_states().contains(&MemberState::Failed)
        {
            // A slot failed (or its device is missing) and a spare waits:
            // md starts recovery onto it at assembly, not at the next
            // change. The copy rewrites the slot's every row from the
            // others (a RAID5's parity then matches its data, a mirror
            // copied from its one source is whole); only mirrors with two
            // sources or more left may still differ after a crash, and
            // are owed a resync once it is done.
            let sources = s
                .current
                .member_states()
                .iter()
                .filter(|&&st| st == MemberState::InSync)
                .count();
            s.resync_owed = !was_clean && s.current.parity_geometry().is_none() && sources >= 2;
            owe_resync(&s);
            match self.start_job(&mut s, Change::UseSpare) {
                Ok(Some(p)) => {
                    tracing::info!(
                        volume = self.inner.volume.name(),
                        slot = p.slot,
                        "a spare takes a failed slot"
                    );
                    return Ok(Some(p));
                }
                Ok(None) => {}
                // The volume starts degraded, as before the spare was
                // looked at (a later change tries again).
                Err(e) => {
                    tracing::warn!(volume = self.inner.volume.name(), error = %e, "no spare taken at the start")
                }
            }
            s.resync_owed = false;
        }
        if was_clean {
            return Ok(None);
        }
        if degraded {
            // Nothing to resync from (said above).
            return Ok(None);
        }
        let bitmap = s.current.member_set().bitmap.clone();
        if let Some(b) = &bitmap {
            let dirty = b.dirty_regions();
            if dirty == 0 {
                tracing::info!(
                    volume = self.inner.volume.name(),
                    "unclean shutdown, but the write-intent bitmap marks no region: no resync needed"
                );
                b.thaw();
                return Ok(None);
            }
            tracing::warn!(
                volume = self.inner.volume.name(),
                regions = dirty,
                of = b.bits(),
                "not recorded clean (an unclean shutdown, or a new volume on members that may hold old data): resynchronising the regions the write-intent bitmap marks"
            );
            // Its bits stay (frozen at assembly) until the resync has
            // covered them.
        } else {
            tracing::warn!(
                volume = self.inner.volume.name(),
                from_row = from,
                "not recorded clean (an unclean shutdown, or a new volume on members that may hold old data): resynchronising parity"
            );
        }
        if from > 0 {
            tracing::info!(
                volume = self.inner.volume.name(),
                row = from,
                "the resync goes on from where a clean stop left it (md's resync_offset)"
            );
        }
        let started = self.start_job(&mut s, Change::Scrub(true, bitmap, from))?;
        s.resync = started.clone();
        Ok(started)
    }

    /// Clean shutdown: stop background work and record "clean" in the
    /// superblocks. Call with no IO running (after the exports are gone).
    /// No change is made afterwards.
    pub fn close(&self) -> Result<(), OpError> {
        self.close_as(false)
    }

    /// [`close`](Self::close) for the volume's delete: changes asked for
    /// meanwhile are told it is gone.
    pub fn close_deleted(&self) -> Result<(), OpError> {
        self.close_as(true)
    }

    fn close_as(&self, deleted: bool) -> Result<(), OpError> {
        if deleted {
            self.inner.deleted.store(true, Ordering::SeqCst);
        }
        let mut s = lock(&self.inner.state);
        if s.closed {
            return Ok(());
        }
        s.closed = true;
        lock(&self.inner.pending).clear();
        if let Some(p) = s.rebuild.as_ref() {
            p.cancel.store(true, Ordering::SeqCst);
            crate::raid::worker::wake(&self.inner.set);
            let t = Instant::now();
            while !p.is_finished() && t.elapsed() < self.inner.timeout() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // The bitmap thread ends first: nothing is written after "clean".
        s.bitmap = None;
        s.checkpointer = None;
        // A resync cut short leaves the volume dirty, as it is; any other
        // background work stops at a row and leaves it clean.
        let resync_done = !s.resync_owed
            && s.resync
                .as_ref()
                .is_none_or(|p| p.is_finished() && p.error().is_none());
        // What the members hold in their caches is on their media before
        // any superblock says "clean" (md flushes first too): a power cut
        // between two members' records left one a step behind, taken as
        // current, and a stripe written before the stop with its parity
        // still in a cache was trusted clean (audit). A member that cannot
        // flush leaves the volume dirty: the next start resyncs.
        let mut flushed = true;
        let set = s.current.member_set();
        for (slot, m) in set.members.iter().enumerate() {
            if m.recorded_state() == MemberState::Failed {
                continue;
            }
            if let Err(e) = crate::raid::metaio::sync(m.dev.as_ref(), bdev::IoOp::Flush, 0, &mut [])
            {
                tracing::warn!(volume = self.inner.volume.name(), device = %m.dev.info().name, error = %e, "flush before a clean stop: the member is failed, the next start resyncs the whole volume");
                // Failed, as every other flush's caller fails its device
                // (recorded below): what its cache lost must not be taken
                // for in sync, nor be the reference a resync copies
                // (review). The last one holding data is kept.
                set.failures.report(slot, m, bdev::IoError::DeviceFailed);
                flushed = false;
            }
        }
        if !flushed {
            // Whatever a cache lost may lie anywhere, below a resync's
            // cursor or in a region the bitmap cleared: all of it is owed.
            if let Some(b) = &set.bitmap {
                b.load(&b.all_dirty());
                b.freeze();
                b.rewrite();
            }
        }
        let resync_done = resync_done && flushed;
        let mut rec = lock(&self.inner.meta);
        if let Some(r) = rec.as_mut() {
            // md's resync_offset: the rows the resync got through are in
            // sync, and stay so with no IO after this.
            r.meta.template.resync_from = match (&s.resync, resync_done) {
                (Some(p), false) if flushed => p.cursor.load(Ordering::SeqCst),
                _ => 0,
            };
            r.meta
                .record(s.current.as_ref(), resync_done)
                .map_err(|e| OpError::Internal(e.to_string()))?;
            r.device = s.current.clone();
            r.clean = resync_done;
            // md counts a spare only if its superblock is as current.
            crate::raid::assembly::write_spare_superblocks(&r.meta.template, &s.spares);
        }
        Ok(())
    }
}

/// A resync is owed once the rebuild starting now is done: until it has
/// run, mirrors torn by the crash may differ and a RAID5 stripe's parity
/// may not match its data. Reads go to the reference mirror meanwhile
/// and writes compute parity from the data (as for a repair cut short;
/// the resync's end clears it): reads balanced over both versions of a
/// torn block returned each in turn, and a later resync undid what the
/// guest had read (audit).
fn owe_resync(s: &MonitorState) {
    if s.resync_owed {
        let set = s.current.member_set();
        set.pin_reference(false);
        set.scrubbing.store(true, Ordering::SeqCst);
    }
}
