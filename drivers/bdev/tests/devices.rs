//! Every device passes the conformance suite; fault injection and DMA
//! buffers do what they say.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::conformance::{self, run_one, rw};
use bdev::{
    BlockDevice, DmaPool, FaultDevice, FileDevice, IoError, IoOp, IoRequest, NullDevice, RamDevice,
};

#[test]
fn ram_4k_conforms() {
    let dev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("ram0", 4096, 2048).unwrap());
    conformance::run_all(dev, 2, 3000);
}

#[test]
fn ram_512_conforms() {
    let dev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("ram1", 512, 8192).unwrap());
    conformance::run_all(dev, 2, 3000);
}

#[test]
fn volatile_ram_conforms_and_loses_only_unflushed_writes() {
    let dev = Arc::new(RamDevice::with_volatile_cache("ram2", 4096, 1024).unwrap());
    conformance::run_all(dev.clone(), 2, 2000);
    conformance::power_cut_semantics(dev.as_ref(), &|| {});
}

#[test]
fn file_on_disk_conforms() {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let dev = FileDevice::create(&dir.path().join("member0"), 4096, 8 << 20).unwrap();
    println!("direct IO: {}", dev.uses_direct_io());
    conformance::run_all(Arc::new(dev), 2, 2000);
}

#[test]
fn file_on_tmpfs_conforms_512() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let dev = FileDevice::create(&dir.path().join("member1"), 512, 4 << 20).unwrap();
    conformance::run_all(Arc::new(dev), 2, 2000);
}

#[test]
fn file_data_persists_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    {
        let dev = FileDevice::create(&path, 4096, 1 << 20).unwrap();
        let mut ch = dev.open_channel().unwrap();
        let mut buf = vec![0x42u8; 8192];
        run_one(ch.as_mut(), rw(IoOp::Write, 3, 2, &mut buf, 1)).unwrap();
        run_one(ch.as_mut(), IoRequest::flush(2)).unwrap();
    }
    let dev = FileDevice::open(&path, 4096).unwrap();
    assert_eq!(dev.info().num_blocks, 256);
    let mut ch = dev.open_channel().unwrap();
    let mut buf = vec![0u8; 8192];
    run_one(ch.as_mut(), rw(IoOp::Read, 3, 2, &mut buf, 3)).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
}

#[test]
fn bad_device_parameters_are_refused() {
    assert!(RamDevice::new("x", 1000, 10).is_err());
    assert!(RamDevice::new("x", 4096, 0).is_err());
    assert!(RamDevice::new("x", 4096, u64::MAX).is_err());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("odd");
    std::fs::write(&p, vec![0u8; 1000]).unwrap();
    let e = FileDevice::open(&p, 512)
        .err()
        .expect("odd size refused")
        .to_string();
    assert!(e.contains("multiple of the block size"), "{e}");
    assert!(FileDevice::open(&dir.path().join("missing"), 512).is_err());
    assert!(
        FileDevice::open(dir.path(), 512).is_err(),
        "a directory is not a device"
    );
    assert!(RamDevice::new("x", 4096, 16).unwrap().power_cut().is_err());
}

#[test]
fn fault_wrapper_conforms_when_healthy() {
    let inner: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("ram3", 4096, 1024).unwrap());
    conformance::run_all(Arc::new(FaultDevice::new(inner)), 2, 2000);
}

#[test]
fn fault_wrapper_fails_ranges_pulls_and_delays() {
    let inner: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("ram4", 4096, 256).unwrap());
    let dev = FaultDevice::new(inner);
    let ctl = dev.control();
    let mut ch = dev.open_channel().unwrap();
    let ch = ch.as_mut();
    let mut buf = vec![1u8; 4096 * 4];
    ctl.fail_reads(10, 20);
    assert_eq!(
        run_one(ch, rw(IoOp::Read, 8, 4, &mut buf, 1)),
        Err(IoError::Media(10))
    );
    assert_eq!(run_one(ch, rw(IoOp::Read, 20, 4, &mut buf, 2)), Ok(()));
    assert_eq!(
        run_one(ch, rw(IoOp::Write, 12, 4, &mut buf, 3)),
        Ok(()),
        "writes unaffected"
    );
    ctl.fail_writes(100, 101);
    assert_eq!(
        run_one(ch, rw(IoOp::Write, 97, 4, &mut buf, 4)),
        Err(IoError::Media(100))
    );
    assert_eq!(
        run_one(ch, IoRequest::range(IoOp::Discard, 100, 1, 5)),
        Err(IoError::Media(100))
    );
    ctl.pull();
    assert_eq!(
        run_one(ch, rw(IoOp::Read, 0, 1, &mut buf[..4096], 6)),
        Err(IoError::DeviceFailed)
    );
    assert_eq!(run_one(ch, IoRequest::flush(7)), Err(IoError::DeviceFailed));
    assert!(ctl.injected() >= 4);
    ctl.heal();
    ctl.set_latency(Duration::from_millis(30));
    let t = Instant::now();
    assert_eq!(
        run_one(ch, rw(IoOp::Read, 0, 1, &mut buf[..4096], 8)),
        Ok(())
    );
    assert!(
        t.elapsed() >= Duration::from_millis(30),
        "latency was added"
    );
}

#[test]
fn fault_wrapper_power_cut_drops_unflushed_writes() {
    let inner: Arc<dyn BlockDevice> =
        Arc::new(RamDevice::with_volatile_cache("ram5", 4096, 256).unwrap());
    let dev = FaultDevice::new(inner);
    let ctl = dev.control();
    // After the cut the device is dead until powered on.
    {
        let mut ch = dev.open_channel().unwrap();
        dev.power_cut().unwrap();
        let mut buf = vec![0u8; 4096];
        assert_eq!(
            run_one(ch.as_mut(), rw(IoOp::Read, 0, 1, &mut buf, 1)),
            Err(IoError::DeviceFailed)
        );
        ctl.heal();
    }
    conformance::power_cut_semantics(&dev, &|| ctl.heal());
}

#[test]
fn dma_pool_hands_out_distinct_aligned_buffers_and_pushes_back() {
    let pool = DmaPool::new(8, 64 << 10).unwrap();
    println!("hugepages: {}", pool.is_hugepage());
    let (base, len) = pool.region();
    assert!(len >= 8 * (64 << 10));
    let mut bufs: Vec<_> = (0..8).map(|_| pool.alloc().expect("buffer")).collect();
    assert!(pool.alloc().is_none(), "exhausted pool refuses");
    let mut addrs: Vec<usize> = bufs.iter().map(|b| b.addr() as usize).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 8);
    for a in &addrs {
        assert_eq!(a % 4096, 0);
        assert!(*a >= base && *a + (64 << 10) <= base + len);
    }
    for (i, b) in bufs.iter_mut().enumerate() {
        b.as_mut_slice().fill(i as u8);
    }
    for (i, b) in bufs.iter().enumerate() {
        assert!(b.as_slice().iter().all(|&x| x == i as u8));
    }
    bufs.pop();
    assert_eq!(pool.available(), 1);
    assert!(pool.alloc().is_some());
    assert!(DmaPool::new(1, 1000).is_err());
    assert!(DmaPool::new(0, 4096).is_err());
}

#[test]
fn dma_pool_uses_hugepages_when_reserved() {
    let free: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("HugePages_Free:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let pool = DmaPool::new(4, 1 << 20).unwrap();
    if free >= 2 {
        assert!(
            pool.is_hugepage(),
            "{free} hugepages free but the pool did not use them"
        );
        assert_eq!(pool.region().0 % (2 << 20), 0);
    } else {
        assert!(!pool.is_hugepage());
    }
}

#[test]
fn null_device_accepts_good_requests_and_refuses_bad_ones() {
    let dev = NullDevice::new("null0", 4096, 1024).unwrap();
    let mut ch = dev.open_channel().unwrap();
    conformance::bad_requests_shape_only(ch.as_mut(), &dev);
    assert!(NullDevice::new("x", 100, 10).is_err());
    assert!(NullDevice::new("x", 4096, 0).is_err());
}

/// Grow `dev` from 256 to 512 blocks (of 4 KiB) and back to 128: what was
/// written stays where it was, the new tail reads as zeroes and takes
/// writes, the new device conforms, and the old object is left as it was.
fn resizes_keeping_contents(dev: Arc<dyn BlockDevice>) {
    assert_eq!(dev.info().num_blocks, 256);
    let mut ch = dev.open_channel().unwrap();
    let mut head = conformance::Aligned::new(8192);
    head.buf().fill(0x5a);
    run_one(ch.as_mut(), rw(IoOp::Write, 254, 2, head.buf(), 1)).unwrap();
    run_one(ch.as_mut(), IoRequest::flush(2)).unwrap();
    drop(ch);
    let grown = dev.resized(512).unwrap();
    assert_eq!(grown.info().num_blocks, 512);
    assert_eq!(grown.info().name, dev.info().name);
    assert_eq!(dev.info().num_blocks, 256);
    let mut ch = grown.open_channel().unwrap();
    let mut back = conformance::Aligned::new(8192);
    run_one(ch.as_mut(), rw(IoOp::Read, 254, 2, back.buf(), 3)).unwrap();
    assert!(back.buf().iter().all(|&b| b == 0x5a));
    run_one(ch.as_mut(), rw(IoOp::Read, 256, 2, back.buf(), 4)).unwrap();
    assert!(
        back.buf().iter().all(|&b| b == 0),
        "the new tail is not zero"
    );
    run_one(ch.as_mut(), rw(IoOp::Write, 510, 2, head.buf(), 5)).unwrap();
    drop(ch);
    conformance::run_all(grown.clone(), 2, 500);
    let shrunk = grown.resized(128).unwrap();
    assert_eq!(shrunk.info().num_blocks, 128);
    let mut ch = shrunk.open_channel().unwrap();
    assert!(matches!(
        run_one(
            ch.as_mut(),
            rw(IoOp::Read, 128, 1, &mut back.buf()[..4096], 6)
        ),
        Err(IoError::OutOfRange { .. })
    ));
}

#[test]
fn ram_file_null_and_fault_devices_resize_keeping_contents() {
    resizes_keeping_contents(Arc::new(RamDevice::new("r", 4096, 256).unwrap()));
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("grow");
    resizes_keeping_contents(Arc::new(FileDevice::create(&path, 4096, 1 << 20).unwrap()));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 128 * 4096);
    let fault = FaultDevice::new(Arc::new(RamDevice::new("f", 4096, 256).unwrap()));
    let control = fault.control();
    resizes_keeping_contents(Arc::new(fault));
    assert_eq!(control.injected(), 0);
    let null = NullDevice::new("n", 4096, 256).unwrap();
    assert_eq!(null.resized(512).unwrap().info().num_blocks, 512);
    // A simulated volatile cache is a test mode that does not resize.
    let volatile = RamDevice::with_volatile_cache("v", 4096, 256).unwrap();
    assert!(matches!(
        volatile.resized(512),
        Err(bdev::BdevError::Unsupported(_))
    ));
}

/// A reactor polls its channel in a tight loop and makes no system call of
/// its own while it waits: io_uring completions must still reach it (the
/// kernel hands them over as task work, run only when the thread enters
/// the kernel; a ring whose poll never entered would hang here). Each
/// request is polled for alone, on a pinned thread that shares its core
/// with spinning ones, as on a busy appliance.
#[test]
fn file_channel_completes_while_polled_without_system_calls() {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let dev = FileDevice::create(&dir.path().join("polled"), 4096, 4 << 20).unwrap();
    let mut ch = dev.open_channel().unwrap();
    let mut buf = conformance::Aligned::new(4096);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Spinners on every core, as the other reactors are.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spinners: Vec<_> = (0..cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    // Pinned, as a reactor is.
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    let mut worst = Duration::ZERO;
    let mut out = Vec::new();
    for i in 0..3000u64 {
        let op = if i % 2 == 0 { IoOp::Write } else { IoOp::Read };
        let lba = (i * 7) % 1024;
        ch.submit(rw(op, lba, 1, buf.buf(), i)).unwrap();
        let t = Instant::now();
        out.clear();
        while out.is_empty() {
            ch.poll(&mut out);
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "request {i} not completed after {:?} of polling",
                t.elapsed()
            );
        }
        assert_eq!(out[0].tag, i);
        assert!(out[0].result.is_ok(), "{:?}", out[0].result);
        worst = worst.max(t.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    println!("worst completion seen after {worst:?}");
}

/// Resident memory of this process, from /proc/self/status.
fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib << 10
}

/// A RAM device is allocated when it is made, not by the first write to
/// each page (which would fault and zero the page on a reactor); one the
/// host cannot hold is refused instead of being handed to the OOM killer.
#[test]
fn a_ram_device_is_resident_when_made_and_one_too_large_is_refused() {
    let before = rss_bytes();
    let dev = RamDevice::new("resident", 4096, 64 << 8).unwrap();
    let grew = rss_bytes().saturating_sub(before);
    assert!(grew >= 60 << 20, "only {grew} bytes resident of 64 MiB");
    drop(dev);
    let total = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        << 10;
    let blocks = (total + (1 << 30)) / 4096;
    let e = RamDevice::new("too-large", 4096, blocks).err().unwrap();
    assert!(e.to_string().contains("available"), "{e}");
}

/// A RAM channel's writes are visible to another core once their
/// completion is seen: the non-temporal stores are fenced before a poll
/// hands completions out, not merely issued. One thread writes a block,
/// polls its completion and publishes the sequence number (a release store
/// does not order non-temporal stores); the other reads the block through a
/// channel of its own after acquiring that number and must find it there.
#[test]
fn ram_writes_are_visible_to_another_core_once_completed() {
    use std::sync::atomic::{AtomicU64, Ordering};
    const ROUNDS: u64 = 20_000;
    const BLOCKS: u64 = 64;
    let dev = Arc::new(RamDevice::new("vis", 4096, BLOCKS).expect("ram device"));
    let published = Arc::new(AtomicU64::new(0));
    let writer = {
        let (dev, published) = (dev.clone(), published.clone());
        std::thread::spawn(move || {
            let mut ch = dev.open_channel().expect("channel");
            let mut buf = conformance::Aligned::new(4096);
            let mut out = Vec::new();
            for seq in 1..=ROUNDS {
                for word in buf.buf().chunks_exact_mut(8) {
                    word.copy_from_slice(&seq.to_le_bytes());
                }
                ch.submit(rw(IoOp::Write, seq % BLOCKS, 1, buf.buf(), seq))
                    .expect("submit");
                out.clear();
                while ch.poll(&mut out) == 0 {}
                assert!(out[0].result.is_ok(), "write {seq}: {:?}", out[0].result);
                published.store(seq, Ordering::Release);
            }
        })
    };
    let mut ch = dev.open_channel().expect("channel");
    let mut buf = conformance::Aligned::new(4096);
    let mut out = Vec::new();
    let mut seen = 0;
    while seen < ROUNDS {
        let seq = published.load(Ordering::Acquire);
        if seq == seen {
            // A writer that panicked publishes nothing more: its join
            // below reports why.
            if writer.is_finished() && published.load(Ordering::Acquire) == seen {
                break;
            }
            std::hint::spin_loop();
            continue;
        }
        seen = seq;
        ch.submit(rw(IoOp::Read, seq % BLOCKS, 1, buf.buf(), seq))
            .expect("submit");
        out.clear();
        while ch.poll(&mut out) == 0 {}
        assert!(out[0].result.is_ok());
        // A later write to the same block may have landed meanwhile (64
        // writes later at the soonest): never an older one.
        for word in buf.buf().chunks_exact(8) {
            let got = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            assert!(
                got >= seq && got % BLOCKS == seq % BLOCKS,
                "block {} read {got} after write {seq} completed",
                seq % BLOCKS
            );
        }
    }
    writer.join().expect("writer");
}

/// A RAM channel copies reads at poll, not at submit: a write submitted
/// after a read must still not reach that read, and a read submitted after
/// a write must see it, as when each took effect at its submit.
#[test]
fn ram_requests_take_effect_in_submission_order() {
    let dev = RamDevice::new("order", 4096, 4).expect("ram device");
    let mut ch = dev.open_channel().expect("channel");
    let (mut old, mut new, mut before, mut after) = (
        conformance::Aligned::new(4096),
        conformance::Aligned::new(4096),
        conformance::Aligned::new(4096),
        conformance::Aligned::new(4096),
    );
    old.buf().fill(0x11);
    new.buf().fill(0x22);
    run_one(ch.as_mut(), rw(IoOp::Write, 1, 1, old.buf(), 1)).expect("first write");
    // Read, write, read of the same block, all in flight at once.
    ch.submit(rw(IoOp::Read, 1, 1, before.buf(), 2))
        .expect("submit");
    ch.submit(rw(IoOp::Write, 1, 1, new.buf(), 3))
        .expect("submit");
    ch.submit(rw(IoOp::Read, 1, 1, after.buf(), 4))
        .expect("submit");
    assert_eq!(ch.inflight(), 3);
    let mut out = Vec::new();
    while out.len() < 3 {
        ch.poll(&mut out);
    }
    assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
    assert!(
        before.buf().iter().all(|&b| b == 0x11),
        "read before the write saw it"
    );
    assert!(
        after.buf().iter().all(|&b| b == 0x22),
        "read after the write missed it"
    );
    assert_eq!(ch.inflight(), 0);
}

/// From review: a file created for a device and then refused (a size the
/// file system cannot hold, a bad block size) stayed behind, empty, and
/// every retry with a sane size was refused for it.
#[test]
fn a_file_created_for_a_refused_device_is_not_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big");
    // Beyond i64::MAX: set_len refuses it.
    assert!(FileDevice::create(&path, 4096, u64::MAX - 4095).is_err());
    assert!(!path.exists());
    assert!(FileDevice::create(&path, 1000, 1 << 20).is_err());
    assert!(!path.exists());
    let dev = FileDevice::create(&path, 4096, 1 << 20).unwrap();
    assert_eq!(dev.info().num_blocks, 256);
}
