//! One request's life in a queue runner: its chain read and parsed,
//! answered at once or sent to the volume (in pieces when larger than the
//! device takes at once, with a flush after it for a driver without
//! VIRTIO_BLK_F_FLUSH), and its completion written back to the guest.

use bdev::{Completion, IoOp, IoRequest, SubmitError};
use virtio_queue::QueueT;

use super::super::chain::walk_chain_with;
use super::super::pieces::{self, Owed, Pieces};
use super::super::request::{failed_status, parse_with, Parsed, Request, S_OK};
use super::{Dispatch, Inflight, Runner, MAX_CHAIN};

impl Runner {
    /// Read the chain at `head` into `self.descs`; a chain that cannot be
    /// followed leaves it empty (the request is returned unanswered).
    pub(super) fn walk(&mut self, head: u16) {
        let (table, size) = (self.queue.desc_table(), self.queue.size());
        if walk_chain_with(
            &self.mem,
            &self.regions,
            table,
            size,
            head,
            MAX_CHAIN,
            &mut self.descs,
        )
        .is_err()
        {
            self.descs.clear();
        }
    }

    /// Answer the chain in `self.descs` with `status` without sending it;
    /// one with nowhere to put a status is returned unanswered.
    pub(super) fn answer(&mut self, head: u16, status: u8) {
        match parse_with(&self.descs, &self.mem, &self.regions, &self.limits) {
            Some(req) => self.refuse(head, &req, status),
            None => {
                self.stats.refused();
                self.finish_request(head, 0);
            }
        }
    }

    /// Answer `req` with `status`.
    fn refuse(&mut self, head: u16, req: &Request, status: u8) {
        // SAFETY: `status` was translated inside guest memory.
        unsafe { std::ptr::write_volatile(req.status, status) };
        if let Some(log) = &self.log {
            log.mark(req.status_gpa, 1);
        }
        self.stats.refused();
        self.finish_request(head, 1);
    }

    /// Parse the chain in `self.descs` and answer or submit it.
    pub(super) fn dispatch(&mut self, head: u16) -> Dispatch {
        let Some(req) = parse_with(&self.descs, &self.mem, &self.regions, &self.limits) else {
            // Nowhere to put a status: hand the buffers back unanswered.
            self.stats.refused();
            self.finish_request(head, 0);
            return Dispatch::Taken;
        };
        match req.action {
            Err(status) => {
                self.refuse(head, &req, status);
                Dispatch::Taken
            }
            Ok(Parsed::Done { written }) => {
                // SAFETY: as above.
                unsafe { std::ptr::write_volatile(req.status, S_OK) };
                if let Some(log) = &self.log {
                    // GET_ID: the serial, at the front of the writable
                    // buffers, and the status. Only the bytes written: a
                    // guest may offer gigabytes, and each page is an
                    // atomic on this core.
                    let mut left = u64::from(written.saturating_sub(1));
                    for d in self.descs.iter().filter(|d| d.write && d.len > 0) {
                        if left == 0 {
                            break;
                        }
                        let n = left.min(u64::from(d.len));
                        log.mark(d.addr, n);
                        left -= n;
                    }
                    log.mark(req.status_gpa, 1);
                }
                self.finish_request(head, written);
                Dispatch::Taken
            }
            Ok(Parsed::Io {
                op,
                offset_blocks,
                num_blocks,
                sg,
                written,
            }) => {
                let write = matches!(op, IoOp::Write | IoOp::WriteZeroes | IoOp::Discard);
                // The version before the check: a change racing it is
                // seen at the next poll.
                let version = self.suspended.version();
                if write && self.suspended.holds(offset_blocks, num_blocks) {
                    return Dispatch::Parked(version);
                }
                let bytes = num_blocks * self.limits.block_size as u64;
                let Some(slot) = self.free.pop() else {
                    return Dispatch::Busy;
                };
                if let Some(q) = &mut self.qos {
                    if !q.admit(op, bytes, self.now) {
                        self.free.push(slot);
                        return Dispatch::Throttled(op, bytes);
                    }
                }
                if self.log.is_some() {
                    self.note_fills(slot as usize, req.status_gpa, op, bytes);
                }
                self.slots[slot as usize] = Some(Inflight {
                    head,
                    status: req.status,
                    written,
                    op,
                    bytes: num_blocks * self.limits.block_size as u64,
                    started: self.now_ns,
                    flushing: false,
                    parts: 1,
                    failed: S_OK,
                    pieces: None,
                });
                let io = IoRequest {
                    op,
                    offset_blocks,
                    num_blocks,
                    sg,
                    tag: slot as u64,
                };
                if matches!(op, IoOp::Read | IoOp::Write) && bytes > u64::from(self.limits.part_max)
                {
                    return self.submit_pieces(slot, io, bytes);
                }
                if let Err(SubmitError::Busy(_)) = self.ch.submit(io) {
                    self.slots[slot as usize] = None;
                    self.free.push(slot);
                    if let Some(q) = &mut self.qos {
                        q.refund(op, bytes);
                    }
                    return Dispatch::Busy;
                }
                Dispatch::Taken
            }
        }
    }

    /// Put a finished chain on the used ring and release its gates.
    pub(super) fn finish_request(&mut self, head: u16, written: u32) {
        if let Some(i) = &mut self.inflight {
            i.before_used(head);
        }
        self.ring.add_used(head, written);
        if let Some(i) = &mut self.inflight {
            i.after_used(head, self.ring.next_used());
        }
        self.signal_pending = true;
        self.vol_gate.end();
        self.mem_gate.end();
    }

    /// Keep what the completion of the request in `slot` (the chain in
    /// `self.descs`) marks: its status byte, and for a read the
    /// device-writable buffers but the status byte, `bytes` at most (the
    /// read's data: a chain walked again when logging goes on is the
    /// guest's to rewrite meanwhile, and claimed lengths of gigabytes held
    /// its reactor marking pages, a zero-length status descriptor
    /// underflowed: audit).
    pub(super) fn note_fills(&mut self, slot: usize, status_gpa: u64, op: IoOp, bytes: u64) {
        let Some((status, fills)) = self.logged.get_mut(slot) else {
            return;
        };
        *status = status_gpa;
        fills.clear();
        if op == IoOp::Read {
            let n = self.descs.len();
            let mut left = bytes;
            for (i, d) in self.descs.iter().enumerate().filter(|(_, d)| d.write) {
                let len = (d.len as u64)
                    .saturating_sub(u64::from(i + 1 == n))
                    .min(left);
                if len > 0 {
                    fills.push((d.addr, len));
                    left -= len;
                }
            }
        }
    }

    pub(super) fn complete(&mut self, c: Completion) {
        let index = pieces::slot_of(c.tag);
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let Some(req) = slot.as_mut() else {
            return;
        };
        let mut status = match c.result {
            Ok(()) => S_OK,
            Err(e) => {
                tracing::debug!(queue = self.index, error = %e, "request failed");
                failed_status(&e)
            }
        };
        // The common case, one device request that went well with nothing
        // owed after it, goes straight to the answer.
        if req.parts != 1 || self.write_through || status != S_OK || req.failed != S_OK {
            if req.failed == S_OK {
                req.failed = status;
            }
            req.parts = req.parts.saturating_sub(1);
            if req.parts > 0 {
                return;
            }
            if self.write_through
                && req.failed == S_OK
                && matches!(req.op, IoOp::Write | IoOp::WriteZeroes)
                && !req.flushing
            {
                req.flushing = true;
                req.parts = 1;
                self.owed.push_back(Owed::Flush(index as u32));
                self.send_owed();
                return;
            }
            status = req.failed;
        }
        let Some(req) = slot.take() else {
            return;
        };
        self.free.push(index as u32);
        let ok = status == S_OK;
        self.stats.record(
            req.op,
            req.bytes,
            self.now_ns.saturating_sub(req.started),
            ok,
        );
        let written = if ok { req.written } else { 1 };
        // SAFETY: the status byte is inside guest memory, which cannot be
        // unmapped while this request is in flight (memory gate).
        unsafe { std::ptr::write_volatile(req.status, status) };
        if let Some(log) = &self.log {
            // After the device wrote them, before the used index shows
            // the request: a log sync in between copies them again.
            if let Some((status, fills)) = self.logged.get(index) {
                for &(gpa, len) in fills {
                    log.mark(gpa, len);
                }
                log.mark(*status, 1);
            }
        }
        self.finish_request(req.head, written);
    }

    /// Send what taken requests still owe the device (pieces of large
    /// ones, flushes after the writes of a driver without
    /// VIRTIO_BLK_F_FLUSH), as far as the channel takes them. Their slots
    /// stay in flight meanwhile: a suspend or a stop waits for them.
    pub(super) fn send_owed(&mut self) {
        while let Some(&owed) = self.owed.front() {
            let (slot, io) = match owed {
                Owed::Flush(slot) => (slot, Some(pieces::flush(slot))),
                Owed::Pieces(slot) => (
                    slot,
                    self.slots
                        .get(slot as usize)
                        .and_then(|s| s.as_ref()?.pieces.as_ref()?.peek(slot)),
                ),
            };
            let Some(io) = io else {
                self.owed.pop_front();
                continue;
            };
            if let Err(SubmitError::Busy(_)) = self.ch.submit(io) {
                return;
            }
            let more = match owed {
                Owed::Flush(_) => false,
                Owed::Pieces(_) => self
                    .slots
                    .get_mut(slot as usize)
                    .and_then(|s| s.as_mut()?.pieces.as_mut())
                    .is_some_and(|p| p.sent()),
            };
            if !more {
                self.owed.pop_front();
            }
        }
    }

    /// Request `io` of `bytes` in `slot`, larger than the device takes at
    /// once, in pieces (see `pieces`). Taken once its first piece is: the
    /// others go as the channel has room.
    pub(super) fn submit_pieces(&mut self, slot: u32, io: IoRequest, bytes: u64) -> Dispatch {
        let op = io.op;
        let mut p = Pieces::new(io, self.limits.block_size, self.limits.part_max);
        let first = p.peek(slot);
        let taken =
            first.is_some_and(|io| !matches!(self.ch.submit(io), Err(SubmitError::Busy(_))));
        if !taken {
            self.slots[slot as usize] = None;
            self.free.push(slot);
            if let Some(q) = &mut self.qos {
                q.refund(op, bytes);
            }
            return Dispatch::Busy;
        }
        let n = p.count();
        if p.sent() {
            self.owed.push_back(Owed::Pieces(slot));
        }
        if let Some(Some(req)) = self.slots.get_mut(slot as usize) {
            req.parts = n as u32;
            req.pieces = Some(Box::new(p));
        }
        self.send_owed();
        Dispatch::Taken
    }
}
