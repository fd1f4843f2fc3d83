//! A channel's queue made again after a reset, on a thread of its own:
//! admin commands (and a reset more when one times out) that the polling
//! thread must not wait for.

use std::sync::atomic::Ordering;

use super::CREATE_TRIES;
use crate::controller::Controller;
use crate::error::NvmeError;

/// The making of a channel's queue again after a reset: its outcome, the
/// generation the queue was made in, once there.
#[derive(Default)]
pub(super) struct Remake {
    pub(super) result: std::sync::Mutex<Option<Result<u64, NvmeError>>>,
}

impl Remake {
    pub(super) fn take(&self) -> Option<Result<u64, NvmeError>> {
        self.result.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Make queue `q` again on `ctrl` after the reset of `generation`. A
/// creation that timed out resets the controller; when that reset worked,
/// the queue is made again on the controller it left, instead of failing
/// every namespace on it for one slow command. A few times: one that
/// never answers fails it (IO on other queues would keep the reset
/// counter down for ever).
pub(super) fn remake(
    ctrl: &Controller,
    q: &crate::queue::QueueShape,
    mut generation: u64,
) -> Result<u64, NvmeError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match ctrl.create_io_queue(q) {
            Err(NvmeError::Timeout(_))
                if tries <= CREATE_TRIES
                    && !ctrl.is_failed()
                    && ctrl.generation.load(Ordering::Acquire) != generation =>
            {
                generation = ctrl.generation.load(Ordering::Acquire);
            }
            other => return other,
        }
    }
}
