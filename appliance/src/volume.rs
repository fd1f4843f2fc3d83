//! A volume: a named block device whose configuration changes only through
//! the quiesce epoch. The RAID levels plug in here as devices; exports and
//! other consumers run their IO through the volume's gate on each core.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bdev::{BlockDevice, DeviceInfo, IoChannel, IoOp, IoRequest, IoVec, SgList, SubmitError};
use poller::{Ctx, Helping, PollState, QuiesceError, QuiesceObject, ReactorSet, SuspendGuard};

use crate::raid::level::RaidDevice;

/// What the IO path of a volume reads.
#[derive(Clone)]
pub struct VolumeConfig {
    /// The device that serves the volume's IO.
    pub device: Arc<dyn BlockDevice>,
    /// The same device as a RAID level, for the volume's background work
    /// (`None` for a single-device volume).
    pub raid: Option<Arc<dyn RaidDevice>>,
}

impl VolumeConfig {
    /// A generation served by a plain device.
    pub fn plain(device: Arc<dyn BlockDevice>) -> VolumeConfig {
        VolumeConfig { device, raid: None }
    }

    /// A generation served by a RAID device.
    pub fn raid(raid: Arc<dyn RaidDevice>) -> VolumeConfig {
        VolumeConfig {
            device: raid.clone(),
            raid: Some(raid),
        }
    }
}

/// Why a volume operation did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// The volume was deleted.
    #[error("volume {0} was removed")]
    Removed(String),
    /// The reactors have stopped (the daemon is going down).
    #[error("volume {0}: the reactors are stopped")]
    Stopped(String),
    /// It did not finish in time.
    #[error("volume {name}: {what} did not finish in {timeout:?}")]
    Timeout {
        /// The volume.
        name: String,
        /// What was waited for.
        what: &'static str,
        /// How long.
        timeout: Duration,
    },
    /// The IO itself failed.
    #[error("volume {name}: {what}: {reason}")]
    Io {
        /// The volume.
        name: String,
        /// Which operation.
        what: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The volume could not be suspended.
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
}

/// A block range of the volume whose writes are held (md's suspend_lo /
/// suspend_hi). Exports check it before a write enters the volume's gate
/// and park the write until the range changes, so a held write never
/// stalls a quiesce.
#[derive(Default)]
pub struct SuspendedRange {
    /// First block held, and the block after the last; equal: none.
    lo: AtomicU64,
    hi: AtomicU64,
    /// Bumped on every change, so parked writes are looked at again.
    version: AtomicU64,
    /// Serialises changes.
    change: Mutex<()>,
}

impl SuspendedRange {
    /// Whether a write of `num_blocks` at `offset_blocks` must wait.
    #[inline]
    pub fn holds(&self, offset_blocks: u64, num_blocks: u64) -> bool {
        let hi = self.hi.load(Ordering::SeqCst);
        if hi == 0 {
            return false;
        }
        let lo = self.lo.load(Ordering::SeqCst);
        offset_blocks < hi && offset_blocks + num_blocks.max(1) > lo
    }

    /// Changes so far.
    #[inline]
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// The range held now, in blocks.
    pub fn get(&self) -> Option<(u64, u64)> {
        let (lo, hi) = (
            self.lo.load(Ordering::SeqCst),
            self.hi.load(Ordering::SeqCst),
        );
        (hi > lo).then_some((lo, hi))
    }

    fn set(&self, lo: u64, hi: u64) {
        // No range while the bounds change, so no check pairs an old
        // bound with a new one. Checks run inside the volume's gate: what
        // passes meanwhile is drained by the quiesce that follows a
        // suspend (`Volume::suspend_range`).
        self.hi.store(0, Ordering::SeqCst);
        self.lo.store(lo, Ordering::SeqCst);
        self.hi.store(hi, Ordering::SeqCst);
        self.version.fetch_add(1, Ordering::SeqCst);
    }
}

/// A volume handle; cheap to clone.
#[derive(Clone)]
pub struct Volume {
    name: String,
    quiesce: QuiesceObject<VolumeConfig>,
    set: ReactorSet,
    suspended: Arc<SuspendedRange>,
    /// Its IO limits, if any. Kept beside the configuration, not in it, so
    /// the RAID transactions that publish new member sets need not carry
    /// it; changed only inside a reconfiguration (which publishes a new
    /// generation, so every queue reads it again).
    qos: Arc<Mutex<Option<Arc<crate::qos::Qos>>>>,
}

/// A reactor's answer to [`Volume::io_on`].
enum Reply {
    Done(Result<Vec<u8>, VolumeError>),
    Quiet,
}

impl Volume {
    /// A volume on `device`, served by the reactors of `set`.
    pub fn new(set: &ReactorSet, name: &str, device: Arc<dyn BlockDevice>) -> Volume {
        Self::with_config(set, name, VolumeConfig::plain(device))
    }

    /// A RAID volume on `device`.
    pub fn new_raid(set: &ReactorSet, name: &str, device: Arc<dyn RaidDevice>) -> Volume {
        Self::with_config(set, name, VolumeConfig::raid(device))
    }

    fn with_config(set: &ReactorSet, name: &str, config: VolumeConfig) -> Volume {
        Volume {
            name: name.to_string(),
            quiesce: QuiesceObject::new(set, name, config),
            set: set.clone(),
            suspended: Arc::default(),
            qos: Arc::default(),
        }
    }

    /// The IO limits in force (read by a queue when it starts and at each
    /// new generation).
    pub fn qos(&self) -> Option<Arc<crate::qos::Qos>> {
        self.qos.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Set the IO limits before the volume serves any IO (at creation and
    /// restore).
    pub fn init_qos(&self, limits: crate::qos::QosLimits) {
        *self.qos.lock().unwrap_or_else(|e| e.into_inner()) =
            crate::qos::Qos::new(limits).map(Arc::new);
    }

    /// Change the IO limits online, through the epoch: suspend, `persist`
    /// (which may refuse: then nothing changes), set, publish the same
    /// configuration as a new generation so every queue reads the new
    /// limits, resume. A suspend that does not drain in `timeout` changes
    /// nothing.
    pub fn set_qos<E>(
        &self,
        limits: crate::qos::QosLimits,
        timeout: Duration,
        persist: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), poller::ReconfigureError<E>> {
        self.quiesce.reconfigure(timeout, |current| {
            persist()?;
            *self.qos.lock().unwrap_or_else(|e| e.into_inner()) =
                crate::qos::Qos::new(limits).map(Arc::new);
            Ok((current.clone(), ()))
        })
    }

    /// The range whose writes are held.
    pub fn suspended_range(&self) -> &Arc<SuspendedRange> {
        &self.suspended
    }

    /// Hold writes to blocks `lo..hi` (md's suspend_lo/hi): once this
    /// returns, no write to the range is in flight (the volume was
    /// quiesced after the range was set) and new ones wait for
    /// [`resume_range`](Self::resume_range). Reads go on.
    pub fn suspend_range(&self, lo: u64, hi: u64, timeout: Duration) -> Result<(), QuiesceError> {
        let _one = self
            .suspended
            .change
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = self.suspended.get();
        self.suspended.set(lo, hi);
        // Writes that passed the check before are drained by the quiesce.
        match self.suspend(timeout) {
            Ok(_guard) => Ok(()),
            Err(e) => {
                let (lo, hi) = before.unwrap_or((0, 0));
                self.suspended.set(lo, hi);
                Err(e)
            }
        }
    }

    /// Let held writes go.
    pub fn resume_range(&self) {
        let _one = self
            .suspended
            .change
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.suspended.set(0, 0);
    }

    /// Flush the volume from a reactor, through its quiesce gate as guest
    /// IO goes: for control-thread work that must not bypass the epoch (a
    /// write-back journal's drain rides on such flushes).
    pub fn flush_on_reactor(&self, timeout: Duration) -> Result<(), VolumeError> {
        self.io(IoOp::Flush, 0, Vec::new(), timeout).map(|_| ())
    }

    /// A flush that IO in flight may be waiting for (a journal checkpoint's:
    /// guest writes wait for the log room it frees): through the gate like
    /// [`flush_on_reactor`](Self::flush_on_reactor), but while a suspend
    /// drains it runs on a reactor still draining, with that reactor's IO
    /// (`LocalGate::try_begin_helping`). Without that, a suspend that came
    /// while the log was full waited for writes that waited for this flush,
    /// which waited for the resume, until the suspend's deadline.
    pub fn flush_helping_drain(&self, timeout: Duration) -> Result<(), VolumeError> {
        let deadline = Instant::now() + timeout;
        loop {
            for core in 0..self.set.len() {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.io_on(core, IoOp::Flush, 0, Vec::new(), left, true)? {
                    Reply::Done(r) => return r.map(|_| ()),
                    // Nothing on that core waits for it; try the next.
                    Reply::Quiet => continue,
                }
            }
            // Every core had drained: the suspend needs nothing from this
            // flush. Asked again shortly rather than parked: a parked
            // request could sleep through a resume and a new suspend that
            // needs it.
            if Instant::now() >= deadline {
                return Err(VolumeError::Timeout {
                    name: self.name.clone(),
                    what: "flush",
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// One IO of the volume from a reactor (reactor 0), through its quiesce
    /// gate as guest IO goes: waits while the volume is suspended, counts
    /// as in flight for a suspend, and runs on the generation in force.
    /// `data` is the buffer (read into, or written from; its length in
    /// blocks is the request's) and comes back with the result. The
    /// request owns it: a caller that gives up after `timeout` leaves it
    /// to the request, never freed under it.
    pub fn io(
        &self,
        op: IoOp,
        offset_blocks: u64,
        data: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, VolumeError> {
        match self.io_on(0, op, offset_blocks, data, timeout, false)? {
            Reply::Done(r) => r,
            // Only an IO that helps a drain is told this.
            Reply::Quiet => Err(VolumeError::Stopped(self.name.clone())),
        }
    }

    /// [`io`](Self::io) on reactor `core`; `help`: admitted while a
    /// suspend drains that core (see [`flush_helping_drain`]), answered
    /// `Quiet` when nothing there drains.
    ///
    /// [`flush_helping_drain`]: Self::flush_helping_drain
    fn io_on(
        &self,
        core: usize,
        op: IoOp,
        offset_blocks: u64,
        data: Vec<u8>,
        timeout: Duration,
        help: bool,
    ) -> Result<Reply, VolumeError> {
        let what = match op {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Discard => "discard",
            IoOp::WriteZeroes => "write-zeroes",
        };
        let (tx, rx) = std::sync::mpsc::channel::<Reply>();
        let q = self.quiesce.clone();
        let name = self.name.clone();
        let io_error = move |name: &str, reason: String| VolumeError::Io {
            name: name.to_string(),
            what,
            reason,
        };
        let msg = move |ctx: &mut Ctx| {
            let gate = match q.local(ctx) {
                Ok(g) => g,
                Err(e) => {
                    let _ = tx.send(Reply::Done(Err(e.into())));
                    return;
                }
            };
            let mut data = data;
            let mut ch: Option<Box<dyn IoChannel>> = None;
            // The request while its channel takes nothing yet (Busy: a
            // new NVMe channel whose queue is being made, a member's
            // queue made again); sent again at each poll.
            let mut pending: Option<IoRequest> = None;
            let mut out = Vec::new();
            ctx.add_poller(move |_| {
                let Some(c) = ch.as_mut() else {
                    if gate.is_removed() {
                        // Deleted meanwhile: nothing will ever admit it.
                        let _ = tx.send(Reply::Done(Err(VolumeError::Removed(name.clone()))));
                        return PollState::Done;
                    }
                    // Suspended: wait, like guest IO, until it resumes (the
                    // resume wakes this reactor).
                    let admitted = if help {
                        match gate.try_begin_helping() {
                            Helping::Admitted => true,
                            Helping::Wait => false,
                            Helping::Quiet => {
                                let _ = tx.send(Reply::Quiet);
                                return PollState::Done;
                            }
                        }
                    } else {
                        gate.try_begin()
                    };
                    if !admitted {
                        return PollState::Idle;
                    }
                    let device = gate.config().1.device.clone();
                    let bs = device.info().block_size as usize;
                    let req = if op == IoOp::Flush {
                        IoRequest::flush(1)
                    } else {
                        let mut sg = SgList::new();
                        // SAFETY: `data` is owned by this poller, which
                        // lives until the request's completion is polled.
                        sg.push(unsafe { IoVec::new(data.as_mut_ptr(), data.len()) });
                        IoRequest {
                            op,
                            offset_blocks,
                            num_blocks: (data.len() / bs) as u64,
                            sg,
                            tag: 1,
                        }
                    };
                    // The channel the last such request on this core left
                    // for the generation (a journal's checkpoints flush
                    // often: opening one each time made NVMe members create
                    // and delete a queue pair on the reactor every time,
                    // and each open could be refused).
                    let kept = gate.take_kept::<Box<dyn IoChannel>>().map(|c| *c);
                    match kept.map_or_else(|| device.open_channel(), Ok) {
                        Ok(c) => {
                            ch = Some(c);
                            pending = Some(req);
                        }
                        Err(e) => {
                            gate.end();
                            let _ = tx.send(Reply::Done(Err(io_error(&name, e.to_string()))));
                            return PollState::Done;
                        }
                    }
                    return PollState::Busy;
                };
                if let Some(req) = pending.take() {
                    if let Err(SubmitError::Busy(req)) = c.submit(req) {
                        pending = Some(req);
                    }
                }
                c.poll(&mut out);
                let Some(done) = out.pop() else {
                    return PollState::Busy;
                };
                // Kept for the next request, before the end: a suspend
                // waiting for this request drops it with the generation.
                if let Some(c) = ch.take().filter(|c| c.inflight() == 0) {
                    gate.keep(Box::new(c));
                }
                gate.end();
                let reply = match done.result {
                    Ok(()) => Ok(std::mem::take(&mut data)),
                    Err(e) => Err(io_error(&name, e.to_string())),
                };
                let _ = tx.send(Reply::Done(reply));
                PollState::Done
            });
        };
        self.set
            .send(core, Box::new(msg))
            .map_err(|_| VolumeError::Stopped(self.name.clone()))?;
        rx.recv_timeout(timeout).map_err(|_| VolumeError::Timeout {
            name: self.name.clone(),
            what,
            timeout,
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's description (of the current generation).
    pub fn info(&self) -> DeviceInfo {
        self.quiesce.config().1.device.info().clone()
    }

    /// The device of the current generation.
    pub fn info_device(&self) -> Arc<dyn BlockDevice> {
        self.quiesce.config().1.device.clone()
    }

    /// The quiesce object the IO path goes through.
    pub fn quiesce(&self) -> &QuiesceObject<VolumeConfig> {
        &self.quiesce
    }

    /// Suspend the volume's IO everywhere (see [`QuiesceObject::suspend`]),
    /// and wait for writes a RAID1 still sends to write-mostly members
    /// after answering them (md's barrier waits for them too): once this
    /// returns, nothing of the volume is in flight to any member. Past
    /// `timeout` the volume resumes and the error says what was left.
    pub fn suspend(&self, timeout: Duration) -> Result<SuspendGuard, QuiesceError> {
        let t = Instant::now();
        let guard = self.quiesce.suspend(timeout)?;
        if let Some(raid) = &self.quiesce.config().1.raid {
            let behind = &raid.member_set().behind;
            if let Err(left) = behind.drain(timeout.saturating_sub(t.elapsed())) {
                return Err(QuiesceError::BackgroundBusy {
                    name: self.name.clone(),
                    what: format!("{left} writes to write-mostly members"),
                    waited: t.elapsed(),
                });
            }
        }
        Ok(guard)
    }
}
