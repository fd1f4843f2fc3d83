//! How a piece is served: which member rows it reads, then the parity it
//! computes and the writes it sends (md's reconstruct-write and
//! read-modify-write, and the degraded plans).

use std::sync::atomic::Ordering;

use super::rows_of;
use bdev::{Completion, IoOp, IoRequest, SgList, SubmitError};

use super::{Child, Kind, LogPhase, Plan, Raid5Channel, Stage, Writes};
use crate::raid::journal::{Entry, JournalMode};
use crate::raid::parity::{xor_gen, xor_into};
use crate::raid::sg;
use crate::raid::window::WinBuf;

/// Per data member: the rows of the chunk a piece touches, if any.
type Rows = smallvec::SmallVec<[Option<(u64, u64)>; 8]>;

impl Raid5Channel {
    pub(super) fn lock_then_plan(&mut self, pi: usize) {
        let unrecorded = self.journal_unrecorded();
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        if unrecorded && p.kind == Kind::Write && p.reclaim.is_none() && !p.locked {
            // The journal failed and its giving up is not on disk: a
            // restart now would replay its records over what a write
            // without one puts on the members (an older record's parity
            // beside this write's data: the write hole again). Guest
            // writes wait for the record, unlocked (the drain's reclaim
            // needs the stripes); the drain's own writes go on. The drain
            // never ends while the cache holds a stripe with two members
            // down (reclaim cannot write it): they fail instead. (Only
            // then: a cache that can drain is given up in moments, and
            // the writes go on; review.)
            if self.drain_blocked() {
                return self.fail_unwritten(pi);
            }
            let Some(p) = self.pieces[pi].as_mut() else {
                return;
            };
            p.stage = Stage::WaitLock;
            p.jneed = 0;
            self.jwait.push_back(pi);
            return;
        }
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
    pub(super) fn parent_sg(&mut self, pi: usize) -> Option<(SgList, u64)> {
        let p = self.pieces[pi].as_mut()?;
        if p.reclaim.is_some() {
            let len = p.own.len();
            return Some((sg::of(&mut p.own, 0, len), p.b0));
        }
        let parent = self.parents[p.parent].as_ref()?;
        Some((parent.sg.clone(), parent.lba0))
    }

    pub(super) fn parent_zeroes(&self, pi: usize) -> bool {
        self.pieces[pi]
            .as_ref()
            .filter(|p| p.reclaim.is_none())
            .and_then(|p| self.parents[p.parent].as_ref())
            .is_some_and(|p| p.zeroes)
    }

    /// Take back a piece's window buffers and the list that held them.
    pub(super) fn recycle(&mut self, mut bufs: Vec<WinBuf>) {
        for b in bufs.drain(..) {
            self.windows.give(b);
        }
        if bufs.capacity() > 0 && self.buflists.len() < 256 {
            self.buflists.push(bufs);
        }
    }

    /// The common read: inside one chunk of a stripe whose member is up
    /// and which the write-back cache does not hold. It goes to that member
    /// as it is, with no parent or piece; the request is kept to go the
    /// long way if the member fails it. Hands the request back otherwise.
    pub(super) fn read_fast(&mut self, req: IoRequest) -> Result<(), IoRequest> {
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
            tag: Child::Fast { slot, member: m }.tag(),
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
    pub(super) fn on_fast(&mut self, c: Completion, slot: usize, m: usize) {
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

    pub(super) fn read_direct(&mut self, pi: usize) {
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
    pub(super) fn plan(&mut self, pi: usize) {
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
            return self.fail_unwritten(pi);
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
                .is_some_and(|j| {
                    j.mode() == JournalMode::WriteBack
                        && j.cache().admit_once(&mut p.worth_caching, p.b0, p.b1)
                });
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
        let rows: Rows = (0..geo.data_members())
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
                // md's rule: a stripe whose parity may not match its data
                // (a resync after a crash has not been there) is written
                // by reconstruct-write. Read-modify-write carries the
                // stale parity on, and a member lost before the resync
                // gets there is rebuilt from it as garbage. While any
                // scrub runs: the write's own bitmap bit hides whether
                // its region was dirty at the crash, and the scrub's
                // cursor is its own (a check costs some reads, no more).
                let may_differ = self.scrubbing.load(Ordering::Relaxed);
                if rcw <= rmw || may_differ {
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
        // Lists and buffers come from the channel's pools: no allocation
        // per piece once the channel has run a while.
        let old = std::mem::take(&mut p.bufs);
        self.recycle(old);
        let mut bufs = self.buflists.pop().unwrap_or_default();
        bufs.reserve_exact(geo.members() as usize);
        for m in 0..geo.members() as usize {
            let b = if needed(m) {
                self.windows.take(wlen)
            } else {
                WinBuf::default()
            };
            bufs.push(b);
        }
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        p.bufs = bufs;
        // Member, from row, to row, buffer row.
        let mut reads: smallvec::SmallVec<[(usize, u64, u64, u64); 16]> = smallvec::SmallVec::new();
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
    pub(super) fn after_reads(&mut self, pi: usize) {
        let Some((psg, lba0)) = self.parent_sg(pi) else {
            return;
        };
        let gone: smallvec::SmallVec<[bool; 8]> =
            (0..self.failed.len()).map(|m| self.is_failed(m)).collect();
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
                let (mut lost, rest): (WinBuf, Vec<&WinBuf>) = {
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
        let rows: Rows = (0..geo.data_members())
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
                let srcs: smallvec::SmallVec<[&[u8]; 8]> = (0..geo.data_members())
                    .map(|i| p.bufs[geo.data_member(stripe, i) as usize].as_slice())
                    .collect();
                xor_gen(&mut pbuf, &srcs);
                drop(srcs);
                p.bufs[parity] = pbuf;
            }
        }
        p.stage = Stage::Writing;
        let mut writes = Writes::new();
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
        writes.retain(|&mut (m, _, _)| Some(m) != failed && !gone[m]);
        // Read once, here: a failure another core sees between two reads
        // would neither park this write nor log it.
        let journal_failed = self.journal.as_ref().is_some_and(|j| j.has_failed());
        let unrecorded = journal_failed
            && self
                .journal
                .as_ref()
                .is_some_and(|j| !j.given_up_recorded())
            && self.failures.has_monitor();
        if p.reclaim.is_none() && unrecorded {
            // The journal failed under this write (see `lock_then_plan`).
            return self.wait_unlocked(pi);
        }
        if let Some(j) = self.journal.clone().filter(|_| !journal_failed) {
            let entries: smallvec::SmallVec<[Entry; 8]> = logged
                .iter()
                .map(|&(m, lo, hi)| Entry {
                    member: m as u32,
                    count: (hi - lo) as u32,
                    block: geo.member_block(stripe, lo),
                })
                .collect();
            let data: smallvec::SmallVec<[&[u8]; 8]> = logged
                .iter()
                .map(|&(m, lo, hi)| &p.bufs[m][buf_off(lo)..buf_off(hi)])
                .collect();
            let mut rec = self.jbufs.pop().unwrap_or_default();
            j.record_into(&mut rec, &entries, &data);
            drop(data);
            p.jrec = rec;
            p.jwrites = writes;
            p.jphase = LogPhase::WaitRoom;
            p.stage = Stage::Journaling;
            self.journal_submit(pi);
            self.maybe_done(pi);
            return;
        }
        self.write_members(pi, writes);
    }

    /// Write the piece's new data and parity to the members.
    pub(super) fn write_members(&mut self, pi: usize, writes: Writes) {
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
}
