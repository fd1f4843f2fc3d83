//! Linux md reads what the appliance's RAID5 wrote, finds every parity
//! block as it expects (md's own "check"), and the appliance reads what md
//! wrote: the data area is byte for byte md's, for each layout tested.

use std::path::PathBuf;
use std::sync::Arc;

use appliance::raid::geometry::Layout;
use appliance::raid::members::{FailureSink, Member, MemberState};
use appliance::raid::raid5::Raid5Device;
use bdev::conformance::{run_one, rw};
use bdev::{BlockDevice, FileDevice, IoOp, IoRequest};

mod common;
use common::{boot, guest, random, run_with_disks};

/// Member size for `n` members: 1 MiB data offset and a 96 MiB volume.
fn member_bytes(n: u64) -> u64 {
    (1 << 20) + (96 << 20) / (n - 1)
}
const OFFSET_BLOCKS: u64 = 256;

fn volume(paths: &[PathBuf], layout: Layout, chunk: u32) -> Raid5Device {
    let members = paths
        .iter()
        .map(|p| Member {
            dev: Arc::new(FileDevice::open(p, 4096).unwrap()) as Arc<dyn BlockDevice>,
            state: MemberState::InSync,
            write_mostly: false,
            gone: Default::default(),
            errors: Default::default(),
            readd: false,
        })
        .collect();
    Raid5Device::new(
        "interop",
        members,
        chunk,
        layout,
        OFFSET_BLOCKS,
        FailureSink::none(),
    )
    .unwrap()
}

fn interop(layout: Layout, chunk: u32, n: u64) {
    let guest = guest();
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let paths: Vec<PathBuf> = (0..n)
        .map(|i| dir.path().join(format!("m{i}.img")))
        .collect();
    for p in &paths {
        FileDevice::create(p, 4096, member_bytes(n)).unwrap();
    }
    // The appliance writes 16 MiB at the start of the volume, and fills the
    // rest with data too, so md's parity check covers real content.
    let ours = random(16 << 20);
    {
        let vol = volume(&paths, layout, chunk);
        let mut ch = vol.open_channel().unwrap();
        let mut buf = ours.clone();
        run_one(ch.as_mut(), rw(IoOp::Write, 0, 4096, &mut buf, 1)).unwrap();
        let rest = vol.info().num_blocks - 4096;
        let mut fill = random(rest as usize * 4096);
        run_one(ch.as_mut(), rw(IoOp::Write, 4096, rest, &mut fill, 2)).unwrap();
        run_one(ch.as_mut(), IoRequest::flush(3)).unwrap();
    }
    let theirs = random(16 << 20);
    std::fs::write(dir.path().join("ours.bin"), &ours).unwrap();
    std::fs::write(dir.path().join("theirs.bin"), &theirs).unwrap();
    std::fs::write(
        dir.path().join("geometry"),
        format!(
            "CHUNK_K={}\nLAYOUT={}\nOFFSET_K={}\nN={n}\n",
            chunk / 1024,
            layout.name(),
            OFFSET_BLOCKS * 4
        ),
    )
    .unwrap();
    let log = dir.path().join("serial.log");
    let files: Vec<PathBuf> = ["ours.bin", "theirs.bin", "geometry"]
        .iter()
        .map(|f| dir.path().join(f))
        .collect();
    let cmd = boot(&guest, "md-guest.sh", &files, &log, &[]);
    let serial = run_with_disks(cmd, &paths, &log);
    for want in [
        "MD-READS-APPLIANCE-DATA OK",
        "MD-PARITY-CHECK OK",
        "MD-WROTE OK",
    ] {
        assert!(
            serial.contains(want),
            "guest did not report {want}:\n{serial}"
        );
    }
    // Now the appliance reads what md wrote.
    let vol = volume(&paths, layout, chunk);
    let mut ch = vol.open_channel().unwrap();
    let mut got = vec![0u8; 16 << 20];
    run_one(ch.as_mut(), rw(IoOp::Read, 32 * 256, 4096, &mut got, 4)).unwrap();
    assert!(
        got == theirs,
        "the appliance does not read md's large write"
    );
    let mut small = vec![0u8; 3 * 4096];
    run_one(ch.as_mut(), rw(IoOp::Read, 60 * 256 + 7, 3, &mut small, 5)).unwrap();
    assert!(
        small[..] == theirs[5 * 4096..8 * 4096],
        "the appliance does not read md's small writes"
    );
}

#[test]
fn md_and_the_appliance_share_raid5_left_symmetric() {
    interop(Layout::LeftSymmetric, 64 << 10, 4);
}

/// A RAID5 of two, what a takeover makes of a mirror: md's degenerate
/// RAID5, parity a copy of the data.
#[test]
fn md_and_the_appliance_share_a_raid5_of_two() {
    interop(Layout::LeftSymmetric, 32 << 10, 2);
}

#[test]
fn md_and_the_appliance_share_raid5_right_asymmetric() {
    interop(Layout::RightAsymmetric, 16 << 10, 4);
}

#[test]
fn md_and_the_appliance_share_raid1() {
    use appliance::raid::raid1::Raid1Device;
    let guest = guest();
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let paths: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("r{i}.img")))
        .collect();
    for p in &paths {
        FileDevice::create(p, 4096, 32 << 20).unwrap();
    }
    let open = || {
        let members = paths
            .iter()
            .map(|p| Member {
                dev: Arc::new(FileDevice::open(p, 4096).unwrap()) as Arc<dyn BlockDevice>,
                state: MemberState::InSync,
                write_mostly: false,
                gone: Default::default(),
                errors: Default::default(),
                readd: false,
            })
            .collect();
        Raid1Device::new("mirror", members, 0, FailureSink::none()).unwrap()
    };
    let ours = random(16 << 20);
    {
        let vol = open();
        let mut ch = vol.open_channel().unwrap();
        let mut buf = ours.clone();
        run_one(ch.as_mut(), rw(IoOp::Write, 0, 4096, &mut buf, 1)).unwrap();
        run_one(ch.as_mut(), IoRequest::flush(2)).unwrap();
    }
    let theirs = random(16 << 20);
    std::fs::write(dir.path().join("ours.bin"), &ours).unwrap();
    std::fs::write(dir.path().join("theirs.bin"), &theirs).unwrap();
    let log = dir.path().join("serial.log");
    let files: Vec<PathBuf> = ["ours.bin", "theirs.bin"]
        .iter()
        .map(|f| dir.path().join(f))
        .collect();
    let cmd = boot(&guest, "md-raid1-guest.sh", &files, &log, &[]);
    let serial = run_with_disks(cmd, &paths, &log);
    for want in ["MD-READS-APPLIANCE-DATA OK", "MD-WROTE OK"] {
        assert!(
            serial.contains(want),
            "guest did not report {want}:\n{serial}"
        );
    }
    // md wrote both halves: each member alone holds md's data.
    for p in &paths {
        let data = std::fs::read(p).unwrap();
        assert!(
            data[16 << 20..32 << 20] == theirs[..],
            "{} lacks md's write",
            p.display()
        );
    }
    let vol = open();
    let mut ch = vol.open_channel().unwrap();
    let mut got = vec![0u8; 16 << 20];
    run_one(ch.as_mut(), rw(IoOp::Read, 16 * 256, 4096, &mut got, 3)).unwrap();
    assert!(got == theirs);
}
