//! The block-device contract and the leaf devices.
//!
//! A [`BlockDevice`] describes itself ([`DeviceInfo`]) and hands out one
//! [`IoChannel`] per reactor core. A channel takes [`IoRequest`]s with
//! scatter-gather lists and reports [`Completion`]s when polled; it is used
//! only by the core that opened it, so the IO path has no locks and no
//! cross-thread callbacks.
//!
//! Devices here: [`RamDevice`], [`NullDevice`], [`FileDevice`] (io_uring, O_DIRECT where the
//! file system allows it) and [`FaultDevice`], a wrapper that injects
//! failures, latency and power cuts for tests. [`DmaPool`] hands out DMA
//! buffers from hugepages, with a fallback to ordinary pages.
#![deny(missing_docs)]

#[cfg(any(test, feature = "test-utils"))]
pub mod conformance;
mod device;
mod dma;
mod dmamap;
mod error;
mod fault;
mod file;
mod null;
mod ram;
pub mod sg;

pub use device::{
    validate, BlockDevice, Completion, DeviceInfo, ErrorCounts, IoChannel, IoOp, IoRequest, IoVec,
    SgList, SubmitError,
};
pub use dma::{DmaBuf, DmaPool};
pub use dmamap::{
    add_dma_mapper, dma_mappers_present, register_dma_memory, DmaMapper, DmaRegistration,
};
pub use error::{host_short, BdevError, IoError};
pub use fault::{FaultControl, FaultDevice};
pub use file::FileDevice;
pub use null::{FailingChannel, NullDevice};
pub use ram::RamDevice;
