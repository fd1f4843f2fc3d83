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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bdev::{
    validate, BdevError, BlockDevice, Completion, DeviceInfo, IoChannel, IoError, IoOp, IoRequest,
    SgList, SubmitError,
};

use super::geometry::{Layout, Raid5Geometry};
use super::journal::{Entry, Journal, JournalMode};
use super::level::RaidDevice;
use super::members::{FailureSink, Member, MemberSet, MemberState};
use super::parity::{xor_gen, xor_into};
use super::rebuild::Rows;
use super::sg;

/// Stripe locks: one bit per hash bucket of stripes, shared by all cores.
pub struct StripeLocks {
    words: Box<[AtomicU64]>,
}

impl StripeLocks {
    /// A table of 64 K buckets.
    pub fn new() -> StripeLocks {
        StripeLocks {
            words: (0..1024).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn slot(&self, stripe: u64) -> (usize, u64) {
        let h = stripe.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48;
        ((h as usize / 64) % self.words.len(), 1u64 << (h % 64))
    }

    /// Take the lock of `stripe` if it is free.
    pub fn try_lock(&self, stripe: u64) -> bool {
        let (w, bit) = self.slot(stripe);
        self.words[w].fetch_or(bit, Ordering::Acquire) & bit == 0
    }

    /// Release the lock of `stripe`.
    pub fn unlock(&self, stripe: u64) {
        let (w, bit) = self.slot(stripe);
        self.words[w].fetch_and(!bit, Ordering::Release);
    }
}

impl Default for StripeLocks {
    fn default() -> Self {
        StripeLocks::new()
    }
}

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
        let Some(first) = members.first() else {
            return Err(BdevError::InvalidArgument(format!("{name}: no members")));
        };
        let bs = first.dev.info().block_size;
        if let Some(m) = members.iter().find(|m| m.dev.info().block_size != bs) {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: member {} has block size {}, not {bs}",
                m.dev.info().name,
                m.dev.info().block_size
            )));
        }
        let smallest = members
            .iter()
            .map(|m| m.dev.info().num_blocks)
            .min()
            .unwrap_or(0);
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
        let (chans, _) = super::members::open_members(&self.set.members)?;
        Ok(Box::new(Raid5Channel {
            slots: self.set.members.clone(),
            held: Default::default(),
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
            jch: match &self.journal {
                Some(j) => Some(j.device().open_channel()?),
                None => None,
            },
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
            bufpool: Vec::new(),
            bitmap: self.set.bitmap.clone(),
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
    bufs: Vec<Vec<u8>>,
    error: Option<IoError>,
    /// Journalling: the record, the member writes it covers, and whether
    /// its flush was sent.
    jrec: Vec<u8>,
    jwrites: Vec<(usize, u64, u64)>,
    /// 0: waiting for room in the log; 1: record written; 2: flushed.
    jphase: u8,
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
    /// Counted in its write-intent bitmap region (see `Bitmap::begin`).
    in_bitmap: bool,
}

struct Parent {
    tag: u64,
    lba0: u64,
    sg: SgList,
    /// WRITE_ZEROES: a write whose data is zeroes (no buffer).
    zeroes: bool,
    left: u32,
    error: Option<IoError>,
}

struct Raid5Channel {
    /// The members of this channel's generation: their devices and the
    /// gone flags every core shares.
    slots: Arc<Vec<Member>>,
    /// Completions waiting for a member failure to be recorded.
    held: super::members::HeldCompletions,
    info: DeviceInfo,
    geo: Raid5Geometry,
    members: Vec<Option<Box<dyn IoChannel>>>,
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
    inflight: usize,
    journal: Option<Arc<Journal>>,
    /// This core's channel to the journal device.
    jch: Option<Box<dyn IoChannel>>,
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
    /// Window buffers to reuse.
    bufpool: Vec<Vec<u8>>,
    /// Reads sent straight to one member (see `read_fast`), by slot.
    fast: Vec<Option<IoRequest>>,
    free_fast: Vec<usize>,
    /// The volume's write-intent bitmap: a write reaches the members only
    /// once its region's bit is on disk.
    bitmap: Option<Arc<super::bitmap::Bitmap>>,
    /// A hot replacement's new device: it gets every write to its slot.
    replace: Option<super::members::ReplaceChannel>,
    /// Guest requests on this channel (a rebuild yields to them).
    activity: Arc<super::members::Counter>,
}

/// The child tag's member field for writes to a replacement device.
const REPLACE: usize = JOURNAL - 1;

/// The child tag's member field for the journal flush that covers the
/// records of every piece in `jflush_group`.
const JOURNAL_FLUSH: usize = JOURNAL - 2;

/// Child tag bit of a read sent by `read_fast`.
const FAST: u64 = 1 << 63;

/// A piece's `jphase` once its journal IO failed.
const JOURNAL_FAILED: u8 = 3;

/// The child tag's member field for journal IO.
const JOURNAL: usize = (1 << MEMBER_BITS) - 1;

const MEMBER_BITS: u64 = 8;

/// Written rows `[lo, hi)` of data index `i` in `stripe` for blocks `[b0, b1)`.
fn rows_of(geo: &Raid5Geometry, stripe: u64, i: u32, b0: u64, b1: u64) -> Option<(u64, u64)> {
    let start = geo.volume_block(stripe, i, 0);
    let end = start + geo.chunk_blocks();
    let (lo, hi) = (b0.max(start), b1.min(end));
    (lo < hi).then(|| (lo - start, hi - start))
}

impl Raid5Channel {
    fn bs(&self) -> usize {
        self.info.block_size as usize
    }

    /// Whether member `m` cannot serve `stripe`: failed, or being rebuilt
    /// and not there yet. Stable while the stripe is locked (the rebuild
    /// moves its cursor only under the stripe's lock).
    fn down(&self, m: usize, stripe: u64) -> bool {
        self.is_failed(m)
            || self
                .rebuilding
                .as_ref()
                .is_some_and(|(r, c)| *r == m && stripe >= c.load(Ordering::SeqCst))
    }

    /// Whether member `m` takes no IO: failed when this generation began,
    /// seen failing here, or reported gone by any core since.
    #[inline]
    fn is_failed(&self, m: usize) -> bool {
        self.failed[m] || self.slots[m].is_gone()
    }

    fn down_count(&self, stripe: u64) -> usize {
        (0..self.failed.len())
            .filter(|&m| self.down(m, stripe))
            .count()
    }

    fn first_down(&self, stripe: u64) -> Option<usize> {
        (0..self.failed.len()).find(|&m| self.down(m, stripe))
    }

    fn fail_member(&mut self, m: usize, e: IoError) {
        if !self.failed[m] {
            self.failed[m] = true;
            if !self.slots[m].is_gone() {
                tracing::warn!(volume = %self.info.name, member = m, error = %e, "member failed");
            }
            self.failures.report(m, &self.slots[m], e);
        }
    }

    fn alloc_piece(&mut self, p: Piece) -> usize {
        match self.free_pieces.pop() {
            Some(i) => {
                self.pieces[i] = Some(p);
                i
            }
            None => {
                self.pieces.push(Some(p));
                self.pieces.len() - 1
            }
        }
    }

    /// Send one child request for piece `pi` to member `m`. A full member
    /// queue or a failed member counts as a failed child.
    fn child(&mut self, pi: usize, m: usize, op: IoOp, block: u64, blocks: u64, sgl: SgList) {
        let tag = ((pi as u64) << MEMBER_BITS) | m as u64;
        // A hot replacement's new device gets every write to its slot. The
        // copy under the stripe lock may already have passed this row; one
        // that comes later copies the same data again.
        let replace_tag = ((pi as u64) << MEMBER_BITS) | REPLACE as u64;
        let mirrored = op == IoOp::Write
            && self
                .replace
                .as_mut()
                .filter(|r| r.slot == m)
                .is_some_and(|r| r.send(op, block, blocks, sgl.clone(), replace_tag));
        if let Some(p) = self.pieces[pi].as_mut() {
            p.pending += 1 + mirrored as u32;
        }
        let req = IoRequest {
            op,
            offset_blocks: block,
            num_blocks: blocks,
            sg: sgl,
            tag,
        };
        if !self.deferred.is_empty() {
            // Keep order behind children already waiting for room.
            self.deferred.push_back((m, req));
            return;
        }
        let failed = self.is_failed(m);
        match self.members[m].as_mut() {
            Some(ch) if !failed => {
                if let Err(SubmitError::Busy(req)) = ch.submit(req) {
                    // The member's queue is full: not a failure, just later.
                    self.deferred.push_back((m, req));
                }
            }
            _ => self.refused.push(Completion {
                tag,
                result: Err(IoError::DeviceFailed),
            }),
        }
    }

    /// Start (or restart, after a member failed) piece `pi`.
    fn start(&mut self, pi: usize) {
        let Some(p) = self.pieces[pi].as_ref() else {
            return;
        };
        match p.kind {
            Kind::Flush => {
                if let Some(p) = self.pieces[pi].as_mut() {
                    p.stage = Stage::Writing;
                }
                for m in 0..self.members.len() {
                    if !self.is_failed(m) {
                        self.child(pi, m, IoOp::Flush, 0, 0, SgList::new());
                    }
                }
                self.maybe_done(pi);
            }
            Kind::Read => {
                let (stripe, b0, b1) = (p.stripe, p.b0, p.b1);
                let touches_failed = (0..self.geo.data_members()).any(|i| {
                    rows_of(&self.geo, stripe, i, b0, b1).is_some()
                        && self.down(self.geo.data_member(stripe, i) as usize, stripe)
                });
                // Blocks in the write-back cache are newer than the members:
                // read under the stripe lock and lay them over.
                let cached = self.cache().is_some_and(|c| c.has_stripe(stripe));
                if touches_failed || cached {
                    self.lock_then_plan(pi);
                } else {
                    self.read_direct(pi);
                }
            }
            Kind::Write => self.lock_then_plan(pi),
        }
    }

    fn lock_then_plan(&mut self, pi: usize) {
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        if let (Kind::Write, Some(b)) = (p.kind, &self.bitmap) {
            // Not holding the stripe lock while the bit is written.
            let r = b.region(p.stripe);
            if !p.in_bitmap {
                b.begin(r, r);
                p.in_bitmap = true;
            }
            if !b.ready(r, r) {
                p.stage = Stage::WaitLock;
                self.waiting.push_back(pi);
                return;
            }
        }
        if !p.locked {
            if !self.locks.try_lock(p.stripe) {
                p.stage = Stage::WaitLock;
                self.waiting.push_back(pi);
                return;
            }
            p.locked = true;
        }
        let (kind, stripe) = (p.kind, p.stripe);
        if kind == Kind::Read && self.down_count(stripe) == 0 {
            self.read_direct(pi);
        } else {
            self.plan(pi);
        }
    }

    /// The piece's new data (or read target) and the volume block it
    /// starts at: the parent's buffers, or a reclaim's own.
    fn parent_sg(&mut self, pi: usize) -> Option<(SgList, u64)> {
        let p = self.pieces[pi].as_mut()?;
        if p.reclaim.is_some() {
            let len = p.own.len();
            return Some((sg::of(&mut p.own, 0, len), p.b0));
        }
        let parent = self.parents[p.parent].as_ref()?;
        Some((parent.sg.clone(), parent.lba0))
    }

    fn parent_zeroes(&self, pi: usize) -> bool {
        self.pieces[pi]
            .as_ref()
            .filter(|p| p.reclaim.is_none())
            .and_then(|p| self.parents[p.parent].as_ref())
            .is_some_and(|p| p.zeroes)
    }

    /// A window buffer of `len` bytes. Reused, not zeroed: every plan
    /// fills the parts it reads back (reads, new data or computed parity).
    /// Fresh buffers per piece cost a page fault per 4 KiB once the
    /// allocator hands large freed blocks back to the kernel: full-stripe
    /// writes ran at a third of their speed.
    fn window_buf(&mut self, len: usize) -> Vec<u8> {
        let mut b = self.bufpool.pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    fn recycle(&mut self, bufs: Vec<Vec<u8>>) {
        for b in bufs {
            if b.capacity() > 0 && b.capacity() <= 4 << 20 && self.bufpool.len() < 256 {
                self.bufpool.push(b);
            }
        }
    }

    fn cache(&self) -> Option<&super::cache::WriteCache> {
        self.journal.as_ref().map(|j| j.cache())
    }

    /// The common read: inside one chunk of a stripe whose member is up
    /// and which the write-back cache does not hold. It goes to that member
    /// as it is, with no parent or piece; the request is kept to go the
    /// long way if the member fails it. Hands the request back otherwise.
    fn read_fast(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        if req.op != IoOp::Read || !self.deferred.is_empty() {
            return Err(req);
        }
        let chunk = self.geo.chunk_blocks();
        let stripe_blocks = self.geo.stripe_blocks();
        let stripe = req.offset_blocks / stripe_blocks;
        let within = req.offset_blocks % stripe_blocks;
        let i = within / chunk;
        if (within + req.num_blocks - 1) / chunk != i {
            return Err(req);
        }
        let m = self.geo.data_member(stripe, i as u32) as usize;
        if self.down(m, stripe) || self.cache().is_some_and(|c| c.has_stripe(stripe)) {
            return Err(req);
        }
        let slot = match self.free_fast.pop() {
            Some(k) => k,
            None => {
                self.fast.push(None);
                self.fast.len() - 1
            }
        };
        let child = IoRequest {
            op: IoOp::Read,
            offset_blocks: self.geo.member_block(stripe, within % chunk),
            num_blocks: req.num_blocks,
            sg: req.sg.clone(),
            tag: FAST | (slot as u64) << MEMBER_BITS | m as u64,
        };
        let Some(ch) = self.members[m].as_mut() else {
            self.free_fast.push(slot);
            return Err(req);
        };
        match ch.submit(child) {
            Ok(()) => {
                self.fast[slot] = Some(req);
                Ok(())
            }
            Err(SubmitError::Busy(_)) => {
                self.free_fast.push(slot);
                Err(req)
            }
        }
    }

    /// A `read_fast` child came back: complete the request, or, if the
    /// member failed it, report the member and serve the request the long
    /// way (reconstructing from the others).
    fn on_fast(&mut self, c: Completion) {
        let slot = ((c.tag & !FAST) >> MEMBER_BITS) as usize;
        let m = (c.tag & ((1 << MEMBER_BITS) - 1)) as usize;
        let Some(req) = self.fast.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free_fast.push(slot);
        match c.result {
            Ok(()) => self.done.push(Completion {
                tag: req.tag,
                result: Ok(()),
            }),
            Err(e) => {
                if m < self.failed.len() {
                    self.fail_member(m, e);
                }
                self.plan_request(req);
            }
        }
    }

    fn read_direct(&mut self, pi: usize) {
        let Some((psg, lba0)) = self.parent_sg(pi) else {
            return;
        };
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        p.stage = Stage::Reading;
        p.plan = Plan::Direct;
        p.read_failed = false;
        let (stripe, b0, b1) = (p.stripe, p.b0, p.b1);
        let bs = self.bs();
        for i in 0..self.geo.data_members() {
            if let Some((lo, hi)) = rows_of(&self.geo, stripe, i, b0, b1) {
                let m = self.geo.data_member(stripe, i) as usize;
                let vb = self.geo.volume_block(stripe, i, lo);
                let user = sg::slice(&psg, ((vb - lba0) as usize) * bs, ((hi - lo) as usize) * bs);
                self.child(
                    pi,
                    m,
                    IoOp::Read,
                    self.geo.member_block(stripe, lo),
                    hi - lo,
                    user,
                );
            }
        }
        self.maybe_done(pi);
    }

    /// Choose how to serve a locked piece and issue its reads.
    fn plan(&mut self, pi: usize) {
        let Some(stripe) = self.pieces[pi].as_ref().map(|p| p.stripe) else {
            return;
        };
        let failed_count = self.down_count(stripe);
        let failed: Option<usize> = self.first_down(stripe);
        let geo = self.geo;
        let bs = self.bs();
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        p.read_failed = false;
        if failed_count > 1 {
            p.error = Some(IoError::DeviceFailed);
            p.pending = 0;
            p.stage = Stage::Writing;
            self.maybe_done(pi);
            return;
        }
        if p.reclaim.is_some() && !self.refresh_reclaim(pi) {
            // Its blocks left the cache meanwhile (a newer write went to
            // the members): nothing to write, and writing would be wrong.
            if let Some(p) = self.pieces[pi].as_mut() {
                p.stage = Stage::Writing;
                // Drop nothing: what is still cached was not written.
                p.reclaim = Some(Vec::new());
            }
            self.maybe_done(pi);
            return;
        }
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        if p.kind == Kind::Write && p.reclaim.is_none() {
            let n = p.b1 - p.b0;
            let wb = self
                .journal
                .as_ref()
                .filter(|j| !j.has_failed())
                .is_some_and(|j| j.mode() == JournalMode::WriteBack && j.cache().admit(p.b0, p.b1));
            if wb {
                p.admitted = n;
                self.write_back(pi);
                return;
            }
        }
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        let (stripe, b0, b1) = (p.stripe, p.b0, p.b1);
        let parity = geo.parity_member(stripe) as usize;
        let rows: Vec<Option<(u64, u64)>> = (0..geo.data_members())
            .map(|i| rows_of(&geo, stripe, i, b0, b1))
            .collect();
        let omin = rows.iter().flatten().map(|r| r.0).min().unwrap_or(0);
        let omax = rows.iter().flatten().map(|r| r.1).max().unwrap_or(0);
        let window = omax - omin;
        p.omin = omin;
        p.omax = omax;
        p.missing = failed;
        let plan = match (p.kind, failed) {
            (Kind::Read, _) => Plan::Reconstruct,
            (_, Some(f)) if f == parity => Plan::NoParity,
            (_, Some(_)) => Plan::Reconstruct,
            _ => {
                let written: u64 = rows.iter().flatten().map(|r| r.1 - r.0).sum();
                let rcw = window * geo.data_members() as u64 - written;
                let rmw = written + window;
                if rcw <= rmw {
                    Plan::Rcw
                } else {
                    Plan::Rmw
                }
            }
        };
        p.plan = plan;
        p.stage = Stage::Reading;
        // Window buffers only for the members this plan touches.
        let wlen = window as usize * bs;
        let needed = |m: usize| -> bool {
            let data = geo.data_index_of(stripe, m as u32);
            match plan {
                Plan::Reconstruct | Plan::Rcw => true,
                Plan::Rmw => m == parity || data.is_some_and(|i| rows[i as usize].is_some()),
                Plan::NoParity => data.is_some_and(|i| rows[i as usize].is_some()),
                Plan::Direct => false,
            }
        };
        let old = std::mem::take(&mut p.bufs);
        self.recycle(old);
        let bufs: Vec<Vec<u8>> = (0..geo.members() as usize)
            .map(|m| {
                if needed(m) {
                    self.window_buf(wlen)
                } else {
                    Vec::new()
                }
            })
            .collect();
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        p.bufs = bufs;
        let mut reads: Vec<(usize, u64, u64, u64)> = Vec::new(); // member, from row, to row, buf row
        match plan {
            Plan::Reconstruct => {
                for m in 0..geo.members() as usize {
                    if Some(m) != failed {
                        reads.push((m, omin, omax, omin));
                    }
                }
            }
            Plan::Rcw => {
                for (i, r) in rows.iter().enumerate() {
                    let m = geo.data_member(stripe, i as u32) as usize;
                    let (lo, hi) = r.unwrap_or((omax, omax));
                    if omin < lo {
                        reads.push((m, omin, lo.min(omax), omin));
                    }
                    if hi < omax {
                        reads.push((m, hi.max(omin), omax, hi.max(omin)));
                    }
                }
            }
            Plan::Rmw => {
                for (i, r) in rows.iter().enumerate() {
                    if let Some((lo, hi)) = *r {
                        reads.push((geo.data_member(stripe, i as u32) as usize, lo, hi, lo));
                    }
                }
                reads.push((parity, omin, omax, omin));
            }
            Plan::NoParity | Plan::Direct => {}
        }
        for (m, lo, hi, at) in reads {
            let off = ((at - omin) as usize) * bs;
            let len = ((hi - lo) as usize) * bs;
            let Some(p) = self.pieces[pi].as_mut() else {
                return;
            };
            let target = sg::of(&mut p.bufs[m], off, len);
            self.child(
                pi,
                m,
                IoOp::Read,
                geo.member_block(stripe, lo),
                hi - lo,
                target,
            );
        }
        self.maybe_done(pi);
    }

    /// The piece's reads are in: compute and write (or copy out, for reads).
    fn after_reads(&mut self, pi: usize) {
        let Some((psg, lba0)) = self.parent_sg(pi) else {
            return;
        };
        let gone: Vec<bool> = (0..self.failed.len()).map(|m| self.is_failed(m)).collect();
        let geo = self.geo;
        let bs = self.bs();
        let zeroes = self.parent_zeroes(pi);
        // The new data of a piece: the parent's buffer, or zeroes.
        let new_data = |psg: &SgList, off: usize, dst: &mut [u8]| {
            if zeroes {
                dst.fill(0);
            } else {
                // SAFETY: the parent's buffers are valid until it completes.
                unsafe { sg::copy_out(psg, off, dst) };
            }
        };
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        let failed = p.missing;
        let (stripe, b0, b1, omin, omax) = (p.stripe, p.b0, p.b1, p.omin, p.omax);
        let parity = geo.parity_member(stripe) as usize;
        let user_off = |i: u32, lo: u64| ((geo.volume_block(stripe, i, lo) - lba0) as usize) * bs;
        let buf_off = |lo: u64| ((lo - omin) as usize) * bs;
        if p.plan == Plan::Reconstruct {
            if let Some(f) = failed {
                // The missing member's window is the XOR of all the others.
                let (mut lost, rest): (Vec<u8>, Vec<&Vec<u8>>) = {
                    let lost = std::mem::take(&mut p.bufs[f]);
                    (
                        lost,
                        p.bufs
                            .iter()
                            .enumerate()
                            .filter(|(m, _)| *m != f)
                            .map(|(_, b)| b)
                            .collect(),
                    )
                };
                let srcs: Vec<&[u8]> = rest.iter().map(|b| b.as_slice()).collect();
                xor_gen(&mut lost, &srcs);
                p.bufs[f] = lost;
            }
        }
        if p.kind == Kind::Read {
            for i in 0..geo.data_members() {
                if let Some((lo, hi)) = rows_of(&geo, stripe, i, b0, b1) {
                    let m = geo.data_member(stripe, i) as usize;
                    let src = &p.bufs[m][buf_off(lo)..buf_off(hi)];
                    // SAFETY: the parent's buffers are valid until it completes.
                    unsafe { sg::copy_in(&psg, user_off(i, lo), src) };
                }
            }
            p.stage = Stage::Writing;
            self.maybe_done(pi);
            return;
        }
        // Writes: fold the new data in.
        let rows: Vec<Option<(u64, u64)>> = (0..geo.data_members())
            .map(|i| rows_of(&geo, stripe, i, b0, b1))
            .collect();
        if p.plan == Plan::Rmw {
            let mut pbuf = std::mem::take(&mut p.bufs[parity]);
            for (i, r) in rows.iter().enumerate() {
                if let Some((lo, hi)) = *r {
                    let m = geo.data_member(stripe, i as u32) as usize;
                    let range = buf_off(lo)..buf_off(hi);
                    xor_into(&mut pbuf[range.clone()], &[&p.bufs[m][range.clone()]]);
                    new_data(&psg, user_off(i as u32, lo), &mut p.bufs[m][range.clone()]);
                    xor_into(&mut pbuf[range.clone()], &[&p.bufs[m][range]]);
                }
            }
            p.bufs[parity] = pbuf;
        } else {
            for (i, r) in rows.iter().enumerate() {
                if let Some((lo, hi)) = *r {
                    let m = geo.data_member(stripe, i as u32) as usize;
                    new_data(
                        &psg,
                        user_off(i as u32, lo),
                        &mut p.bufs[m][buf_off(lo)..buf_off(hi)],
                    );
                }
            }
            if p.plan != Plan::NoParity {
                let mut pbuf = std::mem::take(&mut p.bufs[parity]);
                let srcs: Vec<&[u8]> = (0..geo.data_members())
                    .map(|i| p.bufs[geo.data_member(stripe, i) as usize].as_slice())
                    .collect();
                xor_gen(&mut pbuf, &srcs);
                p.bufs[parity] = pbuf;
            }
        }
        p.stage = Stage::Writing;
        let mut writes: Vec<(usize, u64, u64)> = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            if let Some((lo, hi)) = *r {
                writes.push((geo.data_member(stripe, i as u32) as usize, lo, hi));
            }
        }
        if p.plan != Plan::NoParity {
            writes.push((parity, omin, omax));
        }
        // The record covers every block the piece changes, the missing
        // member's too (its new data lives on in parity): replay must know
        // this write is newer than any write-back record of those blocks,
        // or it would bring an older one back. Only the members are
        // written.
        let logged = writes.clone();
        writes.retain(|&(m, _, _)| Some(m) != failed && !gone[m]);
        if let Some(j) = self.journal.clone().filter(|j| !j.has_failed()) {
            let entries: Vec<Entry> = logged
                .iter()
                .map(|&(m, lo, hi)| Entry {
                    member: m as u32,
                    count: (hi - lo) as u32,
                    block: geo.member_block(stripe, lo),
                })
                .collect();
            let data: Vec<&[u8]> = logged
                .iter()
                .map(|&(m, lo, hi)| &p.bufs[m][buf_off(lo)..buf_off(hi)])
                .collect();
            let mut rec = self.jbufs.pop().unwrap_or_default();
            j.record_into(&mut rec, &entries, &data);
            p.jrec = rec;
            p.jwrites = writes;
            p.jphase = 0;
            p.stage = Stage::Journaling;
            self.journal_submit(pi);
            self.maybe_done(pi);
            return;
        }
        self.write_members(pi, writes);
    }

    /// Write-back: log the piece's data alone; it is acknowledged once the
    /// record is durable and cached then (see `maybe_done`).
    fn write_back(&mut self, pi: usize) {
        let Some(j) = self.journal.clone() else {
            return;
        };
        let zeroes = self.parent_zeroes(pi);
        let Some((psg, lba0)) = self.parent_sg(pi) else {
            return;
        };
        let (geo, bs) = (self.geo, self.bs());
        let mut rec = self.jbufs.pop().unwrap_or_default();
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        let (stripe, b0, b1) = (p.stripe, p.b0, p.b1);
        let mut entries = Vec::new();
        let mut runs = Vec::new();
        for i in 0..geo.data_members() {
            if let Some((lo, hi)) = rows_of(&geo, stripe, i, b0, b1) {
                entries.push(Entry {
                    member: geo.data_member(stripe, i),
                    count: (hi - lo) as u32,
                    block: geo.member_block(stripe, lo),
                });
                let vb = geo.volume_block(stripe, i, lo);
                runs.push(((vb - lba0) as usize * bs, (hi - lo) as usize * bs));
            }
        }
        j.record_header(&mut rec, &entries, (b1 - b0) as usize, true);
        let mut at = bs;
        for (off, len) in runs {
            if zeroes {
                rec[at..at + len].fill(0);
            } else {
                // SAFETY: the parent's buffers are valid until it completes.
                unsafe { sg::copy_out(&psg, off, &mut rec[at..at + len]) };
            }
            at += len;
        }
        p.jrec = rec;
        p.wb = true;
        p.jwrites.clear();
        p.jphase = 0;
        p.stage = Stage::Journaling;
        self.journal_submit(pi);
        self.maybe_done(pi);
    }

    /// A durable write-back record's blocks go into the cache (the piece
    /// still holds its stripe lock).
    fn cache_record(&mut self, pi: usize) {
        let (geo, bs) = (self.geo, self.bs());
        let Some(j) = self.journal.clone() else {
            return;
        };
        let c = j.cache();
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        let (stripe, b0, b1, epoch) = (p.stripe, p.b0, p.b1, p.jepoch.unwrap_or(0));
        let mut at = bs;
        for i in 0..geo.data_members() {
            if let Some((lo, hi)) = rows_of(&geo, stripe, i, b0, b1) {
                for r in lo..hi {
                    c.insert(
                        stripe,
                        geo.volume_block(stripe, i, r),
                        &p.jrec[at..at + bs],
                        epoch,
                    );
                    at += bs;
                }
            }
        }
        c.release(std::mem::take(&mut p.admitted));
    }

    /// Reclaim up to `stripes` cached stripes with pieces riding on parent
    /// `pa` (which must not complete before they are counted: call before
    /// its own pieces start, or while one of them waits). Returns the
    /// pieces, to start.
    fn take_reclaim(&mut self, pa: usize, stripes: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let Some(j) = self.journal.clone() else {
            return out;
        };
        let c = j.cache();
        let sb = self.geo.stripe_blocks();
        for _ in 0..stripes {
            let Some(stripe) = c.next_dirty() else {
                break;
            };
            // One piece per run of consecutive blocks; their data is taken
            // once the piece holds the stripe lock (`refresh_reclaim`).
            let cached = c.versions(stripe, stripe * sb, (stripe + 1) * sb);
            let mut k = 0;
            while k < cached.len() {
                let mut e = k + 1;
                while e < cached.len() && cached[e].0 == cached[e - 1].0 + 1 {
                    e += 1;
                }
                let mut piece =
                    Self::new_piece(pa, Kind::Write, stripe, cached[k].0, cached[e - 1].0 + 1);
                piece.reclaim = Some(cached[k..e].to_vec());
                out.push(self.alloc_piece(piece));
                k = e;
            }
        }
        self.reclaiming += out.len();
        if let Some(p) = self.parents.get_mut(pa).and_then(|p| p.as_mut()) {
            p.left += out.len() as u32;
        }
        out
    }

    /// Take a reclaim piece's data from the cache, now that it holds the
    /// stripe lock: only what is cached now may go to the members. False
    /// when a block of its run is no longer cached.
    fn refresh_reclaim(&mut self, pi: usize) -> bool {
        let Some(j) = self.journal.as_ref() else {
            return false;
        };
        let c = j.cache();
        let Some(p) = self.pieces[pi].as_mut() else {
            return false;
        };
        match c.copy_run(p.stripe, p.b0, p.b1, &mut p.own) {
            Some(versions) => {
                p.reclaim = Some(versions);
                true
            }
            None => false,
        }
    }

    fn new_piece(parent: usize, kind: Kind, stripe: u64, b0: u64, b1: u64) -> Piece {
        Piece {
            parent,
            kind,
            stripe,
            b0,
            b1,
            locked: false,
            stage: Stage::Reading,
            plan: Plan::Direct,
            pending: 0,
            read_failed: false,
            missing: None,
            omin: 0,
            omax: 0,
            bufs: Vec::new(),
            error: None,
            jrec: Vec::new(),
            jwrites: Vec::new(),
            jphase: 0,
            jepoch: None,
            jneed: 0,
            wb: false,
            reclaim: None,
            own: Vec::new(),
            admitted: 0,
            in_bitmap: false,
        }
    }

    /// Write the piece's new data and parity to the members.
    fn write_members(&mut self, pi: usize, writes: Vec<(usize, u64, u64)>) {
        let geo = self.geo;
        let bs = self.bs();
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        p.stage = Stage::Writing;
        let (stripe, omin) = (p.stripe, p.omin);
        let buf_off = |lo: u64| ((lo - omin) as usize) * bs;
        for (m, lo, hi) in writes {
            let Some(p) = self.pieces[pi].as_mut() else {
                return;
            };
            let src = sg::of(&mut p.bufs[m], buf_off(lo), ((hi - lo) as usize) * bs);
            self.child(
                pi,
                m,
                IoOp::Write,
                geo.member_block(stripe, lo),
                hi - lo,
                src,
            );
        }
        self.maybe_done(pi);
    }

    /// Put the piece's record in the log, or wait for room.
    fn journal_submit(&mut self, pi: usize) {
        let Some(j) = self.journal.clone() else {
            return;
        };
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        let guest = p.reclaim.is_none();
        let Some((at, epoch)) = j.reserve(&mut p.jrec, guest) else {
            p.jneed = (p.jrec.len() / self.info.block_size as usize) as u64;
            if guest {
                // A checkpoint may need this stripe reclaimed before the
                // log has room, so wait unlocked and plan again from the
                // start.
                p.bufs.clear();
                p.stage = Stage::WaitLock;
                if p.locked {
                    p.locked = false;
                    self.locks.unlock(p.stripe);
                }
                self.drop_record(pi);
            }
            self.jwait.push_back(pi);
            return;
        };
        p.jphase = 1;
        p.jepoch = Some(epoch);
        let len = p.jrec.len();
        let sg = sg::of(&mut p.jrec, 0, len);
        let blocks = (p.jrec.len() / self.info.block_size as usize) as u64;
        self.journal_io(
            pi,
            IoRequest {
                op: IoOp::Write,
                offset_blocks: at,
                num_blocks: blocks,
                sg,
                tag: 0,
            },
        );
    }

    /// The journal failed under piece `pi` (still holding its stripe lock,
    /// nothing written to the members): abandon its record and plan it
    /// again, which now takes the journal-less path.
    fn without_journal(&mut self, pi: usize) {
        self.drop_record(pi);
        if let Some(p) = self.pieces[pi].as_mut() {
            p.stage = Stage::Reading;
        }
        self.plan(pi);
    }

    /// Forget piece `pi`'s journal record before its members are written:
    /// its log reservation (if any) and cache admission are given back
    /// and its buffer kept for the next record.
    fn drop_record(&mut self, pi: usize) {
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        let rec = std::mem::take(&mut p.jrec);
        p.jwrites.clear();
        p.wb = false;
        p.jphase = 0;
        let (epoch, admitted) = (p.jepoch.take(), std::mem::take(&mut p.admitted));
        if let Some(j) = &self.journal {
            if let Some(e) = epoch {
                j.done(e);
            }
            j.cache().release(admitted);
        }
        if self.jbufs.len() < 64 {
            self.jbufs.push(rec);
        }
    }

    /// Send a journal request for piece `pi`.
    fn journal_io(&mut self, pi: usize, mut req: IoRequest) {
        req.tag = ((pi as u64) << MEMBER_BITS) | JOURNAL as u64;
        if let Some(p) = self.pieces[pi].as_mut() {
            p.pending += 1;
        }
        self.journal_send(req);
    }

    /// Piece `pi`'s record is written: it waits (one more pending) for a
    /// journal flush sent after that.
    fn await_journal_flush(&mut self, pi: usize) {
        // A flush after a failed one may succeed without the data of the
        // failed one (fdatasync reports a write-back error once): nothing
        // waits for a flush of a journal that failed.
        if self.journal.as_ref().is_some_and(|j| j.has_failed()) {
            return self.without_journal(pi);
        }
        if let Some(p) = self.pieces[pi].as_mut() {
            p.jphase = 2;
            p.pending += 1;
        }
        self.jflush_waiting.push(pi);
        self.flush_journal();
    }

    /// Send one flush for every waiting record, unless one is in flight
    /// (the waiting ones go with the next).
    fn flush_journal(&mut self) {
        if self.jflush_inflight || self.jflush_waiting.is_empty() {
            return;
        }
        self.jflush_inflight = true;
        std::mem::swap(&mut self.jflush_group, &mut self.jflush_waiting);
        let mut req = IoRequest::flush(0);
        req.tag = JOURNAL_FLUSH as u64;
        self.journal_send(req);
    }

    /// The group flush is back: its pieces' records are durable (or the
    /// journal failed under them).
    fn on_journal_flush(&mut self, result: Result<(), IoError>) {
        self.jflush_inflight = false;
        let mut group = std::mem::take(&mut self.jflush_group);
        if result.is_err() {
            // The waiting records are no better off (see
            // `await_journal_flush`).
            group.append(&mut self.jflush_waiting);
        }
        for &pi in &group {
            if let Some(p) = self.pieces.get_mut(pi).and_then(|p| p.as_mut()) {
                p.pending = p.pending.saturating_sub(1);
                if result.is_err() {
                    p.jphase = JOURNAL_FAILED;
                }
            }
        }
        if result.is_err() {
            self.journal_failed();
        }
        for &pi in &group {
            self.maybe_done(pi);
        }
        group.clear();
        if self.jflush_group.is_empty() {
            self.jflush_group = group;
        }
        self.flush_journal();
    }

    fn journal_send(&mut self, req: IoRequest) {
        if !self.jdeferred.is_empty() {
            self.jdeferred.push_back(req);
            return;
        }
        match self.jch.as_mut() {
            Some(ch) => {
                if let Err(SubmitError::Busy(req)) = ch.submit(req) {
                    self.jdeferred.push_back(req);
                }
            }
            None => self.refused.push(Completion {
                tag: req.tag,
                result: Err(IoError::DeviceFailed),
            }),
        }
    }

    /// If the piece has nothing outstanding, move it on.
    fn maybe_done(&mut self, pi: usize) {
        let Some(p) = self.pieces[pi].as_ref() else {
            return;
        };
        if p.pending > 0 {
            return;
        }
        match p.stage {
            Stage::WaitLock => {}
            Stage::Reading if p.read_failed => {
                // Plan again without the member that failed.
                if p.kind == Kind::Read && !p.locked {
                    self.lock_then_plan(pi);
                } else {
                    self.plan(pi);
                }
            }
            Stage::Reading if p.plan == Plan::Direct => self.finish_piece(pi),
            Stage::Reading => self.after_reads(pi),
            Stage::Journaling if p.jphase == JOURNAL_FAILED => self.without_journal(pi),
            // Waiting for room in the log.
            Stage::Journaling if p.jphase == 0 => {}
            Stage::Journaling if p.error.is_some() => self.finish_piece(pi),
            Stage::Journaling if p.jphase == 1 => self.await_journal_flush(pi),
            Stage::Journaling if p.wb => {
                self.cache_record(pi);
                let Some(p) = self.pieces[pi].as_mut() else {
                    return;
                };
                let rec = std::mem::take(&mut p.jrec);
                if self.jbufs.len() < 64 {
                    self.jbufs.push(rec);
                }
                self.finish_piece(pi);
            }
            Stage::Journaling => {
                let Some(p) = self.pieces[pi].as_mut() else {
                    return;
                };
                let writes = std::mem::take(&mut p.jwrites);
                let rec = std::mem::take(&mut p.jrec);
                // The record is durable: its buffer can serve the next one.
                if self.jbufs.len() < 64 {
                    self.jbufs.push(rec);
                }
                self.write_members(pi, writes);
            }
            Stage::Writing => self.finish_piece(pi),
        }
    }

    fn finish_piece(&mut self, pi: usize) {
        let Some(mut p) = self.pieces[pi].take() else {
            return;
        };
        let bufs = std::mem::take(&mut p.bufs);
        self.recycle(bufs);
        self.free_pieces.push(pi);
        if let Some(c) = self.journal.as_ref().map(|j| j.cache()) {
            c.release(p.admitted);
            self.settle_cache(c, &p);
        }
        if let (Some(j), Some(epoch)) = (&self.journal, p.jepoch) {
            j.done(epoch);
        }
        if p.locked {
            self.locks.unlock(p.stripe);
        }
        if let (true, Some(b)) = (p.in_bitmap, &self.bitmap) {
            let r = b.region(p.stripe);
            b.end(r, r);
        }
        let error = if p.reclaim.is_some() {
            // A failed reclaim leaves its blocks cached (they are durable
            // in the log); it is never the parent's failure.
            self.reclaiming -= 1;
            None
        } else {
            // More than one member gone means data is lost: never pretend.
            p.error.or_else(|| {
                (p.kind != Kind::Flush && self.down_count(p.stripe) > 1)
                    .then_some(IoError::DeviceFailed)
            })
        };
        let flush_failed =
            p.kind == Kind::Flush && (0..self.failed.len()).all(|m| self.is_failed(m));
        let Some(parent) = self.parents.get_mut(p.parent).and_then(|x| x.as_mut()) else {
            return;
        };
        if let Some(e) = error {
            parent.error.get_or_insert(e);
        }
        if flush_failed {
            parent.error.get_or_insert(IoError::DeviceFailed);
        }
        parent.left -= 1;
        if parent.left == 0 {
            if let Some(parent) = self.parents[p.parent].take() {
                self.free_parents.push(p.parent);
                self.done.push(Completion {
                    tag: parent.tag,
                    result: parent.error.map_or(Ok(()), Err),
                });
            }
        }
    }

    /// What a finished piece means for the write-back cache, under its
    /// stripe lock: a read gets the cached blocks laid over; a reclaim
    /// drops the versions it wrote; a write that went to the members
    /// (write-through under back-pressure) drops the older cached ones.
    fn settle_cache(&self, c: &super::cache::WriteCache, p: &Piece) {
        if c.is_empty() || p.error.is_some() {
            if p.reclaim.is_some() && c.has_stripe(p.stripe) {
                c.requeue(p.stripe);
            }
            return;
        }
        match (p.kind, &p.reclaim) {
            (Kind::Read, _) if p.locked => {
                let Some(parent) = self.parents.get(p.parent).and_then(|x| x.as_ref()) else {
                    return;
                };
                let bs = self.bs();
                c.each_in(p.stripe, p.b0, p.b1, |b, d| {
                    // SAFETY: the parent's buffers are valid until it completes.
                    unsafe { sg::copy_in(&parent.sg, (b - parent.lba0) as usize * bs, d) };
                });
            }
            (Kind::Write, Some(v)) => {
                for &(b, version) in v {
                    c.remove_if(p.stripe, b, Some(version));
                }
                if c.has_stripe(p.stripe) {
                    c.requeue(p.stripe);
                }
            }
            (Kind::Write, None) if !p.wb => {
                for b in p.b0..p.b1 {
                    c.remove_if(p.stripe, b, None);
                }
            }
            _ => {}
        }
    }

    /// Say once that the journal failed, and go on without it.
    fn journal_failed(&self) {
        if let Some(j) = &self.journal {
            if !j.has_failed() {
                tracing::error!(volume = %self.info.name, "journal device failed; writes go on without it (no write-hole protection), and the write-back cache drains to the members");
            }
            j.set_failed();
        }
    }

    fn on_child(&mut self, c: Completion) {
        if c.tag & FAST != 0 {
            return self.on_fast(c);
        }
        let pi = (c.tag >> MEMBER_BITS) as usize;
        let m = (c.tag & ((1 << MEMBER_BITS) - 1)) as usize;
        if m == JOURNAL_FLUSH {
            return self.on_journal_flush(c.result);
        }
        if m == REPLACE {
            // Never the write's outcome: a failing new device ends the
            // replacement, the slot's own device still has the data.
            if let (Err(e), Some(r)) = (c.result, self.replace.as_mut()) {
                r.fail(&self.failures, self.failed.len(), e);
            }
            if let Some(p) = self.pieces.get_mut(pi).and_then(|p| p.as_mut()) {
                p.pending = p.pending.saturating_sub(1);
            }
            return self.maybe_done(pi);
        }
        if let Err(e) = c.result {
            if m < self.failed.len() {
                self.fail_member(m, e);
            }
        }
        let Some(p) = self.pieces.get_mut(pi).and_then(|p| p.as_mut()) else {
            return;
        };
        p.pending = p.pending.saturating_sub(1);
        if c.result.is_err() && p.stage == Stage::Reading {
            p.read_failed = true;
        }
        let journal_failed = c.result.is_err() && m == JOURNAL;
        if journal_failed {
            // The members were not touched: the piece is planned again
            // without the journal, which the volume goes on without.
            p.jphase = JOURNAL_FAILED;
        }
        if c.result.is_err() && p.kind == Kind::Flush {
            p.error.get_or_insert(IoError::DeviceFailed);
        }
        if journal_failed {
            self.journal_failed();
        }
        self.maybe_done(pi);
    }
}

impl IoChannel for Raid5Channel {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        self.inflight += 1;
        self.activity.bump();
        if let Err(e) = validate(&self.info, &req) {
            self.done.push(Completion {
                tag: req.tag,
                result: Err(e),
            });
            return Ok(());
        }
        // Zeroes go through stripe buffers like a write: no larger.
        let bytes = req.num_blocks.saturating_mul(self.info.block_size as u64);
        if req.op == IoOp::WriteZeroes && bytes > self.info.max_transfer as u64 {
            self.done.push(Completion {
                tag: req.tag,
                result: Err(IoError::TooLarge {
                    bytes,
                    max: self.info.max_transfer as u64,
                }),
            });
            return Ok(());
        }
        match self.read_fast(req) {
            Ok(()) => Ok(()),
            Err(req) => {
                self.plan_request(req);
                Ok(())
            }
        }
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        self.poll_children(out)
    }

    fn inflight(&self) -> usize {
        self.inflight
    }
}

impl Raid5Channel {
    /// Split a request into stripe pieces and start them (the long way).
    fn plan_request(&mut self, req: IoRequest) {
        let parent = Parent {
            tag: req.tag,
            lba0: req.offset_blocks,
            zeroes: req.op == IoOp::WriteZeroes,
            sg: req.sg,
            left: 0,
            error: None,
        };
        let pa = match self.free_parents.pop() {
            Some(i) => {
                self.parents[i] = Some(parent);
                i
            }
            None => {
                self.parents.push(Some(parent));
                self.parents.len() - 1
            }
        };
        let kind = match req.op {
            IoOp::Read => Kind::Read,
            // Zeroes are written like data, through the same parity
            // paths, so parity stays consistent.
            IoOp::Write | IoOp::WriteZeroes => Kind::Write,
            IoOp::Flush => Kind::Flush,
            op => {
                self.parents[pa] = None;
                self.free_parents.push(pa);
                self.done.push(Completion {
                    tag: req.tag,
                    result: Err(IoError::Unsupported(op)),
                });
                return;
            }
        };
        let new_piece = |parent, stripe, b0, b1| Self::new_piece(parent, kind, stripe, b0, b1);
        // Most requests are one or two stripes: no allocation per IO.
        let mut pieces: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
        if kind == Kind::Flush {
            pieces.push(self.alloc_piece(new_piece(pa, 0, 0, 0)));
        } else {
            let stripe_blocks = self.geo.stripe_blocks();
            let mut b = req.offset_blocks;
            let end = req.offset_blocks + req.num_blocks;
            while b < end {
                let stripe = b / stripe_blocks;
                let b1 = end.min((stripe + 1) * stripe_blocks);
                pieces.push(self.alloc_piece(new_piece(pa, stripe, b, b1)));
                b = b1;
            }
        }
        if let Some(p) = self.parents[pa].as_mut() {
            p.left = pieces.len() as u32;
        }
        // Write-back: writes carry reclaim work along while a checkpoint
        // waits for the cache (two stripes each, more than they add, so
        // the epoch drains).
        if kind == Kind::Write && self.journal.as_ref().is_some_and(|j| j.reclaim_wanted()) {
            let more = self.take_reclaim(pa, 2);
            pieces.extend(more);
        }
        // A flush carries more: on an idle volume, flushes sent through its
        // gate by the control thread are how the cache drains.
        if kind == Kind::Flush && self.journal.as_ref().is_some_and(|j| j.reclaim_wanted()) {
            let more = self.take_reclaim(pa, 16);
            pieces.extend(more);
        }
        for pi in pieces {
            self.start(pi);
        }
    }

    fn poll_children(&mut self, out: &mut Vec<Completion>) -> usize {
        // Pieces waiting for a stripe lock, in arrival order.
        for _ in 0..self.waiting.len() {
            let Some(pi) = self.waiting.pop_front() else {
                break;
            };
            self.lock_then_plan(pi);
        }
        while let Some((m, req)) = self.deferred.pop_front() {
            let tag = req.tag;
            let failed = self.is_failed(m);
            match self.members[m].as_mut() {
                Some(ch) if !failed => {
                    if let Err(SubmitError::Busy(req)) = ch.submit(req) {
                        self.deferred.push_front((m, req));
                        break;
                    }
                }
                _ => self.refused.push(Completion {
                    tag,
                    result: Err(IoError::DeviceFailed),
                }),
            }
        }
        // Pieces waiting for room in the log (a checkpoint made some).
        if let Some(j) = self.journal.clone() {
            if let Some(&first) = self.jwait.front() {
                // Nothing else may bring reclaim along: take it here.
                if self.reclaiming == 0 && j.reclaim_wanted() {
                    if let Some(pa) = self.pieces[first].as_ref().map(|p| p.parent) {
                        for pi in self.take_reclaim(pa, 1) {
                            self.start(pi);
                        }
                    }
                }
            }
            for _ in 0..self.jwait.len() {
                let Some(pi) = self.jwait.pop_front() else {
                    break;
                };
                let Some(p) = self.pieces[pi].as_ref() else {
                    continue;
                };
                let unlocked = p.stage == Stage::WaitLock;
                if j.has_failed() {
                    // No room will come: go on without the journal.
                    if unlocked {
                        self.lock_then_plan(pi);
                    } else {
                        self.without_journal(pi);
                    }
                    continue;
                }
                if !j.has_room(p.jneed, p.reclaim.is_none()) {
                    self.jwait.push_back(pi);
                    continue;
                }
                if unlocked {
                    self.lock_then_plan(pi);
                } else {
                    self.journal_submit(pi);
                }
            }
        }
        while let Some(req) = self.jdeferred.pop_front() {
            let Some(ch) = self.jch.as_mut() else {
                self.refused.push(Completion {
                    tag: req.tag,
                    result: Err(IoError::DeviceFailed),
                });
                continue;
            };
            if let Err(SubmitError::Busy(req)) = ch.submit(req) {
                self.jdeferred.push_front(req);
                break;
            }
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.append(&mut self.refused);
        if let Some(ch) = self.jch.as_mut() {
            ch.poll(&mut scratch);
        }
        if let Some(r) = self.replace.as_mut() {
            r.poll(&mut scratch);
        }
        super::members::poll_members(&mut self.members, &mut scratch);
        for c in scratch.drain(..) {
            self.on_child(c);
        }
        // Children refused while handling completions come back next poll.
        self.scratch = scratch;
        let n = self.held.pass(self.failures.ledger(), &mut self.done, out);
        self.inflight -= n;
        n
    }
}
