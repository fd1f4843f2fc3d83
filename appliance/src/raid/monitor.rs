//! A RAID volume's monitor: the one place its configuration changes.
//!
//! Operator calls and the events the IO path and background work report
//! (a member failed, a rebuild finished) become [`Change`] values, and
//! every change goes through one transaction (`transaction`): validate,
//! suspend the volume (guest IO and background work alike), persist,
//! publish the next generation, resume, then restart or retarget background
//! work. Changes of one volume serialize on its state lock; reads of its
//! state never take that lock (they read the last published view).
//!
//! Events that decide data safety are kept until applied: one that hits
//! the quiesce deadline is tried again. A member failure is recorded in
//! the superblocks by the recorder thread as soon as it is reported, before
//! any write that skipped the member is acknowledged (see
//! `members::FailureLedger`); the new generation follows.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bdev::BlockDevice;
use poller::ReactorSet;

use super::assembly::VolumeMeta;
use super::bitmap::{Bitmap, BitmapDaemon};
use super::change::Change;
pub use super::change::Role;
use super::journal::{Checkpointer, Journal, JournalMode};
pub use super::level::RaidDevice;
use super::members::{device_id, Event, FailureSink, MemberState};
use super::rebuild::RebuildProgress;
use super::superblock::Level;
use crate::volume::{Volume, VolumeConfig};

mod recorder;
mod service;
mod view;
pub(crate) use view::Published;
pub use view::{MonitorState, Snapshot};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why an operator's change was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// The device is not bound to this volume (as a member or spare).
    #[error("{0}: not a member or spare of this volume")]
    NotFound(String),
    /// The device is already part of this volume.
    #[error("{0}: already a member or spare of this volume")]
    AlreadyExists(String),
    /// The change is not possible in the volume's state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The volume did not quiesce in time (IO in flight did not drain).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The reconfiguration itself failed.
    #[error("{0}")]
    Internal(String),
    /// The volume was deleted meanwhile: a call racing `volume delete` is
    /// told so, not of an internal error.
    #[error("{0}")]
    Gone(String),
    /// The volume is closed (the daemon's stop): the call may be made
    /// again once the daemon serves, not refused for what it asked.
    #[error("{0}")]
    Stopped(String),
}

/// What the volume's owner (the daemon's inventory) is told inside a
/// transaction. The defaults serve a volume used on its own (tests, the
/// benchmarks): no other owner of devices, no state file.
pub trait VolumeHooks: Send + Sync {
    /// Give `device` `role` in this volume: refused unless it is free, or
    /// already this volume's in role `from`. Called with the volume
    /// suspended, so the role and the change that needs it are one step.
    fn claim(
        &self,
        _device: &Arc<dyn BlockDevice>,
        _role: Role,
        _from: Option<Role>,
    ) -> Result<(), OpError> {
        Ok(())
    }
    /// `device` now has `role` in this volume, or (`None`) no role.
    fn set_role(&self, _device: &str, _role: Option<Role>) {}
    /// Record the volume as `view` describes it (the state file), before
    /// the change is published.
    fn persist(&self, _view: &Snapshot) -> Result<(), String> {
        Ok(())
    }
    /// As [`persist`](Self::persist), but an error unless the state is on
    /// disk when it returns. An owner whose saves can be put off (the
    /// manager's, while the daemon starts or stops) says so here; by
    /// default it is `persist`.
    fn persist_now(&self, view: &Snapshot) -> Result<(), String> {
        self.persist(view)
    }
}

struct NoHooks;
impl VolumeHooks for NoHooks {}

/// The superblock record of a volume and the generation it last recorded.
pub(crate) struct Recorded {
    pub(crate) meta: VolumeMeta,
    pub(crate) device: Arc<dyn RaidDevice>,
    pub(crate) clean: bool,
}

/// What the monitor's threads and its callers share.
pub(crate) struct Inner {
    pub(crate) set: ReactorSet,
    pub(crate) volume: Volume,
    pub(crate) state: Mutex<MonitorState>,
    published: Mutex<Published>,
    pub(crate) meta: Mutex<Option<Recorded>>,
    hooks: Mutex<Arc<dyn VolumeHooks>>,
    timeout: Mutex<Duration>,
    /// Changes from events not applied yet, in order.
    pending: Mutex<VecDeque<Change>>,
    quit: AtomicBool,
    sink: FailureSink,
    /// Changes put off by a deadline so far.
    deferred: std::sync::atomic::AtomicU64,
    /// Events taken from the channel into `pending` so far.
    received: std::sync::atomic::AtomicU64,
    /// An owner's hooks are on their way (`Monitor::start_awaiting_hooks`):
    /// until they come, nothing can be recorded for good.
    hooks_awaited: AtomicBool,
    /// The volume is being deleted: a change is told it is gone (at once:
    /// the delete's clean stop holds the change lock while it flushes).
    pub(crate) deleted: AtomicBool,
}

/// The default wait for a volume's IO to drain.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a running rebuild's cursor is written to the superblocks.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How soon the threads notice they should end.
const QUIT_POLL: Duration = Duration::from_millis(100);

impl Inner {
    pub(crate) fn hooks(&self) -> Arc<dyn VolumeHooks> {
        lock(&self.hooks).clone()
    }

    pub(crate) fn timeout(&self) -> Duration {
        *lock(&self.timeout)
    }

    /// Publish `s` for readers.
    pub(crate) fn publish_view(&self, s: &MonitorState) {
        *lock(&self.published) = s.published();
    }

    fn pending_count(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Leave `change` to the monitor thread, which tries it again.
    pub(crate) fn defer(&self, change: Change) {
        self.deferred.fetch_add(1, Ordering::SeqCst);
        lock(&self.pending).push_back(change);
    }

    fn deferred(&self) -> u64 {
        self.deferred.load(Ordering::SeqCst)
    }

    /// The change lock, for a change: refused once the volume is closed.
    fn change_lock(&self) -> Result<MutexGuard<'_, MonitorState>, OpError> {
        if self.deleted.load(Ordering::SeqCst) {
            // NotFound to the caller, as for a change racing the delete a
            // moment later (audit: "stopped", after waiting for the
            // delete's flushes).
            return Err(OpError::Gone("the volume is being deleted".into()));
        }
        let s = lock(&self.state);
        if s.closed {
            // (A change that waited for the lock while the delete flushed.)
            if self.deleted.load(Ordering::SeqCst) {
                return Err(OpError::Gone("the volume is being deleted".into()));
            }
            return Err(OpError::Stopped("the volume is stopped".into()));
        }
        Ok(s)
    }

    /// Apply the first pending change; true if one is left to retry.
    fn apply_pending(&self) -> bool {
        let Some(change) = lock(&self.pending).front().cloned() else {
            return false;
        };
        let mut s = lock(&self.state);
        if s.closed {
            lock(&self.pending).clear();
            return false;
        }
        // Queued here only by `detach_failed_journal`: the journal it was
        // for may have been removed since, and a healthy one added.
        let stale = matches!(change, Change::SetJournal(None))
            && !s.current.journal().is_some_and(|j| j.has_failed());
        let res = if stale {
            Ok(())
        } else {
            self.apply(&mut s, change)
        };
        drop(s);
        let mut pending = lock(&self.pending);
        match res {
            Err(OpError::DeadlineExceeded(e)) => {
                self.deferred.fetch_add(1, Ordering::SeqCst);
                tracing::warn!(volume = self.volume.name(), error = %e, "volume change deferred: it is tried again");
                true
            }
            other => {
                match other {
                    // Deleted meanwhile: nothing left to change.
                    Err(OpError::Gone(e)) => {
                        tracing::info!(volume = self.volume.name(), error = %e, "volume change dropped: the volume is gone")
                    }
                    Err(e) => {
                        tracing::error!(volume = self.volume.name(), error = %e, "volume change")
                    }
                    Ok(()) => {}
                }
                pending.pop_front();
                !pending.is_empty()
            }
        }
    }

    /// The change an event asks for.
    fn change_of(&self, ev: Event) -> Change {
        let members = lock(&self.published).device.member_set().members.len();
        match ev {
            Event::Failed(f) => Change::Fail {
                slot: f.member,
                device: f.device,
                by_operator: false,
            },
            Event::Rebuilt(slot, run) if slot == members => Change::ReplaceDone(run),
            Event::Rebuilt(slot, run) => Change::Rebuilt(slot, run),
            Event::RebuildAborted(slot, run, why) if slot == members => {
                Change::ReplaceAborted(run, why)
            }
            Event::RebuildAborted(slot, run, why) => Change::RebuildFailed(slot, run, why),
        }
    }

    /// Record how far a running rebuild got, so a restart resumes there.
    /// The rows below the cursor must be durable on the target before a
    /// superblock says so: a drive may write the superblock before data
    /// still in its cache, and a power cut in between left rows trusted
    /// that it never got (md writes superblocks with a preflush for this).
    /// The flush runs holding no lock: the recorder (member failures, which
    /// guest writes wait for) and every change would wait for it.
    fn checkpoint(&self) -> Result<(), String> {
        let (progress, cursor, target) = {
            let s = lock(&self.state);
            let Some(p) = s
                .rebuild
                .as_ref()
                .filter(|p| p.slot < s.current.member_set().members.len() && !p.is_finished())
            else {
                return Ok(());
            };
            let cursor = p.cursor.load(Ordering::SeqCst);
            let recorded = lock(&self.meta)
                .as_ref()
                .is_none_or(|r| r.meta.template.rebuild_checkpoint == cursor);
            if recorded {
                return Ok(());
            }
            let target = s.current.member_set().members[p.slot].dev.clone();
            (p.clone(), cursor, target)
        };
        let flushed = crate::raid::metaio::sync(target.as_ref(), bdev::IoOp::Flush, 0, &mut []);
        let s = lock(&self.state);
        // Still that rebuild, on that target (a change may have come).
        let same = s
            .rebuild
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, &progress))
            && !progress.is_finished()
            && s.current
                .member_set()
                .members
                .get(progress.slot)
                .is_some_and(|m| Arc::ptr_eq(&m.dev, &target));
        if !same {
            return Ok(());
        }
        if let Err(e) = flushed {
            // Rows it took into its cache may be lost, and a later flush
            // need not say so again (a file's writeback error is told
            // once): the target fails, as every other flush's caller
            // fails its device, instead of being trusted in sync (audit).
            let set = s.current.member_set();
            set.failures.report(
                progress.slot,
                &set.members[progress.slot],
                bdev::IoError::DeviceFailed,
            );
            return Err(format!(
                "flushing the rebuild's target before its checkpoint: {e}"
            ));
        }
        let mut rec = lock(&self.meta);
        let Some(r) = rec.as_mut() else {
            return Ok(());
        };
        let mut meta = r.meta.clone();
        meta.template.rebuild_checkpoint = cursor;
        meta.record(s.current.as_ref(), false)
            .map_err(|e| e.to_string())?;
        r.meta = meta;
        r.device = s.current.clone();
        r.clean = false;
        Ok(())
    }
}

/// The monitor thread: turn events into pending changes and apply them,
/// checkpoint a running rebuild once a second, end when told.
fn watch(rx: Receiver<Event>, inner: &Inner) {
    let mut last_checkpoint = Instant::now();
    let mut backoff = Duration::from_millis(10);
    let mut retry_at: Option<Instant> = None;
    while !inner.quit.load(Ordering::SeqCst) {
        let wait = retry_at.map_or(QUIT_POLL, |t| t.saturating_duration_since(Instant::now()));
        match rx.recv_timeout(wait.min(QUIT_POLL)) {
            Ok(ev) => {
                let mut ev = Some(ev);
                while let Some(e) = ev.take().or_else(|| rx.try_recv().ok()) {
                    let c = inner.change_of(e);
                    lock(&inner.pending).push_back(c);
                    // (After the push: `idle` reads this first.)
                    inner.received.fetch_add(1, Ordering::SeqCst);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if inner.pending_count() == 0 {
                    break;
                }
                std::thread::sleep(QUIT_POLL);
            }
        }
        if retry_at.is_none_or(|t| Instant::now() >= t) {
            let before = inner.pending_count();
            if before > 0 {
                if inner.apply_pending() && inner.pending_count() >= before {
                    // A deadline: try again later, less often each time.
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                } else {
                    retry_at = None;
                    backoff = Duration::from_millis(10);
                }
            }
        }
        if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            last_checkpoint = Instant::now();
            if let Err(e) = inner.checkpoint() {
                tracing::error!(volume = inner.volume.name(), error = %e, "rebuild checkpoint");
            }
            inner.detach_failed_journal();
        }
    }
}

/// Applies member failures to a volume, replaces failed members with
/// spares, runs their rebuild, and carries out every operator change.
pub struct Monitor {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl Monitor {
    /// Watch `rx` for events of `volume`, whose device is `device`;
    /// background work runs on the last reactor of `set`.
    pub fn start(
        set: &ReactorSet,
        volume: Volume,
        device: Arc<dyn RaidDevice>,
        rx: Receiver<Event>,
        spares: Vec<Arc<dyn BlockDevice>>,
    ) -> Monitor {
        Self::start_with(set, volume, device, rx, spares, false)
    }

    /// [`start`](Self::start) for an owner that sets hooks once the volume
    /// is set up: until then nothing is recorded that only they can record
    /// (a failed journal is not given up).
    pub fn start_awaiting_hooks(
        set: &ReactorSet,
        volume: Volume,
        device: Arc<dyn RaidDevice>,
        rx: Receiver<Event>,
        spares: Vec<Arc<dyn BlockDevice>>,
    ) -> Monitor {
        Self::start_with(set, volume, device, rx, spares, true)
    }

    fn start_with(
        set: &ReactorSet,
        volume: Volume,
        device: Arc<dyn RaidDevice>,
        rx: Receiver<Event>,
        spares: Vec<Arc<dyn BlockDevice>>,
        awaiting_hooks: bool,
    ) -> Monitor {
        // Background work finds the level in the volume's generation.
        if volume.quiesce().config().1.raid.is_none() {
            let d = device.clone();
            if let Err(e) = volume.quiesce().reconfigure(CHANGE_TIMEOUT, move |_| {
                Ok::<_, ()>((VolumeConfig::raid(d), ()))
            }) {
                tracing::error!(volume = volume.name(), error = ?e, "publishing the RAID generation");
            }
        }
        let bitmap = device
            .member_set()
            .bitmap
            .clone()
            .map(|b| start_bitmap(volume.name(), b));
        let checkpointer = device
            .journal()
            .map(|j| Checkpointer::start(j, volume.clone()));
        let state = MonitorState {
            current: device.clone(),
            spares,
            rebuild: None,
            max_rate: 0,
            min_rate: 0,
            bitmap,
            checkpointer,
            closed: false,
            resync: None,
            resync_owed: false,
        };
        let published = state.published();
        let inner = Arc::new(Inner {
            set: set.clone(),
            sink: device.member_set().failures.clone(),
            volume,
            state: Mutex::new(state),
            published: Mutex::new(published),
            meta: Mutex::new(None),
            hooks: Mutex::new(Arc::new(NoHooks)),
            timeout: Mutex::new(CHANGE_TIMEOUT),
            pending: Mutex::new(VecDeque::new()),
            quit: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
            deferred: Default::default(),
            received: Default::default(),
            hooks_awaited: AtomicBool::new(awaiting_hooks),
        });
        let name = inner.volume.name().to_string();
        let mut threads = Vec::new();
        let i = inner.clone();
        match std::thread::Builder::new()
            .name(format!("monitor-{name}"))
            .spawn(move || watch(rx, &i))
        {
            Ok(t) => threads.push(t),
            Err(e) => tracing::error!(volume = %name, error = %e, "monitor thread not started"),
        }
        let i = inner.clone();
        match std::thread::Builder::new()
            .name(format!("recorder-{name}"))
            .spawn(move || recorder::record_failures(&i))
        {
            Ok(t) => threads.push(t),
            Err(e) => {
                // Nothing would record failures: writes must not wait.
                tracing::error!(volume = %name, error = %e, "recorder thread not started");
                inner.sink.close();
            }
        }
        Monitor { inner, threads }
    }

    /// Tell `hooks` about role changes and state to persist from now on.
    pub fn set_hooks(&self, hooks: Arc<dyn VolumeHooks>) {
        self.attach_hooks(hooks, |_| {});
    }

    /// [`set_hooks`](Self::set_hooks), and hand `now` the state as it is
    /// then, with no change in between (so an owner can take over what
    /// changes made before the hooks did).
    pub fn attach_hooks(&self, hooks: Arc<dyn VolumeHooks>, now: impl FnOnce(&Snapshot)) {
        let s = lock(&self.inner.state);
        *lock(&self.inner.hooks) = hooks;
        self.inner.hooks_awaited.store(false, Ordering::SeqCst);
        now(&s
            .published()
            .snapshot(self.inner.pending_count(), self.inner.deferred()));
    }

    /// How long a change waits for the volume's IO to drain.
    pub fn set_timeout(&self, timeout: Duration) {
        *lock(&self.inner.timeout) = timeout;
    }

    /// Record every change in the members' superblocks from now on.
    pub fn set_meta(&self, meta: VolumeMeta) {
        let s = lock(&self.inner.state);
        *lock(&self.inner.meta) = Some(Recorded {
            meta,
            device: s.current.clone(),
            clean: true,
        });
    }

    /// The volume's UUID, once its superblocks are recorded.
    pub fn volume_uuid(&self) -> Option<[u8; 16]> {
        lock(&self.inner.meta)
            .as_ref()
            .map(|r| r.meta.template.volume_uuid)
    }

    fn change(&self, change: Change) -> Result<(), OpError> {
        let mut s = self.inner.change_lock()?;
        self.inner.apply(&mut s, change)
    }

    fn change_started(&self, change: Change) -> Result<Arc<RebuildProgress>, OpError> {
        let mut s = self.inner.change_lock()?;
        self.start_job(&mut s, change)?
            .ok_or_else(|| OpError::Internal("the background work did not start".into()))
    }

    /// Applies a change that may start background work; the run it
    /// started, if it started one.
    fn start_job(
        &self,
        s: &mut MonitorState,
        change: Change,
    ) -> Result<Option<Arc<RebuildProgress>>, OpError> {
        let before = s.rebuild.clone();
        self.inner.apply(s, change)?;
        Ok(s.rebuild
            .clone()
            .filter(|p| before.as_ref().is_none_or(|b| !Arc::ptr_eq(b, p))))
    }

    /// An operator fails the member on device `name` (md's `--fail`).
    /// Refused if it is not bound to this volume, already failed, or if
    /// losing it would lose data.
    pub fn fail_member(&self, name: &str) -> Result<(), OpError> {
        let mut s = self.inner.change_lock()?;
        // The device a replacement copies to (md's --fail of it): the copy
        // stops and the device goes free; the slot keeps its member. Before,
        // nothing but failing that member (the volume degraded) or deleting
        // the volume stopped a replacement (audit).
        let replacing = s.current.member_set().replacing.clone();
        if let Some(r) = replacing.filter(|r| r.dev.info().name == name) {
            // Taken before the change: a spare it puts to work replaces
            // `s.rebuild` (review).
            let copy = s
                .rebuild
                .clone()
                .filter(|p| Arc::ptr_eq(&p.cursor, &r.cursor));
            let run = super::members::Run::of(&r.cursor);
            self.inner.apply(
                &mut s,
                Change::ReplaceAborted(run, "failed by the operator".into()),
            )?;
            // Only once the change is made (one that ran out of time leaves
            // the copy going: audit): the copy would stop at its next row
            // anyway, finding the replacement gone; cancelled, it reports
            // nothing, and the change above says it.
            if let Some(p) = copy {
                p.cancel.store(true, Ordering::SeqCst);
                super::worker::wake(&self.inner.set);
            }
            return Ok(());
        }
        let members = s.current.member_set().members.clone();
        let Some(slot) = members
            .iter()
            .position(|m| m.dev.info().name == name && m.state != MemberState::Failed)
        else {
            return Err(if members.iter().any(|m| m.dev.info().name == name) {
                OpError::FailedPrecondition(format!("{name} has already failed"))
            } else {
                OpError::NotFound(name.to_string())
            });
        };
        if let Some(why) = super::change::fail_would_lose_data(
            s.current.member_set(),
            slot,
            s.current.max_failures(),
        ) {
            return Err(OpError::FailedPrecondition(why));
        }
        let device = device_id(&members[slot].dev);
        self.inner.apply(
            &mut s,
            Change::Fail {
                slot,
                device,
                by_operator: true,
            },
        )
    }

    /// Give the volume a journal, or take it away. Once this returns,
    /// every write goes through the new one (or straight to the members),
    /// and nothing is in flight through the old. Taking a write-back
    /// journal away switches it to write-through and drains it first.
    pub fn set_journal(&self, journal: Option<Arc<Journal>>) -> Result<(), OpError> {
        let mut switched = false;
        if journal.is_none() {
            let j = lock(&self.inner.published).device.journal();
            match j {
                Some(j) if j.mode() == JournalMode::WriteBack && !j.has_failed() => {
                    self.set_journal_mode(JournalMode::WriteThrough)?;
                    switched = true;
                }
                // A switch to write-through whose drain its call left
                // unfinished: the removal is refused while the cache holds
                // blocks, so it drains them first (its own error is the
                // refusal's to say).
                Some(j)
                    if !j.has_failed() && (!j.cache().is_empty() || j.cache().pending() > 0) =>
                {
                    let _ = j.drain(&self.inner.volume, self.inner.timeout());
                }
                _ => {}
            }
        }
        let r = self.change(Change::SetJournal(journal));
        match r {
            Err(e) if switched => {
                // The removal failed after its first step: the journal goes
                // back to write-back (a failed call leaves the volume as it
                // was, but for what drained), or the error says it did not.
                let back = self.set_journal_mode(JournalMode::WriteBack);
                let said = match &back {
                    Ok(()) => "the journal is write-back again",
                    Err(_) => "the journal stays write-through (switching it back failed too)",
                };
                let with = |m: String| format!("{m}; {said}");
                Err(match e {
                    OpError::FailedPrecondition(m) => OpError::FailedPrecondition(with(m)),
                    OpError::DeadlineExceeded(m) => OpError::DeadlineExceeded(with(m)),
                    OpError::Internal(m) => OpError::Internal(with(m)),
                    OpError::Stopped(m) => OpError::Stopped(with(m)),
                    e => e,
                })
            }
            r => r,
        }
    }

    /// Switch the journal's mode. To write-through, the cache drains to
    /// the members afterwards (within the change timeout; a drain left
    /// unfinished goes on as the volume writes, and the journal stays
    /// write-back on disk until it is done).
    pub fn set_journal_mode(&self, mode: JournalMode) -> Result<(), OpError> {
        self.change(Change::JournalMode(mode))?;
        if mode == JournalMode::WriteBack {
            return Ok(());
        }
        let Some(j) = lock(&self.inner.published).device.journal() else {
            return Ok(());
        };
        // Not under the state lock: the drain is IO through the gate, and
        // a member failing meanwhile must be able to change the volume.
        // The switch is made: a drain left unfinished goes on as the
        // volume writes (and the view counts what is still cached), so it
        // is no failure of the call.
        if let Err(e) = j.drain(&self.inner.volume, self.inner.timeout()) {
            tracing::warn!(volume = self.inner.volume.name(), error = %e, "journal switched to write-through; its cache is still draining");
        }
        Ok(())
    }

    /// Its journal, if it has one.
    pub fn journal(&self) -> Option<Arc<Journal>> {
        lock(&self.inner.published).device.journal()
    }

    /// Replace in-sync member `name` by `dev` without ever being degraded
    /// (md's --replace): `dev` gets every write to the slot while the slot
    /// is copied to it in the background; then it takes the slot, in sync,
    /// and the old device is free. A member failing meanwhile ends it.
    pub fn replace_member(
        &self,
        name: &str,
        dev: Arc<dyn BlockDevice>,
    ) -> Result<Arc<RebuildProgress>, OpError> {
        let p = self.change_started(Change::ReplaceStart(name.to_string(), dev.clone()))?;
        tracing::info!(
            volume = self.inner.volume.name(),
            member = name,
            with = %dev.info().name,
            "replacement started"
        );
        Ok(p)
    }

    /// Give the volume a write-intent bitmap of `chunk_bytes` regions, or
    /// (with `None`) take it away; recorded in the superblocks.
    pub fn set_bitmap(&self, chunk_bytes: Option<u64>) -> Result<(), OpError> {
        self.change(Change::SetBitmap(chunk_bytes))
    }

    /// Change the level of a two-member volume online (md's takeover):
    /// a RAID1 of two becomes a RAID5 of two with `chunk_bytes` chunks, or
    /// back. The members stay as they are, since a two-member RAID5's
    /// parity is a copy of its one data chunk: the same bytes at the same
    /// places as a mirror. Recorded in the superblocks.
    pub fn takeover(&self, to: Level, chunk_bytes: u32) -> Result<(), OpError> {
        self.change(Change::Takeover(to, chunk_bytes))?;
        tracing::info!(volume = self.inner.volume.name(), level = ?to, "takeover done");
        Ok(())
    }

    /// md's write-behind on a mirror: writes are acknowledged once the
    /// members that are not write-mostly have them, and go on to the
    /// write-mostly ones in the background, at most `limit` at once (0
    /// turns it off; once this returns no write is in the background).
    /// Needs the write-intent bitmap, as md does.
    pub fn set_write_behind(&self, limit: u64) -> Result<(), OpError> {
        self.change(Change::WriteBehind(limit))
    }

    /// md's serialize_policy on a mirror: with it on, overlapping writes
    /// reach the members one after the other (each locks its regions), so
    /// concurrent writes from several cores never leave the mirrors
    /// different. Once this returns, no write in flight predates it.
    pub fn set_serialize(&self, on: bool) -> Result<(), OpError> {
        self.change(Change::Serialize(on))
    }

    /// Mark a mirror member write-mostly (read only when no other in-sync
    /// member can serve), or clear it; recorded in the superblocks.
    pub fn set_write_mostly(&self, name: &str, on: bool) -> Result<(), OpError> {
        self.change(Change::WriteMostly(name.to_string(), on))
    }

    /// Start a scrub: count parity mismatches (md's `check`), and with
    /// `repair` rewrite them from the data.
    pub fn scrub(&self, repair: bool) -> Result<Arc<RebuildProgress>, OpError> {
        self.change_started(Change::Scrub(repair, None, 0))
    }

    /// Add a hot spare; it is used at once if a slot is failed. A failed
    /// member's own device is taken back this way too (md's re-add): it
    /// leaves its slot and is rebuilt as a spare.
    pub fn add_spare(&self, dev: Arc<dyn BlockDevice>) -> Result<(), OpError> {
        self.change(Change::AddSpare(dev))
    }

    /// Remove a hot spare that is not in use.
    pub fn remove_spare(&self, name: &str) -> Result<(), OpError> {
        self.change(Change::RemoveSpare(name.to_string()))
    }

    /// Take a failed member's device out of its slot (md's --remove):
    /// the slot stays failed, empty, and the device is free.
    pub fn remove_failed(&self, name: &str) -> Result<(), OpError> {
        self.change(Change::RemoveFailed(name.to_string()))
    }

    /// Member states of the current generation.
    pub fn member_states(&self) -> Vec<MemberState> {
        lock(&self.inner.published).device.member_states()
    }

    /// The devices in the slots of the current generation.
    pub fn member_devices(&self) -> Vec<Arc<dyn BlockDevice>> {
        lock(&self.inner.published).device.member_devices()
    }

    /// The device of the current generation.
    pub fn device(&self) -> Arc<dyn RaidDevice> {
        lock(&self.inner.published).device.clone()
    }

    /// The running or last rebuild.
    pub fn rebuild(&self) -> Option<Arc<RebuildProgress>> {
        lock(&self.inner.published).rebuild.clone()
    }

    /// Limit every rebuild and scrub, the running one included, to
    /// `max` bytes per second (0: no limit), and while the volume serves
    /// guest IO to `min` (0: it does not yield), as md's sync_speed_max and
    /// sync_speed_min. Kept in the state file; no IO is affected, so the
    /// volume is not suspended.
    pub fn set_rate(&self, min: u64, max: u64) -> Result<(), OpError> {
        let mut s = lock(&self.inner.state);
        s.max_rate = max;
        s.min_rate = min;
        if let Some(p) = &s.rebuild {
            p.max_bytes_per_sec.store(max, Ordering::SeqCst);
            p.min_bytes_per_sec.store(min, Ordering::SeqCst);
        }
        let view = s.published();
        let saved = self
            .inner
            .hooks()
            .persist(&view.snapshot(self.inner.pending_count(), self.inner.deferred()));
        self.inner.publish_view(&s);
        saved.map_err(|e| {
            OpError::Internal(format!(
                "the change was made but saving the state failed: {e}"
            ))
        })
    }

    /// The limits set by [`set_rate`](Self::set_rate): (min, max).
    pub fn rate(&self) -> (u64, u64) {
        lock(&self.inner.published).rates
    }

    /// What an operator sees of the volume now. Never waits for a change
    /// in progress: it is the last published state.
    pub fn snapshot(&self) -> Snapshot {
        let p = lock(&self.inner.published).clone();
        p.snapshot(self.inner.pending_count(), self.inner.deferred())
    }

    /// Spares left.
    pub fn spares(&self) -> usize {
        lock(&self.inner.published).spares.len()
    }

    /// True once every event sent so far was taken and no change is
    /// pending (each was applied, found stale, or failed).
    pub fn idle(&self) -> bool {
        let sent = self.inner.sink.sent();
        // Received before pending: an event counted as received is in
        // `pending` already, or done.
        self.inner.received.load(Ordering::SeqCst) >= sent && self.inner.pending_count() == 0
    }
}

/// Start the thread that writes `b`. Should that fail, every region is
/// marked dirty on the members at once, so no write ever waits for a bit
/// and an unclean shutdown resynchronises everything, as without a bitmap.
pub(crate) fn start_bitmap(name: &str, b: Arc<Bitmap>) -> BitmapDaemon {
    match BitmapDaemon::start(name, b.clone()) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(volume = name, error = %e, "write-intent bitmap thread not started; marking every region dirty");
            let all = b.all_dirty();
            let members = b.members();
            b.write_to(&members, &all);
            b.load(&all);
            BitmapDaemon::stopped(b)
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.inner.quit.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        // Nothing records failures any more: writes must not wait.
        self.inner.sink.close();
        let mut s = lock(&self.inner.state);
        s.checkpointer = None;
        s.bitmap = None;
    }
}
