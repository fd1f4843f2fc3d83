//! NVMe over Fabrics on its TCP transport (NVMe/TCP 1.0, NVMe-oF 1.1).
//!
//! `pdu` frames and checks the transport's PDUs (common header, digests,
//! data placement) without trusting a byte of them; `capsule` holds the
//! fabrics commands and the pieces of submission and completion entries
//! both ends read. Both are pure: the target (in the appliance) and the
//! host (`host`) own the sockets; `device` is a remote namespace as a
//! block device.
#![deny(missing_docs)]

pub mod capsule;
pub mod device;
mod examine;
pub mod host;
pub mod pdu;

pub use pdu::{Digests, Pdu, PduError};
