//! The one path every change of a RAID volume takes (md's "suspend, lock,
//! change, unlock, resume"):
//!
//! 1. plan: validate the change against the current generation and work
//!    out the next one; nothing is touched;
//! 2. suspend the volume: guest IO and background work (rebuild, scrub,
//!    replacement copy, journal reclaim and checkpoint flushes all go
//!    through its gate) drain, and writes still going to write-mostly
//!    members in the background finish; on a deadline, nothing happened;
//! 3. claim the device roles it needs and spawn its background work,
//!    dormant; either refusing undoes the other;
//! 4. persist: erase the old superblock of a device that becomes a spare,
//!    flush what must be durable first, write the superblocks and the
//!    journal superblock; set what the IO path reads through shared flags;
//!    write the state file (the superblocks win at a restart, so a crash
//!    in between is safe);
//! 5. hand the bitmap its new members, publish the generation, arm the
//!    background work;
//! 6. resume; then start or stop the helper threads, settle the roles of
//!    devices the change freed, publish the view for readers.
//!
//! A member failure reported by the IO path is the one fact recorded
//! before its transaction (by the monitor's recorder), because writes
//! wait for that record; see `members::FailureLedger`.

use std::collections::VecDeque;

use super::change::{self, After, Change};
use super::monitor::{start_bitmap, Inner, MonitorState, OpError};
use super::worker;
use crate::volume::VolumeConfig;

fn quiesce_error(e: poller::QuiesceError) -> OpError {
    match e {
        e if e.is_deadline() => OpError::DeadlineExceeded(e.to_string()),
        poller::QuiesceError::NotFound(_) => OpError::Gone(e.to_string()),
        // The daemon is stopping: the volume is still there.
        poller::QuiesceError::Stopped(_) => OpError::Stopped(e.to_string()),
        e => OpError::Internal(e.to_string()),
    }
}

impl Inner {
    /// Carry out `change`, then the changes it leads to (a failure that a
    /// spare can take over, a spare added to a degraded volume), each its
    /// own transaction. A follow-up that cannot quiesce in time is left
    /// to the monitor thread, which tries it again.
    pub(crate) fn apply(&self, s: &mut MonitorState, change: Change) -> Result<(), OpError> {
        let mut queue = VecDeque::new();
        let follow = self.commit(s, &change)?;
        queue.extend(follow);
        while let Some(c) = queue.pop_front() {
            match self.commit(s, &c) {
                Ok(follow) => {
                    for f in follow.into_iter().rev() {
                        queue.push_front(f);
                    }
                }
                Err(OpError::DeadlineExceeded(e)) => {
                    tracing::warn!(volume = self.volume.name(), change = ?c, error = %e, "follow-up change deferred");
                    self.defer(c);
                }
                // Deleted meanwhile: nothing left to follow up.
                Err(OpError::Gone(e)) => {
                    tracing::info!(volume = self.volume.name(), change = ?c, error = %e, "follow-up change dropped: the volume is gone");
                }
                Err(e) => {
                    tracing::error!(volume = self.volume.name(), change = ?c, error = %e, "follow-up change failed");
                }
            }
        }
        Ok(())
    }

    /// One transaction; returns the changes to make next.
    fn commit(&self, s: &mut MonitorState, change: &Change) -> Result<Vec<Change>, OpError> {
        let template = self
            .meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|r| r.meta.template.clone());
        let plan = change::plan(s, template.as_ref(), change.clone())?;
        if !plan.quiesce {
            return Ok(plan.follow);
        }
        // A device the change erases (a new spare or replacement) is read
        // first, while guest IO goes on: one that does not answer is
        // refused now, not after holding the suspended volume for the
        // metadata IO's time-out (audit). The erase reads it again.
        for d in &plan.erase {
            if let Err(e) = super::assembly::read_superblock(d.as_ref()) {
                return Err(OpError::FailedPrecondition(format!(
                    "{} cannot take the role: {e}",
                    d.info().name
                )));
            }
        }
        let timeout = self.timeout();
        // The suspend waits for writes still going to write-mostly members
        // in the background too: they are IO of this generation.
        let guard = self.volume.suspend(timeout).map_err(quiesce_error)?;
        if !revalidate(s, change)? {
            // Overtaken while the volume drained: nothing to do.
            return Ok(Vec::new());
        }
        let hooks = self.hooks();
        let mut claimed: Vec<(String, Option<change::Role>)> = Vec::new();
        let undo = |claimed: &[(String, Option<change::Role>)]| {
            for (d, before) in claimed {
                hooks.set_role(d, *before);
            }
        };
        for (dev, role, from) in &plan.claims {
            if let Err(e) = hooks.claim(dev, *role, *from) {
                undo(&claimed);
                return Err(e);
            }
            claimed.push((dev.info().name.clone(), *from));
        }
        let device = plan.next.clone().unwrap_or_else(|| s.current.clone());
        let started = match &plan.start {
            Some((job, dirty)) => {
                match worker::spawn(
                    &self.set,
                    self.set.len() - 1,
                    &self.volume,
                    *job,
                    &device,
                    dirty.clone(),
                    timeout,
                ) {
                    Ok(x) => Some(x),
                    Err(e) => {
                        undo(&claimed);
                        // Deleted meanwhile: its reactors' gates are gone.
                        if self.volume.quiesce().is_removed() {
                            return Err(OpError::Gone(e));
                        }
                        return Err(OpError::Internal(e));
                    }
                }
            }
            None => None,
        };
        // Persist. Anything refused from here leaves the claims undone and
        // the worker unarmed (it ends without a row).
        for d in &plan.erase {
            if let Err(e) = super::assembly::erase_superblock(d.as_ref()) {
                undo(&claimed);
                return Err(OpError::FailedPrecondition(format!(
                    "{} cannot take the role: {e}",
                    d.info().name
                )));
            }
        }
        if let Some(b) = &plan.new_bitmap {
            if let Err(e) = super::assembly::write_bitmap(device.as_ref(), b) {
                undo(&claimed);
                return Err(OpError::Internal(e.to_string()));
            }
        }
        for d in &plan.flush_first {
            if let Err(e) = super::metaio::sync(d.as_ref(), bdev::IoOp::Flush, 0, &mut []) {
                undo(&claimed);
                return Err(flush_failed(s.current.member_set(), d, e));
            }
        }
        if plan.record {
            let mut rec = self.meta.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = rec.as_mut() {
                let mut meta = r.meta.clone();
                if let Some(edit) = plan.template {
                    edit(&mut meta.template);
                }
                if let Some(slot) = plan.new_uuid {
                    meta.member_uuids[slot] = *uuid::Uuid::new_v4().as_bytes();
                }
                // A volume in service is dirty on disk (only a clean stop
                // records it clean).
                if let Err(e) = meta.record(device.as_ref(), false) {
                    undo(&claimed);
                    return Err(OpError::Internal(e.to_string()));
                }
                r.meta = meta;
                r.device = device.clone();
                r.clean = false;
            }
        }
        if let Some((j, mode)) = &plan.journal_super {
            if let Err(e) = j.write_super_mode(*mode) {
                undo(&claimed);
                return Err(OpError::Internal(format!("journal superblock: {e}")));
            }
        }
        let mut view = s.published();
        view.device = device.clone();
        if let Some(sp) = &plan.spares {
            view.spares = sp.clone();
        }
        if let Some((p, _)) = &started {
            view.rebuild = Some(p.clone());
        }
        // Publish: settings first, so the state file says them too.
        for st in &plan.settings {
            st.apply();
        }
        let saved = hooks.persist(&view.snapshot(0, 0));
        if let Some(b) = &device.member_set().bitmap {
            // Inside the suspend: a device leaving the volume gets no
            // bitmap write once it is out.
            b.set_members(super::assembly::live_members(device.as_ref()));
            b.hold_for(&device.member_set().members, &device.member_set().failures);
            // A device that just joined gets the bitmap now, not at the
            // next bit change: until then its bitmap block is whatever an
            // earlier life left there, which md would read.
            let (ok, errors) = b.rewrite();
            if ok == 0 && !errors.is_empty() {
                tracing::warn!(errors = ?errors, "write-intent bitmap not rewritten after the change");
            }
        }
        if let Some(next) = &plan.next {
            if let Err(e) = self
                .volume
                .quiesce()
                .publish(&guard, VolumeConfig::raid(next.clone()))
            {
                // Only a volume removed meanwhile (deleted) refuses the
                // publish: it never runs again. What the close records is
                // what the superblocks (and the state file) now say: put
                // back, the close recorded the old generation over them,
                // and a replaced member's old device claimed its slot
                // beside the new one: the volume assembled no more.
                undo(&claimed);
                s.current = device;
                if let Some(sp) = plan.spares {
                    s.spares = sp;
                }
                return Err(quiesce_error(e));
            }
        }
        if let Some((_, arming)) = &started {
            arming.arm();
        }
        drop(guard);
        // The volume runs the new generation.
        s.current = device;
        if let Some(sp) = plan.spares {
            s.spares = sp;
        }
        if let Some((p, _)) = started {
            // The resync a resumed rebuild owed: the volume is clean only
            // once it has finished (as an unclean start's own resync).
            if matches!(change, Change::Scrub(true, ..)) && s.resync_pending() {
                s.resync = Some(p.clone());
                s.resync_owed = false;
            }
            s.started(p);
        }
        for a in plan.after {
            match a {
                After::StartBitmap(b) => s.bitmap = Some(start_bitmap(self.volume.name(), b)),
                After::StopBitmap => s.bitmap = None,
                After::ThawBitmap => {
                    if let Some(b) = &s.current.member_set().bitmap {
                        b.thaw();
                    }
                }
                After::StartCheckpointer(j) => {
                    s.checkpointer =
                        Some(super::journal::Checkpointer::start(j, self.volume.clone()))
                }
                After::StopCheckpointer => s.checkpointer = None,
                After::GiveUp(run, why) => {
                    if let Some(p) = s.rebuild.as_ref().filter(|p| run.is(&p.cursor)) {
                        p.give_up(&why);
                    }
                }
            }
        }
        for (dev, role) in &plan.roles_after {
            hooks.set_role(dev, *role);
        }
        self.publish_view(s);
        tracing::info!(volume = self.volume.name(), change = %plan.what, "volume changed");
        if let Err(e) = saved {
            tracing::error!(volume = self.volume.name(), error = %e, "the change was made but saving the state failed");
        }
        Ok(plan.follow)
    }
}

/// A device the change had to flush first failed: it is a failed member
/// (or a failed replacement) from now on, reported as an IO failure would
/// be, and the change is refused; the failure's own change follows.
pub(crate) fn flush_failed(
    set: &super::members::MemberSet,
    dev: &std::sync::Arc<dyn bdev::BlockDevice>,
    e: super::RaidError,
) -> OpError {
    use super::members::device_id;
    let id = device_id(dev);
    if let Some((slot, m)) = set
        .members
        .iter()
        .enumerate()
        .find(|(_, m)| device_id(&m.dev) == id)
    {
        set.failures.report(slot, m, bdev::IoError::DeviceFailed);
    } else if let Some(r) = set.replacing.as_ref().filter(|r| device_id(&r.dev) == id) {
        if !r.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            set.failures.event(super::members::Event::RebuildAborted(
                set.members.len(),
                super::members::Run::of(&r.cursor),
                format!("the replacement device failed a flush: {e}"),
            ));
        }
    }
    OpError::FailedPrecondition(format!(
        "{} failed its flush ({e}); it is failed",
        dev.info().name
    ))
}

/// What can change between planning and the suspend, checked again once
/// nothing is in flight: an error refuses the change, `false` says it no
/// longer applies (and nothing is done).
fn revalidate(s: &MonitorState, change: &Change) -> Result<bool, OpError> {
    match change {
        Change::SetJournal(None) => {
            if let Some(j) = s.current.journal() {
                let c = j.cache();
                if !c.is_empty() || c.pending() > 0 {
                    return Err(OpError::FailedPrecondition(format!(
                        "the journal is write-through now, but {} acknowledged blocks are still only in its cache; retry the removal once they have drained",
                        c.len() + c.pending()
                    )));
                }
            }
        }
        // Another member may have failed in the IO path while the volume
        // drained (a slow drain is often that member dying): the
        // operator's fail is checked again.
        Change::Fail {
            slot,
            by_operator: true,
            ..
        } => {
            if let Some(why) = super::change::fail_would_lose_data(
                s.current.member_set(),
                *slot,
                s.current.max_failures(),
            ) {
                return Err(OpError::FailedPrecondition(why));
            }
        }
        // A member may have failed while the volume drained: no bitmap
        // that would count it re-addable (see `failing_unrecorded`).
        Change::SetBitmap(Some(_)) if super::change::failing_unrecorded(s.current.member_set()) => {
            return Err(OpError::FailedPrecondition(
                super::change::FAILING_UNRECORDED.into(),
            ));
        }
        // The journal may have failed while the volume drained: a switch
        // to write-back would be written to its superblock and not made.
        Change::JournalMode(_) if s.current.journal().is_some_and(|j| j.has_failed()) => {
            return Err(OpError::FailedPrecondition(
                "the journal device has failed".into(),
            ));
        }
        // A member may have failed in the IO path while the volume drained:
        // md rebuilds first (see the plan), and the copy would start on a
        // degraded volume (audit).
        Change::ReplaceStart(..) if super::change::failing_unrecorded(s.current.member_set()) => {
            return Err(OpError::FailedPrecondition(
                "the volume is degraded: rebuild it first (add a spare), then replace members"
                    .into(),
            ));
        }
        // A member may have gone while the volume drained.
        Change::Scrub(..) => {
            s.current
                .scrub_members()
                .map_err(OpError::FailedPrecondition)?;
        }
        // A write may have failed on the new device while the volume
        // drained (and its abort is on the way).
        Change::ReplaceDone(run)
            if run
                .replacement(s.current.member_set())
                .is_none_or(|r| r.failed.load(std::sync::atomic::Ordering::SeqCst)) =>
        {
            return Ok(false);
        }
        _ => {}
    }
    Ok(true)
}
