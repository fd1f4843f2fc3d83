//! What a change to a RAID volume can be, and what a device can be to
//! the volume that holds it.

use super::*;

/// A change to a RAID volume.
#[derive(Clone)]
pub enum Change {
    /// The device `device` (identity) in `slot` failed an IO, or an
    /// operator failed it.
    Fail {
        /// The slot.
        slot: usize,
        /// The device's identity (`members::device_id`); a report about a
        /// device the slot no longer holds is stale.
        device: usize,
        /// An operator asked (refused, again inside the suspend, if it
        /// would lose data); else the IO path reported the failure.
        by_operator: bool,
    },
    /// Put the first spare into the first failed slot and rebuild it.
    UseSpare,
    /// The rebuild `Run` of `slot` finished.
    Rebuilt(usize, Run),
    /// The rebuild `Run` of `slot` cannot go on (its sources are gone).
    RebuildFailed(usize, Run, String),
    /// Start copying the in-sync member on the device named here to `dev`
    /// (md's --replace).
    ReplaceStart(String, Arc<dyn BlockDevice>),
    /// The replacement `Run`'s copy finished: the new device takes the
    /// slot.
    ReplaceDone(Run),
    /// The replacement `Run`'s copy stopped: the slot keeps its device.
    ReplaceAborted(Run, String),
    /// Add a hot spare (or take a failed member back as one).
    AddSpare(Arc<dyn BlockDevice>),
    /// Remove an unused spare.
    RemoveSpare(String),
    /// Take a failed member's device out of its slot (md's --remove).
    RemoveFailed(String),
    /// Give the volume this journal, or (`None`) take it away.
    SetJournal(Option<Arc<Journal>>),
    /// Switch the journal's mode.
    JournalMode(JournalMode),
    /// Give the volume a write-intent bitmap of regions of this many bytes,
    /// or take it away.
    SetBitmap(Option<u64>),
    /// md's takeover between a two-member RAID1 and RAID5.
    Takeover(Level, u32),
    /// md's write-behind limit (0: off).
    WriteBehind(u64),
    /// md's serialize_policy.
    Serialize(bool),
    /// Mark a member write-mostly, or clear it.
    WriteMostly(String, bool),
    /// Start a scrub (or with a bitmap, the resync of its dirty regions),
    /// from a row (a resync a clean stop cut short goes on from there).
    Scrub(bool, Option<Arc<Bitmap>>, u64),
    /// Go on with the rebuild a restart interrupted (from its checkpoint).
    ResumeRebuild,
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Fail { slot, .. } => write!(f, "fail slot {slot}"),
            Change::UseSpare => write!(f, "use a spare"),
            Change::Rebuilt(s, _) => write!(f, "slot {s} rebuilt"),
            Change::RebuildFailed(s, _, why) => write!(f, "rebuild of slot {s} failed: {why}"),
            Change::ReplaceStart(s, d) => write!(f, "replace {s} by {}", d.info().name),
            Change::ReplaceDone(_) => write!(f, "replacement done"),
            Change::ReplaceAborted(_, why) => write!(f, "replacement given up: {why}"),
            Change::AddSpare(d) => write!(f, "add spare {}", d.info().name),
            Change::RemoveSpare(n) => write!(f, "remove spare {n}"),
            Change::RemoveFailed(n) => write!(f, "remove failed member {n}"),
            Change::SetJournal(j) => {
                write!(f, "journal {}", if j.is_some() { "on" } else { "off" })
            }
            Change::JournalMode(m) => write!(f, "journal mode {}", m.name()),
            Change::SetBitmap(b) => write!(f, "bitmap {b:?}"),
            Change::Takeover(l, c) => write!(f, "takeover to {l:?} ({c}-byte chunks)"),
            Change::WriteBehind(n) => write!(f, "write-behind {n}"),
            Change::Serialize(on) => write!(f, "serialize {on}"),
            Change::WriteMostly(n, on) => write!(f, "write-mostly {n} {on}"),
            Change::Scrub(repair, dirty, _) => write!(
                f,
                "{} {}",
                if *repair { "repair" } else { "check" },
                if dirty.is_some() {
                    "of dirty regions"
                } else {
                    ""
                }
            ),
            Change::ResumeRebuild => write!(f, "resume the rebuild"),
        }
    }
}

/// What a device is to the volume that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// In a slot, in sync or being rebuilt.
    Member,
    /// In a slot, failed (md's faulty): out of use, but the volume holds
    /// it until it is removed or replaced.
    Failed,
    /// A hot spare.
    Spare,
    /// A hot replacement's new device, being copied to.
    Replacement,
    /// The journal.
    Journal,
}

impl Role {
    /// How an operator reads it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Member => "member of",
            Role::Failed => "failed member of",
            Role::Spare => "spare of",
            Role::Replacement => "replacement in",
            Role::Journal => "journal of",
        }
    }
}
