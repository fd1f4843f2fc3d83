//! A built-in IO workload run by the reactors themselves: the daemon's
//! self-check and the device micro-benchmarks.
//!
//! Each reactor drives its own slice of a device through its own channel at
//! a fixed queue depth, every IO admitted by the object's quiesce gate. In
//! verify mode every write carries a pattern derived from (block, sequence)
//! and every read of a written block is checked against the last write.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{BlockDevice, Completion, DmaBuf, DmaPool, IoChannel, IoOp, IoRequest, IoVec, SgList};
use poller::{Ctx, LocalGate, PollState, QuiesceObject, ReactorSet};

/// Finds the device in a configuration generation.
type DeviceOf<C> = fn(&C) -> Arc<dyn BlockDevice>;

/// How the workload runs.
#[derive(Debug, Clone)]
pub struct WorkloadParams {
    /// Requests in flight per reactor.
    pub queue_depth: usize,
    /// Bytes per request (a multiple of the device block size).
    pub io_bytes: usize,
    /// Percentage of reads (the rest are writes).
    pub read_percent: u32,
    /// Write patterns and check reads.
    pub verify: bool,
    /// Bytes of the device used from its start (0: all of it), for a hot
    /// set smaller than the device.
    pub span_bytes: u64,
}

impl Default for WorkloadParams {
    fn default() -> Self {
        WorkloadParams {
            queue_depth: 32,
            io_bytes: 4096,
            read_percent: 50,
            verify: true,
            span_bytes: 0,
        }
    }
}

#[derive(Default)]
#[repr(align(128))]
struct CoreCounters {
    ios: AtomicU64,
    reads_verified: AtomicU64,
    errors: AtomicU64,
    verify_failures: AtomicU64,
    generation_changes_in_flight: AtomicU64,
    done: AtomicBool,
    first_error: std::sync::Mutex<Option<String>>,
}

/// Totals of one core or of all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Completed requests.
    pub ios: u64,
    /// Reads whose data was checked.
    pub reads_verified: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Reads that returned the wrong data.
    pub verify_failures: u64,
    /// Requests whose configuration generation changed while in flight.
    pub generation_changes_in_flight: u64,
}

impl Totals {
    /// Whether nothing went wrong.
    pub fn clean(&self) -> bool {
        self.errors == 0 && self.verify_failures == 0 && self.generation_changes_in_flight == 0
    }
}

/// A running workload; stop it with [`Workload::stop`].
pub struct Workload {
    stop: Arc<AtomicBool>,
    cores: Arc<Vec<CoreCounters>>,
}

impl Workload {
    /// Start the workload on every reactor of `set`, on device `dev`, with IO
    /// admitted by `object`'s quiesce gates. Reactor i works on the i-th
    /// equal slice of the device.
    pub fn start<C: Send + Sync + 'static>(
        set: &ReactorSet,
        dev: Arc<dyn BlockDevice>,
        object: &QuiesceObject<C>,
        params: WorkloadParams,
    ) -> Result<Workload, String> {
        Self::start_with(set, dev, object, params, None)
    }

    /// Start the workload on a volume: each reactor reopens its channel
    /// when the volume publishes a new device generation.
    pub fn start_on_volume(
        set: &ReactorSet,
        volume: &crate::volume::Volume,
        params: WorkloadParams,
    ) -> Result<Workload, String> {
        Self::start_with(
            set,
            volume.info_device(),
            volume.quiesce(),
            params,
            Some(|c: &crate::volume::VolumeConfig| c.device.clone()),
        )
    }

    fn start_with<C: Send + Sync + 'static>(
        set: &ReactorSet,
        dev: Arc<dyn BlockDevice>,
        object: &QuiesceObject<C>,
        params: WorkloadParams,
        device_of: Option<DeviceOf<C>>,
    ) -> Result<Workload, String> {
        let info = dev.info().clone();
        let bs = info.block_size as usize;
        if params.io_bytes == 0
            || !params.io_bytes.is_multiple_of(bs)
            || params.io_bytes > info.max_transfer as usize
        {
            return Err(format!(
                "io size {} must be a non-zero multiple of the block size {bs} and at most {}",
                params.io_bytes, info.max_transfer
            ));
        }
        if params.queue_depth == 0 || params.queue_depth > 4096 {
            return Err(format!(
                "queue depth {} must be 1..=4096",
                params.queue_depth
            ));
        }
        let io_blocks = (params.io_bytes / bs) as u64;
        let blocks = match params.span_bytes / bs as u64 {
            0 => info.num_blocks,
            n => n.min(info.num_blocks),
        };
        let slots_per_core = blocks / set.len() as u64 / io_blocks;
        if slots_per_core < 2 * params.queue_depth as u64 {
            return Err(format!(
                "device {} is too small for {} reactors at queue depth {}",
                info.name,
                set.len(),
                params.queue_depth
            ));
        }
        let pool = DmaPool::new(
            set.len() * params.queue_depth,
            params.io_bytes.next_power_of_two().max(4096),
        )
        .map_err(|e| format!("DMA buffers for the workload: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let cores: Arc<Vec<CoreCounters>> =
            Arc::new((0..set.len()).map(|_| CoreCounters::default()).collect());
        for core in 0..set.len() {
            let (dev, object, params, pool, stop, cores) = (
                dev.clone(),
                object.clone(),
                params.clone(),
                pool.clone(),
                stop.clone(),
                cores.clone(),
            );
            let started = set.call(core, Duration::from_secs(10), move |ctx| {
                let gate = object.local(ctx).map_err(|e| e.to_string())?;
                let ch = dev.open_channel().map_err(|e| e.to_string())?;
                let slots = (0..params.queue_depth)
                    .map(|_| {
                        pool.alloc().map(|buf| Slot {
                            buf,
                            block: 0,
                            op: IoOp::Read,
                            seq: 0,
                            generation: 0,
                        })
                    })
                    .collect::<Option<Vec<_>>>()
                    .ok_or("DMA pool exhausted")?;
                let generation = gate.generation();
                let worker = Rc::new(RefCell::new(Worker {
                    ch,
                    device_of,
                    generation,
                    gate,
                    free: (0..slots.len()).collect(),
                    slots,
                    first_slot: core as u64 * slots_per_core,
                    io_blocks,
                    written: vec![0; slots_per_core as usize],
                    busy: vec![false; slots_per_core as usize],
                    rng: 0x9E37_79B9_7F4A_7C15
                        ^ (core as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
                    seq: 0,
                    done: Vec::with_capacity(params.queue_depth),
                    params,
                    local: Totals::default(),
                    stop,
                    cores,
                    core,
                }));
                ctx.add_poller(move |ctx| worker.borrow_mut().poll(ctx));
                Ok::<(), String>(())
            })?;
            started.map_err(|e| format!("reactor {core}: {e}"))?;
        }
        Ok(Workload { stop, cores })
    }

    /// Totals so far, per core.
    pub fn per_core(&self) -> Vec<Totals> {
        self.cores
            .iter()
            .map(|c| Totals {
                ios: c.ios.load(Ordering::Relaxed),
                reads_verified: c.reads_verified.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                verify_failures: c.verify_failures.load(Ordering::Relaxed),
                generation_changes_in_flight: c
                    .generation_changes_in_flight
                    .load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Totals so far over all cores.
    pub fn totals(&self) -> Totals {
        self.per_core()
            .iter()
            .fold(Totals::default(), |a, t| Totals {
                ios: a.ios + t.ios,
                reads_verified: a.reads_verified + t.reads_verified,
                errors: a.errors + t.errors,
                verify_failures: a.verify_failures + t.verify_failures,
                generation_changes_in_flight: a.generation_changes_in_flight
                    + t.generation_changes_in_flight,
            })
    }

    /// The first error any core saw, with its context.
    pub fn first_error(&self) -> Option<String> {
        self.cores.iter().find_map(|c| {
            c.first_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        })
    }

    /// Stop issuing, wait for in-flight IO to finish, and return the totals.
    pub fn stop(self, timeout: Duration) -> Result<Totals, String> {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        while !self.cores.iter().all(|c| c.done.load(Ordering::SeqCst)) {
            if Instant::now() >= deadline {
                return Err("workload did not drain in time".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(self.totals())
    }
}

struct Slot {
    buf: DmaBuf,
    /// Index of the IO-sized block within this core's slice.
    block: u64,
    op: IoOp,
    seq: u32,
    generation: u64,
}

struct Worker<C> {
    ch: Box<dyn IoChannel>,
    /// How to find the device in a new configuration generation.
    device_of: Option<DeviceOf<C>>,
    generation: u64,
    gate: LocalGate<C>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    first_slot: u64,
    io_blocks: u64,
    /// Sequence of the last completed write per IO-sized block (0: never).
    written: Vec<u32>,
    busy: Vec<bool>,
    rng: u64,
    seq: u32,
    done: Vec<Completion>,
    params: WorkloadParams,
    local: Totals,
    stop: Arc<AtomicBool>,
    cores: Arc<Vec<CoreCounters>>,
    core: usize,
}

fn pattern_word(block: u64, seq: u32, i: usize) -> u64 {
    ((block << 32) | seq as u64) ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl<C: Send + Sync + 'static> Worker<C> {
    fn next_rand(&mut self) -> u64 {
        // xorshift64*: cheap and good enough to pick blocks.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn poll(&mut self, _ctx: &mut Ctx) -> PollState {
        let mut work = false;
        if self.ch.inflight() > 0 {
            let mut done = std::mem::take(&mut self.done);
            if self.ch.poll(&mut done) > 0 {
                work = true;
                for c in done.drain(..) {
                    self.complete(c);
                }
            }
            self.done = done;
        }
        let stopping = self.stop.load(Ordering::Relaxed);
        if let Some(device_of) = self.device_of {
            // Only with nothing in flight: that is when a new generation
            // can have been published (the gate drained us).
            // (And with the channel idle: it may have work of its own, such
            // as a RAID1's background writes, that its drop would wait for.)
            if self.free.len() == self.slots.len()
                && self.ch.inflight() == 0
                && self.gate.generation() != self.generation
            {
                let (g, c) = self.gate.config();
                match device_of(&c).open_channel() {
                    Ok(ch) => self.ch = ch,
                    Err(e) => self
                        .record_error(format!("reactor {}: reopening the channel: {e}", self.core)),
                }
                self.generation = g;
            }
        }
        // Never IO of a new generation through the old one's channel (it
        // is reopened above once idle).
        let stale = self.device_of.is_some() && self.gate.generation() != self.generation;
        if !stopping && !stale {
            while let Some(&slot) = self.free.last() {
                if !self.gate.try_begin() {
                    break;
                }
                if !self.issue(slot) {
                    self.gate.end();
                    break;
                }
                self.free.pop();
                work = true;
            }
        }
        self.publish();
        if stopping && self.free.len() == self.slots.len() && self.ch.inflight() == 0 {
            self.cores[self.core].done.store(true, Ordering::SeqCst);
            return PollState::Done;
        }
        // Polled mode: with IO in flight the reactor keeps polling for its
        // completions rather than sleeping (nothing would wake it).
        if work || self.free.len() < self.slots.len() || self.ch.inflight() > 0 {
            PollState::Busy
        } else {
            PollState::Idle
        }
    }

    fn issue(&mut self, index: usize) -> bool {
        let n = self.written.len() as u64;
        let mut block = self.next_rand() % n;
        // Never two requests on one block at once, so verification is exact.
        let mut tries = 0;
        while self.busy[block as usize] {
            block = (block + 1) % n;
            tries += 1;
            if tries > 64 {
                return false;
            }
        }
        let is_read = (self.next_rand() % 100) < self.params.read_percent as u64;
        self.seq = self.seq.wrapping_add(1).max(1);
        let (seq, verify, generation) = (self.seq, self.params.verify, self.gate.generation());
        let io_bytes = self.params.io_bytes;
        let slot = &mut self.slots[index];
        slot.block = block;
        slot.seq = seq;
        slot.generation = generation;
        slot.op = if is_read { IoOp::Read } else { IoOp::Write };
        if verify && !is_read {
            let words = io_bytes / 8;
            let buf = slot.buf.as_mut_slice();
            for (i, w) in buf[..words * 8].chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&pattern_word(block, seq, i).to_le_bytes());
            }
        }
        let mut sg = SgList::new();
        // SAFETY: the slot's buffer is not touched again until this
        // request's completion comes back from poll.
        sg.push(unsafe { IoVec::new(slot.buf.addr(), io_bytes) });
        let req = IoRequest {
            op: slot.op,
            offset_blocks: (self.first_slot + block) * self.io_blocks,
            num_blocks: self.io_blocks,
            sg,
            tag: index as u64,
        };
        match self.ch.submit(req) {
            Ok(()) => {
                self.busy[block as usize] = true;
                true
            }
            Err(_) => false,
        }
    }

    fn complete(&mut self, c: Completion) {
        self.gate.end();
        let index = c.tag as usize;
        let Some(slot) = self.slots.get(index) else {
            self.local.errors += 1;
            return;
        };
        let block = slot.block as usize;
        self.busy[block] = false;
        self.local.ios += 1;
        if slot.generation != self.gate.generation() {
            self.local.generation_changes_in_flight += 1;
        }
        match c.result {
            Err(e) => {
                self.local.errors += 1;
                self.record_error(format!(
                    "reactor {}: {:?} of block {} failed: {e}",
                    self.core,
                    slot.op,
                    (self.first_slot + slot.block) * self.io_blocks
                ));
            }
            Ok(()) if slot.op == IoOp::Write => self.written[block] = slot.seq,
            Ok(()) => {
                let seq = self.written[block];
                if self.params.verify && seq != 0 {
                    let words = self.params.io_bytes / 8;
                    let ok = slot.buf.as_slice()[..words * 8]
                        .chunks_exact(8)
                        .enumerate()
                        .all(|(i, w)| w == pattern_word(slot.block, seq, i).to_le_bytes());
                    self.local.reads_verified += 1;
                    if !ok {
                        self.local.verify_failures += 1;
                        let lba = (self.first_slot + slot.block) * self.io_blocks;
                        self.record_error(format!(
                            "reactor {}: block {lba} does not hold write #{seq}",
                            self.core
                        ));
                    }
                }
            }
        }
        self.free.push(index);
    }

    fn record_error(&self, e: String) {
        let mut g = self.cores[self.core]
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
    }

    fn publish(&self) {
        let c = &self.cores[self.core];
        c.ios.store(self.local.ios, Ordering::Relaxed);
        c.reads_verified
            .store(self.local.reads_verified, Ordering::Relaxed);
        c.errors.store(self.local.errors, Ordering::Relaxed);
        c.verify_failures
            .store(self.local.verify_failures, Ordering::Relaxed);
        c.generation_changes_in_flight
            .store(self.local.generation_changes_in_flight, Ordering::Relaxed);
    }
}
