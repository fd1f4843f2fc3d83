//! md's serialize_policy on a mirror: two cores write different data to
//! the same blocks at once, many times, on members that carry out the
//! requests in flight in any order (as a device may). Without
//! serialization the mirrors end up holding different data (each got the
//! writes in another order); with it they always agree.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::raid::members::{FailureSink, Member, MemberState};
use appliance::raid::monitor::RaidDevice;
use appliance::raid::raid1::Raid1Device;
use bdev::conformance::{run_one, rw};
use bdev::{
    BdevError, BlockDevice, Completion, DeviceInfo, IoChannel, IoOp, IoRequest, RamDevice,
    SubmitError,
};
use poller::{PollState, ReactorConfig, Reactors};

/// A member that carries out the requests it holds in a random order at
/// each poll.
struct AnyOrder(Arc<dyn BlockDevice>);

struct AnyOrderChannel {
    inner: Box<dyn IoChannel>,
    held: Vec<IoRequest>,
    rng: u64,
}

impl BlockDevice for AnyOrder {
    fn info(&self) -> &DeviceInfo {
        self.0.info()
    }
    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(AnyOrderChannel {
            inner: self.0.open_channel()?,
            held: Vec::new(),
            rng: Arc::as_ptr(&self.0) as *const u8 as u64 | 1,
        }))
    }
}

impl IoChannel for AnyOrderChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        self.held.push(req);
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        while !self.held.is_empty() {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let i = (self.rng % self.held.len() as u64) as usize;
            let r = self.held.swap_remove(i);
            if let Err(SubmitError::Busy(r)) = self.inner.submit(r) {
                self.held.push(r);
                break;
            }
        }
        self.inner.poll(out)
    }
    fn inflight(&self) -> usize {
        self.held.len() + self.inner.inflight()
    }
}

const BLOCKS: u64 = 8;
const WRITES: usize = 3000;

/// Writes from both cores, then the blocks of the mirrors that differ.
fn race(serialize: bool) -> usize {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let mirrors: Vec<Arc<dyn BlockDevice>> = (0..2)
        .map(|i| {
            Arc::new(RamDevice::new(&format!("m{i}"), 4096, 64).unwrap()) as Arc<dyn BlockDevice>
        })
        .collect();
    let members = mirrors
        .iter()
        .map(|d| Member::new(Arc::new(AnyOrder(d.clone())), MemberState::InSync))
        .collect();
    let dev = Arc::new(Raid1Device::new("mirror", members, 0, FailureSink::none()).unwrap());
    dev.member_set()
        .serialize
        .store(serialize, Ordering::SeqCst);
    let finished = Arc::new(AtomicUsize::new(0));
    for core in 0..2 {
        let (dev, finished) = (dev.clone(), finished.clone());
        reactors
            .set()
            .call(core, Duration::from_secs(10), move |ctx| {
                let mut ch = dev.open_channel().unwrap();
                // Four buffers of this core's pattern, one per write in flight.
                let mut bufs: Vec<Vec<u8>> = (0..4)
                    .map(|k| vec![(core * 4 + k + 1) as u8; (BLOCKS * 4096) as usize])
                    .collect();
                let (mut sent, mut done, mut free) = (0, 0, vec![0usize, 1, 2, 3]);
                let mut out = Vec::new();
                ctx.add_poller(move |_| {
                    while sent < WRITES {
                        let Some(k) = free.pop() else { break };
                        let req = rw(IoOp::Write, 0, BLOCKS, &mut bufs[k], k as u64);
                        if ch.submit(req).is_err() {
                            free.push(k);
                            break;
                        }
                        sent += 1;
                    }
                    ch.poll(&mut out);
                    for c in out.drain(..) {
                        assert!(c.result.is_ok());
                        free.push(c.tag as usize);
                        done += 1;
                    }
                    if done == WRITES {
                        finished.fetch_add(1, Ordering::SeqCst);
                        return PollState::Done;
                    }
                    PollState::Busy
                });
            })
            .unwrap();
    }
    let t = Instant::now();
    while finished.load(Ordering::SeqCst) < 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "writes stuck");
        std::thread::sleep(Duration::from_millis(5));
    }
    reactors.shutdown().unwrap();
    let read = |d: &Arc<dyn BlockDevice>| {
        let mut ch = d.open_channel().unwrap();
        let mut b = vec![0u8; (BLOCKS * 4096) as usize];
        run_one(ch.as_mut(), rw(IoOp::Read, 0, BLOCKS, &mut b, 1)).unwrap();
        b
    };
    let (a, b) = (read(&mirrors[0]), read(&mirrors[1]));
    a.chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count()
}

#[test]
fn with_the_serialize_policy_concurrent_overlapping_writes_leave_the_mirrors_equal() {
    let mut diverged = 0;
    for _ in 0..5 {
        diverged += race(false);
        assert_eq!(
            race(true),
            0,
            "serialized writes left the mirrors different"
        );
    }
    eprintln!("without the policy: {diverged} blocks differed between the mirrors over 5 runs");
    assert!(
        diverged > 0,
        "the race never showed: the test would prove nothing"
    );
}

/// A member whose queue refuses everything (Busy) while `full` is set.
struct Choke(Arc<dyn BlockDevice>, Arc<std::sync::atomic::AtomicBool>);

struct ChokeChannel(Box<dyn IoChannel>, Arc<std::sync::atomic::AtomicBool>);

impl BlockDevice for Choke {
    fn info(&self) -> &DeviceInfo {
        self.0.info()
    }
    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(ChokeChannel(
            self.0.open_channel()?,
            self.1.clone(),
        )))
    }
}

impl IoChannel for ChokeChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if self.1.load(Ordering::SeqCst) {
            return Err(SubmitError::Busy(req));
        }
        self.0.submit(req)
    }
    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        self.0.poll(out)
    }
    fn inflight(&self) -> usize {
        self.0.inflight()
    }
}

/// From an audit: a write that waited for its region (the serialize
/// policy, a rebuild, a bitmap bit) and then found every member's queue
/// full was answered DeviceFailed: a guest IO error on a healthy mirror.
/// It is sent once the queues have room.
#[test]
fn a_write_let_in_when_every_queue_is_full_waits_for_room() {
    let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let members = (0..2)
        .map(|i| {
            let ram: Arc<dyn BlockDevice> =
                Arc::new(RamDevice::new(&format!("m{i}"), 4096, 1024).unwrap());
            Member::new(Arc::new(Choke(ram, full.clone())), MemberState::InSync)
        })
        .collect();
    let dev = Arc::new(Raid1Device::new("mirror", members, 0, FailureSink::none()).unwrap());
    let set = dev.member_set();
    set.serialize.store(true, Ordering::SeqCst);
    assert!(
        set.locks.try_lock(0),
        "region 0 held, as another write would"
    );
    let mut ch = dev.open_channel().unwrap();
    let mut data = vec![0x5au8; 4096];
    ch.submit(rw(IoOp::Write, 0, 1, &mut data, 7)).unwrap();
    let mut out = Vec::new();
    ch.poll(&mut out);
    assert!(out.is_empty(), "it waits for its region");
    // The region comes free while every member's queue is full.
    full.store(true, Ordering::SeqCst);
    set.locks.unlock(0);
    for _ in 0..10 {
        ch.poll(&mut out);
    }
    assert!(
        out.is_empty(),
        "answered while the queues were full: {out:?}"
    );
    full.store(false, Ordering::SeqCst);
    let t = Instant::now();
    while out.is_empty() {
        ch.poll(&mut out);
        assert!(t.elapsed() < Duration::from_secs(10), "never sent");
    }
    assert_eq!(out[0].tag, 7);
    assert_eq!(out[0].result, Ok(()));
}
