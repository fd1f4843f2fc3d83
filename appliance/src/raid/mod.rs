//! RAID volumes: md-compatible geometry, parity kernels, and the RAID1 and
//! RAID5 devices built on them.

pub mod assembly;
pub mod bitmap;
pub mod cache;
pub mod change;
pub mod error;
pub mod examine;
pub mod geometry;
pub mod journal;
pub mod level;
pub mod locks;
pub mod md;
mod member_meta;
pub mod members;
pub(crate) mod metaio;
pub mod monitor;
pub mod open;
pub mod parity;
pub mod raid1;
pub mod raid5;
pub mod rebuild;
mod sg;
pub mod superblock;
mod transaction;
pub use error::RaidError;
mod window;
pub mod worker;
