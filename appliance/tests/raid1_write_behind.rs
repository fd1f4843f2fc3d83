//! md's write-behind on a RAID1: a write is acknowledged once the members
//! that are not write-mostly have it, and reaches the slow write-mostly
//! member in the background, never more at once than the limit. A read
//! that only the write-mostly member can serve waits for those writes, a
//! member change waits for them, and turning it off drains them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::raid::assembly::{self, VolumeSpec};
use appliance::raid::geometry::Layout;
use appliance::raid::members::{FailureSink, MemberState};
use appliance::raid::monitor::Monitor;
use appliance::raid::superblock::Level;
use appliance::volume::Volume;
use bdev::conformance::{run_one, rw};
use bdev::{
    BdevError, BlockDevice, Completion, DeviceInfo, FaultDevice, IoChannel, IoOp, IoRequest,
    RamDevice, SubmitError,
};
use poller::{PollState, ReactorConfig, Reactors};

const OFFSET: u64 = 256;

/// A member that holds every write until the test opens it (reads go
/// through at once): a write-mostly member slow to take writes, where the
/// test sees exactly which writes it has.
struct Gate {
    inner: Arc<dyn BlockDevice>,
    open: Arc<AtomicBool>,
    /// Writes it holds before its queue is full (Busy).
    room: Arc<AtomicUsize>,
}

struct GateChannel {
    inner: Box<dyn IoChannel>,
    open: Arc<AtomicBool>,
    room: Arc<AtomicUsize>,
    held: Vec<IoRequest>,
}

impl BlockDevice for Gate {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(GateChannel {
            inner: self.inner.open_channel()?,
            open: self.open.clone(),
            room: self.room.clone(),
            held: Vec::new(),
        }))
    }
}

impl IoChannel for GateChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if req.op != IoOp::Read && !self.open.load(Ordering::SeqCst) {
            if self.held.len() >= self.room.load(Ordering::SeqCst) {
                return Err(SubmitError::Busy(req));
            }
            self.held.push(req);
            return Ok(());
        }
        self.inner.submit(req)
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        if self.open.load(Ordering::SeqCst) {
            for r in self.held.drain(..) {
                // The RAM device under it never refuses.
                let _ = self.inner.submit(r);
            }
        }
        self.inner.poll(out)
    }

    fn inflight(&self) -> usize {
        self.inner.inflight() + self.held.len()
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect()
}

/// Poll `ch` until request `tag` completes; every completion seen.
fn wait_for(ch: &mut dyn IoChannel, tag: u64) -> Completion {
    let t = Instant::now();
    let mut out = Vec::new();
    loop {
        ch.poll(&mut out);
        if let Some(i) = out.iter().position(|c| c.tag == tag) {
            return out.swap_remove(i);
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "request {tag} never completed"
        );
        std::thread::yield_now();
    }
}

#[test]
fn writes_reach_a_write_mostly_member_in_the_background_up_to_the_limit() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let raw: Vec<Arc<dyn BlockDevice>> = (0..2)
        .map(|i| {
            Arc::new(RamDevice::new(&format!("m{i}"), 4096, OFFSET + 4096).unwrap())
                as Arc<dyn BlockDevice>
        })
        .collect();
    let m0 = Arc::new(FaultDevice::new(raw[0].clone()));
    let open = Arc::new(AtomicBool::new(true));
    let room = Arc::new(AtomicUsize::new(usize::MAX));
    let m1: Arc<dyn BlockDevice> = Arc::new(Gate {
        inner: raw[1].clone(),
        open: open.clone(),
        room: room.clone(),
    });
    let (tx, rx) = mpsc::channel();
    let spec = |bitmap: u64| VolumeSpec {
        name: "wb".into(),
        level: Level::Raid1,
        layout: Layout::LeftSymmetric,
        chunk_bytes: 64 << 10,
        data_offset: OFFSET,
        members: vec![m0.clone() as Arc<dyn BlockDevice>, m1.clone()],
        bitmap_chunk_bytes: bitmap,
        zeroed: true,
    };
    // Without a bitmap write-behind is refused (a crash must leave the
    // regions of background writes marked).
    {
        let (dev, meta) = assembly::create(&spec(0), FailureSink::none(), true).unwrap();
        let volume = Volume::new(reactors.set(), "wb", dev.clone());
        let (_t, r) = mpsc::channel();
        let monitor = Monitor::start(reactors.set(), volume, dev, r, vec![]);
        monitor.set_meta(meta);
        assert!(monitor.set_write_behind(4).is_err());
    }
    let (dev, meta) = assembly::create(&spec(1 << 20), FailureSink::new(tx), true).unwrap();
    let volume = Volume::new(reactors.set(), "wb", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    monitor.set_meta(meta);
    assert!(monitor.open(true).unwrap().is_none());
    monitor.set_write_mostly("m1", true).unwrap();
    // Past md's limit, whoever asks (a state file's value came in
    // unchecked at a restart: audit).
    assert!(monitor.set_write_behind(16384).is_err());
    assert_eq!(monitor.snapshot().write_behind.0, 0);
    monitor.set_write_behind(4).unwrap();
    let mut ch = volume.info_device().open_channel().unwrap();
    // The region's bitmap bit goes to every member, m1 too (as md writes
    // its bitmap to all): set it before m1 turns slow. It stays set for
    // seconds after the last write.
    let mut warm = pattern(0);
    run_one(ch.as_mut(), rw(IoOp::Write, 100, 1, &mut warm, 100)).unwrap();
    open.store(false, Ordering::SeqCst);

    // One write: acknowledged while m1 has not taken it.
    let mut a = pattern(1);
    ch.submit(rw(IoOp::Write, 0, 1, &mut a, 1)).unwrap();
    assert_eq!(wait_for(ch.as_mut(), 1).result, Ok(()));
    assert_eq!(monitor.snapshot().write_behind, (4, 1));
    assert_eq!(
        ch.inflight(),
        1,
        "the channel still has the background write"
    );
    // The guest may reuse its buffer at once: m1 gets a copy.
    a.fill(0xee);

    // Eight more writes at once: three more go behind (four at most);
    // the other five wait for m1 like plain mirror writes. m1's queue
    // takes only two: what it refuses is sent again later, never dropped.
    room.store(2, Ordering::SeqCst);
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|i| pattern(10 + i)).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        ch.submit(rw(IoOp::Write, 1 + i as u64, 1, b, 10 + i as u64))
            .unwrap();
    }
    let mut out = Vec::new();
    for _ in 0..1000 {
        ch.poll(&mut out);
    }
    assert_eq!(out.len(), 3, "acknowledged: {out:?}");
    assert_eq!(monitor.snapshot().write_behind, (4, 4));
    room.store(usize::MAX, Ordering::SeqCst);
    open.store(true, Ordering::SeqCst);
    let t = Instant::now();
    while out.len() < 8 || ch.inflight() > 0 {
        ch.poll(&mut out);
        assert!(t.elapsed() < Duration::from_secs(30));
    }
    assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
    assert_eq!(monitor.snapshot().write_behind, (4, 0));
    let on_m1 = |lba: u64| {
        let mut got = vec![0u8; 4096];
        run_one(
            raw[1].open_channel().unwrap().as_mut(),
            rw(IoOp::Read, OFFSET + lba, 1, &mut got, 99),
        )
        .unwrap();
        got
    };
    assert_eq!(on_m1(0), pattern(1), "m1 got the data as written");
    for i in 0..8u8 {
        assert_eq!(on_m1(1 + i as u64), pattern(10 + i));
    }

    // Overlapping writes reach m1 in order (md's CollisionCheck): the
    // second waits while the first is still in the background.
    open.store(false, Ordering::SeqCst);
    let mut w1 = pattern(30);
    ch.submit(rw(IoOp::Write, 30, 1, &mut w1, 30)).unwrap();
    assert_eq!(wait_for(ch.as_mut(), 30).result, Ok(()));
    let mut w2 = pattern(31);
    ch.submit(rw(IoOp::Write, 30, 1, &mut w2, 31)).unwrap();
    out.clear();
    for _ in 0..1000 {
        ch.poll(&mut out);
    }
    assert!(
        out.is_empty(),
        "the overlapping write did not wait: {out:?}"
    );
    open.store(true, Ordering::SeqCst);
    assert_eq!(wait_for(ch.as_mut(), 31).result, Ok(()));
    while ch.inflight() > 0 {
        ch.poll(&mut out);
    }
    assert_eq!(on_m1(30), pattern(31), "m1 holds the later write");

    // A write goes behind; then m0 fails. A read can only come from m1
    // now: it waits until m1 has the write, and returns its data.
    open.store(false, Ordering::SeqCst);
    let mut c = pattern(50);
    ch.submit(rw(IoOp::Write, 20, 1, &mut c, 50)).unwrap();
    assert_eq!(wait_for(ch.as_mut(), 50).result, Ok(()));
    assert_eq!(monitor.snapshot().write_behind.1, 1);
    m0.control().pull();
    let mut got = vec![0u8; 4096];
    ch.submit(rw(IoOp::Read, 20, 1, &mut got, 51)).unwrap();
    out.clear();
    for _ in 0..1000 {
        ch.poll(&mut out);
    }
    assert!(out.is_empty(), "the read did not wait: {out:?}");
    // (The monitor is recording m0's failure meanwhile: the new member set
    // waits for the background write, which this thread's polling
    // finishes, so its state is not asked for here.)
    open.store(true, Ordering::SeqCst);
    assert_eq!(wait_for(ch.as_mut(), 51).result, Ok(()));
    assert_eq!(got, pattern(50));
    let t = Instant::now();
    while monitor.member_states()[0] != MemberState::Failed {
        ch.poll(&mut out);
        assert!(t.elapsed() < Duration::from_secs(30));
    }
    assert_eq!(monitor.snapshot().write_behind.1, 0);
    drop(ch);

    // Off: nothing goes behind any more.
    monitor.set_write_behind(0).unwrap();
    assert_eq!(monitor.snapshot().write_behind, (0, 0));
    reactors.shutdown().unwrap();
}

/// What the tests below start from: a mirror of m0 (behind a fault
/// injector) and m1 (a write-mostly `Gate`, open), with a bitmap and
/// write-behind 4.
struct Mirror {
    reactors: Reactors,
    raw: Vec<Arc<dyn BlockDevice>>,
    m0: Arc<FaultDevice>,
    /// Under m1's gate.
    m1: Arc<FaultDevice>,
    open: Arc<AtomicBool>,
    volume: Volume,
    monitor: Monitor,
}

fn mirror() -> Mirror {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let raw: Vec<Arc<dyn BlockDevice>> = (0..2)
        .map(|i| {
            Arc::new(RamDevice::new(&format!("m{i}"), 4096, OFFSET + 8192).unwrap())
                as Arc<dyn BlockDevice>
        })
        .collect();
    let m0 = Arc::new(FaultDevice::new(raw[0].clone()));
    let f1 = Arc::new(FaultDevice::new(raw[1].clone()));
    let open = Arc::new(AtomicBool::new(true));
    let m1: Arc<dyn BlockDevice> = Arc::new(Gate {
        inner: f1.clone(),
        open: open.clone(),
        room: Arc::new(AtomicUsize::new(usize::MAX)),
    });
    let (tx, rx) = mpsc::channel();
    let spec = VolumeSpec {
        name: "wb".into(),
        level: Level::Raid1,
        layout: Layout::LeftSymmetric,
        chunk_bytes: 64 << 10,
        data_offset: OFFSET,
        members: vec![m0.clone() as Arc<dyn BlockDevice>, m1],
        bitmap_chunk_bytes: 1 << 20,
        zeroed: true,
    };
    let (dev, meta) = assembly::create(&spec, FailureSink::new(tx), true).unwrap();
    let volume = Volume::new(reactors.set(), "wb", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    monitor.set_meta(meta);
    assert!(monitor.open(true).unwrap().is_none());
    monitor.set_write_mostly("m1", true).unwrap();
    monitor.set_write_behind(4).unwrap();
    Mirror {
        reactors,
        raw,
        m0,
        m1: f1,
        open,
        volume,
        monitor,
    }
}

/// Found by the chaos run: a write that went behind and whose only
/// foreground member failed it was answered with an error although the
/// write-mostly member took it. As md does, it is then answered once the
/// background copy is done, with that copy's outcome.
#[test]
fn a_write_whose_foreground_member_fails_is_answered_by_its_background_copy() {
    let Mirror {
        reactors,
        raw: _,
        m0,
        m1: _,
        open,
        volume,
        monitor,
    } = mirror();
    let mut ch = volume.info_device().open_channel().unwrap();
    let mut warm = pattern(0);
    run_one(ch.as_mut(), rw(IoOp::Write, 100, 1, &mut warm, 100)).unwrap();

    // m0 fails its writes; m1 holds them: the write waits for m1.
    m0.control().fail_writes(0, OFFSET + 4096);
    open.store(false, Ordering::SeqCst);
    let mut a = pattern(1);
    ch.submit(rw(IoOp::Write, 7, 1, &mut a, 1)).unwrap();
    let mut out = Vec::new();
    for _ in 0..1000 {
        ch.poll(&mut out);
    }
    assert!(out.is_empty(), "answered before m1 had it: {out:?}");
    open.store(true, Ordering::SeqCst);
    let c = wait_for(ch.as_mut(), 1);
    assert_eq!(c.result, Ok(()), "m1 has the write");
    let t = Instant::now();
    while monitor.member_states()[0] != MemberState::Failed {
        ch.poll(&mut out);
        assert!(t.elapsed() < Duration::from_secs(30));
    }
    drop(ch);
    let mut ch = volume.info_device().open_channel().unwrap();
    let mut got = vec![0u8; 4096];
    run_one(ch.as_mut(), rw(IoOp::Read, 7, 1, &mut got, 2)).unwrap();
    assert_eq!(got, pattern(1));
    drop(ch);
    drop(monitor);
    reactors.shutdown().unwrap();
}

/// Found in review: a suspend of the volume (the operator's, to snapshot
/// its members, or a held range's) said nothing was in flight while a
/// write acknowledged to the guest was still on its way to the
/// write-mostly member. The suspend now waits for it, as md's barrier
/// does, and at its deadline changes nothing.
#[test]
fn a_suspend_waits_for_writes_still_going_to_a_write_mostly_member() {
    let Mirror {
        reactors,
        raw,
        m0: _,
        m1: _,
        open,
        volume,
        monitor,
    } = mirror();
    // The region's bitmap bit reaches m1 before it turns slow.
    volume
        .io(IoOp::Write, 100, pattern(0), Duration::from_secs(30))
        .unwrap();
    open.store(false, Ordering::SeqCst);

    // A consumer on reactor 0 writes through the volume's gate and keeps
    // polling its channel after the answer, as an export's queue does.
    let (done_tx, done_rx) = mpsc::channel();
    let q = volume.quiesce().clone();
    reactors
        .set()
        .send(
            0,
            Box::new(move |ctx| {
                let gate = q.local(ctx).unwrap();
                let mut data = pattern(1);
                let mut ch: Option<Box<dyn IoChannel>> = None;
                let mut answered = false;
                let mut out = Vec::new();
                ctx.add_poller(move |_| {
                    let Some(c) = ch.as_mut() else {
                        assert!(gate.try_begin(), "nothing suspends the volume yet");
                        let mut c = gate.config().1.device.open_channel().unwrap();
                        c.submit(rw(IoOp::Write, 0, 1, &mut data, 1)).unwrap();
                        ch = Some(c);
                        return PollState::Busy;
                    };
                    c.poll(&mut out);
                    if !answered && !out.is_empty() {
                        answered = true;
                        gate.end();
                        done_tx.send(out[0].result).unwrap();
                    }
                    if answered && c.inflight() == 0 {
                        return PollState::Done;
                    }
                    PollState::Busy
                });
            }),
        )
        .unwrap_or_else(|_| panic!("reactor 0 is gone"));
    assert_eq!(
        done_rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        Ok(()),
        "answered while m1 holds the write"
    );
    assert_eq!(monitor.snapshot().write_behind.1, 1);

    // Every core acknowledges at once, but the write is still going to
    // m1: the suspend waits for it and, at its deadline, resumes.
    let e = volume
        .suspend(Duration::from_millis(200))
        .err()
        .expect("a suspend with a write still going to m1");
    assert!(
        matches!(e, poller::QuiesceError::BackgroundBusy { .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("1 writes to write-mostly members"),
        "{e}"
    );
    assert!(
        !volume.quiesce().is_suspended(),
        "the deadline changed nothing"
    );

    // A suspend that waits while m1 takes the write returns once m1 has it.
    let v = volume.clone();
    let waiting = std::thread::spawn(move || v.suspend(Duration::from_secs(60)));
    let t = Instant::now();
    while !volume.quiesce().is_suspended() {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::yield_now();
    }
    open.store(true, Ordering::SeqCst);
    let guard = waiting.join().unwrap().unwrap();
    let mut got = vec![0u8; 4096];
    run_one(
        raw[1].open_channel().unwrap().as_mut(),
        rw(IoOp::Read, OFFSET, 1, &mut got, 9),
    )
    .unwrap();
    assert_eq!(
        got,
        pattern(1),
        "m1 had the write when the suspend returned"
    );
    drop(guard);
    drop(monitor);
    reactors.shutdown().unwrap();
}

/// From an audit: a discard copied to the write-mostly member in the
/// background failed that member when it answered "not supported" (a
/// disk that cannot deallocate the range), though in the foreground such
/// an answer fails no member, as md ignores discard errors: every fstrim
/// failed a healthy mirror.
#[test]
fn a_discard_the_write_mostly_member_cannot_take_fails_no_member() {
    let Mirror {
        reactors,
        raw: _,
        m0: _,
        m1,
        open: _,
        volume,
        monitor,
    } = mirror();
    let t = Duration::from_secs(30);
    // The region's bitmap bit is set first (a discard waits for none).
    volume.io(IoOp::Write, 100, pattern(0), t).unwrap();
    m1.control().refuse_discards(true);
    volume
        .io(IoOp::Discard, 96, vec![0u8; 8 * 4096], t)
        .expect("a discard a member cannot take still succeeds");
    // A suspend waits for the background copies, m1's discard with them;
    // then the monitor has seen whatever they reported.
    drop(volume.quiesce().suspend(t).unwrap());
    let since = Instant::now();
    while !monitor.idle() {
        assert!(since.elapsed() < t, "the monitor never settled");
        std::thread::yield_now();
    }
    assert_eq!(
        monitor.member_states(),
        vec![MemberState::InSync, MemberState::InSync],
        "the write-mostly member was failed"
    );
    drop(monitor);
    reactors.shutdown().unwrap();
}

/// From an audit: a write too long for block keys (over 4,096 blocks: a
/// discard of a large range, mkfs) waits until nothing is in the
/// background, but writes from other cores kept going there meanwhile: a
/// steady stream of them kept it waiting for as long as the stream
/// lasted, and every write queued after it on its core with it. While it
/// waits, later writes stay out of the background (they wait for the
/// write-mostly member, as plain mirror writes do), as md's barrier.
#[test]
fn a_long_write_waiting_for_the_background_keeps_new_writes_out_of_it() {
    let Mirror {
        reactors,
        raw: _,
        m0: _,
        m1: _,
        open,
        volume,
        monitor,
    } = mirror();
    let dev = volume.info_device();
    let mut a = dev.open_channel().unwrap();
    let mut b = dev.open_channel().unwrap();
    // Every 1 MiB region the writes below touch has its bitmap bit set
    // on every member before m1 turns slow.
    for r in 0..20u64 {
        let mut warm = pattern(r as u8);
        run_one(a.as_mut(), rw(IoOp::Write, r * 256, 1, &mut warm, 100 + r)).unwrap();
    }
    open.store(false, Ordering::SeqCst);
    let mut w1 = pattern(1);
    a.submit(rw(IoOp::Write, 0, 1, &mut w1, 1)).unwrap();
    assert_eq!(wait_for(a.as_mut(), 1).result, Ok(()));
    assert_eq!(monitor.snapshot().write_behind, (4, 1));
    a.submit(bdev::IoRequest::range(IoOp::Discard, 0, 4100, 2))
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..1000 {
        a.poll(&mut out);
    }
    assert!(out.is_empty(), "the long discard did not wait: {out:?}");
    // Another core's short write: not into the background now.
    let mut w2 = pattern(2);
    b.submit(rw(IoOp::Write, 5000, 1, &mut w2, 3)).unwrap();
    for _ in 0..1000 {
        b.poll(&mut out);
        a.poll(&mut out);
    }
    assert_eq!(
        monitor.snapshot().write_behind,
        (4, 1),
        "a write went into the background ahead of the waiting discard"
    );
    assert!(out.is_empty(), "answered before m1 had it: {out:?}");
    open.store(true, Ordering::SeqCst);
    assert_eq!(wait_for(a.as_mut(), 2).result, Ok(()));
    assert_eq!(wait_for(b.as_mut(), 3).result, Ok(()));
    let mut got = vec![0u8; 4096];
    run_one(b.as_mut(), rw(IoOp::Read, 5000, 1, &mut got, 4)).unwrap();
    assert_eq!(got, pattern(2));
    drop((a, b));
    drop(monitor);
    reactors.shutdown().unwrap();
}
