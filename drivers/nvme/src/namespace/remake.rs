//! A channel's queue made again after a reset, on a thread of its own:
//! admin commands (and a reset more when one times out) that the polling
//! thread must not wait for.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::CREATE_TRIES;
use crate::controller::Controller;
use crate::error::NvmeError;
use crate::queue::QueueShape;

/// A channel's queue being made again: the thread at it.
pub(super) struct Remake {
    thread: JoinHandle<Result<u64, NvmeError>>,
}

impl Remake {
    /// Start making `q` again on `ctrl` after the reset of `generation`;
    /// `None` when no thread can be had (the caller makes it itself). The
    /// thread holds the controller only while it works (review), and a
    /// failure fails the controller there, not on the polling thread
    /// (`fail` waits for the device to stop: review).
    pub(super) fn start(ctrl: &Arc<Controller>, q: QueueShape, generation: u64) -> Option<Remake> {
        let weak = Arc::downgrade(ctrl);
        std::thread::Builder::new()
            .name(format!("nvme-remake-{}", q.qid))
            .spawn(move || {
                let Some(ctrl) = weak.upgrade() else {
                    return Err(NvmeError::Failed(
                        format!("queue {}", q.qid),
                        "the controller is gone".into(),
                    ));
                };
                let made = remake(&ctrl, &q, generation);
                if let Err(e) = &made {
                    fail_after(&ctrl, q.qid, e);
                }
                made
            })
            .ok()
            .map(|thread| Remake { thread })
    }

    /// Whether the outcome is there ([`join`](Self::join) waits no more).
    pub(super) fn done(&self) -> bool {
        self.thread.is_finished()
    }

    /// The generation the queue was made in, or why it was not (then the
    /// device has no such queue, and the controller is failed).
    pub(super) fn join(self) -> Result<u64, NvmeError> {
        self.thread.join().unwrap_or_else(|_| {
            Err(NvmeError::Failed(
                "queue".into(),
                "the thread making it again panicked".into(),
            ))
        })
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
    q: &QueueShape,
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

/// A queue that could not be made again fails its controller.
pub(super) fn fail_after(ctrl: &Controller, qid: u16, e: &NvmeError) {
    if !ctrl.is_failed() {
        ctrl.fail(&format!("recreating IO queue {qid} after reset: {e}"));
    }
}
