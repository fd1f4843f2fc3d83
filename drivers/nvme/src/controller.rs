//! Controller bring-up, the admin queue, and the state every IO channel of
//! the controller shares: queue identifiers, the reset generation, the
//! failed flag and the registered DMA memory.
//!
//! The admin queue is control path: it sits behind a mutex and is driven
//! synchronously (submit, poll until done or a deadline). The IO path never
//! takes that mutex except to recreate its queue after a reset; time-outs
//! are recovered on the controller's recovery thread (recovery.rs).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::error::NvmeError;
use crate::queue::{QueuePair, QueueShape};
use crate::spec::{self, admin, Cap, IdentifyController, IdentifyNamespace, Sqe, Status};
use crate::transport::{Bar, DmaMem, Transport};

/// Tunables of a controller.
#[derive(Debug, Clone)]
pub struct Options {
    /// A command outstanding longer than this is aborted, then the
    /// controller reset.
    pub io_timeout: Duration,
    /// How long an admin command may take.
    pub admin_timeout: Duration,
    /// Entries per IO queue (capped by CAP.MQES).
    pub queue_depth: u16,
    /// IO queue pairs to ask for (one per reactor per namespace).
    pub max_io_queues: u16,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            io_timeout: Duration::from_secs(5),
            admin_timeout: Duration::from_secs(2),
            queue_depth: 256,
            max_io_queues: 64,
        }
    }
}

const ADMIN_DEPTH: u16 = 32;

pub(crate) struct Admin {
    q: QueuePair,
    buf: DmaMem,
    next_cid: u16,
}

/// A memory range the controller may DMA to directly.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Region {
    pub vaddr: usize,
    pub len: usize,
    pub iova: u64,
    /// Start of the registration it belongs to (without an IOMMU one
    /// registration may be several physically contiguous pieces).
    pub base: usize,
}

/// Memory registered for direct DMA, with a generation so channels can keep
/// a private copy and notice changes with one atomic load.
#[derive(Default)]
pub(crate) struct Registry {
    pub generation: AtomicU64,
    pub regions: RwLock<Vec<Region>>,
    /// Ranges being mapped now, not yet in `regions`. The IOMMU work (a
    /// map pins the whole region: seconds for a large guest) is done
    /// holding no lock: `regions` is read by every channel when the
    /// generation moves (held across a map, it stalled every queue of the
    /// controller), and another registration (a RAID channel's pool, on a
    /// reactor) must not wait either. This keeps two of them from mapping
    /// overlapping memory meanwhile.
    pub mapping: Mutex<Vec<(usize, usize)>>,
}

/// Translate `len` bytes at `ptr` if one region holds them all.
#[inline]
pub(crate) fn translate(regions: &[Region], ptr: usize, len: usize) -> Option<u64> {
    let i = regions.partition_point(|r| r.vaddr <= ptr).checked_sub(1)?;
    let r = regions[i];
    (ptr + len <= r.vaddr + r.len).then(|| r.iova + (ptr - r.vaddr) as u64)
}

/// A controller brought up and ready to hand out IO queues.
pub struct Controller {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) bar: Bar,
    pub(crate) cap: Cap,
    pub(crate) stride: usize,
    pub(crate) opts: Options,
    pub(crate) admin: Mutex<Admin>,
    pub(crate) ident: IdentifyController,
    namespaces: Mutex<Vec<(u32, IdentifyNamespace)>>,
    io_queues: u16,
    qids: Mutex<Vec<bool>>,
    /// Told when a queue ID is given back.
    qid_freed: Condvar,
    /// Queue IDs of dropped channels whose queues are being deleted.
    pub(crate) retiring: AtomicU32,
    /// When the latest of those began (see `retire_began`).
    last_retire: Mutex<Option<Instant>>,
    /// Bumped by every reset; a channel that sees a new value recreates its
    /// queue and resubmits what was in flight.
    pub(crate) generation: AtomicU64,
    failed: AtomicBool,
    /// Held by [`Controller::fail`] until the device is stopped (or its
    /// memory unmapped) and the generation moved.
    stopping: Mutex<()>,
    failure: Mutex<String>,
    pub(crate) registry: Registry,
    /// Commands whose data went through bounce pages.
    pub(crate) bounced: AtomicU64,
    /// Resets since the last successful IO: a controller that needs one
    /// after another is failed instead of being reset forever.
    pub(crate) fruitless_resets: AtomicU32,
    /// Errors, time-outs, aborts and resets so far, for metrics.
    pub(crate) counts: Counts,
    /// Where channels report timed-out commands (the recovery thread).
    pub(crate) recovery: Mutex<Option<crate::recovery::RecoveryQueue>>,
}

/// What went wrong so far; each counter is bumped only when it happens.
#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) timeouts: AtomicU64,
    pub(crate) aborts: AtomicU64,
    /// Aborts answered "not aborted": the command had most often completed.
    pub(crate) aborts_not_found: AtomicU64,
    pub(crate) resets: AtomicU64,
}

/// Resets in a row without a completed IO before the controller is failed.
const MAX_FRUITLESS_RESETS: u32 = 3;

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("name", &self.transport.name())
            .field("model", &self.ident.model)
            .finish()
    }
}

fn wait_ready(bar: &Bar, cap: Cap, ready: bool, name: &str) -> Result<(), NvmeError> {
    let deadline = Instant::now() + Duration::from_millis(cap.timeout_ms());
    loop {
        let csts = bar.read32(spec::REG_CSTS);
        if csts == u32::MAX {
            return Err(NvmeError::Failed(
                name.into(),
                "registers read all ones: the device was removed".into(),
            ));
        }
        if ready && csts & spec::CSTS_CFS != 0 {
            return Err(NvmeError::Failed(
                name.into(),
                "controller fatal status while enabling".into(),
            ));
        }
        if (csts & spec::CSTS_RDY != 0) == ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(NvmeError::Timeout(format!(
                "{name}: waiting {} ms (CAP.TO) for CSTS.RDY={}",
                cap.timeout_ms(),
                ready as u8
            )));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

impl Controller {
    /// Bring up the controller behind `transport`: reset it, set up the
    /// admin queue, identify it and its active namespaces, and ask for IO
    /// queues.
    pub fn new(transport: Arc<dyn Transport>, opts: Options) -> Result<Arc<Controller>, NvmeError> {
        let bar = transport.bar();
        let name = transport.name().to_string();
        if bar.len() < 0x1000 + 8 {
            return Err(NvmeError::InvalidArgument(format!(
                "{name}: BAR0 of {} bytes is too small for an NVMe register file",
                bar.len()
            )));
        }
        let cap = Cap(bar.read64(spec::REG_CAP));
        if cap.0 == u64::MAX {
            return Err(NvmeError::Failed(name, "registers read all ones".into()));
        }
        if !cap.nvm_command_set() {
            return Err(NvmeError::InvalidArgument(format!(
                "{name}: controller does not support the NVM command set (CAP {:#x})",
                cap.0
            )));
        }
        if cap.mps_min() > spec::PAGE {
            return Err(NvmeError::InvalidArgument(format!(
                "{name}: smallest memory page is {} bytes; the driver uses 4096",
                cap.mps_min()
            )));
        }
        if cap.mqes() < 2 {
            return Err(NvmeError::InvalidArgument(format!(
                "{name}: CAP.MQES allows queues of {} entries; at least 2 are needed",
                cap.mqes()
            )));
        }
        let stride = cap.doorbell_stride();
        // Queue 1 at least is asked for whatever the option says
        // (`set_queue_count`), and its doorbells must be inside the BAR.
        let max_qid = opts.max_io_queues.max(1) as usize;
        if spec::cq_doorbell(max_qid as u16, stride) + 4 > bar.len() {
            return Err(NvmeError::InvalidArgument(format!(
                "{name}: BAR0 of {} bytes has no room for {max_qid} queue doorbells",
                bar.len()
            )));
        }
        let admin = Admin {
            q: QueuePair::new(&transport, 0, ADMIN_DEPTH, stride)?,
            buf: DmaMem::new(&transport, spec::PAGE)?,
            next_cid: 0,
        };
        let admin = Mutex::new(admin);
        if let Err(e) = Self::enable(&bar, cap, &mut lock(&admin), &name) {
            // Not left enabled on admin rings freed on return (there is no
            // controller to drop yet); one that does not stop keeps its
            // IO addresses from being handed out again.
            bar.write32(spec::REG_CC, 0);
            if wait_ready(&bar, cap, false, &name).is_err() {
                transport.retire_all();
            }
            return Err(e);
        }

        let mut ctrl = Controller {
            transport,
            bar,
            cap,
            stride,
            opts,
            admin,
            ident: IdentifyController::parse(&[0; 4096]),
            namespaces: Mutex::new(Vec::new()),
            io_queues: 0,
            qids: Mutex::new(Vec::new()),
            qid_freed: Condvar::new(),
            retiring: AtomicU32::new(0),
            last_retire: Mutex::new(None),
            generation: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            stopping: Mutex::new(()),
            failure: Mutex::new(String::new()),
            registry: Registry::default(),
            bounced: AtomicU64::new(0),
            fruitless_resets: AtomicU32::new(0),
            counts: Counts::default(),
            recovery: Mutex::new(None),
        };
        let mut page = [0u8; 4096];
        ctrl.identify(admin::CNS_CONTROLLER, 0, &mut page)?;
        ctrl.ident = IdentifyController::parse(&page);
        ctrl.rescan()?;
        ctrl.io_queues = ctrl.set_queue_count(&mut lock(&ctrl.admin))?;
        *lock(&ctrl.qids) = vec![false; ctrl.io_queues as usize + 1];
        tracing::info!(
            controller = %ctrl.name(),
            model = %ctrl.ident.model,
            serial = %ctrl.ident.serial,
            namespaces = ?ctrl.namespace_ids(),
            io_queues = ctrl.io_queues,
            mdts = ctrl.ident.mdts,
            "NVMe controller ready"
        );
        let ctrl = Arc::new(ctrl);
        *lock(&ctrl.recovery) = Some(crate::recovery::start(&ctrl)?);
        // Guest memory and DMA pools registered with bdev are mapped for
        // this controller too, now and as they come and go.
        let mapper: Arc<dyn bdev::DmaMapper> = ctrl.clone();
        bdev::add_dma_mapper(&mapper);
        Ok(ctrl)
    }

    /// Disable, program the admin queue, enable.
    fn enable(bar: &Bar, cap: Cap, admin: &mut Admin, name: &str) -> Result<(), NvmeError> {
        if bar.read32(spec::REG_CC) & spec::CC_EN != 0 {
            bar.write32(spec::REG_CC, 0);
        }
        wait_ready(bar, cap, false, name)?;
        admin.q.reset();
        let aqa = (ADMIN_DEPTH as u32 - 1) | (ADMIN_DEPTH as u32 - 1) << 16;
        bar.write32(spec::REG_AQA, aqa);
        bar.write64(spec::REG_ASQ, admin.q.sq_iova());
        bar.write64(spec::REG_ACQ, admin.q.cq_iova());
        bar.write32(spec::REG_CC, spec::CC_ENABLE);
        wait_ready(bar, cap, true, name)
    }

    fn set_queue_count(&self, a: &mut Admin) -> Result<u16, NvmeError> {
        let want = self.opts.max_io_queues.max(1) as u32 - 1;
        let mut sqe = Sqe::new(admin::SET_FEATURES, 0);
        sqe.cdw[0] = admin::FEAT_NUM_QUEUES;
        sqe.cdw[1] = want | want << 16;
        let granted = self.run_admin(a, sqe, "Set Features (number of queues)", None)?;
        let n = (granted & 0xffff).min(granted >> 16).min(want) + 1;
        Ok(n as u16)
    }

    /// `Err` once the controller has failed for good (what it failed of).
    fn alive(&self) -> Result<(), NvmeError> {
        if self.is_failed() {
            return Err(self.failed_error());
        }
        Ok(())
    }

    fn failed_error(&self) -> NvmeError {
        NvmeError::Failed(self.name().into(), self.failure())
    }

    /// Run an admin command. One that times out is left behind on the
    /// admin queue, where it could still complete into the shared buffer
    /// later, so the controller is reset (as Linux does), which also gives
    /// the admin queue back whole.
    fn admin_or_reset(
        &self,
        sqe: Sqe,
        what: &str,
        out: Option<&mut [u8; 4096]>,
    ) -> Result<u32, NvmeError> {
        self.alive()?;
        let mut a = lock(&self.admin);
        self.alive()?;
        // Read with the lock held: read before, a reset that held the lock
        // meanwhile moved it, and the reset below took this command's
        // time-out for that reset's and left the command behind.
        let seen = self.generation.load(Ordering::Acquire);
        let result = self.run_admin(&mut a, sqe, what, out);
        // Reset without letting go of the admin queue: another command
        // run in between would copy out a late completion's data from
        // the shared buffer as its own (audit).
        if let Err(NvmeError::Timeout(m)) = &result {
            let _ = self.reset_locked(a, &format!("admin command timed out ({m})"), seen);
        }
        result
    }

    /// Run an admin command on the locked admin queue. With `out`, the
    /// command transfers one page through the admin buffer (PRP1 points
    /// there only then: it is reserved in commands without data), and `out`
    /// gets it afterwards.
    pub(crate) fn run_admin(
        &self,
        a: &mut Admin,
        mut sqe: Sqe,
        what: &str,
        out: Option<&mut [u8; 4096]>,
    ) -> Result<u32, NvmeError> {
        let name = self.name();
        let cid = a.next_cid;
        a.next_cid = a.next_cid.wrapping_add(1);
        sqe.set_cid(cid);
        if out.is_some() {
            sqe.prp1 = a.buf.iova();
        }
        a.q.push(&sqe);
        a.q.ring();
        let start = Instant::now();
        let deadline = start + self.opts.admin_timeout;
        loop {
            let next = a.q.pop();
            if next.is_some() {
                a.q.ack();
            }
            // Another identifier is a completion for a command given up on
            // earlier: the checks below still run, so a device posting such
            // ones without end cannot hold this loop past its deadline.
            if let Some(cqe) = next.filter(|c| c.cid() == cid) {
                let status = cqe.code();
                if !status.ok() {
                    return Err(NvmeError::Command {
                        what: format!("{name}: {what}"),
                        status,
                    });
                }
                if let Some(out) = out {
                    // SAFETY: the admin buffer is one page, written by the
                    // controller before it posted the completion.
                    out.copy_from_slice(unsafe { &*(a.buf.ptr() as *const [u8; 4096]) });
                }
                return Ok(cqe.result);
            }
            if self.bar.read32(spec::REG_CSTS) == u32::MAX {
                // Gone, or only its register reads lost with the link up:
                // the command may still run and write the admin buffer
                // the next command copies out. It was left so, the
                // controller alive (audit): failed, as the recovery
                // thread fails it on the same reading.
                self.fail("registers read all ones: the device was removed");
                return Err(NvmeError::Failed(name.into(), "device removed".into()));
            }
            let now = Instant::now();
            if now > deadline {
                return Err(NvmeError::Timeout(format!("{name}: {what}")));
            }
            // Admin commands are control path: spin briefly for the quick
            // ones, then leave the core to the reactors.
            if now - start < Duration::from_micros(100) {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn identify(&self, cns: u32, nsid: u32, out: &mut [u8; 4096]) -> Result<(), NvmeError> {
        let mut sqe = Sqe::new(admin::IDENTIFY, nsid);
        sqe.cdw[0] = cns;
        let what = format!("Identify (CNS {cns}, namespace {nsid})");
        self.admin_or_reset(sqe, &what, Some(out))?;
        Ok(())
    }

    /// Create IO queue pair `qid` on the controller. Returns the reset
    /// generation it was created in (read under the admin lock, so no reset
    /// can fall between the two).
    pub(crate) fn create_io_queue(&self, q: &QueueShape) -> Result<u64, NvmeError> {
        self.alive()?;
        let mut a = lock(&self.admin);
        // Again with the lock: a reset that held it may have failed the
        // controller meanwhile (each waiter would wait out an admin time-out
        // on it, on its reactor).
        self.alive()?;
        let seen = self.generation.load(Ordering::Acquire);
        // A queue the device may still hold after a failed creation (a
        // time-out, a cleanup refused) would have it write into memory
        // freed when this returns, whose IO addresses are handed out again:
        // a reset takes every queue off the device first.
        let reset = |a: std::sync::MutexGuard<'_, Admin>, why: String| {
            let _ = self.reset_locked(a, &why, seen);
        };
        let size = (q.depth as u32 - 1) << 16 | q.qid as u32;
        let mut cq = Sqe::new(admin::CREATE_CQ, 0);
        cq.prp1 = q.cq_iova;
        cq.cdw[0] = size;
        cq.cdw[1] = 1; // physically contiguous, no interrupts: we poll
        if let Err(e) = self.run_admin(
            &mut a,
            cq,
            &format!("Create I/O Completion Queue {}", q.qid),
            None,
        ) {
            if matches!(e, NvmeError::Timeout(_)) {
                reset(a, format!("creating a queue failed: {e}"));
            }
            return Err(e);
        }
        let mut sq = Sqe::new(admin::CREATE_SQ, 0);
        sq.prp1 = q.sq_iova;
        sq.cdw[0] = size;
        sq.cdw[1] = (q.qid as u32) << 16 | 1;
        if let Err(e) = self.run_admin(
            &mut a,
            sq,
            &format!("Create I/O Submission Queue {}", q.qid),
            None,
        ) {
            let mut del = Sqe::new(admin::DELETE_CQ, 0);
            del.cdw[0] = q.qid as u32;
            let deleted = self.run_admin(&mut a, del, "Delete I/O Completion Queue", None);
            if matches!(e, NvmeError::Timeout(_)) || deleted.is_err() {
                reset(a, format!("creating a queue failed: {e}"));
            }
            return Err(e);
        }
        Ok(self.generation.load(Ordering::Acquire))
    }

    /// Delete IO queue pair `qid` (submission queue first, as required).
    /// `created` is the reset generation it was created in: a reset since
    /// took it off the device already. One the device refuses to delete is
    /// taken off it by a reset: its memory is freed (and its IO addresses
    /// handed out again) next.
    pub(crate) fn delete_io_queue(&self, qid: u16, created: u64) -> Result<(), NvmeError> {
        self.alive()?;
        let mut a = lock(&self.admin);
        let seen = self.generation.load(Ordering::Acquire);
        if seen != created || self.is_failed() {
            return Ok(());
        }
        let mut sq = Sqe::new(admin::DELETE_SQ, 0);
        sq.cdw[0] = qid as u32;
        let mut cq = Sqe::new(admin::DELETE_CQ, 0);
        cq.cdw[0] = qid as u32;
        let result = self
            .run_admin(
                &mut a,
                sq,
                &format!("Delete I/O Submission Queue {qid}"),
                None,
            )
            .and_then(|_| {
                self.run_admin(
                    &mut a,
                    cq,
                    &format!("Delete I/O Completion Queue {qid}"),
                    None,
                )
            });
        if let Err(e) = &result {
            let _ = self.reset_locked(a, &format!("deleting queue {qid} failed: {e}"), seen);
        }
        result.map(|_| ())
    }

    /// Reset the controller (disable, enable, admin queue, queue count) and
    /// then bump the generation, so every channel recreates its queue on
    /// the reset controller. All of it under the admin lock: no channel
    /// creates a queue before the queue count is set again (QEMU refuses
    /// Set Features after that), nor touches its rings while the old
    /// controller may still write them. `seen` is the generation the caller
    /// observed: if another channel reset since, this one does not reset
    /// again (its hang is gone with that reset). Marks the controller failed
    /// when the reset does not work.
    pub(crate) fn reset(&self, why: &str, seen: u64) -> Result<(), NvmeError> {
        self.reset_locked(lock(&self.admin), why, seen)
    }

    /// [`reset`](Self::reset) with the admin queue already locked, by a
    /// caller whose command timed out there: no other command runs on
    /// the admin queue before the reset takes the timed-out one back.
    pub(crate) fn reset_locked(
        &self,
        mut a: std::sync::MutexGuard<'_, Admin>,
        why: &str,
        seen: u64,
    ) -> Result<(), NvmeError> {
        let name = self.name().to_string();
        if self.generation.load(Ordering::Acquire) != seen {
            return Ok(());
        }
        if self.is_failed() {
            return Err(NvmeError::Failed(name, self.failure()));
        }
        let n = self.fruitless_resets.fetch_add(1, Ordering::AcqRel) + 1;
        let result = if n > MAX_FRUITLESS_RESETS {
            Err(NvmeError::Failed(
                name.clone(),
                format!(
                    "{why}, after {MAX_FRUITLESS_RESETS} resets with no IO completed in between"
                ),
            ))
        } else {
            tracing::warn!(controller = %name, reason = why, "resetting NVMe controller");
            Self::enable(&self.bar, self.cap, &mut a, &name).and_then(|()| {
                let n = self.set_queue_count(&mut a)?;
                if n < self.io_queues {
                    return Err(NvmeError::Failed(
                        name.clone(),
                        format!(
                            "after reset it grants {n} IO queues, was {}",
                            self.io_queues
                        ),
                    ));
                }
                Ok(())
            })
        };
        match result {
            Ok(()) => {
                self.counts.resets.fetch_add(1, Ordering::Relaxed);
                self.generation.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                drop(a);
                self.fail(&format!("reset after {why} failed: {e}"));
                Err(e)
            }
        }
    }

    /// Mark the controller failed: every IO from now on fails. The device
    /// is disabled first, so it stops using memory that the failed requests
    /// hand back; if it does not confirm that, its IOMMU mappings of
    /// registered memory are taken away instead.
    pub(crate) fn fail(&self, why: &str) {
        // A second caller waits for the first's stop: the generation it
        // moves makes every channel fail its requests and hand their
        // memory back, which the device may still be writing until the
        // first caller saw it stop (a read retried on a mirror into the
        // same buffer, then the late DMA over it).
        let _stopping = lock(&self.stopping);
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(controller = %self.name(), reason = why, "NVMe controller failed");
            *lock(&self.failure) = why.to_string();
            // Until the device confirms it stopped, no IO address is used
            // again (its queues' memory, freed as channels go during the
            // wait below, included). Failed for good, the controller needs
            // none back.
            self.transport.retire_all();
            self.bar.write32(spec::REG_CC, 0);
            // Registers that read all ones say the device is gone, or only
            // that its register reads are lost (a PCIe error with the link
            // up): it cannot confirm a stop, and may still write memory.
            // It was left mapped, with its addresses in use (audit).
            let stopped = !self.removed()
                && wait_ready(&self.bar, self.cap, false, self.transport.name()).is_ok();
            if !stopped {
                let regions = std::mem::take(
                    &mut *self
                        .registry
                        .regions
                        .write()
                        .unwrap_or_else(|p| p.into_inner()),
                );
                self.registry.generation.fetch_add(1, Ordering::Release);
                for r in regions {
                    self.transport.unmap_retired(r.iova, r.len);
                }
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Time-outs, aborts sent and resets done so far (IO errors are
    /// counted per namespace).
    pub fn error_counts(&self) -> bdev::ErrorCounts {
        let c = &self.counts;
        bdev::ErrorCounts {
            io_errors: 0,
            timeouts: c.timeouts.load(Ordering::Relaxed),
            aborts: c.aborts.load(Ordering::Relaxed),
            resets: c.resets.load(Ordering::Relaxed),
        }
    }

    /// Aborts the controller answered "not aborted" so far (the command
    /// had most often completed, its entry not yet polled).
    pub fn aborts_not_found(&self) -> u64 {
        self.counts.aborts_not_found.load(Ordering::Relaxed)
    }

    /// Whether the controller has failed for good.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn failure(&self) -> String {
        lock(&self.failure).clone()
    }

    /// The registers read all ones: the device is gone from the bus.
    pub(crate) fn removed(&self) -> bool {
        self.bar.read32(spec::REG_CSTS) == u32::MAX
    }

    /// The controller reports a fatal status.
    pub(crate) fn fatal(&self) -> bool {
        self.bar.read32(spec::REG_CSTS) & spec::CSTS_CFS != 0
    }

    /// A dropped channel's queue deletion begins (counted in `retiring`);
    /// `on_device`: it asks the device, on a thread of its own.
    pub(crate) fn retire_began(&self, on_device: bool) {
        self.retiring.fetch_add(1, Ordering::AcqRel);
        if on_device {
            *lock(&self.last_retire) = Some(Instant::now());
        }
    }

    /// A free IO queue ID. None free while dropped channels' queues are
    /// being deleted: one of theirs is waited for (a channel dropped to
    /// make room for a new one gives its ID back on a thread), up to
    /// `wait`, and no later than twice `wait` after the latest deletion
    /// began (its drop waited `wait` for it already): one older than
    /// that is stuck on a hung admin queue, and each retry of an open
    /// waited for it in full, on a reactor (review).
    pub(crate) fn alloc_qid(&self, wait: Duration) -> Result<u16, NvmeError> {
        let now = Instant::now();
        let deadline = match *lock(&self.last_retire) {
            Some(t) => (now + wait).min(t + 2 * wait).max(now),
            None => now,
        };
        let mut q = lock(&self.qids);
        loop {
            if let Some(id) = (1..q.len()).find(|&i| !q[i]) {
                q[id] = true;
                return Ok(id as u16);
            }
            let retiring = self.retiring.load(Ordering::Acquire);
            let left = deadline.saturating_duration_since(Instant::now());
            if retiring == 0 || left.is_zero() {
                return Err(NvmeError::NoQueue(format!(
                    "{}: all {} IO queues are in use ({retiring} being deleted)",
                    self.name(),
                    self.io_queues
                )));
            }
            q = match self.qid_freed.wait_timeout(q, left) {
                Ok((q, _)) => q,
                Err(p) => p.into_inner().0,
            };
        }
    }

    pub(crate) fn free_qid(&self, qid: u16) {
        if let Some(used) = lock(&self.qids).get_mut(qid as usize) {
            *used = false;
        }
        self.qid_freed.notify_all();
    }

    /// Name (PCI address for VFIO).
    pub fn name(&self) -> &str {
        self.transport.name()
    }

    /// Identify Controller.
    pub fn identity(&self) -> &IdentifyController {
        &self.ident
    }

    /// Active namespace IDs (as of bring-up or the last [`Self::rescan`]).
    pub fn namespace_ids(&self) -> Vec<u32> {
        lock(&self.namespaces).iter().map(|n| n.0).collect()
    }

    /// Read the active namespace list and every namespace again: picks up
    /// namespaces attached (or formatted) since bring-up.
    pub fn rescan(&self) -> Result<(), NvmeError> {
        let mut page = [0u8; 4096];
        let (nsids, listed): (Vec<u32>, bool) =
            match self.identify(admin::CNS_ACTIVE_NS, 0, &mut page) {
                Ok(()) => (
                    page.chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .take_while(|&id| id != 0)
                        .collect(),
                    true,
                ),
                // NVMe 1.0 has no active namespace list: every identifier
                // up to NN is asked, and an inactive one (all zeroes) left
                // out. (A listed one of no blocks is refused when opened.)
                Err(NvmeError::Command { .. }) => ((1..=self.ident.nn.min(1024)).collect(), false),
                Err(e) => return Err(e),
            };
        let mut found = Vec::with_capacity(nsids.len());
        for nsid in nsids {
            // One namespace the device will not describe (a bogus
            // identifier in its list) costs only itself, not the
            // controller and every other namespace on it.
            match self.identify(admin::CNS_NAMESPACE, nsid, &mut page) {
                Ok(()) => {
                    let ns = IdentifyNamespace::parse(&page);
                    if listed || ns.nsze != 0 {
                        found.push((nsid, ns));
                    }
                }
                // (One known from before keeps what it said then.)
                Err(e @ NvmeError::Command { .. }) => {
                    let known = lock(&self.namespaces).iter().find(|n| n.0 == nsid).copied();
                    match known {
                        Some(n) => {
                            tracing::warn!(controller = %self.name(), nsid, error = %e, "Identify Namespace failed; what it said before is kept");
                            found.push(n)
                        }
                        None => {
                            tracing::warn!(controller = %self.name(), nsid, error = %e, "namespace left out")
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        *lock(&self.namespaces) = found;
        Ok(())
    }

    /// What Identify Namespace said about `nsid`, rescanning once if it was
    /// not active at the last look.
    pub(crate) fn namespace(&self, nsid: u32) -> Result<IdentifyNamespace, NvmeError> {
        let cached = |c: &Self| {
            lock(&c.namespaces)
                .iter()
                .find(|n| n.0 == nsid)
                .map(|n| n.1)
        };
        if let Some(ns) = cached(self) {
            return Ok(ns);
        }
        self.rescan()?;
        cached(self).ok_or_else(|| {
            NvmeError::InvalidArgument(format!(
                "{}: no active namespace {nsid} (active: {:?})",
                self.name(),
                self.namespace_ids()
            ))
        })
    }

    /// Commands so far whose data was copied through bounce pages because
    /// the caller's memory was not registered or not PRP-shaped.
    pub fn bounced_commands(&self) -> u64 {
        self.bounced.load(Ordering::Relaxed)
    }

    /// IO queue pairs granted.
    pub fn io_queues(&self) -> u16 {
        self.io_queues
    }

    /// Largest command in bytes (MDTS), capped at `cap`.
    pub(crate) fn max_command_bytes(&self, cap: usize) -> usize {
        match self.ident.mdts {
            0 => cap,
            m if m >= 20 => cap,
            m => (self.cap.mps_min() << m).min(cap),
        }
    }

    /// Let the controller DMA straight to `len` bytes at `ptr` (guest
    /// memory, a buffer pool); requests outside registered memory go
    /// through bounce buffers.
    ///
    /// # Safety
    /// The memory must stay mapped until `unregister_memory`, and no IO
    /// may be in flight to it then.
    pub unsafe fn register_memory(&self, ptr: *mut u8, len: usize) -> Result<(), NvmeError> {
        let start = ptr as usize & !(spec::PAGE - 1);
        let end = (ptr as usize + len).div_ceil(spec::PAGE) * spec::PAGE;
        // A failed controller may be a device that did not stop: it gets
        // no memory (its IO is bounced, and fails anyway).
        self.alive()?;
        {
            let mut mapping = self
                .registry
                .mapping
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let overlaps = self
                .registry
                .regions
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|r| (r.vaddr, r.vaddr + r.len))
                .chain(mapping.iter().copied())
                .any(|(a, b)| a < end && start < b);
            if overlaps {
                return Err(NvmeError::InvalidArgument(format!(
                    "{}: memory {start:#x}..{end:#x} overlaps a registered region",
                    self.name()
                )));
            }
            mapping.push((start, end));
        }
        // SAFETY: forwarded from the caller.
        let pieces = unsafe { self.transport.map_pieces(start as *mut u8, end - start) };
        let unlist = || {
            self.registry
                .mapping
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|&r| r != (start, end));
        };
        let pieces = match pieces {
            Ok(p) => p,
            Err(e) => {
                unlist();
                return Err(e);
            }
        };
        let mut regions = self
            .registry
            .regions
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if self.is_failed() {
            // It failed while this was mapped: `fail` took the others away
            // under this lock; this one goes too, for good.
            drop(regions);
            for (_, len, iova) in pieces {
                self.transport.unmap_retired(iova, len);
            }
            unlist();
            return Err(self.failed_error());
        }
        for (off, len, iova) in pieces {
            let vaddr = start + off;
            let at = regions.partition_point(|r| r.vaddr < vaddr);
            regions.insert(
                at,
                Region {
                    vaddr,
                    len,
                    iova,
                    base: start,
                },
            );
        }
        self.registry.generation.fetch_add(1, Ordering::Release);
        drop(regions);
        unlist();
        Ok(())
    }

    /// Undo `register_memory` for the region that starts at `ptr`'s page.
    pub fn unregister_memory(&self, ptr: *mut u8) -> Result<(), NvmeError> {
        let start = ptr as usize & !(spec::PAGE - 1);
        let mut regions = self
            .registry
            .regions
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let (gone, kept): (Vec<Region>, Vec<Region>) =
            regions.iter().partition(|r| r.base == start);
        if gone.is_empty() {
            return Err(NvmeError::InvalidArgument(format!(
                "{}: no memory registered at {start:#x}",
                self.name()
            )));
        }
        *regions = kept;
        self.registry.generation.fetch_add(1, Ordering::Release);
        // Channels see the new list at their next request; the IOMMU work
        // is done without holding them off.
        drop(regions);
        for r in gone {
            self.transport.unmap(r.iova, r.len);
        }
        Ok(())
    }

    /// Shut down cleanly (CC.SHN normal), as before power-off.
    pub fn shutdown(&self) {
        if self.is_failed() || self.removed() {
            return;
        }
        let cc = self.bar.read32(spec::REG_CC);
        self.bar.write32(spec::REG_CC, cc | 1 << 14);
        let deadline = Instant::now() + Duration::from_millis(self.cap.timeout_ms());
        while self.bar.read32(spec::REG_CSTS) >> 2 & 3 != 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

impl bdev::DmaMapper for Controller {
    unsafe fn dma_map(&self, ptr: *mut u8, len: usize) -> Result<(), String> {
        // SAFETY: forwarded from the caller.
        unsafe { self.register_memory(ptr, len) }.map_err(|e| e.to_string())
    }

    fn dma_unmap(&self, ptr: *mut u8) {
        if let Err(e) = self.unregister_memory(ptr) {
            tracing::debug!(controller = %self.name(), error = %e, "unmapping DMA memory");
        }
    }
}

impl Drop for Controller {
    /// Stop the controller from touching memory that is about to be freed:
    /// a clean shutdown notification, then disable.
    fn drop(&mut self) {
        self.shutdown();
        let stopped = !self.removed() && {
            self.bar.write32(spec::REG_CC, 0);
            wait_ready(&self.bar, self.cap, false, self.transport.name()).is_ok()
        };
        // One that does not confirm it stopped keeps its addresses from
        // being handed out again and loses bus mastering, before its
        // queues' memory is freed (the fields, after this).
        if !stopped {
            self.transport.retire_all();
        }
    }
}

/// Status of a command that timed out and was aborted.
pub(crate) const ABORTED: Status = Status::ABORT_REQUESTED;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves nothing half-done that a
    // later user could trip on (queue indices are rewritten by reset).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
