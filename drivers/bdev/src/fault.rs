//! A wrapper that injects failures into any device, for tests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::device::{BlockDevice, Completion, DeviceInfo, IoChannel, IoOp, IoRequest, SubmitError};
use crate::error::{BdevError, IoError};

/// Which faults are active; shared by every channel of the device and by
/// the test that drives it. Atomics only, so the IO path takes no lock.
#[derive(Default)]
pub struct FaultControl {
    pulled: AtomicBool,
    read_fail: (AtomicU64, AtomicU64),
    write_fail: (AtomicU64, AtomicU64),
    latency_ns: AtomicU64,
    injected: AtomicU64,
    /// New channels are refused (a device that cannot be opened).
    refuse_channels: AtomicBool,
    /// Channels refused so far.
    refusals: AtomicU64,
    /// Channels open now, and how many may be (0: no limit), as an NVMe
    /// controller's queue pairs.
    open_channels: Arc<AtomicU64>,
    channel_limit: AtomicU64,
    /// Channels opened so far.
    opened: AtomicU64,
    /// Holding requests (see [`FaultControl::hold`]): the fast check.
    holding: AtomicBool,
    hold: Mutex<Hold>,
    held_cv: Condvar,
    /// Bumped by [`FaultControl::release`]; channels submit what they hold
    /// when they see it change.
    released: AtomicU64,
    /// Submissions are refused as by a full queue (see
    /// [`FaultControl::busy`]), and how many were.
    busy: AtomicBool,
    busy_refusals: AtomicU64,
    /// Flushes to fail, from the next one on (see
    /// [`FaultControl::fail_flushes`]).
    flush_fail: AtomicU64,
    /// Discards are answered "not supported" (EOPNOTSUPP), as a disk
    /// whose driver cannot zero a range answers them.
    no_discard: AtomicBool,
}

/// Which requests are held, and how many are held now.
#[derive(Default)]
struct Hold {
    op: Option<IoOp>,
    first: u64,
    end: u64,
    /// Requests still to hold.
    left: u64,
    /// Requests held now, over every channel.
    held: u64,
}

impl FaultControl {
    /// Fail reads of blocks in `first..end` with a media error.
    pub fn fail_reads(&self, first: u64, end: u64) {
        self.read_fail.0.store(first, Ordering::SeqCst);
        self.read_fail.1.store(end, Ordering::SeqCst);
    }

    /// Fail writes (and discards, write-zeroes) of blocks in `first..end`.
    pub fn fail_writes(&self, first: u64, end: u64) {
        self.write_fail.0.store(first, Ordering::SeqCst);
        self.write_fail.1.store(end, Ordering::SeqCst);
    }

    /// Fail every request, as a pulled disk does.
    pub fn pull(&self) {
        self.pulled.store(true, Ordering::SeqCst);
    }

    /// Whether the device is pulled.
    pub fn is_pulled(&self) -> bool {
        self.pulled.load(Ordering::SeqCst)
    }

    /// Whether a fault that fails requests is on (pulled, or failing
    /// reads or writes of some range).
    pub fn is_faulty(&self) -> bool {
        let on =
            |r: &(AtomicU64, AtomicU64)| r.0.load(Ordering::SeqCst) < r.1.load(Ordering::SeqCst);
        self.is_pulled() || on(&self.read_fail) || on(&self.write_fail)
    }

    /// Delay every completion by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_ns
            .store(latency.as_nanos() as u64, Ordering::SeqCst);
    }

    /// Refuse (or again allow) opening channels, as a device that went
    /// away between two configurations does.
    pub fn refuse_channels(&self, on: bool) {
        self.refuse_channels.store(on, Ordering::SeqCst);
    }

    /// Allow at most `n` channels open at once (0: any number); one more
    /// is refused with [`BdevError::Exhausted`], as a controller whose
    /// queue pairs are all in use refuses.
    pub fn limit_channels(&self, n: u64) {
        self.channel_limit.store(n, Ordering::SeqCst);
    }

    /// Channels open now.
    pub fn open_channels(&self) -> u64 {
        self.open_channels.load(Ordering::SeqCst)
    }

    /// Channels opened so far.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::SeqCst)
    }

    /// Channels refused so far (a test waits for one, not for time).
    pub fn refused(&self) -> u64 {
        self.refusals.load(Ordering::SeqCst)
    }

    /// Refuse (or again take) every submission with `Busy`, as a channel
    /// whose queue is full does: back-pressure, not a failure.
    pub fn busy(&self, on: bool) {
        self.busy.store(on, Ordering::SeqCst);
    }

    /// Submissions refused as busy so far (a test waits for one, not for
    /// time).
    pub fn busy_refusals(&self) -> u64 {
        self.busy_refusals.load(Ordering::SeqCst)
    }

    /// Fail the next `n` flushes, then let them through again: a device
    /// that reports a lost write-back once, as Linux tells an fsync of a
    /// file's writeback error once.
    pub fn fail_flushes(&self, n: u64) {
        self.flush_fail.store(n, Ordering::SeqCst);
    }

    /// Answer every discard "not supported" (or, `false`, no more).
    pub fn refuse_discards(&self, on: bool) {
        self.no_discard.store(on, Ordering::SeqCst);
    }

    /// Clear every fault.
    pub fn heal(&self) {
        self.refuse_channels(false);
        self.busy(false);
        self.pulled.store(false, Ordering::SeqCst);
        self.fail_reads(0, 0);
        self.fail_writes(0, 0);
        self.fail_flushes(0);
        self.refuse_discards(false);
        self.set_latency(Duration::ZERO);
    }

    /// Hold the next `count` requests of `op` (any op: `None`) touching
    /// blocks `first..end` in the channel that got them, unanswered, until
    /// [`release`](Self::release): a test that needs an IO in flight at an
    /// exact moment gets it from here, not from a sleep.
    pub fn hold(&self, op: Option<IoOp>, first: u64, end: u64, count: u64) {
        let mut h = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        h.op = op;
        h.first = first;
        h.end = end;
        h.left = count;
        self.holding.store(count > 0, Ordering::SeqCst);
    }

    /// Requests held now.
    pub fn held(&self) -> u64 {
        self.hold.lock().unwrap_or_else(|e| e.into_inner()).held
    }

    /// Wait until at least `n` requests are held; false after `timeout`.
    pub fn wait_held(&self, n: u64, timeout: Duration) -> bool {
        let h = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        let (h, _) = self
            .held_cv
            .wait_timeout_while(h, timeout, |h| h.held < n)
            .unwrap_or_else(|e| e.into_inner());
        h.held >= n
    }

    /// Stop holding; every held request goes to the device (at its
    /// channel's next poll).
    pub fn release(&self) {
        let mut h = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        h.left = 0;
        h.held = 0;
        self.holding.store(false, Ordering::SeqCst);
        self.released.fetch_add(1, Ordering::SeqCst);
        self.held_cv.notify_all();
    }

    /// Whether `req` is to be held (and count it if so).
    fn take_hold(&self, req: &IoRequest) -> bool {
        if !self.holding.load(Ordering::Relaxed) {
            return false;
        }
        let mut h = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        let hit = h.left > 0
            && h.op.is_none_or(|op| op == req.op)
            && (req.op == IoOp::Flush
                || (req.offset_blocks < h.end
                    && h.first < req.offset_blocks.saturating_add(req.num_blocks.max(1))));
        if hit {
            h.left -= 1;
            h.held += 1;
            self.held_cv.notify_all();
        }
        hit
    }

    /// Requests failed on purpose so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    fn check(&self, req: &IoRequest) -> Result<(), IoError> {
        if self.pulled.load(Ordering::Relaxed) {
            return Err(IoError::DeviceFailed);
        }
        if req.op == IoOp::Discard && self.no_discard.load(Ordering::Relaxed) {
            return Err(IoError::Os(libc::EOPNOTSUPP));
        }
        let range = match req.op {
            IoOp::Read => &self.read_fail,
            IoOp::Write | IoOp::Discard | IoOp::WriteZeroes => &self.write_fail,
            IoOp::Flush => {
                let failing =
                    self.flush_fail
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                return match failing {
                    Ok(_) => Err(IoError::DeviceFailed),
                    Err(_) => Ok(()),
                };
            }
        };
        let (first, end) = (
            range.0.load(Ordering::Relaxed),
            range.1.load(Ordering::Relaxed),
        );
        let (a, b) = (
            req.offset_blocks,
            req.offset_blocks.saturating_add(req.num_blocks),
        );
        if a < end && first < b {
            return Err(IoError::Media(a.max(first)));
        }
        Ok(())
    }
}

/// Any device, with faults that a test switches on and off.
pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    info: DeviceInfo,
    control: Arc<FaultControl>,
}

impl FaultDevice {
    /// Wrap `inner`; faults are driven through [`control`](Self::control).
    pub fn new(inner: Arc<dyn BlockDevice>) -> FaultDevice {
        // The wrapper keeps the device's name: volumes and the manager know
        // members by name, and a fault injector must not change which
        // device an operator's command reaches.
        let info = inner.info().clone();
        FaultDevice {
            inner,
            info,
            control: Arc::new(FaultControl::default()),
        }
    }

    /// The fault switches.
    pub fn control(&self) -> Arc<FaultControl> {
        self.control.clone()
    }
}

impl BlockDevice for FaultDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn identity(&self) -> Option<String> {
        self.inner.identity()
    }

    /// The wrapped device's counts, plus the failures injected here.
    fn error_counts(&self) -> crate::ErrorCounts {
        let mut c = self.inner.error_counts();
        c.io_errors += self.control.injected();
        c
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        if self.control.refuse_channels.load(Ordering::SeqCst) {
            self.control.refusals.fetch_add(1, Ordering::SeqCst);
            return Err(BdevError::Os {
                what: format!("{}: opening a channel", self.info.name),
                source: std::io::Error::from_raw_os_error(libc::ENODEV),
            });
        }
        let open = &self.control.open_channels;
        let limit = self.control.channel_limit.load(Ordering::SeqCst);
        if open.fetch_add(1, Ordering::SeqCst) >= limit && limit > 0 {
            open.fetch_sub(1, Ordering::SeqCst);
            self.control.refusals.fetch_add(1, Ordering::SeqCst);
            return Err(BdevError::Exhausted(format!(
                "{}: all {limit} channels are in use",
                self.info.name
            )));
        }
        let inner = self.inner.open_channel().inspect_err(|_| {
            open.fetch_sub(1, Ordering::SeqCst);
        })?;
        self.control.opened.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(FaultChannel {
            inner,
            open: open.clone(),
            control: self.control.clone(),
            failed: VecDeque::new(),
            delayed: VecDeque::new(),
            scratch: Vec::new(),
            held: VecDeque::new(),
            released: self.control.released.load(Ordering::SeqCst),
        }))
    }

    /// The device underneath resized, with the same fault switches.
    fn resized(&self, num_blocks: u64) -> Result<Arc<dyn BlockDevice>, BdevError> {
        let inner = self.inner.resized(num_blocks)?;
        let info = DeviceInfo {
            num_blocks,
            ..self.info.clone()
        };
        Ok(Arc::new(FaultDevice {
            inner,
            info,
            control: self.control.clone(),
        }))
    }

    /// Cut power: unflushed writes of the device underneath are dropped and
    /// the device fails every request until [`FaultControl::heal`].
    fn power_cut(&self) -> Result<(), BdevError> {
        self.control.pull();
        self.inner.power_cut()
    }
}

struct FaultChannel {
    inner: Box<dyn IoChannel>,
    /// `FaultControl::open_channels`, counted down when this goes.
    open: Arc<AtomicU64>,
    control: Arc<FaultControl>,
    failed: VecDeque<Completion>,
    delayed: VecDeque<(Instant, Completion)>,
    scratch: Vec<Completion>,
    /// Requests held by [`FaultControl::hold`], in arrival order.
    held: VecDeque<IoRequest>,
    released: u64,
}

impl Drop for FaultChannel {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl IoChannel for FaultChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if self.control.busy.load(Ordering::SeqCst) {
            self.control.busy_refusals.fetch_add(1, Ordering::SeqCst);
            return Err(SubmitError::Busy(req));
        }
        if let Err(e) = self.control.check(&req) {
            self.control.injected.fetch_add(1, Ordering::Relaxed);
            self.failed.push_back(Completion {
                tag: req.tag,
                result: Err(e),
            });
            return Ok(());
        }
        if !self.held.is_empty() || self.control.take_hold(&req) {
            // Behind a held request, later ones wait too: order is kept.
            self.held.push_back(req);
            return Ok(());
        }
        self.inner.submit(req)
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        let released = self.control.released.load(Ordering::SeqCst);
        if released != self.released || !self.control.holding.load(Ordering::Relaxed) {
            self.released = released;
            while let Some(req) = self.held.pop_front() {
                // The faults on now apply: a request held from before a
                // range went bad fails as it reaches the device.
                if let Err(e) = self.control.check(&req) {
                    self.control.injected.fetch_add(1, Ordering::Relaxed);
                    self.failed.push_back(Completion {
                        tag: req.tag,
                        result: Err(e),
                    });
                    continue;
                }
                if let Err(SubmitError::Busy(req)) = self.inner.submit(req) {
                    self.held.push_front(req);
                    break;
                }
            }
        }
        out.extend(self.failed.drain(..));
        let latency = self.control.latency_ns.load(Ordering::Relaxed);
        let pulled = self.control.pulled.load(Ordering::Relaxed);
        self.scratch.clear();
        self.inner.poll(&mut self.scratch);
        let now = Instant::now();
        for mut c in self.scratch.drain(..) {
            // A device pulled while the request was in flight never answers
            // with success.
            if pulled {
                if c.result.is_ok() {
                    // Failed here, not by the device below (which counted
                    // its own).
                    self.control.injected.fetch_add(1, Ordering::Relaxed);
                }
                c.result = Err(IoError::DeviceFailed);
            }
            if latency == 0 && self.delayed.is_empty() {
                out.push(c);
            } else {
                self.delayed
                    .push_back((now + Duration::from_nanos(latency), c));
            }
        }
        while self.delayed.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, c)) = self.delayed.pop_front() {
                out.push(c);
            }
        }
        out.len() - before
    }

    fn inflight(&self) -> usize {
        self.inner.inflight() + self.failed.len() + self.delayed.len() + self.held.len()
    }
}
