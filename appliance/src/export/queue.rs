//! A virtqueue served by one reactor: descriptor chains are parsed and sent
//! to the volume's channel on the same core, completions fill the used ring
//! and signal the guest (suppressed with EVENT_IDX). No thread hop and no
//! lock per request.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use bdev::{Completion, IoChannel, IoOp};
use poller::{Ctx, LocalGate, PollState, QuiesceObject};
use virtio_queue::Queue;

use super::chain::{Desc, RegionCache};
use super::dirtylog::DirtyLog;
use super::eventfd::Signaller;
use super::fault::FaultSignal;
use super::inflight::InflightQueue;
use super::memory::GuestMap;
use super::pieces::{Owed, Pieces};
use super::request::{Limits, S_IOERR};
use super::ring::{self, Ring};
use super::stats::IoStats;
use crate::qos::QueueQos;
use crate::volume::{Volume, VolumeConfig};

mod requests;
mod start;

pub use start::start;

/// Chains longer than this are malformed (the queue size bounds real ones).
const MAX_CHAIN: usize = 1024;
/// Requests taken from the ring per poll before looking at completions.
const POP_BATCH: usize = 64;
/// Empty polls before the runner asks the guest to kick again.
const IDLE_POLLS: u32 = 32;
/// How soon a queue asks again for a channel the volume's devices had no
/// room for (the queue takes nothing from its ring meanwhile).
const CHANNEL_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// What a stopping runner does with the writes it holds for a suspended
/// range (taken from the ring, not sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Leave them (a disconnect: a reconnecting frontend gets them again
    /// from its inflight area).
    Leave = 0,
    /// Stop only once none is held (a move to another reactor, or a
    /// frontend's stop within its time-out).
    Keep = 1,
    /// Answer them with an I/O error (a frontend's stop after they held it
    /// its whole time-out: the index it gets back counts them as taken,
    /// and a migration's destination would never see them).
    Fail = 2,
    /// A frontend's stop, or a move to another reactor, left to linger
    /// (its device held requests past the time-out): it ends once they are
    /// answered, and answers with an I/O error what it took from the ring
    /// and never sent, for the same reason as `Fail` (the ring goes on
    /// from its index, counting them).
    Linger = 3,
}

/// What the control thread and the runner share.
#[derive(Default)]
pub struct QueueShared {
    stop: AtomicBool,
    /// What a stop does with parked writes ([`Held`]).
    held: AtomicU8,
    /// Writes parked by a suspended range now.
    parked: AtomicU64,
    call_gen: AtomicU64,
    call: Mutex<Option<Arc<Signaller>>>,
    stopped: Mutex<Option<(u16, u16)>>,
    stopped_cv: Condvar,
}

impl QueueShared {
    /// Replace the call eventfd (the runner picks it up on its next poll).
    pub fn set_call(&self, call: Option<Arc<Signaller>>) {
        *self.call.lock().unwrap_or_else(|e| e.into_inner()) = call;
        self.call_gen.fetch_add(1, Ordering::SeqCst);
    }

    /// Ask the runner to stop once its in-flight requests are done, doing
    /// `held` with the writes it holds for a suspended range (also over an
    /// earlier stop's).
    pub fn request_stop(&self, held: Held) {
        self.held.store(held as u8, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn held(&self) -> Held {
        match self.held.load(Ordering::Acquire) {
            1 => Held::Keep,
            2 => Held::Fail,
            3 => Held::Linger,
            _ => Held::Leave,
        }
    }

    /// Writes the runner holds for a suspended range now.
    pub fn parked(&self) -> u64 {
        self.parked.load(Ordering::SeqCst)
    }

    /// Take back a stop request the runner has not acted on: false if it
    /// has stopped already (decided under the same lock as its stop).
    pub fn cancel_stop(&self) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        if stopped.is_some() {
            return false;
        }
        self.stop.store(false, Ordering::SeqCst);
        self.held.store(Held::Leave as u8, Ordering::SeqCst);
        true
    }

    /// Wait for the runner to stop; returns (next_avail, next_used).
    pub fn wait_stopped(&self, timeout: std::time::Duration) -> Option<(u16, u16)> {
        let g = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .stopped_cv
            .wait_timeout_while(g, timeout, |s| s.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

/// Everything a runner needs, built by the control thread.
pub struct QueueSetup {
    /// Queue index, for logs.
    pub index: u16,
    /// The configured queue.
    pub queue: Queue,
    /// Guest kick eventfd.
    pub kick: File,
    /// Shared with the control thread.
    pub shared: Arc<QueueShared>,
    /// The export's guest memory object.
    pub memory: QuiesceObject<GuestMap>,
    /// The exported volume.
    pub volume: Volume,
    /// What the parser enforces.
    pub limits: Arc<Limits>,
    /// Inflight tracking shared with the frontend, if negotiated.
    pub inflight: Option<InflightQueue>,
    /// The queue's IO counters.
    pub stats: Arc<IoStats>,
    /// Raised when the frontend broke the queue: the connection is dropped.
    pub fault: Arc<FaultSignal>,
    /// The driver did not take VIRTIO_BLK_F_FLUSH: it sends no flush, and
    /// the spec has a completed write be stable (each one is flushed
    /// before it is answered).
    pub write_through: bool,
    /// A device with no room for a channel yet: the queue starts taking
    /// nothing and asks again (else the start fails: a queue moved goes
    /// back where it was).
    pub wait_for_room: bool,
}

struct Inflight {
    head: u16,
    status: *mut u8,
    written: u32,
    op: IoOp,
    bytes: u64,
    /// `now_ns` when it was taken.
    started: u64,
    /// A write done on the device whose flush (`write_through`) is out.
    flushing: bool,
    /// Device requests of it not answered yet (a request larger than the
    /// device takes at once goes in pieces), and the status of the first
    /// that failed (S_OK while none has).
    parts: u32,
    failed: u8,
    /// Its pieces not sent yet (see `pieces`).
    pieces: Option<Box<Pieces>>,
}

struct Runner {
    index: u16,
    /// Set-up and the descriptor table's place; the rings go through `ring`.
    queue: Queue,
    ring: Ring,
    kick: File,
    call: Option<Arc<Signaller>>,
    call_gen: u64,
    shared: Arc<QueueShared>,
    mem_gate: LocalGate<GuestMap>,
    mem_gen: u64,
    mem: Arc<GuestMap>,
    /// The dirty log it marks in (live migration), as `mem.log` said at
    /// `log_version`: looked at once per poll.
    log: Option<Arc<DirtyLog>>,
    log_version: u64,
    /// While it has a dirty log, by slot: what the request's completion
    /// marks (the status byte's guest address, the bytes a read fills).
    /// Kept out of `slots` so that requests cost nothing more when nobody
    /// logs.
    logged: Vec<(u64, Vec<(u64, u64)>)>,
    vol_gate: LocalGate<VolumeConfig>,
    vol_gen: u64,
    /// The new generation's channel had no room: asked again then.
    vol_retry: Option<Instant>,
    /// The generation whose wait for room was logged.
    vol_retry_said: Option<u64>,
    ch: Box<dyn IoChannel>,
    limits: Arc<Limits>,
    slots: Vec<Option<Inflight>>,
    free: Vec<u32>,
    comps: Vec<Completion>,
    descs: Vec<Desc>,
    idle_polls: u32,
    notify_enabled: bool,
    signal_pending: bool,
    /// An interrupt asked for while there was no call fd, sent once one
    /// comes.
    owe_signal: bool,
    /// The frontend broke the ring (its connection is being dropped).
    broken: bool,
    /// The guest memory map no longer holds the rings (a memory change
    /// removed them): nothing touches them until a map that holds them
    /// again, and the queue waits meanwhile.
    ring_lost: bool,
    fault: Arc<FaultSignal>,
    /// See [`QueueSetup::write_through`].
    write_through: bool,
    /// What taken requests still owe the device (pieces, flushes), sent
    /// as the channel has room, in order.
    owed: VecDeque<Owed>,
    inflight: Option<InflightQueue>,
    /// Requests taken before a restart, to submit again first.
    resubmit: VecDeque<u16>,
    /// The volume's write-suspended range, and writes parked by it (out of
    /// the volume's gate), looked at again when its version changes.
    suspended: Arc<crate::volume::SuspendedRange>,
    parked: Vec<u16>,
    parked_version: u64,
    stats: Arc<IoStats>,
    /// The volume, for its IO limits at each new generation.
    volume: Volume,
    /// This queue's buckets of the volume's IO limits (`None`: unlimited,
    /// and the IO path pays one branch).
    qos: Option<QueueQos>,
    /// The request a limit held back (given back to the ring or the
    /// resubmit queue): nothing is taken until the buckets cover it.
    qos_wait: Option<(IoOp, u64)>,
    /// When the timer armed to look at it again fires.
    qos_timer: Option<Instant>,
    /// The reactor loop's timestamp of the current poll.
    now: Instant,
    /// `now` in nanoseconds since `epoch`: a request's latency is one
    /// subtraction (an `Instant` difference costs about 40 instructions).
    now_ns: u64,
    epoch: Instant,
    /// Last guest memory region translated (of `mem`).
    regions: RegionCache,
}

/// What became of one chain.
enum Dispatch {
    /// Answered or submitted.
    Taken,
    /// The device is full: try the same chain again later.
    Busy,
    /// A write to the volume's suspended range (as of this version):
    /// parked until it changes.
    Parked(u64),
    /// Over the volume's IO limits: give the chain back and take nothing
    /// until the limits let a request of this kind and size pass.
    Throttled(IoOp, u64),
}

/// The limits for the volume's device as it is now: a resized volume's
/// requests are checked against its new size.
fn sized_limits(limits: &Arc<Limits>, vol: &VolumeConfig) -> Arc<Limits> {
    let info = vol.device.info();
    let sectors = info.size_bytes() / super::request::SECTOR;
    // A new member set may take less at once (pieces follow the device).
    let part_max = super::request::part_max(info);
    if sectors == limits.capacity_sectors && part_max == limits.part_max {
        return limits.clone();
    }
    Arc::new(Limits {
        capacity_sectors: sectors,
        part_max,
        ..(**limits).clone()
    })
}

impl Runner {
    fn inflight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn poll(&mut self, ctx: &mut Ctx) -> PollState {
        let mut work = false;
        self.now = ctx.now();
        self.now_ns = self.now.saturating_duration_since(self.epoch).as_nanos() as u64;
        if self.mem.log.version() != self.log_version {
            self.adopt_log();
        }
        let call_gen = self.shared.call_gen.load(Ordering::Relaxed);
        if call_gen != self.call_gen {
            self.call_gen = call_gen;
            let had = self.call.is_some();
            self.call = self
                .shared
                .call
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            // The last poll may have signalled the old fd after the
            // frontend looked at it (QEMU checks a masked vector's
            // notifier once, when it unmasks): that interrupt would be
            // lost, and a guest waiting for it never kicks again. The new
            // fd is told once; a spurious interrupt costs the guest a look.
            if (had || self.owe_signal) && self.call.is_some() {
                self.owe_signal = false;
                self.signal_now();
            } else if had {
                // Taken away: the next fd is told once (review).
                self.owe_signal = true;
            }
        }
        // The channel may have work of its own after our requests are done
        // (a RAID1's writes to write-mostly members in the background).
        let channel_busy = self.ch.inflight() > 0;
        if (self.inflight() > 0 || channel_busy) && self.ch.poll(&mut self.comps) > 0 {
            work = true;
            let mut comps = std::mem::take(&mut self.comps);
            for c in comps.drain(..) {
                self.complete(c);
            }
            self.comps = comps;
            self.stats.set_inflight(self.inflight());
        }
        if !self.owed.is_empty() {
            self.send_owed();
        }
        // Acquire: what the stop asks to do with held writes was stored
        // before it.
        if self.shared.stop.load(Ordering::Acquire) {
            let held = self.shared.held();
            if !matches!(held, Held::Leave | Held::Linger) {
                // The stop waits for the writes held for a suspended
                // range: they go once the range moves, nothing new is
                // taken from the ring meanwhile; with `Fail`, those still
                // held are answered with an error.
                self.release_parked();
                let fail = held == Held::Fail && !self.parked.is_empty();
                if !self.resubmit.is_empty() || fail {
                    if self.inflight() == 0 {
                        self.refresh_generations(channel_busy);
                    }
                    // Walked again under the memory map and rings now
                    // published (as resubmitted ones are), never into rings
                    // that are lost.
                    let current = self.vol_gate.generation() == self.vol_gen
                        && self.mem_gate.generation() == self.mem_gen;
                    if current && !self.broken && !self.ring_lost {
                        if fail {
                            self.fail_parked();
                        }
                        self.pop_requests(false);
                    }
                }
            }
            let unsent = !self.parked.is_empty() || !self.resubmit.is_empty();
            if held == Held::Linger && unsent && self.inflight() == 0 && !channel_busy {
                // A stop left to linger (its device held requests past
                // the drain time-out) ends once they are answered; what it
                // took from the ring and never sent (parked for a
                // suspended range, then refused by the volume's limits)
                // is answered with an error, not dropped: the ring's index
                // the frontend gets counts it, and its guest would wait
                // for it for good (audit).
                self.refresh_generations(channel_busy);
                let current = self.vol_gate.generation() == self.vol_gen
                    && self.mem_gate.generation() == self.mem_gen;
                if current && !self.broken && !self.ring_lost {
                    let unsent: Vec<u16> = self.resubmit.drain(..).collect();
                    self.parked.extend(unsent);
                    self.fail_parked();
                }
            }
            self.signal();
            // The channel is dropped with the runner: let it finish its
            // own work here rather than block the reactor in its drop.
            // (A lingering stop lets go of what cannot be answered: into a
            // lost ring or a broken queue, or through a volume gate removed
            // with the volume; review.)
            let parked_ok = held == Held::Leave
                || (self.parked.is_empty() && self.resubmit.is_empty())
                || (held == Held::Linger
                    && (self.broken || self.ring_lost || self.vol_gate.is_removed()));
            if self.inflight() == 0 && !channel_busy && parked_ok && self.finish(ctx) {
                return PollState::Done;
            }
            return PollState::Busy;
        }
        if self.inflight() == 0 {
            let before = self.vol_retry;
            self.refresh_generations(channel_busy);
            if self.vol_retry.is_some() && self.vol_retry != before {
                // A timer asks again (each time the open is refused): the
                // reactor may sleep meanwhile.
                ctx.after(CHANNEL_RETRY, |_| {});
            }
        }
        self.release_parked();
        // A new generation is served only once its channel is open (the
        // old one may still finish work of its own first).
        let stale = self.vol_gate.generation() != self.vol_gen;
        // One waiting for room for its channel asks again when its timer
        // fires: it need not be polled meanwhile.
        let waits_for_channel = stale && self.vol_retry.is_some();
        let usable = !self.broken && !self.ring_lost;
        let throttled = match (&mut self.qos, self.qos_wait) {
            (Some(q), Some((op, bytes))) => !q.ensure(op, bytes, self.now),
            _ => false,
        };
        if !throttled {
            self.qos_wait = None;
        }
        if usable && !stale && !throttled {
            work |= self.pop_requests(true);
        }
        self.signal();
        if throttled
            && !work
            && self.inflight() == 0
            && !channel_busy
            && !stale
            && self.parked.is_empty()
        {
            // Held back by a limit with nothing else to do: sleep until
            // the limit gives tokens again (a timer wakes the reactor)
            // rather than spin on the buckets. Kicks are drained: a
            // readable kick fd would end every sleep at once, and the
            // ring is looked at when the timer fires.
            self.drain_kick();
            if let (Some(q), Some((op, bytes))) = (&self.qos, self.qos_wait) {
                let at = q.recheck_at(op, bytes);
                if self.qos_timer.is_none_or(|t| t <= self.now || t > at) {
                    ctx.after(at.saturating_duration_since(self.now), |_| {});
                    self.qos_timer = Some(at);
                }
            }
            return PollState::Idle;
        }
        // The ring's notification fields are guest memory written under
        // the memory map (and dirty log) this queue picked up: once the
        // core acknowledged a change of the map, the frontend may already
        // have its reply (logging off, a region gone), so nothing is
        // written until the resume brings the new map.
        let writable = !self.mem_gate.is_suspended() && self.mem_gate.generation() == self.mem_gen;
        if work {
            self.idle_polls = 0;
            if self.notify_enabled && writable {
                self.ring.disable_notification();
                self.notify_enabled = false;
            }
        } else {
            self.idle_polls = self.idle_polls.wrapping_add(1);
            if !usable {
                // Kicks wake nobody: the rings are not to be touched.
                self.drain_kick();
            } else if writable && self.idle_polls.is_multiple_of(IDLE_POLLS) {
                // Consume stale kicks so the reactor can sleep, ask for new
                // ones, and look at the ring once more: a request offered
                // just before the drain had its kick consumed by it.
                self.drain_kick();
                self.notify_enabled = true;
                if self.ring.enable_notification() {
                    return PollState::Busy;
                }
            }
        }
        if work
            || self.inflight() > 0
            || channel_busy
            || (stale && !waits_for_channel)
            || !self.parked.is_empty()
            || self.qos_wait.is_some()
        {
            // Parked writes are looked at each poll: nothing wakes a
            // sleeping reactor when the range is resumed; nor when a
            // limit's next tokens are due.
            PollState::Busy
        } else if self.notify_enabled || !usable || !writable {
            // (A suspended memory gate: nothing is taken from the ring
            // until the resume, which wakes the reactor.)
            PollState::Idle
        } else {
            // The guest has not been asked to kick yet (with EVENT_IDX its
            // avail_event is stale), so a sleeping reactor would never hear
            // of new requests. Under CPU load the reactor's idle span can
            // pass within a few loops: this hung a guest for good.
            PollState::Busy
        }
    }

    /// Mark in the log `mem.log` holds now (dirty logging went on or off
    /// or the log changed). Requests taken before logging went on noted
    /// nothing to mark: their chains are read again (their buffers are
    /// the guest's until they complete).
    fn adopt_log(&mut self) {
        self.log_version = self.mem.log.version();
        let log = self.mem.log.get();
        let newly = log.is_some() && self.log.is_none();
        self.ring.set_log(log.clone());
        self.log = log;
        if newly {
            for slot in 0..self.slots.len() {
                let Some((head, op, bytes)) =
                    self.slots[slot].as_ref().map(|r| (r.head, r.op, r.bytes))
                else {
                    continue;
                };
                self.walk(head);
                let status_gpa = self.descs.last().map_or(0, |d| {
                    d.addr.saturating_add(u64::from(d.len.saturating_sub(1)))
                });
                self.note_fills(slot, status_gpa, op, bytes);
            }
        }
    }

    /// Pick up a new guest memory map or volume configuration. Only with
    /// nothing in flight: in-flight requests point into the old ones.
    /// Pick up a new guest memory map (with none of our requests in
    /// flight) and a new volume generation (with the channel idle too: it
    /// may still be finishing work of its own, such as background writes
    /// to write-mostly members, which use copies of guest data).
    fn refresh_generations(&mut self, channel_busy: bool) {
        if self.mem_gate.generation() != self.mem_gen {
            let (g, m) = self.mem_gate.config();
            self.mem_gen = g;
            self.mem = m;
            self.regions.reset();
            // Another connection's switch, perhaps.
            self.adopt_log();
            match self.ring.remap(&self.mem) {
                Ok(()) if self.ring_lost => {
                    tracing::info!(
                        queue = self.index,
                        "the rings are in guest memory again: the queue goes on"
                    );
                    self.ring_lost = false;
                    self.idle_polls = 0;
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(queue = self.index, error = %e, "the queue waits until its rings are in guest memory again");
                    self.ring_lost = true;
                }
            }
        }
        let retry_later = self.vol_retry.is_some_and(|t| self.now < t);
        if !channel_busy && self.vol_gate.generation() != self.vol_gen && !retry_later {
            let (g, v) = self.vol_gate.config();
            self.limits = sized_limits(&self.limits, &v);
            // New limits come with a new generation.
            let qos = self.volume.qos();
            let same = match (&self.qos, &qos) {
                (Some(a), Some(b)) => a.shares(b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                self.qos = qos.map(QueueQos::new);
                self.qos_wait = None;
            }
            // The old channel (idle) goes first: its device queues make
            // room for the new one's on drives whose queue pairs are few.
            self.ch = Box::new(bdev::FailingChannel::default());
            self.vol_retry = None;
            self.ch = match v.device.open_channel() {
                Ok(ch) => ch,
                Err(e @ bdev::BdevError::Exhausted(_)) => {
                    // Another opener took the queue pair meanwhile: the
                    // queue stays stale (it takes nothing from the ring)
                    // and asks again shortly (said once per generation).
                    if self.vol_retry_said != Some(g) {
                        tracing::warn!(queue = self.index, error = %e, "no room for the volume's new channel yet; trying again every 20 ms");
                        self.vol_retry_said = Some(g);
                    }
                    self.vol_retry = Some(self.now + CHANNEL_RETRY);
                    return;
                }
                Err(e) => {
                    // Never the old generation's channel: its member set
                    // is gone (a spare being rebuilt would miss writes).
                    tracing::error!(queue = self.index, error = %e, "opening the volume's channel for its new configuration failed; requests fail until the next one");
                    Box::new(bdev::FailingChannel::default())
                }
            };
            self.vol_gen = g;
        }
    }

    /// Answer the writes held for a suspended range with an I/O error, in
    /// their order; what the gates do not let through now waits for the
    /// next poll.
    fn fail_parked(&mut self) {
        let heads = std::mem::take(&mut self.parked);
        let mut done = 0;
        for &head in &heads {
            if !self.mem_gate.try_begin() {
                break;
            }
            if !self.vol_gate.try_begin() {
                self.mem_gate.end();
                break;
            }
            self.walk(head);
            self.answer(head, S_IOERR);
            done += 1;
        }
        self.parked.extend_from_slice(&heads[done..]);
        self.shared
            .parked
            .store(self.parked.len() as u64, Ordering::SeqCst);
    }

    /// The range moved: parked writes go again, in their order.
    fn release_parked(&mut self) {
        if !self.parked.is_empty() && self.suspended.version() != self.parked_version {
            self.resubmit.extend(self.parked.drain(..));
            self.shared.parked.store(0, Ordering::SeqCst);
        }
    }

    /// Submit requests to resubmit, then (if `ring`) new ones from the
    /// avail ring.
    fn pop_requests(&mut self, ring: bool) -> bool {
        let mut taken = 0;
        while taken < POP_BATCH && !self.free.is_empty() {
            if !self.mem_gate.try_begin() {
                break;
            }
            if !self.vol_gate.try_begin() {
                self.mem_gate.end();
                break;
            }
            let from_ring;
            let head = if let Some(head) = self.resubmit.pop_front() {
                from_ring = false;
                self.walk(head);
                head
            } else if !ring {
                self.vol_gate.end();
                self.mem_gate.end();
                break;
            } else {
                from_ring = true;
                // A guest has at most a ring's worth of requests out: one
                // that offers more (the same head again and again while
                // it is parked, taking no slot) is not served further
                // until some are answered (parked writes grew without
                // bound, until the daemon ran out of memory).
                if self.inflight() + self.parked.len() >= self.slots.len() {
                    self.vol_gate.end();
                    self.mem_gate.end();
                    break;
                }
                let head = match self.ring.pop() {
                    Ok(Some(head)) => head,
                    Ok(None) => {
                        self.vol_gate.end();
                        self.mem_gate.end();
                        break;
                    }
                    Err(e) => {
                        tracing::error!(queue = self.index, error = %e, "the frontend broke the queue: its connection is dropped");
                        self.broken = true;
                        self.fault.raise();
                        self.vol_gate.end();
                        self.mem_gate.end();
                        break;
                    }
                };
                self.prefetch_ahead();
                // The chain is read through the region cache.
                self.walk(head);
                if let Some(i) = &mut self.inflight {
                    i.begin(head);
                }
                head
            };
            taken += 1;
            let d = self.dispatch(head);
            match d {
                Dispatch::Taken => {}
                Dispatch::Busy | Dispatch::Throttled(..) => {
                    // The device is full, or the limits are reached: give
                    // the chain back and retry later (it is walked again:
                    // nothing of it is kept meanwhile).
                    if let Dispatch::Throttled(op, bytes) = d {
                        self.qos_wait = Some((op, bytes));
                    }
                    if from_ring {
                        self.ring.undo_pop();
                    } else {
                        self.resubmit.push_front(head);
                    }
                    self.vol_gate.end();
                    self.mem_gate.end();
                    break;
                }
                Dispatch::Parked(version) => {
                    // Out of the gates while it waits: a held write must
                    // not stall the volume's quiesce epochs. It is walked
                    // again (memory may have changed) when it goes.
                    if self.parked.is_empty() || version < self.parked_version {
                        self.parked_version = version;
                    }
                    self.parked.push(head);
                    self.shared
                        .parked
                        .store(self.parked.len() as u64, Ordering::SeqCst);
                    self.vol_gate.end();
                    self.mem_gate.end();
                }
            }
        }
        taken > 0
    }

    /// Start fetching what the next requests will need while this one is
    /// served: the descriptor of the one after next, and the header (or
    /// indirect table) the next one's first descriptor points to, which
    /// the previous call started fetching. Each is a line the guest wrote
    /// on another core; fetched one after another they were most of the
    /// export's time per request in `perf` (the header read alone a
    /// quarter).
    #[inline]
    fn prefetch_ahead(&self) {
        if let Some(h) = self.ring.peek(1) {
            self.ring.prefetch_desc(h);
        }
        if let Some(addr) = self.ring.peek(0).and_then(|h| self.ring.desc_addr(h)) {
            if let Some((host, _)) = self.regions.find(&self.mem, addr) {
                ring::prefetch(host);
            }
        }
    }

    fn signal(&mut self) {
        if !self.signal_pending || self.ring_lost {
            return;
        }
        self.signal_pending = false;
        // With EVENT_IDX the guest says when it wants an interrupt.
        if self.ring.needs_notification() {
            self.signal_now();
        }
    }

    /// Interrupt the guest, whatever it asked for; without a call fd yet,
    /// once one comes (a frontend may give it after the ring starts, and
    /// a completion made meanwhile would never be signalled: review).
    fn signal_now(&mut self) {
        match &self.call {
            Some(call) => call.signal(),
            None => self.owe_signal = true,
        }
    }

    fn drain_kick(&self) {
        // A read the frontend made block (kernels before 5.12) is freed by
        // the watchdog; it could do so at every kick, each time stalling
        // this reactor: its connection goes (review).
        if super::eventfd::drain_watched(self.kick.as_raw_fd()).1 {
            tracing::warn!(
                queue = self.index,
                "the frontend made a read of its kick fd block; dropping it"
            );
            self.fault.raise();
        }
    }

    /// Stop, if the stop was not taken back meanwhile (`cancel_stop`).
    fn finish(&mut self, ctx: &mut Ctx) -> bool {
        let mut stopped = self
            .shared
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !self.shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        ctx.unwatch_fd(self.kick.as_raw_fd());
        *stopped = Some((self.ring.next_avail(), self.ring.next_used()));
        drop(stopped);
        self.shared.stopped_cv.notify_all();
        true
    }
}
