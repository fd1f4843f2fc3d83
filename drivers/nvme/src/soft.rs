//! A software NVMe controller: the register file and the queue protocol in
//! shared memory, served by a thread, so the driver can be tested (and
//! measured) on any machine. It behaves like a device: it sees only what
//! the driver writes to registers and queues, and reaches data through an
//! IOMMU of its own, so a PRP pointing at memory the driver never mapped is
//! caught (as a data transfer error, counted in [`SoftStats::iommu_faults`]).
//!
//! Faults to inject: media errors on chosen blocks, slow completions, lost
//! completions (the driver must abort and reset), controller fatal status,
//! and surprise removal (registers read all ones).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::controller::lock;
use crate::error::NvmeError;
use crate::spec::{self, admin, io, Cqe, IdentifyController, IdentifyNamespace, Sqe, Status, PAGE};
use crate::transport::{Bar, Transport};

mod commands;

/// What the software controller looks like.
#[derive(Debug, Clone)]
pub struct SoftConfig {
    /// Namespaces: (block size, number of blocks).
    pub namespaces: Vec<(u32, u64)>,
    /// MDTS (power of two of 4 KiB pages; 0 = no limit).
    pub mdts: u8,
    /// Largest queue (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// IO queue pairs it grants at most.
    pub max_io_queues: u16,
    /// Volatile write cache present.
    pub vwc: bool,
    /// Serial number.
    pub serial: String,
    /// Store nothing: reads and writes only walk their PRPs (through the
    /// IOMMU) and complete. For measuring the driver, not the copy.
    pub null_data: bool,
    /// Pin the controller's thread to this core.
    pub core: Option<usize>,
    /// Take SGLs as well as PRPs (any alignment).
    pub sgl: bool,
}

impl Default for SoftConfig {
    fn default() -> SoftConfig {
        SoftConfig {
            namespaces: vec![(4096, 16384)],
            mdts: 5,
            max_queue_entries: 1024,
            max_io_queues: 16,
            vwc: true,
            serial: "soft0".into(),
            null_data: false,
            core: None,
            sgl: false,
        }
    }
}

/// Counters of what the controller saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SoftStats {
    /// IO commands executed.
    pub io_commands: u64,
    /// Commands whose PRPs pointed at unmapped memory.
    pub iommu_faults: u64,
    /// Times the controller was enabled (1 + resets).
    pub enables: u64,
    /// Abort commands that found their command.
    pub aborted: u64,
    /// Largest transfer of one command, in bytes.
    pub largest_transfer: u64,
    /// Completions that found their completion queue full (the driver
    /// had more commands outstanding than the queue holds, or did not
    /// ring the head doorbell); they wait until there is room.
    pub cq_full: u64,
    /// DMA the device tried with bus mastering off (refused).
    pub dma_refused: u64,
}

#[derive(Default)]
struct Faults {
    bad_blocks: HashSet<(u32, u64)>,
    hung_blocks: HashSet<(u32, u64)>,
    latency: Duration,
    lose: u32,
    /// IO commands whose completion waits until an abort names them.
    late_until_abort: u32,
    lose_admin: u32,
    /// (opcode, how many): admin commands of one kind done but never
    /// completed.
    lose_opcode: (u8, u32),
    /// IO commands to fail with Namespace Not Ready, Do Not Retry clear.
    not_ready: u32,
    /// Identify Namespace of these fails (a bogus identifier).
    refuse_identify: HashSet<u32>,
    /// Identify of the active namespace list fails (NVMe 1.0 has none).
    no_active_list: bool,
    /// The identifiers of IO commands, in the order executed, once asked.
    cids: Option<Vec<u16>>,
}

struct Shared {
    regs: memmap2::MmapMut,
    iommu: RwLock<BTreeMap<u64, (usize, usize)>>,
    iova: crate::iova::IovaSpace,
    faults: Mutex<Faults>,
    fatal: AtomicBool,
    removed: AtomicBool,
    stop: AtomicBool,
    /// Admin commands are left in their queue until released.
    hold_admin: AtomicBool,
    /// CC.EN = 0 is not obeyed (a hung device that keeps its queues).
    ignore_disable: AtomicBool,
    /// CSTS reads all ones and CC.EN = 0 is not obeyed, while the device
    /// keeps its queues (register reads lost, the link up).
    status_lost: AtomicBool,
    /// The driver said the device did not stop: addresses are not reused.
    retired: AtomicBool,
    /// PCI Bus Master Enable: cleared, the device reaches no memory (its
    /// DMA is refused, counted in [`SoftStats::dma_refused`]).
    bus_master: AtomicBool,
    /// How many admin commands wait there while held.
    admin_waiting: AtomicU32,
    stats: Mutex<SoftStats>,
    name: String,
    /// Namespaces attached while running, picked up by the device thread.
    attach: Mutex<Vec<(u32, u64)>>,
}

// SAFETY: the register page is shared with the driver by design and only
// accessed through 32-bit atomics.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn bar(&self) -> Bar {
        // SAFETY: the mapping lives as long as Shared, which every Bar user
        // keeps alive through the transport.
        unsafe { Bar::new(self.regs.as_ptr() as *mut u8, self.regs.len()) }
    }

    /// The IOMMU's map, for one DMA of the device; none while bus
    /// mastering is off (a device that obeys it reaches no memory).
    fn dma(&self) -> Option<std::sync::RwLockReadGuard<'_, BTreeMap<u64, (usize, usize)>>> {
        if !self.bus_master.load(Ordering::Acquire) {
            lock(&self.stats).dma_refused += 1;
            return None;
        }
        Some(self.iommu.read().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The transport to a software controller (what the driver is given).
pub struct SoftTransport {
    shared: Arc<Shared>,
}

impl Transport for SoftTransport {
    fn bar(&self) -> Bar {
        self.shared.bar()
    }

    unsafe fn map(&self, vaddr: *mut u8, len: usize) -> Result<u64, NvmeError> {
        crate::transport::check_page_aligned(vaddr, len)?;
        // IO addresses unlike the process's own, so a driver that uses a
        // virtual address where an IO address belongs is caught.
        // A page of gap after each: an overrun reaches no other mapping.
        let iova = self
            .shared
            .iova
            .alloc(len as u64 + PAGE as u64)
            .ok_or_else(|| NvmeError::InvalidArgument("soft IOMMU: no IO addresses left".into()))?;
        let mut m = self.shared.iommu.write().unwrap_or_else(|p| p.into_inner());
        m.insert(iova, (vaddr as usize, len));
        Ok(iova)
    }

    fn unmap(&self, iova: u64, _len: usize) {
        let mut m = self.shared.iommu.write().unwrap_or_else(|p| p.into_inner());
        if let Some((_, len)) = m.remove(&iova) {
            if !self.shared.retired.load(Ordering::Acquire) {
                self.shared.iova.free(iova, len as u64 + PAGE as u64);
            }
        }
    }

    fn retire_all(&self) {
        self.shared.retired.store(true, Ordering::Release);
        self.shared.bus_master.store(false, Ordering::Release);
    }

    fn unmap_retired(&self, iova: u64, _len: usize) {
        let mut m = self.shared.iommu.write().unwrap_or_else(|p| p.into_inner());
        m.remove(&iova);
    }

    fn name(&self) -> &str {
        &self.shared.name
    }
}

/// A running software controller. Dropping it stops its thread.
pub struct SoftController {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl SoftController {
    /// Start a controller named `name`.
    pub fn start(name: &str, config: SoftConfig) -> Result<SoftController, NvmeError> {
        let regs = memmap2::MmapOptions::new()
            .len(2 * PAGE)
            .map_anon()
            .map_err(|e| NvmeError::Os("mapping the software controller's registers".into(), e))?;
        let shared = Arc::new(Shared {
            regs,
            iommu: RwLock::new(BTreeMap::new()),
            iova: crate::iova::IovaSpace::new(0x7_0000_0000, 1 << 47),
            faults: Mutex::new(Faults::default()),
            fatal: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            hold_admin: AtomicBool::new(false),
            ignore_disable: AtomicBool::new(false),
            status_lost: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            bus_master: AtomicBool::new(true),
            admin_waiting: AtomicU32::new(0),
            stats: Mutex::new(SoftStats::default()),
            name: name.to_string(),
            attach: Mutex::new(Vec::new()),
        });
        let mqes = config.max_queue_entries.clamp(2, 65536) as u64 - 1;
        let cap = mqes | 1 << 16 | 15 << 24 | 1 << 37 | 4 << 52;
        let bar = shared.bar();
        bar.write64(spec::REG_CAP, cap);
        bar.write32(spec::REG_VS, 0x10400);
        let core = config.core;
        let mut dev = Device::new(shared.clone(), config);
        let thread = std::thread::Builder::new()
            .name(format!("soft-nvme-{name}"))
            .spawn(move || {
                if let Some(id) = core {
                    core_affinity::set_for_current(core_affinity::CoreId { id });
                }
                dev.run()
            })
            .map_err(|e| NvmeError::Os("starting the software controller thread".into(), e))?;
        Ok(SoftController {
            shared,
            thread: Some(thread),
        })
    }

    /// The transport a driver uses to reach this controller.
    pub fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(SoftTransport {
            shared: self.shared.clone(),
        })
    }

    /// Reads and writes touching this block of namespace `nsid` fail with a
    /// media error.
    pub fn fail_block(&self, nsid: u32, lba: u64) {
        lock(&self.shared.faults).bad_blocks.insert((nsid, lba));
    }

    /// Reads and writes touching this block of namespace `nsid` are never
    /// completed, nor aborted (a command stuck inside the device), while
    /// other commands complete.
    pub fn hang_block(&self, nsid: u32, lba: u64) {
        lock(&self.shared.faults).hung_blocks.insert((nsid, lba));
    }

    /// Attach a namespace (block size, blocks) while running, as an
    /// operator would with namespace management; it gets the next ID.
    pub fn attach_namespace(&self, block_size: u32, blocks: u64) {
        lock(&self.shared.attach).push((block_size, blocks));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !lock(&self.shared.attach).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Hold every completion this long.
    pub fn set_latency(&self, d: Duration) {
        lock(&self.shared.faults).latency = d;
    }

    /// Never complete the next `n` IO commands (a hung command).
    pub fn lose_completions(&self, n: u32) {
        lock(&self.shared.faults).lose = n;
    }

    /// Hold the completion of the next `n` IO commands until an abort
    /// names one: then it is posted as it was, and the abort answered
    /// "not aborted" (a command that completed as its abort came, whose
    /// entry waits for the driver's next poll).
    pub fn complete_at_abort(&self, n: u32) {
        lock(&self.shared.faults).late_until_abort = n;
    }

    /// Never complete the next `n` admin commands.
    pub fn lose_admin_completions(&self, n: u32) {
        lock(&self.shared.faults).lose_admin = n;
    }

    /// Never complete the next `n` admin commands of `opcode` (they are
    /// carried out, as a device whose answer is lost).
    pub fn lose_admin_opcode(&self, opcode: u8, n: u32) {
        lock(&self.shared.faults).lose_opcode = (opcode, n);
    }

    /// Fail the next `n` IO commands with Namespace Not Ready and Do Not
    /// Retry clear (a device coming ready).
    pub fn not_ready(&self, n: u32) {
        lock(&self.shared.faults).not_ready = n;
    }

    /// Fail Identify Namespace of `nsid` with Invalid Field.
    pub fn refuse_identify(&self, nsid: u32) {
        lock(&self.shared.faults).refuse_identify.insert(nsid);
    }

    /// Fail Identify of the active namespace list, as an NVMe 1.0
    /// controller does.
    pub fn no_active_list(&self) {
        lock(&self.shared.faults).no_active_list = true;
    }

    /// Record the identifier of every IO command from now on.
    pub fn record_cids(&self) {
        lock(&self.shared.faults).cids = Some(Vec::new());
    }

    /// The identifiers recorded, in the order the commands were executed.
    pub fn cids(&self) -> Vec<u16> {
        lock(&self.shared.faults).cids.clone().unwrap_or_default()
    }

    /// Leave admin commands in the admin queue, unexecuted, until
    /// [`Self::release_admin`]: a controller whose admin queue hangs (an
    /// abort or a reset's commands wait as long as the test wants).
    pub fn hold_admin(&self) {
        self.shared.hold_admin.store(true, Ordering::Release);
    }

    /// Execute held admin commands and the ones that follow.
    pub fn release_admin(&self) {
        self.shared.hold_admin.store(false, Ordering::Release);
    }

    /// Whether PCI bus mastering is on (the driver clears it for a device
    /// that did not stop).
    pub fn bus_master(&self) -> bool {
        self.shared.bus_master.load(Ordering::Acquire)
    }

    /// Admin commands submitted and held, not executed.
    pub fn admin_waiting(&self) -> u32 {
        self.shared.admin_waiting.load(Ordering::Acquire)
    }

    /// Ignore (or again obey) CC.EN = 0: a hung device that keeps its
    /// queues and may still write to them.
    pub fn ignore_disable(&self, on: bool) {
        self.shared.ignore_disable.store(on, Ordering::Release);
    }

    /// Lose the status register: it reads all ones, as a removed device's
    /// do, but the device keeps its queues and does not obey a disable
    /// (a PCIe error that lost register reads, the link still up).
    /// Returns once it reads so.
    pub fn lose_status(&self) {
        self.shared.status_lost.store(true, Ordering::Release);
        self.wait_status(|csts| csts == u32::MAX);
    }

    /// Raise controller fatal status; the controller stops until reset.
    /// Returns once the status shows it (nothing is executed after that).
    pub fn make_fatal(&self) {
        self.shared.fatal.store(true, Ordering::Release);
        self.wait_status(|csts| csts & spec::CSTS_CFS != 0);
    }

    /// Pull the device: registers read all ones and nothing completes.
    /// Returns once they do.
    pub fn remove(&self) {
        self.shared.removed.store(true, Ordering::Release);
        self.wait_status(|csts| csts == u32::MAX);
    }

    fn wait_status(&self, done: impl Fn(u32) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(self.shared.bar().read32(spec::REG_CSTS)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// What the controller has seen.
    pub fn stats(&self) -> SoftStats {
        *lock(&self.shared.stats)
    }
}

impl Drop for SoftController {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Sq {
    iova: u64,
    size: u32,
    head: u32,
    cqid: u16,
}

struct Cq {
    iova: u64,
    size: u32,
    tail: u32,
    phase: bool,
}

struct Pending {
    due: Instant,
    sqid: u16,
    cqid: u16,
    cid: u16,
    status: Status,
    result: u32,
}

struct Device {
    shared: Arc<Shared>,
    bar: Bar,
    config: SoftConfig,
    data: Vec<Vec<u8>>,
    enabled: bool,
    sqs: BTreeMap<u16, Sq>,
    cqs: BTreeMap<u16, Cq>,
    pending: VecDeque<Pending>,
    lost: Vec<(u16, u16)>,
    /// Completions held until an abort names them (`due` unused).
    late: Vec<Pending>,
}

const STRIDE: usize = 4;

impl Device {
    fn new(shared: Arc<Shared>, config: SoftConfig) -> Device {
        let data = config
            .namespaces
            .iter()
            .map(|&(bs, n)| {
                if config.null_data {
                    Vec::new()
                } else {
                    vec![0u8; bs as usize * n as usize]
                }
            })
            .collect();
        Device {
            bar: shared.bar(),
            shared,
            config,
            data,
            enabled: false,
            sqs: BTreeMap::new(),
            cqs: BTreeMap::new(),
            pending: VecDeque::new(),
            lost: Vec::new(),
            late: Vec::new(),
        }
    }

    fn run(&mut self) {
        let mut idle = 0u32;
        while !self.shared.stop.load(Ordering::Acquire) {
            if self.shared.removed.load(Ordering::Acquire) {
                for off in (0..self.bar.len()).step_by(4) {
                    self.bar.write32(off, u32::MAX);
                }
                while !self.shared.stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                return;
            }
            let worked = self.step();
            if worked {
                idle = 0;
            } else {
                idle += 1;
                if idle > 20_000 {
                    std::thread::sleep(Duration::from_micros(50));
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }

    fn step(&mut self) -> bool {
        for (bs, n) in lock(&self.shared.attach).drain(..) {
            self.config.namespaces.push((bs, n));
            self.data.push(if self.config.null_data {
                Vec::new()
            } else {
                vec![0u8; bs as usize * n as usize]
            });
        }
        let lost = self.shared.status_lost.load(Ordering::Acquire);
        if lost {
            self.bar.write32(spec::REG_CSTS, u32::MAX);
        }
        let cc = self.bar.read32(spec::REG_CC);
        if cc & spec::CC_EN == 0 {
            if self.shared.ignore_disable.load(Ordering::Acquire) || lost {
                return false;
            }
            if self.enabled || self.bar.read32(spec::REG_CSTS) != 0 {
                self.enabled = false;
                self.sqs.clear();
                self.cqs.clear();
                self.pending.clear();
                self.lost.clear();
                self.late.clear();
                self.shared.fatal.store(false, Ordering::Release);
                for off in (spec::REG_DOORBELLS..self.bar.len()).step_by(4) {
                    self.bar.write32(off, 0);
                }
                self.bar.write32(spec::REG_CSTS, 0);
                return true;
            }
            return false;
        }
        if !self.enabled {
            let aqa = self.bar.read32(spec::REG_AQA);
            self.sqs.insert(
                0,
                Sq {
                    iova: self.bar.read64(spec::REG_ASQ),
                    size: (aqa & 0xfff) + 1,
                    head: 0,
                    cqid: 0,
                },
            );
            self.cqs.insert(
                0,
                Cq {
                    iova: self.bar.read64(spec::REG_ACQ),
                    size: ((aqa >> 16) & 0xfff) + 1,
                    tail: 0,
                    phase: true,
                },
            );
            self.enabled = true;
            lock(&self.shared.stats).enables += 1;
            self.bar.write32(spec::REG_CSTS, spec::CSTS_RDY);
            return true;
        }
        if self.shared.fatal.load(Ordering::Acquire) {
            self.bar
                .write32(spec::REG_CSTS, spec::CSTS_RDY | spec::CSTS_CFS);
            return false;
        }
        if (cc >> 14) & 3 != 0 {
            self.bar.write32(spec::REG_CSTS, spec::CSTS_RDY | 2 << 2);
            return false;
        }
        let mut worked = false;
        let qids: Vec<u16> = self.sqs.keys().copied().collect();
        for qid in qids {
            let tail = self.bar.read32(spec::sq_doorbell(qid, STRIDE));
            if qid == 0 && self.shared.hold_admin.load(Ordering::Acquire) {
                if let Some(sq) = self.sqs.get(&0).filter(|sq| tail < sq.size) {
                    let waiting = (tail + sq.size - sq.head) % sq.size;
                    self.shared.admin_waiting.store(waiting, Ordering::Release);
                }
                continue;
            }
            if qid == 0 {
                self.shared.admin_waiting.store(0, Ordering::Release);
            }
            while let Some(sq) = self.sqs.get_mut(&qid) {
                if tail >= sq.size || sq.head == tail {
                    break;
                }
                let at = sq.iova + sq.head as u64 * 64;
                sq.head = (sq.head + 1) % sq.size;
                let cqid = sq.cqid;
                worked = true;
                let Some(sqe) = self.read_obj::<Sqe>(at) else {
                    lock(&self.shared.stats).iommu_faults += 1;
                    continue;
                };
                let (status, result) = if qid == 0 {
                    self.admin(&sqe)
                } else {
                    self.io(&sqe)
                };
                if qid != 0 && self.hung(&sqe) {
                    self.lost.push((qid, sqe.cid()));
                    continue;
                }
                if qid == 0 {
                    let mut f = lock(&self.shared.faults);
                    if f.lose_opcode.1 > 0 && f.lose_opcode.0 == sqe.opcode() {
                        f.lose_opcode.1 -= 1;
                        continue;
                    }
                }
                self.complete(qid, cqid, sqe.cid(), status, result);
            }
        }
        let now = Instant::now();
        while self.pending.front().is_some_and(|p| p.due <= now) {
            if let Some(p) = self.pending.pop_front() {
                self.post(p.sqid, p.cqid, p.cid, p.status, p.result);
                worked = true;
            }
        }
        worked
    }

    fn complete(&mut self, sqid: u16, cqid: u16, cid: u16, status: Status, result: u32) {
        if sqid == 0 {
            let mut f = lock(&self.shared.faults);
            if f.lose_admin > 0 {
                f.lose_admin -= 1;
                return;
            }
        }
        if sqid != 0 {
            let mut f = lock(&self.shared.faults);
            if f.lose > 0 {
                f.lose -= 1;
                self.lost.push((sqid, cid));
                return;
            }
            let held = Pending {
                due: Instant::now() + f.latency,
                sqid,
                cqid,
                cid,
                status,
                result,
            };
            if f.late_until_abort > 0 {
                f.late_until_abort -= 1;
                self.late.push(held);
                return;
            }
            if !f.latency.is_zero() {
                self.pending.push_back(held);
                return;
            }
        }
        self.post(sqid, cqid, cid, status, result);
    }

    fn post(&mut self, sqid: u16, cqid: u16, cid: u16, status: Status, result: u32) {
        let sq_head = self.sqs.get(&sqid).map_or(0, |s| s.head);
        let head = self.bar.read32(spec::cq_doorbell(cqid, STRIDE));
        let Some(cq) = self.cqs.get_mut(&cqid) else {
            return;
        };
        if (cq.tail + 1) % cq.size == head {
            // Full: the entry waits, as a device holds it, until the head
            // doorbell moves.
            lock(&self.shared.stats).cq_full += 1;
            self.pending.push_front(Pending {
                due: Instant::now(),
                sqid,
                cqid,
                cid,
                status,
                result,
            });
            return;
        }
        let at = cq.iova + cq.tail as u64 * 16;
        let mut dw3 = Cqe::dw3(cid, cq.phase, status);
        if status == Status::NAMESPACE_NOT_READY {
            dw3 &= !(1 << 31);
        }
        cq.tail += 1;
        if cq.tail == cq.size {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        let Some(iommu) = self.shared.dma() else {
            return;
        };
        let Some(p) = lookup(&iommu, at, 16) else {
            lock(&self.shared.stats).iommu_faults += 1;
            return;
        };
        // SAFETY: the driver mapped this completion queue entry; the status
        // dword goes last with release so the driver sees a whole entry.
        unsafe {
            let e = p as *mut u32;
            e.write_volatile(result);
            e.add(1).write_volatile(0);
            e.add(2).write_volatile(sq_head | (sqid as u32) << 16);
            AtomicU32::from_ptr(e.add(3)).store(dw3, Ordering::Release);
        }
    }

    fn read_obj<T: Copy>(&self, iova: u64) -> Option<T> {
        let iommu = self.shared.dma()?;
        let p = lookup(&iommu, iova, std::mem::size_of::<T>())?;
        // SAFETY: mapped by the driver for at least size_of::<T>() bytes.
        Some(unsafe { (p as *const T).read_unaligned() })
    }
}

/// Translate `len` bytes at `iova` if one mapping holds them all.
fn lookup(iommu: &BTreeMap<u64, (usize, usize)>, iova: u64, len: usize) -> Option<usize> {
    let (&base, &(vaddr, size)) = iommu.range(..=iova).next_back()?;
    let off = (iova - base) as usize;
    (off + len <= size).then_some(vaddr + off)
}
