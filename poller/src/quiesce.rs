//! The quiesce epoch: change an object's configuration only while no IO of
//! that object is in flight on any reactor.
//!
//! Protocol (ARCHITECTURE.md, after Linux md's "synchronize io with array
//! reconfiguration"):
//!
//! 1. suspend: a control thread bumps the object's epoch E and flags it
//!    suspended (one atomic word), then pokes every reactor.
//! 2. Each reactor, at the top of its loop, sees the poke, marks its local
//!    gate for the object closed (new IO is parked in order on that core,
//!    never failed), and acknowledges E once its in-flight IO on the object
//!    has drained. The caller waits for every acknowledgement, with a
//!    deadline; on time-out it releases and nothing has changed.
//! 3. lock the object's configuration lock, 4. change it and publish a new
//!    generation, 5. unlock, then resume: reactors pick up the new
//!    generation and replay the parked IO in arrival order.
//!
//! The state is level-triggered (reactors read the current word, they do not
//! consume queued commands), so a suspend never waits for room in a full
//! inbox and a reactor that slept through a suspend/resume pair has nothing
//! to catch up on. Reactors that never touched the object have no gate and
//! owe no acknowledgement; a gate created while the object is suspended
//! starts closed.

use std::any::Any;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::QuiesceError;
use crate::reactor::{current_reactor, Ctx, ReactorSet};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

const SUSPENDED: u64 = 1;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind;
    // keep going rather than poison every later caller.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a reactor's gate hook does when poked.
pub(crate) trait GateHook {
    fn id(&self) -> u64;
    /// Look at the object's state; returns false when the gate is gone.
    fn refresh(&self, ctx: &mut Ctx) -> bool;
}

struct Ctrl {
    depth: u32,
    epoch: u64,
    removing: bool,
}

/// The part of an object that does not depend on its configuration type.
struct Control {
    id: u64,
    name: String,
    set: ReactorSet,
    /// `(epoch << 1) | SUSPENDED`: what reactors read.
    state: AtomicU64,
    removed: AtomicBool,
    has_gate: Box<[AtomicBool]>,
    acks: Box<[AtomicU64]>,
    /// A suspend looks for its acknowledgements before it sleeps (there
    /// are more cores than reactors).
    spin: bool,
    ctrl: Mutex<Ctrl>,
    wait_lock: Mutex<()>,
    acked: Condvar,
    /// Suspends that reached "no IO in flight", and how long they waited.
    suspends: AtomicU64,
    wait_ns_total: AtomicU64,
    wait_ns_max: AtomicU64,
    /// The waits by [`QuiesceStats::wait_hist`]'s buckets.
    wait_hist: [AtomicU64; WAIT_BUCKETS],
}

/// How long a suspend looks for its acknowledgements without sleeping.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(250);

/// Buckets of the suspend-wait histogram: bucket `i` counts waits below
/// `1 us << i` (the last one takes the rest, from about half a second).
pub const WAIT_BUCKETS: usize = 20;

/// How an object's suspends went, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuiesceStats {
    /// Suspends that completed (every reactor acknowledged).
    pub suspends: u64,
    /// Their total wait for the acknowledgements.
    pub wait_ns_total: u64,
    /// The longest such wait.
    pub wait_ns_max: u64,
    /// How many waited less than `1 us << i`, by bucket `i` (not
    /// cumulative; the last bucket takes the rest).
    pub wait_hist: [u64; WAIT_BUCKETS],
}

impl Control {
    fn suspend(self: &Arc<Self>, timeout: Duration) -> Result<SuspendGuard, QuiesceError> {
        if let Some(r) = current_reactor() {
            return Err(QuiesceError::OnReactor(self.name.clone(), r));
        }
        if self.set.is_stopped() {
            return Err(QuiesceError::Stopped(self.name.clone()));
        }
        let start = Instant::now();
        let epoch = {
            let mut c = lock(&self.ctrl);
            if c.removing {
                return Err(QuiesceError::NotFound(self.name.clone()));
            }
            c.depth += 1;
            if c.depth == 1 {
                c.epoch += 1;
                self.state.store(c.epoch << 1 | SUSPENDED, Ordering::SeqCst);
                self.set.poke_all();
            }
            c.epoch
        };
        match self.wait_acks(epoch, start, timeout) {
            Ok(()) => {
                let ns = start.elapsed().as_nanos() as u64;
                self.suspends.fetch_add(1, Ordering::Relaxed);
                self.wait_ns_total.fetch_add(ns, Ordering::Relaxed);
                self.wait_ns_max.fetch_max(ns, Ordering::Relaxed);
                let us = ns / 1000;
                let b = ((64 - us.leading_zeros()) as usize).min(WAIT_BUCKETS - 1);
                self.wait_hist[b].fetch_add(1, Ordering::Relaxed);
                Ok(SuspendGuard {
                    control: self.clone(),
                })
            }
            Err(e) => {
                self.release();
                Err(e)
            }
        }
    }

    fn pending(&self, epoch: u64) -> Vec<usize> {
        (0..self.acks.len())
            .filter(|&c| {
                self.has_gate[c].load(Ordering::SeqCst)
                    && self.acks[c].load(Ordering::SeqCst) < epoch
            })
            .collect()
    }

    fn all_acked(&self, epoch: u64) -> bool {
        (0..self.acks.len()).all(|c| {
            !self.has_gate[c].load(Ordering::SeqCst) || self.acks[c].load(Ordering::SeqCst) >= epoch
        })
    }

    fn wait_acks(&self, epoch: u64, start: Instant, timeout: Duration) -> Result<(), QuiesceError> {
        let deadline = start + timeout;
        // Under IO the acknowledgements come within tens of microseconds;
        // waking a control thread asleep on the condition variable cost as
        // much again (p99 155-170 us suspend-to-acknowledged before, on a
        // VM). So look for them first without sleeping, for a bounded
        // time and without the wait lock (an acknowledging reactor takes
        // it). Only where a core is left that no reactor polls: on a
        // machine with a reactor on every core the spinning control thread
        // took a reactor's core until the scheduler's tick (p50 1 ms on 2
        // cores with 2 reactors), so there it sleeps at once.
        let spin = if self.spin {
            SPIN_BEFORE_SLEEP
        } else {
            Duration::ZERO
        };
        let spin_end = start + spin.min(timeout);
        while Instant::now() < spin_end {
            if self.removed.load(Ordering::SeqCst) {
                return Err(QuiesceError::NotFound(self.name.clone()));
            }
            if self.all_acked(epoch) {
                return Ok(());
            }
            std::thread::yield_now();
        }
        let mut g = lock(&self.wait_lock);
        loop {
            if self.removed.load(Ordering::SeqCst) {
                return Err(QuiesceError::NotFound(self.name.clone()));
            }
            let pending = self.pending(epoch);
            if pending.is_empty() {
                return Ok(());
            }
            if self.set.is_stopped() {
                return Err(QuiesceError::Stopped(self.name.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(QuiesceError::DeadlineExceeded {
                    name: self.name.clone(),
                    pending,
                    waited: now - start,
                });
            }
            // The periodic re-check also notices a stopped reactor set.
            let wait = (deadline - now).min(Duration::from_millis(20));
            g = self
                .acked
                .wait_timeout(g, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn release(&self) {
        let mut c = lock(&self.ctrl);
        c.depth = c.depth.saturating_sub(1);
        if c.depth == 0 && !c.removing {
            self.state.store(c.epoch << 1, Ordering::SeqCst);
            self.set.poke_all();
        }
    }

    /// Called on reactor `core` when its gate has drained under `epoch`.
    fn ack(&self, core: usize, epoch: u64) {
        self.acks[core].fetch_max(epoch, Ordering::SeqCst);
        drop(lock(&self.wait_lock));
        self.acked.notify_all();
        if !self.spin {
            // The suspending thread shares a core with a reactor, maybe
            // this one, which polls without sleeping: let it run now
            // rather than at the scheduler's next tick (p99 0.5-1 ms on 2
            // cores with 2 reactors). Once per suspend per reactor.
            std::thread::yield_now();
        }
    }
}

/// Proof that an object is suspended: while it lives, no reactor runs IO of
/// the object. Dropping it resumes (suspends nest: the last one resumes).
#[must_use = "the object resumes as soon as the guard is dropped"]
pub struct SuspendGuard {
    control: Arc<Control>,
}

impl SuspendGuard {
    /// Resume now (same as dropping the guard).
    pub fn resume(self) {}
}

impl Drop for SuspendGuard {
    fn drop(&mut self) {
        self.control.release();
    }
}

struct Shared<C> {
    control: Arc<Control>,
    config_lock: Mutex<()>,
    config: Mutex<(u64, Arc<C>)>,
}

/// A reconfiguration did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReconfigureError<E> {
    /// The object could not be suspended; nothing changed.
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
    /// The change itself refused; nothing changed.
    #[error("change refused: {0}")]
    Rejected(E),
}

/// An object whose configuration `C` the IO path reads and only a quiesced
/// change may replace. Cloning gives another handle to the same object.
pub struct QuiesceObject<C> {
    shared: Arc<Shared<C>>,
}

impl<C> Clone for QuiesceObject<C> {
    fn clone(&self) -> Self {
        QuiesceObject {
            shared: self.shared.clone(),
        }
    }
}

impl<C: Send + Sync + 'static> QuiesceObject<C> {
    /// A new object served by the reactors of `set`, with generation 1.
    pub fn new(set: &ReactorSet, name: impl Into<String>, config: C) -> Self {
        let n = set.len();
        let control = Arc::new(Control {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.into(),
            set: set.clone(),
            state: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            has_gate: (0..n).map(|_| AtomicBool::new(false)).collect(),
            acks: (0..n).map(|_| AtomicU64::new(0)).collect(),
            spin: std::thread::available_parallelism().is_ok_and(|c| c.get() > n),
            ctrl: Mutex::new(Ctrl {
                depth: 0,
                epoch: 0,
                removing: false,
            }),
            wait_lock: Mutex::new(()),
            acked: Condvar::new(),
            suspends: AtomicU64::new(0),
            wait_ns_total: AtomicU64::new(0),
            wait_ns_max: AtomicU64::new(0),
            wait_hist: Default::default(),
        });
        QuiesceObject {
            shared: Arc::new(Shared {
                control,
                config_lock: Mutex::new(()),
                config: Mutex::new((1, Arc::new(config))),
            }),
        }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        &self.shared.control.name
    }

    /// The published configuration and its generation.
    pub fn config(&self) -> (u64, Arc<C>) {
        let g = lock(&self.shared.config);
        (g.0, g.1.clone())
    }

    /// Suspend counts and waits so far.
    pub fn stats(&self) -> QuiesceStats {
        let c = &self.shared.control;
        QuiesceStats {
            suspends: c.suspends.load(Ordering::Relaxed),
            wait_ns_total: c.wait_ns_total.load(Ordering::Relaxed),
            wait_ns_max: c.wait_ns_max.load(Ordering::Relaxed),
            wait_hist: std::array::from_fn(|i| c.wait_hist[i].load(Ordering::Relaxed)),
        }
    }

    /// Whether a suspend holds the object now (or is waiting for its IO to
    /// drain): new IO of it waits.
    pub fn is_suspended(&self) -> bool {
        self.shared.control.state.load(Ordering::SeqCst) & SUSPENDED != 0
    }

    /// Whether the object has been removed.
    pub fn is_removed(&self) -> bool {
        self.shared.control.removed.load(Ordering::SeqCst)
    }

    /// Suspend the object: returns once no reactor has IO of it in flight,
    /// or fails after `timeout` having changed nothing. Call from a control
    /// thread, never a reactor.
    pub fn suspend(&self, timeout: Duration) -> Result<SuspendGuard, QuiesceError> {
        self.shared.control.suspend(timeout)
    }

    /// suspend, lock, `change`, publish a new generation, unlock, resume.
    /// `change` sees the current configuration and returns the new one and a
    /// result; if it returns an error nothing is published. Concurrent
    /// reconfigurations of one object run one after the other.
    pub fn reconfigure<R, E>(
        &self,
        timeout: Duration,
        change: impl FnOnce(&C) -> Result<(C, R), E>,
    ) -> Result<R, ReconfigureError<E>> {
        let guard = self.suspend(timeout)?;
        let config_lock = lock(&self.shared.config_lock);
        if self.is_removed() {
            return Err(QuiesceError::NotFound(self.name().to_string()).into());
        }
        let current = lock(&self.shared.config).1.clone();
        let (new, result) = change(&current).map_err(ReconfigureError::Rejected)?;
        {
            let mut g = lock(&self.shared.config);
            g.0 += 1;
            g.1 = Arc::new(new);
        }
        drop(config_lock);
        drop(guard);
        Ok(result)
    }

    /// Publish `config` as the next generation while `guard` holds the
    /// object suspended (the caller's suspend): the steps of a transaction
    /// that must persist its change between the suspend and the publish.
    /// Takes the configuration lock for the swap; returns the new
    /// generation. Fails with `NotFound` once the object is removed, and
    /// with `WrongType` for a guard of another object.
    pub fn publish(&self, guard: &SuspendGuard, config: C) -> Result<u64, QuiesceError> {
        if !Arc::ptr_eq(&guard.control, &self.shared.control) {
            return Err(QuiesceError::WrongType(self.name().to_string()));
        }
        let _config_lock = lock(&self.shared.config_lock);
        if self.is_removed() {
            return Err(QuiesceError::NotFound(self.name().to_string()));
        }
        let mut g = lock(&self.shared.config);
        g.0 += 1;
        g.1 = Arc::new(config);
        Ok(g.0)
    }

    /// Tear the object down: drain its IO everywhere, then fail every
    /// parked request with [`Admission::Removed`] and drop the gates. Later
    /// suspends return `NotFound`.
    pub fn remove(&self, timeout: Duration) -> Result<(), QuiesceError> {
        let control = &self.shared.control;
        let guard = self.suspend(timeout)?;
        {
            let mut c = lock(&control.ctrl);
            if c.removing {
                return Err(QuiesceError::NotFound(control.name.clone()));
            }
            c.removing = true;
        }
        let _config_lock = lock(&self.shared.config_lock);
        control.removed.store(true, Ordering::SeqCst);
        control.set.poke_all();
        drop(lock(&control.wait_lock));
        control.acked.notify_all();
        drop(guard);
        Ok(())
    }

    /// This reactor's gate for the object, created on first use. Fails with
    /// `NotFound` once the object is removed.
    pub fn local(&self, ctx: &mut Ctx) -> Result<LocalGate<C>, QuiesceError> {
        let control = &self.shared.control;
        if let Some(any) = ctx.gate_map.get(&control.id) {
            let Ok(cell) = Rc::downcast::<GateCell<C>>(any.clone()) else {
                return Err(QuiesceError::WrongType(control.name.clone()));
            };
            // Catch up with the object now: a resume this reactor has not
            // looked at yet (a message can run before the reactor's gate
            // pass in the same loop) would hand out the old generation.
            if !cell.refresh(ctx) {
                return Err(QuiesceError::NotFound(control.name.clone()));
            }
            return Ok(LocalGate(cell));
        }
        if control.removed.load(Ordering::SeqCst) {
            return Err(QuiesceError::NotFound(control.name.clone()));
        }
        let core = ctx.index();
        // Publish the gate before reading the state (SeqCst on both sides):
        // a suspender either sees this gate and waits for it, or this gate
        // sees the suspension and starts closed.
        control.has_gate[core].store(true, Ordering::SeqCst);
        let state = control.state.load(Ordering::SeqCst);
        let (generation, config) = self.config();
        let cell = Rc::new(GateCell {
            shared: self.shared.clone(),
            core,
            st: RefCell::new(GateState {
                suspended: state & SUSPENDED != 0,
                epoch: state >> 1,
                acked: 0,
                inflight: 0,
                parked: VecDeque::new(),
                config,
                generation,
                removed: false,
                kept: None,
            }),
        });
        if state & SUSPENDED != 0 {
            cell.st.borrow_mut().acked = state >> 1;
            control.ack(core, state >> 1);
        }
        ctx.gate_map.insert(control.id, cell.clone() as Rc<dyn Any>);
        ctx.gates.push(cell.clone() as Rc<dyn GateHook>);
        Ok(LocalGate(cell))
    }
}

/// What a parked request is told when it may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The object resumed: the request now counts as in flight and must
    /// call [`LocalGate::end`] when it completes.
    Admitted,
    /// The object was removed: fail the request.
    Removed,
}

/// What [`LocalGate::try_begin_helping`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Helping {
    /// The IO is in flight; call [`LocalGate::end`] when it completes.
    Admitted,
    /// Not now (parked requests go first, or the gate was removed); ask
    /// again on a later poll.
    Wait,
    /// Suspended and this core has nothing in flight (or acknowledged
    /// already): nothing here waits for the IO, which must wait for the
    /// resume. Another core may still be draining.
    Quiet,
}

type Parked = Box<dyn FnOnce(&mut Ctx, Admission)>;

struct GateState<C> {
    suspended: bool,
    epoch: u64,
    acked: u64,
    inflight: usize,
    parked: VecDeque<Parked>,
    config: Arc<C>,
    generation: u64,
    removed: bool,
    /// What the IO path keeps on this core for the generation in force
    /// ([`LocalGate::keep`]); dropped when this core sees a suspend, so
    /// nothing of the old generation is held while it changes.
    kept: Option<Box<dyn Any>>,
}

struct GateCell<C> {
    shared: Arc<Shared<C>>,
    core: usize,
    st: RefCell<GateState<C>>,
}

impl<C: Send + Sync + 'static> GateHook for GateCell<C> {
    fn id(&self) -> u64 {
        self.shared.control.id
    }

    fn refresh(&self, ctx: &mut Ctx) -> bool {
        let control = &self.shared.control;
        if control.removed.load(Ordering::SeqCst) {
            let (parked, kept) = {
                let mut s = self.st.borrow_mut();
                s.removed = true;
                (std::mem::take(&mut s.parked), s.kept.take())
            };
            drop(kept);
            for f in parked {
                f(ctx, Admission::Removed);
            }
            return false;
        }
        let state = control.state.load(Ordering::SeqCst);
        let epoch = state >> 1;
        if state & SUSPENDED != 0 {
            // Dropped outside the borrow: its drop may be anything.
            let kept = self.st.borrow_mut().kept.take();
            drop(kept);
            let ack = {
                let mut s = self.st.borrow_mut();
                s.suspended = true;
                s.epoch = epoch;
                let ack = s.inflight == 0 && s.acked < epoch;
                if ack {
                    s.acked = epoch;
                }
                ack
            };
            if ack {
                control.ack(self.core, epoch);
            }
            return true;
        }
        let parked = {
            let mut s = self.st.borrow_mut();
            if !s.suspended {
                return true;
            }
            s.suspended = false;
            let (generation, config) = {
                let g = lock(&self.shared.config);
                (g.0, g.1.clone())
            };
            s.generation = generation;
            s.config = config;
            // Every replayed request is admitted up front, in order.
            s.inflight += s.parked.len();
            std::mem::take(&mut s.parked)
        };
        for f in parked {
            f(ctx, Admission::Admitted);
        }
        true
    }
}

/// One reactor's view of a quiesce object: the IO path asks it before
/// starting IO and tells it when IO ends. It never leaves its reactor.
pub struct LocalGate<C>(Rc<GateCell<C>>);

impl<C> Clone for LocalGate<C> {
    fn clone(&self) -> Self {
        LocalGate(self.0.clone())
    }
}

impl<C: Send + Sync + 'static> LocalGate<C> {
    /// Start an IO if the object is open on this core; the IO is then in
    /// flight until [`end`](Self::end). Returns false while the object is
    /// suspended (or has parked requests that must go first, or is removed):
    /// the caller parks the request with [`park`](Self::park).
    #[inline]
    pub fn try_begin(&self) -> bool {
        let mut s = self.0.st.borrow_mut();
        if s.suspended || s.removed || !s.parked.is_empty() {
            return false;
        }
        s.inflight += 1;
        true
    }

    /// Start an IO of background work that IO already in flight may be
    /// waiting for (md lets its reclaim thread write while a suspend
    /// drains): like [`try_begin`](Self::try_begin), and also while a
    /// suspend still waits for this core to drain. It then drains with that
    /// IO: the core acknowledges only after it completes, so a suspend
    /// still finds nothing in flight once every core has acknowledged. A
    /// journal checkpoint's flush is the case: guest writes waiting for log
    /// room count as in flight, and only the checkpoint frees room.
    pub fn try_begin_helping(&self) -> Helping {
        let mut s = self.0.st.borrow_mut();
        if s.removed {
            return Helping::Wait;
        }
        if s.suspended {
            if s.inflight > 0 && s.acked < s.epoch {
                s.inflight += 1;
                return Helping::Admitted;
            }
            return Helping::Quiet;
        }
        if !s.parked.is_empty() {
            return Helping::Wait;
        }
        s.inflight += 1;
        Helping::Admitted
    }

    /// An IO started by `try_begin` (or admitted from the parked list) has
    /// completed.
    #[inline]
    pub fn end(&self) {
        let ack = {
            let mut s = self.0.st.borrow_mut();
            s.inflight = s.inflight.saturating_sub(1);
            let ack = s.suspended && s.inflight == 0 && s.acked < s.epoch;
            if ack {
                s.acked = s.epoch;
            }
            ack.then_some(s.epoch)
        };
        if let Some(epoch) = ack {
            self.0.shared.control.ack(self.0.core, epoch);
        }
    }

    /// Hold a request until the object resumes (run in arrival order, with
    /// [`Admission::Admitted`]) or is removed ([`Admission::Removed`]).
    pub fn park(&self, ctx: &mut Ctx, f: impl FnOnce(&mut Ctx, Admission) + 'static) {
        let removed = {
            let mut s = self.0.st.borrow_mut();
            if !s.removed {
                s.parked.push_back(Box::new(f));
                return;
            }
            true
        };
        if removed {
            f(ctx, Admission::Removed);
        }
    }

    /// The configuration this core runs IO under, and its generation.
    #[inline]
    pub fn config(&self) -> (u64, Arc<C>) {
        let s = self.0.st.borrow();
        (s.generation, s.config.clone())
    }

    /// Whether this core has seen a suspend it has not yet seen resumed.
    /// Once it acknowledged, the caller may already be changing the
    /// configuration (and may have returned to its own caller): the old
    /// configuration must not be used for anything but reads until the
    /// resume reaches this core.
    #[inline]
    pub fn is_suspended(&self) -> bool {
        self.0.st.borrow().suspended
    }

    /// The generation this core runs IO under.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.0.st.borrow().generation
    }

    /// Whether the object was removed: `try_begin` will never admit again
    /// (a background worker polling the gate stops on this).
    #[inline]
    pub fn is_removed(&self) -> bool {
        self.0.st.borrow().removed || self.0.shared.control.removed.load(Ordering::SeqCst)
    }

    /// Keep `value` on this core for the generation in force, for
    /// [`take_kept`](Self::take_kept) to hand back (a channel the next
    /// request can use instead of opening one). It is dropped, before the
    /// core acknowledges, when the core sees a suspend or the removal; one
    /// given while the core is suspended is dropped at once, and one kept
    /// already is replaced. Call it before [`end`](Self::end) of the IO that
    /// used it, so that a suspend waiting for that IO finds it gone.
    pub fn keep(&self, value: Box<dyn Any>) {
        let old = {
            let mut s = self.0.st.borrow_mut();
            if s.suspended || s.removed {
                Some(value)
            } else {
                s.kept.replace(value)
            }
        };
        drop(old);
    }

    /// Take back what [`keep`](Self::keep) kept, if it is a `T` (anything
    /// else stays kept).
    pub fn take_kept<T: 'static>(&self) -> Option<Box<T>> {
        let mut s = self.0.st.borrow_mut();
        let value = s.kept.take()?;
        match value.downcast::<T>() {
            Ok(v) => Some(v),
            Err(other) => {
                s.kept = Some(other);
                None
            }
        }
    }

    /// IO of this object in flight on this core.
    pub fn inflight(&self) -> usize {
        self.0.st.borrow().inflight
    }

    /// Requests parked on this core.
    pub fn parked(&self) -> usize {
        self.0.st.borrow().parked.len()
    }
}

trait Erased: Send + Sync {
    fn control(&self) -> &Arc<Control>;
    fn remove_erased(&self, timeout: Duration) -> Result<(), QuiesceError>;
    fn as_any(&self) -> &dyn Any;
}

impl<C: Send + Sync + 'static> Erased for QuiesceObject<C> {
    fn control(&self) -> &Arc<Control> {
        &self.shared.control
    }
    fn remove_erased(&self, timeout: Duration) -> Result<(), QuiesceError> {
        self.remove(timeout)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Named quiesce objects of one reactor set: how the control plane finds an
/// object, and gets `NotFound` for one that does not exist or is going away.
pub struct Domain {
    set: ReactorSet,
    objects: Mutex<HashMap<String, Arc<dyn Erased>>>,
}

impl Domain {
    /// An empty domain over `set`.
    pub fn new(set: &ReactorSet) -> Domain {
        Domain {
            set: set.clone(),
            objects: Mutex::new(HashMap::new()),
        }
    }

    /// Create a named object.
    pub fn create<C: Send + Sync + 'static>(
        &self,
        name: &str,
        config: C,
    ) -> Result<QuiesceObject<C>, QuiesceError> {
        let mut objects = lock(&self.objects);
        if objects.contains_key(name) {
            return Err(QuiesceError::AlreadyExists(name.to_string()));
        }
        let obj = QuiesceObject::new(&self.set, name, config);
        objects.insert(name.to_string(), Arc::new(obj.clone()));
        Ok(obj)
    }

    /// A handle to a named object.
    pub fn get<C: Send + Sync + 'static>(
        &self,
        name: &str,
    ) -> Result<QuiesceObject<C>, QuiesceError> {
        let objects = lock(&self.objects);
        let obj = objects
            .get(name)
            .ok_or_else(|| QuiesceError::NotFound(name.to_string()))?;
        obj.as_any()
            .downcast_ref::<QuiesceObject<C>>()
            .cloned()
            .ok_or_else(|| QuiesceError::WrongType(name.to_string()))
    }

    /// Suspend a named object, whatever its configuration type.
    pub fn suspend(&self, name: &str, timeout: Duration) -> Result<SuspendGuard, QuiesceError> {
        let control = {
            let objects = lock(&self.objects);
            objects
                .get(name)
                .ok_or_else(|| QuiesceError::NotFound(name.to_string()))?
                .control()
                .clone()
        };
        control.suspend(timeout)
    }

    /// Remove a named object (see [`QuiesceObject::remove`]).
    pub fn remove(&self, name: &str, timeout: Duration) -> Result<(), QuiesceError> {
        let obj = lock(&self.objects)
            .get(name)
            .cloned()
            .ok_or_else(|| QuiesceError::NotFound(name.to_string()))?;
        obj.remove_erased(timeout)?;
        let mut objects = lock(&self.objects);
        // Another object of the same name may have been created meanwhile.
        if objects
            .get(name)
            .is_some_and(|o| Arc::ptr_eq(o.control(), obj.control()))
        {
            objects.remove(name);
        }
        Ok(())
    }

    /// Names of the live objects.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.objects).keys().cloned().collect();
        v.sort();
        v
    }
}
