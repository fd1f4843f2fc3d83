//! RAID5: conformance healthy and degraded, parity consistency after random
//! writes, a member failing under a verified workload on every reactor,
//! and a clear error beyond one failure.

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use appliance::raid::geometry::Layout;
use appliance::raid::members::{FailureSink, Member, MemberState};
use appliance::raid::monitor::Monitor;
use appliance::raid::raid5::Raid5Device;
use appliance::volume::Volume;
use appliance::workload::{Workload, WorkloadParams};
use bdev::conformance::{self, run_one, rw};
use bdev::{BlockDevice, FaultDevice, IoOp, RamDevice};
use poller::{ReactorConfig, Reactors};

fn ram(name: &str, blocks: u64) -> Arc<dyn BlockDevice> {
    Arc::new(RamDevice::new(name, 4096, blocks).unwrap())
}

fn member(dev: Arc<dyn BlockDevice>) -> Member {
    Member::new(dev, MemberState::InSync)
}

/// RAID5 over `devs` in 16 KiB chunks, left-symmetric, data from block
/// `offset`.
fn r5(devs: &[Arc<dyn BlockDevice>], offset: u64, failures: FailureSink) -> Raid5Device {
    Raid5Device::new(
        "r5",
        devs.iter().cloned().map(member).collect(),
        16384,
        Layout::LeftSymmetric,
        offset,
        failures,
    )
    .unwrap()
}

fn as_devs(faults: &[Arc<FaultDevice>]) -> Vec<Arc<dyn BlockDevice>> {
    faults
        .iter()
        .map(|f| f.clone() as Arc<dyn BlockDevice>)
        .collect()
}

/// XOR of all members over the data area is zero on every row.
fn parity_consistent(members: &[Arc<dyn BlockDevice>], offset: u64, blocks: u64) -> bool {
    let mut acc = vec![0u8; 4096 * blocks as usize];
    for m in members {
        let mut ch = m.open_channel().unwrap();
        let mut buf = vec![0u8; acc.len()];
        run_one(ch.as_mut(), rw(IoOp::Read, offset, blocks, &mut buf, 1)).unwrap();
        for (a, b) in acc.iter_mut().zip(buf) {
            *a ^= b;
        }
    }
    acc.iter().all(|&b| b == 0)
}

#[test]
fn raid5_conforms_in_every_layout_and_keeps_parity_consistent() {
    for (n, layout, chunk) in [
        (3, Layout::LeftSymmetric, 4096),
        (4, Layout::LeftAsymmetric, 16384),
        (5, Layout::RightSymmetric, 65536),
        (4, Layout::RightAsymmetric, 8192),
    ] {
        let devs: Vec<Arc<dyn BlockDevice>> =
            (0..n).map(|i| ram(&format!("m{i}"), 1024 + 8)).collect();
        let r = Raid5Device::new(
            "r5",
            devs.iter().cloned().map(member).collect(),
            chunk,
            layout,
            8,
            FailureSink::none(),
        )
        .unwrap();
        let blocks = r.info().num_blocks;
        assert_eq!(blocks % r.geometry().stripe_blocks(), 0);
        conformance::run_all(Arc::new(r), 2, 1500);
        assert!(
            parity_consistent(&devs, 8, 1024),
            "{layout} x{n}: parity inconsistent"
        );
    }
}

#[test]
fn a_degraded_raid5_reads_and_writes_everything_correctly() {
    for failed in 0..4usize {
        let devs: Vec<Arc<dyn BlockDevice>> = (0..4).map(|i| ram(&format!("m{i}"), 512)).collect();
        // Fill through a healthy volume first.
        let healthy = Raid5Device::new(
            "r5",
            devs.iter().cloned().map(member).collect(),
            8192,
            Layout::LeftSymmetric,
            0,
            FailureSink::none(),
        )
        .unwrap();
        let blocks = healthy.info().num_blocks;
        let mut data: Vec<u8> = (0..blocks as usize * 4096)
            .map(|i| (i * 7 / 4096) as u8 ^ (i as u8))
            .collect();
        {
            let mut ch = healthy.open_channel().unwrap();
            run_one(ch.as_mut(), rw(IoOp::Write, 0, blocks, &mut data, 1)).unwrap();
        }
        // Lose one member.
        let mut members: Vec<Member> = devs.iter().cloned().map(member).collect();
        members[failed].state = MemberState::Failed;
        let degraded = Arc::new(
            Raid5Device::new(
                "r5",
                members,
                8192,
                Layout::LeftSymmetric,
                0,
                FailureSink::none(),
            )
            .unwrap(),
        );
        let mut ch = degraded.open_channel().unwrap();
        let mut got = vec![0u8; data.len()];
        run_one(ch.as_mut(), rw(IoOp::Read, 0, blocks, &mut got, 2)).unwrap();
        assert!(got == data, "degraded read with member {failed} missing");
        // And random IO on the degraded volume matches a model.
        drop(ch);
        conformance::run_all(degraded.clone(), 2, 1000);
        // The surviving members plus the missing one's reconstruction are
        // consistent: a fresh healthy view of the survivors reads the same
        // as the degraded view (checked by conformance's model already).
    }
}

#[test]
fn bad_raid5_geometry_is_refused_clearly() {
    // Two members are md's degenerate RAID5 (what a takeover makes of a
    // mirror); one is not a RAID5.
    let one: Vec<Member> = (0..1).map(|i| member(ram(&format!("m{i}"), 64))).collect();
    let e = Raid5Device::new(
        "r5",
        one,
        4096,
        Layout::LeftSymmetric,
        0,
        FailureSink::none(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("2..=64 members"), "{e}");
    let three: Vec<Member> = (0..3).map(|i| member(ram(&format!("m{i}"), 64))).collect();
    let e = Raid5Device::new(
        "r5",
        three,
        3000,
        Layout::LeftSymmetric,
        0,
        FailureSink::none(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("chunk"), "{e}");
}

#[test]
fn a_member_failing_under_load_degrades_the_volume_without_io_errors() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let faults: Vec<Arc<FaultDevice>> = (0..4)
        .map(|i| Arc::new(FaultDevice::new(ram(&format!("m{i}"), 8192))))
        .collect();
    let (tx, rx) = mpsc::channel();
    let dev = Arc::new(r5(&as_devs(&faults), 0, FailureSink::new(tx)));
    let volume = Volume::new(reactors.set(), "r5", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    let w = Workload::start_on_volume(reactors.set(), &volume, WorkloadParams::default()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    faults[2].control().pull();
    std::thread::sleep(Duration::from_millis(700));
    let totals = w.stop(Duration::from_secs(10)).unwrap();
    assert!(totals.clean(), "{totals:?} {:?}", w_err(&totals));
    assert!(totals.reads_verified > 0);
    assert_eq!(monitor.member_states()[2], MemberState::Failed);
    // A second failure is beyond RAID5: clear errors, no hang.
    faults[0].control().pull();
    let w = Workload::start_on_volume(reactors.set(), &volume, WorkloadParams::default()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let totals = w.stop(Duration::from_secs(10)).unwrap();
    assert!(totals.errors > 0);
    reactors.shutdown().unwrap();
}

fn w_err(t: &appliance::workload::Totals) -> String {
    format!("{t:?}")
}

#[test]
fn a_spare_takes_over_and_is_rebuilt_while_io_goes_on() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let raw: Vec<Arc<dyn BlockDevice>> = (0..4).map(|i| ram(&format!("m{i}"), 4096)).collect();
    let faults: Vec<Arc<FaultDevice>> = raw
        .iter()
        .map(|d| Arc::new(FaultDevice::new(d.clone())))
        .collect();
    let spare = ram("spare", 4096);
    let (tx, rx) = mpsc::channel();
    let dev = Arc::new(r5(&as_devs(&faults), 0, FailureSink::new(tx)));
    let volume = Volume::new(reactors.set(), "r5", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![spare.clone()]);
    let w = Workload::start_on_volume(reactors.set(), &volume, WorkloadParams::default()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    faults[1].control().pull();
    // The spare takes slot 1 and is rebuilt while the workload runs.
    let t = std::time::Instant::now();
    loop {
        let states = monitor.member_states();
        if states.iter().all(|s| *s == MemberState::InSync) && monitor.rebuild().is_some() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "rebuild did not finish: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let progress = monitor.rebuild().unwrap();
    assert_eq!(progress.fraction(), 1.0);
    assert!(progress.error().is_none());
    assert_eq!(monitor.spares(), 0);
    std::thread::sleep(Duration::from_millis(200));
    let totals = w.stop(Duration::from_secs(10)).unwrap();
    assert!(totals.clean(), "{totals:?}");
    assert!(totals.reads_verified > 0);
    // Slot 1 is now the spare, and every stripe's parity adds up.
    let members = vec![raw[0].clone(), spare, raw[2].clone(), raw[3].clone()];
    assert!(
        parity_consistent(&members, 0, 4096),
        "parity after the rebuild"
    );
    reactors.shutdown().unwrap();
}

#[test]
fn operator_changes_race_each_other_and_io_without_harm() {
    use appliance::raid::monitor::OpError;
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    // Small members so rebuilds are quick: 64 stripes of 4 KiB chunks.
    let small =
        |name: &str| Arc::new(RamDevice::new(name, 4096, 64).unwrap()) as Arc<dyn BlockDevice>;
    let (tx, rx) = mpsc::channel();
    let members: Vec<Arc<dyn BlockDevice>> = (0..4).map(|i| small(&format!("m{i}"))).collect();
    let dev = Arc::new(
        Raid5Device::new(
            "r5",
            members.iter().cloned().map(member).collect(),
            4096,
            Layout::LeftSymmetric,
            0,
            FailureSink::new(tx),
        )
        .unwrap(),
    );
    let volume = Volume::new(reactors.set(), "r5", dev.clone());
    let monitor = Arc::new(Monitor::start(
        reactors.set(),
        volume.clone(),
        dev,
        rx,
        vec![],
    ));
    let w = Workload::start_on_volume(
        reactors.set(),
        &volume,
        WorkloadParams {
            queue_depth: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let unexpected = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut threads = Vec::new();
    // Spares come and go; names are reused, so operations on a device race
    // its removal and its promotion into the volume.
    for t in 0..3 {
        let (monitor, stop, unexpected) = (monitor.clone(), stop.clone(), unexpected.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            let mut ops = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let name = format!("s{}", n % 3);
                n += 1;
                let res = match t {
                    0 => monitor.add_spare(small(&name)),
                    1 => monitor.remove_spare(&name),
                    _ => monitor.fail_member(&name),
                };
                ops += 1;
                match res {
                    Ok(())
                    | Err(OpError::NotFound(_))
                    | Err(OpError::AlreadyExists(_))
                    | Err(OpError::FailedPrecondition(_)) => {}
                    Err(e) => unexpected.lock().unwrap().push(e.to_string()),
                }
            }
            ops
        }));
    }
    // Meanwhile real members fail, one at a time, and spares take over.
    let mut failed_members = 0;
    for round in 0..60 {
        std::thread::sleep(Duration::from_millis(25));
        let devs = monitor.member_states();
        if devs.contains(&MemberState::Failed) {
            // Keep the volume recovering: a fresh spare for the failed slot.
            let _ = monitor.add_spare(small(&format!("r{round}")));
        }
        if devs.iter().all(|s| *s == MemberState::InSync) {
            let name = format!("m{}", round % 4);
            match monitor.fail_member(&name) {
                Ok(()) => failed_members += 1,
                Err(OpError::NotFound(_)) | Err(OpError::FailedPrecondition(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let ops: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(
        unexpected.lock().unwrap().is_empty(),
        "{:?}",
        unexpected.lock().unwrap()
    );
    // Let the last rebuild finish with a spare available.
    let _ = monitor.add_spare(small("last"));
    let t = std::time::Instant::now();
    while !monitor
        .member_states()
        .iter()
        .all(|s| *s == MemberState::InSync)
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{:?}",
            monitor.member_states()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let totals = w.stop(Duration::from_secs(10)).unwrap();
    assert!(totals.clean(), "{totals:?}");
    assert!(totals.reads_verified > 0);
    println!(
        "{ops} racing operator calls, {failed_members} member failures, {} IOs",
        totals.ios
    );
    assert!(ops > 1000, "the race ran {ops} operations");
    assert!(failed_members > 1, "only {failed_members} member failures");
    // Whatever devices hold the slots now, every stripe's parity adds up.
    assert!(
        parity_consistent(&monitor.member_devices(), 0, 64),
        "parity after the races"
    );
    reactors.shutdown().unwrap();
}

#[test]
fn scrub_finds_and_repairs_parity_mismatches() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let devs: Vec<Arc<dyn BlockDevice>> = (0..4).map(|i| ram(&format!("m{i}"), 256)).collect();
    let (tx, rx) = mpsc::channel();
    let dev = Arc::new(r5(&devs, 0, FailureSink::new(tx)));
    let volume = Volume::new(reactors.set(), "r5", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev.clone(), rx, vec![]);
    let data: Vec<u8> = (0..dev.info().num_blocks as usize * 4096)
        .map(|i| (i % 251) as u8)
        .collect();
    {
        let mut ch = dev.open_channel().unwrap();
        let mut buf = data.clone();
        run_one(
            ch.as_mut(),
            rw(IoOp::Write, 0, dev.info().num_blocks, &mut buf, 1),
        )
        .unwrap();
    }
    let wait = |p: &Arc<appliance::raid::rebuild::RebuildProgress>| {
        let t = std::time::Instant::now();
        while !p.is_finished() {
            assert!(t.elapsed() < Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(p.error().is_none(), "{:?}", p.error());
    };
    let p = monitor.scrub(false).unwrap();
    wait(&p);
    assert_eq!(
        p.mismatches.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "clean after normal writes"
    );
    // Damage the parity of stripe 5 (its parity member, 3 blocks of it).
    let parity = dev.geometry().parity_member(5) as usize;
    let mut junk = vec![0xffu8; 3 * 4096];
    {
        let mut ch = devs[parity].open_channel().unwrap();
        run_one(
            ch.as_mut(),
            rw(
                IoOp::Write,
                dev.geometry().member_block(5, 1),
                3,
                &mut junk,
                2,
            ),
        )
        .unwrap();
    }
    let p = monitor.scrub(false).unwrap();
    wait(&p);
    assert_eq!(
        p.mismatches.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "check counts, changes nothing"
    );
    assert!(!parity_consistent(&devs, 0, 256));
    let p = monitor.scrub(true).unwrap();
    wait(&p);
    assert_eq!(p.mismatches.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert!(
        parity_consistent(&devs, 0, 256),
        "repair rewrote the parity"
    );
    let p = monitor.scrub(false).unwrap();
    wait(&p);
    assert_eq!(p.mismatches.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Data never changed.
    let mut ch = dev.open_channel().unwrap();
    let mut got = vec![0u8; data.len()];
    run_one(
        ch.as_mut(),
        rw(IoOp::Read, 0, dev.info().num_blocks, &mut got, 3),
    )
    .unwrap();
    assert!(got == data);
    reactors.shutdown().unwrap();
}

/// Write-back journal: random IO (reads see the cached blocks laid over
/// the members) on a small log, so the cache passes its soft limit and
/// reclaim rides on the writes while a checkpoint thread frees the log;
/// then replay puts what is still only in the log onto the members, where
/// a journal-less volume reads back exactly what the write-back one showed,
/// with parity consistent.
#[test]
fn a_write_back_raid5_conforms_reclaims_and_replays() {
    use appliance::raid::journal::{Journal, JournalMode};
    let devs: Vec<Arc<dyn BlockDevice>> = (0..4).map(|i| ram(&format!("m{i}"), 1024 + 8)).collect();
    let jdev = ram("j", 1025);
    let journal = Journal::format_with(jdev.clone(), JournalMode::WriteBack).unwrap();
    let r = Arc::new(r5(&devs, 8, FailureSink::none()).with_journal(journal.clone()));
    let geo = *r.geometry();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checkpoints = common::checkpoint_until(r.clone(), journal.clone(), stop.clone());
    conformance::run_all(r.clone(), 2, 1500);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let checkpoints = checkpoints.join().unwrap();
    let cache = journal.cache();
    assert!(
        checkpoints > 0,
        "the log never filled: the test is too small"
    );
    assert!(
        cache.len() <= 256,
        "cache above its hard limit: {}",
        cache.len()
    );
    let blocks = r.info().num_blocks;
    let mut shown = vec![0u8; blocks as usize * 4096];
    let mut ch = r.open_channel().unwrap();
    run_one(ch.as_mut(), rw(IoOp::Read, 0, blocks, &mut shown, 1)).unwrap();
    drop(ch);
    let cached = cache.len();
    drop(r);
    assert!(
        parity_consistent(&devs, 8, 1024),
        "parity inconsistent on the members"
    );
    let slots: Vec<Option<Arc<dyn BlockDevice>>> = devs.iter().cloned().map(Some).collect();
    let (j2, rep) = Journal::replay(jdev.clone(), &slots, Some(&geo)).unwrap();
    assert!(
        rep.blocks >= cached,
        "{rep:?} but {cached} blocks were cached"
    );
    assert_eq!(j2.mode(), JournalMode::WriteBack, "the mode is kept");
    let plain = r5(&devs, 8, FailureSink::none());
    let mut got = vec![0u8; shown.len()];
    let mut ch = plain.open_channel().unwrap();
    run_one(ch.as_mut(), rw(IoOp::Read, 0, blocks, &mut got, 1)).unwrap();
    let bad = (0..blocks as usize)
        .filter(|&b| got[b * 4096..(b + 1) * 4096] != shown[b * 4096..(b + 1) * 4096])
        .count();
    assert_eq!(bad, 0, "blocks differ after replay");
    assert!(
        parity_consistent(&devs, 8, 1024),
        "parity inconsistent after replay"
    );
}

/// Journal mode switches online while verified IO runs on every reactor,
/// with a member failing half-way and the checkpointer reclaiming: no IO
/// fails, every read matches, and after a last fill of the cache the
/// switch to write-through leaves it empty.
#[test]
fn journal_mode_switches_race_verified_io_and_a_member_failure() {
    use appliance::raid::journal::{Checkpointer, Journal, JournalMode};
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let faults: Vec<Arc<FaultDevice>> = (0..4)
        .map(|i| Arc::new(FaultDevice::new(ram(&format!("m{i}"), 8192))))
        .collect();
    let journal = Journal::format_with(ram("j", 2049), JournalMode::WriteBack).unwrap();
    let (tx, rx) = mpsc::channel();
    let dev =
        Arc::new(r5(&as_devs(&faults), 0, FailureSink::new(tx)).with_journal(journal.clone()));
    let volume = Volume::new(reactors.set(), "r5", dev.clone());
    let _checkpointer = Checkpointer::start(journal.clone(), volume.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    let w = Workload::start_on_volume(reactors.set(), &volume, WorkloadParams::default()).unwrap();
    let mut drained = 0;
    for round in 0..16 {
        std::thread::sleep(Duration::from_millis(40));
        if round == 8 {
            faults[1].control().pull();
        }
        let mode = if round % 2 == 0 {
            JournalMode::WriteThrough
        } else {
            JournalMode::WriteBack
        };
        journal
            .set_mode(mode, &volume, Duration::from_secs(20))
            .unwrap();
        if mode == JournalMode::WriteThrough {
            drained += 1;
        }
        assert_eq!(journal.mode(), mode);
    }
    let totals = w.stop(Duration::from_secs(10)).unwrap();
    assert!(totals.clean(), "{totals:?}");
    assert!(
        totals.reads_verified > 0 && totals.ios > totals.reads_verified,
        "{totals:?}"
    );
    assert_eq!(monitor.member_states()[1], MemberState::Failed);
    assert_eq!(drained, 8);
    assert_eq!(journal.mode(), JournalMode::WriteBack);
    // Fill the cache, then drain it for good.
    let w = Workload::start_on_volume(reactors.set(), &volume, WorkloadParams::default()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let totals = w.stop(Duration::from_secs(10)).unwrap();
    assert!(totals.clean(), "{totals:?}");
    journal
        .set_mode(JournalMode::WriteThrough, &volume, Duration::from_secs(20))
        .unwrap();
    assert!(journal.cache().is_empty());
    reactors.shutdown().unwrap();
}

/// The journal device fails under verified IO on every reactor, in both
/// modes: no IO fails (pieces caught by the failure are planned again
/// without the journal), the write-back cache drains to the members on its
/// own (the checkpointer's flushes carry the reclaim), later reads come
/// from the members and verify, and parity is consistent.
#[test]
fn a_failed_journal_is_left_behind_without_failing_io_or_losing_the_cache() {
    use appliance::raid::journal::{Checkpointer, Journal, JournalMode};
    for mode in [JournalMode::WriteThrough, JournalMode::WriteBack] {
        let reactors = Reactors::start(ReactorConfig {
            count: 2,
            ..Default::default()
        })
        .unwrap();
        let members: Vec<Arc<dyn BlockDevice>> =
            (0..4).map(|i| ram(&format!("m{i}"), 8192)).collect();
        let jfault = Arc::new(FaultDevice::new(ram("j", 4097)));
        let journal = Journal::format_with(jfault.clone() as Arc<dyn BlockDevice>, mode).unwrap();
        let (tx, rx) = mpsc::channel();
        let dev = Arc::new(r5(&members, 0, FailureSink::new(tx)).with_journal(journal.clone()));
        let volume = Volume::new(reactors.set(), "r5", dev.clone());
        let _checkpointer = Checkpointer::start(journal.clone(), volume.clone());
        let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
        // A hot set smaller than the cache (256 blocks): random writes over
        // the whole volume are mostly written through, as admission wants.
        let params = WorkloadParams {
            span_bytes: 512 << 10,
            ..Default::default()
        };
        let w = Workload::start_on_volume(reactors.set(), &volume, params).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        if mode == JournalMode::WriteBack {
            // Pulled while the cache holds blocks, which must then reach
            // the members.
            let t = std::time::Instant::now();
            while journal.cache().is_empty() {
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "the cache was never used"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        jfault.control().pull();
        std::thread::sleep(Duration::from_millis(500));
        let totals = w.stop(Duration::from_secs(10)).unwrap();
        assert!(totals.clean(), "{mode:?}: {totals:?}");
        assert!(journal.has_failed(), "{mode:?}: the failure went unnoticed");
        let t = std::time::Instant::now();
        while !journal.cache().is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{mode:?}: the cache never drained"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let w =
            Workload::start_on_volume(reactors.set(), &volume, WorkloadParams::default()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let totals = w.stop(Duration::from_secs(10)).unwrap();
        assert!(
            totals.clean() && totals.reads_verified > 0,
            "{mode:?}: {totals:?}"
        );
        assert!(monitor
            .member_states()
            .iter()
            .all(|s| *s == MemberState::InSync));
        let p = monitor.scrub(false).unwrap();
        let t = std::time::Instant::now();
        while !p.is_finished() {
            assert!(t.elapsed() < Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            p.mismatches.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "{mode:?}: parity"
        );
        // Drained, the failed journal is detached (and so recorded): its
        // log holds records older than what the members have now, which a
        // restart must not replay.
        let t = std::time::Instant::now();
        while monitor.journal().is_some() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{mode:?}: the failed journal stayed attached"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(monitor);
        reactors.shutdown().unwrap();
    }
}

/// A suspend that comes while the journal's log is full: the guest write
/// it waits for waits for log room, which only a checkpoint frees, and the
/// checkpoint flushes the members through the volume's gate. That flush
/// goes with the drain (md lets its reclaim write while a suspend drains);
/// held back until the resume, the suspend waited for its deadline.
#[test]
fn a_suspend_while_the_log_is_full_is_not_held_up_by_the_checkpoint() {
    use appliance::raid::journal::{Checkpointer, Entry, Journal, JournalMode};
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let devs: Vec<Arc<dyn BlockDevice>> = (0..3).map(|i| ram(&format!("m{i}"), 1024)).collect();
    let journal = Journal::format_with(ram("j", 130), JournalMode::WriteThrough).unwrap();
    let dev = Arc::new(r5(&devs, 0, FailureSink::none()).with_journal(journal.clone()));
    let volume = Volume::new(reactors.set(), "r5", dev);
    // Records that reached the members, not checkpointed yet, fill the log.
    let e = Entry {
        member: 0,
        count: 1,
        block: 0,
    };
    let data = vec![0u8; 4096];
    let mut filled = 0;
    loop {
        let mut r = journal.record(&[e], &[&data]);
        let Some((_, epoch)) = journal.reserve(&mut r, false) else {
            break;
        };
        journal.done(epoch);
        filled += 1;
    }
    assert!(filled > 0 && journal.usage() > 0.5, "{filled}");
    // A guest write waits for room, in flight at the gate.
    let v = volume.clone();
    let writer =
        std::thread::spawn(move || v.io(IoOp::Write, 8, vec![7u8; 4096], Duration::from_secs(60)));
    let inflight = || {
        let (tx, rx) = mpsc::channel();
        let q = volume.quiesce().clone();
        reactors
            .set()
            .send(
                0,
                Box::new(move |ctx: &mut poller::Ctx| {
                    let _ = tx.send(q.local(ctx).map(|g| g.inflight()).unwrap_or(0));
                }),
            )
            .map_err(|_| "send")
            .unwrap();
        rx.recv().unwrap()
    };
    while inflight() == 0 {
        assert!(
            !writer.is_finished(),
            "the write found room: {:?}",
            writer.join()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // The suspend starts; the checkpointer only once it has.
    let v = volume.clone();
    let suspend = std::thread::spawn(move || v.suspend(Duration::from_secs(15)).map(drop));
    while !volume.quiesce().is_suspended() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let _checkpointer = Checkpointer::start(journal.clone(), volume.clone());
    assert_eq!(
        suspend.join().unwrap(),
        Ok(()),
        "the suspend waited for the checkpoint"
    );
    writer
        .join()
        .unwrap()
        .expect("the write went on after the checkpoint");
    let back = volume
        .io(IoOp::Read, 8, vec![0u8; 4096], Duration::from_secs(10))
        .unwrap();
    assert!(back.iter().all(|&b| b == 7));
}

/// From an operator-chaos run over gRPC: a call racing `volume delete`
/// (the volume found, then removed before its change suspends it) was
/// answered INTERNAL ("no such object"). It is told the volume is gone.
#[test]
fn a_change_to_a_volume_removed_meanwhile_says_it_is_gone() {
    use appliance::raid::monitor::OpError;
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let members: Vec<Arc<dyn BlockDevice>> = (0..3).map(|i| ram(&format!("m{i}"), 1024)).collect();
    let (tx, rx) = mpsc::channel();
    let dev = Arc::new(r5(&members, 0, FailureSink::new(tx)));
    let volume = Volume::new(reactors.set(), "r5", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    volume.quiesce().remove(Duration::from_secs(10)).unwrap();
    for r in [
        monitor.fail_member("m0"),
        monitor.scrub(false).map(|_| ()),
        monitor.add_spare(ram("spare", 1024)),
    ] {
        assert!(matches!(r, Err(OpError::Gone(_))), "{r:?}");
    }
    reactors.shutdown().unwrap();
}

/// From review: replay took a write-back run to lie in one chunk, as the
/// writer makes them, and computed the parity of the first block's stripe
/// for all of it: a damaged or crafted record (its checksum good) that
/// ran into the next chunk wrote that stripe's data over the wrong rows
/// of the parity member. Such a run is replayed stripe by stripe.
#[test]
fn a_write_back_run_into_the_next_chunk_is_replayed_stripe_by_stripe() {
    use appliance::raid::journal::{Entry, Journal, JournalMode};
    let devs: Vec<Arc<dyn BlockDevice>> = (0..3).map(|i| ram(&format!("m{i}"), 64 + 8)).collect();
    let geo = *r5(&devs, 8, FailureSink::none()).geometry();
    assert_eq!(geo.chunk_blocks(), 4);
    // Parity consistent to start with (all zero), then a record for
    // member 0 of 8 blocks from its first data block: two chunks.
    let jdev = ram("j", 256);
    let journal = Journal::format_with(jdev.clone(), JournalMode::WriteBack).unwrap();
    let entries = [Entry {
        member: 0,
        count: 8,
        block: 8,
    }];
    let mut r = Vec::new();
    journal.record_header(&mut r, &entries, 8, true);
    r[4096..5 * 4096].fill(0xa1);
    r[5 * 4096..].fill(0xb2);
    let (at, _) = journal.reserve(&mut r, true).unwrap();
    let mut ch = jdev.open_channel().unwrap();
    let n = (r.len() / 4096) as u64;
    run_one(ch.as_mut(), rw(IoOp::Write, at, n, &mut r, 1)).unwrap();
    drop(ch);
    let slots: Vec<Option<Arc<dyn BlockDevice>>> = devs.iter().cloned().map(Some).collect();
    let (_, rep) = Journal::replay(jdev, &slots, Some(&geo)).unwrap();
    drop(journal);
    assert_eq!(rep.blocks, 8, "{rep:?}");
    let mut got = vec![0u8; 8 * 4096];
    let mut ch = devs[0].open_channel().unwrap();
    run_one(ch.as_mut(), rw(IoOp::Read, 8, 8, &mut got, 1)).unwrap();
    assert!(got[..4 * 4096].iter().all(|&b| b == 0xa1));
    assert!(got[4 * 4096..].iter().all(|&b| b == 0xb2));
    assert!(
        parity_consistent(&devs, 8, 64),
        "each stripe's parity matches its data"
    );
    // Member 2 holds stripe 0's parity and stripe 1's data: that data,
    // which no record wrote, is as it was.
    assert_eq!((geo.parity_member(0), geo.parity_member(1)), (2, 1));
    let mut other = vec![0xffu8; 4 * 4096];
    let mut ch = devs[2].open_channel().unwrap();
    run_one(ch.as_mut(), rw(IoOp::Read, 12, 4, &mut other, 1)).unwrap();
    assert!(
        other.iter().all(|&b| b == 0),
        "stripe 1's data on member 2 overwritten"
    );
}

/// RAID5 over three namespaces of one (software) NVMe controller, with
/// registered guest buffers: every member command of partial-stripe and
/// full-stripe writes, reads, degraded reads and a rebuild onto a fourth
/// reaches memory the controller may DMA to, so none goes through the
/// driver's bounce pages, and what is read back is what was written.
#[test]
fn raid5_over_nvme_members_moves_its_own_buffers_without_bouncing() {
    use nvme::soft::{SoftConfig, SoftController};
    let soft = SoftController::start(
        "r5-soft",
        SoftConfig {
            namespaces: vec![(4096, 1032); 4],
            ..SoftConfig::default()
        },
    )
    .unwrap();
    let ctrl = nvme::Controller::new(soft.transport(), nvme::Options::default()).unwrap();
    let devs: Vec<Arc<dyn BlockDevice>> = (1..=3)
        .map(|n| {
            Arc::new(nvme::Namespace::new(&ctrl, n, &format!("ns{n}")).unwrap())
                as Arc<dyn BlockDevice>
        })
        .collect();
    // The guest's buffer, registered as an export registers guest memory.
    let mut mem = memmap2::MmapOptions::new()
        .len(64 << 10)
        .populate()
        .map_anon()
        .unwrap();
    // SAFETY: `mem` outlives the registration, dropped first at the end,
    // with no IO in flight.
    let reg = unsafe { bdev::register_dma_memory(mem.as_mut_ptr(), mem.len()) };
    let r = r5(&devs, 8, FailureSink::none());
    let blocks = r.info().num_blocks;
    let mut model = vec![0u8; blocks as usize * 4096];
    let mut ch = r.open_channel().unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // 16 KiB chunks over three members: 8 data blocks a stripe. Writes of
    // 1..=16 blocks are partial stripes, whole ones and both.
    for i in 0..400u64 {
        let n = 1 + next(16);
        let lba = next(blocks - n + 1);
        let (a, b) = (lba as usize * 4096, (lba + n) as usize * 4096);
        let buf = &mut mem[..(n * 4096) as usize];
        if i % 3 == 2 {
            run_one(ch.as_mut(), rw(IoOp::Read, lba, n, buf, i)).unwrap();
            assert!(buf[..] == model[a..b], "read {n} blocks at {lba}");
        } else {
            for (k, x) in buf.iter_mut().enumerate() {
                *x = (k as u64 ^ i.wrapping_mul(0x9e37)) as u8;
            }
            model[a..b].copy_from_slice(buf);
            run_one(ch.as_mut(), rw(IoOp::Write, lba, n, buf, i)).unwrap();
        }
    }
    drop(ch);
    assert_eq!(ctrl.bounced_commands(), 0, "member commands bounced");
    // Degraded: the first member's share is rebuilt from the others'.
    let mut members: Vec<Member> = devs.iter().cloned().map(member).collect();
    members[0].state = MemberState::Failed;
    let degraded = Raid5Device::new(
        "r5",
        members,
        16384,
        Layout::LeftSymmetric,
        8,
        FailureSink::none(),
    )
    .unwrap();
    // Every block read back through `dev`, 64 KiB at a time into `mem`.
    let reads_back = |dev: &dyn BlockDevice, mem: &mut [u8], what: &str| {
        let mut ch = dev.open_channel().unwrap();
        for lba in (0..blocks).step_by(16) {
            run_one(ch.as_mut(), rw(IoOp::Read, lba, 16, mem, lba)).unwrap();
            let a = lba as usize * 4096;
            assert!(mem[..] == model[a..a + mem.len()], "{what} read at {lba}");
        }
    };
    reads_back(&degraded, &mut mem, "degraded");
    assert_eq!(ctrl.bounced_commands(), 0, "degraded reads bounced");
    // The fourth namespace, a spare, is rebuilt into the first slot.
    let spare: Arc<dyn BlockDevice> = Arc::new(nvme::Namespace::new(&ctrl, 4, "ns4").unwrap());
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let dev = Arc::new(r5(&devs, 8, FailureSink::new(tx)));
    let volume = Volume::new(reactors.set(), "r5", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![spare.clone()]);
    monitor.fail_member("ns1").unwrap();
    let t = std::time::Instant::now();
    while !(monitor.spares() == 0
        && monitor
            .member_states()
            .iter()
            .all(|s| *s == MemberState::InSync))
    {
        assert!(t.elapsed() < Duration::from_secs(60), "rebuild stuck");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(monitor.rebuild().is_some_and(|p| p.error().is_none()));
    reactors.shutdown().unwrap();
    assert_eq!(ctrl.bounced_commands(), 0, "the rebuild bounced");
    // In reads the controller takes (up to its 1 MiB transfer limit).
    let rebuilt = vec![spare, devs[1].clone(), devs[2].clone()];
    for k in 0..8 {
        assert!(
            parity_consistent(&rebuilt, 8 + k * 128, 128),
            "rows {}..",
            k * 128
        );
    }
    reads_back(&r5(&rebuilt, 8, FailureSink::none()), &mut mem, "rebuilt");
    drop(reg);
}

/// A journal record larger than one request to the journal's device (a
/// stripe's data and parity, against a device that takes 16 KiB) is
/// written in pieces: before, the one request was refused and the journal
/// failed at the first such write, write-hole protection gone for good.
/// Replay reads and writes in such pieces too.
#[test]
fn journal_records_larger_than_a_request_to_its_device_are_written_in_pieces() {
    use appliance::raid::journal::{Journal, JournalMode};
    for mode in [JournalMode::WriteThrough, JournalMode::WriteBack] {
        let devs: Vec<Arc<dyn BlockDevice>> =
            (0..3).map(|i| ram(&format!("m{i}"), 1024 + 8)).collect();
        let inner = ram("j", 4097);
        let jdev = common::Small::device(inner, 16 << 10);
        let journal = Journal::format_with(jdev.clone(), mode).unwrap();
        let r = r5(&devs, 8, FailureSink::none()).with_journal(journal.clone());
        let geo = *r.geometry();
        let blocks = r.info().num_blocks;
        let mut model = vec![0u8; blocks as usize * 4096];
        let mut ch = r.open_channel().unwrap();
        // Whole stripes (8 data blocks, a record of 13 with parity and
        // header) and runs across two.
        for (i, (lba, n)) in [(0u64, 8u64), (16, 8), (36, 12), (64, 16)]
            .into_iter()
            .enumerate()
        {
            let a = lba as usize * 4096;
            let buf = &mut model[a..a + n as usize * 4096];
            buf.fill(0x40 + i as u8);
            run_one(ch.as_mut(), rw(IoOp::Write, lba, n, buf, i as u64)).unwrap();
        }
        drop(ch);
        assert!(!journal.has_failed(), "{mode:?}: the journal failed");
        drop(r);
        // A crash now: the log is replayed onto the members.
        let slots: Vec<Option<Arc<dyn BlockDevice>>> = devs.iter().cloned().map(Some).collect();
        Journal::replay(jdev.clone(), &slots, Some(&geo)).unwrap();
        let plain = r5(&devs, 8, FailureSink::none());
        let mut got = vec![0u8; 80 * 4096];
        let mut ch = plain.open_channel().unwrap();
        run_one(ch.as_mut(), rw(IoOp::Read, 0, 80, &mut got, 1)).unwrap();
        assert!(got[..] == model[..80 * 4096], "{mode:?}: data after replay");
        assert!(parity_consistent(&devs, 8, 1024), "{mode:?}: parity");
    }
}

/// Removing a write-back journal drains its cache to the members, and the
/// members' volatile caches are flushed before the journal is let go: a
/// power cut right after the removal loses nothing acknowledged. Before,
/// the drain's last reclaim writes could sit in member caches only, with
/// the journal, which held them too, already erased.
#[test]
fn removing_a_write_back_journal_leaves_nothing_only_in_member_caches() {
    use appliance::raid::journal::{Journal, JournalMode};
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let rams: Vec<Arc<RamDevice>> = (0..3)
        .map(|i| {
            Arc::new(RamDevice::with_volatile_cache(&format!("m{i}"), 4096, 1024 + 8).unwrap())
        })
        .collect();
    let devs: Vec<Arc<dyn BlockDevice>> = rams
        .iter()
        .map(|d| d.clone() as Arc<dyn BlockDevice>)
        .collect();
    let journal = Journal::format_with(ram("j", 4097), JournalMode::WriteBack).unwrap();
    let (tx, rx) = mpsc::channel();
    let dev = Arc::new(r5(&devs, 8, FailureSink::new(tx)).with_journal(journal));
    let volume = Volume::new(reactors.set(), "r5", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    // Partial-stripe writes the write-back cache keeps.
    let mut model = vec![0u8; 64 * 4096];
    for (i, lba) in [3u64, 17, 30, 41, 58].into_iter().enumerate() {
        let data = vec![0x30 + i as u8; 4096];
        model[lba as usize * 4096..(lba as usize + 1) * 4096].copy_from_slice(&data);
        volume
            .io(IoOp::Write, lba, data, Duration::from_secs(10))
            .unwrap();
    }
    monitor.set_journal(None).unwrap();
    assert!(monitor.journal().is_none());
    for r in &rams {
        r.power_cut().unwrap();
    }
    let plain = r5(&devs, 8, FailureSink::none());
    let mut got = vec![0u8; 64 * 4096];
    let mut ch = plain.open_channel().unwrap();
    run_one(ch.as_mut(), rw(IoOp::Read, 0, 64, &mut got, 1)).unwrap();
    assert!(got == model, "acknowledged writes lost to the power cut");
    reactors.shutdown().unwrap();
}

/// A switch to write-through whose drain ran out of time (a member slow to
/// flush) drained only as the volume wrote: an idle volume kept its cache,
/// a removal of the journal was refused for as long as it held blocks, and
/// the superblock kept saying write-back, so a restart came back
/// write-back (audit). The drain is carried on in the background.
#[test]
fn a_drain_left_unfinished_goes_on_while_the_volume_is_idle() {
    use appliance::raid::journal::{stored_mode, Journal, JournalMode};
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let faults: Vec<Arc<FaultDevice>> = (0..3)
        .map(|i| Arc::new(FaultDevice::new(ram(&format!("m{i}"), 1024 + 8))))
        .collect();
    let devs = as_devs(&faults);
    let jdev = ram("j", 4097);
    let journal = Journal::format_with(jdev.clone(), JournalMode::WriteBack).unwrap();
    let (tx, rx) = mpsc::channel();
    let dev = Arc::new(r5(&devs, 8, FailureSink::new(tx)).with_journal(journal));
    let volume = Volume::new(reactors.set(), "r5", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![]);
    monitor.set_timeout(Duration::from_secs(1));
    let mut model = vec![0u8; 64 * 4096];
    for (i, lba) in [3u64, 17, 30, 41, 58].into_iter().enumerate() {
        let data = vec![0x40 + i as u8; 4096];
        model[lba as usize * 4096..(lba as usize + 1) * 4096].copy_from_slice(&data);
        volume
            .io(IoOp::Write, lba, data, Duration::from_secs(10))
            .unwrap();
    }
    assert!(!monitor.journal().unwrap().cache().is_empty());
    // The drain's flushes are held at one member until its call gave up.
    faults[0].control().hold(Some(IoOp::Flush), 0, 0, u64::MAX);
    monitor.set_journal_mode(JournalMode::WriteThrough).unwrap();
    assert_eq!(stored_mode(jdev.as_ref()).unwrap(), JournalMode::WriteBack);
    faults[0].control().hold(None, 0, 0, 0);
    faults[0].control().release();
    // No more IO: the drain ends, and is recorded, all the same.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stored_mode(jdev.as_ref()).unwrap() != JournalMode::WriteThrough {
        assert!(
            std::time::Instant::now() < deadline,
            "the drain stopped with {} blocks cached",
            monitor.journal().unwrap().cache().len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(monitor.journal().unwrap().cache().is_empty());
    monitor.set_journal(None).unwrap();
    let mut got = vec![0u8; 64 * 4096];
    let mut ch = r5(&devs, 8, FailureSink::none()).open_channel().unwrap();
    run_one(ch.as_mut(), rw(IoOp::Read, 0, 64, &mut got, 1)).unwrap();
    assert!(got == model, "what the cache held is on the members");
    drop(ch);
    reactors.shutdown().unwrap();
}

/// A journal whose log is too small for this volume's largest record (a
/// whole stripe of four members with 64 KiB chunks: 49 blocks with its
/// header, and parity for write-through; the log holds 66, and a record
/// may take half; the daemon refuses such a journal, a crafted superblock
/// can still claim one) is given up at the first such write, as on a
/// device failure, and the write completes without it. Before, the write
/// waited for good. (Written without a record while the journal went on,
/// older records of its stripe would be replayed over it after a crash.)
#[test]
fn a_record_too_large_for_the_log_gives_the_journal_up_instead_of_waiting() {
    use appliance::raid::journal::{Journal, JournalMode};
    for mode in [JournalMode::WriteThrough, JournalMode::WriteBack] {
        let devs: Vec<Arc<dyn BlockDevice>> =
            (0..4).map(|i| ram(&format!("m{i}"), 1024 + 8)).collect();
        let journal = Journal::format_with(ram("j", 68), mode).unwrap();
        let r = Raid5Device::new(
            "r5",
            devs.iter().cloned().map(member).collect(),
            65536,
            Layout::LeftSymmetric,
            8,
            FailureSink::none(),
        )
        .unwrap()
        .with_journal(journal.clone());
        let mut ch = r.open_channel().unwrap();
        let mut whole = vec![0x61u8; 48 * 4096];
        run_one(ch.as_mut(), rw(IoOp::Write, 0, 48, &mut whole, 1)).unwrap();
        let mut one = vec![0x62u8; 4096];
        run_one(ch.as_mut(), rw(IoOp::Write, 49, 1, &mut one, 2)).unwrap();
        let mut got = vec![0u8; 50 * 4096];
        run_one(ch.as_mut(), rw(IoOp::Read, 0, 50, &mut got, 3)).unwrap();
        assert!(got[..48 * 4096].iter().all(|&b| b == 0x61), "{mode:?}");
        assert!(got[49 * 4096..].iter().all(|&b| b == 0x62), "{mode:?}");
        assert!(
            journal.has_failed(),
            "{mode:?}: the journal was not given up"
        );
        assert!(parity_consistent(&devs, 8, 1024), "{mode:?}: parity");
    }
}

/// From review: a journal device that refuses a channel for a moment (its
/// queues all in use while the volume's queues move to a new generation)
/// either failed every new queue of the volume or, failed for good, the
/// journal. It is asked again while a record waits: the write goes through
/// the journal once the device takes a channel. One that keeps refusing
/// fails the journal after a grace period, and writes go on without it.
#[test]
fn a_journal_device_that_refuses_a_channel_for_a_moment_keeps_its_journal() {
    use appliance::raid::journal::{Journal, JournalMode};
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let members: Vec<Arc<dyn BlockDevice>> = (0..3).map(|i| ram(&format!("m{i}"), 8192)).collect();
    let jfault = Arc::new(FaultDevice::new(ram("j", 4097)));
    let journal = Journal::format_with(
        jfault.clone() as Arc<dyn BlockDevice>,
        JournalMode::WriteThrough,
    )
    .unwrap();
    let dev = Arc::new(r5(&members, 0, FailureSink::none()).with_journal(journal.clone()));
    let volume = Volume::new(reactors.set(), "r5", dev);
    let write = |byte: u8| {
        let v = volume.clone();
        std::thread::spawn(move || {
            v.io(IoOp::Write, 0, vec![byte; 4096], Duration::from_secs(60))
                .map(|_| ())
        })
    };
    // Refused while the write's channel opens and its record waits.
    let records = journal.counts().records;
    jfault.control().refuse_channels(true);
    let w = write(0x11);
    let t = std::time::Instant::now();
    while jfault.control().refused() < 2 {
        assert!(t.elapsed() < Duration::from_secs(30), "never refused");
        std::thread::sleep(Duration::from_millis(1));
    }
    jfault.control().refuse_channels(false);
    w.join().unwrap().unwrap();
    assert!(
        !journal.has_failed(),
        "a moment's refusal failed the journal"
    );
    assert!(
        journal.counts().records > records,
        "the write went without a record"
    );
    // Refused for good when the volume's queue opens again (after a
    // suspend: the volume's own requests keep their channel until then):
    // the journal is failed, the write goes on.
    drop(volume.quiesce().suspend(Duration::from_secs(60)).unwrap());
    jfault.control().refuse_channels(true);
    write(0x22).join().unwrap().unwrap();
    assert!(journal.has_failed());
    let back = volume
        .io(IoOp::Read, 0, vec![0; 4096], Duration::from_secs(60))
        .unwrap();
    assert_eq!(back, vec![0x22; 4096]);
    drop(volume);
    reactors.shutdown().unwrap();
}
