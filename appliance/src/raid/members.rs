//! Members of a RAID volume and how the IO path reports a failed one.
//!
//! A RAID device is immutable for one configuration generation: member
//! states change only by publishing a new device through the volume's
//! quiesce epoch. A channel that sees a member fail stops using it at once
//! (locally), completes the request from the survivors when it can, and
//! sends a [`MemberFailure`] to the volume's monitor, which makes the
//! change for everyone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bdev::{
    BdevError, BlockDevice, Completion, IoChannel, IoError, IoOp, IoRequest, SgList, SubmitError,
};

use super::locks::StripeLocks;

mod events;
pub use events::{Event, FailureLedger, FailureSink, HeldCompletions, MemberFailure, Run};

/// A member's role in the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// Holds current data.
    InSync,
    /// Failed: no IO goes to it.
    Failed,
    /// Being rebuilt: valid below the rebuild cursor, written everywhere
    /// the rebuild has passed.
    Rebuilding,
}

impl MemberState {
    /// How the superblock records it.
    /// Its code in superblocks (bit 7 of a slot's byte is write-mostly).
    pub fn code(self) -> u8 {
        match self {
            MemberState::InSync => 0,
            MemberState::Failed => 1,
            MemberState::Rebuilding => 2,
        }
    }
}

/// One member.
#[derive(Clone)]
pub struct Member {
    /// The device.
    pub dev: Arc<dyn BlockDevice>,
    /// Its state in this generation.
    pub state: MemberState,
    /// Read only when no other in-sync member can serve (md's
    /// write-mostly): a slow or remote mirror still gets every write.
    pub write_mostly: bool,
    /// Set by the first IO that sees the device fail, on any core (md's
    /// Faulty bit): from then on no channel and no background worker
    /// sends it IO, whatever generation they run, until the monitor
    /// publishes one with the member failed. Shared by every generation
    /// that keeps this device in this slot.
    pub gone: Arc<AtomicBool>,
    /// IOs that failed on this device in this slot, shared like `gone`
    /// (for metrics; bumped only on an error).
    pub errors: Arc<AtomicU64>,
    /// Failed while in sync, with a bitmap that has marked every write
    /// since (it keeps its bits while the volume is degraded): its own
    /// device may come back with only the marked rows copied (md's
    /// re-add). Never for a member that failed while being rebuilt (its
    /// unreached rows are marked nowhere) or across a change of bitmap.
    pub readd: bool,
}

/// Bit of a superblock slot byte that marks a write-mostly member.
pub const WRITE_MOSTLY: u8 = 0x80;

impl Member {
    /// A member with no flags.
    pub fn new(dev: Arc<dyn BlockDevice>, state: MemberState) -> Member {
        Member {
            dev,
            state,
            write_mostly: false,
            gone: Arc::default(),
            errors: Arc::default(),
            readd: false,
        }
    }

    /// Whether the device was reported failed (see `gone`).
    #[inline]
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Its state as it must be recorded: a member reported failed is
    /// failed on disk even before a generation says so.
    pub fn recorded_state(&self) -> MemberState {
        if self.is_gone() {
            MemberState::Failed
        } else {
            self.state
        }
    }

    /// Its byte in superblocks: state code and flags.
    pub fn code(&self) -> u8 {
        self.recorded_state().code() | if self.write_mostly { WRITE_MOSTLY } else { 0 }
    }
}

/// What stands in a slot whose device is missing (not found at assembly)
/// or was removed by the operator (md's "removed"): a device with no name
/// that refuses every channel. The slot is failed, so no IO is meant for
/// it; its size keeps the level's geometry.
pub struct MissingDevice {
    info: bdev::DeviceInfo,
}

impl MissingDevice {
    /// A stand-in shaped like `like` (block size and count).
    pub fn like(like: &dyn BlockDevice) -> Arc<dyn BlockDevice> {
        let l = like.info();
        Arc::new(MissingDevice {
            info: bdev::DeviceInfo {
                name: String::new(),
                block_size: l.block_size,
                num_blocks: l.num_blocks,
                max_transfer: l.max_transfer,
                optimal_io_boundary: 0,
                min_io_blocks: 1,
                flush: false,
                discard: false,
                write_zeroes: false,
            },
        })
    }

    /// Whether `dev` is such a stand-in.
    pub fn is(dev: &dyn BlockDevice) -> bool {
        dev.info().name.is_empty()
    }
}

impl BlockDevice for MissingDevice {
    fn info(&self) -> &bdev::DeviceInfo {
        &self.info
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Err(BdevError::Unsupported(
            "a missing member has no channel".into(),
        ))
    }
}

/// Identity of a member device (its allocation), for telling a report
/// about the device now in a slot from one about the device it replaced.
pub fn device_id(dev: &Arc<dyn BlockDevice>) -> usize {
    Arc::as_ptr(dev) as *const () as usize
}

/// The block size every member shares and the smallest member's blocks:
/// a volume over members of different block sizes is refused.
pub fn common_geometry(name: &str, members: &[Member]) -> Result<(u32, u64), BdevError> {
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
    Ok((bs, smallest))
}

/// A core's channel to a hot replacement's new device. Its writes are
/// extra children of a write (never its outcome); requests the device
/// cannot take yet wait here; once one fails, the rest are dropped and
/// the monitor is told (it ends the replacement).
pub struct ReplaceChannel {
    /// The slot being replaced.
    pub slot: usize,
    /// `None` if it could not be opened (the replacement is failed).
    ch: Option<Box<dyn IoChannel>>,
    deferred: std::collections::VecDeque<IoRequest>,
    /// The replacement's flag, shared by every core (see
    /// [`Replacement::failed`]).
    failed: Arc<AtomicBool>,
    /// The replacement's run, named in its abort.
    run: Run,
}

impl ReplaceChannel {
    /// The channel for `set`'s replacement, if one runs.
    pub fn open(set: &MemberSet) -> Result<Option<ReplaceChannel>, BdevError> {
        let Some(r) = &set.replacing else {
            return Ok(None);
        };
        // A new device that cannot be opened fails the replacement, not
        // the volume's channel: the slot's own device has the data (one
        // with no queue pair left too: failing the volume's channel
        // instead would fail every guest request until the next change).
        let ch = match r.dev.open_channel() {
            Ok(ch) => Some(ch),
            Err(e) => {
                if !r.failed.swap(true, Ordering::SeqCst) {
                    set.failures.event(Event::RebuildAborted(
                        set.members.len(),
                        Run::of(&r.cursor),
                        format!("the replacement device cannot be opened: {e}"),
                    ));
                }
                None
            }
        };
        Ok(Some(ReplaceChannel {
            slot: r.slot,
            ch,
            deferred: Default::default(),
            failed: r.failed.clone(),
            run: Run::of(&r.cursor),
        }))
    }

    /// Send a copy of a write to the slot; false if none was sent (the
    /// replacement failed already).
    pub fn send(&mut self, op: IoOp, block: u64, blocks: u64, sg: SgList, tag: u64) -> bool {
        if self.failed.load(Ordering::Acquire) {
            return false;
        }
        let Some(ch) = self.ch.as_mut() else {
            return false;
        };
        let req = IoRequest {
            op,
            offset_blocks: block,
            num_blocks: blocks,
            sg,
            tag,
        };
        if !self.deferred.is_empty() {
            self.deferred.push_back(req);
            return true;
        }
        if let Err(SubmitError::Busy(req)) = ch.submit(req) {
            self.deferred.push_back(req);
        }
        true
    }

    /// Collect completions (and send what waited for room).
    pub fn poll(&mut self, out: &mut Vec<Completion>) {
        let Some(ch) = self.ch.as_mut() else {
            return;
        };
        while let Some(req) = self.deferred.pop_front() {
            if let Err(SubmitError::Busy(req)) = ch.submit(req) {
                self.deferred.push_front(req);
                break;
            }
        }
        if ch.inflight() > 0 {
            ch.poll(out);
        }
    }

    /// A write to the new device failed: tell the monitor once, under the
    /// replacement's event (the slot after the last member's).
    pub fn fail(&mut self, sink: &FailureSink, members: usize, e: IoError) {
        // Shared by every core: a write acknowledged without the new device
        // means it can never take the slot.
        if !self.failed.swap(true, Ordering::SeqCst) {
            sink.event(Event::RebuildAborted(
                members,
                self.run.clone(),
                format!("the replacement device failed a write: {e}"),
            ));
        }
    }
}

/// Member channels opened on the calling core.
pub type MemberChannels = Vec<Option<Box<dyn IoChannel>>>;

/// Collect the completions of every open member channel into `out`.
pub fn poll_members(chans: &mut MemberChannels, out: &mut Vec<Completion>) {
    for ch in chans.iter_mut().flatten() {
        if ch.inflight() > 0 {
            ch.poll(out);
        }
    }
}

/// Channels to the members that take IO (in sync or being rebuilt; `None`
/// for failed ones), in slot order. A member whose device refuses a
/// channel (a controller gone) is reported failed like one that failed an
/// IO: the volume goes on without it rather than refuse every request on
/// this core. An in-sync member that only has no room for another
/// channel now (its queue pairs all in use: a host that connects more
/// queues than the drives have) fails the open instead, not the member:
/// whoever asked for the channel gets the error (a queue moving to a new
/// generation asks again). The in-sync members are opened first: when
/// every drive is full at once, that error comes before a spare being
/// rebuilt is tried, which is failed on any refusal as before (the
/// rebuild goes to the next spare).
pub fn open_members(set: &MemberSet) -> Result<MemberChannels, BdevError> {
    let mut chans: MemberChannels = (0..set.members.len()).map(|_| None).collect();
    for state in [MemberState::InSync, MemberState::Rebuilding] {
        for (slot, m) in set.members.iter().enumerate() {
            if m.state != state || m.is_gone() {
                continue;
            }
            chans[slot] = match m.dev.open_channel() {
                Ok(ch) => Some(ch),
                Err(e @ BdevError::Exhausted(_)) if state == MemberState::InSync => return Err(e),
                Err(e) => {
                    tracing::warn!(member = slot, device = %m.dev.info().name, error = %e, "a member refused a channel");
                    set.failures.report(slot, m, IoError::DeviceFailed);
                    None
                }
            };
        }
    }
    Ok(chans)
}

/// What changes from one generation of a RAID device to the next — the
/// members and the slot being rebuilt — and what every generation shares:
/// the row lock table, the scrub flag and where failures go. The member
/// lifecycle (fail, replace, back in sync) is the same for every level and
/// lives here once.
#[derive(Clone)]
pub struct MemberSet {
    /// Members in slot order.
    pub members: Arc<Vec<Member>>,
    /// The slot being rebuilt and its cursor (rows done).
    pub rebuilding: Option<(usize, Arc<AtomicU64>)>,
    /// Row locks: RAID5 stripes, RAID1 regions while a rebuild or scrub runs.
    pub locks: Arc<StripeLocks>,
    /// Set while a scrub runs.
    pub scrubbing: Arc<AtomicBool>,
    /// The mirror a repair copies from, and reads of what may still differ
    /// go to, while `scrubbing` (see [`reference`](Self::reference)):
    /// pinned when the scrub starts, across generations. Taken from the
    /// members' write-mostly flags at each generation, a change of them
    /// during a repair moved reads to another mirror where the mirrors
    /// still differed: what a guest read changed with no write (audit).
    /// `usize::MAX`: none pinned.
    pub pinned: Arc<std::sync::atomic::AtomicUsize>,
    /// Where channels report failures.
    pub failures: FailureSink,
    /// The write-intent bitmap, if the volume keeps one.
    pub bitmap: Option<Arc<super::bitmap::Bitmap>>,
    /// A hot replacement (md's --replace): the in-sync slot whose device
    /// is being copied to a new one, which gets every write to the slot
    /// meanwhile; and the copy's cursor (rows done).
    pub replacing: Option<Replacement>,
    /// Guest IO on the volume's channels.
    pub activity: Arc<Activity>,
    /// md's serialize_policy (RAID1): overlapping writes reach the mirrors
    /// one after the other, so concurrent writes from several cores never
    /// leave the mirrors holding different data.
    pub serialize: Arc<AtomicBool>,
    /// md's write-behind (RAID1): writes to write-mostly members finish in
    /// the background, up to a limit.
    pub behind: Arc<WriteBehind>,
    /// Blocks of each member the array uses, data offset included (md's
    /// recorded size): larger members are not used past it. `None`: the
    /// smallest member's size (a new volume).
    pub limit: Option<u64>,
}

/// md's write-behind: a write is acknowledged once the members that are
/// not write-mostly have it; its copies to write-mostly members carry on
/// in the background (from a copy of the data), at most `limit` at once
/// over the volume. Shared by every generation of a volume.
#[derive(Default)]
pub struct WriteBehind {
    /// Most writes in the background at once; 0: off.
    limit: AtomicU64,
    /// Writes in the background now.
    inflight: AtomicU64,
    /// Blocks written now, while write-behind is on (md's CollisionCheck):
    /// a write waits for an overlapping one still in the background, so
    /// the write-mostly members get overlapping writes in order.
    blocks: StripeLocks,
    /// Writes too long for keys waiting for nothing to be in the
    /// background: while any does, no new write goes there (md's
    /// barrier), or a steady stream of short ones would keep it waiting.
    barriers: AtomicU64,
}

/// Writes longer than this take no block keys; they wait until nothing is
/// in the background instead.
pub const MAX_KEYED_BLOCKS: u64 = 4096;

impl WriteBehind {
    /// The limit (0: off).
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::SeqCst)
    }

    /// Set the limit (0 turns it off for new writes).
    pub fn set_limit(&self, n: u64) {
        self.limit.store(n, Ordering::SeqCst);
    }

    /// Writes in the background now.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Take a background slot if one is free and no long write waits for
    /// them all to be free.
    pub fn try_take(&self) -> bool {
        if self.barriers.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let limit = self.limit();
        self.inflight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// A long write waits for nothing to be in the background.
    pub fn raise_barrier(&self) {
        self.barriers.fetch_add(1, Ordering::SeqCst);
    }

    /// That write no longer waits (admitted, or answered).
    pub fn lower_barrier(&self) {
        self.barriers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Give a slot back.
    pub fn give_back(&self) {
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Take the keys of blocks `first..first + n`, all or none.
    pub fn lock_blocks(&self, first: u64, n: u64) -> bool {
        n == 0 || self.blocks.try_lock_range(first, first + n - 1)
    }

    /// Give back what `lock_blocks` took.
    pub fn unlock_blocks(&self, first: u64, n: u64) {
        if n > 0 {
            self.blocks.unlock_range(first, first + n - 1);
        }
    }

    /// Wait until no write is in the background (the reactors finish
    /// them); after `timeout`, how many are left.
    pub fn drain(&self, timeout: std::time::Duration) -> Result<(), u64> {
        let t = std::time::Instant::now();
        while self.inflight() > 0 {
            if t.elapsed() >= timeout {
                return Err(self.inflight());
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        Ok(())
    }
}

/// Guest IO seen by a volume's channels, for a rebuild to yield to (md's
/// sync_speed_min). One counter per channel, each on its own cache line
/// and written only by its channel's core, so counting costs no atomic
/// read-modify-write and no shared line.
#[derive(Default)]
pub struct Activity {
    counters: Mutex<Vec<std::sync::Weak<Counter>>>,
}

/// One channel's request count.
#[derive(Default)]
#[repr(align(128))]
pub struct Counter(AtomicU64);

impl Counter {
    /// One more request (only the owning channel calls this).
    #[inline]
    pub fn bump(&self) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
    }
}

impl Activity {
    /// A counter for a new channel.
    pub fn counter(&self) -> Arc<Counter> {
        let c = Arc::new(Counter::default());
        let mut v = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(&c));
        c
    }

    /// Requests so far over the live channels (it changes when IO runs).
    pub fn total(&self) -> u64 {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|w| w.upgrade())
            .fold(0u64, |a, c| a.wrapping_add(c.0.load(Ordering::Relaxed)))
    }
}

/// The device taking over an in-sync slot.
#[derive(Clone)]
pub struct Replacement {
    /// The slot.
    pub slot: usize,
    /// The new device.
    pub dev: Arc<dyn BlockDevice>,
    /// Rows copied.
    pub cursor: Arc<AtomicU64>,
    /// Set by the first write to the new device that fails (or a channel
    /// that cannot open it), on any core: a guest write was acknowledged
    /// without it, so it must never take the slot.
    pub failed: Arc<AtomicBool>,
}

/// The mirror a repair copies from and reads of what may differ go to,
/// of the `n` members those `usable`: `pinned` (see `MemberSet::pinned`)
/// if it is usable, else the first that is not write-mostly (the lowest
/// slot among equals), as md reads the first mirror past its resync
/// point.
pub fn reference(
    pinned: usize,
    n: usize,
    usable: impl Fn(usize) -> bool,
    write_mostly: impl Fn(usize) -> bool,
) -> Option<usize> {
    if pinned < n && usable(pinned) {
        return Some(pinned);
    }
    (0..n)
        .filter(|&m| usable(m))
        .min_by_key(|&m| (write_mostly(m), m))
}

impl MemberSet {
    /// The reference (see [`reference`]) of those `usable`, the pinned
    /// one while a scrub runs.
    pub fn reference(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let pinned = if self.scrubbing.load(Ordering::SeqCst) {
            self.pinned.load(Ordering::SeqCst)
        } else {
            usize::MAX
        };
        reference(pinned, self.members.len(), usable, |m| {
            self.members[m].write_mostly
        })
    }

    /// Pin the reference among the in-sync members for a scrub that
    /// starts (or a resync owed), unless one cut short pinned it already.
    pub fn pin_reference(&self, keep: bool) {
        if keep && self.pinned.load(Ordering::SeqCst) < self.members.len() {
            return;
        }
        let r = reference(
            usize::MAX,
            self.members.len(),
            |m| self.members[m].recorded_state() == MemberState::InSync,
            |m| self.members[m].write_mostly,
        );
        self.pinned.store(r.unwrap_or(usize::MAX), Ordering::SeqCst);
    }

    /// A first generation.
    pub fn new(members: Vec<Member>, failures: FailureSink) -> MemberSet {
        MemberSet {
            members: Arc::new(members),
            rebuilding: None,
            locks: Arc::new(StripeLocks::new()),
            scrubbing: Arc::new(AtomicBool::new(false)),
            pinned: Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX)),
            failures,
            bitmap: None,
            replacing: None,
            activity: Arc::default(),
            serialize: Arc::default(),
            behind: Arc::default(),
            limit: None,
        }
    }

    /// The same members, using at most `limit` blocks of each.
    pub fn with_limit(self, limit: Option<u64>) -> MemberSet {
        MemberSet { limit, ..self }
    }

    /// The next generation copying `slot` (in sync) to `dev`, which gets
    /// every write to the slot from now on.
    pub fn with_replacement(
        &self,
        name: &str,
        slot: usize,
        dev: Arc<dyn BlockDevice>,
        need_blocks: u64,
    ) -> Result<MemberSet, BdevError> {
        if self.members.get(slot).map(|m| m.state) != Some(MemberState::InSync) {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: slot {slot} is not in sync"
            )));
        }
        if self.rebuilding.is_some() || self.replacing.is_some() {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: a rebuild or replacement is already running"
            )));
        }
        let bs = self.members[slot].dev.info().block_size;
        if dev.info().block_size != bs || dev.info().num_blocks < need_blocks {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: {} is too small or has another block size (needs {need_blocks} blocks of {bs})",
                dev.info().name
            )));
        }
        Ok(MemberSet {
            replacing: Some(Replacement {
                slot,
                dev,
                cursor: Arc::new(AtomicU64::new(0)),
                failed: Arc::default(),
            }),
            ..self.clone()
        })
    }

    /// The next generation without the replacement: it finished (`done`:
    /// the new device takes the slot, in sync) or was given up.
    pub fn replacement_over(&self, done: bool) -> MemberSet {
        let mut members = (*self.members).clone();
        if let (true, Some(r)) = (done, &self.replacing) {
            let write_mostly = members[r.slot].write_mostly;
            members[r.slot] = Member::new(r.dev.clone(), MemberState::InSync);
            members[r.slot].write_mostly = write_mostly;
        }
        MemberSet {
            members: Arc::new(members),
            replacing: None,
            ..self.clone()
        }
    }

    /// The same members with `bitmap` (or none).
    pub fn with_bitmap(&self, bitmap: Option<Arc<super::bitmap::Bitmap>>) -> MemberSet {
        // Writes before this bitmap are marked in none: no failed member
        // may count on it.
        let mut members = (*self.members).clone();
        for m in &mut members {
            m.readd = false;
        }
        MemberSet {
            bitmap,
            members: Arc::new(members),
            ..self.clone()
        }
    }

    fn next(&self, members: Vec<Member>, rebuilding: Option<(usize, Arc<AtomicU64>)>) -> MemberSet {
        MemberSet {
            members: Arc::new(members),
            rebuilding,
            ..self.clone()
        }
    }

    /// The devices of the members that take writes now (in sync or being
    /// rebuilt, not gone): what must be flushed for the writes the volume
    /// made to be durable.
    pub fn live_devices(&self) -> impl Iterator<Item = Arc<dyn BlockDevice>> + '_ {
        self.members
            .iter()
            .filter(|m| m.recorded_state() != MemberState::Failed && !m.is_gone())
            .filter(|m| !MissingDevice::is(m.dev.as_ref()))
            .map(|m| m.dev.clone())
    }

    /// Member states in slot order.
    pub fn states(&self) -> Vec<MemberState> {
        self.members.iter().map(|m| m.state).collect()
    }

    /// The next generation with `slot` write-mostly (or not).
    pub fn with_write_mostly(
        &self,
        name: &str,
        slot: usize,
        on: bool,
    ) -> Result<MemberSet, BdevError> {
        if slot >= self.members.len() {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: no member in slot {slot}"
            )));
        }
        let mut members = (*self.members).clone();
        members[slot].write_mostly = on;
        Ok(self.next(members, self.rebuilding.clone()))
    }

    /// The next generation with `slot` failed (a rebuild onto it stops).
    pub fn failed(&self, name: &str, slot: usize) -> Result<MemberSet, BdevError> {
        if slot >= self.members.len() {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: no member in slot {slot}"
            )));
        }
        let mut members = (*self.members).clone();
        // A member that missed the bitmap's first write (a bitmap turned
        // on with the member dead but unnoticed) never had the point it
        // starts from: re-added from it, it would miss whatever it lost
        // before, marked nowhere (audit).
        let id = device_id(&members[slot].dev);
        members[slot].readd = members[slot].state == MemberState::InSync
            && self.bitmap.as_ref().is_some_and(|b| !b.missed_first(id));
        members[slot].state = MemberState::Failed;
        let rebuilding = self.rebuilding.clone().filter(|(r, _)| *r != slot);
        // A replacement stops when any member fails: the spare logic takes
        // over, and a degraded volume is no time for a copy.
        Ok(MemberSet {
            replacing: None,
            ..self.next(members, rebuilding)
        })
    }

    /// The next generation with failed `slot` taken by `dev`, rebuilt from
    /// row `cursor` on; `dev` must hold `need_blocks` of `block_size`.
    pub fn replaced(
        &self,
        name: &str,
        slot: usize,
        dev: Arc<dyn BlockDevice>,
        cursor: u64,
        need_blocks: u64,
        block_size: u32,
    ) -> Result<MemberSet, BdevError> {
        if self.members.get(slot).map(|m| m.state) != Some(MemberState::Failed) {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: slot {slot} is not failed"
            )));
        }
        if self.rebuilding.is_some() {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: a rebuild is already running"
            )));
        }
        if dev.info().block_size != block_size || dev.info().num_blocks < need_blocks {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: {} is too small or has another block size (needs {need_blocks} blocks of {block_size})",
                dev.info().name
            )));
        }
        let mut members = (*self.members).clone();
        // A member's own device back (md's re-add) keeps its write-mostly
        // mark; another device starts without.
        let same = device_id(&members[slot].dev) == device_id(&dev);
        let write_mostly = same && members[slot].write_mostly;
        members[slot] = Member::new(dev, MemberState::Rebuilding);
        members[slot].write_mostly = write_mostly;
        Ok(self.next(members, Some((slot, Arc::new(AtomicU64::new(cursor))))))
    }

    /// The next generation with `slot` in sync, once its rebuild has done
    /// all `rows`.
    pub fn in_sync(&self, name: &str, slot: usize, rows: u64) -> Result<MemberSet, BdevError> {
        match &self.rebuilding {
            Some((r, c)) if *r == slot && c.load(Ordering::SeqCst) >= rows => {
                let mut members = (*self.members).clone();
                members[slot].state = MemberState::InSync;
                Ok(self.next(members, None))
            }
            _ => Err(BdevError::InvalidArgument(format!(
                "{name}: slot {slot} has not been rebuilt"
            ))),
        }
    }
}
