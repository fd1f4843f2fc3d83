//! RAID5 across power cuts. Every member has a volatile write cache and
//! loses what it had not flushed, each on its own: one member may have
//! drained its cache while another had not, which tears stripes (the RAID5
//! write hole). After the cut the volume is assembled from its superblocks,
//! which say the shutdown was unclean, and resynchronised. Then every block
//! holds its last flushed value or a value written after that flush, never
//! anything else, and a check scrub finds parity consistent.

mod common;

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::raid::assembly::{self, VolumeSpec};
use appliance::raid::geometry::Layout;
use appliance::raid::journal::JournalMode;
use appliance::raid::members::FailureSink;
use appliance::raid::monitor::Monitor;
use appliance::raid::rebuild::RebuildProgress;
use appliance::raid::superblock::Level;
use appliance::volume::Volume;
use bdev::conformance::{run_one, rw};
use bdev::{BlockDevice, IoOp, IoRequest, RamDevice};
use poller::{ReactorConfig, Reactors};
use rand::{Rng, SeedableRng};

const BS: usize = 4096;

/// Rounds of a crash test: `default` in the suite; `CRASH_ROUNDS=N` for a
/// long run (`cargo nextest run --release -p appliance --test raid_crash`).
fn rounds(default: u64) -> u64 {
    std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The bytes of `block` written by write number `tag` (0: never written).
fn content(tag: u64, block: u64) -> Vec<u8> {
    if tag == 0 {
        return vec![0; BS];
    }
    let mut v = vec![0u8; BS];
    for (i, x) in v.iter_mut().enumerate() {
        *x = (tag.wrapping_mul(131) ^ block.wrapping_mul(7) ^ i as u64 >> 3) as u8 | 1;
    }
    v
}

/// A random schedule of writes and flushes on `dev`, then some members
/// drain their caches on their own. Returns, per block, the write tag
/// that is durable (0: never written) and the tags written after it.
fn schedule(
    dev: &dyn BlockDevice,
    members: &[Arc<dyn BlockDevice>],
    rng: &mut rand::rngs::SmallRng,
) -> (Vec<u64>, Vec<Vec<u64>>) {
    let blocks = dev.info().num_blocks;
    let mut durable = vec![0u64; blocks as usize];
    let mut since: Vec<Vec<u64>> = vec![Vec::new(); blocks as usize];
    let mut ch = dev.open_channel().unwrap();
    let mut tag = 0;
    for _ in 0..rng.gen_range(10..120) {
        if rng.gen_bool(0.1) {
            run_one(ch.as_mut(), IoRequest::flush(1)).unwrap();
            for (d, s) in durable.iter_mut().zip(since.iter_mut()) {
                if let Some(&last) = s.last() {
                    *d = last;
                }
                s.clear();
            }
            continue;
        }
        tag += 1;
        let len = rng.gen_range(1..=8u64).min(blocks);
        let lba = rng.gen_range(0..=blocks - len);
        let mut buf: Vec<u8> = (lba..lba + len).flat_map(|b| content(tag, b)).collect();
        run_one(ch.as_mut(), rw(IoOp::Write, lba, len, &mut buf, 2)).unwrap();
        for b in lba..lba + len {
            since[b as usize].push(tag);
        }
    }
    drop(ch);
    for m in members {
        if rng.gen_bool(0.5) {
            let mut c = m.open_channel().unwrap();
            run_one(c.as_mut(), IoRequest::flush(3)).unwrap();
        }
    }
    (durable, since)
}

fn wait(p: &RebuildProgress) {
    let t = Instant::now();
    while !p.is_finished() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "scrub did not finish"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(p.error(), None);
}

/// What one power-cut round showed.
struct Round {
    /// Some stripe was torn before the resync.
    torn: bool,
    /// Bytes the resync read per member (0 when none was needed).
    resync_bytes: u64,
    /// Bytes a whole-volume resync reads per member.
    full_bytes: u64,
}

/// One round: a RAID5 of volatile members (with a write-intent bitmap of
/// one stripe per bit, cleared as fast as it can be, if `bitmap`) takes a
/// random schedule, loses power, is assembled, resynchronised, read back
/// and checked.
fn power_cut_round(reactors: &Reactors, round: u64, bitmap: bool) -> Round {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(round);
    let n = 3 + (round % 3) as usize;
    let chunk = 4096u32 << (round % 3);
    // Room for md's superblock (block 1), and the bitmap block after it.
    let offset = 2 + bitmap as u64;
    let members: Vec<Arc<dyn BlockDevice>> = (0..n)
        .map(|i| {
            Arc::new(RamDevice::with_volatile_cache(&format!("m{i}"), 4096, offset + 48).unwrap())
                as Arc<dyn BlockDevice>
        })
        .collect();
    let spec = VolumeSpec {
        name: format!("crash{round}"),
        level: Level::Raid5,
        layout: Layout::LeftSymmetric,
        chunk_bytes: chunk,
        data_offset: offset,
        members: members.clone(),
        bitmap_chunk_bytes: bitmap as u64,
        zeroed: true,
    };
    let (tx, rx) = mpsc::channel();
    let (dev, meta) = assembly::create(&spec, FailureSink::new(tx), false).unwrap();
    if let Some(b) = &dev.member_set().bitmap {
        // Odd rounds: bits come and go during the schedule, clearing races
        // writes (and its member flushes leave few torn stripes). Even
        // rounds: bits are only set.
        b.set_clear_every(Duration::from_millis(if round % 2 == 1 {
            1
        } else {
            60_000
        }));
    }
    // In service: the superblocks say "dirty" until a clean stop.
    let volume = Volume::new(reactors.set(), &spec.name, dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev.clone(), rx, vec![]);
    monitor.set_meta(meta);
    assert!(monitor.open(true).unwrap().is_none());

    let blocks = dev.info().num_blocks;
    let (durable, since) = schedule(&*dev, &members, &mut rng);
    if let Some(b) = &dev.member_set().bitmap {
        // The cut comes now, not after the time the monitor takes to stop
        // (the daemon would clear every bit meanwhile).
        b.set_clear_every(Duration::from_secs(3600));
    }
    drop(monitor);
    drop(volume);
    drop(dev);
    for m in &members {
        m.power_cut().unwrap();
    }

    // Power on: assemble, notice the unclean stop, resynchronise.
    let (tx, rx) = mpsc::channel();
    let mut report = assembly::assemble(&members, |_| FailureSink::new(tx.clone()));
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.volumes.len(), 1);
    let v = report.volumes.remove(0);
    assert!(!v.was_clean, "round {round}: the crash must be noticed");
    assert_eq!(v.device.member_set().bitmap.is_some(), bitmap);
    let dev = v.device.clone();
    let data_bytes = BS * blocks as usize / (n - 1);
    let torn = {
        // Count torn stripes, to show the test reaches the write hole.
        let mut acc = vec![0u8; data_bytes];
        for m in &members {
            let mut c = m.open_channel().unwrap();
            let mut buf = vec![0u8; acc.len()];
            run_one(
                c.as_mut(),
                rw(IoOp::Read, offset, (acc.len() / BS) as u64, &mut buf, 4),
            )
            .unwrap();
            acc.iter_mut().zip(buf).for_each(|(a, b)| *a ^= b);
        }
        acc.iter().any(|&b| b != 0)
    };
    let volume = Volume::new(reactors.set(), &spec.name, dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev.clone(), rx, vec![]);
    monitor.set_meta(v.meta);
    let resync = monitor.open(v.was_clean).unwrap();
    assert!(
        resync.is_some() || bitmap,
        "round {round}: without a bitmap the whole volume is resynchronised"
    );
    if let Some(r) = &resync {
        wait(r);
    }

    let mut ch = dev.open_channel().unwrap();
    let mut got = vec![0u8; BS * blocks as usize];
    run_one(ch.as_mut(), rw(IoOp::Read, 0, blocks, &mut got, 5)).unwrap();
    let mut cache: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    for b in 0..blocks {
        let have = &got[b as usize * BS..(b as usize + 1) * BS];
        let allowed: Vec<u64> = std::iter::once(durable[b as usize])
            .chain(since[b as usize].iter().copied())
            .collect();
        assert!(
            allowed
                .iter()
                .any(|&t| cache.entry((t, b)).or_insert_with(|| content(t, b)) == have),
            "round {round}: block {b} holds neither its flushed value nor a later write (allowed tags {allowed:?})"
        );
    }
    let check = monitor.scrub(false).unwrap();
    wait(&check);
    assert_eq!(
        check.mismatches.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "round {round}: parity inconsistent after the resync (bitmap: {bitmap})"
    );
    monitor.close().unwrap();
    Round {
        torn,
        resync_bytes: resync.map_or(0, |r| r.bytes.load(std::sync::atomic::Ordering::SeqCst)),
        full_bytes: data_bytes as u64,
    }
}

#[test]
fn after_a_power_cut_and_resync_every_block_is_old_or_new_and_parity_is_consistent() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let mut torn_rounds = 0;
    let n = rounds(200);
    for round in 0..n {
        let r = power_cut_round(&reactors, round, false);
        assert_eq!(
            r.resync_bytes, r.full_bytes,
            "the whole volume is resynchronised"
        );
        torn_rounds += r.torn as u32;
    }
    eprintln!("{torn_rounds} of {n} rounds had torn stripes before the resync");
    // Without torn stripes the test would prove nothing about the write hole.
    assert!(torn_rounds > 0, "no round tore a stripe");
    reactors.shutdown().unwrap();
}

/// The same with a write-intent bitmap: the resync covers only the
/// stripes it marks, and that is enough: every torn stripe was marked.
#[test]
fn with_a_write_intent_bitmap_resyncing_the_marked_stripes_alone_repairs_every_tear() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let (mut torn_rounds, mut partial, mut resynced, mut full) = (0, 0, 0, 0);
    let n = rounds(200);
    for round in 0..n {
        let r = power_cut_round(&reactors, round, true);
        torn_rounds += r.torn as u32;
        partial += (r.resync_bytes < r.full_bytes) as u32;
        resynced += r.resync_bytes;
        full += r.full_bytes;
    }
    eprintln!(
        "{torn_rounds} of {n} rounds had torn stripes; {partial} resyncs covered less than the whole volume; {resynced} of {full} bytes resynchronised"
    );
    assert!(torn_rounds > 0, "no round tore a stripe");
    assert!(partial > 0, "the bitmap never narrowed a resync");
    reactors.shutdown().unwrap();
}

/// One schedule of random writes and flushes on a RAID5 of volatile
/// members (and a journal in `mode`, if given), a power cut with some
/// members having drained their caches, then a member lost for good.
/// Returns how many blocks read back (degraded, after journal replay) hold
/// neither their flushed value nor a later write; in write-back mode, how
/// many do not hold their last acknowledged write (acknowledged means
/// durable there).
fn cut_and_lose_a_member(round: u64, mode: Option<JournalMode>) -> (usize, usize, u64) {
    cut_lose_and_cut_replay(round, mode, None, false).0
}

/// Devices that lose power together after a budget of writes: every
/// request after it fails, as if the machine had stopped there.
struct Budget(std::sync::atomic::AtomicI64);

struct Cuttable {
    inner: Arc<dyn BlockDevice>,
    budget: Arc<Budget>,
}

struct CuttableChannel {
    inner: Box<dyn bdev::IoChannel>,
    budget: Arc<Budget>,
    failed: Vec<bdev::Completion>,
}

impl BlockDevice for Cuttable {
    fn info(&self) -> &bdev::DeviceInfo {
        self.inner.info()
    }
    fn open_channel(&self) -> Result<Box<dyn bdev::IoChannel>, bdev::BdevError> {
        Ok(Box::new(CuttableChannel {
            inner: self.inner.open_channel()?,
            budget: self.budget.clone(),
            failed: Vec::new(),
        }))
    }
}

impl bdev::IoChannel for CuttableChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), bdev::SubmitError> {
        let writes = matches!(req.op, IoOp::Write | IoOp::Flush);
        if writes
            && self
                .budget
                .0
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
                <= 0
        {
            self.failed.push(bdev::Completion {
                tag: req.tag,
                result: Err(bdev::IoError::DeviceFailed),
            });
            return Ok(());
        }
        self.inner.submit(req)
    }
    fn poll(&mut self, out: &mut Vec<bdev::Completion>) -> usize {
        let n = self.failed.len();
        out.append(&mut self.failed);
        n + self.inner.poll(out)
    }
    fn inflight(&self) -> usize {
        self.failed.len() + self.inner.inflight()
    }
}

/// As `cut_and_lose_a_member`; with `replay_cut`, the first replay loses
/// power after that many writes and flushes (members and journal alike),
/// the unflushed part of what it wrote is lost, and a second replay runs.
/// Also returns whether the first replay was cut. With `healthy_first`
/// the member is lost only after that first replay (which ran with all).
fn cut_lose_and_cut_replay(
    round: u64,
    mode: Option<JournalMode>,
    replay_cut: Option<i64>,
    healthy_first: bool,
) -> ((usize, usize, u64), bool) {
    use appliance::raid::journal::Journal;
    use appliance::raid::members::{Member, MemberState};
    use appliance::raid::raid5::Raid5Device;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(round);
    let n = 3 + (round % 3) as usize;
    let chunk = 4096u32 << (round % 3);
    let volatile = |name: String, blocks| {
        Arc::new(RamDevice::with_volatile_cache(&name, 4096, blocks).unwrap())
            as Arc<dyn BlockDevice>
    };
    let members: Vec<Arc<dyn BlockDevice>> =
        (0..n).map(|i| volatile(format!("m{i}"), 48)).collect();
    // Write-back gets a small log (cache limits 32 and 64 blocks), so
    // reclaim, back-pressure and checkpoints all happen in a schedule.
    let log = if mode == Some(JournalMode::WriteBack) {
        1024
    } else {
        2048
    };
    let jdev = volatile("journal".into(), 1 + log);
    let build = |slots: &[Option<Arc<dyn BlockDevice>>]| {
        Raid5Device::new(
            "r5",
            slots
                .iter()
                .enumerate()
                .map(|(i, d)| Member {
                    dev: d.clone().unwrap_or_else(|| members[(i + 1) % n].clone()),
                    state: if d.is_some() {
                        MemberState::InSync
                    } else {
                        MemberState::Failed
                    },
                    write_mostly: false,
                    gone: Default::default(),
                    errors: Default::default(),
                    readd: false,
                })
                .collect(),
            chunk,
            Layout::LeftSymmetric,
            0,
            FailureSink::none(),
        )
        .unwrap()
    };
    let all: Vec<Option<Arc<dyn BlockDevice>>> = members.iter().cloned().map(Some).collect();
    let mut dev = build(&all);
    let journal = mode.map(|m| Journal::format_with(jdev.clone(), m).unwrap());
    if let Some(j) = &journal {
        dev = dev.with_journal(j.clone());
    }
    let dev = Arc::new(dev);
    let geo = *dev.geometry();
    let blocks = dev.info().num_blocks;
    // Checkpoints as the daemon's checkpointer takes them: the small log
    // fills many times over in write-back (reclaim rides on the writes).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checkpointer = journal
        .clone()
        .map(|j| common::checkpoint_until(dev.clone(), j, stop.clone()));
    let (mut durable, since) = schedule(dev.as_ref(), &members, &mut rng);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let checkpoints = checkpointer.map_or(0, |t| t.join().unwrap());
    let cached = journal.as_ref().map(|j| j.cache()).map_or(0, |c| c.len());
    drop(dev);
    let acked_is_durable = mode == Some(JournalMode::WriteBack);
    if acked_is_durable {
        for (d, s) in durable.iter_mut().zip(&since) {
            if let Some(&last) = s.last() {
                *d = last;
            }
        }
    }
    for d in members.iter().chain([&jdev]) {
        d.power_cut().unwrap();
    }
    // A member is gone for good; the others come back.
    let lost = rng.gen_range(0..n);
    let mut slots = all.clone();
    slots[lost] = None;
    let mut cut = false;
    if let (Some(k), Some(_)) = (replay_cut, mode) {
        let budget = Arc::new(Budget(std::sync::atomic::AtomicI64::new(k)));
        let wrap = |d: &Arc<dyn BlockDevice>| {
            Arc::new(Cuttable {
                inner: d.clone(),
                budget: budget.clone(),
            }) as Arc<dyn BlockDevice>
        };
        let first = if healthy_first { &all } else { &slots };
        let cut_slots: Vec<Option<Arc<dyn BlockDevice>>> =
            first.iter().map(|d| d.as_ref().map(wrap)).collect();
        cut = Journal::replay(wrap(&jdev), &cut_slots, Some(&geo)).is_err();
        // Some devices had drained their caches on their own by then: part
        // of the replay's writes is durable, part lost.
        for d in members.iter().chain([&jdev]) {
            if rng.gen_bool(0.5) {
                let mut c = d.open_channel().unwrap();
                run_one(c.as_mut(), IoRequest::flush(9)).unwrap();
            }
            d.power_cut().unwrap();
        }
    }
    if mode.is_some() {
        Journal::replay(jdev.clone(), &slots, Some(&geo)).unwrap();
    }
    let dev = build(&slots);
    let mut ch = dev.open_channel().unwrap();
    let mut got = vec![0u8; BS * blocks as usize];
    run_one(ch.as_mut(), rw(IoOp::Read, 0, blocks, &mut got, 5)).unwrap();
    let bad = (0..blocks)
        .filter(|&b| {
            let have = &got[b as usize * BS..(b as usize + 1) * BS];
            let later = if acked_is_durable {
                &[][..]
            } else {
                &since[b as usize][..]
            };
            !std::iter::once(durable[b as usize])
                .chain(later.iter().copied())
                .any(|t| content(t, b) == have)
        })
        .count();
    ((bad, checkpoints, cached), cut)
}

#[test]
fn the_write_journal_closes_the_write_hole_when_a_member_is_lost_after_a_crash() {
    let (mut with, mut back, mut without) = (0, 0, 0);
    let (mut checkpoints, mut cached) = (0, 0);
    for round in 0..rounds(150) {
        with += cut_and_lose_a_member(round, Some(JournalMode::WriteThrough)).0;
        let (bad, c, left) = cut_and_lose_a_member(round, Some(JournalMode::WriteBack));
        (back, checkpoints, cached) = (back + bad, checkpoints + c, cached + left);
        without += cut_and_lose_a_member(round, None).0;
    }
    eprintln!(
        "write-back: {checkpoints} checkpoints (each reclaimed its epoch); {cached} blocks in the caches at the cuts"
    );
    assert!(
        checkpoints > 0 && cached > 0,
        "write-back reclaim and replay both need exercising"
    );
    eprintln!(
        "blocks corrupted after crash + member loss: {without} without the journal, {with} with a write-through one, {back} with a write-back one"
    );
    // The same schedules without the journal show the hole is real.
    assert!(without > 0, "no schedule reached the write hole");
    assert_eq!(with, 0, "the journal must leave every block old or new");
    assert_eq!(
        back, 0,
        "write-back must keep every acknowledged write across the crash"
    );
}

/// Replay is idempotent: a power cut at any point of it, then a second
/// replay, leaves the same guarantees as one replay (write-through: every
/// block old or new; write-back: every acknowledged write), with a member
/// lost for good as well.
#[test]
fn a_power_cut_during_replay_then_a_second_replay_loses_nothing() {
    let (mut cuts, mut bad_wt, mut bad_wb) = (0u64, 0, 0);
    let n = rounds(150);
    for round in 0..n {
        // Early cuts, and cuts spread over long replays (some finish).
        let k = if round % 2 == 0 {
            (round * 7) % 50
        } else {
            (round * 37) % 700
        };
        let ((bad, _, _), cut) = cut_lose_and_cut_replay(
            round,
            Some(JournalMode::WriteThrough),
            Some(k as i64),
            false,
        );
        bad_wt += bad;
        cuts += cut as u64;
        let ((bad, _, _), cut) =
            cut_lose_and_cut_replay(round, Some(JournalMode::WriteBack), Some(k as i64), false);
        bad_wb += bad;
        cuts += cut as u64;
    }
    eprintln!(
        "{cuts} of {} replays cut; blocks lost: {bad_wt} write-through, {bad_wb} write-back",
        2 * n
    );
    assert!(
        (n..2 * n).contains(&cuts),
        "the cuts must land inside the replays, and not always"
    );
    assert_eq!(
        bad_wt, 0,
        "write-through: every block old or new after a cut replay"
    );
    assert_eq!(
        bad_wb, 0,
        "write-back: every acknowledged write kept after a cut replay"
    );
}

/// From an audit: a replay with every member there wrote write-back data
/// and its parity straight to the members; a power cut in it, then a start
/// with a member gone, replayed the same records by read-modify-write over
/// rows whose data was new and parity old, and the lost member's blocks of
/// those rows came back wrong. Replay results are logged before they go
/// to the members, whatever the members.
#[test]
fn a_power_cut_during_a_healthy_replay_then_a_degraded_one_loses_nothing() {
    let (mut cuts, mut bad) = (0u64, 0);
    let n = rounds(60);
    for round in 0..n {
        let k = if round % 2 == 0 {
            (round * 7) % 50
        } else {
            (round * 37) % 700
        };
        let ((b, _, _), cut) =
            cut_lose_and_cut_replay(round, Some(JournalMode::WriteBack), Some(k as i64), true);
        bad += b;
        cuts += cut as u64;
    }
    eprintln!("{cuts} of {n} replays cut; blocks lost: {bad}");
    assert!(cuts > 0, "the cuts must land inside the replays");
    assert_eq!(bad, 0, "every acknowledged write kept after a cut replay");
}

/// From an audit: a clean stop recorded "clean" member by member (each
/// superblock then that member's flush) without flushing the members
/// first. A power cut between two records left a member a step behind,
/// taken as current, its cache lost: a stripe written before the stop
/// came back torn under a "clean" volume, never resynchronised. The
/// members are flushed before any superblock says clean.
#[test]
fn a_power_cut_during_a_clean_stop_leaves_no_stripe_torn() {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let raw: Vec<Arc<dyn BlockDevice>> = (0..3)
        .map(|i| {
            Arc::new(RamDevice::with_volatile_cache(&format!("m{i}"), 4096, 2 + 48).unwrap())
                as Arc<dyn BlockDevice>
        })
        .collect();
    let (faults, members) = common::behind_faults(&raw);
    let spec = VolumeSpec {
        data_offset: 2,
        chunk_bytes: 4096,
        ..VolumeSpec::new("stop", Level::Raid5, members)
    };
    let (tx, rx) = mpsc::channel();
    let (dev, meta) = assembly::create(&spec, FailureSink::new(tx), false).unwrap();
    let volume = Volume::new(reactors.set(), "stop", dev.clone());
    let monitor = Arc::new(Monitor::start(
        reactors.set(),
        volume.clone(),
        dev.clone(),
        rx,
        vec![],
    ));
    monitor.set_meta(meta);
    assert!(monitor.open(true).unwrap().is_none());
    // A row written (data on m0, parity on m2), in the caches only.
    let mut ch = dev.open_channel().unwrap();
    let mut data = vec![0x3cu8; BS];
    run_one(ch.as_mut(), rw(IoOp::Write, 0, 1, &mut data, 1)).unwrap();
    drop(ch);
    // The stop's record reaches m0 and m1; the power goes before m2's.
    faults[2].control().hold(Some(IoOp::Write), 1, 2, 1);
    let m = monitor.clone();
    let stop = std::thread::spawn(move || m.close());
    assert!(faults[2].control().wait_held(1, Duration::from_secs(30)));
    // The disks as the cut leaves them.
    let disks: Vec<Arc<dyn BlockDevice>> = raw
        .iter()
        .enumerate()
        .map(|(i, d)| {
            d.power_cut().unwrap();
            let n = d.info().num_blocks;
            let mut all = vec![0u8; n as usize * BS];
            run_one(
                d.open_channel().unwrap().as_mut(),
                rw(IoOp::Read, 0, n, &mut all, 2),
            )
            .unwrap();
            let copy = RamDevice::new(&format!("m{i}"), 4096, n).unwrap();
            run_one(
                copy.open_channel().unwrap().as_mut(),
                rw(IoOp::Write, 0, n, &mut all, 3),
            )
            .unwrap();
            Arc::new(copy) as Arc<dyn BlockDevice>
        })
        .collect();
    faults[2].control().release();
    let _ = stop.join();
    // Row 0 of the data area: data, data, parity.
    let mut acc = vec![0u8; BS];
    for d in &disks {
        let mut b = vec![0u8; BS];
        run_one(
            d.open_channel().unwrap().as_mut(),
            rw(IoOp::Read, 2, 1, &mut b, 4),
        )
        .unwrap();
        acc.iter_mut().zip(b).for_each(|(a, b)| *a ^= b);
    }
    assert!(acc.iter().all(|&b| b == 0), "row 0 is torn");
    let report = assembly::assemble(&disks, |_| FailureSink::none());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    drop(monitor);
    drop(volume);
    reactors.shutdown().unwrap();
}

/// From review: a member that could not flush at a clean stop left the
/// volume dirty, but recorded the finished resync's end as where the next
/// one goes on: nothing was resynchronised. It goes on from the start.
#[test]
fn a_clean_stop_whose_flush_fails_owes_a_whole_resync() {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let raw: Vec<Arc<dyn BlockDevice>> = (0..3)
        .map(|i| Arc::new(RamDevice::new(&format!("m{i}"), 4096, 2 + 48).unwrap()) as _)
        .collect();
    let (faults, members) = common::behind_faults(&raw);
    let spec = VolumeSpec {
        data_offset: 2,
        chunk_bytes: 4096,
        // Owes its initial sync: a resync runs, and ends, in this run.
        zeroed: false,
        ..VolumeSpec::new("stop", Level::Raid5, members.clone())
    };
    let (tx, rx) = mpsc::channel();
    let (dev, meta) = assembly::create(&spec, FailureSink::new(tx), false).unwrap();
    let volume = Volume::new(reactors.set(), "stop", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev.clone(), rx, vec![]);
    monitor.set_meta(meta);
    let resync = monitor.open(false).unwrap().expect("the initial sync");
    let t = Instant::now();
    while !resync.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(5));
    }
    faults[2].control().fail_flushes(1);
    monitor.close().unwrap();
    let mut report = assembly::assemble(&members, |_| FailureSink::none());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let v = report.volumes.remove(0);
    assert!(!v.was_clean);
    assert_eq!(v.meta.template.resync_from, 0);
    // And the member that could not flush is not taken for in sync (nor
    // as the reference a resync copies).
    assert_ne!(
        v.device.member_states()[2],
        appliance::raid::members::MemberState::InSync
    );
    drop(monitor);
    drop(volume);
    reactors.shutdown().unwrap();
}
