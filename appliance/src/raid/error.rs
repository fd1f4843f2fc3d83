//! How RAID work that is not a volume change fails (metadata IO, the
//! journal, the bitmap): one error type, each variant a way to fail that
//! names what it was about.

use std::time::Duration;

/// Why metadata IO, a journal or a bitmap operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RaidError {
    /// IO on a device failed.
    #[error("{device}: {what}: {reason}")]
    Io {
        /// The device.
        device: String,
        /// What was done (`Read`, `Flush`, "journal superblock").
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// IO on a device did not finish in time.
    #[error("{device}: {what} did not finish in {after:?}")]
    Timeout {
        /// The device.
        device: String,
        /// What was done.
        what: String,
        /// How long it was waited for.
        after: Duration,
    },
    /// A parameter, or what a device holds, is not what it must be
    /// (corrupt, foreign, out of range).
    #[error("{0}")]
    Invalid(String),
    /// A volume operation failed under it.
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
}
