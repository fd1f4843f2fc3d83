//! What a volume's monitor holds ([`MonitorState`], changed only by its
//! transactions) and what readers see of it ([`Published`], and the
//! [`Snapshot`] built from that), without taking the state lock.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bdev::BlockDevice;

use crate::raid::bitmap::{Bitmap, BitmapDaemon};
use crate::raid::journal::{Checkpointer, Journal};
use crate::raid::level::RaidDevice;
use crate::raid::members::MemberState;
use crate::raid::rebuild::RebuildProgress;
use crate::raid::superblock::Level;

/// A consistent view of a volume's members, spares and background work.
pub struct Snapshot {
    /// Member states by slot.
    pub states: Vec<MemberState>,
    /// Device names by slot ("" for a missing or removed member).
    pub members: Vec<String>,
    /// Write-mostly flags by slot.
    pub write_mostly: Vec<bool>,
    /// IOs that failed on each slot's device while in the slot.
    pub errors: Vec<u64>,
    /// Spare device names.
    pub spares: Vec<String>,
    /// Members the level can lose without losing data.
    pub max_failures: usize,
    /// The running or last rebuild or scrub.
    pub rebuild: Option<Arc<RebuildProgress>>,
    /// The write-intent bitmap, if the volume keeps one.
    pub bitmap: Option<Arc<Bitmap>>,
    /// A hot replacement running: the slot and the new device's name.
    pub replacing: Option<(usize, String)>,
    /// RAID1: md's serialize_policy is on.
    pub serialize: bool,
    /// RAID1: md's write-behind limit (0: off) and the writes in the
    /// background now.
    pub write_behind: (u64, u64),
    /// The level.
    pub level: Level,
    /// RAID5 chunk in bytes and layout name (RAID1: 0 and "").
    pub chunk_bytes: u32,
    /// RAID5 layout ("" for RAID1).
    pub layout: String,
    /// The journal, if any.
    pub journal: Option<Arc<Journal>>,
    /// Rebuild and scrub rate limits (min, max; bytes/s).
    pub rates: (u64, u64),
    /// Changes waiting to be applied (events that hit a deadline).
    pub pending: usize,
    /// Changes put off so far because the volume did not quiesce in time
    /// (each is tried again).
    pub deferred: u64,
}

impl Snapshot {
    /// Whether the background work has ended and its outcome is in the
    /// member states: a rebuild's worker finishes a moment before the
    /// monitor marks the member in sync, and a caller that waited for
    /// "finished" must then see the volume optimal.
    pub fn settled(&self) -> bool {
        self.pending == 0
            && self.rebuild.as_ref().is_none_or(|p| {
                p.is_finished()
                    && (p.slot == usize::MAX
                        || p.error().is_some()
                        || if p.slot == self.states.len() {
                            // A replacement's copy: settled once the new
                            // device has the slot (or it was given up).
                            self.replacing.is_none()
                        } else {
                            self.states.get(p.slot) != Some(&MemberState::Rebuilding)
                        })
            })
    }
}

/// What a volume's monitor holds; changed only under its lock, by a
/// transaction.
pub struct MonitorState {
    pub(crate) current: Arc<dyn RaidDevice>,
    pub(crate) spares: Vec<Arc<dyn BlockDevice>>,
    pub(crate) rebuild: Option<Arc<RebuildProgress>>,
    /// Rate limits for every rebuild and scrub (bytes/s, 0: none), like
    /// md's sync_speed_max, and the floor it yields to guest IO down to
    /// (sync_speed_min; 0: it does not yield).
    pub(crate) max_rate: u64,
    pub(crate) min_rate: u64,
    /// Writes the write-intent bitmap, if the volume keeps one.
    pub(crate) bitmap: Option<BitmapDaemon>,
    /// Checkpoints the journal, if the volume has one.
    pub(crate) checkpointer: Option<Checkpointer>,
    /// Recorded clean: no more changes.
    pub(crate) closed: bool,
    /// The resync an unclean start began: until it has finished, the
    /// volume is not clean, even at a clean stop.
    pub(crate) resync: Option<Arc<RebuildProgress>>,
    /// An unclean start resumed a rebuild: rows below its checkpoint were
    /// written in service before the crash and may be torn (data written,
    /// parity or a mirror not), so a resync follows the rebuild (md runs
    /// its resync after recovery too). Until that resync has started the
    /// volume is not clean, even at a clean stop.
    pub(crate) resync_owed: bool,
}

impl MonitorState {
    /// Whether a resync is still owed: one a resumed rebuild left to run,
    /// or the one an unclean start began, cut short (a rebuild that took a
    /// spare stops it).
    pub(crate) fn resync_pending(&self) -> bool {
        self.resync_owed
            || self
                .resync
                .as_ref()
                .is_some_and(|p| p.is_finished() && p.error().is_some())
    }

    /// Background work started: it runs under the volume's rate limit.
    pub(crate) fn started(&mut self, p: Arc<RebuildProgress>) {
        p.max_bytes_per_sec.store(self.max_rate, Ordering::SeqCst);
        p.min_bytes_per_sec.store(self.min_rate, Ordering::SeqCst);
        self.rebuild = Some(p);
    }

    /// What readers see of this state.
    pub(crate) fn published(&self) -> Published {
        Published {
            device: self.current.clone(),
            spares: self.spares.clone(),
            rebuild: self.rebuild.clone(),
            rates: (self.min_rate, self.max_rate),
        }
    }
}

/// The state as last published, for readers.
#[derive(Clone)]
pub(crate) struct Published {
    pub(crate) device: Arc<dyn RaidDevice>,
    pub(crate) spares: Vec<Arc<dyn BlockDevice>>,
    pub(crate) rebuild: Option<Arc<RebuildProgress>>,
    pub(crate) rates: (u64, u64),
}

impl Published {
    pub(crate) fn snapshot(&self, pending: usize, deferred: u64) -> Snapshot {
        let d = &self.device;
        let set = d.member_set();
        let geo = d.parity_geometry();
        Snapshot {
            states: set.members.iter().map(|m| m.state).collect(),
            members: set
                .members
                .iter()
                .map(|m| m.dev.info().name.clone())
                .collect(),
            write_mostly: set.members.iter().map(|m| m.write_mostly).collect(),
            errors: set
                .members
                .iter()
                .map(|m| m.errors.load(Ordering::Relaxed))
                .collect(),
            spares: self.spares.iter().map(|d| d.info().name.clone()).collect(),
            max_failures: d.max_failures(),
            rebuild: self.rebuild.clone(),
            bitmap: set.bitmap.clone(),
            replacing: set
                .replacing
                .as_ref()
                .map(|r| (r.slot, r.dev.info().name.clone())),
            serialize: set.serialize.load(Ordering::SeqCst),
            write_behind: (set.behind.limit(), set.behind.inflight()),
            level: if geo.is_some() {
                Level::Raid5
            } else {
                Level::Raid1
            },
            chunk_bytes: geo.map_or(0, |g| {
                (g.chunk_blocks() * d.info().block_size as u64) as u32
            }),
            layout: geo.map_or(String::new(), |g| g.layout().name().to_string()),
            journal: d.journal(),
            rates: self.rates,
            pending,
            deferred,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn snap(states: Vec<MemberState>, p: Option<Arc<RebuildProgress>>) -> Snapshot {
        Snapshot {
            members: states.iter().map(|_| String::new()).collect(),
            write_mostly: states.iter().map(|_| false).collect(),
            errors: states.iter().map(|_| 0).collect(),
            states,
            spares: vec![],
            max_failures: 1,
            rebuild: p,
            bitmap: None,
            replacing: None,
            serialize: false,
            write_behind: (0, 0),
            level: Level::Raid1,
            chunk_bytes: 0,
            layout: String::new(),
            journal: None,
            rates: (0, 0),
            pending: 0,
            deferred: 0,
        }
    }

    #[test]
    fn a_rebuild_is_settled_only_once_its_member_is_in_sync() {
        use MemberState::{InSync, Rebuilding};
        assert!(snap(vec![InSync, InSync], None).settled());
        let p = Arc::new(RebuildProgress::new(0, 8, Arc::new(AtomicU64::new(8))));
        let s = snap(vec![Rebuilding, InSync], Some(p.clone()));
        assert!(!s.settled(), "still running");
        p.mark_finished(None);
        assert!(!s.settled(), "worker done, monitor has not applied it");
        assert!(snap(vec![InSync, InSync], Some(p.clone())).settled());
        let aborted = Arc::new(RebuildProgress::new(0, 8, Arc::new(AtomicU64::new(3))));
        aborted.mark_finished(Some("cancelled"));
        assert!(snap(vec![Rebuilding, InSync], Some(aborted)).settled());
        let scrub = Arc::new(RebuildProgress::new(
            usize::MAX,
            8,
            Arc::new(AtomicU64::new(8)),
        ));
        assert!(!snap(vec![InSync, InSync], Some(scrub.clone())).settled());
        scrub.mark_finished(None);
        assert!(snap(vec![InSync, InSync], Some(scrub)).settled());
        let mut pending = snap(vec![InSync, InSync], None);
        pending.pending = 1;
        assert!(!pending.settled(), "an event is still to be applied");
    }
}
