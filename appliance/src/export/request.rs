//! Parsing virtio-blk requests from descriptor chains, with everything a
//! hostile guest can put there turned into a status, never a panic and never
//! an access outside guest memory.
//!
//! A chain is a list of guest buffers, device-readable ones first: a 16-byte
//! header (type, reserved, sector), the data, and a final device-writable
//! status byte. Any framing is accepted (the header may span descriptors,
//! the status may share a descriptor with data), as VIRTIO_F_VERSION_1
//! requires.

use bdev::{IoOp, SgList};
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::chain::{read16, read_bytes, translate_with};
pub use super::chain::{Desc, RegionCache};

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

/// What the export tells the parser about the device behind it.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// The device's logical block size; IO must be aligned to it.
    pub block_size: u32,
    /// Largest request taken, in bytes (what seg_max and size_max let a
    /// guest send).
    pub max_transfer: u32,
    /// Largest request the volume's device takes at once: a larger one is
    /// sent in pieces of this size.
    pub part_max: u32,
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

/// The largest piece the device `info` describes takes at once
/// (`Limits::part_max`): at least a block.
pub fn part_max(info: &bdev::DeviceInfo) -> u32 {
    info.max_transfer.max(info.block_size)
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
    /// Its guest address (for a dirty log).
    pub status_gpa: u64,
    /// What to do, or the status to answer with at once.
    pub action: Result<Parsed, u8>,
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
    let (status, _) = cache.find(mem, status_gpa)?;
    // Two returns rather than one after a match: the match kept the parsed
    // request in a temporary and copied it twice (callgrind).
    if let Some(action) = parse_plain_io(descs, mem, cache, limits) {
        return Some(Request {
            status,
            status_gpa,
            action,
        });
    }
    Some(Request {
        status,
        status_gpa,
        action: parse_body(descs, mem, cache, limits),
    })
}

/// The shape nearly every read and write has: a 16-byte header, data
/// buffers all going one way, a 1-byte status. Parsed with no range lists
/// (they were a third of the export's instructions per request). `None`
/// for anything else, which the general parser answers; for the chains
/// taken here both give the same answer (a test compares them).
#[inline]
fn parse_plain_io(
    descs: &[Desc],
    mem: &GuestMemoryMmap,
    cache: &RegionCache,
    limits: &Limits,
) -> Option<Result<Parsed, u8>> {
    let [head, data @ .., last] = descs else {
        return None;
    };
    let first = data.first()?;
    if head.len != 16 || head.write || last.len != 1 || last.addr.checked_add(1).is_none() {
        return None;
    }
    let write = !first.write;
    let mut bytes = 0u64;
    for d in data {
        if d.write == write || d.len == 0 || d.addr.checked_add(d.len as u64).is_none() {
            return None;
        }
        bytes += d.len as u64;
    }
    let header = read16(mem, cache, head.addr).ok()?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if kind
        != if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        }
    {
        return None;
    }
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let ranges = data.iter().map(|d| (d.addr, d.len as u64));
    Some(plain_io(
        ranges,
        data.len(),
        mem,
        cache,
        limits,
        write,
        sector,
        bytes,
    ))
}

/// A read or write of `bytes` at `sector` into or from the guest's
/// `segs` data ranges `data`: checked against the limits and translated
/// (both parsers end here).
#[inline]
#[allow(clippy::too_many_arguments)]
fn plain_io(
    data: impl Iterator<Item = (u64, u64)>,
    segs: usize,
    mem: &GuestMemoryMmap,
    cache: &RegionCache,
    limits: &Limits,
    write: bool,
    sector: u64,
    bytes: u64,
) -> Result<Parsed, u8> {
    if write && limits.read_only {
        return Err(S_IOERR);
    }
    let bs = limits.block_size as u64;
    let start = sector.checked_mul(SECTOR).ok_or(S_IOERR)?;
    let end_sector = sector.checked_add(bytes / SECTOR).ok_or(S_IOERR)?;
    // Count the guest's segments, not ours: translate splits a segment
    // that crosses a memory region boundary.
    if bytes == 0
        || !bytes.is_multiple_of(bs)
        || start % bs != 0
        || bytes > limits.max_transfer as u64
        || end_sector > limits.capacity_sectors
        || segs > limits.seg_max as usize
    {
        return Err(S_IOERR);
    }
    let mut sg = SgList::new();
    // Pieces of host memory, not the guest's segments: tiny regions side
    // by side split each segment many times (32 regions of 16 bytes gave
    // some 4,000 vectors a request, held until the device answers:
    // audit). Twice the segment limit is more than any guest's memory
    // layout gives.
    let most = 2 * limits.seg_max as usize;
    for (addr, len) in data {
        translate_with(mem, cache, addr, len, &mut sg)?;
        if sg.len() > most {
            return Err(S_IOERR);
        }
    }
    Ok(Parsed::Io {
        op: if write { IoOp::Write } else { IoOp::Read },
        offset_blocks: start / bs,
        num_blocks: bytes / bs,
        sg,
        written: if write { 1 } else { bytes as u32 + 1 },
    })
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
    let header = match *header_ranges {
        [(addr, _)] => read16(mem, cache, addr)?,
        _ => {
            let mut h = [0u8; 16];
            read_bytes(mem, cache, &header_ranges, &mut h)?;
            h
        }
    };
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().map_err(|_| S_IOERR)?);
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = kind == VIRTIO_BLK_T_OUT;
            // (A write to a read-only export is refused by plain_io, with
            // the same status as a wrong direction.)
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
            let segs = data.len();
            plain_io(
                data.into_iter(),
                segs,
                mem,
                cache,
                limits,
                write,
                sector,
                bytes,
            )
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

/// The status of a request the volume failed. An operation the volume no
/// longer takes (a mirror taken over into a RAID5 takes no discard, a
/// RAID5 into a mirror over a member without write zeroes), though the
/// export offered it when the guest connected, is UNSUPP, as for a type
/// never offered: Linux then stops sending it, or writes zeroes itself,
/// instead of reporting an IO error.
pub fn failed_status(e: &bdev::IoError) -> u8 {
    match e {
        bdev::IoError::Unsupported(_) => S_UNSUPP,
        _ => S_IOERR,
    }
}

#[cfg(test)]
mod tests;
