//! A device that moves no data: every request succeeds at once (reads leave
//! the buffer as it was). It measures the cost of everything above the
//! device, like qemu-storage-daemon's null-co.

use crate::device::{
    validate, BlockDevice, Completion, DeviceInfo, IoChannel, IoRequest, SubmitError,
};
use crate::error::BdevError;

/// The null device.
pub struct NullDevice {
    info: DeviceInfo,
}

impl NullDevice {
    /// A null device of `num_blocks` blocks of `block_size` bytes.
    pub fn new(name: &str, block_size: u32, num_blocks: u64) -> Result<NullDevice, BdevError> {
        if block_size != 512 && block_size != 4096 {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: block size must be 512 or 4096, got {block_size}"
            )));
        }
        if num_blocks == 0 || num_blocks.checked_mul(block_size as u64).is_none() {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: {num_blocks} blocks is not a usable size"
            )));
        }
        Ok(NullDevice {
            info: DeviceInfo {
                name: name.to_string(),
                block_size,
                num_blocks,
                max_transfer: 128 << 20,
                optimal_io_boundary: 0,
                min_io_blocks: 1,
                flush: false,
                discard: true,
                write_zeroes: true,
            },
        })
    }
}

impl BlockDevice for NullDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn resized(&self, num_blocks: u64) -> Result<std::sync::Arc<dyn BlockDevice>, BdevError> {
        Ok(std::sync::Arc::new(NullDevice::new(
            &self.info.name,
            self.info.block_size,
            num_blocks,
        )?))
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(NullChannel {
            info: self.info.clone(),
            done: Vec::with_capacity(256),
        }))
    }
}

struct NullChannel {
    info: DeviceInfo,
    done: Vec<Completion>,
}

impl IoChannel for NullChannel {
    #[inline]
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        let result = validate(&self.info, &req);
        self.done.push(Completion {
            tag: req.tag,
            result,
        });
        Ok(())
    }

    #[inline]
    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }

    fn inflight(&self) -> usize {
        self.done.len()
    }
}

/// A channel that fails every request with `DeviceFailed`: what a consumer
/// uses when it cannot open a channel to the device it must serve (a new
/// configuration generation whose device refused), so its requests fail
/// clearly instead of going anywhere else.
#[derive(Default)]
pub struct FailingChannel {
    done: Vec<Completion>,
}

impl IoChannel for FailingChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        self.done.push(Completion {
            tag: req.tag,
            result: Err(crate::error::IoError::DeviceFailed),
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }

    fn inflight(&self) -> usize {
        self.done.len()
    }
}
