//! A namespace as a block device, and its per-core IO channel: one IO queue
//! pair per channel, commands built from scatter-gather lists (PRP lists,
//! split at MDTS, bounced when memory is not registered or not PRP-shaped),
//! polled completions, time-outs, and recovery after a controller reset.

use std::mem::ManuallyDrop;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{
    validate, BdevError, BlockDevice, Completion, DeviceInfo, IoChannel, IoError, IoOp, IoRequest,
    SgList, SubmitError,
};
use smallvec::SmallVec;

use crate::controller::{Controller, Region, ABORTED};
use crate::error::NvmeError;
use crate::queue::QueuePair;
use crate::recovery::Recovery;
use crate::spec::{io, Cqe, Sqe, Status, PAGE};
use crate::transport::DmaMem;

mod data;
mod free;
mod remake;
mod retire;

use free::FreeSlots;
use remake::Remake;
use retire::Retired;

/// Largest request a channel takes; bigger commands than MDTS are split.
const MAX_TRANSFER: usize = 1 << 20;
/// Bounce pages per channel: one whole request of MAX_TRANSFER.
const BOUNCE_PAGES: usize = MAX_TRANSFER / PAGE;
/// Low bits of a command identifier: the slot.
const CID_SLOT: u16 = 0xfff;

/// The next command identifier for `slot` after `prev`.
fn next_cid(prev: u16, slot: u16) -> u16 {
    (prev & !CID_SLOT).wrapping_add(CID_SLOT + 1) | slot
}

/// `Slot::parent` of a command that is a whole request on its own (the
/// common case: no parent bookkeeping).
const ALONE: u32 = u32::MAX;
/// Times a command is sent again after a failure without Do Not Retry.
const MAX_RETRIES: u8 = 3;
/// The pause before the first of those.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
/// Times a channel makes its queue again after a reset when the creation
/// timed out and the reset that followed worked.
const CREATE_TRIES: u32 = 3;
/// Resets a command may be overdue at before it is failed: one more than
/// a controller that completes nothing gets, so that one is failed as a
/// whole first (`controller::MAX_FRUITLESS_RESETS`).
const MAX_OVERDUE_RESETS: u8 = 4;
/// PRP entries in one list page.
const PRP_PER_PAGE: usize = PAGE / 8;
/// How long a channel's opening or drop waits, on its caller's thread
/// (a reactor), for the admin commands that make or delete its queue on
/// a thread of their own: a controller that answers in time behaves as
/// if they ran here (an open that fails says so, a queue ID dropped is
/// free again); one that does not costs the reactor no more than this
/// (it cost up to twice CAP.TO, minutes: audit).
const ADMIN_WAIT: Duration = Duration::from_millis(20);

/// One namespace of a controller.
pub struct Namespace {
    ctrl: Arc<Controller>,
    nsid: u32,
    /// Requests of this namespace that completed with an error (its
    /// channels bump it; time-outs, aborts and resets are the
    /// controller's).
    io_errors: Arc<std::sync::atomic::AtomicU64>,
    info: DeviceInfo,
    cmd_bytes: usize,
    /// See [`nvme::spec::namespace_identity`](crate::spec::namespace_identity).
    identity: String,
}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespace")
            .field("info", &self.info)
            .finish()
    }
}

impl Namespace {
    /// Namespace `nsid` of `ctrl`, named `name`.
    pub fn new(ctrl: &Arc<Controller>, nsid: u32, name: &str) -> Result<Namespace, NvmeError> {
        let ns = ctrl.namespace(nsid)?;
        if ns.format > ns.nlbaf {
            return Err(NvmeError::InvalidArgument(format!(
                "{}: namespace {nsid} is formatted with LBA format {}, past the {} it lists",
                ctrl.name(),
                ns.format,
                u16::from(ns.nlbaf) + 1
            )));
        }
        if ns.lbads != 9 && ns.lbads != 12 {
            return Err(NvmeError::InvalidArgument(format!(
                "{}: namespace {nsid} is formatted with {}-byte blocks; 512 and 4096 are supported",
                ctrl.name(),
                1u64 << ns.lbads.min(63)
            )));
        }
        if ns.ms != 0 {
            return Err(NvmeError::InvalidArgument(format!(
                "{}: namespace {nsid} has {} bytes of metadata per block, which is not supported",
                ctrl.name(),
                ns.ms
            )));
        }
        let block_size = 1u32 << ns.lbads;
        // A size the device makes up: none, or beyond 2^63 bytes (every
        // byte count made of it would overflow).
        if ns.nsze == 0
            || ns
                .nsze
                .checked_mul(u64::from(block_size))
                .is_none_or(|b| b > i64::MAX as u64)
        {
            return Err(NvmeError::InvalidArgument(format!(
                "{}: namespace {nsid} reports {} blocks of {block_size} bytes",
                ctrl.name(),
                ns.nsze
            )));
        }
        let cmd_bytes = ctrl.max_command_bytes(MAX_TRANSFER);
        if cmd_bytes < block_size as usize {
            return Err(NvmeError::InvalidArgument(format!(
                "{}: MDTS of {cmd_bytes} bytes is smaller than a block",
                ctrl.name()
            )));
        }
        let id = ctrl.identity();
        Ok(Namespace {
            identity: crate::spec::namespace_identity(id, &ns, nsid),
            ctrl: ctrl.clone(),
            nsid,
            io_errors: Arc::default(),
            cmd_bytes,
            info: DeviceInfo {
                name: name.to_string(),
                block_size,
                num_blocks: ns.nsze,
                max_transfer: MAX_TRANSFER as u32,
                optimal_io_boundary: 0,
                min_io_blocks: 1,
                flush: id.vwc,
                discard: id.dsm(),
                write_zeroes: id.write_zeroes(),
            },
        })
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctrl
    }
}

impl BlockDevice for Namespace {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn identity(&self) -> Option<String> {
        Some(self.identity.clone())
    }

    /// Its own IO errors; time-outs, aborts and resets are the
    /// controller's, shared by its namespaces.
    fn error_counts(&self) -> bdev::ErrorCounts {
        bdev::ErrorCounts {
            io_errors: self.io_errors.load(Ordering::Relaxed),
            ..self.ctrl.error_counts()
        }
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Channel::open(self)
            .map(|c| Box::new(c) as Box<dyn IoChannel>)
            .map_err(|e| {
                let what = format!("{}: opening an IO queue: {e}", self.info.name);
                // The controller or the host out of room is not the
                // device broken: the member is not failed for it.
                match e {
                    NvmeError::NoQueue(_) | NvmeError::NoRoom(_) => BdevError::Exhausted(what),
                    NvmeError::Os(_, ref source) if bdev::host_short(source) => {
                        BdevError::Exhausted(what)
                    }
                    _ => BdevError::Unsupported(what),
                }
            })
    }
}

/// A request accepted but not yet fully turned into commands.
struct Cursor {
    parent: u32,
    op: IoOp,
    lba: u64,
    blocks: u64,
    sg: SgList,
    sg_idx: usize,
    sg_off: usize,
    issued: bool,
}

struct Parent {
    tag: u64,
    /// Commands in flight, plus one while the cursor still has work.
    remaining: u32,
    result: Result<(), IoError>,
}

/// Pages a command's data went through when it could not be DMA'd in place.
struct Bounce {
    pages: SmallVec<[u16; 8]>,
    /// For reads: where the data goes when the command completes.
    to: Option<SmallVec<[(usize, usize); 4]>>,
}

struct Slot {
    busy: bool,
    /// The request this command is part of, or [`ALONE`].
    parent: u32,
    /// The request's tag when the command is the whole request.
    tag: u64,
    /// The command identifier in flight: the slot in the low 12 bits, a
    /// count in the top 4, so a late or duplicate completion for an earlier
    /// use of the slot is told apart and dropped.
    cid: u16,
    sqe: Sqe,
    started: Instant,
    /// Whether its command has bounce pages (in `Channel::bounced`).
    bounced: bool,
    /// Resets its command was overdue at (each resubmits it).
    overdue: u8,
    /// Times its command was sent again after a failure the device said
    /// may not recur.
    retries: u8,
}

struct Channel {
    ctrl: Arc<Controller>,
    nsid: u32,
    /// Commands to send again after a pause: (slot, command ID, when).
    delayed: Vec<(usize, u16, Instant)>,
    /// Completions for no command in flight, and failed commands, so far:
    /// logged at the 1st, 2nd, 4th, 8th... (a device that floods the queue
    /// with bogus entries, or fails every command, does not flood the log).
    bogus: u64,
    failed_logged: std::cell::Cell<u64>,
    io_errors: Arc<std::sync::atomic::AtomicU64>,
    info: DeviceInfo,
    block_shift: u32,
    cmd_blocks: u64,
    /// The controller takes SGLs (`Some(true)`: dword-aligned only).
    sgl: Option<bool>,
    /// The queue, its PRP lists and its bounce pages: the device reaches
    /// them by DMA, so they are freed only after its queue is deleted,
    /// which a dropped channel leaves to a thread (`retire`); taken out
    /// in `drop` only.
    q: ManuallyDrop<QueuePair>,
    generation: u64,
    slots: Vec<Slot>,
    /// Taken from the front and given back at the back: a slot's
    /// identifier comes back only after every other slot's (`next_cid`).
    free_slots: FreeSlots,
    prp: ManuallyDrop<DmaMem>,
    bounce: ManuallyDrop<DmaMem>,
    free_bounce: Vec<u16>,
    /// The bounce pages of the command in each slot that has any (its
    /// `bounced` says so): beside the slots, so the registered path never
    /// touches them, and not boxed (a bounced command allocated and freed
    /// one each: 10 % of the driver's time on a bounced 4 KiB write).
    bounced: Vec<Option<Bounce>>,
    parents: Vec<Parent>,
    free_parents: Vec<u32>,
    cursor: Option<Cursor>,
    done: Vec<Completion>,
    inflight: usize,
    regions: Vec<Region>,
    regions_gen: u64,
    now: Instant,
    polls: u32,
    /// The timed-out command the recovery thread is working on: one at a
    /// time per channel (its abort or reset deals with the others too).
    recovery: Option<Arc<Recovery>>,
    /// The queue being made (opening, or again after a reset), on a
    /// thread of its own.
    remaking: Option<Remake>,
    /// The device has no queue of this channel's (it was refused, or the
    /// controller failed making it again): requests fail.
    unmade: bool,
}

impl Channel {
    fn open(ns: &Namespace) -> Result<Channel, NvmeError> {
        let ctrl = &ns.ctrl;
        if ctrl.is_failed() {
            return Err(NvmeError::Failed(
                ctrl.name().into(),
                "cannot open a queue".into(),
            ));
        }
        let depth = ctrl
            .opts
            .queue_depth
            .clamp(2, ctrl.cap.mqes().min(4096) as u16);
        let nslots = depth as usize - 1;
        // Memory first: a failure after the queue exists on the controller
        // would leave it there pointing at freed rings.
        let prp = DmaMem::new(&ctrl.transport, nslots * PAGE)?;
        let bounce = DmaMem::new(&ctrl.transport, BOUNCE_PAGES * PAGE)?;
        let qid = ctrl.alloc_qid(ADMIN_WAIT)?;
        let q = match QueuePair::new(&ctrl.transport, qid, depth, ctrl.stride) {
            Ok(q) => q,
            Err(e) => {
                ctrl.free_qid(qid);
                return Err(e);
            }
        };
        let generation = ctrl.generation.load(Ordering::Acquire);
        let mut ch = Channel {
            ctrl: ctrl.clone(),
            nsid: ns.nsid,
            io_errors: ns.io_errors.clone(),
            bogus: 0,
            failed_logged: Default::default(),
            info: ns.info.clone(),
            block_shift: ns.info.block_size.trailing_zeros(),
            cmd_blocks: (ns.cmd_bytes / ns.info.block_size as usize) as u64,
            sgl: ctrl.ident.sgl(),
            q: ManuallyDrop::new(q),
            generation,
            slots: (0..nslots)
                .map(|_| Slot {
                    busy: false,
                    parent: 0,
                    tag: 0,
                    cid: 0,
                    sqe: Sqe::default(),
                    started: Instant::now(),
                    bounced: false,
                    overdue: 0,
                    retries: 0,
                })
                .collect(),
            bounced: (0..nslots).map(|_| None).collect(),
            free_slots: FreeSlots::new(nslots),
            delayed: Vec::new(),
            prp: ManuallyDrop::new(prp),
            bounce: ManuallyDrop::new(bounce),
            free_bounce: (0..BOUNCE_PAGES as u16).rev().collect(),
            parents: (0..nslots)
                .map(|_| Parent {
                    tag: 0,
                    remaining: 0,
                    result: Ok(()),
                })
                .collect(),
            free_parents: (0..nslots as u32).rev().collect(),
            cursor: None,
            done: Vec::with_capacity(nslots),
            inflight: 0,
            regions: Vec::new(),
            regions_gen: u64::MAX,
            now: Instant::now(),
            polls: 0,
            recovery: None,
            remaking: None,
            unmade: false,
        };
        ch.refresh_regions();
        // The queue is made on a thread (admin commands the reactor must
        // not wait on for long). Made in time, the channel is as if it
        // had been made here (a refusal is this open's error); not, it
        // takes nothing (Busy) until it is, and fails its requests if it
        // is not.
        let shape = ch.q.shape();
        let made = match Remake::start(ctrl, shape, generation, true) {
            Some(mut r) => {
                if !r.wait(ADMIN_WAIT) {
                    ch.remaking = Some(r);
                    return Ok(ch);
                }
                r.join()
            }
            // No thread to spare: made here, as before.
            None => remake::make(ctrl, &shape, generation, true),
        };
        match made {
            Ok(g) => {
                ch.generation = g;
                Ok(ch)
            }
            Err(e) => {
                ch.unmade = true;
                Err(e)
            }
        }
    }

    /// Pick up memory (un)registered since the last look: one atomic load
    /// when nothing changed.
    #[inline]
    fn refresh_regions(&mut self) {
        if self.ctrl.registry.generation.load(Ordering::Acquire) != self.regions_gen {
            self.reload_regions();
        }
    }

    #[cold]
    fn reload_regions(&mut self) {
        let g = self.ctrl.registry.generation.load(Ordering::Acquire);
        let r = self
            .ctrl
            .registry
            .regions
            .read()
            .unwrap_or_else(|p| p.into_inner());
        self.regions.clone_from(&r);
        self.regions_gen = g;
    }

    fn finish(&mut self, parent: u32, result: Result<(), IoError>) {
        let p = &mut self.parents[parent as usize];
        if p.result.is_ok() {
            p.result = result;
        }
        p.remaining -= 1;
        if p.remaining == 0 {
            if p.result.is_err() {
                self.io_errors.fetch_add(1, Ordering::Relaxed);
            }
            self.done.push(Completion {
                tag: p.tag,
                result: p.result,
            });
            self.free_parents.push(parent);
            self.inflight -= 1;
        }
    }

    /// Turn as much of the cursor into commands as slots and bounce pages
    /// allow; ring the doorbell once.
    fn pump(&mut self, mut c: Cursor) {
        let mut pushed = false;
        while (c.blocks > 0 || (c.op == IoOp::Flush && !c.issued)) && !self.free_slots.is_empty() {
            if !self.issue(&mut c) {
                break;
            }
            c.issued = true;
            pushed = true;
        }
        if pushed {
            self.q.ring();
        }
        if c.blocks == 0 && c.issued {
            self.finish(c.parent, Ok(()));
        } else {
            self.cursor = Some(c);
        }
    }

    /// The PRP list page of `slot` (PRP list or DSM ranges of its command)
    /// and its IO address.
    ///
    /// # Safety
    /// The slot is free: the controller reads the page only while the
    /// slot's command is in flight, and nothing else holds it. The page is
    /// this channel's memory, which outlives the returned slice's use.
    #[inline(always)]
    unsafe fn slot_list<'a>(&self, slot: u16) -> (&'a mut [u64], u64) {
        let at = slot as usize * PAGE;
        // SAFETY: as the caller promised; `slot` < the slots' count, one
        // page each.
        let list = unsafe {
            std::slice::from_raw_parts_mut(self.prp.ptr().add(at) as *mut u64, PRP_PER_PAGE)
        };
        (list, self.prp.iova() + at as u64)
    }

    /// Build and queue the next command of the cursor. False when it must
    /// wait (no bounce pages).
    fn issue(&mut self, c: &mut Cursor) -> bool {
        let Some(&slot) = self.free_slots.front() else {
            return false;
        };
        // SAFETY: the slot is free.
        let (list, prp_page) = unsafe { self.slot_list(slot) };
        let mut sqe;
        let mut bounce = None;
        match c.op {
            IoOp::Flush => {
                sqe = Sqe::new(io::FLUSH, self.nsid);
            }
            IoOp::Read | IoOp::Write => {
                let n = c.blocks.min(self.cmd_blocks);
                let bytes = (n << self.block_shift) as usize;
                let mut segs: SmallVec<[(usize, usize); 4]> = SmallVec::new();
                let (mut idx, mut off, mut left) = (c.sg_idx, c.sg_off, bytes);
                while left > 0 {
                    let Some(v) = c.sg.get(idx) else { break };
                    let take = (v.len() - off).min(left);
                    if take > 0 {
                        segs.push((v.ptr() as usize + off, take));
                    }
                    left -= take;
                    off += take;
                    if off == v.len() {
                        idx += 1;
                        off = 0;
                    }
                }
                sqe = Sqe::new(
                    if c.op == IoOp::Read {
                        io::READ
                    } else {
                        io::WRITE
                    },
                    self.nsid,
                );
                sqe.set_range(c.lba, n as u32);
                if !self.direct_prps(&segs, list, prp_page, &mut sqe)
                    && !self.direct_sgl(&segs, list, prp_page, &mut sqe)
                {
                    match self.bounce_prps(&segs, bytes, c.op, list, prp_page, &mut sqe) {
                        Some(b) => bounce = Some(b),
                        None => return false,
                    }
                }
                c.sg_idx = idx;
                c.sg_off = off;
                c.lba += n;
                c.blocks -= n;
            }
            IoOp::WriteZeroes => {
                let n = c.blocks.min(io::WZ_MAX_BLOCKS);
                sqe = Sqe::new(io::WRITE_ZEROES, self.nsid);
                sqe.set_range(c.lba, n as u32);
                c.lba += n;
                c.blocks -= n;
            }
            IoOp::Discard => {
                // Ranges of 16 bytes go in the slot's PRP page.
                let ranges = list.as_mut_ptr() as *mut [u32; 4];
                let mut nr = 0;
                while c.blocks > 0 && nr < io::DSM_MAX_RANGES {
                    let n = c.blocks.min(u32::MAX as u64);
                    // SAFETY: nr < 256 ranges of 16 bytes = one page.
                    unsafe {
                        ranges
                            .add(nr)
                            .write([0, n as u32, c.lba as u32, (c.lba >> 32) as u32])
                    };
                    c.lba += n;
                    c.blocks -= n;
                    nr += 1;
                }
                sqe = Sqe::new(io::DSM, self.nsid);
                sqe.prp1 = prp_page;
                sqe.cdw[0] = nr as u32 - 1;
                sqe.cdw[1] = io::DSM_AD;
            }
        }
        self.free_slots.pop_front();
        let s = &mut self.slots[slot as usize];
        s.cid = next_cid(s.cid, slot);
        sqe.set_cid(s.cid);
        s.busy = true;
        s.parent = c.parent;
        s.sqe = sqe;
        s.started = self.now;
        s.overdue = 0;
        s.retries = 0;
        // A free slot has no bounce pages: overwriting some would lose them.
        debug_assert!(!s.bounced && self.bounced[slot as usize].is_none());
        self.keep_bounce(slot, bounce);
        self.parents[c.parent as usize].remaining += 1;
        self.q.push(&sqe);
        true
    }

    fn complete(&mut self, cqe: Cqe) {
        let cid = (cqe.cid() & CID_SLOT) as usize;
        let sqid = (cqe.sq >> 16) as u16;
        let Some(slot) = self
            .slots
            .get_mut(cid)
            .filter(|s| s.busy && s.cid == cqe.cid() && sqid == self.q.qid)
        else {
            self.bogus += 1;
            if self.bogus.is_power_of_two() {
                tracing::warn!(device = %self.info.name, cid = cqe.cid(), sqid, count = self.bogus, "completion for a command not in flight; ignored");
            }
            return;
        };
        if let Some(r) = &self.recovery {
            if r.is(cqe.cid()) {
                r.settle();
            }
        }
        let status = cqe.code();
        // A failure the device says may not recur (Do Not Retry clear: a
        // namespace not ready for a moment, an interrupted command, a path
        // error) is sent again a few times, as Linux does, rather than
        // failing the request (and the RAID member, rebuilt whole, above
        // it). An abort is the time-out recovery's answer, not retried.
        // After a pause that doubles each time (100, 200, 400 ms): a
        // namespace coming ready takes its time.
        if !status.ok() && !cqe.dnr() && status != ABORTED && slot.retries < MAX_RETRIES {
            let due = Instant::now() + RETRY_PAUSE * (1 << slot.retries);
            slot.retries += 1;
            slot.cid = next_cid(slot.cid, cid as u16);
            slot.sqe.set_cid(slot.cid);
            // Its time-out counts from when it goes again.
            slot.started = due;
            tracing::debug!(device = %self.info.name, %status, opcode = slot.sqe.opcode(), "NVMe command failed, may succeed again: sent again");
            self.delayed.push((cid, slot.cid, due));
            return;
        }
        slot.busy = false;
        let parent = slot.parent;
        let tag = slot.tag;
        let sqe = slot.sqe;
        let bounce = if slot.bounced {
            slot.bounced = false;
            self.bounced[cid].take()
        } else {
            None
        };
        self.free_slots.push_back(cid as u16);
        if let Some(b) = bounce {
            if let (true, Some(to)) = (status.ok(), &b.to) {
                self.copy_bounce(&b.pages, to, false);
            }
            self.free_bounce.extend_from_slice(&b.pages);
        }
        let result = if status.ok() {
            if self.ctrl.fruitless_resets.load(Ordering::Relaxed) != 0 {
                self.ctrl.fruitless_resets.store(0, Ordering::Relaxed);
            }
            Ok(())
        } else {
            Err(self.io_error(&sqe, status))
        };
        self.settle(parent, tag, result);
    }

    /// A command is done: complete its request, or count it against its
    /// parent.
    #[inline]
    fn settle(&mut self, parent: u32, tag: u64, result: Result<(), IoError>) {
        if parent == ALONE {
            // Counted here as `finish` counts a request of several
            // commands (the fast path's failures went uncounted before).
            if result.is_err() {
                self.io_errors.fetch_add(1, Ordering::Relaxed);
            }
            self.done.push(Completion { tag, result });
            self.inflight -= 1;
        } else {
            self.finish(parent, result);
        }
    }

    /// The common request, one read or write in one segment that fits one
    /// command (in place, or through bounce pages when they are free),
    /// queued without a cursor or parent. False when it is not that
    /// request (nothing done then).
    #[inline]
    fn submit_alone(&mut self, req: &IoRequest) -> bool {
        let opcode = match req.op {
            IoOp::Read => io::READ,
            IoOp::Write => io::WRITE,
            _ => return false,
        };
        if req.sg.len() != 1 || req.num_blocks > self.cmd_blocks || self.cursor.is_some() {
            return false;
        }
        let Some(&slot) = self.free_slots.front() else {
            return false;
        };
        let v = req.sg[0];
        let mut sqe = Sqe::new(opcode, self.nsid);
        sqe.set_range(req.offset_blocks, req.num_blocks as u32);
        // SAFETY: the slot is free.
        let (list, list_iova) = unsafe { self.slot_list(slot) };
        if !self.direct_prps(&[(v.ptr() as usize, v.len())], list, list_iova, &mut sqe) {
            return self.submit_alone_indirect(req, slot, sqe);
        }
        self.queue_alone(slot, &mut sqe, req.tag);
        true
    }

    /// [`submit_alone`](Self::submit_alone) for memory it cannot point at
    /// in place: in the general path's order, as an SGL or else bounced (a
    /// RAID's own buffers are not registered). With no bounce pages free
    /// it returns false, so the request goes the long way and waits for
    /// them. Apart, so the registered path stays as short as it was.
    #[inline(never)]
    fn submit_alone_indirect(&mut self, req: &IoRequest, slot: u16, mut sqe: Sqe) -> bool {
        let v = req.sg[0];
        let seg = [(v.ptr() as usize, v.len())];
        // SAFETY: the slot is free.
        let (list, list_iova) = unsafe { self.slot_list(slot) };
        let bounce = if self.direct_sgl(&seg, list, list_iova, &mut sqe) {
            None
        } else {
            match self.bounce_prps(&seg, v.len(), req.op, list, list_iova, &mut sqe) {
                Some(b) => Some(b),
                None => return false,
            }
        };
        self.queue_alone(slot, &mut sqe, req.tag);
        // Polled on this thread only: kept before its completion is seen.
        self.keep_bounce(slot, bounce);
        true
    }

    /// Queue the command in free `slot` (the first of `free_slots`) as a
    /// whole request, and ring.
    #[inline]
    fn queue_alone(&mut self, slot: u16, sqe: &mut Sqe, tag: u64) {
        self.free_slots.pop_front();
        let s = &mut self.slots[slot as usize];
        s.cid = next_cid(s.cid, slot);
        sqe.set_cid(s.cid);
        s.busy = true;
        s.parent = ALONE;
        s.tag = tag;
        s.sqe = *sqe;
        s.started = self.now;
        s.overdue = 0;
        s.retries = 0;
        debug_assert!(!s.bounced && self.bounced[slot as usize].is_none());
        self.inflight += 1;
        self.q.push(sqe);
        self.q.ring();
    }

    fn io_error(&self, sqe: &Sqe, status: Status) -> IoError {
        let lba = match sqe.opcode() {
            io::READ | io::WRITE | io::WRITE_ZEROES => sqe.slba(),
            _ => 0,
        };
        if status.media() {
            IoError::Media(lba)
        } else if status == ABORTED {
            IoError::TimedOut
        } else {
            let n = self.failed_logged.get() + 1;
            self.failed_logged.set(n);
            if n.is_power_of_two() {
                tracing::warn!(device = %self.info.name, %status, opcode = sqe.opcode(), lba, count = n, "NVMe command failed");
            }
            IoError::Device(status.raw())
        }
    }

    /// Send again the commands whose pause after a failure is over (one a
    /// reset resubmitted, or that was failed, meanwhile is not).
    fn send_delayed(&mut self) {
        let now = Instant::now();
        let mut any = false;
        let mut i = 0;
        while i < self.delayed.len() {
            let (slot, cid, due) = self.delayed[i];
            if due > now {
                i += 1;
                continue;
            }
            self.delayed.swap_remove(i);
            let s = &mut self.slots[slot];
            if s.busy && s.cid == cid {
                s.started = now;
                let sqe = s.sqe;
                self.q.push(&sqe);
                any = true;
            }
        }
        if any {
            self.q.ring();
        }
    }

    /// Fail every command in flight and whatever the cursor holds.
    fn fail_all(&mut self, err: IoError) {
        self.delayed.clear();
        for cid in 0..self.slots.len() {
            if self.slots[cid].busy {
                self.fail_slot(cid, err);
            }
        }
        if let Some(c) = self.cursor.take() {
            self.finish(c.parent, Err(err));
        }
    }

    /// Fail the busy command in slot `cid` without its completion.
    fn fail_slot(&mut self, cid: usize, err: IoError) {
        let s = &mut self.slots[cid];
        s.busy = false;
        let (parent, tag) = (s.parent, s.tag);
        s.bounced = false;
        if let Some(b) = self.bounced[cid].take() {
            self.free_bounce.extend_from_slice(&b.pages);
        }
        self.free_slots.push_back(cid as u16);
        self.settle(parent, tag, Err(err));
    }

    /// A command has been outstanding past the time-out: report it to the
    /// recovery thread (abort, then reset if needed) and go on polling; the
    /// outcome arrives as its completion or as a new reset generation.
    fn check_timeouts(&mut self) {
        if let Some(r) = &self.recovery {
            if !r.finished() {
                return;
            }
            self.recovery = None;
        }
        let limit = self.ctrl.opts.io_timeout;
        let Some(slot) = self
            .slots
            .iter()
            .find(|s| s.busy && self.now.saturating_duration_since(s.started) > limit)
        else {
            return;
        };
        self.recovery = Some(
            self.ctrl
                .report_timeout(self.q.qid, slot.cid, self.generation),
        );
    }

    fn reap(&mut self) -> bool {
        let mut any = false;
        // At most a queue's worth per poll: a device that keeps writing
        // entries ahead of the head would hold the reactor here for good.
        for _ in 0..self.q.depth {
            let Some(cqe) = self.q.pop() else { break };
            self.complete(cqe);
            any = true;
        }
        if any {
            self.q.ack();
        }
        any
    }
}

impl IoChannel for Channel {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if self.cursor.is_some() || self.free_parents.is_empty() {
            return Err(SubmitError::Busy(req));
        }
        // A reset since the last poll took this queue off the device: it
        // is made again before a doorbell of a queue the controller does
        // not have is rung (some raise an error, or fatal status, for it),
        // and the request waits meanwhile.
        if self.remaking.is_some()
            || self.ctrl.generation.load(Ordering::Acquire) != self.generation
        {
            self.recover();
            if self.remaking.is_some() {
                return Err(SubmitError::Busy(req));
            }
        }
        let result = if self.ctrl.is_failed() || self.unmade {
            Err(IoError::DeviceFailed)
        } else {
            validate(&self.info, &req)
        };
        if let Err(e) = result {
            // Refused here, but failed all the same: the error counter
            // (appliance_device_io_errors) counts it like a failed command.
            self.io_errors.fetch_add(1, Ordering::Relaxed);
            self.done.push(Completion {
                tag: req.tag,
                result: Err(e),
            });
            return Ok(());
        }
        if self.inflight == 0 {
            self.now = Instant::now();
        }
        self.refresh_regions();
        if self.submit_alone(&req) {
            return Ok(());
        }
        let parent = self.free_parents.pop().unwrap_or_default();
        self.parents[parent as usize] = Parent {
            tag: req.tag,
            remaining: 1,
            result: Ok(()),
        };
        self.inflight += 1;
        self.pump(Cursor {
            parent,
            op: req.op,
            lba: req.offset_blocks,
            blocks: if req.op == IoOp::Flush {
                0
            } else {
                req.num_blocks
            },
            sg: req.sg,
            sg_idx: 0,
            sg_off: 0,
            issued: false,
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        if self.remaking.is_some()
            || self.ctrl.generation.load(Ordering::Acquire) != self.generation
        {
            self.recover();
            if self.remaking.is_some() {
                // Nothing of the queue's until it is there again.
                let n = self.done.len();
                out.append(&mut self.done);
                return n;
            }
        }
        self.reap();
        if !self.delayed.is_empty() {
            self.send_delayed();
        }
        if let Some(c) = self.cursor.take() {
            self.pump(c);
        }
        self.polls = self.polls.wrapping_add(1);
        if self.polls.is_multiple_of(64) && self.inflight > 0 {
            self.now = Instant::now();
            self.check_timeouts();
        }
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }

    /// A queue being made counts as one: its owner must not take the
    /// channel for idle (its requests are refused Busy until then).
    fn inflight(&self) -> usize {
        self.inflight + self.done.len() + usize::from(self.remaking.is_some())
    }
}

/// Dropped idle (as every owner does, `inflight` 0): the device may
/// still run a command of one dropped busy until its queue is deleted,
/// which no longer happens before the drop returns.
impl Drop for Channel {
    fn drop(&mut self) {
        if let Some(r) = self.recovery.take() {
            r.settle();
        }
        // SAFETY: taken here only, once, and `self` is not used after.
        let (q, prp, bounce) = unsafe {
            (
                ManuallyDrop::take(&mut self.q),
                ManuallyDrop::take(&mut self.prp),
                ManuallyDrop::take(&mut self.bounce),
            )
        };
        Retired {
            ctrl: self.ctrl.clone(),
            name: self.info.name.clone(),
            generation: self.generation,
            remaking: self.remaking.take(),
            on_device: !self.unmade,
            q,
            prp,
            bounce,
        }
        .retire(ADMIN_WAIT);
    }
}
