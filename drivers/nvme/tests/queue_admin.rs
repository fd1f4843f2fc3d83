//! A channel's queue is made and deleted by admin commands, which a slow
//! or hostile controller can keep waiting for up to twice CAP.TO. A
//! channel is opened and dropped on a reactor, which serves other devices
//! too: neither waits for a controller whose admin queue does not move
//! (audit). The soft controller holds its admin commands until the test
//! releases them; the admin time-out is far longer than any wait here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::conformance::{run_one, rw};
use bdev::{BdevError, BlockDevice, IoOp, SubmitError};
use nvme::soft::{SoftConfig, SoftController};
use nvme::{Controller, Namespace, Options};

/// A controller whose admin commands would take this long to time out:
/// a wait for one shows as a test that does not end in time.
fn patient() -> Options {
    Options {
        io_timeout: Duration::from_secs(60),
        admin_timeout: Duration::from_secs(60),
        ..Options::default()
    }
}

/// Wait until the controller holds an admin command: the caller has
/// returned while that command can neither run nor time out, so it did
/// not wait for it.
fn until_held(soft: &SoftController, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while soft.admin_waiting() == 0 {
        assert!(Instant::now() < deadline, "{what} never reached the device");
        std::thread::yield_now();
    }
}

/// `f`, which must return while the controller holds its admin commands
/// (one waited for keeps it for the minute of the admin time-out).
fn returns<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let v = f();
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "{what} waited for the held admin command"
    );
    v
}

fn setup(config: SoftConfig) -> (SoftController, Arc<Namespace>) {
    let soft = SoftController::start("soft-admin", config).expect("start soft controller");
    let ctrl = Controller::new(soft.transport(), patient()).expect("bring up");
    let ns = Arc::new(Namespace::new(&ctrl, 1, "ns1").expect("namespace"));
    (soft, ns)
}

/// A channel opened while the controller holds its admin commands opens
/// while its Create I/O Completion Queue is still held; it takes nothing
/// until the queue is there, then serves verified IO.
#[test]
fn a_channel_opens_without_waiting_for_its_queue_to_be_made() {
    let (soft, dev) = setup(SoftConfig::default());
    soft.hold_admin();
    let mut ch = returns("the open", || dev.open_channel()).expect("the channel opens");
    until_held(&soft, "the queue's creation");
    let mut data = vec![0x5au8; 4096];
    let req = rw(IoOp::Write, 3, 1, &mut data, 1);
    let Err(SubmitError::Busy(req)) = ch.submit(req) else {
        panic!("a request was taken before the channel's queue was made");
    };
    let mut out = Vec::new();
    assert_eq!(ch.poll(&mut out), 0);
    assert!(ch.inflight() > 0, "an opening channel is not idle");
    soft.release_admin();
    run_one(ch.as_mut(), req).expect("the write, once the queue is made");
    let mut got = vec![0u8; 4096];
    run_one(ch.as_mut(), rw(IoOp::Read, 3, 1, &mut got, 2)).expect("read");
    assert!(got == data);
}

/// A channel dropped while the controller holds its admin commands is
/// gone at once; its queue ID is free only once the device has deleted
/// the queue (a new channel meanwhile is told there is no room, which
/// its owner asks again for), and then a new channel serves verified IO.
#[test]
fn a_channel_is_dropped_without_waiting_for_its_queue_to_be_deleted() {
    let (soft, dev) = setup(SoftConfig {
        max_io_queues: 1,
        ..SoftConfig::default()
    });
    let mut ch = dev.open_channel().expect("the channel opens");
    let mut data = vec![0xa5u8; 4096];
    run_one(ch.as_mut(), rw(IoOp::Write, 9, 1, &mut data, 1)).expect("write");
    soft.hold_admin();
    returns("the drop", || drop(ch));
    until_held(&soft, "the queue's deletion");
    match dev.open_channel() {
        Err(BdevError::Exhausted(m)) => assert!(m.contains("in use"), "{m}"),
        Err(e) => panic!("the only queue ID, being given back, was not 'no room': {e}"),
        Ok(_) => panic!("a queue ID still on the device was given out again"),
    }
    soft.release_admin();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ch = loop {
        match dev.open_channel() {
            Ok(ch) => break ch,
            Err(BdevError::Exhausted(_)) => {
                assert!(Instant::now() < deadline, "the queue ID never came back");
                std::thread::yield_now();
            }
            Err(e) => panic!("{e}"),
        }
    };
    let mut got = vec![0u8; 4096];
    run_one(ch.as_mut(), rw(IoOp::Read, 9, 1, &mut got, 2)).expect("read");
    assert!(got == data);
}
