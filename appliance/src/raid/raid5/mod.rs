//! RAID5 in md's layouts. A request is cut into stripe pieces; each piece
//! is a small state machine on the channel's core:
//!
//! - healthy reads go straight to the data members, chunk by chunk;
//! - writes lock their stripe (a shared table of atomic bits: no global
//!   lock, and two cores never update one stripe's parity at once), read
//!   what parity needs, compute it, write data and parity, unlock. A piece
//!   that covers whole rows reads nothing (full-stripe write); otherwise it
//!   reads whichever is fewer blocks: the untouched data
//!   (reconstruct-write) or the old data and parity (read-modify-write);
//! - degraded, a read of the missing member reconstructs it from the
//!   others, and a write reads the whole window from the survivors,
//!   rebuilds the missing data, then writes the survivors' share.
//!
//! Parity is XORed with the SIMD kernels of `parity`. A member that fails
//! an IO is dropped on this core at once and reported; the piece is planned
//! again without it.
//!
//! The files: this one holds the device and the channel's state; `channel`
//! takes requests in and completions out and moves pieces along; `plan`
//! chooses how a piece reads and writes and computes parity; `log` is the
//! journal and write-back path, reached from the others through a few
//! hooks (md's raid5-log.h: submit a record, wait for room, settle the
//! cache), so the write path reads the same with or without a journal.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use bdev::{BdevError, BlockDevice, Completion, DeviceInfo, IoChannel, IoError, IoRequest, SgList};

mod channel;
mod log;
mod plan;

use super::geometry::{Layout, Raid5Geometry};
use super::journal::Journal;
use super::level::RaidDevice;
pub use super::locks::StripeLocks;
use super::members::{FailureSink, Member, MemberSet, MemberState};
use super::rebuild::Rows;
use super::window::{WinBuf, Windows};

/// A RAID5 device for one configuration generation.
pub struct Raid5Device {
    info: DeviceInfo,
    geo: Raid5Geometry,
    set: MemberSet,
    /// Write-through journal: stripe updates are durable there before the
    /// members are written.
    journal: Option<Arc<Journal>>,
}

impl Raid5Device {
    /// RAID5 over `members` (2..=64, same block size) with `chunk_bytes`
    /// chunks in `layout`, data starting `data_offset` blocks into each.
    pub fn new(
        name: &str,
        members: Vec<Member>,
        chunk_bytes: u32,
        layout: Layout,
        data_offset: u64,
        failures: FailureSink,
    ) -> Result<Raid5Device, BdevError> {
        Self::over(
            name,
            MemberSet::new(members, failures),
            chunk_bytes,
            layout,
            data_offset,
        )
    }

    /// RAID5 over the members (and what generations share) of `set`: a
    /// RAID1 of two taken over as it is.
    pub fn over(
        name: &str,
        set: MemberSet,
        chunk_bytes: u32,
        layout: Layout,
        data_offset: u64,
    ) -> Result<Raid5Device, BdevError> {
        let members = &set.members;
        let (bs, smallest) = crate::raid::members::common_geometry(name, members)?;
        let smallest = set.limit.map_or(smallest, |l| smallest.min(l));
        let geo = Raid5Geometry::new(
            members.len() as u32,
            bs,
            chunk_bytes,
            layout,
            data_offset,
            smallest,
        )
        .map_err(|e| BdevError::InvalidArgument(format!("{name}: {e}")))?;
        let info = DeviceInfo {
            name: name.to_string(),
            block_size: bs,
            num_blocks: geo.volume_blocks(),
            max_transfer: members
                .iter()
                .map(|m| m.dev.info().max_transfer)
                .min()
                .unwrap_or(0)
                .min(128 << 20),
            optimal_io_boundary: geo.stripe_blocks() as u32,
            min_io_blocks: geo.chunk_blocks() as u32,
            flush: true,
            // Discard is not offered: md keeps parity over discarded
            // ranges only on members that zero them, which we cannot know.
            discard: false,
            write_zeroes: true,
        };
        Ok(Raid5Device {
            info,
            geo,
            set,
            journal: None,
        })
    }

    /// The same volume, journalling every stripe update in `journal`
    /// (write-through) before it reaches the members.
    pub fn with_journal(mut self, journal: Arc<Journal>) -> Raid5Device {
        self.journal = Some(journal);
        self
    }

    /// Its journal, if it has one.
    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
    }

    /// The geometry.
    pub fn geometry(&self) -> &Raid5Geometry {
        &self.geo
    }
}

impl RaidDevice for Raid5Device {
    fn member_set(&self) -> &MemberSet {
        &self.set
    }

    fn with_member_set(&self, set: MemberSet) -> Arc<dyn RaidDevice> {
        // The lock table travels with the set: pieces of the old
        // generation have drained, and one lock per stripe holds across
        // generations.
        Arc::new(Raid5Device {
            info: self.info.clone(),
            geo: self.geo,
            set,
            journal: self.journal.clone(),
        })
    }

    fn rows(&self) -> Rows {
        Rows::of_raid5(&self.geo, self.info.block_size as usize)
    }

    /// A RAID5 member is rebuilt from all the others, which must all be in
    /// sync.
    fn rebuild_sources(&self, slot: usize) -> Vec<usize> {
        let others: Vec<usize> = (0..self.set.members.len()).filter(|&m| m != slot).collect();
        if others
            .iter()
            .all(|&m| self.set.members[m].recorded_state() == MemberState::InSync)
        {
            others
        } else {
            Vec::new()
        }
    }

    fn parity_geometry(&self) -> Option<Raid5Geometry> {
        Some(self.geo)
    }

    fn max_failures(&self) -> usize {
        1
    }

    fn with_journal(&self, journal: Arc<Journal>) -> Option<Arc<dyn RaidDevice>> {
        Some(Arc::new(Raid5Device {
            info: self.info.clone(),
            geo: self.geo,
            set: self.set.clone(),
            journal: Some(journal),
        }))
    }

    fn journal(&self) -> Option<Arc<Journal>> {
        self.journal.clone()
    }

    fn without_journal(&self) -> Option<Arc<dyn RaidDevice>> {
        Some(Arc::new(Raid5Device {
            info: self.info.clone(),
            geo: self.geo,
            set: self.set.clone(),
            journal: None,
        }))
    }
}

impl BlockDevice for Raid5Device {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        let chans = super::members::open_members(&self.set)?;
        Ok(Box::new(Raid5Channel {
            slots: self.set.members.clone(),
            held: Default::default(),
            jheld: Vec::new(),
            blocked_seen: Default::default(),
            rebuilding: self.set.rebuilding.clone(),
            info: self.info.clone(),
            geo: self.geo,
            failed: chans.iter().map(|c| c.is_none()).collect(),
            members: chans,
            locks: self.set.locks.clone(),
            failures: self.set.failures.clone(),
            parents: Vec::new(),
            free_parents: Vec::new(),
            pieces: Vec::new(),
            free_pieces: Vec::new(),
            waiting: VecDeque::new(),
            done: Vec::new(),
            scratch: Vec::new(),
            refused: Vec::new(),
            deferred: VecDeque::new(),
            inflight: 0,
            // A journal device that refuses a channel does not refuse the
            // volume's queue: one whose queues are all in use for a moment
            // (while queues move to a new generation) is asked again when
            // a record needs it, and a dead one fails the journal after
            // `JOURNAL_OPEN_GRACE` (see `journal_channel`).
            jch: self
                .journal
                .as_ref()
                .filter(|j| !j.has_failed())
                .and_then(|j| j.device().open_channel().ok()),
            jch_refused: None,
            journal: self.journal.clone(),
            jwait: VecDeque::new(),
            jdeferred: VecDeque::new(),
            jflush_waiting: Vec::new(),
            jflush_group: Vec::new(),
            jflush_inflight: false,
            jbufs: Vec::new(),
            fast: Vec::new(),
            free_fast: Vec::new(),
            reclaiming: 0,
            windows: Default::default(),
            buflists: Vec::new(),
            bitmap: self.set.bitmap.clone(),
            scrubbing: self.set.scrubbing.clone(),
            replace: super::members::ReplaceChannel::open(&self.set)?,
            activity: self.set.activity.counter(),
        }))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Read,
    Write,
    Flush,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Plan {
    /// Reads straight from the data members.
    Direct,
    /// Reads the window from every survivor and rebuilds the missing member.
    Reconstruct,
    /// Reads untouched data, computes parity from all data.
    Rcw,
    /// Reads old data and parity, folds the change into parity.
    Rmw,
    /// The parity member is gone: data goes straight to the members.
    NoParity,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    WaitLock,
    Reading,
    /// The stripe update goes to the journal (write, then flush) before
    /// the members.
    Journaling,
    Writing,
}

/// Member writes of a piece: (member, first row, end row). A handful per
/// piece, kept inline: no allocation per write.
pub(super) type Writes = smallvec::SmallVec<[(usize, u64, u64); 8]>;

struct Piece {
    parent: usize,
    kind: Kind,
    stripe: u64,
    /// Volume blocks of the piece (inside one stripe).
    b0: u64,
    b1: u64,
    locked: bool,
    stage: Stage,
    plan: Plan,
    pending: u32,
    read_failed: bool,
    /// The member missing for this stripe when the piece was planned.
    missing: Option<usize>,
    /// Window of chunk rows (chunk offsets) the piece touches.
    omin: u64,
    omax: u64,
    /// Per-member window buffers.
    bufs: Vec<WinBuf>,
    error: Option<IoError>,
    /// Journalling: the record, the member writes it covers, and whether
    /// its flush was sent. A write-back record's data blocks are apart, in
    /// `jdata`, which the cache keeps (`jrec` then holds the header block).
    jrec: Vec<u8>,
    jdata: Vec<u8>,
    jwrites: Writes,
    /// Where the record is on its way to durable.
    jphase: LogPhase,
    /// The record's checkpoint epoch, while its blocks are not on the
    /// members yet.
    jepoch: Option<u64>,
    /// Log blocks the record needs (to retry once there is room).
    jneed: u64,
    /// Write-back: the record holds the data alone, acknowledged once
    /// durable and then kept in the cache.
    wb: bool,
    /// Reclaim of cached blocks: (volume block, version) of each, whose
    /// data is `own` from volume block `b0`. Its outcome never touches the
    /// parent it rides on.
    reclaim: Option<Vec<(u64, u64)>>,
    own: Vec<u8>,
    /// Cache room taken for a write-back record (see `WriteCache::try_admit`).
    admitted: u64,
    /// Whether the write was found worth caching, once asked (a piece
    /// planned again asks the same, see `WriteCache::admit_once`).
    worth_caching: Option<bool>,
    /// Counted in its write-intent bitmap region (see `Bitmap::begin`).
    in_bitmap: bool,
}

struct Parent {
    tag: u64,
    lba0: u64,
    sg: SgList,
    /// WRITE_ZEROES: a write whose data is zeroes (no buffer).
    zeroes: bool,
    /// A write or WRITE_ZEROES (see `Raid5Channel::jheld`).
    write: bool,
    left: u32,
    error: Option<IoError>,
}

struct Raid5Channel {
    /// The members of this channel's generation: their devices and the
    /// gone flags every core shares.
    slots: Arc<Vec<Member>>,
    /// Completions waiting for a member failure to be recorded.
    held: super::members::HeldCompletions,
    /// Writes completed while the journal has failed and is not yet
    /// recorded as given up: they may have gone to the members without a
    /// record, and until the state names the journal no more a restart
    /// would replay its older records over them. Flushes and reads are not
    /// held (a flush covers only writes already acknowledged).
    jheld: Vec<Completion>,
    info: DeviceInfo,
    geo: Raid5Geometry,
    members: Vec<Option<Box<dyn IoChannel>>>,
    // Channels first: fields drop in order, and no device may still
    // reach the buffers below (pieces' windows) once they are gone.
    /// A hot replacement's new device: it gets every write to its slot.
    replace: Option<super::members::ReplaceChannel>,
    failed: Vec<bool>,
    locks: Arc<StripeLocks>,
    failures: FailureSink,
    parents: Vec<Option<Parent>>,
    free_parents: Vec<usize>,
    pieces: Vec<Option<Piece>>,
    free_pieces: Vec<usize>,
    waiting: VecDeque<usize>,
    done: Vec<Completion>,
    scratch: Vec<Completion>,
    /// Children refused at submission; handled as failed completions.
    refused: Vec<Completion>,
    /// Children waiting for room in a member's queue.
    deferred: VecDeque<(usize, IoRequest)>,
    rebuilding: Option<(usize, Arc<AtomicU64>)>,
    /// `drain_blocked` as found in this poll (a scan of the cache; what it
    /// finds cannot change while the volume's members do not).
    blocked_seen: std::cell::Cell<Option<bool>>,
    inflight: usize,
    journal: Option<Arc<Journal>>,
    /// This core's channel to the journal device.
    jch: Option<Box<dyn IoChannel>>,
    /// When the journal device first refused this channel one (`None`:
    /// not refused, or opened since).
    jch_refused: Option<std::time::Instant>,
    /// Pieces waiting for room in the log (until the next checkpoint).
    jwait: VecDeque<usize>,
    /// Journal requests waiting for room in the journal device's queue.
    jdeferred: VecDeque<IoRequest>,
    /// Pieces whose record is written and waits for a journal flush.
    jflush_waiting: Vec<usize>,
    /// Pieces the journal flush in flight covers. Group commit: one flush
    /// for every record written before it was sent, so a device whose
    /// flush is costly (fdatasync of a file) pays it once per batch.
    jflush_group: Vec<usize>,
    jflush_inflight: bool,
    /// Record buffers to reuse.
    jbufs: Vec<Vec<u8>>,
    /// Reclaim pieces in flight on this channel.
    reclaiming: usize,
    /// Window buffers.
    windows: Windows,
    /// Emptied lists of window buffers (one per member) to reuse.
    buflists: Vec<Vec<WinBuf>>,
    /// Reads sent straight to one member (see `read_fast`), by slot.
    fast: Vec<Option<IoRequest>>,
    free_fast: Vec<usize>,
    /// The volume's write-intent bitmap: a write reaches the members only
    /// once its region's bit is on disk.
    bitmap: Option<Arc<super::bitmap::Bitmap>>,
    /// Set while a scrub runs (the resync after a crash among them), and
    /// left set by a repair cut short: parity may not match its data
    /// where it has not been.
    scrubbing: Arc<std::sync::atomic::AtomicBool>,
    /// Guest requests on this channel (a rebuild yields to them).
    activity: Arc<super::members::Counter>,
}

/// Where a piece's journal record is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LogPhase {
    /// Waiting for room in the log.
    WaitRoom,
    /// Being written.
    Writing,
    /// Written; waiting for a journal flush.
    Flushing,
    /// The journal failed under it: the piece goes on without it.
    Failed,
}

/// What a child request is, as its tag says (the member channels hand
/// the tag back with the completion).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Child {
    /// Piece `piece`'s request to member `member`.
    Member { piece: usize, member: usize },
    /// Piece `piece`'s copy of a write to a hot replacement's new device.
    Replace { piece: usize },
    /// Part `part` of piece `piece`'s journal record (a record goes out
    /// in as many requests as the journal's device needs, in flight at
    /// once: each has a tag of its own, as channels want).
    Journal { piece: usize, part: u8 },
    /// The journal flush covering every record in `jflush_group`.
    JournalFlush,
    /// A read sent straight to `member` by `read_fast`, kept in `slot`.
    Fast { slot: usize, member: usize },
}

impl Child {
    /// Bits of a tag that say the member (or kind).
    const BITS: u64 = 8;
    const MASK: u64 = (1 << Self::BITS) - 1;
    const REPLACE: u64 = Self::MASK - 1;
    const FLUSH: u64 = Self::MASK - 2;
    /// Journal record parts: low values from here up to `FLUSH` (members
    /// are below 64).
    const JOURNAL: u64 = 64;
    /// Parts a journal record may go out in.
    const JOURNAL_PARTS: u64 = Self::FLUSH - Self::JOURNAL;
    const FAST: u64 = 1 << 63;

    fn tag(self) -> u64 {
        let at = |i: usize, low: u64| ((i as u64) << Self::BITS) | low;
        match self {
            Child::Member { piece, member } => at(piece, member as u64),
            Child::Replace { piece } => at(piece, Self::REPLACE),
            Child::Journal { piece, part } => at(piece, Self::JOURNAL + u64::from(part)),
            Child::JournalFlush => Self::FLUSH,
            Child::Fast { slot, member } => Self::FAST | at(slot, member as u64),
        }
    }

    fn of(tag: u64) -> Child {
        let (high, low) = (
            ((tag & !Self::FAST) >> Self::BITS) as usize,
            tag & Self::MASK,
        );
        if tag & Self::FAST != 0 {
            return Child::Fast {
                slot: high,
                member: low as usize,
            };
        }
        match low {
            Self::REPLACE => Child::Replace { piece: high },
            Self::FLUSH => Child::JournalFlush,
            j if (Self::JOURNAL..Self::FLUSH).contains(&j) => Child::Journal {
                piece: high,
                part: (j - Self::JOURNAL) as u8,
            },
            m => Child::Member {
                piece: high,
                member: m as usize,
            },
        }
    }
}

/// Written rows `[lo, hi)` of data index `i` in `stripe` for blocks `[b0, b1)`.
fn rows_of(geo: &Raid5Geometry, stripe: u64, i: u32, b0: u64, b1: u64) -> Option<(u64, u64)> {
    let start = geo.volume_block(stripe, i, 0);
    let end = start + geo.chunk_blocks();
    let (lo, hi) = (b0.max(start), b1.min(end));
    (lo < hi).then(|| (lo - start, hi - start))
}

#[cfg(test)]
mod tests {
    use super::Child;

    #[test]
    fn child_tags_say_what_they_were() {
        let all = [
            Child::Member {
                piece: 0,
                member: 0,
            },
            Child::Member {
                piece: 123_456,
                member: 63,
            },
            Child::Replace { piece: 7 },
            Child::Journal {
                piece: 1 << 40,
                part: 0,
            },
            Child::Journal {
                piece: 3,
                part: (Child::JOURNAL_PARTS - 1) as u8,
            },
            Child::JournalFlush,
            Child::Fast {
                slot: 99,
                member: 2,
            },
        ];
        for c in all {
            assert_eq!(Child::of(c.tag()), c, "{:#x}", c.tag());
        }
    }
}
