//! Members of a RAID volume and how the IO path reports a failed one.
//!
//! A RAID device is immutable for one configuration generation: member
//! states change only by publishing a new device through the volume's
//! quiesce epoch. A channel that sees a member fail stops using it at once
//! (locally), completes the request from the survivors when it can, and
//! sends a [`MemberFailure`] to the volume's monitor, which makes the
//! change for everyone.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use bdev::{BdevError, BlockDevice, IoChannel, IoError};

/// A member's role in the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// Holds current data.
    InSync,
    /// Failed: no IO goes to it.
    Failed,
    /// Being rebuilt: valid below the rebuild cursor, written everywhere
    /// the rebuild has passed.
    Rebuilding,
}

/// One member.
#[derive(Clone)]
pub struct Member {
    /// The device.
    pub dev: Arc<dyn BlockDevice>,
    /// Its state in this generation.
    pub state: MemberState,
}

/// Identity of a member device (its allocation), for telling a report
/// about the device now in a slot from one about the device it replaced.
pub fn device_id(dev: &Arc<dyn BlockDevice>) -> usize {
    Arc::as_ptr(dev) as *const () as usize
}

/// A member failed an IO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberFailure {
    /// Which member (its slot in the volume).
    pub member: usize,
    /// Which device was in the slot (see [`device_id`]): a report about a
    /// device the slot no longer holds is stale and ignored.
    pub device: usize,
    /// What the IO got.
    pub error: IoError,
}

/// What the IO path and background work tell a volume's monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A member failed an IO.
    Failed(MemberFailure),
    /// The rebuild of a slot finished.
    Rebuilt(usize),
    /// The rebuild of a slot stopped with an error.
    RebuildAborted(usize, String),
}

/// Where channels send member failures; cloneable into every channel.
#[derive(Clone)]
pub struct FailureSink(Arc<Mutex<Option<Sender<Event>>>>);

impl FailureSink {
    /// Failures go to `tx`.
    pub fn new(tx: Sender<Event>) -> FailureSink {
        FailureSink(Arc::new(Mutex::new(Some(tx))))
    }

    /// A sink that drops reports (for devices used without a monitor).
    pub fn none() -> FailureSink {
        FailureSink(Arc::new(Mutex::new(None)))
    }

    /// Report a failure. Called on a reactor, only when an IO has failed:
    /// the lock is uncontended and off the hot path.
    pub fn report(&self, member: usize, device: usize, error: IoError) {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = g.as_ref() {
            let _ = tx.send(Event::Failed(MemberFailure {
                member,
                device,
                error,
            }));
        }
    }

    /// Tell the monitor about background work.
    pub fn event(&self, e: Event) {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = g.as_ref() {
            let _ = tx.send(e);
        }
    }
}

/// Member channels opened on the calling core.
pub type MemberChannels = Vec<Option<Box<dyn IoChannel>>>;

/// Channels to the members that take IO (in sync or being rebuilt; `None`
/// for failed ones) and every member's device identity, in slot order.
pub fn open_members(members: &[Member]) -> Result<(MemberChannels, Vec<usize>), BdevError> {
    let mut chans = Vec::with_capacity(members.len());
    for m in members {
        chans.push(match m.state {
            MemberState::InSync | MemberState::Rebuilding => Some(m.dev.open_channel()?),
            MemberState::Failed => None,
        });
    }
    Ok((chans, members.iter().map(|m| device_id(&m.dev)).collect()))
}
