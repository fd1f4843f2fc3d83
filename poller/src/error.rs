use std::time::Duration;

/// Why a reactor set stopped abnormally or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    /// The configuration asks for something impossible.
    #[error("invalid reactor configuration: {0}")]
    InvalidConfig(String),
    /// The operating system refused a resource (thread, eventfd).
    #[error("reactor setup failed: {what}: {source}")]
    Os {
        /// What was being set up.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A reactor panicked; the set was stopped.
    #[error("reactor {core} panicked: {message}")]
    Panicked {
        /// Index of the reactor that panicked.
        core: usize,
        /// The panic payload, if it was a string.
        message: String,
    },
}

/// A message could not be queued to a reactor.
#[derive(thiserror::Error)]
pub enum SendError<T> {
    /// The reactor's inbox is full: back-pressure, try again later.
    #[error("reactor inbox is full")]
    Full(T),
    /// The reactor set is stopping or stopped.
    #[error("reactor set is stopped")]
    Stopped(T),
    /// No reactor has this index.
    #[error("no reactor with index {0}")]
    NoSuchReactor(usize, T),
}

impl<T> std::fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Why a suspend of a quiesce object failed. In every case nothing changed
/// and the object is no more suspended than before the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuiesceError {
    /// The object does not exist, or is being torn down.
    #[error("{0}: no such object (it does not exist or is being removed)")]
    NotFound(String),
    /// Some reactors did not acknowledge within the deadline.
    #[error("{name}: reactors {pending:?} did not drain their IO within {waited:?}; nothing was changed")]
    DeadlineExceeded {
        /// The object.
        name: String,
        /// Reactors that had not acknowledged.
        pending: Vec<usize>,
        /// How long the caller waited.
        waited: Duration,
    },
    /// Every reactor acknowledged, but work the object still does after
    /// answering its IO (a RAID1's writes to write-mostly members) did not
    /// finish within the deadline.
    #[error("{name}: {what} did not finish within {waited:?}; nothing was changed")]
    BackgroundBusy {
        /// The object.
        name: String,
        /// What was still going on.
        what: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// Called on a reactor thread, which would wait for itself.
    #[error("{0}: suspend called on reactor thread {1}; it must be called from a control thread")]
    OnReactor(String, usize),
    /// An object of this name already exists.
    #[error("{0}: an object of this name already exists")]
    AlreadyExists(String),
    /// The object exists but holds another configuration type.
    #[error("{0}: object has a different type")]
    WrongType(String),
    /// The reactor set has stopped.
    #[error("{0}: the reactor set has stopped")]
    Stopped(String),
}

impl QuiesceError {
    /// Whether the suspend ran out of time (IO, or background work, that
    /// did not drain): a caller's deadline, not a fault.
    pub fn is_deadline(&self) -> bool {
        matches!(
            self,
            QuiesceError::DeadlineExceeded { .. } | QuiesceError::BackgroundBusy { .. }
        )
    }
}
