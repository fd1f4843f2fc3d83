//! Checkpoints: the log's space comes back once its records are on the
//! members.

use crate::raid::RaidError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::mode::DrainLeft;
use super::Journal;

/// Pauses between flushes that drain nothing.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Checkpoints a volume's journal when its log is half full. Stops when
/// dropped.
pub struct Checkpointer {
    journal: Arc<Journal>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Watch `journal` of `volume`.
    pub fn start(journal: Arc<Journal>, volume: crate::volume::Volume) -> Checkpointer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let kept = journal.clone();
        let thread = std::thread::Builder::new()
            .name(format!("journal-{}", volume.name()))
            .spawn(move || {
                let mut backoff = MIN_BACKOFF;
                while !s.load(Ordering::SeqCst) {
                    if journal.has_failed() {
                        // Nothing to checkpoint on a dead device: drain the
                        // cache to the members, then idle.
                        if !journal.cache().is_empty() {
                            if let Err(e) = volume.flush_helping_drain(Duration::from_secs(30)) {
                                if matches!(e, crate::volume::VolumeError::Removed(_)) {
                                    break;
                                }
                                tracing::warn!(volume = volume.name(), error = %e, "draining the cache of a failed journal");
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        } else {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        continue;
                    }
                    if !carry_drain(&journal, &volume, &mut backoff) {
                        break;
                    }
                    let usage = journal.usage();
                    // Half full, or a record was refused room (which can
                    // happen well below: the cache's reserve, a record
                    // skipping to the next lap): nothing else frees it.
                    if usage > 0.5 || (usage > 0.0 && journal.take_room_wanted()) {
                        match checkpoint_now(&journal, &volume) {
                            Ok(true) => {}
                            // Reclaim rides on writes: an idle volume keeps
                            // its cache (durable in the log) until then.
                            // An idle volume: a flush through its gate
                            // carries the reclaim.
                            Ok(false) => {
                                if let Err(e) = volume.flush_helping_drain(Duration::from_secs(30)) {
                                    if matches!(e, crate::volume::VolumeError::Removed(_)) {
                                        break;
                                    }
                                    tracing::warn!(volume = volume.name(), error = %e, "journal reclaim flush");
                                    std::thread::sleep(Duration::from_millis(100));
                                }
                            }
                            Err(e) => {
                                tracing::error!(volume = volume.name(), error = %e, "journal checkpoint");
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    } else {
                        // Look often only while the log is filling, so an
                        // idle volume costs next to nothing.
                        let nap = if usage > 0.1 { 1 } else { 20 };
                        std::thread::sleep(Duration::from_millis(nap));
                    }
                }
            })
            .ok();
        Checkpointer {
            journal: kept,
            stop,
            thread,
        }
    }

    /// The journal it looks after.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }
}

/// One step of a drain a switch to write-through left: flushes carry it,
/// backing off while they bring nothing (a reclaim that keeps failing),
/// and a checkpoint records it once the cache is empty. The checkpoint
/// after it still runs (review). False once the volume is gone.
fn carry_drain(journal: &Journal, volume: &crate::volume::Volume, backoff: &mut Duration) -> bool {
    match journal.drain_left() {
        DrainLeft::Flush => {
            let before = journal.cache().len();
            let r = volume.flush_helping_drain(Duration::from_secs(30));
            if matches!(r, Err(crate::volume::VolumeError::Removed(_))) {
                return false;
            }
            if journal.cache().len() < before {
                *backoff = MIN_BACKOFF;
            } else {
                if *backoff == MAX_BACKOFF {
                    tracing::warn!(volume = volume.name(), blocks = before, error = ?r.err(), "the cache of a journal switched to write-through does not drain");
                }
                back_off(backoff);
            }
        }
        DrainLeft::Record => {
            if !matches!(checkpoint_now(journal, volume), Ok(true)) {
                back_off(backoff);
            }
        }
        DrainLeft::Nothing => {}
    }
    true
}

/// Pause `backoff`, and twice as long next time (up to a second).
fn back_off(backoff: &mut Duration) {
    std::thread::sleep(*backoff);
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}

/// One checkpoint of `journal`; the members are flushed by a flush of
/// the volume through its quiesce gate (a RAID5 flush goes to every
/// member), so a checkpoint is background work of the volume's current
/// generation like any other, held back by a suspend once the volume's IO
/// has drained. While it drains, the flush goes with that IO: writes
/// waiting for log room are part of it, and only a checkpoint frees room.
pub fn checkpoint_now(
    journal: &Journal,
    volume: &crate::volume::Volume,
) -> Result<bool, RaidError> {
    journal.checkpoint(|| {
        volume
            .flush_helping_drain(Duration::from_secs(30))
            .map_err(RaidError::from)
    })
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
