//! A dropped channel's queue deleted on a thread of its own: Delete I/O
//! Submission and Completion Queue are admin commands (and a reset when
//! one fails), which a slow or hostile controller makes its caller wait
//! for up to twice CAP.TO; dropped on a reactor, that held every device
//! and export the reactor serves (audit). The queue's rings, its PRP
//! lists and bounce pages are freed only once the device has no queue
//! pointing at them, and its queue ID is free again only then, so the
//! queue IDs bound how many retirements wait at once.

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use super::remake::Remake;
use crate::controller::{lock, Controller};
use crate::queue::QueuePair;
use crate::transport::DmaMem;

/// What a dropped channel leaves to delete and free.
pub(super) struct Retired {
    pub ctrl: Arc<Controller>,
    pub name: String,
    /// The generation the queue was made in.
    pub generation: u64,
    /// Its making, if it had not ended.
    pub remaking: Option<Remake>,
    /// Whether the device may have the queue (it was made).
    pub on_device: bool,
    pub q: QueuePair,
    pub prp: DmaMem,
    pub bounce: DmaMem,
}

impl Retired {
    /// Delete and free on a thread, waited for up to `wait`: a device
    /// that answers in time has its queue ID free again when this
    /// returns, as before; one that does not costs the caller no more.
    /// Nothing asked of the device (its queue never made, or the
    /// controller failed): done here.
    pub(super) fn retire(self, wait: Duration) {
        // Counted until its queue ID is back: an open finding none free
        // waits for it a little (`Controller::alloc_qid`).
        let here = self.remaking.is_none() && (!self.on_device || self.ctrl.is_failed());
        // (Done here at once: no open need wait for it.)
        self.ctrl.retire_began(!here);
        if here {
            self.run();
            return;
        }
        let qid = self.q.qid;
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        // Shared, so that a thread that cannot be had leaves it here.
        let job = Arc::new(Mutex::new(Some(self)));
        let theirs = job.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nvme-retire-{qid}"))
            .spawn(move || {
                let job = lock(&theirs).take();
                if let Some(job) = job {
                    job.run();
                }
                let _ = tx.send(());
            });
        match spawned {
            Ok(_) => {
                let _ = rx.recv_timeout(wait);
            }
            // No thread to spare: done here, as before.
            Err(_) => {
                let job = lock(&job).take();
                if let Some(job) = job {
                    job.run();
                }
            }
        }
    }

    fn run(mut self) {
        // A queue being made is waited for: made, the device would write
        // into its rings, freed next. Not made, the device has no such
        // queue: deleting it anyway could reset the controller under
        // every other channel (review).
        if let Some(r) = self.remaking.take() {
            match r.join() {
                Ok(g) => self.generation = g,
                Err(_) => self.on_device = false,
            }
        }
        if self.on_device && !self.ctrl.is_failed() {
            if let Err(e) = self.ctrl.delete_io_queue(self.q.qid, self.generation) {
                tracing::warn!(device = %self.name, qid = self.q.qid, error = %e, "deleting IO queue");
            }
        }
        self.ctrl.free_qid(self.q.qid);
        self.ctrl
            .retiring
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        // The device has no queue pointing at them now.
        let Retired { q, prp, bounce, .. } = self;
        drop((q, prp, bounce));
    }
}
