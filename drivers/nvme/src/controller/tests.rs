use std::sync::atomic::Ordering;

use super::*;
use crate::soft::{SoftConfig, SoftController};

/// Two callers fail the controller at once (a channel's reset that did not
/// work, another channel's queue that could not be made again): the second
/// moved the generation at once, and every channel failed its requests and
/// handed their memory back while the first still waited for the device to
/// stop writing it. It waits for that stop now (here the device ignores
/// the disable, so the stop ends with its memory unmapped).
#[test]
fn a_second_failure_waits_until_the_device_stopped_or_lost_its_memory() {
    let soft = SoftController::start("soft-fail", SoftConfig::default()).expect("soft controller");
    let ctrl = Controller::new(soft.transport(), Options::default()).expect("bring up");
    soft.ignore_disable(true);
    let unmapped_before = ctrl.registry.generation.load(Ordering::Acquire);
    let first = {
        let c = ctrl.clone();
        std::thread::spawn(move || c.fail("first"))
    };
    while !ctrl.is_failed() {
        std::thread::yield_now();
    }
    let seen = ctrl.generation.load(Ordering::Acquire);
    ctrl.fail("second");
    assert!(ctrl.generation.load(Ordering::Acquire) > seen);
    assert!(
        ctrl.registry.generation.load(Ordering::Acquire) > unmapped_before,
        "the second failure returned, the generation moved, before the first took the memory away from a device that did not stop"
    );
    first.join().expect("first caller");
}

/// A device whose registers read all ones may only have lost its register
/// reads (a PCIe error with the link up) and still write memory. A failure
/// took that for a device gone from the bus: its memory stayed mapped,
/// and its addresses were used again (audit).
#[test]
fn a_device_whose_registers_read_all_ones_loses_its_memory_when_failed() {
    let soft = SoftController::start("soft-lost", SoftConfig::default()).expect("soft controller");
    let ctrl = Controller::new(soft.transport(), Options::default()).expect("bring up");
    soft.lose_status();
    let unmapped_before = ctrl.registry.generation.load(Ordering::Acquire);
    ctrl.fail("its registers read all ones");
    assert!(
        ctrl.registry.generation.load(Ordering::Acquire) > unmapped_before,
        "a device that cannot say it stopped kept its memory"
    );
    let t = soft.transport();
    let mut a = vec![0u8; 8192];
    let page = (a.as_mut_ptr() as usize).next_multiple_of(4096) as *mut u8;
    // SAFETY: `a` outlives both mappings.
    let at = unsafe { t.map(page, 4096) }.unwrap();
    t.unmap(at, 4096);
    let again = unsafe { t.map(page, 4096) }.unwrap();
    assert_ne!(at, again, "an address of the device was used again");
    t.unmap(again, 4096);
}
