//! The host short of a resource: a channel refused as no room, not as
//! the device broken.

use bdev::conformance::{run_one, rw};
use bdev::{BlockDevice, FileDevice, IoOp};

/// A host out of file descriptors (or memory) refuses a file device's
/// channel as no room now, not as the device broken: a RAID member is not
/// failed for it. In a test binary of its own: the lowered limit is the
/// process's, and would touch tests running beside it in one process.
#[test]
fn a_host_out_of_file_descriptors_refuses_a_channel_as_no_room() {
    let dir = tempfile::tempdir().unwrap();
    let dev = FileDevice::create(&dir.path().join("m"), 4096, 1 << 20).unwrap();
    let mut was = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain calls with a valid out-pointer.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut was) }, 0);
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    let low = libc::rlimit {
        rlim_cur: highest + 1,
        rlim_max: was.rlim_max,
    };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
    // Every descriptor below the limit in use.
    let mut fillers = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        fillers.push(f);
    }
    let refused = dev.open_channel().map(|_| ());
    drop(fillers);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &was) }, 0);
    match refused {
        Err(bdev::BdevError::Exhausted(why)) => assert!(why.contains("io_uring"), "{why}"),
        other => panic!("expected no room, got {other:?}"),
    }
    // The device itself is fine.
    let mut ch = dev.open_channel().unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        run_one(ch.as_mut(), rw(IoOp::Read, 0, 1, &mut buf, 1)),
        Ok(())
    );
}
