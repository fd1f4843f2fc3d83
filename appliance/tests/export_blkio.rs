//! The vhost-user-blk export driven by a real vhost-user client (the blkio
//! crate, libblkio's Rust implementation) over a real unix socket.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod common;

use appliance::export::{Export, ExportOptions};
use appliance::volume::Volume;
use bdev::{BlockDevice, RamDevice};
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use poller::{ReactorConfig, Reactors};

const MIB: u64 = 1 << 20;

// Fields drop in order: the export goes before the reactors serving it.
struct Rig {
    export: Option<Export>,
    reactors: Reactors,
    volume: Volume,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

fn rig(num_queues: u16, read_only: bool) -> Rig {
    let dev: Arc<dyn BlockDevice> =
        Arc::new(RamDevice::new("ram0", 4096, 64 * MIB / 4096).unwrap());
    rig_on(dev, num_queues, read_only)
}

/// A rig whose volume is `dev`.
fn rig_on(dev: Arc<dyn BlockDevice>, num_queues: u16, read_only: bool) -> Rig {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let volume = Volume::new(reactors.set(), "vol0", dev);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vol0.sock");
    let export = Export::create(
        reactors.set(),
        &volume,
        ExportOptions {
            read_only,
            serial: "vol0-serial".into(),
            ..ExportOptions::new(sock.clone(), num_queues)
        },
    )
    .unwrap();
    Rig {
        reactors,
        volume,
        export: Some(export),
        sock,
        _dir: dir,
    }
}

struct Client {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

fn connect(sock: &Path, queues: i32, read_only: bool) -> Result<Client, blkio::Error> {
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", sock.to_str().unwrap())?;
    b.set_bool("read-only", read_only)?;
    b.connect()?;
    b.set_i32("num-queues", queues)?;
    let outcome = b.start()?;
    let region = b.alloc_mem_region(8 * MIB as usize)?;
    b.map_mem_region(&region)?;
    Ok(Client {
        blkio: b,
        queues: outcome.queues,
        region,
    })
}

impl Client {
    fn buf(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(offset + len <= self.region.len);
        (self.region.addr + offset) as *mut u8
    }
}

fn wait_one(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::<Completion>::uninit()];
    let mut timeout = Duration::from_secs(20);
    let n = q.do_io(&mut c, 1, Some(&mut timeout), None).expect("do_io");
    assert_eq!(n, 1, "request did not complete");
    // SAFETY: do_io initialised one completion.
    unsafe { c[0].assume_init_ref() }.ret
}

fn slice(p: *mut u8, len: usize) -> &'static mut [u8] {
    // SAFETY: test buffers inside the client's mapped region.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

#[test]
fn random_io_on_two_queues_at_once_reads_back_what_was_written() {
    let rig = rig(2, false);
    let mut c = connect(&rig.sock, 2, false).unwrap();
    assert_eq!(c.blkio.get_u64("capacity").unwrap(), 64 * MIB);
    assert_eq!(c.queues.len(), 2);
    let bufs: Vec<(usize, usize)> = (0..2)
        .map(|i| (c.buf(i * 4 * MIB as usize, 4 * MIB as usize) as usize, i))
        .collect();
    let queues = std::mem::take(&mut c.queues);
    let threads: Vec<_> = queues
        .into_iter()
        .zip(bufs)
        .map(|(mut q, (base, i))| {
            std::thread::spawn(move || {
                // Each queue owns 32 MiB of the device; QD up to 16 per batch.
                let region = i as u64 * 32 * MIB;
                let blocks = 32 * MIB / 4096;
                let mut model = vec![0u8; (32 * MIB) as usize];
                let mut rng = 0x1234_5678_9abc_def0u64 ^ (i as u64 + 1);
                let mut next = || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                for round in 0..200 {
                    let depth = 1 + (next() % 16) as usize;
                    let mut plan = Vec::new();
                    for k in 0..depth {
                        let n = 1 + next() % 16; // up to 64 KiB
                        let block = next() % (blocks - n);
                        if plan.iter().any(|&(b, m, _, _): &(u64, u64, bool, usize)| {
                            block < b + m && b < block + n
                        }) {
                            continue;
                        }
                        let write = next() % 2 == 0;
                        let off = k * 64 * 1024;
                        plan.push((block, n, write, off));
                    }
                    for (j, &(block, n, write, off)) in plan.iter().enumerate() {
                        let len = (n * 4096) as usize;
                        let p = (base + off) as *mut u8;
                        let start = region + block * 4096;
                        if write {
                            let data = slice(p, len);
                            for (x, b) in data.iter_mut().enumerate() {
                                *b = (x as u64 ^ block ^ round) as u8;
                            }
                            q.write(start, p, len, j, ReqFlags::empty());
                        } else {
                            q.read(start, p, len, j, ReqFlags::empty());
                        }
                    }
                    let mut comps: Vec<MaybeUninit<Completion>> =
                        (0..plan.len()).map(|_| MaybeUninit::uninit()).collect();
                    let mut timeout = Duration::from_secs(20);
                    let n = q
                        .do_io(&mut comps, plan.len(), Some(&mut timeout), None)
                        .unwrap();
                    assert_eq!(n, plan.len());
                    for c in &comps[..n] {
                        // SAFETY: do_io initialised n completions.
                        assert_eq!(unsafe { c.assume_init_ref() }.ret, 0, "request failed");
                    }
                    for &(block, n, write, off) in &plan {
                        let len = (n * 4096) as usize;
                        let data = slice((base + off) as *mut u8, len);
                        let m = &mut model[(block * 4096) as usize..(block * 4096) as usize + len];
                        if write {
                            m.copy_from_slice(data);
                        } else {
                            assert!(data == m, "queue {i} read of block {block} differs");
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn flush_discard_and_write_zeroes_work() {
    let rig = rig(1, false);
    let mut c = connect(&rig.sock, 1, false).unwrap();
    let p = c.buf(0, 64 * 1024);
    slice(p, 65536).fill(0xee);
    let q = &mut c.queues[0];
    q.write(0, p, 65536, 1, ReqFlags::empty());
    assert_eq!(wait_one(q), 0);
    q.flush(2, ReqFlags::empty());
    assert_eq!(wait_one(q), 0);
    q.write_zeroes(4096, 8192, 3, ReqFlags::empty());
    assert_eq!(wait_one(q), 0);
    q.discard(32768, 8192, 4, ReqFlags::empty());
    assert_eq!(wait_one(q), 0);
    slice(p, 65536).fill(0);
    q.read(0, p, 65536, 5, ReqFlags::empty());
    assert_eq!(wait_one(q), 0);
    let got = slice(p, 65536);
    assert!(got[..4096].iter().all(|&b| b == 0xee));
    assert!(
        got[4096..12288].iter().all(|&b| b == 0),
        "write-zeroes read back as zeroes"
    );
    assert!(got[12288..32768].iter().all(|&b| b == 0xee));
    assert!(got[40960..].iter().all(|&b| b == 0xee));
    // Past the end: an error, and the queue keeps working.
    q.read(64 * MIB, p, 4096, 6, ReqFlags::empty());
    assert!(wait_one(q) < 0);
    q.read(0, p, 4096, 7, ReqFlags::empty());
    assert_eq!(wait_one(q), 0);
}

#[test]
fn a_read_only_export_refuses_writes() {
    let rig = rig(1, true);
    // A client that insists on writing is refused, or its writes fail.
    match connect(&rig.sock, 1, false) {
        Err(_) => {}
        Ok(mut c) => {
            let p = c.buf(0, 4096);
            let q = &mut c.queues[0];
            q.write(0, p, 4096, 1, ReqFlags::empty());
            assert!(wait_one(q) < 0, "write to a read-only export succeeded");
        }
    }
    let mut c = connect(&rig.sock, 1, true).unwrap();
    assert!(c.blkio.get_bool("read-only").unwrap());
    let p = c.buf(0, 4096);
    let q = &mut c.queues[0];
    q.read(0, p, 4096, 2, ReqFlags::empty());
    assert_eq!(wait_one(q), 0);
}

#[test]
fn a_client_can_reconnect_and_find_its_data() {
    let mut rig = rig(2, false);
    for round in 0..3u8 {
        let mut c = connect(&rig.sock, 2, false).unwrap();
        let p = c.buf(0, 8192);
        let q = &mut c.queues[(round % 2) as usize];
        if round > 0 {
            q.read(4096 * round as u64, p, 4096, 1, ReqFlags::empty());
            assert_eq!(wait_one(q), 0);
            assert!(
                slice(p, 4096).iter().all(|&b| b == round),
                "data of the previous connection"
            );
        }
        slice(p, 4096).fill(round + 1);
        q.write(4096 * (round as u64 + 1), p, 4096, 2, ReqFlags::empty());
        assert_eq!(wait_one(q), 0);
        drop(c);
    }
    let export = rig.export.take().unwrap();
    assert!(export.connections() >= 3);
    // Let the export notice the last disconnect, then delete it.
    for _ in 0..200 {
        if !export.is_connected() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(export.delete(false).is_ok());
    assert!(!rig.sock.exists(), "socket removed");
    rig.reactors.shutdown().unwrap();
}

#[test]
fn deleting_a_connected_export_needs_force() {
    let mut rig = rig(1, false);
    let mut c = connect(&rig.sock, 1, false).unwrap();
    let p = c.buf(0, 4096);
    c.queues[0].read(0, p, 4096, 1, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    let export = rig.export.take().unwrap();
    assert!(export.is_connected());
    let err = export.delete(false).expect_err("refused while connected");
    assert!(err.to_string().contains("connected"), "{err}");
    // Still serving after the refusal.
    c.queues[0].read(0, p, 4096, 2, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    assert!(export.delete(true).is_ok(), "forced deletion");
    assert!(!rig.sock.exists());
    // The volume is not suspended or otherwise hurt.
    drop(rig.volume.suspend(Duration::from_secs(5)).unwrap());
}

#[test]
fn bad_export_options_are_refused_with_the_field_named() {
    let rig = rig(1, false);
    let mk = |socket: PathBuf, num_queues: u16, serial: &str| {
        Export::create(
            rig.reactors.set(),
            &rig.volume,
            ExportOptions {
                serial: serial.into(),
                ..ExportOptions::new(socket, num_queues)
            },
        )
    };
    let dir = rig.sock.parent().unwrap().to_path_buf();
    let e = mk(dir.join("a.sock"), 0, "x").err().unwrap().to_string();
    assert!(e.contains("num_queues"), "{e}");
    let e = mk(dir.join("b.sock"), 1, "this serial is far too long")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("serial"), "{e}");
    let e = mk(rig.sock.clone(), 1, "x").err().unwrap().to_string();
    assert!(e.contains("already serving"), "{e}");
    std::fs::write(dir.join("plain"), b"x").unwrap();
    let e = mk(dir.join("plain"), 1, "x").err().unwrap().to_string();
    assert!(e.contains("not a socket"), "{e}");
}

#[test]
fn large_vectored_requests_up_to_the_advertised_limits_work() {
    // The guest may send seg_max segments of size_max bytes each; the
    // export must take all of it (Linux sends 1.25 MiB requests by default).
    large_vectored(&rig(1, false));
}

/// From an audit: a volume whose device takes 1 MiB a request (an NVMe
/// member) was exported with seg_max 1, so a Linux guest sent one page
/// per request. The export advertises its full limits and sends what the
/// device cannot take at once in pieces.
#[test]
fn requests_larger_than_the_device_takes_go_in_pieces() {
    let ram: Arc<dyn BlockDevice> =
        Arc::new(RamDevice::new("ram0", 4096, 64 * MIB / 4096).unwrap());
    large_vectored(&rig_on(common::Small::device(ram, 64 << 10), 1, false));
}

/// A write and a read back of more than 4 MiB in up to 24 segments.
fn large_vectored(rig: &Rig) {
    let mut c = connect(&rig.sock, 1, false).unwrap();
    let max_segments = c.blkio.get_i32("max-segments").unwrap();
    let max_segment_len = c.blkio.get_i32("max-segment-len").unwrap();
    assert!(max_segments >= 8, "seg_max {max_segments}");
    let segs = 24usize.min(max_segments as usize);
    let seg = (256 * 1024usize).min(max_segment_len as usize);
    assert!(segs * seg > 4 << 20, "test must exceed 4 MiB");
    let base = c.buf(0, 8 * MIB as usize) as usize;
    let iov: Vec<libc::iovec> = (0..segs)
        .map(|i| libc::iovec {
            iov_base: (base + i * seg) as *mut libc::c_void,
            iov_len: seg,
        })
        .collect();
    for i in 0..segs {
        slice((base + i * seg) as *mut u8, seg).fill(i as u8 + 1);
    }
    let q = &mut c.queues[0];
    q.writev(MIB, iov.as_ptr(), segs as u32, 1, ReqFlags::empty());
    assert_eq!(wait_one(q), 0, "large write");
    slice(base as *mut u8, segs * seg).fill(0);
    q.readv(MIB, iov.as_ptr(), segs as u32, 2, ReqFlags::empty());
    assert_eq!(wait_one(q), 0, "large read");
    for i in 0..segs {
        assert!(
            slice((base + i * seg) as *mut u8, seg)
                .iter()
                .all(|&b| b == i as u8 + 1),
            "segment {i}"
        );
    }
}

#[test]
fn a_failed_device_fails_its_export_only() {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let inner: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("sick", 4096, 4096).unwrap());
    let sick = Arc::new(bdev::FaultDevice::new(inner));
    let faults = sick.control();
    let healthy: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("healthy", 4096, 4096).unwrap());
    let mut exports = Vec::new();
    for (name, dev) in [("sick", sick as Arc<dyn BlockDevice>), ("healthy", healthy)] {
        let volume = Volume::new(reactors.set(), name, dev);
        exports.push(
            Export::create(
                reactors.set(),
                &volume,
                ExportOptions {
                    serial: name.into(),
                    ..ExportOptions::new(dir.path().join(format!("{name}.sock")), 1)
                },
            )
            .unwrap(),
        );
    }
    let mut a = connect(&dir.path().join("sick.sock"), 1, false).unwrap();
    let mut b = connect(&dir.path().join("healthy.sock"), 1, false).unwrap();
    let (pa, pb) = (a.buf(0, 4096), b.buf(0, 4096));
    faults.pull();
    a.queues[0].read(0, pa, 4096, 1, ReqFlags::empty());
    assert!(
        wait_one(&mut a.queues[0]) < 0,
        "pulled device answers with an error"
    );
    a.queues[0].write(0, pa, 4096, 2, ReqFlags::empty());
    assert!(wait_one(&mut a.queues[0]) < 0);
    b.queues[0].write(0, pb, 4096, 3, ReqFlags::empty());
    assert_eq!(
        wait_one(&mut b.queues[0]),
        0,
        "the other export is unaffected"
    );
    faults.heal();
    a.queues[0].read(0, pa, 4096, 4, ReqFlags::empty());
    assert_eq!(wait_one(&mut a.queues[0]), 0, "back once the device heals");
    assert!(!reactors.set().is_stopped());
    drop((a, b));
    drop(exports);
    reactors.shutdown().unwrap();
}
