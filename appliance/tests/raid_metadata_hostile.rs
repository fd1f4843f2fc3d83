//! Member superblocks are the disks' word, not ours: a power cut in the
//! middle of an update, or a superblock whose fields do not fit its
//! device, must neither stop a volume that md would start nor start one
//! on data it cannot trust.

use std::sync::Arc;

use appliance::raid::assembly::{assemble, create, read_superblock, write_superblock, VolumeSpec};
use appliance::raid::members::{FailureSink, MemberState};
use appliance::raid::superblock::{Level, Superblock};
use bdev::{BlockDevice, RamDevice};

fn rams(n: usize) -> Vec<Arc<dyn BlockDevice>> {
    (0..n)
        .map(|i| {
            Arc::new(RamDevice::new(&format!("m{i}"), 4096, 2048 + 256).unwrap())
                as Arc<dyn BlockDevice>
        })
        .collect()
}

/// `n` RAM devices holding a new RAID5 volume.
fn raid5(n: usize) -> Vec<Arc<dyn BlockDevice>> {
    let devs = rams(n);
    create(
        &VolumeSpec::new("vol0", Level::Raid5, devs.clone()),
        FailureSink::none(),
        false,
    )
    .unwrap();
    devs
}

/// Read, change and write back member `m`'s superblock.
fn edit(dev: &dyn BlockDevice, change: impl FnOnce(&mut Superblock)) {
    let mut sb = read_superblock(dev).unwrap().unwrap();
    change(&mut sb);
    write_superblock(dev, &sb).unwrap();
}

/// Point 8: a superblock update reached members 0 and 1 only (a power
/// cut; members are written one after the other, before any IO of the new
/// state). The two one event behind were taken as stale: a RAID5 that md
/// starts refused to. Within md's margin of one they are current; a member
/// two events behind is still stale.
#[test]
fn members_one_event_behind_after_an_interrupted_update_are_current() {
    let devs = raid5(4);
    for d in &devs[..2] {
        edit(d.as_ref(), |sb| sb.events += 1);
    }
    let report = assemble(&devs, |_| FailureSink::none());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.volumes.len(), 1, "{:?}", report.problems);
    let v = &report.volumes[0];
    assert!(v.stale.is_empty(), "{:?}", v.stale);
    assert!(v
        .device
        .member_states()
        .iter()
        .all(|s| *s == MemberState::InSync));
    // A member the last update failed keeps its older superblock, one
    // event behind: it stays stale.
    for d in &devs[..3] {
        edit(d.as_ref(), |sb| {
            sb.events += 1;
            sb.slot_states[3] = MemberState::Failed.code();
        });
    }
    let report = assemble(&devs, |_| FailureSink::none());
    let v = &report.volumes[0];
    assert_eq!(v.stale, vec!["m3".to_string()]);
    for d in &devs[..3] {
        edit(d.as_ref(), |sb| {
            sb.slot_states[3] = MemberState::InSync.code()
        });
    }
    edit(devs[3].as_ref(), |sb| sb.events += 1);
    // Two events ahead of member 3: it is stale, and the volume degraded.
    for d in &devs[..3] {
        edit(d.as_ref(), |sb| sb.events += 1);
    }
    let report = assemble(&devs, |_| FailureSink::none());
    let v = &report.volumes[0];
    assert_eq!(v.stale, vec!["m3".to_string()]);
    assert_eq!(v.device.member_states()[3], MemberState::Failed);
}

/// Point 9: a rebuild checkpoint at or past the last row made assembly
/// resume a rebuild with nothing left to copy, so a member that was never
/// rebuilt counted as in sync. It starts over instead.
#[test]
fn a_rebuild_checkpoint_past_the_end_starts_the_rebuild_over() {
    let devs = raid5(3);
    for d in &devs {
        edit(d.as_ref(), |sb| {
            sb.slot_states[2] = MemberState::Rebuilding.code();
            sb.rebuild_checkpoint = u64::MAX - 1;
        });
    }
    let report = assemble(&devs, |_| FailureSink::none());
    assert_eq!(report.volumes.len(), 1, "{:?}", report.problems);
    assert_eq!(
        report.volumes[0].device.member_states()[2],
        MemberState::Rebuilding,
        "a member never rebuilt must not count as in sync"
    );
    // Its rebuild starts from the first row, not past the last (from
    // where it would end at once and mark the member in sync).
    let set = report.volumes[0].device.member_set();
    let (slot, cursor) = set.rebuilding.as_ref().expect("a rebuild to resume");
    assert_eq!(*slot, 2);
    assert_eq!(cursor.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Point 9: data offset and size are checked against the device at every
/// assembly, not only at create: a member whose superblock puts data past
/// its end, or over the superblock, is reported and not used.
#[test]
fn a_superblock_whose_data_does_not_fit_its_device_is_reported() {
    let devs = raid5(4);
    edit(devs[1].as_ref(), |sb| sb.data_blocks = u64::MAX - 10);
    edit(devs[2].as_ref(), |sb| sb.data_offset = 0);
    let report = assemble(&devs, |_| FailureSink::none());
    let named = |n: &str, what: &str| {
        report
            .problems
            .iter()
            .any(|(d, why)| d == n && why.contains(what))
    };
    assert!(
        named("m1", "past the end of the device"),
        "{:?}",
        report.problems
    );
    assert!(
        named("m2", "overlaps the superblock"),
        "{:?}",
        report.problems
    );
    assert!(
        report.volumes.is_empty(),
        "two of four members are unusable"
    );
}

/// A member whose superblock is older than its peers' and of another
/// geometry (a takeover's or reshape's record a power cut kept from it)
/// refused the whole volume as "disagrees with its peers": it is stale,
/// as md takes it, and the volume starts without it. A current member of
/// another geometry still disagrees.
#[test]
fn an_older_member_of_another_geometry_is_stale_not_a_refusal() {
    for behind in [1, 2] {
        let devs = raid5(4);
        for d in &devs[..3] {
            edit(d.as_ref(), |sb| sb.events += behind);
        }
        edit(devs[3].as_ref(), |sb| sb.chunk_bytes /= 2);
        let report = assemble(&devs, |_| FailureSink::none());
        assert!(
            report.problems.is_empty(),
            "{behind}: {:?}",
            report.problems
        );
        assert_eq!(report.volumes.len(), 1, "{behind}");
        let v = &report.volumes[0];
        assert_eq!(v.stale, vec!["m3".to_string()], "{behind}");
        assert!(
            v.members[3].is_none(),
            "{behind}: the old one fills no slot"
        );
    }
    let devs = raid5(4);
    edit(devs[3].as_ref(), |sb| sb.chunk_bytes /= 2);
    let report = assemble(&devs, |_| FailureSink::none());
    assert!(
        report
            .problems
            .iter()
            .any(|(d, why)| d == "m3" && why.contains("geometry")),
        "{:?}",
        report.problems
    );
}

/// A change count at the top of its range would wrap at the next recorded
/// change (a panic with overflow checks), and a member at a wrapped count
/// looks older than stale ones: such a superblock is refused as invalid.
#[test]
fn an_event_count_that_would_wrap_is_refused() {
    // Just below the limit too: the volume started, and every record
    // after its first was refused (review).
    for events in [u64::MAX, 1 << 62, (1 << 62) - 2] {
        let devs = raid5(3);
        edit(devs[0].as_ref(), |sb| sb.events = events);
        match read_superblock(devs[0].as_ref()).unwrap() {
            Err(e) => assert!(e.to_string().contains("events"), "{e}"),
            Ok(sb) => panic!("taken with events {}", sb.events),
        }
        let report = assemble(&devs, |_| FailureSink::none());
        assert!(
            report.problems.iter().any(|(d, _)| d == "m0"),
            "{:?}",
            report.problems
        );
    }
}

/// From an audit: two mirrors that each ran with the other failed (a
/// start with only one readable, then one with only the other) hold
/// different writes; assembly took one by device order and said nothing,
/// and the other's writes were rebuilt over unremarked. The newest is
/// still the volume (as md's assembly takes it), and the other is named.
#[test]
fn members_that_each_ran_without_the_other_are_named() {
    let devs = rams(2);
    create(
        &VolumeSpec::new("vol0", Level::Raid1, devs.clone()),
        FailureSink::none(),
        false,
    )
    .unwrap();
    for (me, other) in [(0, 1), (1, 0)] {
        edit(devs[me].as_ref(), |sb| {
            sb.events += 2;
            sb.slot_states[other] = MemberState::Failed.code();
        });
    }
    for order in [[0, 1], [1, 0]] {
        let given: Vec<_> = order.iter().map(|&i| devs[i].clone()).collect();
        let report = assemble(&given, |_| FailureSink::none());
        assert_eq!(report.volumes.len(), 1, "{:?}", report.problems);
        let taken = order[0];
        let left = &report.problems;
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].0, format!("m{}", order[1]));
        assert!(
            left[0].1.contains("split brain") && left[0].1.contains(&format!("m{taken}")),
            "{left:?}"
        );
        assert_eq!(
            report.volumes[0].device.member_states()[order[1]],
            MemberState::Failed
        );
    }
}

/// From review: a three-way mirror lost slot 0, then slot 1 (its last
/// superblock says slot 0 failed); a new disk rebuilds slot 0 while the
/// failed one waits as a spare, and the machine crashes. The rebuilding
/// member was taken as the reference (first of the newest), and with it
/// the waiting spare looked like a split brain, which refuses the volume.
/// An in-sync member is the reference: nothing is named, the rebuild
/// resumes.
#[test]
fn a_member_being_rebuilt_is_not_the_reference_when_an_in_sync_one_is_as_new() {
    let devs = rams(3);
    create(
        &VolumeSpec::new("vol0", Level::Raid1, devs.clone()),
        FailureSink::none(),
        false,
    )
    .unwrap();
    let (rebuilding, failed, in_sync) = (
        MemberState::Rebuilding.code(),
        MemberState::Failed.code(),
        MemberState::InSync.code(),
    );
    // Slot 1 failed second: it recorded slot 0 failed, then nothing.
    edit(devs[1].as_ref(), |sb| {
        sb.events += 1;
        sb.slot_states = vec![failed, in_sync, in_sync];
    });
    // Slots 0 (being rebuilt) and 2 recorded everything since.
    for d in [&devs[0], &devs[2]] {
        edit(d.as_ref(), |sb| {
            sb.events += 3;
            sb.slot_states = vec![rebuilding, failed, in_sync];
        });
    }
    let report = assemble(&devs, |_| FailureSink::none());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.volumes.len(), 1);
    let states = report.volumes[0].device.member_states();
    assert_eq!(states[2], MemberState::InSync, "{states:?}");
    assert_eq!(states[1], MemberState::Failed, "{states:?}");
}
