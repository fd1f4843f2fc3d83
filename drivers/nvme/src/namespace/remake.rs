//! A channel's queue made on a thread of its own, when the channel opens
//! and again after a reset (admin commands, and a reset more when one
//! times out, that the polling thread must not wait for), then what was
//! in flight sent again.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::IoError;
use smallvec::SmallVec;

use super::{Channel, CREATE_TRIES, MAX_OVERDUE_RESETS};
use crate::controller::Controller;
use crate::error::NvmeError;
use crate::queue::QueueShape;

/// A channel's queue being made: the outcome from the thread at it.
pub(super) struct Remake {
    rx: mpsc::Receiver<Result<u64, NvmeError>>,
    outcome: Option<Result<u64, NvmeError>>,
}

impl Remake {
    /// Start making `q` on `ctrl` in `generation` (`first`: the channel
    /// is opening; else it is made again after that generation's reset);
    /// `None` when no thread can be had (the caller makes it itself). The
    /// thread holds the controller only while it works (review), and a
    /// failure of a queue made again fails the controller there, not on
    /// the polling thread (`fail` waits for the device to stop: review).
    pub(super) fn start(
        ctrl: &Arc<Controller>,
        q: QueueShape,
        generation: u64,
        first: bool,
    ) -> Option<Remake> {
        let weak = Arc::downgrade(ctrl);
        let (tx, rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(format!("nvme-queue-{}", q.qid))
            .spawn(move || {
                let made = match weak.upgrade() {
                    Some(ctrl) => make(&ctrl, &q, generation, first),
                    None => Err(NvmeError::Failed(
                        format!("queue {}", q.qid),
                        "the controller is gone".into(),
                    )),
                };
                let _ = tx.send(made);
            })
            .ok()
            .map(|_| Remake { rx, outcome: None })
    }

    /// Wait up to `d` for the outcome; whether it is there ([`join`]
    /// waits no more then).
    ///
    /// [`join`]: Self::join
    pub(super) fn wait(&mut self, d: Duration) -> bool {
        if self.outcome.is_none() {
            self.outcome = match self.rx.recv_timeout(d) {
                Ok(made) => Some(made),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => Some(Err(panicked())),
            };
        }
        self.outcome.is_some()
    }

    /// Whether the outcome is there, without waiting.
    fn done(&mut self) -> bool {
        self.wait(Duration::ZERO)
    }

    /// The generation the queue was made in, or why it was not (then the
    /// device has no such queue; one made again failed the controller).
    pub(super) fn join(mut self) -> Result<u64, NvmeError> {
        match self.outcome.take() {
            Some(made) => made,
            None => self.rx.recv().unwrap_or_else(|_| Err(panicked())),
        }
    }
}

fn panicked() -> NvmeError {
    NvmeError::Failed("queue".into(), "the thread making it panicked".into())
}

/// Make queue `q` on `ctrl` in `generation`. A creation that timed out
/// resets the controller; when that reset worked, a queue made again
/// after a reset is made again on the controller it left, instead of
/// failing every namespace on it for one slow command. A few times: one
/// that never answers fails it (IO on other queues would keep the reset
/// counter down for ever), as does any other failure to make a queue
/// again. A new channel's queue is tried once (each time-out costs a
/// reset, and a few on an idle controller fail it: review); refused, it
/// fails only that channel (the controller may have no room for it), as
/// an open that fails did.
pub(super) fn make(
    ctrl: &Controller,
    q: &QueueShape,
    mut generation: u64,
    first: bool,
) -> Result<u64, NvmeError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match ctrl.create_io_queue(q) {
            Err(NvmeError::Timeout(_))
                if !first
                    && tries <= CREATE_TRIES
                    && !ctrl.is_failed()
                    && ctrl.generation.load(Ordering::Acquire) != generation =>
            {
                generation = ctrl.generation.load(Ordering::Acquire);
            }
            Err(e) => {
                if first {
                    tracing::warn!(controller = %ctrl.name(), qid = q.qid, error = %e, "a new channel's IO queue could not be made; the channel fails its requests");
                } else if !ctrl.is_failed() {
                    ctrl.fail(&format!("recreating IO queue {} after reset: {e}", q.qid));
                }
                return Err(e);
            }
            made => return made,
        }
    }
}

impl Channel {
    /// After a reset (ours or another channel's): make the queue again on
    /// the controller, then resubmit what was in flight; reads and writes
    /// are safe to repeat. A failed controller fails everything instead.
    /// The making is admin commands (seconds each at worst, and a reset
    /// when one times out, up to twice CAP.TO): on a thread of its own,
    /// while this channel takes nothing new. Made here, it held the reactor
    /// and every device and export on it for as long (audit).
    pub(super) fn recover(&mut self) {
        if self.remaking.is_some() {
            self.remade();
            return;
        }
        self.generation = self.ctrl.generation.load(Ordering::Acquire);
        if self.ctrl.is_failed() || self.unmade {
            self.fail_all(IoError::DeviceFailed);
            return;
        }
        // The reset that bumped the generation has finished (it bumps last,
        // under the admin lock): the controller no longer has this queue.
        // What waited to be sent again goes with the rest, in `remade`.
        self.q.reset();
        self.delayed.clear();
        match Remake::start(&self.ctrl, self.q.shape(), self.generation, false) {
            Some(r) => {
                self.remaking = Some(r);
                self.remade();
            }
            // No thread to spare: made here, as before.
            None => self.remade_with(make(&self.ctrl, &self.q.shape(), self.generation, false)),
        }
    }

    /// The rest of [`recover`](Self::recover), once the queue is made
    /// again (nothing while it is not).
    fn remade(&mut self) {
        if !self.remaking.as_mut().is_some_and(|r| r.done()) {
            return;
        }
        if let Some(r) = self.remaking.take() {
            self.remade_with(r.join());
        }
    }

    fn remade_with(&mut self, made: Result<u64, NvmeError>) {
        match made {
            Ok(g) if !self.ctrl.is_failed() => self.generation = g,
            // The controller is failed (by the remake, or since), or the
            // opening channel's queue was refused: the device has no
            // queue of this channel's, which fails what it is given.
            _ => {
                self.generation = self.ctrl.generation.load(Ordering::Acquire);
                self.unmade = true;
                self.fail_all(IoError::DeviceFailed);
                return;
            }
        }
        // Another reset since it was made: made again.
        if self.ctrl.generation.load(Ordering::Acquire) != self.generation {
            self.recover();
            return;
        }
        self.now = Instant::now();
        let limit = self.ctrl.opts.io_timeout;
        let mut any = false;
        let mut given_up: SmallVec<[usize; 4]> = SmallVec::new();
        for (cid, s) in self.slots.iter_mut().enumerate().filter(|(_, s)| s.busy) {
            // A command the device neither completes nor aborts would be
            // resubmitted at every reset for good (each good completion
            // meanwhile clears the fruitless-reset count), and its request
            // never answered: after a few, it fails, so RAID above can go
            // to another member.
            if self.now.saturating_duration_since(s.started) > limit {
                s.overdue = s.overdue.saturating_add(1);
                if s.overdue >= MAX_OVERDUE_RESETS {
                    given_up.push(cid);
                    continue;
                }
            }
            s.started = self.now;
            self.q.push(&s.sqe);
            any = true;
        }
        if any {
            self.q.ring();
        }
        for cid in given_up {
            tracing::error!(
                controller = %self.ctrl.name(),
                qid = self.q.qid,
                "a command outstanding through {MAX_OVERDUE_RESETS} resets is failed"
            );
            self.fail_slot(cid, IoError::TimedOut);
        }
    }
}
