//! The recorder thread: what must be on disk before writes waiting for it
//! are answered. A member failure goes to the superblocks of the others
//! (`members::FailureLedger`); a failed journal, once its cache has
//! drained, leaves the state file (`Raid5Channel::jheld`). Neither waits
//! for the monitor's state lock, so a change waiting for a quiesce holds
//! neither back.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{lock, Change, Inner, QUIT_POLL};
use crate::raid::members::{FailureLedger, MemberState};

/// The recorder's loop, until the monitor quits.
pub(super) fn record_failures(inner: &Inner) {
    let ledger = inner.sink.ledger().clone();
    // A failed journal to give up: looked at often while its cache
    // drains, and after an error once a second.
    let mut journal_draining = false;
    let mut journal_retry = Instant::now();
    while !inner.quit.load(Ordering::SeqCst) {
        let wait = if journal_draining {
            Duration::from_millis(2)
        } else {
            QUIT_POLL
        };
        // Member failures first: the journal's give-up does IO and takes
        // the daemon's saving lock.
        if ledger.wait_unpersisted(wait).is_some() {
            record_member_failures(inner, &ledger);
        }
        if Instant::now() >= journal_retry {
            match inner.give_up_failed_journal() {
                Ok(done) => journal_draining = !done,
                Err(e) => {
                    tracing::error!(volume = inner.volume.name(), error = %e, "giving up a failed journal; the writes made without it wait, and it is tried again each second");
                    journal_draining = false;
                    journal_retry = Instant::now() + Duration::from_secs(1);
                }
            }
        }
    }
}

/// Write the member failures reported so far to the superblocks of the
/// others, then let the writes that waited for them go.
fn record_member_failures(inner: &Inner, ledger: &FailureLedger) {
    let mut rec = lock(&inner.meta);
    let Some(r) = rec.as_mut() else {
        // No superblocks: nothing to record, nothing to wait for.
        ledger.mark_persisted(ledger.reported());
        return;
    };
    let device = r.device.clone();
    let (seq, codes) = ledger.consistent(|| {
        device
            .member_set()
            .members
            .iter()
            .map(|m| m.code())
            .collect::<Vec<u8>>()
    });
    let mut meta = r.meta.clone();
    match meta.record_codes(device.as_ref(), codes, false) {
        Ok(()) => {
            r.meta = meta;
            r.clean = false;
            // Members whose superblock failed were reported gone just
            // now: the next round records them.
            ledger.mark_persisted(seq);
        }
        Err(e) => {
            tracing::error!(volume = inner.volume.name(), error = %e, "recording a member failure");
            let live = device
                .member_set()
                .members
                .iter()
                .any(|m| m.recorded_state() != MemberState::Failed);
            if !live {
                // Nowhere left to record it: writes fail anyway.
                ledger.mark_persisted(seq);
            }
            drop(rec);
            std::thread::sleep(QUIT_POLL);
        }
    }
}

impl Inner {
    /// A journal that failed is detached once it is given up (see
    /// [`give_up_failed_journal`](Self::give_up_failed_journal)): the state
    /// file stops naming it then, and this takes it out of the volume for
    /// good.
    pub(super) fn detach_failed_journal(&self) {
        let j = lock(&self.published).device.journal();
        let Some(j) = j.filter(|j| j.has_failed() && j.given_up_recorded()) else {
            return;
        };
        let mut pending = lock(&self.pending);
        if pending
            .iter()
            .any(|c| matches!(c, Change::SetJournal(None)))
        {
            return;
        }
        tracing::warn!(
            volume = self.volume.name(),
            journal = %j.device().info().name,
            "the failed journal is detached from the volume"
        );
        pending.push_back(Change::SetJournal(None));
    }

    /// Give up the volume's failed journal once its cache has drained:
    /// the members are flushed (what the drain wrote is durable) and the
    /// state is saved without the journal. Its log holds records older
    /// than what the volume writes without it, which a restart would
    /// replay over newer data; the writes completed since the failure wait
    /// (`Raid5Channel::jheld`) until this is on disk. `Ok(false)` while
    /// the cache still drains. No state lock, no suspend (the writes it
    /// holds back would block one); the save takes the owner's locks (the
    /// manager's saving and inventory locks).
    fn give_up_failed_journal(&self) -> Result<bool, String> {
        let device = lock(&self.published).device.clone();
        let Some(j) = device
            .journal()
            .filter(|j| j.has_failed() && !j.given_up_recorded())
        else {
            return Ok(true);
        };
        // Admitted first, then cached: read in that order, so a block on
        // its way in is seen in one or the other.
        let c = j.cache();
        if c.pending() > 0 || !c.is_empty() {
            return Ok(false);
        }
        if self.hooks_awaited.load(Ordering::SeqCst) {
            return Ok(false); // nowhere to record it yet
        }
        let set = device.member_set();
        let written = set
            .live_devices()
            .chain(set.replacing.as_ref().map(|r| r.dev.clone()));
        for dev in written {
            if let Err(e) = crate::raid::metaio::sync(dev.as_ref(), bdev::IoOp::Flush, 0, &mut []) {
                // Its part of the drain may not be durable: it is failed,
                // as a transaction's flush and the data path do (a
                // member's failure is recorded before the writes waiting
                // on this go: they wait for the ledger too; a replacement
                // is given up). Retrying instead could wait for good on a
                // member no IO reaches any more.
                tracing::error!(volume = self.volume.name(), device = %dev.info().name, error = %e, "flush before giving up the journal");
                let _ = crate::raid::transaction::flush_failed(set, &dev, e);
            }
        }
        j.give_up(false);
        let view = lock(&self.published).clone();
        self.hooks()
            .persist_now(&view.snapshot(self.pending_count(), self.deferred()))
            .map_err(|e| format!("saving the state without the failed journal: {e}"))?;
        j.give_up(true);
        tracing::warn!(
            volume = self.volume.name(),
            journal = %j.device().info().name,
            "the failed journal is given up: the state names it no more"
        );
        Ok(true)
    }
}
