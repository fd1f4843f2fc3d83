//! The contract every block device implements.

use smallvec::SmallVec;

use crate::error::{BdevError, IoError};

/// What a device says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Name, for logs and errors.
    pub name: String,
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    /// Size in blocks.
    pub num_blocks: u64,
    /// Largest read or write in bytes.
    pub max_transfer: u32,
    /// Requests should not cross multiples of this many blocks (0: none).
    pub optimal_io_boundary: u32,
    /// Smallest IO that avoids extra work, in blocks (RAID5: a chunk).
    pub min_io_blocks: u32,
    /// Flush does something (the device has a volatile cache or buffers).
    pub flush: bool,
    /// Discard is supported.
    pub discard: bool,
    /// Write-zeroes is supported.
    pub write_zeroes: bool,
}

impl DeviceInfo {
    /// Size in bytes (saturating: devices are refused at attach, and
    /// volumes at creation, when theirs does not fit in 64 bits).
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks.saturating_mul(self.block_size as u64)
    }
}

/// An IO operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    /// Read blocks into the scatter-gather list.
    Read,
    /// Write blocks from the scatter-gather list.
    Write,
    /// Make every completed write durable.
    Flush,
    /// The blocks' contents are no longer needed.
    Discard,
    /// Make the blocks read back as zeroes.
    WriteZeroes,
}

/// One scatter-gather element: memory the device reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoVec {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: an IoVec is an address range; who may touch the memory is governed
// by the request contract (`IoVec::new`), not by which thread holds it.
unsafe impl Send for IoVec {}

impl IoVec {
    /// An element for `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The memory must stay valid, and not be accessed by anyone else in a
    /// conflicting way, from submission until the request's completion has
    /// been returned by `poll`.
    #[inline]
    pub unsafe fn new(ptr: *mut u8, len: usize) -> IoVec {
        IoVec { ptr, len }
    }

    /// Start address.
    #[inline]
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A scatter-gather list; four elements fit without allocating.
pub type SgList = SmallVec<[IoVec; 4]>;

/// A request to a channel. `tag` comes back in the completion.
#[derive(Debug)]
pub struct IoRequest {
    /// What to do.
    pub op: IoOp,
    /// First block.
    pub offset_blocks: u64,
    /// Number of blocks (0 for flush).
    pub num_blocks: u64,
    /// Memory for reads and writes (empty for the others).
    pub sg: SgList,
    /// The submitter's handle for the completion.
    pub tag: u64,
}

impl IoRequest {
    /// A flush.
    pub fn flush(tag: u64) -> IoRequest {
        IoRequest {
            op: IoOp::Flush,
            offset_blocks: 0,
            num_blocks: 0,
            sg: SgList::new(),
            tag,
        }
    }

    /// A discard or write-zeroes of a range.
    pub fn range(op: IoOp, offset_blocks: u64, num_blocks: u64, tag: u64) -> IoRequest {
        IoRequest {
            op,
            offset_blocks,
            num_blocks,
            sg: SgList::new(),
            tag,
        }
    }

    /// Total bytes in the scatter-gather list.
    pub fn sg_bytes(&self) -> u64 {
        self.sg.iter().map(|v| v.len as u64).sum()
    }
}

/// A finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The request's tag.
    pub tag: u64,
    /// How it ended.
    pub result: Result<(), IoError>,
}

/// A request that could not be queued.
#[derive(Debug)]
pub enum SubmitError {
    /// The channel's queue is full: poll, then submit the request again.
    Busy(IoRequest),
}

/// One core's path to a device. Not `Send`: it stays on the core that
/// opened it.
pub trait IoChannel {
    /// Queue a request. Invalid requests are accepted and complete with an
    /// error; only a full queue is refused (back-pressure).
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError>;

    /// Move finished requests into `out`; returns how many were added.
    fn poll(&mut self, out: &mut Vec<Completion>) -> usize;

    /// Requests submitted and not yet returned by `poll`.
    fn inflight(&self) -> usize;
}

/// What went wrong on a device since it was opened, counted for metrics.
/// Counters only go up; each is bumped only when the event happens, so the
/// IO path pays nothing for them while IO succeeds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    /// Requests that completed with an error.
    pub io_errors: u64,
    /// Commands that did not complete in time.
    pub timeouts: u64,
    /// Commands the driver asked the device to abort.
    pub aborts: u64,
    /// Controller resets.
    pub resets: u64,
}

/// A block device: shared by all cores, each of which opens its own channel.
pub trait BlockDevice: Send + Sync {
    /// What the device is.
    fn info(&self) -> &DeviceInfo;

    /// A channel for the calling core.
    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError>;

    /// The same storage with a new size, as a new device object: the
    /// contents up to the smaller of the two sizes are kept. The caller
    /// makes sure no IO is in flight to either (a volume swaps the device
    /// while quiesced). Devices whose size is not theirs to change (an
    /// NVMe namespace, a block device node) refuse.
    fn resized(&self, num_blocks: u64) -> Result<std::sync::Arc<dyn BlockDevice>, BdevError> {
        Err(BdevError::Unsupported(format!(
            "{}: this kind of device cannot be resized (asked for {num_blocks} blocks)",
            self.info().name
        )))
    }

    /// What names this storage wherever it is attached (an NVMe
    /// namespace's NGUID, say), when it has such a name: a volume on one
    /// device checks it at every start, so that a disk swapped in at the
    /// same address is never taken for the one it was made on. `None`:
    /// the device is known only by where it is (a file) or holds nothing
    /// across a start (RAM).
    fn identity(&self) -> Option<String> {
        None
    }

    /// Its error counters (devices that cannot fail report zeros).
    fn error_counts(&self) -> ErrorCounts {
        ErrorCounts::default()
    }

    /// Drop every write that has not been flushed, as a power cut would.
    /// Only devices that model a volatile cache support it.
    fn power_cut(&self) -> Result<(), BdevError> {
        Err(BdevError::Unsupported(format!(
            "{}: this device cannot simulate a power cut",
            self.info().name
        )))
    }
}

/// Check a request against a device's description. Every device runs this
/// first, so bad requests fail the same way everywhere.
#[inline]
pub fn validate(info: &DeviceInfo, req: &IoRequest) -> Result<(), IoError> {
    let supported = match req.op {
        IoOp::Read | IoOp::Write | IoOp::Flush => true,
        IoOp::Discard => info.discard,
        IoOp::WriteZeroes => info.write_zeroes,
    };
    if !supported {
        return Err(IoError::Unsupported(req.op));
    }
    if req.op == IoOp::Flush {
        return Ok(());
    }
    if req.num_blocks == 0 {
        return Err(IoError::ZeroLength(req.op));
    }
    let end = req.offset_blocks.checked_add(req.num_blocks);
    if end.is_none_or(|e| e > info.num_blocks) {
        return Err(IoError::OutOfRange {
            offset: req.offset_blocks,
            blocks: req.num_blocks,
            capacity: info.num_blocks,
        });
    }
    if matches!(req.op, IoOp::Read | IoOp::Write) {
        let expected = req.num_blocks * info.block_size as u64;
        if expected > info.max_transfer as u64 {
            return Err(IoError::TooLarge {
                bytes: expected,
                max: info.max_transfer as u64,
            });
        }
        let sg_bytes = req.sg_bytes();
        if sg_bytes != expected {
            return Err(IoError::LengthMismatch { sg_bytes, expected });
        }
    }
    Ok(())
}
