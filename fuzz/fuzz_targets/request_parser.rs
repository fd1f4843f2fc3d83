//! Fuzz the virtio-blk request parser and the descriptor-chain walker with
//! guest memory contents and descriptor lists taken from the input. Neither
//! may panic, and every host address they hand out must lie inside guest
//! memory.
#![no_main]

use appliance::export::chain::{walk_chain, Desc};
use appliance::export::request::{parse, Limits, Parsed};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const REGION: u64 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    // Two regions with a hole between them.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(2 * REGION), REGION as usize),
    ])
    .unwrap();
    let (head, rest) = data.split_at(4);
    let ndesc = (head[0] % 12) as usize;
    let (descs_raw, fill) = rest.split_at((ndesc * 13).min(rest.len()));
    let _ = mem.write_slice(&fill[..fill.len().min(REGION as usize)], GuestAddress(0));
    let descs: Vec<Desc> = descs_raw
        .chunks_exact(13)
        .map(|c| Desc {
            addr: u64::from_le_bytes(c[0..8].try_into().unwrap()) % (4 * REGION),
            len: u32::from_le_bytes(c[8..12].try_into().unwrap()) % (2 * REGION as u32),
            write: c[12] & 1 == 1,
        })
        .collect();
    let limits = Limits {
        capacity_sectors: 4096,
        block_size: if head[1] & 1 == 0 { 512 } else { 4096 },
        max_transfer: 1 << 20,
        part_max: 1 << 20,
        size_max: 1 << 16,
        seg_max: 8,
        max_discard_sectors: 2048,
        read_only: head[1] & 2 != 0,
        discard: true,
        write_zeroes: true,
        flush: true,
        serial: [b's'; 20],
    };
    let inside = |p: *mut u8, len: usize| {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        mem.iter().any(|r| {
            let base = r.get_host_address(vm_memory::MemoryRegionAddress(0)).unwrap() as usize;
            (p as usize) >= base && (p as usize) + len <= base + r.len() as usize
        })
    };
    if let Some(req) = parse(&descs, &mem, &limits) {
        assert!(inside(req.status, 1));
        if let Ok(Parsed::Io { sg, .. }) = req.action {
            for v in sg.iter() {
                assert!(inside(v.ptr(), v.len()));
            }
        }
    }
    let mut out = Vec::new();
    let _ = walk_chain(&mem, u64::from(head[2]) * 64, 16, u16::from(head[3]) % 32, &mut out);
});
