//! IO commands checked against the namespace before anything is done:
//! what the volume is asked to do, and where the data comes from.

use bdev::{DeviceInfo, IoOp};
use nvme::spec::{io as cmd, Sqe, Status};
use nvmf::capsule::{self, status, DataPointer};

/// Namespace is write protected.
pub const WRITE_PROTECTED: Status = Status { sct: 0, sc: 0x20 };

/// What a checked IO command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The operation.
    pub op: IoOp,
    /// First block.
    pub offset_blocks: u64,
    /// Blocks.
    pub num_blocks: u64,
    /// Bytes of data moved (reads and writes; DSM: its range list).
    pub bytes: usize,
    /// The data of a write is in the capsule.
    pub in_capsule: bool,
    /// A write with Force Unit Access: flushed before it completes.
    pub fua: bool,
    /// Dataset Management: ranges to deallocate (0: the command is a hint
    /// and does nothing).
    pub ranges: usize,
}

impl Plan {
    /// A flush (also what an unused slot holds).
    pub const FLUSH: Plan = Plan {
        op: IoOp::Flush,
        offset_blocks: 0,
        num_blocks: 0,
        bytes: 0,
        in_capsule: false,
        fua: false,
        ranges: 0,
    };
}

/// CDW0's FUSE bits (fused operation).
const FUSE: u32 = 3 << 8;

/// Check `s` against a namespace of `info`.
pub fn check(s: &Sqe, info: &DeviceInfo, read_only: bool) -> Result<Plan, Status> {
    let op = s.opcode();
    let writes = matches!(op, cmd::WRITE | cmd::WRITE_ZEROES | cmd::DSM);
    if s.cdw0 & FUSE != 0 {
        // Identify says FUSES 0: a fused pair's second half (a write after
        // a Compare) must not run on its own.
        return Err(Status::INVALID_FIELD);
    }
    if op == cmd::FLUSH {
        if s.nsid != 1 && s.nsid != 0xffff_ffff {
            return Err(Status::INVALID_NAMESPACE);
        }
        return Ok(Plan::FLUSH);
    }
    if !matches!(op, cmd::READ | cmd::WRITE | cmd::WRITE_ZEROES | cmd::DSM) {
        return Err(Status::INVALID_OPCODE);
    }
    if s.nsid != 1 {
        return Err(Status::INVALID_NAMESPACE);
    }
    if writes && read_only {
        return Err(WRITE_PROTECTED);
    }
    let dp = capsule::data_pointer(s);
    if op == cmd::DSM {
        let ranges = (s.cdw[0] & 0xff) as usize + 1;
        let deallocate = s.cdw[1] & cmd::DSM_AD != 0;
        // The host may hand a larger buffer than the ranges need (Linux
        // sends its whole 4 KiB range page): the first NR + 1 count.
        let need = ranges * 16;
        let (in_capsule, len) = match dp {
            DataPointer::InCapsule { offset: 0, len } => (true, len as usize),
            DataPointer::Transport { len } => (false, len as usize),
            DataPointer::InCapsule { .. } => return Err(status::SGL_OFFSET),
            DataPointer::Other(_) => return Err(status::SGL_TYPE),
        };
        if len < need || len > 4096 {
            return Err(status::SGL_LENGTH);
        }
        if deallocate && !info.discard {
            return Err(Status::INVALID_FIELD);
        }
        return Ok(Plan {
            op: IoOp::Discard,
            offset_blocks: 0,
            num_blocks: 0,
            bytes: len,
            in_capsule,
            fua: false,
            // Without the deallocate attribute the ranges are only hints.
            ranges: if deallocate { ranges } else { 0 },
        });
    }
    let slba = s.slba();
    let nlb = s.nlb() as u64;
    match slba.checked_add(nlb) {
        Some(end) if end <= info.num_blocks => {}
        _ => return Err(Status::LBA_OUT_OF_RANGE),
    }
    if op == cmd::WRITE_ZEROES {
        if !info.write_zeroes {
            return Err(Status::INVALID_OPCODE);
        }
        return Ok(Plan {
            op: IoOp::WriteZeroes,
            offset_blocks: slba,
            num_blocks: nlb,
            bytes: 0,
            in_capsule: false,
            fua: s.cdw[2] & (1 << 30) != 0,
            ranges: 0,
        });
    }
    let bytes = nlb * info.block_size as u64;
    if bytes > (4096u64 << super::identify::mdts(info)) {
        return Err(Status::INVALID_FIELD);
    }
    let bytes = bytes as usize;
    let in_capsule = match dp {
        DataPointer::Transport { len } if len as usize == bytes => false,
        // At most what Identify says a capsule holds (IOCCSZ): more was
        // taken, up to 128 KiB a command.
        DataPointer::InCapsule { offset: 0, len }
            if len as usize == bytes
                && op == cmd::WRITE
                && bytes <= super::identify::IN_CAPSULE as usize =>
        {
            true
        }
        DataPointer::InCapsule { offset, .. } if offset != 0 => return Err(status::SGL_OFFSET),
        DataPointer::InCapsule { .. } if op == cmd::READ => return Err(status::SGL_TYPE),
        DataPointer::Other(_) => return Err(status::SGL_TYPE),
        _ => return Err(status::SGL_LENGTH),
    };
    Ok(Plan {
        op: if op == cmd::READ {
            IoOp::Read
        } else {
            IoOp::Write
        },
        offset_blocks: slba,
        num_blocks: nlb,
        bytes,
        in_capsule,
        fua: op == cmd::WRITE && s.cdw[2] & (1 << 30) != 0,
        ranges: 0,
    })
}

/// The first `ranges` block ranges of a Dataset Management range list,
/// each checked against the namespace.
pub fn dsm_ranges(list: &[u8], ranges: usize, num_blocks: u64) -> Result<Vec<(u64, u64)>, Status> {
    let mut out = Vec::with_capacity(ranges);
    for r in list.chunks_exact(16).take(ranges) {
        let nlb = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as u64;
        let slba = u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
        match slba.checked_add(nlb) {
            Some(end) if end <= num_blocks => {}
            _ => return Err(Status::LBA_OUT_OF_RANGE),
        }
        if nlb > 0 {
            out.push((slba, nlb));
        }
    }
    Ok(out)
}
