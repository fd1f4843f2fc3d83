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
