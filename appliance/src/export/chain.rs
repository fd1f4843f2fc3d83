//! Descriptor chains in guest memory: following a chain through the
//! descriptor table (and one indirect table), and turning guest addresses
//! into host ones through a small cache of the regions last used. Anything
//! outside guest memory is an error, never an access.
//!
//! This is the part of every request that runs before the virtio-blk
//! parser (request.rs) looks at what the chain says, so it is kept short:
//! one region lookup per chain for the descriptor table, and fixed-size
//! reads the compiler inlines (a 16-byte `memcpy` call cost more than the
//! copy).

use bdev::{IoVec, SgList};
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use super::request::S_IOERR;

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
    pub(super) fn find(&self, mem: &GuestMemoryMmap, addr: u64) -> Option<(*mut u8, u64)> {
        match self.lookup(addr) {
            Some(hit) => Some(hit),
            None => self.miss(mem, addr),
        }
    }

    /// The region search, out of line: the hit path stays a few compares.
    #[cold]
    #[inline(never)]
    fn miss(&self, mem: &GuestMemoryMmap, addr: u64) -> Option<(*mut u8, u64)> {
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
    out.clear();
    let mut t = Table::find(mem, cache, table, queue_size);
    let mut i = head;
    let mut indirect = false;
    let mut budget = queue_size as usize;
    loop {
        if i >= t.size || budget == 0 {
            return Err(BadChain);
        }
        budget -= 1;
        let RawDesc {
            addr,
            len,
            flags,
            next,
        } = t.read(mem, cache, i)?;
        let (addr, len, flags) = (u64::from_le(addr), u32::from_le(len), u16::from_le(flags));
        if flags & INDIRECT != 0 {
            if indirect || len == 0 || len % 16 != 0 || len / 16 > u16::MAX as u32 {
                return Err(BadChain);
            }
            indirect = true;
            t = Table::find(mem, cache, addr, (len / 16) as u16);
            // An indirect table is walked up to its own length (and
            // `max`), not the queue size: the spec asks drivers to keep
            // chains within the queue size, but qemu-storage-daemon
            // serves longer tables, and a request we cannot follow has no
            // status byte to say so (it went back unanswered). The
            // descriptor that points to the table is not part of the chain.
            budget = t.size as usize;
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
        i = u16::from_le(next);
    }
}

/// A descriptor as it lies in the table (virtio 1.x split ring, all fields
/// little-endian).
#[repr(C)]
#[derive(Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

const _: () = assert!(std::mem::size_of::<RawDesc>() == 16);

/// A descriptor table: where it starts in guest memory, its length in
/// entries, and its host address when all of it lies in one region (as
/// every real one does), so an entry is one 16-byte load.
struct Table {
    addr: u64,
    size: u16,
    host: Option<*const u8>,
}

impl Table {
    fn find(mem: &GuestMemoryMmap, cache: &RegionCache, addr: u64, size: u16) -> Table {
        let bytes = size as u64 * 16;
        let host = match cache.find(mem, addr) {
            Some((host, in_region)) if in_region >= bytes => Some(host as *const u8),
            _ => None,
        };
        Table { addr, size, host }
    }

    /// Entry `i` (< size) as the guest wrote it.
    #[inline]
    fn read(
        &self,
        mem: &GuestMemoryMmap,
        cache: &RegionCache,
        i: u16,
    ) -> Result<RawDesc, BadChain> {
        if let Some(host) = self.host {
            // SAFETY: `i < size` and the whole table lies in one mapped
            // region (checked in `find`); a racing guest write can only
            // change the bytes we read.
            // Any 16 bytes are a valid `RawDesc`.
            return Ok(unsafe { std::ptr::read_unaligned(host.add(i as usize * 16).cast()) });
        }
        // A table across regions or outside memory: the general path.
        let mut d = [0u8; 16];
        let at = self.addr.checked_add(i as u64 * 16).ok_or(BadChain)?;
        read_bytes(mem, cache, &[(at, 16)], &mut d).map_err(|_| BadChain)?;
        // SAFETY: as above.
        Ok(unsafe { std::ptr::read_unaligned(d.as_ptr().cast()) })
    }
}

/// Sixteen guest bytes at `addr` (a request header, a discard segment).
#[inline]
pub(super) fn read16(
    mem: &GuestMemoryMmap,
    cache: &RegionCache,
    addr: u64,
) -> Result<[u8; 16], u8> {
    if let Some((host, in_region)) = cache.find(mem, addr) {
        if in_region >= 16 {
            // SAFETY: `[host, host+16)` lies inside one mapped region; a
            // racing guest write can only change the bytes we read.
            return Ok(unsafe { std::ptr::read_unaligned(host.cast_const().cast()) });
        }
    }
    let mut d = [0u8; 16];
    read_bytes(mem, cache, &[(addr, 16)], &mut d)?;
    Ok(d)
}

/// Copy guest bytes out through the same translation the data path uses
/// (cheaper than vm-memory's generic slice iterator for 16-byte headers).
pub(super) fn read_bytes(
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const MEM: u64 = 1 << 20;

    /// Write descriptor `i` of the table at `table`.
    fn put(m: &GuestMemoryMmap, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        m.write_slice(&d, GuestAddress(table + 16 * i)).unwrap();
    }

    fn mem() -> GuestMemoryMmap {
        // Two regions with a hole between them.
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), MEM as usize),
            (GuestAddress(2 * MEM), MEM as usize),
        ])
        .unwrap()
    }

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

    #[test]
    fn walk_chain_follows_next_and_indirect_and_refuses_loops() {
        let m = mem();
        let put = |table, i, addr, len, flags, next| put(&m, table, i, addr, len, flags, next);
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
    fn a_table_across_two_adjacent_regions_is_walked_like_one_inside_a_region() {
        // No real driver does this, but the guest may: the table's entries
        // are then read one by one through the general path.
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), MEM as usize),
            (GuestAddress(MEM), MEM as usize),
        ])
        .unwrap();
        let put = |table, i, addr, len, flags, next| put(&m, table, i, addr, len, flags, next);
        let cache = RegionCache::default();
        for table in [MEM - 32, 0x1000] {
            put(table, 0, 0x100, 16, 1, 3);
            put(table, 3, 0x200, 4096, 1 | 2, 1);
            put(table, 1, 0x300, 1, 2, 0);
            let mut out = Vec::new();
            walk_chain_with(&m, &cache, table, 4, 0, 16, &mut out).unwrap();
            let got: Vec<_> = out.iter().map(|d| (d.addr, d.len, d.write)).collect();
            assert_eq!(
                got,
                [(0x100, 16, false), (0x200, 4096, true), (0x300, 1, true)]
            );
            // The budget still holds: a loop through both halves fails.
            put(table, 1, 0x300, 1, 1 | 2, 3);
            assert!(walk_chain_with(&m, &cache, table, 4, 0, 16, &mut out).is_err());
        }
    }
}
