//! Crate `nvme`: a userspace, polled NVMe driver.
//!
//! A [`Controller`] is brought up over a [`Transport`] (VFIO for real
//! devices, [`soft::SoftController`] for tests and benchmarks); each active
//! namespace becomes a [`Namespace`], a block device whose channels are IO
//! queue pairs, one per reactor core. Completions are polled by phase bit;
//! no interrupts are used.
//!
//! Data moves by DMA straight to and from memory registered with
//! [`Controller::register_memory`] (the DMA pool, guest memory); anything
//! else goes through bounce pages owned by the channel, so any caller's
//! memory works and registered memory is zero-copy.
#![deny(missing_docs)]

mod controller;
mod error;
mod iova;
mod namespace;
mod queue;
mod recovery;
pub mod soft;
pub mod spec;
mod transport;
pub mod vfio;

pub use controller::{Controller, Options};
pub use error::NvmeError;
pub use namespace::Namespace;
pub use transport::{Bar, DmaMem, Transport};
