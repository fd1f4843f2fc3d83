use crate::spec::Status;

/// Why a controller could not be brought up or a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// The OS refused (mmap, open, ioctl); says what was being done.
    #[error("{0}: {1}")]
    Os(String, #[source] std::io::Error),
    /// VFIO refused; says what was being done.
    #[error("{0}")]
    Vfio(String),
    /// A bad parameter or something the driver does not support.
    #[error("{0}")]
    InvalidArgument(String),
    /// Every IO queue pair the controller granted is in use.
    #[error("{0}")]
    NoQueue(String),
    /// The host has no room now (IO address space, IOMMU mappings, locked
    /// memory): the controller is fine.
    #[error("{0}")]
    NoRoom(String),
    /// The controller did not answer in time.
    #[error("{0}: timed out")]
    Timeout(String),
    /// An admin command failed with this status.
    #[error("{what}: {status}")]
    Command {
        /// The command.
        what: String,
        /// Its status.
        status: Status,
    },
    /// The controller is gone, or failed and could not be reset.
    #[error("controller {0} has failed: {1}")]
    Failed(String, String),
}
