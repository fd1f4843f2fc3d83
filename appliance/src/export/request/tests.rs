//! The parser against hand-made and random chains, over guest memory with
//! a hole in it.

use super::*;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

const MEM: u64 = 1 << 20;

fn mem() -> GuestMemoryMmap {
    // Two regions with a hole between them, as hostile tests want.
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MEM as usize),
        (GuestAddress(2 * MEM), MEM as usize),
    ])
    .unwrap()
}

fn limits() -> Limits {
    Limits {
        capacity_sectors: 2048,
        block_size: 512,
        max_transfer: 1 << 20,
        part_max: 1 << 20,
        size_max: 1 << 20,
        seg_max: 8,
        max_discard_sectors: 1024,
        read_only: false,
        discard: true,
        write_zeroes: true,
        flush: true,
        serial: *b"serial-0123456789abc",
    }
}

fn header(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) -> Desc {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(at)).unwrap();
    data(at, 16, false)
}

/// A data descriptor of `len` bytes at `addr`, device-writable or not.
fn data(addr: u64, len: u32, write: bool) -> Desc {
    Desc { addr, len, write }
}

fn status(at: u64) -> Desc {
    data(at, 1, true)
}

fn expect_status(r: Option<Request>, want: u8) {
    let r = r.expect("a status can be written");
    match r.action {
        Err(s) => assert_eq!(s, want),
        Ok(p) => panic!("expected status {want}, parsed {p:?}"),
    }
}

#[test]
fn a_plain_read_parses() {
    let m = mem();
    let d = [
        header(&m, 0, VIRTIO_BLK_T_IN, 8),
        data(4096, 4096, true),
        status(100),
    ];
    let r = parse(&d, &m, &limits()).unwrap();
    match r.action.unwrap() {
        Parsed::Io {
            op,
            offset_blocks,
            num_blocks,
            sg,
            written,
        } => {
            assert_eq!(
                (op, offset_blocks, num_blocks, written),
                (IoOp::Read, 8, 8, 4097)
            );
            assert_eq!(sg.len(), 1);
        }
        p => panic!("{p:?}"),
    }
}

#[test]
fn header_split_over_descriptors_and_status_sharing_data() {
    let m = mem();
    let h = header(&m, 0, VIRTIO_BLK_T_OUT, 0);
    let d = [
        data(h.addr, 10, false),
        data(h.addr + 10, 6 + 512, false),
        data(8192, 1, true),
    ];
    m.write_slice(&[0u8; 512], GuestAddress(16)).unwrap();
    let r = parse(&d, &m, &limits()).unwrap();
    assert!(matches!(
        r.action,
        Ok(Parsed::Io {
            op: IoOp::Write,
            num_blocks: 1,
            ..
        })
    ));
    // Read data and status in one writable descriptor.
    let d = [header(&m, 0, VIRTIO_BLK_T_IN, 0), data(4096, 513, true)];
    let r = parse(&d, &m, &limits()).unwrap();
    assert!(matches!(
        r.action,
        Ok(Parsed::Io {
            op: IoOp::Read,
            num_blocks: 1,
            written: 513,
            ..
        })
    ));
}

#[test]
fn hostile_chains_get_a_status_and_touch_nothing_outside() {
    let m = mem();
    let l = limits();
    // Short header.
    let d = [data(0, 8, false), status(100)];
    expect_status(parse(&d, &m, &l), S_IOERR);
    // Header outside guest memory (in the hole).
    let d = [data(MEM + 4096, 16, false), status(100)];
    expect_status(parse(&d, &m, &l), S_IOERR);
    // Data buffer in the hole.
    let d = [
        header(&m, 0, VIRTIO_BLK_T_IN, 0),
        data(MEM + 4096, 512, true),
        status(100),
    ];
    expect_status(parse(&d, &m, &l), S_IOERR);
    // Data buffer running past the end of memory.
    let d = [
        header(&m, 0, VIRTIO_BLK_T_IN, 0),
        data(3 * MEM - 512, 1024, true),
        status(100),
    ];
    expect_status(parse(&d, &m, &l), S_IOERR);
    // Address overflow.
    let d = [
        header(&m, 0, VIRTIO_BLK_T_IN, 0),
        data(u64::MAX - 10, 512, true),
        status(100),
    ];
    expect_status(parse(&d, &m, &l), S_IOERR);
    // Wrong direction: a read whose data is device-readable.
    let d = [
        header(&m, 0, VIRTIO_BLK_T_IN, 0),
        data(4096, 512, false),
        status(100),
    ];
    expect_status(parse(&d, &m, &l), S_IOERR);
    // Wrong direction: a write whose data is device-writable.
    let d = [
        header(&m, 0, VIRTIO_BLK_T_OUT, 0),
        data(4096, 512, true),
        status(100),
    ];
    expect_status(parse(&d, &m, &l), S_IOERR);
    // Readable after writable.
    let d = [
        header(&m, 0, VIRTIO_BLK_T_IN, 0),
        data(4096, 512, true),
        data(8192, 16, false),
        status(100),
    ];
    expect_status(parse(&d, &m, &l), S_IOERR);
    // Length not a multiple of the block size, zero length.
    let d = [
        header(&m, 0, VIRTIO_BLK_T_IN, 0),
        data(4096, 100, true),
        status(100),
    ];
    expect_status(parse(&d, &m, &l), S_IOERR);
    let d = [header(&m, 0, VIRTIO_BLK_T_IN, 0), status(100)];
    expect_status(parse(&d, &m, &l), S_IOERR);
    // Sectors past capacity, and a sector number that overflows.
    let d = [
        header(&m, 0, VIRTIO_BLK_T_IN, 2047),
        data(4096, 1024, true),
        status(100),
    ];
    expect_status(parse(&d, &m, &l), S_IOERR);
    let d = [
        header(&m, 0, VIRTIO_BLK_T_IN, u64::MAX),
        data(4096, 512, true),
        status(100),
    ];
    expect_status(parse(&d, &m, &l), S_IOERR);
    // Unknown and unsupported types.
    for t in [2, 3, 10, 14, 15, 16, 99, u32::MAX] {
        let d = [header(&m, 0, t, 0), status(100)];
        expect_status(parse(&d, &m, &l), S_UNSUPP);
    }
    // Too many segments.
    let mut d = vec![header(&m, 0, VIRTIO_BLK_T_IN, 0)];
    for i in 0..9 {
        d.push(data(4096 + i * 512, 512, true));
    }
    d.push(status(100));
    expect_status(parse(&d, &m, &l), S_IOERR);
    // Too many pieces of guest memory: one segment over tiny regions
    // side by side (a frontend's memory table) is split at each.
    let tiny: Vec<(GuestAddress, usize)> = std::iter::once((GuestAddress(0), 4096))
        .chain((0..20).map(|i| (GuestAddress(4096 + i * 512), 512)))
        .collect();
    let tm = GuestMemoryMmap::from_ranges(&tiny).unwrap();
    let over = |regions: u64| {
        [
            header(&tm, 0, VIRTIO_BLK_T_IN, 0),
            data(4096, regions as u32 * 512, true),
            status(100),
        ]
    };
    assert!(parse(&over(2 * l.seg_max as u64), &tm, &l)
        .unwrap()
        .action
        .is_ok());
    expect_status(parse(&over(2 * l.seg_max as u64 + 1), &tm, &l), S_IOERR);
    // Too large.
    let mut big = l.clone();
    big.max_transfer = 4096;
    let d = [
        header(&m, 0, VIRTIO_BLK_T_IN, 0),
        data(4096, 8192, true),
        status(100),
    ];
    expect_status(parse(&d, &m, &big), S_IOERR);
}

#[test]
fn no_status_byte_means_no_answer() {
    let m = mem();
    let l = limits();
    assert!(parse(&[], &m, &l).is_none());
    let d = [header(&m, 0, VIRTIO_BLK_T_IN, 0)];
    assert!(parse(&d, &m, &l).is_none(), "last descriptor not writable");
    let d = [header(&m, 0, VIRTIO_BLK_T_IN, 0), data(MEM + 10, 1, true)];
    assert!(parse(&d, &m, &l).is_none(), "status outside memory");
    let d = [header(&m, 0, VIRTIO_BLK_T_IN, 0), data(100, 0, true)];
    assert!(parse(&d, &m, &l).is_none(), "zero-length status");
}

#[test]
fn read_only_refuses_every_kind_of_write() {
    let m = mem();
    let mut l = limits();
    l.read_only = true;
    let d = [
        header(&m, 0, VIRTIO_BLK_T_OUT, 0),
        data(4096, 512, false),
        status(100),
    ];
    expect_status(parse(&d, &m, &l), S_IOERR);
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        m.write_slice(&[0u8; 16], GuestAddress(4096)).unwrap();
        let d = [header(&m, 0, t, 0), data(4096, 16, false), status(100)];
        expect_status(parse(&d, &m, &l), S_IOERR);
    }
    let d = [
        header(&m, 0, VIRTIO_BLK_T_IN, 0),
        data(4096, 512, true),
        status(100),
    ];
    assert!(
        parse(&d, &m, &l).unwrap().action.is_ok(),
        "reads still work"
    );
}

fn dwz(m: &GuestMemoryMmap, sector: u64, count: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&count.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    m.write_slice(&s, GuestAddress(4096)).unwrap();
}

#[test]
fn discard_and_write_zeroes_segments_are_checked() {
    let m = mem();
    let l = limits();
    let seg = |t| [header(&m, 0, t, 0), data(4096, 16, false), status(100)];
    dwz(&m, 8, 16, 0);
    let r = parse(&seg(VIRTIO_BLK_T_DISCARD), &m, &l).unwrap();
    assert!(matches!(
        r.action,
        Ok(Parsed::Io {
            op: IoOp::Discard,
            offset_blocks: 8,
            num_blocks: 16,
            ..
        })
    ));
    dwz(&m, 8, 16, 1);
    expect_status(parse(&seg(VIRTIO_BLK_T_DISCARD), &m, &l), S_UNSUPP);
    let r = parse(&seg(VIRTIO_BLK_T_WRITE_ZEROES), &m, &l).unwrap();
    assert!(matches!(
        r.action,
        Ok(Parsed::Io {
            op: IoOp::WriteZeroes,
            ..
        })
    ));
    dwz(&m, 8, 16, 2);
    expect_status(parse(&seg(VIRTIO_BLK_T_WRITE_ZEROES), &m, &l), S_UNSUPP);
    dwz(&m, 2040, 16, 0);
    expect_status(parse(&seg(VIRTIO_BLK_T_DISCARD), &m, &l), S_IOERR);
    dwz(&m, u64::MAX, 16, 0);
    expect_status(parse(&seg(VIRTIO_BLK_T_DISCARD), &m, &l), S_IOERR);
    dwz(&m, 0, 0, 0);
    expect_status(parse(&seg(VIRTIO_BLK_T_DISCARD), &m, &l), S_IOERR);
    dwz(&m, 0, 2000, 0);
    expect_status(parse(&seg(VIRTIO_BLK_T_DISCARD), &m, &l), S_IOERR);
    // Two segments (we offer one).
    let d = [
        header(&m, 0, VIRTIO_BLK_T_DISCARD, 0),
        data(4096, 32, false),
        status(100),
    ];
    expect_status(parse(&d, &m, &l), S_IOERR);
    // Misaligned to a 4 KiB device.
    let mut l4 = l.clone();
    l4.block_size = 4096;
    dwz(&m, 1, 8, 0);
    expect_status(parse(&seg(VIRTIO_BLK_T_DISCARD), &m, &l4), S_IOERR);
}

#[test]
fn get_id_writes_the_serial() {
    let m = mem();
    let l = limits();
    let d = [
        header(&m, 0, VIRTIO_BLK_T_GET_ID, 0),
        data(4096, 20, true),
        status(100),
    ];
    let r = parse(&d, &m, &l).unwrap();
    assert!(matches!(r.action, Ok(Parsed::Done { written: 21 })));
    let mut got = [0u8; 20];
    m.read_slice(&mut got, GuestAddress(4096)).unwrap();
    assert_eq!(&got, b"serial-0123456789abc");
    // A short buffer gets what fits.
    let d = [
        header(&m, 0, VIRTIO_BLK_T_GET_ID, 0),
        data(8192, 5, true),
        status(100),
    ];
    assert!(matches!(
        parse(&d, &m, &l).unwrap().action,
        Ok(Parsed::Done { written: 6 })
    ));
}

/// [`parse_with`] without its fast path.
fn parse_general(descs: &[Desc], m: &GuestMemoryMmap, l: &Limits) -> Option<Request> {
    let last = descs.last()?;
    if !last.write || last.len == 0 {
        return None;
    }
    let status_gpa = last.addr.checked_add(last.len as u64 - 1)?;
    let mut status_sg = SgList::new();
    super::super::chain::translate(m, status_gpa, 1, &mut status_sg).ok()?;
    let action = parse_body(descs, m, &RegionCache::default(), l);
    Some(Request {
        status: status_sg[0].ptr(),
        status_gpa,
        action,
    })
}

#[test]
fn the_fast_path_answers_exactly_like_the_general_parser() {
    // Chains near the common shape (header, data one way, status),
    // with every field now and then wrong: kinds, directions, lengths,
    // sectors, addresses in holes, beyond memory and at the top of the
    // address space, read-only exports, small segment limits.
    let m = mem();
    let cache = RegionCache::default();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let kinds = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        77,
    ];
    let mut fast_taken = 0;
    for round in 0..50_000 {
        let addr = |r: u64| match r % 16 {
            0 => 2 * MEM - 256 + r % 512, // in and around the hole
            1 => u64::MAX - r % 4096,
            2 => 3 * MEM - 512 + r % 1024, // the end of memory
            _ => (r % (MEM / 512)) * 512 + if r.is_multiple_of(2) { 0 } else { 2 * MEM },
        };
        let kind = kinds[(next() % 8).min(4) as usize % kinds.len()];
        let sector = match next() % 8 {
            0 => next(),
            1 => 2048 - next() % 16,
            _ => next() % 2048,
        };
        let at = (next() % 64) * 16;
        let mut d = vec![header(&m, at, kind, sector)];
        if next() % 16 == 0 {
            d[0].len = (next() % 40) as u32;
        }
        let write = kind == VIRTIO_BLK_T_OUT;
        for _ in 0..next() % 6 {
            let len = match next() % 8 {
                0 => (next() % 5000) as u32,
                _ => ((next() % 16 + 1) * 512) as u32,
            };
            d.push(Desc {
                addr: addr(next()),
                len,
                write: if next() % 16 == 0 { write } else { !write },
            });
        }
        d.push(Desc {
            addr: if next() % 16 == 0 { addr(next()) } else { 100 },
            len: if next() % 16 == 0 {
                (next() % 3) as u32
            } else {
                1
            },
            write: next() % 32 != 0,
        });
        let mut l = limits();
        l.read_only = round % 5 == 0;
        l.seg_max = if round % 3 == 0 { 2 } else { 8 };
        l.max_transfer = if round % 4 == 0 { 4096 } else { 1 << 20 };
        if round % 7 == 1 {
            // 4 KiB blocks: sectors and lengths must be multiples of 8.
            l.block_size = 4096;
        }
        if round % 11 == 2 {
            l.capacity_sectors = 64;
        }
        let fast = parse_with(&d, &m, &cache, &l);
        let general = parse_general(&d, &m, &l);
        assert_eq!(format!("{fast:?}"), format!("{general:?}"), "{d:?}");
        if parse_plain_io(&d, &m, &cache, &l).is_some() {
            fast_taken += 1;
        }
    }
    // The comparison covered the fast path (more than a tenth of the
    // chains take it), not only the general one.
    assert!(fast_taken > 5_000, "{fast_taken}");
}

#[test]
fn random_chains_never_panic_and_stay_inside_guest_memory() {
    // A cheap, deterministic cousin of the cargo-fuzz target (fuzz/),
    // run on every test: random descriptors over random memory.
    let m = mem();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut junk = vec![0u8; 4096];
    let inside = |p: *mut u8, len: usize| {
        m.iter().any(|r| {
            let base = r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            (p as usize) >= base && (p as usize) + len <= base + r.len() as usize
        })
    };
    for round in 0..20_000 {
        for b in junk.iter_mut() {
            *b = next() as u8;
        }
        m.write_slice(&junk, GuestAddress((next() % 256) * 4096))
            .unwrap();
        let n = (next() % 6) as usize;
        let descs: Vec<Desc> = (0..n)
            .map(|_| Desc {
                addr: if next() % 4 == 0 {
                    next()
                } else {
                    next() % (3 * MEM)
                },
                len: (next() % (2 * MEM)) as u32,
                write: next() % 2 == 0,
            })
            .collect();
        let mut l = limits();
        l.read_only = round % 7 == 0;
        if let Some(req) = parse(&descs, &m, &l) {
            assert!(inside(req.status, 1));
            if let Ok(Parsed::Io { sg, .. }) = req.action {
                for v in sg.iter() {
                    assert!(inside(v.ptr(), v.len()), "{descs:?}");
                }
            }
        }
        let mut out = Vec::new();
        let _ = super::super::chain::walk_chain(
            &m,
            (next() % 512) * 16,
            16,
            (next() % 20) as u16,
            &mut out,
        );
        assert!(out.len() <= 16);
    }
}

#[test]
fn buffers_spanning_two_regions_are_refused_only_across_the_hole() {
    let m = mem();
    let l = limits();
    // Ends exactly at the end of region 0: fine.
    let d = [
        header(&m, 0, VIRTIO_BLK_T_IN, 0),
        data(MEM - 512, 512, true),
        status(100),
    ];
    assert!(parse(&d, &m, &l).unwrap().action.is_ok());
    // Crosses into the hole.
    let d = [
        header(&m, 0, VIRTIO_BLK_T_IN, 0),
        data(MEM - 512, 1024, true),
        status(100),
    ];
    expect_status(parse(&d, &m, &l), S_IOERR);
}

#[test]
fn an_operation_the_volume_no_longer_takes_is_unsupported_not_an_io_error() {
    assert_eq!(
        failed_status(&bdev::IoError::Unsupported(IoOp::Discard)),
        S_UNSUPP
    );
    assert_eq!(
        failed_status(&bdev::IoError::Unsupported(IoOp::WriteZeroes)),
        S_UNSUPP
    );
    assert_eq!(failed_status(&bdev::IoError::DeviceFailed), S_IOERR);
}
