use crate::device::IoOp;

/// Why one IO failed. Small and `Copy` so failing costs nothing on the IO
/// path; the caller adds which device, volume or request it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// A read, write, discard or write-zeroes of zero blocks.
    #[error("zero-length {0:?}")]
    ZeroLength(IoOp),
    /// The range runs past the end of the device.
    #[error(
        "blocks {offset}..{offset}+{blocks} are past the end of the device ({capacity} blocks)"
    )]
    OutOfRange {
        /// First block.
        offset: u64,
        /// Block count.
        blocks: u64,
        /// Device size in blocks.
        capacity: u64,
    },
    /// More than the device's maximum transfer size.
    #[error("transfer of {bytes} bytes exceeds the device maximum of {max} bytes")]
    TooLarge {
        /// Requested bytes.
        bytes: u64,
        /// The device's limit.
        max: u64,
    },
    /// The scatter-gather list does not add up to the block count.
    #[error("scatter-gather list holds {sg_bytes} bytes but the request covers {expected} bytes")]
    LengthMismatch {
        /// Bytes in the list.
        sg_bytes: u64,
        /// Bytes the block range needs.
        expected: u64,
    },
    /// The device does not do this operation.
    #[error("{0:?} is not supported by this device")]
    Unsupported(IoOp),
    /// The medium failed for this block (or a fault was injected).
    #[error("media error at block {0}")]
    Media(u64),
    /// The device is gone (pulled, powered off, failed).
    #[error("device has failed or was removed")]
    DeviceFailed,
    /// The operating system returned this errno.
    #[error("I/O error from the OS: {}", std::io::Error::from_raw_os_error(*.0))]
    Os(i32),
    /// The device did not complete the request in time; it was aborted.
    #[error("timed out and aborted")]
    TimedOut,
    /// The device reported this status (NVMe: status code type << 8 | code).
    #[error("device reported status {0:#06x}")]
    Device(u16),
    /// The OS moved fewer bytes than asked.
    #[error("short transfer: {done} of {expected} bytes")]
    Short {
        /// Bytes moved.
        done: u64,
        /// Bytes asked.
        expected: u64,
    },
}

/// Why a device could not be created or a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    /// A parameter is out of its allowed range.
    #[error("invalid device parameter: {0}")]
    InvalidArgument(String),
    /// The OS refused (open, mmap, io_uring setup).
    #[error("{what}: {source}")]
    Os {
        /// What was being done, with the path or size.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The device does not support this control operation.
    #[error("{0}")]
    Unsupported(String),
    /// Something else holds the device (a mount, md, dm, another program's
    /// exclusive open).
    #[error("{0}")]
    Busy(String),
    /// No room for another channel now (an NVMe controller's IO queue
    /// pairs are all in use): the device itself is fine, and a channel let
    /// go makes room (or, when the host is short of memory or file
    /// descriptors, memory freed). Whoever asked for the channel fails, not the device.
    #[error("{0}")]
    Exhausted(String),
}

impl BdevError {
    /// The OS refused `what`. Refused for want of memory, locked memory
    /// or file descriptors, it is the host that has no
    /// room now, not the device that is broken: [`BdevError::Exhausted`],
    /// so a RAID member is not failed for it (a volume's channel open
    /// fails instead, and is asked again).
    pub fn os(what: String, source: std::io::Error) -> BdevError {
        if host_short(&source) {
            BdevError::Exhausted(format!("{what}: {source} (the host has no room now)"))
        } else {
            BdevError::Os { what, source }
        }
    }
}

/// Whether the OS refused for want of a host resource (memory, locked
/// memory, file descriptors) rather than because of the device. (Not
/// ENOSPC: on a write or a create that is a disk full.)
pub fn host_short(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOMEM | libc::EMFILE | libc::ENFILE | libc::EAGAIN)
    )
}
