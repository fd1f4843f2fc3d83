//! The journal's log always finds room again: a record refused room well
//! below half full gets a checkpoint, and reclaiming the write-back cache
//! never needs more log than guest records leave it.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use appliance::raid::geometry::Layout;
use appliance::raid::journal::{Checkpointer, Entry, Journal, JournalMode};
use appliance::raid::members::{FailureSink, Member, MemberSet, MemberState};
use appliance::raid::raid5::Raid5Device;
use appliance::volume::{Volume, VolumeError};
use bdev::{BlockDevice, IoOp, RamDevice};
use poller::{ReactorConfig, Reactors};

const BS: usize = 4096;

fn ram(name: &str, blocks: u64) -> Arc<dyn BlockDevice> {
    Arc::new(RamDevice::new(name, BS as u32, blocks).unwrap())
}

/// A RAID5 of three RAM members in `chunk` byte chunks with `journal`.
fn raid5(reactors: &Reactors, chunk: u32, journal: &Arc<Journal>) -> Volume {
    let members = (0..3)
        .map(|i| Member::new(ram(&format!("m{i}"), 4096), MemberState::InSync))
        .collect();
    let (tx, _rx) = mpsc::channel();
    let dev = Raid5Device::new(
        "r5",
        members,
        chunk,
        Layout::LeftSymmetric,
        0,
        FailureSink::new(tx),
    )
    .unwrap()
    .with_journal(journal.clone());
    Volume::new(reactors.set(), "r5", Arc::new(dev))
}

/// From an audit: a write whose record does not fit before the end of
/// the log's lap skips to the next one, and was refused room with the log
/// under half full; the checkpointer looked only at usage, so the write
/// waited for good.
#[test]
fn a_record_refused_room_below_half_full_gets_a_checkpoint() {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let journal = Journal::format(ram("j", 132)).unwrap();
    let l = journal.log_blocks();
    let volume = raid5(&reactors, 65536, &journal);
    // Two-block records (reserved, done, never written: only the log's
    // head and tail matter) up to 30 % of the log, a checkpoint, then up
    // to 77 %: under half the log in use, at a place where a full
    // stripe's record (1 + 32 + 16 blocks) does not fit before the lap's
    // end, nor after it.
    let record = || {
        journal.record(
            &[Entry {
                member: 0,
                count: 1,
                block: 0,
            }],
            &[&[0u8; BS][..]],
        )
    };
    let fill = |until: u64| {
        let mut n = 0;
        while n + 2 <= until {
            let mut r = record();
            let (_, epoch) = journal.reserve(&mut r, true).unwrap();
            journal.done(epoch);
            n += 2;
        }
    };
    fill(l * 3 / 10);
    assert!(journal.checkpoint(|| Ok(())).unwrap());
    fill(l * 77 / 100 - l * 3 / 10);
    assert!(journal.usage() < 0.5, "{}", journal.usage());
    let _checkpointer = Checkpointer::start(journal.clone(), volume.clone());
    let data = vec![0x3cu8; 32 * BS];
    volume
        .io(IoOp::Write, 0, data.clone(), Duration::from_secs(10))
        .expect("the write found room");
    assert_eq!(
        volume
            .io(IoOp::Read, 0, vec![0u8; 32 * BS], Duration::from_secs(10))
            .unwrap(),
        data
    );
    drop(_checkpointer);
    reactors.shutdown().unwrap();
}

/// From an audit: reclaiming a cached run that crosses from one chunk
/// into the next logged parity for every row between (a whole 512 KiB
/// chunk for two blocks), while guest records leave three log blocks a
/// cached block free: reclaim waited for room that only a checkpoint
/// makes, and the checkpoint waited for the reclaim. Runs are reclaimed
/// chunk by chunk.
#[test]
fn reclaiming_runs_across_chunks_fits_the_room_left_for_it() {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let journal = Journal::format_with(ram("j", 1026), JournalMode::WriteBack).unwrap();
    let volume = raid5(&reactors, 512 << 10, &journal);
    let _checkpointer = Checkpointer::start(journal.clone(), volume.clone());
    let t = Duration::from_secs(20);
    // Two blocks across the boundary of chunks 0 and 1 of stripes 0..8
    // (a stripe is 256 blocks): all cached.
    for s in 0..8u64 {
        volume
            .io(IoOp::Write, s * 256 + 127, vec![s as u8 + 1; 2 * BS], t)
            .unwrap();
    }
    // Writes elsewhere fill the log and make the checkpoints reclaim.
    for i in 0..200u64 {
        volume
            .io(IoOp::Write, 8 * 256 + (i * 7) % 1024, vec![0xee; BS], t)
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    for s in 0..8u64 {
        let got = volume
            .io(IoOp::Read, s * 256 + 127, vec![0u8; 2 * BS], t)
            .unwrap();
        assert!(got.iter().all(|&b| b == s as u8 + 1), "stripe {s}");
    }
    drop(_checkpointer);
    reactors.shutdown().unwrap();
}

/// From an audit: a guest write waiting for room in the log waited for
/// good once a second member failed while a rebuild was under way. Room
/// comes only from a checkpoint, and a checkpoint flushes the members,
/// which fails on a volume that lost data; so the write never completed,
/// and every suspend of the volume (a delete included) waited for it. It
/// fails now, though its own stripe (below the rebuild's cursor) is
/// still served.
#[test]
fn a_write_waiting_for_room_fails_once_the_volume_loses_data() {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let journal = Journal::format_with(ram("j", 132), JournalMode::WriteBack).unwrap();
    // Member 2 is being rebuilt and has reached stripe 128 of 256.
    let members: Vec<Member> = (0..3)
        .map(|i| {
            let state = if i == 2 {
                MemberState::Rebuilding
            } else {
                MemberState::InSync
            };
            Member::new(ram(&format!("m{i}"), 4096), state)
        })
        .collect();
    let gone0 = members[0].gone.clone();
    let (tx, _rx) = mpsc::channel();
    let mut set = MemberSet::new(members, FailureSink::new(tx));
    set.rebuilding = Some((2, Arc::new(AtomicU64::new(128))));
    let dev = Raid5Device::over("r5", set, 65536, Layout::LeftSymmetric, 0)
        .unwrap()
        .with_journal(journal.clone());
    assert_eq!(dev.geometry().stripes(), 256);
    let volume = Volume::new(reactors.set(), "r5", Arc::new(dev));
    let t = Duration::from_secs(20);
    volume.io(IoOp::Write, 0, vec![0x5a; BS], t).unwrap();
    // Fill the log (records reserved and done, never written), with no
    // checkpointer to free it.
    loop {
        let mut r = journal.record(
            &[Entry {
                member: 0,
                count: 1,
                block: 0,
            }],
            &[&[0u8; BS][..]],
        );
        match journal.reserve(&mut r, true) {
            Some((_, epoch)) => journal.done(epoch),
            None => break,
        }
    }
    journal.take_room_wanted();
    let (done_tx, done_rx) = mpsc::channel();
    let v = volume.clone();
    let writer = std::thread::spawn(move || {
        let _ = done_tx.send(v.io(IoOp::Write, 1, vec![0xa5; BS], t));
    });
    // The write is refused room.
    let since = std::time::Instant::now();
    while !journal.take_room_wanted() {
        assert!(since.elapsed() < t, "the write was never refused room");
        assert!(done_rx.try_recv().is_err(), "the write found room");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Member 0 fails: every stripe from 128 on has two members down.
    gone0.store(true, Ordering::SeqCst);
    let got = done_rx
        .recv_timeout(t + Duration::from_secs(10))
        .expect("the write never answered");
    writer.join().unwrap();
    match got {
        Err(VolumeError::Io { .. }) => {}
        other => panic!("the waiting write should fail at once, got {other:?}"),
    }
    // Below the rebuild's cursor the volume still reads, from members 1
    // and 2.
    assert_eq!(
        volume.io(IoOp::Read, 0, vec![0u8; BS], t).unwrap(),
        vec![0x5a; BS]
    );
    reactors.shutdown().unwrap();
}
