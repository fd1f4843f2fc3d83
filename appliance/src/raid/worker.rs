//! Background work of a volume (rebuild, hot-replacement copy, scrub and
//! resync) as a user of the volume's quiesce gate, like guest IO.
//!
//! A worker runs on one reactor and takes the gate for each row: a
//! suspend waits for the row in flight and holds the next one back, so a
//! reconfiguration never races background IO. When a row starts under a
//! new generation the worker is retargeted at it: it reopens its channels
//! to the generation's members, goes on from its cursor if its job still
//! applies (a rebuild whose slot is still being rebuilt onto the same
//! device, a scrub of a volume that can still be scrubbed), and stops
//! otherwise. This is md's MD_RECOVERY_INTR: a sync is interrupted by a
//! change of the member set and continues against the new one.
//!
//! A worker is spawned by the transaction that starts it, while the volume
//! is suspended, and is armed only once that transaction has published
//! (or disarmed if it gave up): it never runs a row for a change that did
//! not happen.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use poller::{LocalGate, PollState, ReactorSet};

use super::bitmap::Bitmap;
use super::level::RaidDevice;
use super::members::{device_id, Event, MemberState};
use super::rebuild::{RebuildProgress, Rebuilder, Retarget, Scrubber};
use crate::volume::{Volume, VolumeConfig};

/// What a worker does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    /// Rebuild failed-then-replaced `slot` onto the device whose identity
    /// is `dev` (see `members::device_id`).
    Rebuild {
        /// The slot.
        slot: usize,
        /// The device in it.
        dev: usize,
    },
    /// Copy a hot replacement's slot to its new device `dev`.
    Replace {
        /// The new device.
        dev: usize,
    },
    /// Check (or with `repair`, rewrite) parity or mirrors.
    Scrub {
        /// Rewrite what differs.
        repair: bool,
        /// The first row (a resync a clean stop cut short goes on there).
        from: u64,
    },
}

const PENDING: u64 = 0;
const ABORTED: u64 = u64::MAX;

/// The switch a transaction flips once it knows whether its change
/// happened: the worker it spawned runs only after [`arm`](Self::arm);
/// dropped unarmed, it aborts the worker.
pub struct Arming(Arc<AtomicU64>);

impl Arming {
    fn new() -> Arming {
        Arming(Arc::new(AtomicU64::new(PENDING)))
    }

    /// The change was published: the worker may run.
    pub fn arm(&self) {
        self.0.store(1, Ordering::SeqCst);
    }

    /// The change was not made: the worker ends without a row.
    pub fn abort(&self) {
        self.0.store(ABORTED, Ordering::SeqCst);
    }
}

impl Drop for Arming {
    fn drop(&mut self) {
        let _ = self
            .0
            .compare_exchange(PENDING, ABORTED, Ordering::SeqCst, Ordering::SeqCst);
    }
}

enum Walker {
    Rebuild(Rebuilder),
    Scrub(Scrubber),
}

impl Walker {
    fn poll(&mut self) -> PollState {
        match self {
            Walker::Rebuild(r) => r.poll(),
            Walker::Scrub(s) => s.poll(),
        }
    }

    fn walk(&self) -> &super::rebuild::RowWalk {
        match self {
            Walker::Rebuild(r) => r.walk(),
            Walker::Scrub(s) => s.walk(),
        }
    }

    fn at_boundary(&self) -> bool {
        self.walk().at_boundary()
    }

    fn blocked(&self) -> bool {
        self.walk().waits_for_generation()
    }

    fn stop(&mut self, why: String) {
        match self {
            Walker::Rebuild(r) => r.stop(why),
            Walker::Scrub(s) => s.stop_now(why),
        }
    }

    fn cancelled(&self) -> bool {
        self.walk().cancelled()
    }
}

struct Worker {
    job: Job,
    walker: Walker,
    gate: LocalGate<VolumeConfig>,
    /// The generation the walker's channels are for (0: none yet).
    generation: u64,
    in_row: bool,
    armed: Arc<AtomicU64>,
    volume: String,
    /// Since when a move to a new generation waits for a channel.
    waiting_since: Option<std::time::Instant>,
}

/// How long background work waits for a channel to a device of a new
/// generation (one refused for lack of room) before it stops.
const CHANNEL_WAIT: Duration = Duration::from_secs(30);

impl Worker {
    fn poll(&mut self) -> PollState {
        if !self.in_row {
            match self.armed.load(Ordering::SeqCst) {
                // The transaction has not decided yet (it holds the volume
                // suspended, and its resume wakes this reactor).
                PENDING => return PollState::Idle,
                ABORTED => self
                    .walker
                    .stop("the change that started it was not made".into()),
                _ if self.gate.is_removed() => self.walker.stop("the volume was removed".into()),
                _ => {
                    if self.walker.blocked() && self.gate.generation() == self.generation {
                        // A member went away mid-row: wait for the
                        // generation without it (its publish wakes us).
                        return PollState::Idle;
                    }
                    if !self.gate.try_begin() {
                        // Suspended: the resume wakes this reactor.
                        return PollState::Idle;
                    }
                    self.in_row = true;
                    if self.gate.generation() != self.generation {
                        let (generation, config) = self.gate.config();
                        match self.retarget(&config) {
                            Ok(()) => {
                                self.generation = generation;
                                self.waiting_since = None;
                            }
                            Err(Retarget::Again(why))
                                if !self.walker.cancelled()
                                    && self
                                        .waiting_since
                                        .get_or_insert_with(std::time::Instant::now)
                                        .elapsed()
                                        < CHANNEL_WAIT =>
                            {
                                // Between rows, with no channel: tried
                                // again at the next poll (no row runs
                                // meanwhile, a suspend is acknowledged).
                                tracing::debug!(volume = %self.volume, job = ?self.job, reason = %why, "background work waits for a channel");
                                self.gate.end();
                                self.in_row = false;
                                return PollState::Busy;
                            }
                            Err(Retarget::Again(_)) if self.walker.cancelled() => {
                                self.generation = generation;
                                self.walker.stop("cancelled".into());
                            }
                            Err(Retarget::Again(why)) => {
                                self.generation = generation;
                                tracing::warn!(volume = %self.volume, job = ?self.job, reason = %why, "background work stopped: no channel within {CHANNEL_WAIT:?}");
                                self.report_abort(&config, &why);
                                self.walker.stop(why);
                            }
                            Err(Retarget::Stop(why)) => {
                                self.generation = generation;
                                tracing::info!(volume = %self.volume, job = ?self.job, reason = %why, "background work stopped");
                                self.walker.stop(why);
                            }
                        }
                    }
                }
            }
        }
        let state = self.walker.poll();
        if self.in_row && (state == PollState::Done || self.walker.at_boundary()) {
            self.gate.end();
            self.in_row = false;
        }
        state
    }

    /// Tell the monitor a rebuild or replacement (of the walker's run, on
    /// the generation `config`) stopped for `why`: its slot is not left
    /// rebuilding, nor the replacement running, with nothing behind them.
    fn report_abort(&self, config: &VolumeConfig, why: &str) {
        let (Some(raid), Walker::Rebuild(r)) = (config.raid.as_ref(), &self.walker) else {
            return;
        };
        let set = raid.member_set();
        let slot = match self.job {
            Job::Rebuild { slot, .. } => slot,
            Job::Replace { .. } => set.members.len(),
            Job::Scrub { .. } => return,
        };
        set.failures
            .event(Event::RebuildAborted(slot, r.run(), why.to_string()));
    }

    /// Point the walker at the generation `config`, or say why the job no
    /// longer applies to it.
    fn retarget(&mut self, config: &VolumeConfig) -> Result<(), Retarget> {
        let Some(raid) = config.raid.as_ref() else {
            return Err(Retarget::Stop(
                "the volume is no longer a RAID volume".into(),
            ));
        };
        let set = raid.member_set();
        let members = set.members.clone();
        let events = set.failures.clone();
        match (self.job, &mut self.walker) {
            (Job::Rebuild { slot, dev }, Walker::Rebuild(r)) => {
                // The same run: a new one of the slot (even onto the same
                // device, re-added) has a worker of its own.
                let run = r.run();
                let same = run.rebuilds(set, slot)
                    && members.get(slot).is_some_and(|m| device_id(&m.dev) == dev);
                if !same {
                    return Err(Retarget::Stop(format!(
                        "interrupted: slot {slot} is no longer rebuilt onto this device"
                    )));
                }
                let sources = raid.rebuild_sources(slot);
                let r = if sources.is_empty() {
                    Err(Retarget::Stop(
                        "no member left in sync to rebuild from".to_string(),
                    ))
                } else {
                    r.retarget(members, sources, None, events.clone())
                };
                // The slot is still this rebuild's: tell the monitor that
                // nothing rebuilds it (it is failed again), rather than
                // leave it "rebuilding" with nothing running.
                if let Err(Retarget::Stop(why)) = &r {
                    self.report_abort(config, why);
                }
                r
            }
            (Job::Replace { dev }, Walker::Rebuild(r)) => {
                let run = r.run();
                let Some(rep) = set
                    .replacing
                    .as_ref()
                    .filter(|rep| device_id(&rep.dev) == dev && run.is(&rep.cursor))
                else {
                    return Err(Retarget::Stop(
                        "interrupted: the replacement was given up".into(),
                    ));
                };
                if members.get(rep.slot).map(|m| m.recorded_state()) != Some(MemberState::InSync) {
                    return Err(Retarget::Stop(format!(
                        "interrupted: slot {} is not in sync",
                        rep.slot
                    )));
                }
                let target = rep.dev.clone();
                let r = r.retarget(members, vec![rep.slot], Some(&target), events.clone());
                if let Err(Retarget::Stop(why)) = &r {
                    self.report_abort(config, why);
                }
                r
            }
            (Job::Scrub { .. }, Walker::Scrub(s)) => {
                let read = raid
                    .scrub_members()
                    .map_err(|why| Retarget::Stop(format!("interrupted: {why}")))?;
                s.retarget(members, read, events)
            }
            _ => Err(Retarget::Stop("internal: job and walker disagree".into())),
        }
    }
}

/// Wake the reactor background work runs on (of `set`), so a worker that
/// waits there sees a cancel at once.
pub fn wake(set: &ReactorSet) {
    let _ = set.send(set.len() - 1, Box::new(|_| {}));
}

/// Spawn a worker for `job` of `volume`, whose next generation is
/// `device`, on reactor `core`: dormant until the returned [`Arming`] is
/// armed. Call with the volume suspended (so every write after it sees
/// what `device` says, e.g. a scrub's region locks). With `dirty`, a scrub
/// walks only the regions the bitmap marks (the resync after an unclean
/// shutdown) and clears them when done.
pub fn spawn(
    set: &ReactorSet,
    core: usize,
    volume: &Volume,
    job: Job,
    device: &Arc<dyn RaidDevice>,
    dirty: Option<Arc<Bitmap>>,
    timeout: Duration,
) -> Result<(Arc<RebuildProgress>, Arming), String> {
    let members = device.member_set();
    let rows = device.rows();
    let name = device.info().name.clone();
    // The walker is built on the reactor (its channels stay there).
    type Make = Box<dyn FnOnce() -> Walker + Send>;
    let activity = members.activity.clone();
    let locks = members.locks.clone();
    // Whether a repair cut short left reads pinned to the reference mirror.
    let scrub_owed = members.scrubbing.load(Ordering::SeqCst);
    let (progress, make): (Arc<RebuildProgress>, Make) = match job {
        Job::Rebuild { slot, .. } => {
            let Some((_, cursor)) = members.rebuilding.clone() else {
                return Err(format!("{name}: nothing to rebuild"));
            };
            let p = Arc::new(RebuildProgress::new(slot, rows.count, cursor));
            let q = p.clone();
            // With a bitmap handed over: a member's own device back
            // (md's re-add), resynchronised from the bits.
            let only = dirty.clone();
            (
                p,
                Box::new(move || {
                    let r = Rebuilder::new(rows, slot, locks, q).watching(activity);
                    Walker::Rebuild(match only {
                        Some(b) => r.only_dirty(b),
                        None => r,
                    })
                }),
            )
        }
        Job::Replace { .. } => {
            let Some(rep) = members.replacing.clone() else {
                return Err(format!("{name}: nothing to replace"));
            };
            // The new device is the target, after the members.
            let target = members.members.len();
            let p = Arc::new(RebuildProgress::new(target, rows.count, rep.cursor));
            let q = p.clone();
            (
                p,
                Box::new(move || {
                    Walker::Rebuild(Rebuilder::new(rows, target, locks, q).watching(activity))
                }),
            )
        }
        Job::Scrub { repair, from } => {
            device.scrub_members().map_err(|m| format!("{name}: {m}"))?;
            let p = Arc::new(RebuildProgress::new(
                usize::MAX,
                rows.count,
                Arc::new(AtomicU64::new(from.min(rows.count))),
            ));
            // Set already: a repair cut short left mirrors that may
            // differ, and only a repair that finishes clears it (a check
            // that cleared it sent reads to whichever mirror again). Its
            // reference stays then too.
            members.pin_reference(scrub_owed);
            members.scrubbing.store(true, Ordering::SeqCst);
            let q = p.clone();
            let parity = device.parity_geometry();
            let flag = members.scrubbing.clone();
            let thaw = members.bitmap.clone();
            (
                p,
                Box::new(move || {
                    let mut s = Scrubber::new(rows, parity, locks, q, repair);
                    if repair || !scrub_owed {
                        s = s.clearing_when_done(flag);
                    }
                    let mut s = s.watching(activity);
                    match (dirty, &thaw) {
                        (Some(b), _) => s = s.only_dirty(b),
                        (None, Some(b)) if repair => s = s.thawing_when_done(b.clone()),
                        _ => {}
                    }
                    Walker::Scrub(s)
                }),
            )
        }
    };
    let arming = Arming::new();
    let armed = arming.0.clone();
    let q = volume.quiesce().clone();
    let vname = volume.name().to_string();
    let started = set.call(core, timeout, move |ctx| -> Result<(), String> {
        let gate = q.local(ctx).map_err(|e| e.to_string())?;
        let mut w = Worker {
            job,
            walker: make(),
            gate,
            generation: 0,
            waiting_since: None,
            in_row: false,
            armed,
            volume: vname,
        };
        ctx.add_poller(move |_| w.poll());
        Ok(())
    });
    match started {
        Ok(Ok(())) => Ok((progress, arming)),
        Ok(Err(e)) | Err(e) => {
            if let Job::Scrub { .. } = job {
                // It never ran: as it was.
                members.scrubbing.store(scrub_owed, Ordering::SeqCst);
            }
            Err(format!("{name}: starting background work: {e}"))
        }
    }
}
