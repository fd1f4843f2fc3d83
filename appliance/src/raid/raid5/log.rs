//! The journal and write-back path (md's raid5-cache): a stripe update
//! is logged before the members are written, and in write-back a write is
//! acknowledged once logged and kept in the cache until reclaim writes it
//! through. The rest of the channel reaches it through a few hooks:
//! `journal_submit` (log a piece's record, or wait for room),
//! `await_journal_flush` (group commit), `write_back` / `cache_record` (a
//! write-back piece), `take_reclaim` (reclaim riding on a request),
//! `settle_cache` (what a finished piece means for the cache) and
//! `pump_log` (what waits for room in the log or the journal's queue).

use super::{rows_of, Child};
use bdev::{Completion, IoError, IoOp, IoRequest, SubmitError};

use super::{Kind, LogPhase, Piece, Raid5Channel, Stage};
use crate::raid::cache::WriteCache;
use crate::raid::journal::Entry;
use crate::raid::sg;

/// How long a journal device may refuse a channel before its journal is
/// failed.
const JOURNAL_OPEN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// What [`Raid5Channel::journal_channel`] found.
pub(super) enum JournalChannel {
    /// Open: send.
    Open,
    /// Refused for now: keep the request and ask again next poll.
    Wait,
    /// No journal channel will come: the request fails.
    Gone,
}

impl Raid5Channel {
    pub(super) fn cache(&self) -> Option<&WriteCache> {
        self.journal.as_ref().map(|j| j.cache())
    }

    /// Write-back: log the piece's data alone; it is acknowledged once the
    /// record is durable and cached then (see `maybe_done`).
    pub(super) fn write_back(&mut self, pi: usize) {
        let zeroes = self.parent_zeroes(pi);
        let Some((psg, lba0)) = self.parent_sg(pi) else {
            return;
        };
        let (geo, bs) = (self.geo, self.bs());
        let mut rec = self.jbufs.pop().unwrap_or_default();
        // Borrowed, not cloned, on the path of every write: an atomic
        // right after the member writes' non-temporal stores waits for them.
        let Some(j) = self.journal.as_deref() else {
            return;
        };
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        let (stripe, b0, b1) = (p.stripe, p.b0, p.b1);
        // The data goes in a buffer of its own, which the cache keeps once
        // the record is durable.
        j.cache().give_back(std::mem::take(&mut p.jdata));
        let mut data = j.cache().buffer((b1 - b0) as usize * bs);
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
        j.split_header(&mut rec, &entries, (b1 - b0) as usize, true);
        let mut at = 0;
        for (off, len) in runs {
            if zeroes {
                data[at..at + len].fill(0);
            } else {
                // SAFETY: the parent's buffers are valid until it completes.
                unsafe { sg::copy_out(&psg, off, &mut data[at..at + len]) };
            }
            at += len;
        }
        p.jdata = data;
        p.jrec = rec;
        p.wb = true;
        p.jwrites.clear();
        p.jphase = LogPhase::WaitRoom;
        p.stage = Stage::Journaling;
        self.journal_submit(pi);
        self.maybe_done(pi);
    }

    /// A durable write-back record's blocks go into the cache (the piece
    /// still holds its stripe lock).
    pub(super) fn cache_record(&mut self, pi: usize) {
        let (geo, bs) = (self.geo, self.bs());
        let Some(j) = self.journal.as_deref() else {
            return;
        };
        let c = j.cache();
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        let (stripe, b0, b1, epoch) = (p.stripe, p.b0, p.b1, p.jepoch.unwrap_or(0));
        // The record's data blocks in the order write_back laid them out.
        let mut blocks: smallvec::SmallVec<[u64; 16]> = smallvec::SmallVec::new();
        for i in 0..geo.data_members() {
            if let Some((lo, hi)) = rows_of(&geo, stripe, i, b0, b1) {
                blocks.extend((lo..hi).map(|r| geo.volume_block(stripe, i, r)));
            }
        }
        c.insert_record(stripe, &blocks, std::mem::take(&mut p.jdata), bs, epoch);
        c.release(std::mem::take(&mut p.admitted));
    }

    /// Reclaim up to `stripes` cached stripes with pieces riding on parent
    /// `pa` (which must not complete before they are counted: call before
    /// its own pieces start, or while one of them waits). Returns the
    /// pieces, to start.
    pub(super) fn take_reclaim(&mut self, pa: usize, stripes: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let Some(j) = self.journal.clone() else {
            return out;
        };
        let c = j.cache();
        let sb = self.geo.stripe_blocks();
        let cb = self.geo.chunk_blocks();
        for _ in 0..stripes {
            let Some(stripe) = c.next_dirty() else {
                break;
            };
            // One piece per run of consecutive blocks inside one chunk;
            // their data is taken once the piece holds the stripe lock
            // (`refresh_reclaim`). A run into the next chunk would log and
            // write parity for every row between (a whole chunk for two
            // blocks), past the three log blocks a cached block may cost
            // that guest records leave free: reclaim waited for room only
            // a checkpoint could make, and the checkpoint for the reclaim.
            let cached = c.versions(stripe, stripe * sb, (stripe + 1) * sb);
            let mut k = 0;
            while k < cached.len() {
                let mut e = k + 1;
                while e < cached.len()
                    && cached[e].0 == cached[e - 1].0 + 1
                    && cached[e].0 % cb != 0
                {
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
    pub(super) fn refresh_reclaim(&mut self, pi: usize) -> bool {
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

    /// Put the piece's record in the log, or wait for room.
    pub(super) fn journal_submit(&mut self, pi: usize) {
        let Some(j) = self.journal.as_deref() else {
            return;
        };
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        let guest = p.reclaim.is_none();
        // A write-back record's data is in `jdata`; any other record's is
        // in `jrec` after its header block.
        let bs = self.info.block_size as usize;
        let blocks = ((p.jrec.len() + p.jdata.len()) / bs) as u64;
        // In pieces the journal's device takes (below), each with a tag.
        let most = (u64::from(j.device().info().max_transfer) / bs as u64).max(1);
        if !j.record_fits(blocks) || blocks.div_ceil(most) > Child::JOURNAL_PARTS {
            // It can never be logged (a journal too small for the volume's
            // stripes, or a crafted superblock's tiny log). Written without
            // a record, older records of its stripe would be replayed over
            // it after a crash: the journal is given up instead, as on a
            // device failure (and detached once drained).
            tracing::error!(volume = %self.info.name, blocks, log_half = j.log_blocks() / 2, "a journal record can never fit the log: the journal is given up");
            self.journal_failed();
            return self.without_journal(pi);
        }
        if j.numbers_spent() {
            // A record numbered past the limit is not replayed (a crafted
            // superblock's checkpoint just below it): given up likewise.
            tracing::error!(volume = %self.info.name, "the journal's sequence numbers are spent: the journal is given up");
            self.journal_failed();
            return self.without_journal(pi);
        }
        let reserved = if p.jdata.is_empty() {
            j.reserve(&mut p.jrec, guest)
        } else {
            j.reserve_parts(&mut p.jrec, &p.jdata, guest)
        };
        let Some((at, epoch)) = reserved else {
            p.jneed = blocks;
            if guest {
                // A checkpoint may need this stripe reclaimed before the
                // log has room, so wait unlocked and plan again from the
                // start.
                return self.wait_unlocked(pi);
            }
            self.jwait.push_back(pi);
            return;
        };
        p.jphase = LogPhase::Writing;
        p.jepoch = Some(epoch);
        let len = p.jrec.len();
        let mut sg = sg::of(&mut p.jrec, 0, len);
        if !p.jdata.is_empty() {
            let len = p.jdata.len();
            sg.extend(sg::of(&mut p.jdata, 0, len));
        }
        // In pieces the journal's device takes: a record (a 1 MiB write's
        // data, and parity) may be larger than one request to it (1 MiB on
        // NVMe), and one refused would fail the journal. The record is
        // whole once every piece is written; replay takes a torn one for
        // what it is, never acknowledged.
        let mut done = 0;
        let mut k = 0u8;
        while done < blocks {
            let n = most.min(blocks - done);
            let part = sg::slice(&sg, done as usize * bs, n as usize * bs);
            self.journal_io(
                pi,
                k,
                IoRequest {
                    op: IoOp::Write,
                    offset_blocks: at + done,
                    num_blocks: n,
                    sg: part,
                    tag: 0,
                },
            );
            done += n;
            k += 1;
        }
    }

    /// Forget piece `pi`'s journal record before its members are written:
    /// its log reservation (if any) and cache admission are given back
    /// and its buffer kept for the next record.
    pub(super) fn drop_record(&mut self, pi: usize) {
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        let rec = std::mem::take(&mut p.jrec);
        let data = std::mem::take(&mut p.jdata);
        p.jwrites.clear();
        p.wb = false;
        p.jphase = LogPhase::WaitRoom;
        let (epoch, admitted) = (p.jepoch.take(), std::mem::take(&mut p.admitted));
        if let Some(j) = &self.journal {
            if let Some(e) = epoch {
                j.done(e);
            }
            j.cache().release(admitted);
            j.cache().give_back(data);
        }
        if self.jbufs.len() < 64 {
            self.jbufs.push(rec);
        }
    }

    /// Piece `pi` waits in `jwait` without its stripe lock (and without
    /// its record), to be planned again from the start.
    pub(super) fn wait_unlocked(&mut self, pi: usize) {
        let Some(p) = self.pieces[pi].as_mut() else {
            return;
        };
        let bufs = std::mem::take(&mut p.bufs);
        p.stage = Stage::WaitLock;
        if p.locked {
            p.locked = false;
            self.locks.unlock(p.stripe);
        }
        self.recycle(bufs);
        self.drop_record(pi);
        self.jwait.push_back(pi);
    }

    /// Send a journal request for piece `pi`.
    pub(super) fn journal_io(&mut self, pi: usize, part: u8, mut req: IoRequest) {
        req.tag = Child::Journal { piece: pi, part }.tag();
        if let Some(p) = self.pieces[pi].as_mut() {
            p.pending += 1;
        }
        self.journal_send(req);
    }

    /// Piece `pi`'s record is written: it waits (one more pending) for a
    /// journal flush sent after that.
    pub(super) fn await_journal_flush(&mut self, pi: usize) {
        // A flush after a failed one may succeed without the data of the
        // failed one (fdatasync reports a write-back error once): nothing
        // waits for a flush of a journal that failed.
        if self.journal.as_ref().is_some_and(|j| j.has_failed()) {
            return self.without_journal(pi);
        }
        if let Some(p) = self.pieces[pi].as_mut() {
            p.jphase = LogPhase::Flushing;
            p.pending += 1;
        }
        self.jflush_waiting.push(pi);
        self.flush_journal();
    }

    /// Send one flush for every waiting record, unless one is in flight
    /// (the waiting ones go with the next).
    pub(super) fn flush_journal(&mut self) {
        if self.jflush_inflight || self.jflush_waiting.is_empty() {
            return;
        }
        self.jflush_inflight = true;
        std::mem::swap(&mut self.jflush_group, &mut self.jflush_waiting);
        let mut req = IoRequest::flush(0);
        req.tag = Child::JournalFlush.tag();
        self.journal_send(req);
    }

    /// The group flush is back: its pieces' records are durable (or the
    /// journal failed under them).
    pub(super) fn on_journal_flush(&mut self, result: Result<(), IoError>) {
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
                    p.jphase = LogPhase::Failed;
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

    pub(super) fn journal_send(&mut self, req: IoRequest) {
        if !self.jdeferred.is_empty() {
            self.jdeferred.push_back(req);
            return;
        }
        match self.journal_channel() {
            JournalChannel::Open => {
                if let Some(ch) = self.jch.as_mut() {
                    if let Err(SubmitError::Busy(req)) = ch.submit(req) {
                        self.jdeferred.push_back(req);
                    }
                }
            }
            JournalChannel::Wait => self.jdeferred.push_back(req),
            JournalChannel::Gone => self.refused.push(Completion {
                tag: req.tag,
                result: Err(IoError::DeviceFailed),
            }),
        }
    }

    /// The journal device's channel, opened with the volume's channel; a
    /// refusal is asked again on later polls for `JOURNAL_OPEN_GRACE` (its
    /// queues may all be in use for a moment). Past that, or once the
    /// journal has failed, its requests fail (and so does the journal).
    pub(super) fn journal_channel(&mut self) -> JournalChannel {
        if self.jch.is_some() {
            return JournalChannel::Open;
        }
        let Some(j) = self.journal.clone() else {
            return JournalChannel::Gone;
        };
        if j.has_failed() {
            return JournalChannel::Gone;
        }
        match j.device().open_channel() {
            Ok(ch) => {
                self.jch = Some(ch);
                self.jch_refused = None;
                JournalChannel::Open
            }
            Err(e) => {
                let since = *self.jch_refused.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() < JOURNAL_OPEN_GRACE {
                    JournalChannel::Wait
                } else {
                    tracing::error!(volume = %self.info.name, error = %e, "the journal device refuses a channel");
                    JournalChannel::Gone
                }
            }
        }
    }

    /// What a finished piece means for the write-back cache, under its
    /// stripe lock: a read gets the cached blocks laid over; a reclaim
    /// drops the versions it wrote; a write that went to the members
    /// (write-through under back-pressure) drops the older cached ones.
    pub(super) fn settle_cache(&self, c: &WriteCache, p: &Piece) {
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

    /// Say once that the journal failed, and go on without it. Its log
    /// holds records older than what the members get from now on, which a
    /// restart would replay over them: writes completing from now on are
    /// held until the monitor has drained the cache and recorded that the
    /// volume has no journal (`Raid5Channel::jheld`).
    pub(super) fn journal_failed(&self) {
        if let Some(j) = &self.journal {
            if j.set_failed() {
                tracing::error!(volume = %self.info.name, "journal device failed; writes go on without it (no write-hole protection), and the write-back cache drains to the members");
            }
        }
    }

    /// The journal failed under piece `pi` (still holding its stripe lock,
    /// nothing written to the members): abandon its record and plan it
    /// again, which now takes the journal-less path.
    pub(super) fn without_journal(&mut self, pi: usize) {
        self.drop_record(pi);
        if let Some(p) = self.pieces[pi].as_mut() {
            p.stage = Stage::Reading;
        }
        self.plan(pi);
    }

    /// Pieces waiting for room in the log (a checkpoint made some), and
    /// journal requests waiting for room in the journal device's queue.
    pub(super) fn pump_log(&mut self) {
        self.blocked_seen.set(None);
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
            let lost = !self.jwait.is_empty() && self.lost_data();
            for _ in 0..self.jwait.len() {
                let Some(pi) = self.jwait.pop_front() else {
                    break;
                };
                let Some(p) = self.pieces[pi].as_ref() else {
                    continue;
                };
                let unlocked = p.stage == Stage::WaitLock;
                if j.has_failed() {
                    // No room will come: go on without the journal (a
                    // guest write once its giving up is on disk:
                    // `lock_then_plan` parks it here again until then).
                    if unlocked {
                        self.lock_then_plan(pi);
                    } else {
                        self.without_journal(pi);
                    }
                    continue;
                }
                if !j.has_room(p.jneed, p.reclaim.is_none()) {
                    // Room comes only from a checkpoint, and none succeeds
                    // on a volume that lost data (its flush of the members
                    // fails): a guest write fails, as it would if its own
                    // stripe had lost data, rather than waiting for good
                    // and holding every suspend (a delete included).
                    // Reclaim always finds room.
                    if lost && p.reclaim.is_none() {
                        self.fail_unwritten(pi);
                    } else {
                        self.jwait.push_back(pi);
                    }
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
            match self.journal_channel() {
                JournalChannel::Open => {}
                JournalChannel::Wait => {
                    self.jdeferred.push_front(req);
                    break;
                }
                JournalChannel::Gone => {
                    self.refused.push(Completion {
                        tag: req.tag,
                        result: Err(IoError::DeviceFailed),
                    });
                    continue;
                }
            }
            let Some(ch) = self.jch.as_mut() else {
                break;
            };
            if let Err(SubmitError::Busy(req)) = ch.submit(req) {
                self.jdeferred.push_front(req);
                break;
            }
        }
    }
}
