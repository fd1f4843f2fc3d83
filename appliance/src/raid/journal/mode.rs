//! The journal's modes (write-through, write-back) and switching between
//! them online: what the superblock says, the in-memory flags the IO path
//! reads, and the drain of the write-back cache a switch to write-through
//! waits for.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::codec::Super;
use super::superblock;
use super::Journal;
use crate::raid::RaidError;

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JournalMode {
    /// After the members are written (the journal only closes the hole).
    #[default]
    WriteThrough,
    /// Once the data is durable in the journal.
    WriteBack,
}

impl JournalMode {
    /// Its name in configs and the API.
    pub fn name(self) -> &'static str {
        match self {
            JournalMode::WriteThrough => "write-through",
            JournalMode::WriteBack => "write-back",
        }
    }

    /// From [`name`](Self::name) (empty: write-through).
    pub fn parse(s: &str) -> Result<JournalMode, RaidError> {
        match s {
            "" | "write-through" => Ok(JournalMode::WriteThrough),
            "write-back" => Ok(JournalMode::WriteBack),
            _ => Err(RaidError::Invalid(format!(
                "unknown journal mode {s:?} (write-through or write-back)"
            ))),
        }
    }
}

/// See [`Journal::drain_left`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DrainLeft {
    Nothing,
    /// Blocks to drain: a flush through the volume's gate carries them.
    Flush,
    /// Drained: a checkpoint records write-through (and fails the journal
    /// if its superblock cannot take it, as any checkpoint does).
    Record,
}

/// The mode the superblock says, and how many switches wrote it.
pub(super) struct StoredMode {
    pub(super) mode: JournalMode,
    pub(super) switches: u64,
    /// A switch to write-through is draining the cache: the count of
    /// switches when it began. The superblock says write-through once the
    /// cache is empty, if no switch came since.
    pub(super) drain_from: Option<u64>,
}

impl Journal {
    /// Write the superblock with the checkpoint as it is now and the mode
    /// it says already. A checkpoint never changes the mode: it used to
    /// write the in-memory mode, and one that ran between a switch's
    /// superblock (write-back) and its flag put write-through back on disk.
    /// A switch to write-through whose drain gave up at its deadline is
    /// recorded here, by the first checkpoint after the cache empties.
    pub(super) fn write_super(&self) -> Result<(), RaidError> {
        let mut stored = self.super_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.drained(&stored) {
            return self.record_drained(&mut stored);
        }
        let mode = stored.mode;
        self.store_super(&mut stored, mode)
    }

    /// What is left of a switch to write-through whose drain its call
    /// left unfinished (the checkpointer carries it on). Reclaim rode only
    /// on the volume's writes and flushes, so an idle volume kept its cache
    /// for good: a removal of the journal was refused every time, and a
    /// restart came back write-back (audit).
    pub(crate) fn drain_left(&self) -> DrainLeft {
        if !self.draining.load(Ordering::SeqCst)
            || self.has_failed()
            || self.mode() == JournalMode::WriteBack
        {
            return DrainLeft::Nothing;
        }
        if !self.cache.is_empty() || self.cache.pending() > 0 {
            return DrainLeft::Flush;
        }
        let stored = self.super_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.drained(&stored) {
            DrainLeft::Record
        } else {
            DrainLeft::Nothing
        }
    }

    /// Whether a switch to write-through has drained the cache with no
    /// switch since, so its superblock is due.
    fn drained(&self, stored: &StoredMode) -> bool {
        stored.mode == JournalMode::WriteBack
            && stored.drain_from == Some(stored.switches)
            && self.mode() == JournalMode::WriteThrough
            && self.cache.is_empty()
            && self.cache.pending() == 0
            && !self.has_failed()
    }

    /// Write the superblock saying write-through for a drained switch; the
    /// drain is over only once it is written (a write that fails keeps the
    /// switch due, for the next checkpoint to record).
    fn record_drained(&self, stored: &mut StoredMode) -> Result<(), RaidError> {
        self.store_super(stored, JournalMode::WriteThrough)?;
        self.draining.store(false, Ordering::SeqCst);
        stored.drain_from = None;
        Ok(())
    }

    /// Write the superblock saying `mode` (a switch of modes).
    pub(crate) fn write_super_mode(&self, mode: JournalMode) -> Result<(), RaidError> {
        let mut stored = self.super_lock.lock().unwrap_or_else(|e| e.into_inner());
        stored.switches += 1;
        self.store_super(&mut stored, mode)
    }

    fn store_super(&self, stored: &mut StoredMode, mode: JournalMode) -> Result<(), RaidError> {
        let s = Super {
            nonce: self.nonce,
            log_blocks: self.log_blocks,
            checkpoint_seq: self.checkpoint_seq.load(Ordering::SeqCst),
            mode,
        };
        superblock::store(self.dev.as_ref(), &s)?;
        stored.mode = mode;
        Ok(())
    }

    /// Turn write-back on or off for new writes. Only with the volume
    /// suspended: a write admitted to the cache before is then inserted
    /// (or released) already, and none is admitted after. Off also starts
    /// draining what the cache holds (see [`drain`](Self::drain)).
    pub(crate) fn set_write_back(&self, on: bool) {
        let mut stored = self.super_lock.lock().unwrap_or_else(|e| e.into_inner());
        // A failed journal only drains (a switch that was on its way when
        // it failed would stop the drain the give-up waits for).
        if on && self.has_failed() {
            return;
        }
        self.write_back.store(on, Ordering::SeqCst);
        self.draining.store(!on, Ordering::SeqCst);
        if on && self.has_failed() {
            // Failed in between (see `set_failed`): drain after all.
            self.write_back.store(false, Ordering::SeqCst);
            self.draining.store(true, Ordering::SeqCst);
            return;
        }
        stored.drain_from = (!on).then_some(stored.switches);
    }

    /// Switch modes online, through the volume's quiesce epoch (for a
    /// journal used without a monitor; a monitor does the same steps in its
    /// transaction). To write-back, the superblock says so first; to
    /// write-through, new writes stop using the cache at once and what it
    /// holds drains to the members within `timeout`, then the superblock
    /// says write-through (until then a restart comes back in write-back,
    /// which is safe).
    pub fn set_mode(
        &self,
        mode: JournalMode,
        volume: &crate::volume::Volume,
        timeout: Duration,
    ) -> Result<(), RaidError> {
        if self.has_failed() {
            return Err(RaidError::Invalid("the journal device has failed".into()));
        }
        let wb = mode == JournalMode::WriteBack;
        let guard = volume
            .suspend(timeout)
            .map_err(|e| RaidError::Volume(e.into()))?;
        // (It may have failed while the volume drained.)
        if self.has_failed() {
            return Err(RaidError::Invalid("the journal device has failed".into()));
        }
        if wb {
            self.write_super_mode(mode)?;
        }
        self.set_write_back(wb);
        drop(guard);
        if wb {
            return Ok(());
        }
        self.drain(volume, timeout)
    }

    /// After write-back was turned off: drain the cache to the members
    /// (reclaim riding on flushes sent through the volume's gate, and on
    /// writes) within `timeout`; then the superblock says write-through.
    pub fn drain(
        &self,
        volume: &crate::volume::Volume,
        timeout: Duration,
    ) -> Result<(), RaidError> {
        let t = Instant::now();
        let mut last_error = String::new();
        loop {
            if self.mode() == JournalMode::WriteBack {
                // Switched back meanwhile: nothing to drain.
                return Ok(());
            }
            if self.cache.is_empty() && self.cache.pending() == 0 {
                break;
            }
            if t.elapsed() > timeout {
                return Err(RaidError::Invalid(format!(
                    "{} blocks still to drain to the members after {timeout:?}{}; the volume stays write-back on disk and keeps draining as it writes",
                    self.cache.len(),
                    if last_error.is_empty() { String::new() } else { format!(" (last flush: {last_error})") }
                )));
            }
            // The flush only carries the reclaim: its own failure (a member
            // failing under it) does not stop the drain.
            if let Err(e) = volume.flush_on_reactor(timeout) {
                last_error = e.to_string();
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let mut stored = self.super_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self.drained(&stored) {
            // Switched back to write-back meanwhile (its superblock stays),
            // recorded already, or the journal failed (which drains for
            // good: never cleared then).
            if !self.has_failed() {
                self.draining.store(false, Ordering::SeqCst);
            }
            return Ok(());
        }
        self.record_drained(&mut stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdev::{BlockDevice, RamDevice};
    use std::sync::Arc;

    /// Found in review: a checkpoint wrote the in-memory mode, so one
    /// between a switch's superblock (write-back) and its flag put
    /// write-through back on disk, and a restart came back write-through.
    #[test]
    fn a_checkpoint_keeps_the_mode_the_superblock_says() {
        let jdev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("j", 4096, 129).unwrap());
        let j = Journal::format(jdev.clone()).unwrap();
        assert_eq!(j.mode(), JournalMode::WriteThrough);
        j.write_super_mode(JournalMode::WriteBack).unwrap();
        j.write_super().unwrap();
        let s = superblock::load(jdev.as_ref()).unwrap();
        assert_eq!(s.mode, JournalMode::WriteBack);
        // And the other way: the flag is on, the superblock still says
        // write-through (a switch not yet written): a checkpoint keeps it.
        let j = Journal::format(jdev.clone()).unwrap();
        j.set_write_back(true);
        j.write_super().unwrap();
        let s = superblock::load(jdev.as_ref()).unwrap();
        assert_eq!(s.mode, JournalMode::WriteThrough);
    }

    /// From review: once checkpoints kept the superblock's mode, a switch
    /// to write-through whose drain gave up at its deadline was never
    /// recorded. The first checkpoint after the cache empties records it;
    /// not if a switch back to write-back came meanwhile.
    #[test]
    fn a_drained_switch_to_write_through_is_recorded_by_a_checkpoint() {
        let jdev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("j", 4096, 129).unwrap());
        let mode = |j: &Arc<dyn BlockDevice>| superblock::load(j.as_ref()).unwrap().mode;
        let j = Journal::format_with(jdev.clone(), JournalMode::WriteBack).unwrap();
        j.set_write_back(false);
        j.write_super().unwrap();
        assert_eq!(mode(&jdev), JournalMode::WriteThrough);
        // Draining, then switched back: its write-back superblock is
        // written before its flag, and stays.
        let j = Journal::format_with(jdev.clone(), JournalMode::WriteBack).unwrap();
        j.set_write_back(false);
        j.write_super_mode(JournalMode::WriteBack).unwrap();
        j.write_super().unwrap();
        assert_eq!(mode(&jdev), JournalMode::WriteBack);
    }

    /// From an audit: the drain was over before its superblock was
    /// written, so a write the device refused lost the operator's switch
    /// for good (the disk kept saying write-back). It stays due.
    #[test]
    fn a_drained_switch_whose_superblock_failed_stays_due() {
        let ram: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("j", 4096, 129).unwrap());
        let fault = bdev::FaultDevice::new(ram.clone());
        let control = fault.control();
        let jdev: Arc<dyn BlockDevice> = Arc::new(fault);
        let j = Journal::format_with(jdev.clone(), JournalMode::WriteBack).unwrap();
        j.set_write_back(false);
        control.fail_writes(0, u64::MAX);
        assert!(j.write_super().is_err());
        control.heal();
        j.write_super().unwrap();
        assert_eq!(
            superblock::load(ram.as_ref()).unwrap().mode,
            JournalMode::WriteThrough
        );
    }
}
