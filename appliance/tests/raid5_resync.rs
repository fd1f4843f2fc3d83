//! RAID5 writes while parity may not match its data (a resync after a
//! crash not done yet): md writes such stripes by reconstruct-write.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use appliance::raid::geometry::Layout;
use appliance::raid::level::RaidDevice;
use appliance::raid::members::{FailureSink, Member, MemberState};
use appliance::raid::raid5::Raid5Device;
use bdev::conformance::{run_one, rw};
use bdev::{BlockDevice, IoOp, RamDevice};

/// From an audit: after a crash, a write to a stripe the resync had not
/// reached chose read-modify-write (five members, one block), which
/// computes the new parity from the old one: a stale parity stayed stale,
/// and a member lost before the resync got there would be rebuilt from it
/// as garbage. While a scrub runs or is owed, parity comes from the data.
#[test]
fn a_write_before_the_resync_gets_there_computes_parity_from_the_data() {
    let devs: Vec<Arc<dyn BlockDevice>> = (0..5)
        .map(|i| Arc::new(RamDevice::new(&format!("m{i}"), 4096, 64).unwrap()) as _)
        .collect();
    let r = Raid5Device::new(
        "r5",
        devs.iter()
            .map(|d| Member::new(d.clone(), MemberState::InSync))
            .collect(),
        16384,
        Layout::LeftSymmetric,
        0,
        FailureSink::none(),
    )
    .unwrap();
    let geo = r.parity_geometry().unwrap();
    // The crash: stripe 0's parity does not match its data.
    let parity = devs[geo.parity_member(0) as usize].clone();
    let mut junk = vec![0x5au8; 4096];
    run_one(
        parity.open_channel().unwrap().as_mut(),
        rw(IoOp::Write, 0, 1, &mut junk, 1),
    )
    .unwrap();
    // A resync is owed (what Monitor::open sets before it starts).
    r.member_set().scrubbing.store(true, Ordering::SeqCst);
    let mut ch = r.open_channel().unwrap();
    let mut data = vec![0xc3u8; 4096];
    run_one(ch.as_mut(), rw(IoOp::Write, 0, 1, &mut data, 2)).unwrap();
    drop(ch);
    let mut acc = vec![0u8; 4096];
    for d in &devs {
        let mut buf = vec![0u8; 4096];
        run_one(
            d.open_channel().unwrap().as_mut(),
            rw(IoOp::Read, 0, 1, &mut buf, 3),
        )
        .unwrap();
        acc.iter_mut().zip(buf).for_each(|(a, b)| *a ^= b);
    }
    assert!(
        acc.iter().all(|&b| b == 0),
        "the stale parity was carried on by read-modify-write"
    );
}
