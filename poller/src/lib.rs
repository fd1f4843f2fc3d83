//! Pinned per-core reactors and the quiesce epoch.
//!
//! A [`Reactors`] set runs one thread per poller core. Each reactor loops over
//! its registered pollers, its bounded inbox of cross-core messages, its
//! timers and the quiesce gates of the objects it serves, and sleeps on an
//! eventfd when it has been idle for a while. Everything a reactor owns is
//! touched only by that reactor; other threads talk to it through
//! [`ReactorSet::send`].
//!
//! A [`QuiesceObject`] is anything whose configuration the IO path reads (a
//! volume, an export, a journal). Its configuration changes only while every
//! reactor has acknowledged that it has no IO of that object in flight; see
//! the `quiesce` module for the protocol.
#![deny(missing_docs)]

mod error;
mod quiesce;
mod reactor;

pub use error::{QuiesceError, ReactorError, SendError};
pub use quiesce::{
    Admission, Domain, Helping, LocalGate, QuiesceObject, QuiesceStats, ReconfigureError,
    SuspendGuard,
};
pub use reactor::{
    current_reactor, Ctx, FdWake, PollState, ReactorConfig, ReactorSet, ReactorStats, Reactors,
};
