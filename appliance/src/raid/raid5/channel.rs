//! The channel's core: requests in, pieces along, completions out.

use std::sync::atomic::Ordering;

use super::rows_of;
use crate::raid::members;
use bdev::{validate, Completion, IoChannel, IoError, IoOp, IoRequest, SgList, SubmitError};

use super::{Child, Kind, LogPhase, Parent, Piece, Plan, Raid5Channel, Stage, Writes};

impl Raid5Channel {
    pub(super) fn bs(&self) -> usize {
        self.info.block_size as usize
    }

    /// Whether member `m` cannot serve `stripe`: failed, or being rebuilt
    /// and not there yet. Stable while the stripe is locked (the rebuild
    /// moves its cursor only under the stripe's lock).
    pub(super) fn down(&self, m: usize, stripe: u64) -> bool {
        self.is_failed(m)
            || self
                .rebuilding
                .as_ref()
                .is_some_and(|(r, c)| *r == m && stripe >= c.load(Ordering::SeqCst))
    }

    /// Whether member `m` takes no IO: failed when this generation began,
    /// seen failing here, or reported gone by any core since.
    #[inline]
    pub(super) fn is_failed(&self, m: usize) -> bool {
        self.failed[m] || self.slots[m].is_gone()
    }

    pub(super) fn down_count(&self, stripe: u64) -> usize {
        (0..self.failed.len())
            .filter(|&m| self.down(m, stripe))
            .count()
    }

    /// Whether the volume has lost data: more than one member down at its
    /// last stripe (a member being rebuilt is down there until its
    /// rebuild has passed it). Its flushes fail then, and so does every
    /// journal checkpoint, whose flush of the members is one of them.
    pub(super) fn lost_data(&self) -> bool {
        self.down_count(self.geo.stripes().saturating_sub(1)) > 1
    }

    /// Whether the write-back cache holds a stripe with two members down,
    /// which no reclaim can write to the members: a drain of it never
    /// ends. A scan of the cache, only once the volume has lost data, and
    /// once per poll (`pump_log` forgets it; review).
    pub(super) fn drain_blocked(&self) -> bool {
        if let Some(b) = self.blocked_seen.get() {
            return b;
        }
        let b = self.lost_data()
            && self
                .journal
                .as_ref()
                .is_some_and(|j| j.cache().any_stripe(|s| self.down_count(s) > 1));
        self.blocked_seen.set(Some(b));
        b
    }

    /// Fail piece `pi` before any member IO: its stripe, or the volume,
    /// has lost data.
    pub(super) fn fail_unwritten(&mut self, pi: usize) {
        if let Some(p) = self.pieces[pi].as_mut() {
            p.error = Some(IoError::DeviceFailed);
            p.pending = 0;
            p.stage = Stage::Writing;
        }
        self.maybe_done(pi);
    }

    pub(super) fn first_down(&self, stripe: u64) -> Option<usize> {
        (0..self.failed.len()).find(|&m| self.down(m, stripe))
    }

    pub(super) fn fail_member(&mut self, m: usize, e: IoError) {
        if !self.failed[m] {
            self.failed[m] = true;
            if !self.slots[m].is_gone() {
                tracing::warn!(volume = %self.info.name, member = m, error = %e, "member failed");
            }
            self.failures.report(m, &self.slots[m], e);
        }
    }

    pub(super) fn alloc_piece(&mut self, p: Piece) -> usize {
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
    pub(super) fn child(
        &mut self,
        pi: usize,
        m: usize,
        op: IoOp,
        block: u64,
        blocks: u64,
        sgl: SgList,
    ) {
        let tag = Child::Member {
            piece: pi,
            member: m,
        }
        .tag();
        // A hot replacement's new device gets every write to its slot. The
        // copy under the stripe lock may already have passed this row; one
        // that comes later copies the same data again.
        let replace_tag = Child::Replace { piece: pi }.tag();
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
    pub(super) fn start(&mut self, pi: usize) {
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

    pub(super) fn new_piece(parent: usize, kind: Kind, stripe: u64, b0: u64, b1: u64) -> Piece {
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
            jdata: Vec::new(),
            jwrites: Writes::new(),
            jphase: LogPhase::WaitRoom,
            jepoch: None,
            jneed: 0,
            wb: false,
            reclaim: None,
            own: Vec::new(),
            admitted: 0,
            worth_caching: None,
            in_bitmap: false,
        }
    }

    /// If the piece has nothing outstanding, move it on.
    pub(super) fn maybe_done(&mut self, pi: usize) {
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
            Stage::Journaling if p.jphase == LogPhase::Failed => self.without_journal(pi),
            // Waiting for room in the log.
            Stage::Journaling if p.jphase == LogPhase::WaitRoom => {}
            Stage::Journaling if p.error.is_some() => self.finish_piece(pi),
            Stage::Journaling if p.jphase == LogPhase::Writing => self.await_journal_flush(pi),
            // A flush sent before the failure answered after it: not into
            // a cache that drains away (the monitor may have found it
            // empty and given the journal up already).
            Stage::Journaling if p.wb && self.journal.as_ref().is_some_and(|j| j.has_failed()) => {
                self.without_journal(pi)
            }
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

    pub(super) fn finish_piece(&mut self, pi: usize) {
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
        // A flush fails only when the volume has lost data (two members
        // down): one member failing its flush is failed, and what was
        // acknowledged is on the others, flushed (md and RAID1 answer
        // such a flush with success too; an error made guests abort
        // their filesystem over a failure the volume survives).
        let flush_failed = p.kind == Kind::Flush && self.lost_data();
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
                let c = Completion {
                    tag: parent.tag,
                    result: parent.error.map_or(Ok(()), Err),
                };
                // (A failed write is answered: nothing to roll back, and a
                // cache that can never drain would hold it for good.)
                if parent.write && c.result.is_ok() && self.journal_unrecorded() {
                    self.jheld.push(c);
                } else {
                    self.done.push(c);
                }
            }
        }
    }

    pub(super) fn on_child(&mut self, c: Completion) {
        let (pi, m) = match Child::of(c.tag) {
            Child::Fast { slot, member } => return self.on_fast(c, slot, member),
            Child::JournalFlush => return self.on_journal_flush(c.result),
            Child::Replace { piece } => return self.on_replace(c, piece),
            Child::Journal { piece, .. } => (piece, None),
            Child::Member { piece, member } => (piece, Some(member)),
        };
        if let (Err(e), Some(m)) = (c.result, m) {
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
        let journal_failed = c.result.is_err() && m.is_none();
        if journal_failed {
            // The members were not touched: the piece is planned again
            // without the journal, which the volume goes on without.
            p.jphase = LogPhase::Failed;
        }
        if journal_failed {
            self.journal_failed();
        }
        self.maybe_done(pi);
    }

    /// A copy of a write to a hot replacement's new device came back.
    pub(super) fn on_replace(&mut self, c: Completion, pi: usize) {
        // Never the write's outcome: a failing new device ends the
        // replacement, the slot's own device still has the data.
        if let (Err(e), Some(r)) = (c.result, self.replace.as_mut()) {
            r.fail(&self.failures, self.failed.len(), e);
        }
        if let Some(p) = self.pieces.get_mut(pi).and_then(|p| p.as_mut()) {
            p.pending = p.pending.saturating_sub(1);
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
    /// Whether completed writes wait (see `jheld`): the journal failed and
    /// its giving up is not on disk yet. Only a monitor records that: a
    /// volume made without one has nobody to wait for; one whose monitor
    /// has closed (the volume stops) keeps them, unanswered.
    pub(super) fn journal_unrecorded(&self) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|j| j.has_failed() && !j.given_up_recorded())
            && self.failures.has_monitor()
    }

    /// Split a request into stripe pieces and start them (the long way).
    pub(super) fn plan_request(&mut self, req: IoRequest) {
        let parent = Parent {
            tag: req.tag,
            lba0: req.offset_blocks,
            zeroes: req.op == IoOp::WriteZeroes,
            write: matches!(req.op, IoOp::Write | IoOp::WriteZeroes),
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

    pub(super) fn poll_children(&mut self, out: &mut Vec<Completion>) -> usize {
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
        self.pump_log();
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.append(&mut self.refused);
        if let Some(ch) = self.jch.as_mut() {
            ch.poll(&mut scratch);
        }
        if let Some(r) = self.replace.as_mut() {
            r.poll(&mut scratch);
        }
        members::poll_members(&mut self.members, &mut scratch);
        for c in scratch.drain(..) {
            self.on_child(c);
        }
        // Children refused while handling completions come back next poll.
        self.scratch = scratch;
        if !self.jheld.is_empty() && !self.journal_unrecorded() {
            self.done.append(&mut self.jheld);
        }
        let n = self.held.pass(self.failures.ledger(), &mut self.done, out);
        self.inflight -= n;
        n
    }
}
