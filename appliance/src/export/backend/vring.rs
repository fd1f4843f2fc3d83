//! A vring's life on its reactor: start, stop (drained, or let go while
//! its device holds requests, then started again once that runner has
//! stopped), a move to another reactor, and the end of a connection.

use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::Result as VuResult;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};

use super::super::queue::{self, Held, QueueSetup, QueueShared};

/// How long a ring's stop waits for its requests once another ring of the
/// export was left lingering by a device that held them.
const STUCK_WAIT: Duration = Duration::from_millis(500);
use super::super::ExportShared;
use super::{invalid, GuestMemory, Handler, MoveError, Running, MAX_QUEUE_SIZE, START_TIMEOUT};

/// Once `runner` (queue `index`, let go at a stop with its device
/// holding requests) has stopped, start the ring on the export's current
/// connection if the frontend left it enabled. A thread of its own: it
/// may wait as long as the device does.
fn restart_after(export: &Arc<ExportShared>, index: u32, runner: Arc<queue::QueueShared>) {
    let export = Arc::downgrade(export);
    let spawned = std::thread::Builder::new()
        .name("vring-linger".into())
        .spawn(move || {
            while runner.wait_stopped(Duration::from_secs(1)).is_none() {
                if export.strong_count() == 0 {
                    return;
                }
            }
            let Some(export) = export.upgrade() else {
                return;
            };
            let handler = export
                .handler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .and_then(std::sync::Weak::upgrade);
            if let Some(h) = handler {
                let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
                let _held = super::super::watchdog::held_elsewhere(&export);
                h.restart_lingered(index);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(vring = index, error = %e, "no thread to restart a vring after its last runner: it starts at the frontend's next enable");
    }
}

impl Handler {
    /// How long a stop waits for requests in flight.
    pub(super) fn drain_timeout(&self) -> Duration {
        self.export.options.drain()
    }

    /// Whether a runner of queue `index` that did not stop in time still
    /// runs (this connection's or an earlier one's); once this
    /// connection's has stopped, the ring goes on from where it stopped.
    pub(super) fn settle_lingering(&mut self, index: u32) -> VuResult<bool> {
        let v = self.vring(index)?;
        if let Some(s) = &v.lingering {
            let Some((next_avail, _)) = s.wait_stopped(Duration::ZERO) else {
                return Ok(true);
            };
            v.base = next_avail;
            v.lingering = None;
        }
        let mut l = self
            .export
            .lingering
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        l.retain(|(_, s)| s.wait_stopped(Duration::ZERO).is_none());
        Ok(l.iter().any(|(i, _)| *i == index))
    }

    /// A lingering runner of queue `index` has stopped: start the ring if
    /// the frontend left it enabled, with a kick fd, and is still here.
    fn restart_lingered(&mut self, index: u32) {
        if self.gone {
            return;
        }
        if let Err(e) = self.try_start(index) {
            tracing::warn!(vring = index, error = %e, "starting a vring after its last runner stopped");
        }
    }

    /// Start ring `index` if it is ready to; one whose device has no
    /// room for a channel yet starts taking nothing until there is.
    pub(super) fn try_start(&mut self, index: u32) -> VuResult<()> {
        self.start_ring(index, true)
    }

    /// [`try_start`](Self::try_start); `wait_for_room` false: a device
    /// with no room for a channel fails the start.
    fn start_ring(&mut self, index: u32, wait_for_room: bool) -> VuResult<()> {
        let _own = super::super::watchdog::own_work(&self.export);
        let event_idx = self.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let cores = self.set.len();
        let (_, mem) = self.export.memory.config();
        let export = self.export.clone();
        let size = self.vring(index)?.size;
        let inflight = self
            .inflight
            .as_ref()
            .and_then(|r| r.queue(index as u16, size));
        let v = self.vring(index)?;
        if v.running.is_some() || !v.enabled || v.kick.is_none() || v.addrs.is_none() {
            return Ok(());
        }
        if self.logging() && self.log.is_none() {
            // It would write guest memory unlogged: it starts with the
            // log (SET_LOG_BASE).
            tracing::info!(vring = index, "vring start waits for the dirty log");
            return Ok(());
        }
        if self.settle_lingering(index)? {
            // It starts once that runner has stopped (`restart_after`).
            tracing::info!(
                vring = index,
                "vring start waits for its last runner, whose device holds requests"
            );
            return Ok(());
        }
        let v = self.vring(index)?;
        let Some((desc, avail, used)) = v.addrs else {
            return Ok(());
        };
        let mut q = Queue::new(MAX_QUEUE_SIZE as u16).map_err(invalid)?;
        // A frontend that never sent SET_VRING_NUM (size 0) would get
        // virtio-queue's maximum silently.
        q.try_set_size(v.size)
            .map_err(|e| invalid(format!("vring {index} size {}: {e}", v.size)))?;
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_next_avail(v.base);
        let v_base = v.base;
        q.set_ready(true);
        if !q.is_valid(&**mem) {
            return Err(invalid(format!(
                "vring {index} does not fit in guest memory"
            )));
        }
        // The used index the guest last saw is in the ring itself.
        let next_used = q
            .used_idx(&**mem, std::sync::atomic::Ordering::Acquire)
            .map_err(invalid)?;
        q.set_next_used(next_used.0);
        let shared = Arc::new(QueueShared::default());
        shared.set_call(v.call.clone());
        let kick = v.kick.take().ok_or_else(|| invalid("no kick fd"))?;
        let kick_again = kick.try_clone().ok();
        let core = export.queue_core(index as usize) % cores;
        let setup = QueueSetup {
            index: index as u16,
            queue: q,
            kick,
            shared: shared.clone(),
            memory: export.memory.clone(),
            volume: export.volume.clone(),
            limits: export.limits.clone(),
            inflight,
            stats: export.stats[index as usize].clone(),
            fault: export.fault(),
            write_through: self.features & (1 << VIRTIO_BLK_F_FLUSH) == 0,
            wait_for_room,
        };
        let started = match self
            .set
            .call_unless_late(core, START_TIMEOUT, move |ctx| queue::start(ctx, setup))
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(invalid(format!("starting vring {index}: {e}"))),
            Err(e) => Err(invalid(e)),
        };
        if let Err(e) = started {
            // No runner took the kick fd: the ring keeps its second
            // handle, so a later start can serve it.
            let v = self.vring(index)?;
            if v.kick.is_none() {
                v.kick = kick_again;
            }
            return Err(e);
        }
        self.vring(index)?.running = Some(Running {
            core,
            shared,
            kick: kick_again,
        });
        if self.backend_req() {
            self.export.tell_if_behind();
        }
        tracing::debug!(
            vring = index,
            core,
            base = v_base,
            next_used = next_used.0,
            "vring started"
        );
        Ok(())
    }

    /// Writes the running queues hold for a suspended range.
    pub fn parked_writes(&self) -> u64 {
        self.vrings
            .iter()
            .filter_map(|v| v.running.as_ref())
            .map(|r| r.shared.parked())
            .sum()
    }

    /// Run queue `index` on reactor `core` from now on: stop it (its
    /// requests in flight drain), record the core, start it there again
    /// from where it stopped.
    pub fn move_queue(&mut self, index: u32, core: usize) -> Result<(), MoveError> {
        let running = self.vring(index)?.running.is_some();
        if !running {
            self.export.cores.lock().unwrap_or_else(|e| e.into_inner())[index as usize] = core;
            return Ok(());
        }
        if self
            .vring(index)?
            .running
            .as_ref()
            .is_some_and(|r| r.shared.parked() > 0)
        {
            return Err(MoveError::Parked);
        }
        let kick = self
            .vring(index)?
            .running
            .as_mut()
            .and_then(|r| r.kick.take());
        if let Err(e) = self.stop_with(index, Held::Keep) {
            // Still running where it was: it keeps its kick.
            let v = self.vring(index)?;
            if let Some(r) = v.running.as_mut() {
                r.kick = kick;
                return Err(MoveError::Parked);
            }
            // Let go with its device holding requests: it starts again,
            // where it was, once that runner has stopped.
            if v.kick.is_none() {
                v.kick = kick;
            }
            return Err(e.into());
        }
        let old = std::mem::replace(
            &mut self.export.cores.lock().unwrap_or_else(|e| e.into_inner())[index as usize],
            core,
        );
        let v = self.vring(index)?;
        if v.kick.is_none() {
            v.kick = kick;
        }
        if let Err(e) = self.start_ring(index, false) {
            // Not there (its device had no channel for that reactor, the
            // reactor was late): back where it ran (where it waits for
            // room, should its old channel's not be back yet: review). It stayed stopped, and
            // the guest's IO on it hung, for the frontend never starts a
            // ring it believes running.
            self.export.cores.lock().unwrap_or_else(|e| e.into_inner())[index as usize] = old;
            if let Err(again) = self.try_start(index) {
                tracing::error!(vring = index, error = %again, "a vring that could not move could not start where it was either; it starts at the frontend's next enable");
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// The frontend stops queue `index` (SET_VRING_ENABLE off,
    /// GET_VRING_BASE): writes held for a suspended range are answered
    /// first, once the range is let go, because the index handed back
    /// counts them as taken and a migration's destination will not see
    /// them again. If the range stays suspended past the time-out they are
    /// answered with an I/O error and the queue stops: left unanswered,
    /// the guest would wait for them for ever (virtio-blk has no time-out)
    /// or lose them without a word.
    pub(super) fn stop_for_frontend(&mut self, index: u32) -> VuResult<()> {
        let first = self.stop_with(index, Held::Keep);
        // Stopped, or let go with its device holding requests (lingering).
        if first.is_ok() || self.vring(index)?.running.is_none() {
            return first;
        }
        let parked = self
            .vring(index)?
            .running
            .as_ref()
            .map_or(0, |r| r.shared.parked());
        tracing::warn!(
            vring = index,
            parked,
            "stopping a vring whose writes waited for a suspended range past the time-out: they are answered with an I/O error"
        );
        self.stop_with(index, Held::Fail)
    }

    /// Stop queue `index`, doing `held` with the writes it holds for a
    /// suspended range; [`Held::Keep`]: the stop is taken back after the
    /// time-out if some are still held, and the queue goes on.
    pub(super) fn stop_with(&mut self, index: u32, held: Held) -> VuResult<()> {
        // Another queue of the export left lingering (its device held a
        // request past the whole time-out) says the device is stuck: this
        // stop gives up sooner. A frontend stops its rings one after the
        // other, waiting for each (QEMU, its main loop and the VM with
        // it): each waiting the whole time-out made 64 of them.
        let stuck = self
            .export
            .lingering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(i, s)| *i != index && s.wait_stopped(Duration::ZERO).is_none());
        // (Writes held for a suspended range wait for the range, not the
        // device: they get the whole time-out.)
        let parked = self
            .vring(index)?
            .running
            .as_ref()
            .is_some_and(|r| r.shared.parked() > 0);
        let wait = if stuck && !(held == Held::Keep && parked) {
            self.drain_timeout().min(STUCK_WAIT)
        } else {
            self.drain_timeout()
        };
        let deadline = std::time::Instant::now() + wait;
        self.stop_until(index, held, deadline)
    }

    /// [`stop_with`](Self::stop_with), waiting until `deadline`.
    fn stop_until(&mut self, index: u32, held: Held, deadline: std::time::Instant) -> VuResult<()> {
        let _own = super::super::watchdog::own_work(&self.export);
        let set = self.set.clone();
        let timeout = self.drain_timeout();
        let export = self.export.clone();
        let v = self.vring(index)?;
        let Some(r) = v.running.take() else {
            return Ok(());
        };
        r.shared.request_stop(held);
        // Wake the reactor if it sleeps; a full inbox means it is awake.
        let _ = set.send(r.core, Box::new(|_| {}));
        let mut stopped = None;
        while stopped.is_none() && std::time::Instant::now() < deadline && !set.is_stopped() {
            stopped = r.shared.wait_stopped(Duration::from_millis(50));
        }
        // Past a deadline another ring used up (`stop_all`), this one may
        // have stopped meanwhile all the same.
        if stopped.is_none() {
            stopped = r.shared.wait_stopped(Duration::ZERO);
        }
        let result = match stopped {
            Some((next_avail, _)) => {
                v.base = next_avail;
                Ok(())
            }
            None if set.is_stopped() => Ok(()),
            // Held up by writes to a suspended range (not by its device).
            None if held == Held::Keep && r.shared.parked() > 0 => {
                if r.shared.cancel_stop() {
                    // It holds writes for a suspended range: it stays.
                    v.running = Some(r);
                    return Err(invalid(format!(
                        "vring {index} holds writes to a suspended range; resume the range first"
                    )));
                }
                // It stopped just now after all.
                if let Some((next_avail, _)) = r.shared.wait_stopped(Duration::ZERO) {
                    v.base = next_avail;
                }
                Ok(())
            }
            None => {
                // Its device holds requests: the runner stops once they
                // end, answering them into the rings meanwhile. Plainly:
                // writes parked meanwhile must not hold it for good. The
                // ring starts again by itself once the runner has stopped
                // (a frontend told nothing, or not listening, would not
                // ask again).
                // A disconnect's stop leaves what it holds to the
                // inflight area, which a reconnecting frontend resubmits;
                // a frontend's stop, or a move to another reactor, answers
                // it (`Held::Linger`; review).
                r.shared.request_stop(if held == Held::Leave {
                    Held::Leave
                } else {
                    Held::Linger
                });
                export
                    .lingering
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((index, r.shared.clone()));
                v.lingering = Some(r.shared.clone());
                restart_after(&export, index, r.shared.clone());
                Err(invalid(format!(
                    "vring {index} did not drain within {timeout:?}; it stops once its device answers, and cannot start again before"
                )))
            }
        };
        // A ring disabled, not stopped, keeps its kick fd: the spec
        // restarts it on SET_VRING_ENABLE without a new one (GET_VRING_BASE
        // drops it: a stopped ring waits for one).
        if v.kick.is_none() {
            v.kick = r.kick;
        }
        result
    }

    /// Stop every vring (disconnect, reset, export deletion), all at once
    /// and within one drain time-out: one after the other, a device
    /// holding requests made a 64-queue export's deletion take 64 of them.
    pub fn stop_all(&mut self) {
        for v in &self.vrings {
            if let Some(r) = &v.running {
                r.shared.request_stop(Held::Leave);
                let _ = self.set.send(r.core, Box::new(|_| {}));
            }
            // One a frontend's stop left lingering leaves what it holds to
            // the inflight area too, from now on (review).
            if let Some(l) = &v.lingering {
                l.request_stop(Held::Leave);
            }
        }
        let deadline = std::time::Instant::now() + self.drain_timeout();
        for i in 0..self.vrings.len() as u32 {
            if let Err(e) = self.stop_until(i, Held::Leave, deadline) {
                tracing::error!(vring = i, error = %e, "stopping vring");
            }
        }
    }

    /// The frontend is gone: its queues stop and its guest memory is let
    /// go everywhere (each reactor's gate holds the last map until a new
    /// generation replaces it, and a frontend that never comes back must
    /// not keep a guest's memory mapped in this process).
    pub fn disconnect(&mut self) {
        self.gone = true;
        self.stop_all();
        // (Its share of the daemon's guest memory goes with it, at once,
        // not when the handler is dropped after the export says it is free
        // for the next frontend: review.)
        if let Err(e) = self.publish_memory(GuestMemory::default()) {
            tracing::warn!(error = %e, "releasing the guest memory of a disconnected frontend");
        }
    }
}
