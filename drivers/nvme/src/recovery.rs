//! Recovery from a command that timed out, off the IO path.
//!
//! Aborting a command and resetting a controller are admin work that waits
//! on the device: up to the admin time-out for the abort, and CAP.TO twice
//! for a reset. Done on the reactor that noticed the time-out, that wait
//! stopped every other device and export the reactor serves. So a channel
//! only reports the command to its controller's recovery thread and goes on
//! polling; the thread aborts it, resets the controller when the abort does
//! not bring it back, and the channel sees the outcome the usual way: the
//! aborted command's completion, or a new reset generation (queue recreated
//! and commands resubmitted, or every command failed with the controller).
//! Linux's nvme driver does the same from its timeout work item.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::controller::{lock, Controller};
use crate::error::NvmeError;
use crate::spec::{admin, Sqe};

/// One timed-out command, shared by its channel and the recovery thread.
#[derive(Debug)]
pub(crate) struct Recovery {
    qid: u16,
    cid: u16,
    /// The reset generation the channel's queue was in when it timed out:
    /// a reset since then has dealt with the command already.
    seen: u64,
    /// Set by the channel when the command came back (aborted or late).
    settled: AtomicBool,
    /// Set by the recovery thread when it is done with the command.
    finished: AtomicBool,
}

impl Recovery {
    /// Whether this is the command that timed out.
    pub(crate) fn is(&self, cid: u16) -> bool {
        self.cid == cid
    }

    /// The command is back from the controller, or its channel is gone
    /// (nothing to abort or reset for any more: its queue is deleted, and
    /// its queue ID and command IDs may name another channel's commands).
    pub(crate) fn settle(&self) {
        self.settled.store(true, Ordering::Release);
    }

    /// The recovery thread is done: a later time-out may be reported.
    pub(crate) fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }
}

/// The sending end kept by the controller; the thread ends when the
/// controller (and with it this sender) is dropped.
pub(crate) type RecoveryQueue = mpsc::Sender<Arc<Recovery>>;

/// Start the recovery thread of `ctrl`.
pub(crate) fn start(ctrl: &Arc<Controller>) -> Result<RecoveryQueue, NvmeError> {
    let (tx, rx) = mpsc::channel::<Arc<Recovery>>();
    let weak: Weak<Controller> = Arc::downgrade(ctrl);
    std::thread::Builder::new()
        .name(format!("nvme-recovery-{}", ctrl.name()))
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                match weak.upgrade() {
                    Some(ctrl) => ctrl.recover_command(&job),
                    None => return,
                }
                job.finished.store(true, Ordering::Release);
            }
        })
        .map_err(|e| {
            NvmeError::Failed(
                ctrl.name().into(),
                format!("starting its recovery thread: {e}"),
            )
        })?;
    Ok(tx)
}

impl Controller {
    /// Hand command `cid` on queue `qid`, which timed out in generation
    /// `seen`, to the recovery thread. The channel keeps the returned
    /// handle to say when the command comes back and to learn when the
    /// thread is done.
    pub(crate) fn report_timeout(&self, qid: u16, cid: u16, seen: u64) -> Arc<Recovery> {
        self.counts.timeouts.fetch_add(1, Ordering::Relaxed);
        let job = Arc::new(Recovery {
            qid,
            cid,
            seen,
            settled: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        });
        let sent = lock(&self.recovery)
            .as_ref()
            .is_some_and(|tx| tx.send(job.clone()).is_ok());
        if !sent {
            // No thread (it could not start, or the controller is going
            // away): fail the controller rather than leave the command
            // hanging.
            self.fail("no recovery thread to handle a timed-out command");
            job.finished.store(true, Ordering::Release);
        }
        job
    }

    /// Abort, wait for the command, reset if it does not come back. Runs
    /// on the recovery thread only.
    fn recover_command(&self, r: &Recovery) {
        let stale = || self.generation.load(Ordering::Acquire) != r.seen;
        // Jobs run one after another: this one may have waited behind
        // another's abort and reset while its command came back.
        if stale() || self.is_failed() || r.settled.load(Ordering::Acquire) {
            // A reset (another channel's, or for an earlier command of this
            // one) already took every command of that generation back.
            return;
        }
        if self.removed() {
            self.fail("registers read all ones: the device was removed");
            return;
        }
        if self.fatal() {
            let _ = self.reset("controller fatal status", r.seen);
            return;
        }
        tracing::warn!(
            controller = %self.name(),
            qid = r.qid,
            cid = r.cid,
            timeout_ms = self.opts.io_timeout.as_millis() as u64,
            "NVMe command timed out; aborting it"
        );
        // The check and the abort under the admin lock: a channel that is
        // dropped settles its job first and deletes its queue under this
        // lock, so the abort can never reach a queue ID (and command ID)
        // that a new channel was given since.
        let aborted = {
            let mut a = lock(&self.admin);
            if r.settled.load(Ordering::Acquire) || stale() {
                return;
            }
            let mut sqe = Sqe::new(admin::ABORT, 0);
            sqe.cdw[0] = (r.cid as u32) << 16 | r.qid as u32;
            let what = format!("Abort (queue {}, command {})", r.qid, r.cid);
            self.counts.aborts.fetch_add(1, Ordering::Relaxed);
            let aborted = self.run_admin(&mut a, sqe, &what, None);
            if let Err(NvmeError::Timeout(m)) = &aborted {
                // Left on the admin queue: only a reset takes it back,
                // before any other command runs there.
                let _ = self.reset_locked(a, &format!("admin command timed out ({m})"), r.seen);
                return;
            }
            aborted
        };
        if aborted.as_ref().is_ok_and(|dw0| dw0 & 1 != 0) {
            self.counts.aborts_not_found.fetch_add(1, Ordering::Relaxed);
        }
        if aborted.is_ok() {
            // Aborted (bit 0 of the answer clear): the command completes
            // with "abort requested" on its queue, which its channel
            // polls. Not aborted: most often it completed as the abort
            // came and its entry waits for its channel's next poll (or the
            // controller declined). It gets the same time before a reset,
            // which would take back every command of the controller, as
            // Linux re-arms the timer of a command its abort did not find.
            let deadline = Instant::now() + self.opts.admin_timeout;
            while !r.settled.load(Ordering::Acquire) && !stale() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if r.settled.load(Ordering::Acquire) || stale() {
            return;
        }
        let _ = self.reset(
            &format!("command {} on queue {} timed out", r.cid, r.qid),
            r.seen,
        );
    }
}
