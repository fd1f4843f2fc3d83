//! RAID1: every in-sync member holds the same data at the same offset (md's
//! layout, so `mdadm --build --level=1` reads it). Reads go to the in-sync
//! member with the fewest requests outstanding on this core; writes go to
//! all of them. A failed member IO is retried on another member (reads) or
//! tolerated while one member took the write, and reported.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bdev::{
    validate, BdevError, BlockDevice, Completion, DeviceInfo, IoChannel, IoError, IoOp, IoRequest,
    SgList, SubmitError,
};

use super::level::RaidDevice;
use super::locks::StripeLocks;
use super::members::{FailureSink, Member, MemberSet, MemberState, MissingDevice};
use super::rebuild::Rows;

mod behind;

use behind::BehindIo;

/// Blocks per rebuild region (the unit the rebuild copies and locks).
const REGION: u64 = 256;

/// A RAID1 device for one configuration generation.
pub struct Raid1Device {
    info: DeviceInfo,
    data_offset: u64,
    set: MemberSet,
}

impl Raid1Device {
    /// Mirror over `members` (2..=32, same block size), data starting
    /// `data_offset` blocks into each; the size is the smallest member's.
    pub fn new(
        name: &str,
        members: Vec<Member>,
        data_offset: u64,
        failures: FailureSink,
    ) -> Result<Raid1Device, BdevError> {
        Self::over(name, MemberSet::new(members, failures), data_offset)
    }

    /// A mirror over the members (and what generations share) of `set`: a
    /// two-member RAID5 taken over as it is.
    pub fn over(name: &str, set: MemberSet, data_offset: u64) -> Result<Raid1Device, BdevError> {
        let members = &set.members;
        if !(2..=32).contains(&members.len()) {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: RAID1 needs 2..=32 members, got {}",
                members.len()
            )));
        }
        let (bs, smallest) = super::members::common_geometry(name, members)?;
        let smallest = set.limit.map_or(smallest, |l| smallest.min(l));
        if smallest <= data_offset {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: members of {smallest} blocks leave no room after the data offset {data_offset}"
            )));
        }
        let all = |f: fn(&DeviceInfo) -> bool| members.iter().all(|m| f(m.dev.info()));
        let info = DeviceInfo {
            name: name.to_string(),
            block_size: bs,
            num_blocks: smallest - data_offset,
            // (Every member missing: what their stand-ins copied.)
            max_transfer: mirror_max_transfer(&set).unwrap_or_else(|| {
                members
                    .iter()
                    .map(|m| m.dev.info().max_transfer)
                    .min()
                    .unwrap_or(0)
            }),
            optimal_io_boundary: 0,
            min_io_blocks: 1,
            flush: true,
            discard: all(|i| i.discard),
            write_zeroes: all(|i| i.write_zeroes),
        };
        Ok(Raid1Device {
            info,
            data_offset,
            set,
        })
    }
}

/// What a mirror over `set` takes at once: it passes requests on whole,
/// so what its devices all take. A member (or a hot replacement) that
/// takes less lowers it, and exports split by each generation's limit. A
/// stand-in for a missing member says what the device it copied does, not
/// the missing one, and does not count (audit: a RAID1 started with its
/// 8 MiB remote leg missing said 128 MiB, and refused the leg back).
/// `None`: no device is present.
fn mirror_max_transfer(set: &MemberSet) -> Option<u32> {
    set.members
        .iter()
        .map(|m| &m.dev)
        .chain(set.replacing.as_ref().map(|r| &r.dev))
        .filter(|d| !MissingDevice::is(d.as_ref()))
        .map(|d| d.info().max_transfer)
        .min()
}

impl RaidDevice for Raid1Device {
    fn member_set(&self) -> &MemberSet {
        &self.set
    }

    fn with_member_set(&self, set: MemberSet) -> Arc<dyn RaidDevice> {
        let mut info = self.info.clone();
        if let Some(most) = mirror_max_transfer(&set) {
            info.max_transfer = most;
        }
        Arc::new(Raid1Device {
            info,
            data_offset: self.data_offset,
            set,
        })
    }

    fn rows(&self) -> Rows {
        Rows {
            count: self.info.num_blocks.div_ceil(REGION),
            blocks: REGION,
            offset: self.data_offset,
            total: self.info.num_blocks,
            block_size: self.info.block_size as usize,
        }
    }

    /// A mirror is rebuilt by copying one in-sync member, one that is not
    /// write-mostly if there is one (md reads those first, and one may
    /// lag behind with write-behind).
    fn rebuild_sources(&self, _slot: usize) -> Vec<usize> {
        let m = &self.set.members;
        (0..m.len())
            .filter(|&i| m[i].recorded_state() == MemberState::InSync)
            .min_by_key(|&i| m[i].write_mostly)
            .into_iter()
            .collect()
    }

    fn parity_geometry(&self) -> Option<super::geometry::Raid5Geometry> {
        None
    }

    fn max_failures(&self) -> usize {
        self.set.members.len() - 1
    }
}

impl BlockDevice for Raid1Device {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        let chans = super::members::open_members(&self.set)?;
        Ok(Box::new(Raid1Channel {
            slots: self.set.members.clone(),
            held: Default::default(),
            info: self.info.clone(),
            data_offset: self.data_offset,
            outstanding: vec![0; chans.len()],
            behind_out: vec![0; chans.len()],
            failed: chans.iter().map(|c| c.is_none()).collect(),
            write_mostly: self.set.members.iter().map(|m| m.write_mostly).collect(),
            members: chans,
            parents: Vec::new(),
            free: Vec::new(),
            done: Vec::new(),
            scratch: Vec::new(),
            failures: self.set.failures.clone(),
            inflight: 0,
            rebuild_target: self.set.rebuilding.as_ref().map(|(r, _)| *r),
            kept_said: 0,
            scrubbing: self.set.scrubbing.clone(),
            pinned: self.set.pinned.clone(),
            locks: self.set.locks.clone(),
            waiting: VecDeque::new(),
            stalled: VecDeque::new(),
            bitmap: self.set.bitmap.clone(),
            replace: super::members::ReplaceChannel::open(&self.set)?,
            activity: self.set.activity.counter(),
            serialize: self.set.serialize.clone(),
            behind: self.set.behind.clone(),
            behind_ios: Vec::new(),
            behind_free: Vec::new(),
            behind_count: 0,
            resend: VecDeque::new(),
            held_reads: VecDeque::new(),
        }))
    }
}

struct Parent {
    tag: u64,
    op: IoOp,
    offset: u64,
    blocks: u64,
    sg: SgList,
    pending: u32,
    /// Members in sync that took it (bit per slot).
    took: u64,
    error: Option<IoError>,
    /// Members a read already tried (bit per slot).
    tried: u64,
    /// Rebuild regions this write holds locked.
    locked: Option<(u64, u64)>,
    /// Whether the write must lock its rebuild regions (a rebuild or
    /// scrub runs).
    needs_lock: bool,
    /// Write-intent bitmap regions the write is counted in.
    in_bitmap: Option<(u64, u64)>,
    /// Block keys it holds while write-behind is on.
    keys: Option<(u64, u64)>,
    /// Too long for keys, it holds a barrier up while it waits for
    /// nothing to be in the background (`WriteBehind::raise_barrier`).
    barrier: bool,
    /// Its copies to write-mostly members in the background, while they
    /// run: should every foreground member fail it, its outcome waits for
    /// theirs (md acknowledges early only a write some member took).
    behind: Option<usize>,
}

/// A member request refused for a full queue, sent again from `poll`
/// (already counted as pending).
#[derive(Clone, Copy)]
enum Resend {
    /// A write's request to member `.1`.
    Child(usize, usize),
    /// A background write's request to member `.1`.
    Behind(usize, usize),
}

struct Raid1Channel {
    /// The member being rebuilt: written, never read.
    rebuild_target: Option<usize>,
    /// Members whose kept bad block was logged (bit per slot).
    kept_said: u64,
    scrubbing: Arc<std::sync::atomic::AtomicBool>,
    /// The reference mirror pinned while a scrub runs (see
    /// `MemberSet::pinned`).
    pinned: Arc<std::sync::atomic::AtomicUsize>,
    locks: Arc<StripeLocks>,
    /// Writes waiting for rebuild regions or bitmap bits, in arrival order.
    waiting: VecDeque<usize>,
    /// Writes let in (their regions locked, their bits set) that found
    /// every member's queue full: sent at the next poll, before any
    /// waiting one.
    stalled: VecDeque<usize>,
    /// The volume's write-intent bitmap: a write reaches the members only
    /// once its regions' bits are on disk.
    bitmap: Option<Arc<super::bitmap::Bitmap>>,
    /// A hot replacement's new device: it gets every write.
    replace: Option<super::members::ReplaceChannel>,
    /// Guest requests on this channel (a rebuild yields to them).
    activity: Arc<super::members::Counter>,
    /// md's serialize_policy: every write locks its regions.
    serialize: Arc<std::sync::atomic::AtomicBool>,
    /// md's write-behind: the volume's limit and count.
    behind: Arc<super::members::WriteBehind>,
    /// This channel's writes in the background, by index.
    behind_ios: Vec<Option<BehindIo>>,
    behind_free: Vec<usize>,
    behind_count: usize,
    /// Member requests to send again (their queue was full).
    resend: VecDeque<Resend>,
    /// Reads that only a write-mostly member can serve, waiting until no
    /// write is in the background (it might not have the newest data).
    held_reads: VecDeque<usize>,
    /// The members of this channel's generation: their devices and the
    /// gone flags every core shares.
    slots: Arc<Vec<Member>>,
    /// Completions waiting for a member failure to be recorded.
    held: super::members::HeldCompletions,
    info: DeviceInfo,
    data_offset: u64,
    members: Vec<Option<Box<dyn IoChannel>>>,
    /// Members this channel stopped using; still polled until their
    /// requests in flight come back.
    failed: Vec<bool>,
    /// Members read only when no other can serve.
    write_mostly: Vec<bool>,
    outstanding: Vec<usize>,
    /// Background (write-behind) copies in flight on each member.
    behind_out: Vec<usize>,
    parents: Vec<Option<Parent>>,
    free: Vec<usize>,
    done: Vec<Completion>,
    scratch: Vec<Completion>,
    failures: FailureSink,
    inflight: usize,
}

const MEMBER_BITS: u64 = 6;
/// The child tag's member field for writes to a replacement device.
const REPLACE: usize = (1 << MEMBER_BITS) - 1;
/// Child tags of background writes (the rest is their index and member).
const BEHIND: u64 = 1 << 63;

impl Raid1Channel {
    fn child_tag(parent: usize, member: usize) -> u64 {
        ((parent as u64) << MEMBER_BITS) | member as u64
    }

    fn behind_tag(io: usize, member: usize) -> u64 {
        BEHIND | Self::child_tag(io, member)
    }

    /// The in-sync member with the fewest requests outstanding, not yet
    /// tried by read `pi`; write-mostly members only when no other is left.
    /// While a scrub runs (the resync after a crash among them), mirrors
    /// may still differ where it has not been: a read there goes to the
    /// member the repair copies from (the first in sync that is not
    /// write-mostly, as `scrub_members` orders them), so that what a guest
    /// read does not change under it when the repair gets there (md reads
    /// the first mirror past its resync point). With a bitmap, only the
    /// regions it marks may differ.
    fn pick_reader(&self, pi: usize) -> Option<usize> {
        let p = self.parents[pi].as_ref()?;
        let usable = |m: usize| !self.is_failed(m) && Some(m) != self.rebuild_target;
        if self.scrubbing.load(Ordering::Relaxed) && self.may_differ(p.offset, p.blocks) {
            // Pinned when the scrub started (a write-mostly change since
            // must not move it).
            let reference = super::members::reference(
                self.pinned.load(Ordering::Relaxed),
                self.members.len(),
                usable,
                |m| self.write_mostly[m],
            );
            if let Some(r) = reference.filter(|&r| p.tried & (1 << r) == 0) {
                return Some(r);
            }
            // The reference failed this read: another mirror's copy is
            // better than none.
        }
        (0..self.members.len())
            .filter(|&m| usable(m) && p.tried & (1 << m) == 0)
            .min_by_key(|&m| (self.write_mostly[m], self.outstanding[m]))
    }

    /// Whether the mirrors may hold different data for `blocks` at
    /// `offset`: anywhere without a bitmap, else where it marks a region.
    fn may_differ(&self, offset: u64, blocks: u64) -> bool {
        let Some(b) = &self.bitmap else {
            return true;
        };
        let last = offset + blocks.max(1) - 1;
        (offset / REGION..=last / REGION).any(|row| b.row_dirty(row))
    }

    fn child(&self, p: &Parent) -> IoRequest {
        IoRequest {
            op: p.op,
            offset_blocks: if p.op == IoOp::Flush {
                0
            } else {
                p.offset + self.data_offset
            },
            num_blocks: p.blocks,
            sg: p.sg.clone(),
            tag: 0,
        }
    }

    /// Submit parent `pi`'s request to member `m`. False if that member's
    /// queue is full.
    fn submit_child(&mut self, pi: usize, m: usize) -> bool {
        let Some(p) = self.parents[pi].as_ref() else {
            return false;
        };
        let mut req = self.child(p);
        req.tag = Self::child_tag(pi, m);
        self.submit_to(m, req)
    }

    /// Submit `req` to member `m`, counted as outstanding there; false if
    /// its queue is full.
    fn submit_to(&mut self, m: usize, req: IoRequest) -> bool {
        let Some(ch) = self.members[m].as_mut() else {
            return false;
        };
        match ch.submit(req) {
            Ok(()) => {
                self.outstanding[m] += 1;
                true
            }
            Err(SubmitError::Busy(_)) => false,
        }
    }

    /// Send parent `pi`'s request to member `m`, counted as pending.
    fn send(&mut self, pi: usize, m: usize) -> bool {
        if !self.submit_child(pi, m) {
            return false;
        }
        if let Some(p) = self.parents[pi].as_mut() {
            p.pending += 1;
        }
        true
    }

    /// Send write `pi` to every member in use (the write-mostly ones in
    /// the background when it may). False, with nothing sent, when no
    /// member took it (back-pressure); a member whose queue is full while
    /// others took it gets the request again from `poll`.
    fn send_write(&mut self, pi: usize) -> bool {
        let targets: Vec<usize> = (0..self.members.len())
            .filter(|&m| !self.is_failed(m))
            .collect();
        let behind = self.go_behind(pi, &targets);
        let mut refused = Vec::new();
        for m in targets.iter().copied() {
            if (behind.is_none() || !self.write_mostly[m]) && !self.send(pi, m) {
                refused.push(m);
            }
        }
        if self.parents[pi].as_ref().is_none_or(|p| p.pending == 0) {
            if let Some(bi) = behind {
                // Nothing went out: the keys go back to the write and the
                // background record away.
                let keys = self.behind_ios[bi].as_mut().and_then(|io| {
                    io.parent = None;
                    io.keys.take()
                });
                if let Some(p) = self.parents[pi].as_mut() {
                    p.keys = keys;
                }
                self.end_behind(bi);
            }
            return false;
        }
        for m in refused {
            if let Some(p) = self.parents[pi].as_mut() {
                p.pending += 1;
            }
            self.resend.push_back(Resend::Child(pi, m));
        }
        if let Some(bi) = behind {
            if let Some(p) = self.parents[pi].as_mut() {
                p.behind = Some(bi);
            }
            for m in targets.iter().copied() {
                if !self.write_mostly[m] {
                    continue;
                }
                if !self.submit_behind(bi, m) {
                    self.resend.push_back(Resend::Behind(bi, m));
                }
                if let Some(Some(io)) = self.behind_ios.get_mut(bi) {
                    io.pending += 1;
                }
            }
        }
        self.send_replace(pi);
        true
    }

    /// Send again what full queues refused, in order, until one refuses.
    fn pump_resend(&mut self) {
        while let Some(&r) = self.resend.front() {
            let (m, tag) = match r {
                Resend::Child(pi, m) => (m, Self::child_tag(pi, m)),
                Resend::Behind(bi, m) => (m, Self::behind_tag(bi, m)),
            };
            if self.is_failed(m) {
                // The member failed meanwhile: nothing to send it; its
                // completion is an error (counted out as if it had gone).
                self.resend.pop_front();
                self.outstanding[m] += 1;
                self.on_child(Completion {
                    tag,
                    result: Err(IoError::DeviceFailed),
                });
                continue;
            }
            let taken = match r {
                Resend::Child(pi, m) => self.submit_child(pi, m),
                Resend::Behind(bi, m) => self.submit_behind(bi, m),
            };
            if !taken {
                return;
            }
            self.resend.pop_front();
        }
    }

    /// A write that reached the members goes to a hot replacement's new
    /// device too (whatever the copy's cursor: the copy, under the region
    /// lock, would copy the same data again).
    fn send_replace(&mut self, pi: usize) {
        let Some(p) = self.parents[pi].as_ref().filter(|p| p.pending > 0) else {
            return;
        };
        let req = self.child(p);
        let tag = Self::child_tag(pi, REPLACE);
        let Some(r) = self.replace.as_mut() else {
            return;
        };
        if r.send(req.op, req.offset_blocks, req.num_blocks, req.sg, tag) {
            if let Some(p) = self.parents[pi].as_mut() {
                p.pending += 1;
            }
        }
    }

    /// Send read `pi` to the next member it has not tried; one that only a
    /// write-mostly member can serve waits while writes are in the
    /// background (that member may not have them yet). False if no member
    /// is left or its queue is full.
    fn send_read(&mut self, pi: usize) -> bool {
        let Some(m) = self.pick_reader(pi) else {
            return false;
        };
        if self.write_mostly[m] && self.behind.inflight() > 0 {
            self.held_reads.push_back(pi);
            return true;
        }
        // Tried only once it went out: a full queue is back-pressure, and
        // the member is asked again.
        if !self.send(pi, m) {
            return false;
        }
        if let Some(p) = self.parents[pi].as_mut() {
            p.tried |= 1 << m;
        }
        true
    }

    /// Whether member `m` takes no IO: failed when this generation began,
    /// seen failing here, or reported gone by any core since.
    #[inline]
    fn is_failed(&self, m: usize) -> bool {
        self.failed[m] || self.slots[m].is_gone()
    }

    /// A member failed: stop using it here and tell the volume.
    fn fail_member(&mut self, m: usize, e: IoError) {
        self.fail_member_unless_last(m, e, true);
    }

    /// [`fail_member`](Self::fail_member); with `keep_last`, a media error
    /// on the last member in sync fails only its request (md's RAID1
    /// rule). Without: a member that misses an acknowledged write (a
    /// background copy's) is failed whatever it is.
    fn fail_member_unless_last(&mut self, m: usize, e: IoError, keep_last: bool) {
        if self.failed[m] {
            return;
        }
        let was_gone = self.slots[m].is_gone();
        let failed = if keep_last {
            self.failures.report_in(&self.slots, m, e)
        } else {
            self.failures.report(m, &self.slots[m], e);
            true
        };
        if !failed {
            // Once per member on this core: a guest reading its bad block
            // again and again would flood the log.
            if self.kept_said & (1 << m) == 0 {
                self.kept_said |= 1 << m;
                tracing::warn!(volume = %self.info.name, member = m, error = %e, "a block the last member in sync cannot read or write: its requests fail, the member stays");
            }
            return;
        }
        self.failed[m] = true;
        if !was_gone {
            tracing::warn!(volume = %self.info.name, member = m, error = %e, "member failed");
        }
    }

    /// Give back what parent `p` holds: its rebuild region locks and its
    /// bitmap count.
    fn release(&self, p: &Parent) {
        if let Some((r0, r1)) = p.locked {
            self.locks.unlock_range(r0, r1);
        }
        if let (Some((r0, r1)), Some(b)) = (p.in_bitmap, &self.bitmap) {
            b.end(r0, r1);
        }
        if let Some((first, n)) = p.keys {
            self.behind.unlock_blocks(first, n);
        }
        if p.barrier {
            self.behind.lower_barrier();
        }
    }

    /// Whether write `pi` may go to the members now: its bitmap bits are
    /// on disk and, while a rebuild or scrub runs, its regions are locked.
    fn admit(&mut self, pi: usize) -> bool {
        let Some(p) = self.parents[pi].as_mut() else {
            return false;
        };
        if let Some(b) = &self.bitmap {
            let (r0, r1) = (
                b.region(p.offset / REGION),
                b.region((p.offset + p.blocks.max(1) - 1) / REGION),
            );
            if p.in_bitmap.is_none() {
                b.begin(r0, r1);
                p.in_bitmap = Some((r0, r1));
            }
            if !b.ready(r0, r1) {
                return false;
            }
        }
        if self.behind.limit() > 0 && p.keys.is_none() {
            // md's CollisionCheck: an overlapping write still in the
            // background (to this volume, from any core) goes first.
            if p.blocks <= super::members::MAX_KEYED_BLOCKS {
                if !self.behind.lock_blocks(p.offset, p.blocks) {
                    return false;
                }
                p.keys = Some((p.offset, p.blocks));
            } else if self.behind.inflight() > 0 {
                // New writes stay out of the background meanwhile (they
                // go to every member at once), or a stream of short ones
                // from other cores kept it, and every write queued behind
                // it on this core, waiting for as long as it lasted
                // (audit).
                if !p.barrier {
                    p.barrier = true;
                    self.behind.raise_barrier();
                }
                return false;
            }
        }
        if p.barrier {
            p.barrier = false;
            self.behind.lower_barrier();
        }
        !p.needs_lock || p.locked.is_some() || self.lock_regions(pi)
    }

    fn finish(&mut self, pi: usize) {
        if let Some(p) = self.parents[pi].as_ref() {
            if p.took == 0 && p.behind.is_some() {
                // No foreground member took it: the background copies
                // decide (`end_behind` answers it).
                return;
            }
        }
        if let Some(p) = self.parents[pi].take() {
            if let Some(io) = p
                .behind
                .and_then(|bi| self.behind_ios.get_mut(bi)?.as_mut())
            {
                io.parent = None;
            }
            self.release(&p);
            // A write is done only while a member that took it is still
            // there: one failed since (another request's error, another
            // core's report) took the write with it. A read's data was
            // read.
            let held = (0..self.members.len())
                .any(|m| p.took & (1 << m) != 0 && (p.op == IoOp::Read || !self.is_failed(m)));
            let result = if held {
                Ok(())
            } else {
                Err(p.error.unwrap_or(IoError::DeviceFailed))
            };
            self.done.push(Completion { tag: p.tag, result });
            self.free.push(pi);
        }
    }

    /// Lock every rebuild region write `pi` touches, all or none (so two
    /// writes never wait on each other).
    fn lock_regions(&mut self, pi: usize) -> bool {
        let Some(p) = self.parents[pi].as_ref() else {
            return false;
        };
        let (r0, r1) = (p.offset / REGION, (p.offset + p.blocks.max(1) - 1) / REGION);
        if !self.locks.try_lock_range(r0, r1) {
            return false;
        }
        if let Some(p) = self.parents[pi].as_mut() {
            p.locked = Some((r0, r1));
        }
        true
    }

    /// Send a write that waited for its regions to every member in use.
    /// False: every member's queue was full (back-pressure, not a
    /// failure: it was answered DeviceFailed, a guest IO error on a
    /// healthy mirror); it is to be sent again.
    fn start_waiting_write(&mut self, pi: usize) -> bool {
        if self.send_write(pi) {
            return true;
        }
        if (0..self.failed.len()).all(|m| self.is_failed(m)) {
            // Nothing left to serve it: fail clearly, never hang.
            if let Some(p) = self.parents[pi].as_mut() {
                p.error.get_or_insert(IoError::DeviceFailed);
            }
            self.finish(pi);
            return true;
        }
        false
    }

    fn on_child(&mut self, c: Completion) {
        if c.tag & BEHIND != 0 {
            self.on_behind(c);
            return;
        }
        let pi = (c.tag >> MEMBER_BITS) as usize;
        let m = (c.tag & ((1 << MEMBER_BITS) - 1)) as usize;
        if m == REPLACE {
            let Some(p) = self.parents.get_mut(pi).and_then(|p| p.as_mut()) else {
                return;
            };
            // Never the write's outcome: a failing new device ends the
            // replacement; the members have the data. A discard it cannot
            // take is no failure, as on a member (audit: one fstrim range
            // threw away a replacement's copying).
            match (c.result, self.replace.as_mut()) {
                (Err(e), _) if p.op == IoOp::Discard && unsupported(e) => {}
                (Err(e), Some(r)) => r.fail(&self.failures, self.members.len(), e),
                _ => {}
            }
            p.pending -= 1;
            if p.pending == 0 {
                self.finish(pi);
            }
            return;
        }
        if m < self.outstanding.len() {
            self.outstanding[m] = self.outstanding[m].saturating_sub(1);
        }
        let Some(p) = self.parents.get_mut(pi).and_then(|p| p.as_mut()) else {
            return;
        };
        p.pending -= 1;
        match c.result {
            // Only a member in sync holds the write for the guest (md's
            // In_sync rule): a rebuild's target is garbage above its
            // cursor and is failed with the rebuild if it ends up alone.
            Ok(()) if Some(m) != self.rebuild_target => p.took |= 1 << m,
            Ok(()) => {}
            // A discard is a hint the member may not take (a disk without
            // the zeroing its driver asks for answers "not supported"):
            // its error fails no member, as md ignores discard errors;
            // fstrim or mkfs failed every mirror, and the volume with them
            // (audit). The mirror keeps its data, as a discard allows.
            Err(e) if p.op == IoOp::Discard && unsupported(e) => {
                if Some(m) != self.rebuild_target {
                    p.took |= 1 << m;
                }
            }
            Err(e) => {
                p.error = Some(e);
                let is_read = p.op == IoOp::Read;
                self.fail_member(m, e);
                // Retry the read on another in-sync member; its full queue
                // is back-pressure, not a failure: from `poll` then.
                if is_read && self.pick_reader(pi).is_some() {
                    if !self.send_read(pi) {
                        self.held_reads.push_back(pi);
                    }
                    return;
                }
            }
        }
        if self.parents[pi].as_ref().is_some_and(|p| p.pending == 0) {
            self.finish(pi);
        }
    }
}

/// Whether `e` says the device does not do the request (a discard its
/// driver cannot carry out), rather than that the device failed.
fn unsupported(e: IoError) -> bool {
    // NVMe generic status: invalid opcode, invalid field.
    matches!(
        e,
        IoError::Unsupported(_)
            | IoError::Os(libc::EOPNOTSUPP | libc::EINVAL)
            | IoError::Device(0x0001 | 0x0002)
    )
}

impl IoChannel for Raid1Channel {
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
        let pi = match self.free.pop() {
            Some(i) => i,
            None => {
                self.parents.push(None);
                self.parents.len() - 1
            }
        };
        self.parents[pi] = Some(Parent {
            tag: req.tag,
            op: req.op,
            offset: req.offset_blocks,
            blocks: req.num_blocks,
            sg: req.sg,
            pending: 0,
            took: 0,
            error: None,
            tried: 0,
            locked: None,
            needs_lock: false,
            in_bitmap: None,
            keys: None,
            barrier: false,
            behind: None,
        });
        let write_like = matches!(req.op, IoOp::Write | IoOp::Discard | IoOp::WriteZeroes);
        if write_like {
            // A rebuild copies regions under their locks; this write waits
            // for the ones it touches so the copy cannot overwrite it.
            let locking = self.rebuild_target.is_some()
                || self.replace.is_some()
                || self.scrubbing.load(Ordering::Relaxed)
                || self.serialize.load(Ordering::Relaxed);
            if let Some(p) = self.parents[pi].as_mut() {
                p.needs_lock = locking;
            }
            if !self.waiting.is_empty() || !self.stalled.is_empty() || !self.admit(pi) {
                self.waiting.push_back(pi);
                return Ok(());
            }
        }
        let sent = if req.op == IoOp::Read {
            self.send_read(pi)
        } else {
            self.send_write(pi)
        };
        if !sent {
            // A read only a rebuild's target could take has no member.
            let no_member = if req.op == IoOp::Read {
                self.pick_reader(pi).is_none()
            } else {
                (0..self.failed.len()).all(|m| self.is_failed(m))
            };
            if no_member {
                // Nothing left to serve it: fail clearly, never hang.
                if let Some(p) = self.parents[pi].as_mut() {
                    p.error = Some(IoError::DeviceFailed);
                }
                self.finish(pi);
                return Ok(());
            }
            // Back-pressure: give the request back.
            let taken = self.parents[pi].take();
            self.free.push(pi);
            self.inflight -= 1;
            let Some(p) = taken else {
                return Ok(());
            };
            self.release(&p);
            return Err(SubmitError::Busy(IoRequest {
                op: p.op,
                offset_blocks: p.offset,
                num_blocks: p.blocks,
                sg: p.sg,
                tag: p.tag,
            }));
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        self.pump_resend();
        // (`send_read` holds a read only a write-mostly member can serve
        // again while background writes are out.)
        if !self.held_reads.is_empty() {
            for pi in std::mem::take(&mut self.held_reads) {
                if self.pick_reader(pi).is_none() {
                    // Nothing left to serve it: fail it clearly.
                    if let Some(p) = self.parents[pi].as_mut() {
                        p.error.get_or_insert(IoError::DeviceFailed);
                    }
                    if self.parents[pi].as_ref().is_some_and(|p| p.pending == 0) {
                        self.finish(pi);
                    }
                } else if !self.send_read(pi) {
                    // A full queue: again at the next poll.
                    self.held_reads.push_back(pi);
                }
            }
        }
        while let Some(&pi) = self.stalled.front() {
            if !self.start_waiting_write(pi) {
                break;
            }
            self.stalled.pop_front();
        }
        while let Some(&pi) = self.waiting.front() {
            if !self.stalled.is_empty() || !self.admit(pi) {
                break;
            }
            self.waiting.pop_front();
            if !self.start_waiting_write(pi) {
                self.stalled.push_back(pi);
            }
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        super::members::poll_members(&mut self.members, &mut scratch);
        if let Some(r) = self.replace.as_mut() {
            r.poll(&mut scratch);
        }
        for c in scratch.drain(..) {
            self.on_child(c);
        }
        self.scratch = scratch;
        let n = self.held.pass(self.failures.ledger(), &mut self.done, out);
        self.inflight -= n;
        n
    }

    /// Guest requests, and writes still in the background (a consumer
    /// keeps polling until they are back).
    fn inflight(&self) -> usize {
        self.inflight + self.behind_count
    }
}
