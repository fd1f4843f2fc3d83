//! The storage appliance: reactors, devices and (as later issues land)
//! volumes and exports, wired together.
#![deny(missing_docs)]

pub mod api;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod devspec;
pub mod export;
pub mod manager;
pub mod metrics;
pub mod raid;
pub mod selfcheck;
pub mod stats;
pub mod volume;
pub mod workload;
