//! The IO queue side of a connection: IO commands checked, their data
//! taken (in the capsule or by R2T/H2CData), admitted through the volume's
//! IO limits and gate in order, submitted to the volume's channel, and
//! answered (read data spliced into the output without a copy); and the
//! move to a new volume generation once nothing is in flight.

use bdev::{IoOp, IoRequest, IoVec, SgList, SubmitError};
use nvme::spec::{Sqe, Status};
use nvmf::capsule::{self, status};
use nvmf::pdu::{self, fes, DataHeader, R2t};
use poller::Ctx;
use std::sync::atomic::Ordering;

use super::{whole_read, Conn, Phase, SlotState};
use crate::nvmf::io;
use crate::qos::QueueQos;

/// How soon a queue asks again for a channel the volume's devices had no
/// room for.
const CHANNEL_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// The status for a volume request that failed with `e`. Every failure
/// was a media error with Do Not Retry: a volume whose device timed out
/// (a remote member's target restarting, a controller reset) told the
/// host never to retry; a range the volume no longer has (it shrank while
/// the command waited) was a media error too. A device that failed for
/// good stays a media error, not retried.
fn volume_error(op: IoOp, e: &bdev::IoError) -> Status {
    use bdev::IoError as E;
    match e {
        E::OutOfRange { .. } => Status::LBA_OUT_OF_RANGE,
        E::Unsupported(_) => Status::INVALID_OPCODE,
        E::ZeroLength(_) | E::TooLarge { .. } | E::LengthMismatch { .. } => Status::INVALID_FIELD,
        // Retryable (no DNR, see `capsule::completion`).
        E::TimedOut => status::NS_NOT_READY,
        _ => match op {
            IoOp::Read => Status::UNRECOVERED_READ,
            IoOp::Write | IoOp::WriteZeroes => Status::WRITE_FAULT,
            _ => status::INTERNAL,
        },
    }
}

impl Conn {
    pub(super) fn io_command(&mut self, s: &Sqe, data: &[u8]) {
        let cid = s.cid();
        let Some(io) = &self.io else {
            return self.respond(cid, status::INTERNAL, 0);
        };
        let plan = match io::check(s, &io.info, io.read_only) {
            Ok(p) => p,
            Err(st) => {
                tracing::debug!(opcode = s.opcode(), cdw10 = s.cdw[0], dptr = ?capsule::data_pointer(s), in_capsule = data.len(), status = %st, "nvme/tcp: IO command refused");
                return self.respond(cid, st, 0);
            }
        };
        if plan.in_capsule && data.len() != plan.bytes {
            tracing::debug!(
                opcode = s.opcode(),
                bytes = plan.bytes,
                in_capsule = data.len(),
                "nvme/tcp: in-capsule data of the wrong length"
            );
            return self.respond(cid, status::SGL_LENGTH, 0);
        }
        let Some(i) = self.free.pop() else {
            // More commands than the queue has entries: the host broke
            // flow control.
            return self.fatal(fes::SEQUENCE, 0, &[]);
        };
        let slot = &mut self.slots[i as usize];
        slot.cid = cid;
        slot.plan = plan;
        slot.received = 0;
        slot.pending = 0;
        slot.todo.clear();
        slot.status = Status::SUCCESS;
        slot.corrupt = false;
        slot.flushed = false;
        slot.held = 0;
        let writes_data = matches!(plan.op, IoOp::Write | IoOp::Discard) && plan.bytes > 0;
        if writes_data && plan.in_capsule {
            // Here already (at most the in-capsule size), and held against
            // the budget while it waits: reads and R2Ts wait behind it.
            self.buffer(i);
            self.committed += data.len();
            let slot = &mut self.slots[i as usize];
            slot.held = data.len();
            slot.buf.extend_from_slice(data);
            slot.received = data.len();
            return self.ready(i);
        }
        if plan.op != IoOp::Read && !writes_data {
            return self.ready(i);
        }
        // A read's buffer, or a write's that the host is asked to fill:
        // made only while the connection's data budget has room. Without
        // it, 1,024 writes of 128 KiB with no data sent (72 KiB on the
        // wire) made the target allocate 128 MiB per queue.
        if !self.deferred.is_empty() || !self.budget_has_room(plan.bytes) {
            self.slots[i as usize].state = SlotState::Deferred;
            self.deferred.push_back(i);
            return;
        }
        self.take_data(i);
    }

    /// Whether a command's `bytes` of data fit the budget now (one command
    /// always does, so a queue with nothing in progress never waits). The
    /// budget is the data buffers the connection's commands in progress
    /// may hold (reads being filled and sent, writes being received and
    /// written): up to 4 MiB (32 transfers of 128 KiB, or 1,024 of 4 KiB)
    /// while the target's connections hold less than they may together.
    /// Commands beyond it wait inside the target, which the host cannot
    /// tell from a slow device.
    fn budget_has_room(&mut self, bytes: usize) -> bool {
        self.account
            .may_hold(super::super::Held::Data, self.committed, bytes)
    }

    /// Whether a command that carries `bytes` of data in its capsule may
    /// be taken now. Its data is held against the budget as an R2T's is,
    /// so while the budget has no room the command stays unread, and TCP's
    /// flow control holds the host back: taken at once, in-capsule writes
    /// held 8 MiB per queue behind the volume's limits, and their sum over
    /// connections put every other host's transfers one at a time
    /// (audit). Not while a write waits for its data, which may come behind
    /// the command: only reading on lets it in.
    pub(super) fn may_take_in_capsule(&mut self, bytes: usize) -> bool {
        bytes == 0
            || !matches!(self.phase, Phase::Io { .. })
            || self.awaiting_data > 0
            || self.budget_has_room(bytes)
    }

    /// Start deferred commands, in order, while the budget has room.
    pub(super) fn start_deferred(&mut self) -> bool {
        let mut work = false;
        while let Some(&i) = self.deferred.front() {
            if !self.budget_has_room(self.slots[i as usize].plan.bytes) {
                break;
            }
            self.deferred.pop_front();
            self.take_data(i);
            work = true;
        }
        work
    }

    /// Give slot `i` an empty buffer: a sent one when the output has one
    /// (a free slot holds none, `done` hands its buffer on).
    fn buffer(&mut self, i: u16) {
        let slot = &mut self.slots[i as usize];
        if slot.buf.capacity() == 0 {
            if let Some(b) = self.out.take_spare() {
                slot.buf = b;
            }
        }
        slot.buf.clear();
    }

    /// Make command `i`'s data buffer, held against the budget: a read is
    /// ready for the gate, a write asks the host for its data (R2T).
    fn take_data(&mut self, i: u16) {
        let plan = self.slots[i as usize].plan;
        self.buffer(i);
        self.committed += plan.bytes;
        let slot = &mut self.slots[i as usize];
        slot.held = plan.bytes;
        slot.buf.resize(plan.bytes, 0);
        if plan.op == IoOp::Read {
            return self.ready(i);
        }
        slot.state = SlotState::AwaitData;
        slot.asked = std::time::Instant::now();
        self.awaiting_data += 1;
        let r = R2t {
            cccid: slot.cid,
            ttag: i,
            offset: 0,
            length: plan.bytes as u32,
        };
        pdu::encode_r2t(&r, self.digests, self.out.bytes());
    }

    /// A command has its data: wait for the gate (or, for a Dataset
    /// Management list that does not hold up, answer now).
    pub(super) fn ready(&mut self, i: u16) {
        let num_blocks = self.io.as_ref().map_or(0, |io| io.info.num_blocks);
        let slot = &mut self.slots[i as usize];
        if slot.state == SlotState::AwaitData {
            self.awaiting_data -= 1;
            slot.state = SlotState::Ready;
        }
        if slot.corrupt {
            return self.done(i, status::TRANSPORT);
        }
        if slot.plan.op == IoOp::Discard {
            if slot.plan.ranges == 0 {
                return self.done(i, Status::SUCCESS);
            }
            match io::dsm_ranges(&slot.buf, slot.plan.ranges, num_blocks) {
                Ok(r) => {
                    slot.todo = r.into_iter().map(|(o, n)| (IoOp::Discard, o, n)).collect();
                    if slot.todo.is_empty() {
                        return self.done(i, Status::SUCCESS);
                    }
                }
                Err(st) => return self.done(i, st),
            }
        } else {
            let p = slot.plan;
            slot.todo.push_back((p.op, p.offset_blocks, p.num_blocks));
        }
        slot.state = SlotState::Ready;
        self.waiting.push_back(i);
    }

    pub(super) fn h2c_data(&mut self, h: DataHeader, data: &[u8], corrupt: bool, header: &[u8]) {
        let i = h.ttag;
        let ok = self
            .slots
            .get(i as usize)
            .is_some_and(|s| s.state == SlotState::AwaitData && s.cid == h.cccid);
        if !ok {
            return self.fatal(fes::INVALID_HEADER, 10, header);
        }
        let slot = &mut self.slots[i as usize];
        let (at, len) = (h.offset as usize, h.length as usize);
        if at != slot.received || at + len > slot.buf.len() {
            return self.fatal(fes::OUT_OF_RANGE, 12, header);
        }
        if corrupt {
            slot.corrupt = true;
        } else {
            slot.buf[at..at + len].copy_from_slice(data);
        }
        slot.received += len;
        let full = slot.received == slot.buf.len();
        if full != h.last {
            return self.fatal(fes::SEQUENCE, 1, header);
        }
        if full {
            self.ready(i);
        }
    }

    /// Admit waiting commands through the volume's IO limits and its
    /// gate, in order.
    pub(super) fn start_waiting(&mut self, ctx: &mut Ctx) -> bool {
        let mut work = false;
        let now = ctx.now();
        while let Some(&i) = self.waiting.front() {
            let Some(io) = &mut self.io else { break };
            if io.gate.generation() != io.gen {
                // A new configuration: taken once nothing is in flight.
                break;
            }
            let slot = &self.slots[i as usize];
            let writes = matches!(
                slot.plan.op,
                IoOp::Write | IoOp::WriteZeroes | IoOp::Discard
            );
            if let Phase::Io { sub, .. } = &self.phase {
                let range = sub.volume.suspended_range();
                // Every range of the command (a DSM has several).
                if writes && slot.todo.iter().any(|&(_, off, n)| range.holds(off, n)) {
                    break;
                }
            }
            let (op, bytes) = (
                slot.plan.op,
                slot.plan.num_blocks * io.info.block_size as u64,
            );
            if let Some(q) = &mut io.qos {
                if !q.admit(op, bytes, now) {
                    // Over the limits: look again when they give tokens
                    // (a timer wakes a sleeping reactor).
                    let at = q.recheck_at(op, bytes);
                    if io.qos_timer.is_none_or(|t| t <= now || t > at) {
                        ctx.after(at.saturating_duration_since(now), |_| {});
                        io.qos_timer = Some(at);
                    }
                    break;
                }
            }
            if !io.gate.try_begin() {
                if let Some(q) = &mut io.qos {
                    q.refund(op, bytes);
                }
                break;
            }
            self.waiting.pop_front();
            self.slots[i as usize].state = SlotState::Running;
            self.running += 1;
            self.submitting.push_back(i);
            work = true;
        }
        work
    }

    /// Hand admitted commands' requests to the volume's channel.
    pub(super) fn submit(&mut self) -> bool {
        let mut work = false;
        while let Some(&i) = self.submitting.front() {
            let Some(io) = &mut self.io else { break };
            let slot = &mut self.slots[i as usize];
            let mut busy = false;
            while let Some((op, offset, blocks)) = slot.todo.pop_front() {
                let mut sg = SgList::new();
                if matches!(op, IoOp::Read | IoOp::Write) {
                    // SAFETY: the buffer belongs to the slot, which is not
                    // reused or resized until every request completed.
                    sg.push(unsafe { IoVec::new(slot.buf.as_mut_ptr(), slot.buf.len()) });
                }
                let req = IoRequest {
                    op,
                    offset_blocks: offset,
                    num_blocks: blocks,
                    sg,
                    tag: i as u64,
                };
                match io.ch.submit(req) {
                    Ok(()) => {
                        slot.pending += 1;
                        work = true;
                    }
                    Err(SubmitError::Busy(_)) => {
                        slot.todo.push_front((op, offset, blocks));
                        busy = true;
                        break;
                    }
                }
            }
            if busy {
                break;
            }
            self.submitting.pop_front();
        }
        work
    }

    /// Take the channel's completions.
    pub(super) fn reap(&mut self) -> bool {
        let Some(io) = &mut self.io else {
            return false;
        };
        if io.ch.inflight() == 0 || io.ch.poll(&mut self.comps) == 0 {
            return false;
        }
        let mut comps = std::mem::take(&mut self.comps);
        for c in comps.drain(..) {
            let i = c.tag as u16;
            let Some(slot) = self.slots.get_mut(i as usize) else {
                continue;
            };
            slot.pending = slot.pending.saturating_sub(1);
            if let Err(e) = c.result {
                tracing::debug!(error = %e, "nvme/tcp: volume IO failed");
                if slot.status.ok() {
                    slot.status = volume_error(slot.plan.op, &e);
                }
            }
            if slot.pending > 0 || !slot.todo.is_empty() {
                continue;
            }
            if slot.plan.fua && !slot.flushed && slot.status.ok() {
                // Force Unit Access: durable before it completes.
                slot.flushed = true;
                slot.todo.push_back((IoOp::Flush, 0, 0));
                self.submitting.push_back(i);
                continue;
            }
            let st = slot.status;
            if let Some(io) = &self.io {
                io.gate.end();
            }
            self.done(i, st);
        }
        self.comps = comps;
        true
    }

    /// Answer command `i` and free its slot.
    pub(super) fn done(&mut self, i: u16, st: Status) {
        let slot = &mut self.slots[i as usize];
        let (cid, op) = (slot.cid, slot.plan.op);
        let buf = std::mem::take(&mut slot.buf);
        match slot.state {
            SlotState::Running => self.running -= 1,
            SlotState::AwaitData => self.awaiting_data -= 1,
            _ => {}
        }
        slot.state = SlotState::Free;
        self.committed -= std::mem::take(&mut slot.held);
        // What moved: a failed command's buffer carried nothing (the SMART
        // log counts data read and written, not asked for).
        let bytes = if st.ok() { buf.len() as u64 } else { 0 };
        if let Phase::Io { sub, .. } = &self.phase {
            match op {
                IoOp::Read => {
                    sub.reads.fetch_add(1, Ordering::Relaxed);
                    sub.read_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                IoOp::Write => {
                    sub.writes.fetch_add(1, Ordering::Relaxed);
                    sub.write_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                _ => {}
            }
            if !st.ok() {
                sub.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if st.ok() && op == IoOp::Read {
            // The data goes from this buffer to the socket; the slot takes
            // a sent one next time.
            let h = whole_read(cid, buf.len());
            pdu::encode_data_header(
                false,
                &h,
                buf.len(),
                self.digests,
                self.hpda,
                self.out.bytes(),
            );
            let digest = self.digests.data.then(|| pdu::digest(&buf));
            self.out.data(buf);
            if let Some(d) = digest {
                self.out.bytes().extend_from_slice(&d.to_le_bytes());
            }
        } else {
            // Kept for reuse by any slot, in the output's bounded pool:
            // kept in the slot, every slot of a 1,024-entry queue could
            // hold 128 KiB for good.
            self.out.recycle(buf);
        }
        self.respond(cid, st, 0);
        self.free.push(i);
    }

    /// With nothing in flight, move to the volume's new configuration.
    pub(super) fn refresh_generation(&mut self, ctx: &mut Ctx) {
        let Some(io) = &mut self.io else { return };
        if self.running > 0 || io.ch.inflight() > 0 || io.gate.generation() == io.gen {
            return;
        }
        if io.retry_at.is_some_and(|t| ctx.now() < t) {
            return;
        }
        let (gen, v) = io.gate.config();
        // The old channel (idle) goes first: its device queues make room
        // for the new one's on drives whose queue pairs are few.
        io.ch = Box::new(bdev::FailingChannel::default());
        io.retry_at = None;
        io.ch = match v.device.open_channel() {
            Ok(ch) => ch,
            Err(e @ bdev::BdevError::Exhausted(_)) => {
                // Another opener took the queue pair meanwhile: commands
                // wait (nothing is admitted while the generation is
                // stale) and the open is tried again shortly.
                if io.retry_said != Some(gen) {
                    tracing::warn!(error = %e, "nvme/tcp: no room for the volume's new channel yet; trying again every 20 ms");
                    io.retry_said = Some(gen);
                }
                io.retry_at = Some(ctx.now() + CHANNEL_RETRY);
                ctx.after(CHANNEL_RETRY, |_| {});
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "nvme/tcp: opening the volume's channel for its new configuration failed; IO fails until the next one");
                Box::new(bdev::FailingChannel::default())
            }
        };
        io.info = v.device.info().clone();
        io.gen = gen;
        // New limits come with a new generation.
        if let Phase::Io { sub, .. } = &self.phase {
            let qos = sub.volume.qos();
            let same = match (&io.qos, &qos) {
                (Some(a), Some(b)) => a.shares(b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                io.qos = qos.map(QueueQos::new);
                io.qos_timer = None;
            }
        }
    }
}
