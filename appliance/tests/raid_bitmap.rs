//! The write-intent bitmap's two rules, checked on every member IO rather
//! than by timing: a data write reaches a member only when that member's
//! bitmap block already marks its region, and a bit is cleared on a member
//! only after the member was flushed since the region's last write.
//! Random writes from two reactors race the daemon setting and clearing
//! bits every millisecond; RAID1 and RAID5 alike.

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appliance::raid::assembly::{self, VolumeSpec};
use appliance::raid::bitmap;
use appliance::raid::geometry::Layout;
use appliance::raid::members::FailureSink;
use appliance::raid::monitor::Monitor;
use appliance::raid::superblock::Level;
use appliance::volume::Volume;
use appliance::workload::{Workload, WorkloadParams};
use bdev::{
    BdevError, BlockDevice, Completion, DeviceInfo, IoChannel, IoOp, IoRequest, RamDevice,
    SubmitError,
};
use poller::{ReactorConfig, Reactors};

const BS: u64 = 4096;
const OFFSET: u64 = 3;

/// What a member has seen: the bits of its last bitmap block, the
/// regions written since its last flush, and every broken rule.
#[derive(Default)]
struct Seen {
    bits: Vec<u64>,
    unflushed: BTreeSet<u64>,
    violations: Vec<String>,
    data_writes: u64,
    clears: u64,
}

/// A member that checks the rules on every request it is given.
struct Checked {
    inner: Arc<dyn BlockDevice>,
    /// Member blocks per bitmap region (set once the bitmap exists).
    region_blocks: Mutex<u64>,
    seen: Arc<Mutex<Seen>>,
}

struct CheckedChannel {
    inner: Box<dyn IoChannel>,
    region_blocks: u64,
    seen: Arc<Mutex<Seen>>,
}

impl BlockDevice for Checked {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(CheckedChannel {
            inner: self.inner.open_channel()?,
            region_blocks: *self.region_blocks.lock().unwrap(),
            seen: self.seen.clone(),
        }))
    }
}

fn bit(bits: &[u64], r: u64) -> bool {
    bits.get((r / 64) as usize)
        .is_some_and(|w| w & (1 << (r % 64)) != 0)
}

impl IoChannel for CheckedChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        let mut s = self.seen.lock().unwrap();
        let first_bitmap_block = bitmap::BYTE_OFFSET / BS;
        match req.op {
            IoOp::Write if req.offset_blocks == first_bitmap_block => {
                let mut block = vec![0u8; bitmap::BYTES];
                let mut at = 0;
                for v in req.sg.iter() {
                    // SAFETY: the buffer is valid until the request completes.
                    let src = unsafe { std::slice::from_raw_parts(v.ptr(), v.len()) };
                    block[at..at + src.len()].copy_from_slice(src);
                    at += src.len();
                }
                // md's bitmap superblock, then the bits.
                let words: Vec<u64> = block[appliance::raid::md::bitmap::HEADER..]
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                for (w, &now) in words.iter().enumerate() {
                    let mut cleared = s.bits.get(w).copied().unwrap_or(0) & !now;
                    while cleared != 0 {
                        let r = w as u64 * 64 + cleared.trailing_zeros() as u64;
                        cleared &= cleared - 1;
                        s.clears += 1;
                        if s.unflushed.contains(&r) {
                            s.violations
                                .push(format!("region {r} cleared before its writes were flushed"));
                        }
                    }
                }
                s.bits = words;
            }
            IoOp::Write | IoOp::WriteZeroes | IoOp::Discard
                if req.offset_blocks >= OFFSET && self.region_blocks > 0 =>
            {
                let first = (req.offset_blocks - OFFSET) / self.region_blocks;
                let last =
                    (req.offset_blocks - OFFSET + req.num_blocks.max(1) - 1) / self.region_blocks;
                s.data_writes += 1;
                for r in first..=last {
                    if !bit(&s.bits, r) {
                        s.violations.push(format!(
                            "write to region {r} before its bit was on the member"
                        ));
                    }
                    s.unflushed.insert(r);
                }
            }
            IoOp::Flush => s.unflushed.clear(),
            _ => {}
        }
        drop(s);
        self.inner.submit(req)
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        self.inner.poll(out)
    }

    fn inflight(&self) -> usize {
        self.inner.inflight()
    }
}

fn run(level: Level, n: usize) {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let checked: Vec<Arc<Checked>> = (0..n)
        .map(|i| {
            Arc::new(Checked {
                inner: Arc::new(
                    RamDevice::new(&format!("m{i}"), BS as u32, OFFSET + 4096).unwrap(),
                ),
                region_blocks: Mutex::new(0),
                seen: Arc::default(),
            })
        })
        .collect();
    let members: Vec<Arc<dyn BlockDevice>> = checked
        .iter()
        .map(|c| c.clone() as Arc<dyn BlockDevice>)
        .collect();
    let spec = VolumeSpec {
        name: "bm".into(),
        level,
        layout: Layout::LeftSymmetric,
        chunk_bytes: 16 << 10,
        data_offset: OFFSET,
        members: members.clone(),
        // 256 KiB regions: 16 RAID5 stripes or one RAID1 rebuild row.
        bitmap_chunk_bytes: 256 << 10,
        zeroed: true,
    };
    let (tx, rx) = mpsc::channel();
    let (dev, meta) = assembly::create(&spec, FailureSink::new(tx), false).unwrap();
    let b = dev.member_set().bitmap.clone().expect("a bitmap");
    let rows = appliance::raid::monitor::RaidDevice::rows(dev.as_ref());
    for c in &checked {
        *c.region_blocks.lock().unwrap() = b.rows_per_bit() * rows.blocks;
    }
    b.set_clear_every(Duration::from_millis(1));
    let volume = Volume::new(reactors.set(), "bm", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev.clone(), rx, vec![]);
    monitor.set_meta(meta);
    assert!(monitor.open(true).unwrap().is_none());
    // Random 4-64 KiB writes (and reads) over the whole volume from both
    // reactors, in bursts with pauses so quiet regions get cleared while
    // others are written.
    // As many bursts as it takes (a loaded machine does fewer writes per
    // burst) for the race to have been exercised.
    let exercised = || {
        let (mut writes, mut clears) = (0, 0);
        for c in &checked {
            let s = c.seen.lock().unwrap();
            writes += s.data_writes;
            clears += s.clears;
        }
        writes > 200 && clears > 20
    };
    for burst in 0..60u64 {
        if burst >= 6 && exercised() {
            break;
        }
        let w = Workload::start_on_volume(
            reactors.set(),
            &volume,
            WorkloadParams {
                queue_depth: 8,
                io_bytes: 4096 << (burst % 5),
                read_percent: 30,
                verify: true,
                span_bytes: 0,
            },
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(150));
        let totals = w.stop(Duration::from_secs(30)).unwrap();
        assert!(totals.clean(), "burst {burst}: {totals:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Idle: every bit is cleared in the end.
    let t = Instant::now();
    while b.dirty_regions() > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "bits never cleared");
        std::thread::sleep(Duration::from_millis(5));
    }
    monitor.close().unwrap();
    drop(monitor);
    let (mut writes, mut clears) = (0, 0);
    for c in &checked {
        let s = c.seen.lock().unwrap();
        assert!(
            s.violations.is_empty(),
            "{level:?}: {} broken rules, first: {:?}",
            s.violations.len(),
            s.violations.first()
        );
        assert!(s.bits.iter().all(|&w| w == 0), "cleared on every member");
        writes += s.data_writes;
        clears += s.clears;
    }
    eprintln!(
        "{level:?}: {writes} member data writes, {clears} bit clears, {} bitmap writes, no rule broken",
        b.writes.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert!(writes > 200 && clears > 20, "the race needs exercising");
    reactors.shutdown().unwrap();
}

#[test]
fn raid5_writes_reach_members_only_under_a_bit_already_on_them() {
    run(Level::Raid5, 4);
}

#[test]
fn raid1_writes_reach_members_only_under_a_bit_already_on_them() {
    run(Level::Raid1, 2);
}

/// Where the mirror of [`fault_mirror`] keeps its data on each member.
const MIRROR_OFFSET: u64 = 256;

/// A mirror of two RAM members behind fault devices, on one reactor, with
/// a bitmap of `bitmap_chunk_bytes` regions (0: none); created, not
/// opened.
fn fault_mirror(
    bitmap_chunk_bytes: u64,
) -> (Reactors, Vec<Arc<bdev::FaultDevice>>, Volume, Monitor) {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let faults: Vec<Arc<bdev::FaultDevice>> = (0..2)
        .map(|i| {
            let ram: Arc<dyn BlockDevice> =
                Arc::new(RamDevice::new(&format!("m{i}"), BS as u32, 1024).unwrap());
            Arc::new(bdev::FaultDevice::new(ram))
        })
        .collect();
    let spec = VolumeSpec {
        name: "bm".into(),
        level: Level::Raid1,
        layout: Layout::LeftSymmetric,
        chunk_bytes: 16 << 10,
        data_offset: MIRROR_OFFSET,
        members: faults
            .iter()
            .map(|f| f.clone() as Arc<dyn BlockDevice>)
            .collect(),
        bitmap_chunk_bytes,
        zeroed: true,
    };
    let (tx, rx) = mpsc::channel();
    let (dev, meta) = assembly::create(&spec, FailureSink::new(tx), false).unwrap();
    let volume = Volume::new(reactors.set(), "bm", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    monitor.set_meta(meta);
    (reactors, faults, volume, monitor)
}

/// From an audit: a member that could not take a bitmap update was only
/// warned about and stayed in sync, and the writes went on under a bit
/// it never got (md, importing the array, may read that member's bitmap;
/// the union misses the bit once the member that took it is lost). It is
/// failed now, as md fails it, and its regions stay dirty for a re-add.
#[test]
fn a_member_that_cannot_take_the_bitmap_is_failed() {
    use appliance::raid::members::MemberState;
    let offset = MIRROR_OFFSET;
    let (reactors, faults, volume, monitor) = fault_mirror(256 << 10);
    assert!(monitor.open(true).unwrap().is_none());
    // m1's bitmap blocks refuse writes (its superblock still takes them).
    faults[1]
        .control()
        .fail_writes(bitmap::BYTE_OFFSET / BS, offset);
    let t = Duration::from_secs(30);
    volume
        .io(IoOp::Write, 40, vec![0x42; BS as usize], t)
        .expect("m0 takes the write");
    let start = Instant::now();
    while monitor.member_states()[1] != MemberState::Failed {
        assert!(start.elapsed() < t, "m1 stayed in sync without its bit");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(monitor.member_states()[0], MemberState::InSync);
    reactors.shutdown().unwrap();
}

/// From an audit: bitmap updates still went to a member reported gone,
/// until the change recording its failure published. A device that
/// failed a write and then hung held the bitmap's batch, every write
/// waiting for its bit, and so the failure's own suspend, for the metadata
/// IO's bound (30 s). A member reported gone is skipped now.
#[test]
fn bitmap_updates_skip_a_member_reported_gone() {
    use appliance::raid::members::MemberState;
    let bitmap_block = bitmap::BYTE_OFFSET / BS;
    let (reactors, faults, volume, monitor) = fault_mirror(256 << 10);
    assert!(monitor.open(true).unwrap().is_none());
    let t = Duration::from_secs(60);
    let dev = monitor.device();
    // Region 0's bit on both members, kept there (a region is 256 rows of
    // one block here, 1 MiB).
    let b = dev.member_set().bitmap.clone().expect("a bitmap");
    b.set_clear_every(Duration::from_secs(3600));
    volume
        .io(IoOp::Write, 0, vec![0x11; BS as usize], t)
        .expect("first write");
    // The daemon's next batch (for a write to region 1) waits on m0.
    faults[0]
        .control()
        .hold(Some(IoOp::Write), bitmap_block, bitmap_block + 1, 1);
    let waiting = {
        let volume = volume.clone();
        std::thread::spawn(move || volume.io(IoOp::Write, 256, vec![0x22; BS as usize], t))
    };
    assert!(faults[0].control().wait_held(1, t), "no bitmap batch began");
    // m1 fails a write to region 0 (its bit is on disk: no batch), and is
    // reported gone; from now on it hangs on its bitmap block. The write
    // goes through a channel of its own: on the reactor's it would queue
    // behind the one waiting for its bit.
    faults[1]
        .control()
        .fail_writes(MIRROR_OFFSET, MIRROR_OFFSET + 64);
    let mut ch = dev.open_channel().unwrap();
    let mut data = vec![0x33u8; BS as usize];
    ch.submit(bdev::conformance::rw(IoOp::Write, 0, 1, &mut data, 7))
        .unwrap();
    let mut out = Vec::new();
    let start = Instant::now();
    while !dev.member_set().members[1].is_gone() {
        assert!(start.elapsed() < t, "m1 was not reported gone");
        ch.poll(&mut out);
    }
    faults[1]
        .control()
        .hold(Some(IoOp::Write), bitmap_block, bitmap_block + 1, 100);
    faults[0].control().release();
    waiting
        .join()
        .unwrap()
        .expect("the write waiting for its bit goes on");
    while out.is_empty() {
        assert!(start.elapsed() < t, "the failing write was not answered");
        ch.poll(&mut out);
    }
    assert!(out[0].result.is_ok(), "m0 took the write: {:?}", out[0]);
    assert_eq!(
        faults[1].control().held(),
        0,
        "a bitmap update went to the member reported gone"
    );
    let start = Instant::now();
    while monitor.member_states()[1] != MemberState::Failed {
        assert!(start.elapsed() < t, "m1's failure was not recorded");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(monitor.member_states()[0], MemberState::InSync);
    faults[1].control().release();
    reactors.shutdown().unwrap();
}

/// From an audit: a bitmap added while a resync was owed (an unclean
/// start's, here cut short by the operator) narrowed it to the regions
/// marked since, which do not mark what the crash tore; the volume was
/// then recorded clean and the torn rows never resynchronised. Refused
/// while a resync runs or is owed, as md refuses.
#[test]
fn no_bitmap_is_added_while_a_resync_is_running_or_owed() {
    refused_while_a_resync_runs_or_is_owed(|m| m.set_bitmap(Some(256 << 10)));
}

/// From an audit: a takeover with a resync owed kept the reads pinned to
/// the first member, whose blocks in a RAID5 of two are parity in every
/// other stripe (what the guest read changed with no write), and the
/// resync's cursor, counted in the old level's rows, resumed far past
/// rows it had not done.
#[test]
fn no_takeover_while_a_resync_is_running_or_owed() {
    refused_while_a_resync_runs_or_is_owed(|m| m.takeover(Level::Raid5, 16 << 10));
}

/// `change` is refused while an unclean start's resync runs and once it
/// is cut short (still owed), and goes through after a whole repair.
fn refused_while_a_resync_runs_or_is_owed(
    change: impl Fn(&Monitor) -> Result<(), appliance::raid::monitor::OpError>,
) {
    use appliance::raid::monitor::OpError;
    let (reactors, faults, _volume, monitor) = fault_mirror(0);
    // The resync's first read waits for the test.
    let c0 = faults[0].control();
    c0.hold(Some(IoOp::Read), MIRROR_OFFSET, u64::MAX, 1);
    let resync = monitor
        .open(false)
        .unwrap()
        .expect("an unclean start resyncs");
    assert!(c0.wait_held(1, Duration::from_secs(30)));
    let refused = |m: &Monitor| matches!(change(m), Err(OpError::FailedPrecondition(_)));
    assert!(refused(&monitor), "made under a running resync");
    // Cut short: still owed.
    resync
        .cancel
        .store(true, std::sync::atomic::Ordering::SeqCst);
    c0.release();
    let t = Instant::now();
    while !resync.is_finished() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the resync never stopped"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(refused(&monitor), "made with a resync owed");
    assert!(monitor.device().member_set().bitmap.is_none());
    assert!(monitor.device().parity_geometry().is_none());
    // A finished resync: the change may come.
    let full = monitor.scrub(true).unwrap();
    let t = Instant::now();
    while !full.is_finished() || !monitor.snapshot().settled() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the repair never ended"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(full.error(), None);
    change(&monitor).unwrap();
    reactors.shutdown().unwrap();
}
