//! What goes wrong in an export: the operator's calls (`ExportError`) and
//! what a frontend describes or fails to do (`FrontendError`), which costs
//! its own connection at most.

use std::path::PathBuf;
use std::time::Duration;

/// Why an export could not be created or deleted.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// An option is out of range; names the option.
    #[error("invalid export option {field}: {reason}")]
    InvalidArgument {
        /// The option.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Something already listens on the socket path.
    #[error("{0}: another process is already serving this socket")]
    AlreadyExists(PathBuf),
    /// A frontend is connected and the deletion was not forced.
    #[error("export {0} has a connected frontend; disconnect it or force the deletion")]
    Connected(String),
    /// The OS refused (bind, thread).
    #[error("{what}: {source}")]
    Os {
        /// What was attempted.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The volume could not be quiesced.
    #[error("quiescing the volume: {0}")]
    Quiesce(#[from] poller::QuiesceError),
    /// The export's state does not allow the change now (a queue holding
    /// writes to a suspended range cannot move).
    #[error("export {0}: {1}")]
    Busy(String, String),
    /// The frontend described something that cannot be served, or did not
    /// answer.
    #[error("export {export}: {source}")]
    Frontend {
        /// The export.
        export: String,
        /// What the frontend did.
        source: FrontendError,
    },
}

/// What a vhost-user frontend (or the guest behind it) handed over that
/// cannot be served, or a failure talking to it.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A memory region, vring or inflight area it described is out of
    /// range, overlapping or inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// Mapping or reading what it handed over failed.
    #[error("{what}: {source}")]
    Os {
        /// What was attempted.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It did not answer a message in time.
    #[error("the frontend did not answer {what} in {after:?}")]
    NoAnswer {
        /// The message.
        what: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// It closed its backend request channel.
    #[error("the frontend closed the channel")]
    Closed,
    /// An earlier notification on this connection failed: its channel is
    /// out of step and no longer used.
    #[error("the backend request channel failed earlier on this connection; the guest sees the new configuration after a reconnect")]
    ChannelFailed,
}

impl FrontendError {
    /// An OS error while doing `what`.
    pub fn os(what: impl Into<String>, source: std::io::Error) -> FrontendError {
        FrontendError::Os {
            what: what.into(),
            source,
        }
    }
}

/// Why a queue could not start on its reactor.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The reactor could not join the guest memory's or the volume's gate.
    #[error("joining a gate: {0}")]
    Gate(#[from] poller::QuiesceError),
    /// The queue's rings are not in guest memory.
    #[error("queue {queue}: {source}")]
    Ring {
        /// The queue.
        queue: u16,
        /// What is wrong with them.
        source: FrontendError,
    },
    /// The volume's device refused a channel.
    #[error("opening a channel to volume {volume}: {source}")]
    Device {
        /// The volume.
        volume: String,
        /// Why.
        source: bdev::BdevError,
    },
}
