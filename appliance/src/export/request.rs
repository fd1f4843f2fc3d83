//! Parsing virtio-blk requests from descriptor chains, with everything a
//! hostile guest can put there turned into a status, never a panic and never
//! an access outside guest memory.
//!
//! A chain is a list of guest buffers, device-readable ones first: a 16-byte
//! header (type, reserved, sector), the data, and a final device-writable
//! status byte. Any framing is accepted (the header may span descriptors,
//! the status may share a descriptor with data), as VIRTIO_F_VERSION_1
//! requires.

use bdev::{IoOp, IoVec, SgList};
use virtio_bindings::virtio_blk::*;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// virtio-blk sectors are always 512 bytes.
pub const SECTOR: u64 = 512;
/// Length of the serial returned by GET_ID.
pub const ID_BYTES: usize = 20;
/// Status values.
pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// The request failed.
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// The request type is not supported.
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// One descriptor as the driver wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// What the export tells the parser about the device behind it.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// The device's logical block size; IO must be aligned to it.
    pub block_size: u32,
    /// Largest data transfer in bytes.
    pub max_transfer: u32,
    /// Largest data segment in bytes.
    pub size_max: u32,
    /// Largest number of data segments.
    pub seg_max: u32,
    /// Largest discard / write-zeroes in sectors.
    pub max_discard_sectors: u32,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// Discard is offered.
    pub discard: bool,
    /// Write-zeroes is offered.
    pub write_zeroes: bool,
    /// Flush is offered.
    pub flush: bool,
    /// GET_ID answer, NUL padded.
    pub serial: [u8; ID_BYTES],
}

/// A parsed request, ready to hand to the device.
#[derive(Debug)]
pub enum Parsed {
    /// A device request: op, first device block, block count and memory.
    Io {
        /// Operation.
        op: IoOp,
        /// First device block.
        offset_blocks: u64,
        /// Number of device blocks.
        num_blocks: u64,
        /// Host addresses of the guest data buffers.
        sg: SgList,
        /// Bytes the device writes into guest memory on success (reads).
        written: u32,
    },
    /// Answered without the device (GET_ID): bytes written.
    Done {
        /// Bytes written into guest memory, including the status byte.
        written: u32,
    },
}

/// A parsed request with where its status goes.
#[derive(Debug)]
pub struct Request {
    /// Host address of the status byte (inside guest memory).
    pub status: *mut u8,
    /// What to do, or the status to answer with at once.
    pub action: Result<Parsed, u8>,
}

/// The guest memory regions of the last translations: a queue's requests
/// (headers, descriptors and status in the ring's region, data in the
/// buffers' region) fall in a few regions, so checking those first skips
/// vm-memory's region search. One entry was not enough: a client whose
/// buffers live in another region than its rings (blkio) missed twice per
/// request, and the search was 15 % of the export's CPU (perf, bench
/// results). Valid for one memory map only: [`reset`](RegionCache::reset)
/// it when the map changes.
#[derive(Default)]
pub struct RegionCache {
    /// (guest start, length, host start); length 0: empty.
    entries: [std::cell::Cell<(u64, u64, usize)>; CACHED_REGIONS],
    /// The entry the next miss replaces.
    next: std::cell::Cell<usize>,
}

const CACHED_REGIONS: usize = 4;

impl RegionCache {
    /// Forget the cached regions.
    pub fn reset(&self) {
        for e in &self.entries {
            e.set((0, 0, 0));
        }
    }

    /// Host address and bytes left in the region for `addr`, if cached.
    #[inline]
    fn lookup(&self, addr: u64) -> Option<(*mut u8, u64)> {
        self.entries.iter().find_map(|e| {
            let (start, len, host) = e.get();
            let off = addr.wrapping_sub(start);
            (off < len).then(|| ((host + off as usize) as *mut u8, len - off))
        })
    }

    /// Look `addr` up (cache first) and cache its region.
    #[inline]
    fn find(&self, mem: &GuestMemoryMmap, addr: u64) -> Option<(*mut u8, u64)> {
        if let Some(hit) = self.lookup(addr) {
            return Some(hit);
        }
        let (region, offset) = mem.to_region_addr(GuestAddress(addr))?;
        let base = region.get_host_address(MemoryRegionAddress(0)).ok()?;
        let i = self.next.get();
        self.next.set((i + 1) % CACHED_REGIONS);
        self.entries[i].set((addr - offset.raw_value(), region.len(), base as usize));
        self.lookup(addr)
    }
}

/// Translate `[addr, addr+len)` to host memory, split at region boundaries.
/// Fails if any byte is outside guest memory.
pub fn translate(mem: &GuestMemoryMmap, addr: u64, len: u64, out: &mut SgList) -> Result<(), u8> {
    translate_with(mem, &RegionCache::default(), addr, len, out)
}

/// [`translate`], looking in `cache` first and leaving the last region
/// there.
pub fn translate_with(
    mem: &GuestMemoryMmap,
    cache: &RegionCache,
    mut addr: u64,
    mut len: u64,
    out: &mut SgList,
) -> Result<(), u8> {
    while len > 0 {
        let (host, in_region) = cache.find(mem, addr).ok_or(S_IOERR)?;
        let n = in_region.min(len);
        // SAFETY: the range lies inside a mapped guest region; the export
        // keeps the mapping alive until the request completes (memory
        // changes go through the export's quiesce epoch).
        out.push(unsafe { IoVec::new(host, n as usize) });
        addr = addr.checked_add(n).ok_or(S_IOERR)?;
        len -= n;
    }
    Ok(())
}

/// A descriptor chain that cannot be followed (loop, out of range, outside
/// guest memory, nested indirect table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChain;

/// Read the descriptor chain starting at `head` from the descriptor table
/// (used to resubmit requests after a restart, when the avail ring no
/// longer names them). Follows `next` and one level of indirect table,
/// never more descriptors than the queue has, and fails on anything
/// outside guest memory.
pub fn walk_chain(
    mem: &GuestMemoryMmap,
    table: u64,
    queue_size: u16,
    head: u16,
    out: &mut Vec<Desc>,
) -> Result<(), BadChain> {
    walk_chain_with(
        mem,
        &RegionCache::default(),
        table,
        queue_size,
        head,
        usize::MAX,
        out,
    )
}

/// [`walk_chain`] through a region cache, failing beyond `max` descriptors.
pub fn walk_chain_with(
    mem: &GuestMemoryMmap,
    cache: &RegionCache,
    table: u64,
    queue_size: u16,
    head: u16,
    max: usize,
    out: &mut Vec<Desc>,
) -> Result<(), BadChain> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    let read = |table: u64, i: u16| -> Result<(u64, u32, u16, u16), BadChain> {
        let mut d = [0u8; 16];
        let at = table.checked_add(i as u64 * 16).ok_or(BadChain)?;
        read_bytes(mem, cache, &[(at, 16)], &mut d).map_err(|_| BadChain)?;
        let addr = u64::from_le_bytes(d[0..8].try_into().map_err(|_| BadChain)?);
        let len = u32::from_le_bytes(d[8..12].try_into().map_err(|_| BadChain)?);
        Ok((
            addr,
            len,
            u16::from_le_bytes([d[12], d[13]]),
            u16::from_le_bytes([d[14], d[15]]),
        ))
    };
    out.clear();
    let (mut table, mut size, mut i) = (table, queue_size, head);
    let mut indirect = false;
    let mut budget = queue_size as usize;
    loop {
        if i >= size || budget == 0 {
            return Err(BadChain);
        }
        budget -= 1;
        let (addr, len, flags, next) = read(table, i)?;
        if flags & INDIRECT != 0 {
            if indirect || len == 0 || len % 16 != 0 || len / 16 > u16::MAX as u32 {
                return Err(BadChain);
            }
            indirect = true;
            table = addr;
            size = (len / 16) as u16;
            // An indirect table is walked up to its own length (and
            // `max`), not the queue size: the spec asks drivers to keep
            // chains within the queue size, but qemu-storage-daemon
            // serves longer tables, and a request we cannot follow has no
            // status byte to say so (it went back unanswered). The
            // descriptor that points to the table is not part of the chain.
            budget = size as usize;
            i = 0;
            continue;
        }
        if out.len() == max {
            return Err(BadChain);
        }
        out.push(Desc {
            addr,
            len,
            write: flags & WRITE != 0,
        });
        if flags & NEXT == 0 {
            return Ok(());
        }
        i = next;
    }
}

/// Parse one chain. `None` means there is nowhere to put a status (the
/// chain has no writable last byte inside guest memory): the request can
/// only be returned unanswered.
pub fn parse(descs: &[Desc], mem: &GuestMemoryMmap, limits: &Limits) -> Option<Request> {
    parse_with(descs, mem, &RegionCache::default(), limits)
}

/// [`parse`] through a region cache.
pub fn parse_with(
    descs: &[Desc],
    mem: &GuestMemoryMmap,
    cache: &RegionCache,
    limits: &Limits,
) -> Option<Request> {
    let last = descs.last()?;
    if !last.write || last.len == 0 {
        return None;
    }
    let status_gpa = last.addr.checked_add(last.len as u64 - 1)?;
    let mut status_sg = SgList::new();
    translate_with(mem, cache, status_gpa, 1, &mut status_sg).ok()?;
    let status = status_sg[0].ptr();
    let action = parse_body(descs, mem, cache, limits);
    Some(Request { status, action })
}

/// Guest (address, length) ranges; a chain's usually fit inline, so parsing
/// allocates nothing.
type Ranges = smallvec::SmallVec<[(u64, u64); 4]>;

/// Readable bytes, then writable bytes (minus the status byte), as guest
/// ranges. Readable after writable is malformed.
fn split(descs: &[Desc]) -> Result<(Ranges, Ranges), u8> {
    let mut readable = Ranges::new();
    let mut writable = Ranges::new();
    let n = descs.len();
    for (i, d) in descs.iter().enumerate() {
        let mut len = d.len as u64;
        if i == n - 1 {
            len -= 1; // the status byte
        }
        if d.addr.checked_add(d.len as u64).is_none() {
            return Err(S_IOERR);
        }
        if d.write {
            if len > 0 {
                writable.push((d.addr, len));
            }
        } else {
            if !writable.is_empty() {
                return Err(S_IOERR);
            }
            if len > 0 {
                readable.push((d.addr, len));
            }
        }
    }
    Ok((readable, writable))
}

/// Take the first `n` bytes off a list of ranges.
fn take_front(ranges: &mut Ranges, mut n: u64) -> Result<Ranges, u8> {
    let mut taken = Ranges::new();
    while n > 0 {
        let Some(first) = ranges.first_mut() else {
            return Err(S_IOERR);
        };
        let k = first.1.min(n);
        taken.push((first.0, k));
        first.0 += k;
        first.1 -= k;
        n -= k;
        if first.1 == 0 {
            ranges.remove(0);
        }
    }
    Ok(taken)
}

/// Copy guest bytes out through the same translation the data path uses
/// (cheaper than vm-memory's generic slice iterator for 16-byte headers).
fn read_bytes(
    mem: &GuestMemoryMmap,
    cache: &RegionCache,
    ranges: &[(u64, u64)],
    out: &mut [u8],
) -> Result<(), u8> {
    // The common case (a header or a descriptor in one region) is a
    // single copy.
    if let [(addr, len)] = *ranges {
        if let Some((host, in_region)) = cache.find(mem, addr) {
            if len <= in_region && len as usize == out.len() {
                // SAFETY: `[host, host+len)` lies inside one mapped region;
                // a racing guest write can only change the bytes we copy.
                unsafe { std::ptr::copy_nonoverlapping(host, out.as_mut_ptr(), out.len()) };
                return Ok(());
            }
        }
    }
    let mut at = 0;
    let mut host = SgList::new();
    for &(addr, len) in ranges {
        host.clear();
        translate_with(mem, cache, addr, len, &mut host)?;
        for v in &host {
            let end = at + v.len();
            if end > out.len() {
                return Err(S_IOERR);
            }
            // SAFETY: `v` lies inside guest memory (translate checked it);
            // a racing guest write can only change the bytes we copy.
            unsafe { std::ptr::copy_nonoverlapping(v.ptr(), out[at..end].as_mut_ptr(), v.len()) };
            at = end;
        }
    }
    Ok(())
}

fn total(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|r| r.1).sum()
}

fn parse_body(
    descs: &[Desc],
    mem: &GuestMemoryMmap,
    cache: &RegionCache,
    limits: &Limits,
) -> Result<Parsed, u8> {
    let (mut readable, writable) = split(descs)?;
    let header_ranges = take_front(&mut readable, 16)?;
    let mut header = [0u8; 16];
    read_bytes(mem, cache, &header_ranges, &mut header)?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().map_err(|_| S_IOERR)?);
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = kind == VIRTIO_BLK_T_OUT;
            if write && limits.read_only {
                return Err(S_IOERR);
            }
            // Data must flow the right way: a read has no readable data, a
            // write no writable data.
            let data = if write {
                if !writable.is_empty() {
                    return Err(S_IOERR);
                }
                readable
            } else {
                if !readable.is_empty() {
                    return Err(S_IOERR);
                }
                writable
            };
            let bytes = total(&data);
            let bs = limits.block_size as u64;
            let start = sector.checked_mul(SECTOR).ok_or(S_IOERR)?;
            let end_sector = sector.checked_add(bytes / SECTOR).ok_or(S_IOERR)?;
            if bytes == 0
                || !bytes.is_multiple_of(bs)
                || start % bs != 0
                || bytes > limits.max_transfer as u64
                || end_sector > limits.capacity_sectors
            {
                return Err(S_IOERR);
            }
            // Count the guest's segments, not ours: translate splits a
            // segment that crosses a memory region boundary.
            if data.len() > limits.seg_max as usize {
                return Err(S_IOERR);
            }
            let mut sg = SgList::new();
            for &(addr, len) in &data {
                translate_with(mem, cache, addr, len, &mut sg)?;
            }
            Ok(Parsed::Io {
                op: if write { IoOp::Write } else { IoOp::Read },
                offset_blocks: start / bs,
                num_blocks: bytes / bs,
                sg,
                written: if write { 1 } else { bytes as u32 + 1 },
            })
        }
        VIRTIO_BLK_T_FLUSH => {
            if !limits.flush {
                return Err(S_UNSUPP);
            }
            Ok(Parsed::Io {
                op: IoOp::Flush,
                offset_blocks: 0,
                num_blocks: 0,
                sg: SgList::new(),
                written: 1,
            })
        }
        VIRTIO_BLK_T_GET_ID => {
            if !readable.is_empty() {
                return Err(S_IOERR);
            }
            let room = total(&writable).min(ID_BYTES as u64) as usize;
            let ranges = take_front(&mut writable.clone(), room as u64)?;
            let mut at = 0;
            for (addr, len) in ranges {
                let len = len as usize;
                mem.write_slice(&limits.serial[at..at + len], GuestAddress(addr))
                    .map_err(|_| S_IOERR)?;
                at += len;
            }
            Ok(Parsed::Done {
                written: room as u32 + 1,
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let zeroes = kind == VIRTIO_BLK_T_WRITE_ZEROES;
            if (zeroes && !limits.write_zeroes) || (!zeroes && !limits.discard) {
                return Err(S_UNSUPP);
            }
            if limits.read_only {
                return Err(S_IOERR);
            }
            // We offer max_discard_seg = max_write_zeroes_seg = 1.
            if total(&readable) != 16 || !writable.is_empty() {
                return Err(S_IOERR);
            }
            let mut seg = [0u8; 16];
            read_bytes(mem, cache, &readable, &mut seg)?;
            let first = u64::from_le_bytes(seg[0..8].try_into().map_err(|_| S_IOERR)?);
            let count = u32::from_le_bytes(seg[8..12].try_into().map_err(|_| S_IOERR)?) as u64;
            let flags = u32::from_le_bytes(seg[12..16].try_into().map_err(|_| S_IOERR)?);
            // Only the unmap flag exists, and only for write-zeroes.
            if (!zeroes && flags != 0) || (zeroes && flags & !1 != 0) {
                return Err(S_UNSUPP);
            }
            let bs = limits.block_size as u64;
            let start = first.checked_mul(SECTOR).ok_or(S_IOERR)?;
            let end = first.checked_add(count).ok_or(S_IOERR)?;
            if count == 0
                || count > limits.max_discard_sectors as u64
                || end > limits.capacity_sectors
                || start % bs != 0
                || !(count * SECTOR).is_multiple_of(bs)
            {
                return Err(S_IOERR);
            }
            Ok(Parsed::Io {
                op: if zeroes {
                    IoOp::WriteZeroes
                } else {
                    IoOp::Discard
                },
                offset_blocks: start / bs,
                num_blocks: count * SECTOR / bs,
                sg: SgList::new(),
                written: 1,
            })
        }
        _ => Err(S_UNSUPP),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: u64 = 1 << 20;

    #[test]
    fn the_region_cache_translates_exactly_like_a_fresh_lookup() {
        let m = mem();
        let cache = RegionCache::default();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let span = 3 * MEM + 0x3000;
            let (addr, len) = (next() % span, next() % 0x5000 + 1);
            let (mut a, mut b) = (SgList::new(), SgList::new());
            let fresh = translate(&m, addr, len, &mut a);
            let cached = translate_with(&m, &cache, addr, len, &mut b);
            assert_eq!(fresh.is_ok(), cached.is_ok(), "{addr:#x}+{len:#x}");
            if fresh.is_ok() {
                let a: Vec<_> = a.iter().map(|v| (v.ptr(), v.len())).collect();
                let b: Vec<_> = b.iter().map(|v| (v.ptr(), v.len())).collect();
                assert_eq!(a, b, "{addr:#x}+{len:#x}");
            }
            if next() % 64 == 0 {
                cache.reset();
            }
        }
    }

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
        Desc {
            addr: at,
            len: 16,
            write: false,
        }
    }

    fn status(at: u64) -> Desc {
        Desc {
            addr: at,
            len: 1,
            write: true,
        }
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
            Desc {
                addr: 4096,
                len: 4096,
                write: true,
            },
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
            Desc {
                addr: h.addr,
                len: 10,
                write: false,
            },
            Desc {
                addr: h.addr + 10,
                len: 6 + 512,
                write: false,
            },
            Desc {
                addr: 8192,
                len: 1,
                write: true,
            },
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
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Desc {
                addr: 4096,
                len: 513,
                write: true,
            },
        ];
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
        let d = [
            Desc {
                addr: 0,
                len: 8,
                write: false,
            },
            status(100),
        ];
        expect_status(parse(&d, &m, &l), S_IOERR);
        // Header outside guest memory (in the hole).
        let d = [
            Desc {
                addr: MEM + 4096,
                len: 16,
                write: false,
            },
            status(100),
        ];
        expect_status(parse(&d, &m, &l), S_IOERR);
        // Data buffer in the hole.
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Desc {
                addr: MEM + 4096,
                len: 512,
                write: true,
            },
            status(100),
        ];
        expect_status(parse(&d, &m, &l), S_IOERR);
        // Data buffer running past the end of memory.
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Desc {
                addr: 3 * MEM - 512,
                len: 1024,
                write: true,
            },
            status(100),
        ];
        expect_status(parse(&d, &m, &l), S_IOERR);
        // Address overflow.
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Desc {
                addr: u64::MAX - 10,
                len: 512,
                write: true,
            },
            status(100),
        ];
        expect_status(parse(&d, &m, &l), S_IOERR);
        // Wrong direction: a read whose data is device-readable.
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Desc {
                addr: 4096,
                len: 512,
                write: false,
            },
            status(100),
        ];
        expect_status(parse(&d, &m, &l), S_IOERR);
        // Wrong direction: a write whose data is device-writable.
        let d = [
            header(&m, 0, VIRTIO_BLK_T_OUT, 0),
            Desc {
                addr: 4096,
                len: 512,
                write: true,
            },
            status(100),
        ];
        expect_status(parse(&d, &m, &l), S_IOERR);
        // Readable after writable.
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Desc {
                addr: 4096,
                len: 512,
                write: true,
            },
            Desc {
                addr: 8192,
                len: 16,
                write: false,
            },
            status(100),
        ];
        expect_status(parse(&d, &m, &l), S_IOERR);
        // Length not a multiple of the block size, zero length.
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Desc {
                addr: 4096,
                len: 100,
                write: true,
            },
            status(100),
        ];
        expect_status(parse(&d, &m, &l), S_IOERR);
        let d = [header(&m, 0, VIRTIO_BLK_T_IN, 0), status(100)];
        expect_status(parse(&d, &m, &l), S_IOERR);
        // Sectors past capacity, and a sector number that overflows.
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 2047),
            Desc {
                addr: 4096,
                len: 1024,
                write: true,
            },
            status(100),
        ];
        expect_status(parse(&d, &m, &l), S_IOERR);
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, u64::MAX),
            Desc {
                addr: 4096,
                len: 512,
                write: true,
            },
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
            d.push(Desc {
                addr: 4096 + i * 512,
                len: 512,
                write: true,
            });
        }
        d.push(status(100));
        expect_status(parse(&d, &m, &l), S_IOERR);
        // Too large.
        let mut big = l.clone();
        big.max_transfer = 4096;
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Desc {
                addr: 4096,
                len: 8192,
                write: true,
            },
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
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Desc {
                addr: MEM + 10,
                len: 1,
                write: true,
            },
        ];
        assert!(parse(&d, &m, &l).is_none(), "status outside memory");
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Desc {
                addr: 100,
                len: 0,
                write: true,
            },
        ];
        assert!(parse(&d, &m, &l).is_none(), "zero-length status");
    }

    #[test]
    fn read_only_refuses_every_kind_of_write() {
        let m = mem();
        let mut l = limits();
        l.read_only = true;
        let d = [
            header(&m, 0, VIRTIO_BLK_T_OUT, 0),
            Desc {
                addr: 4096,
                len: 512,
                write: false,
            },
            status(100),
        ];
        expect_status(parse(&d, &m, &l), S_IOERR);
        for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            m.write_slice(&[0u8; 16], GuestAddress(4096)).unwrap();
            let d = [
                header(&m, 0, t, 0),
                Desc {
                    addr: 4096,
                    len: 16,
                    write: false,
                },
                status(100),
            ];
            expect_status(parse(&d, &m, &l), S_IOERR);
        }
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Desc {
                addr: 4096,
                len: 512,
                write: true,
            },
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
        let seg = |t| {
            [
                header(&m, 0, t, 0),
                Desc {
                    addr: 4096,
                    len: 16,
                    write: false,
                },
                status(100),
            ]
        };
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
            Desc {
                addr: 4096,
                len: 32,
                write: false,
            },
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
            Desc {
                addr: 4096,
                len: 20,
                write: true,
            },
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
            Desc {
                addr: 8192,
                len: 5,
                write: true,
            },
            status(100),
        ];
        assert!(matches!(
            parse(&d, &m, &l).unwrap().action,
            Ok(Parsed::Done { written: 6 })
        ));
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
            let _ = walk_chain(&m, (next() % 512) * 16, 16, (next() % 20) as u16, &mut out);
            assert!(out.len() <= 16);
        }
    }

    #[test]
    fn walk_chain_follows_next_and_indirect_and_refuses_loops() {
        let m = mem();
        let put = |table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            m.write_slice(&d, GuestAddress(table + 16 * i)).unwrap();
        };
        let mut out = Vec::new();
        put(0x1000, 0, 0x100, 16, 1, 3);
        put(0x1000, 3, 0x200, 1, 2, 0);
        walk_chain(&m, 0x1000, 16, 0, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out[1].write);
        // Loop.
        put(0x1000, 3, 0x200, 1, 3, 0);
        assert!(walk_chain(&m, 0x1000, 16, 0, &mut out).is_err());
        // Out of range head and next.
        assert!(walk_chain(&m, 0x1000, 16, 16, &mut out).is_err());
        put(0x1000, 3, 0x200, 1, 3, 99);
        assert!(walk_chain(&m, 0x1000, 16, 0, &mut out).is_err());
        // Indirect table, and a nested one.
        put(0x1000, 5, 0x3000, 32, 4, 0);
        put(0x3000, 0, 0x100, 16, 1, 1);
        put(0x3000, 1, 0x200, 1, 2, 0);
        walk_chain(&m, 0x1000, 16, 5, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        put(0x3000, 1, 0x3000, 32, 4, 0);
        assert!(walk_chain(&m, 0x1000, 16, 5, &mut out).is_err());
        // Table outside memory.
        assert!(walk_chain(&m, MEM + 64, 16, 0, &mut out).is_err());
        // An indirect table as long as the queue is a legal, full-size
        // chain; a longer one is served too (as qemu-storage-daemon does),
        // up to the walk's limit.
        // Slot `head` points at an indirect table of `n` chained entries.
        let indirect = |head: u64, table: u64, n: u64| {
            put(0x1000, head, table, (n * 16) as u32, 4, 0);
            for k in 0..n {
                let last = k == n - 1;
                put(
                    table,
                    k,
                    0x100,
                    16,
                    if last { 2 } else { 1 },
                    (k + 1) as u16,
                );
            }
        };
        indirect(6, 0x4000, 16);
        walk_chain(&m, 0x1000, 16, 6, &mut out).unwrap();
        assert_eq!(out.len(), 16);
        indirect(7, 0x5000, 17);
        walk_chain(&m, 0x1000, 16, 7, &mut out).unwrap();
        assert_eq!(out.len(), 17);
    }

    #[test]
    fn buffers_spanning_two_regions_are_refused_only_across_the_hole() {
        let m = mem();
        let l = limits();
        // Ends exactly at the end of region 0: fine.
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Desc {
                addr: MEM - 512,
                len: 512,
                write: true,
            },
            status(100),
        ];
        assert!(parse(&d, &m, &l).unwrap().action.is_ok());
        // Crosses into the hole.
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Desc {
                addr: MEM - 512,
                len: 1024,
                write: true,
            },
            status(100),
        ];
        expect_status(parse(&d, &m, &l), S_IOERR);
    }
}
