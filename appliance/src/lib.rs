//! The storage appliance: reactors, devices, RAID volumes and their
//! journal, vhost-user-blk exports and the management API, wired together.
//! Data flows one way: export (`export`) -> volume (`volume`, `raid`) ->
//! device (the `bdev` and `nvme` crates); every change to a volume goes
//! through its one transaction (`raid::transaction`), every operator call
//! through the `manager`.
#![deny(missing_docs)]

pub mod api;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod devpaths;
pub mod devspec;
pub mod export;
pub mod host;
pub mod instance;
pub mod manager;
pub mod metrics;
pub mod nvmf;
pub(crate) use mgmt::peers;
pub mod qos;
pub mod raid;
pub mod selfcheck;
pub mod service;
pub mod stats;
pub mod volume;
pub mod workload;
