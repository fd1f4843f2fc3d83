//! Reactor threads: the poll loop, the inbox, timers and idle back-off.

use std::any::Any;
use std::cell::Cell;
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::error::{ReactorError, SendError};
use crate::quiesce::GateHook;

/// A message: a closure run once on the receiving reactor.
pub type Message = Box<dyn FnOnce(&mut Ctx) + Send>;
type PollerFn = Box<dyn FnMut(&mut Ctx) -> PollState>;

/// Messages run per loop iteration, so a flood of messages cannot starve the
/// pollers.
const MESSAGE_BATCH: usize = 64;

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the reactor running on this thread, if any.
pub fn current_reactor() -> Option<usize> {
    CURRENT.with(|c| c.get())
}

/// What a poller did in one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollState {
    /// It did work: keep the reactor spinning.
    Busy,
    /// Nothing to do, and whatever would bring new work will wake the
    /// reactor (a message, a timer or a watched fd): the reactor may sleep
    /// once every poller says so. A poller whose wake-up is not armed yet
    /// must answer `Busy`: the reactor sleeps after a span of wall-clock
    /// time, which a descheduled thread can spend in a handful of loops.
    Idle,
    /// It is finished: remove it.
    Done,
}

/// How to start a reactor set.
#[derive(Debug, Clone)]
pub struct ReactorConfig {
    /// Number of reactors; ignored when `cores` is given.
    pub count: usize,
    /// Cores to pin to, one reactor per entry. `None` pins reactor i to the
    /// i-th available core.
    pub cores: Option<Vec<usize>>,
    /// How long a reactor spins without work before it sleeps.
    pub idle_spin: Duration,
    /// Capacity of each reactor's inbox.
    pub inbox_capacity: usize,
    /// Thread name prefix.
    pub name: String,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            count: 1,
            cores: None,
            idle_spin: Duration::from_micros(500),
            inbox_capacity: 1024,
            name: "reactor".into(),
        }
    }
}

/// Counters a reactor publishes about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReactorStats {
    /// Loop iterations.
    pub loops: u64,
    /// Nanoseconds spent in iterations that did work.
    pub busy_ns: u64,
    /// Messages run.
    pub messages: u64,
    /// Times the reactor went to sleep.
    pub sleeps: u64,
    /// The core it is pinned to, if pinned.
    pub pinned_core: Option<usize>,
}

#[repr(align(128))]
pub(crate) struct CoreShared {
    inbox: ArrayQueue<Message>,
    wake_fd: OwnedFd,
    sleeping: AtomicBool,
    /// Bumped by quiesce control to make the reactor look at its gates.
    pub(crate) attention: AtomicU64,
    loops: AtomicU64,
    busy_ns: AtomicU64,
    messages: AtomicU64,
    sleeps: AtomicU64,
    pinned: AtomicU64,
}

impl CoreShared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
        // EAGAIN (counter saturated) still leaves the reactor woken.
        unsafe { libc::write(self.wake_fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

pub(crate) struct SetShared {
    pub(crate) cores: Vec<CoreShared>,
    stop: AtomicBool,
    failure: Mutex<Option<(usize, String)>>,
    stopped: Condvar,
}

/// A cheap, cloneable handle to a running reactor set, usable from any thread.
#[derive(Clone)]
pub struct ReactorSet {
    pub(crate) shared: Arc<SetShared>,
}

impl ReactorSet {
    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.shared.cores.len()
    }

    /// Always false: a set has at least one reactor.
    pub fn is_empty(&self) -> bool {
        self.shared.cores.is_empty()
    }

    /// Whether the set is stopping or stopped.
    pub fn is_stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    /// Queue `msg` to reactor `core`. A full inbox returns the message as
    /// [`SendError::Full`]: the caller decides whether to retry.
    pub fn send(&self, core: usize, msg: Message) -> Result<(), SendError<Message>> {
        let Some(c) = self.shared.cores.get(core) else {
            return Err(SendError::NoSuchReactor(core, msg));
        };
        if self.is_stopped() {
            return Err(SendError::Stopped(msg));
        }
        c.inbox.push(msg).map_err(SendError::Full)?;
        // Pairs with the fence in `sleep`: either the reactor sees the
        // message before sleeping, or we see it sleeping and wake it.
        fence(Ordering::SeqCst);
        if c.sleeping.load(Ordering::SeqCst) {
            c.wake();
        }
        Ok(())
    }

    /// Queue `msg`, waiting up to `timeout` for room. Never waits on a
    /// reactor thread (it could be waiting for itself).
    pub fn send_timeout(
        &self,
        core: usize,
        mut msg: Message,
        timeout: Duration,
    ) -> Result<(), SendError<Message>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.send(core, msg) {
                Err(SendError::Full(m)) => {
                    if current_reactor().is_some() || Instant::now() >= deadline {
                        return Err(SendError::Full(m));
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_micros(20));
                }
                other => return other,
            }
        }
    }

    /// Run `f` on reactor `core` and wait for its result.
    pub fn call<R: Send + 'static>(
        &self,
        core: usize,
        timeout: Duration,
        f: impl FnOnce(&mut Ctx) -> R + Send + 'static,
    ) -> Result<R, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        let msg: Message = Box::new(move |ctx| {
            let _ = tx.send(f(ctx));
        });
        self.send_timeout(core, msg, timeout)
            .map_err(|e| format!("reactor {core}: {e}"))?;
        rx.recv_timeout(timeout)
            .map_err(|e| format!("reactor {core} did not answer: {e}"))
    }

    /// Run `f` on reactor `core` if the reactor takes it within
    /// `timeout`, and wait for its result. Unlike [`call`](Self::call), a
    /// call that times out is never run later: `f` is dropped unrun (what
    /// it would start, such as a queue's runner, must not appear after the
    /// caller was told it failed). If the reactor took it just as the time
    /// ran out, this waits for its answer.
    pub fn call_unless_late<R: Send + 'static>(
        &self,
        core: usize,
        timeout: Duration,
        f: impl FnOnce(&mut Ctx) -> R + Send + 'static,
    ) -> Result<R, String> {
        const WAITING: u8 = 0;
        const TAKEN: u8 = 1;
        const LATE: u8 = 2;
        let state = Arc::new(std::sync::atomic::AtomicU8::new(WAITING));
        let taken = state.clone();
        let (tx, rx) = mpsc::sync_channel(1);
        let msg: Message = Box::new(move |ctx| {
            if taken
                .compare_exchange(WAITING, TAKEN, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                let _ = tx.send(f(ctx));
            }
        });
        self.send_timeout(core, msg, timeout)
            .map_err(|e| format!("reactor {core}: {e}"))?;
        match rx.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(mpsc::RecvTimeoutError::Timeout)
                if state
                    .compare_exchange(WAITING, LATE, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err() =>
            {
                // Running now: its answer comes once it is done.
                rx.recv()
                    .map_err(|e| format!("reactor {core} did not answer: {e}"))
            }
            Err(e) => Err(format!(
                "reactor {core} did not take the call within {timeout:?} ({e}); it will not run"
            )),
        }
    }

    /// A reactor's published counters.
    pub fn stats(&self, core: usize) -> Option<ReactorStats> {
        let c = self.shared.cores.get(core)?;
        let pinned = c.pinned.load(Ordering::Relaxed);
        Some(ReactorStats {
            loops: c.loops.load(Ordering::Relaxed),
            busy_ns: c.busy_ns.load(Ordering::Relaxed),
            messages: c.messages.load(Ordering::Relaxed),
            sleeps: c.sleeps.load(Ordering::Relaxed),
            pinned_core: (pinned != u64::MAX).then_some(pinned as usize),
        })
    }

    /// Ask every reactor to look at its quiesce gates, and wake it.
    pub(crate) fn poke_all(&self) {
        for c in &self.shared.cores {
            c.attention.fetch_add(1, Ordering::SeqCst);
            c.wake();
        }
    }

    /// Ask every reactor to stop after its current iteration.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for c in &self.shared.cores {
            c.wake();
        }
        let _g = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.shared.stopped.notify_all();
    }

    /// Wait until the set stops (asked to, or because a reactor failed), at
    /// most `timeout`. Returns whether it has stopped.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while !self.is_stopped() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .shared
                .stopped
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn fail(&self, core: usize, message: String) {
        {
            let mut g = self
                .shared
                .failure
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if g.is_none() {
                *g = Some((core, message));
            }
        }
        self.stop();
    }

    /// The first reactor failure, if any.
    pub fn failure(&self) -> Option<ReactorError> {
        let g = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        g.as_ref().map(|(core, message)| ReactorError::Panicked {
            core: *core,
            message: message.clone(),
        })
    }
}

/// A running set of reactor threads. Dropping it stops and joins them.
pub struct Reactors {
    set: ReactorSet,
    threads: Vec<JoinHandle<()>>,
}

impl Reactors {
    /// Start the reactors described by `config`.
    pub fn start(config: ReactorConfig) -> Result<Reactors, ReactorError> {
        let count = config.cores.as_ref().map_or(config.count, |c| c.len());
        if count == 0 || count > 1024 {
            return Err(ReactorError::InvalidConfig(format!(
                "reactor count must be 1..=1024, got {count}"
            )));
        }
        if config.inbox_capacity == 0 {
            return Err(ReactorError::InvalidConfig(
                "inbox_capacity must be at least 1".into(),
            ));
        }
        let pins = plan_pinning(&config, count);
        let mut cores = Vec::with_capacity(count);
        for i in 0..count {
            // SAFETY: plain syscall; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(ReactorError::Os {
                    what: format!("eventfd for reactor {i}"),
                    source: std::io::Error::last_os_error(),
                });
            }
            cores.push(CoreShared {
                inbox: ArrayQueue::new(config.inbox_capacity),
                // SAFETY: fd was just created and is owned by nobody else.
                wake_fd: unsafe { OwnedFd::from_raw_fd(fd) },
                sleeping: AtomicBool::new(false),
                attention: AtomicU64::new(0),
                loops: AtomicU64::new(0),
                busy_ns: AtomicU64::new(0),
                messages: AtomicU64::new(0),
                sleeps: AtomicU64::new(0),
                pinned: AtomicU64::new(u64::MAX),
            });
        }
        let set = ReactorSet {
            shared: Arc::new(SetShared {
                cores,
                stop: AtomicBool::new(false),
                failure: Mutex::new(None),
                stopped: Condvar::new(),
            }),
        };
        let mut reactors = Reactors {
            set: set.clone(),
            threads: Vec::with_capacity(count),
        };
        for (index, pin) in pins.into_iter().enumerate() {
            let set = set.clone();
            let idle_spin = config.idle_spin;
            let spawned = std::thread::Builder::new()
                .name(format!("{}-{index}", config.name))
                .spawn(move || reactor_thread(set, index, pin, idle_spin));
            match spawned {
                Ok(h) => reactors.threads.push(h),
                Err(source) => {
                    return Err(ReactorError::Os {
                        what: format!("spawning reactor {index}"),
                        source,
                    })
                }
            }
        }
        Ok(reactors)
    }

    /// A handle for sending messages and quiescing.
    pub fn set(&self) -> &ReactorSet {
        &self.set
    }

    /// Stop every reactor, join them, and report a panic if one happened.
    pub fn shutdown(mut self) -> Result<(), ReactorError> {
        self.join_all();
        match self.set.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn join_all(&mut self) {
        self.set.stop();
        for h in self.threads.drain(..) {
            // A panic was caught inside the thread and recorded already.
            let _ = h.join();
        }
    }
}

impl Drop for Reactors {
    fn drop(&mut self) {
        self.join_all();
    }
}

fn plan_pinning(config: &ReactorConfig, count: usize) -> Vec<Option<usize>> {
    let available: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    match &config.cores {
        Some(list) => {
            if let Some(bad) = list.iter().find(|c| !available.contains(c)) {
                tracing::warn!(
                    core = bad,
                    ?available,
                    "requested core is not available to this process; running {count} reactors unpinned"
                );
                vec![None; count]
            } else {
                list.iter().map(|&c| Some(c)).collect()
            }
        }
        None if count <= available.len() => available[..count].iter().map(|&c| Some(c)).collect(),
        None => {
            tracing::warn!(
                reactors = count,
                cores = available.len(),
                "fewer cores than reactors; running the reactors unpinned"
            );
            vec![None; count]
        }
    }
}

fn reactor_thread(set: ReactorSet, index: usize, pin: Option<usize>, idle_spin: Duration) {
    CURRENT.with(|c| c.set(Some(index)));
    let core = &set.shared.cores[index];
    if let Some(id) = pin {
        if core_affinity::set_for_current(core_affinity::CoreId { id }) {
            core.pinned.store(id as u64, Ordering::Relaxed);
        } else {
            tracing::warn!(
                reactor = index,
                core = id,
                "pinning failed; running unpinned"
            );
        }
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut ctx = Ctx::new(index, set.clone());
        run_loop(&mut ctx, idle_spin);
    }));
    if let Err(payload) = result {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        tracing::error!(reactor = index, %message, "reactor panicked; stopping the reactor set");
        set.fail(index, message);
    }
    CURRENT.with(|c| c.set(None));
}

fn run_loop(ctx: &mut Ctx, idle_spin: Duration) {
    let set = ctx.set.clone();
    let core = &set.shared.cores[ctx.index];
    let (mut loops, mut busy_ns, mut messages) = (0u64, 0u64, 0u64);
    let mut last_work = Instant::now();
    while !set.shared.stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        ctx.now = t0;
        let mut work = false;

        let attention = core.attention.load(Ordering::Acquire);
        if attention != ctx.seen_attention {
            ctx.seen_attention = attention;
            ctx.refresh_gates();
            work = true;
        }

        for _ in 0..MESSAGE_BATCH {
            match core.inbox.pop() {
                Some(msg) => {
                    msg(ctx);
                    messages += 1;
                    work = true;
                }
                None => break,
            }
        }

        let mut pollers = std::mem::take(&mut ctx.pollers);
        pollers.retain_mut(|p| match p(ctx) {
            PollState::Busy => {
                work = true;
                true
            }
            PollState::Idle => true,
            PollState::Done => {
                work = true;
                false
            }
        });
        // Pollers added while the others ran went into the emptied vector.
        pollers.append(&mut ctx.pollers);
        ctx.pollers = pollers;

        if ctx.run_due_timers(t0) {
            work = true;
        }

        loops += 1;
        let t1 = Instant::now();
        if work {
            busy_ns += (t1 - t0).as_nanos() as u64;
            last_work = t1;
        } else if t1 - last_work >= idle_spin {
            ctx.sleep(core);
            last_work = Instant::now();
        }
        // Plain stores on the reactor's own cache line: no read-modify-write.
        core.loops.store(loops, Ordering::Relaxed);
        core.busy_ns.store(busy_ns, Ordering::Relaxed);
        core.messages.store(messages, Ordering::Relaxed);
    }
}

enum TimerFn {
    Once(Box<dyn FnOnce(&mut Ctx)>),
    Every(Duration, Box<dyn FnMut(&mut Ctx) -> bool>),
}

struct Timer {
    due: Instant,
    seq: u64,
    f: TimerFn,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    // Reversed: BinaryHeap is a max-heap and we want the earliest first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// What of a watched fd wakes its reactor from the idle sleep; errors
/// and hang-ups wake it whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FdWake {
    /// Something to read.
    #[default]
    Input,
    /// Room to write: its poller has output the peer has no room for and
    /// reads nothing meanwhile (it may then say Idle rather than retry on
    /// every loop; input it leaves unread would end every sleep at once).
    Room,
    /// Neither: its poller leaves input unread until something else (a
    /// timer, a completion it polls for) lets it go on.
    Neither,
}

/// A reactor's own state, handed to every poller, message and timer it runs.
/// It never leaves its thread.
pub struct Ctx {
    index: usize,
    set: ReactorSet,
    pollers: Vec<PollerFn>,
    timers: BinaryHeap<Timer>,
    timer_seq: u64,
    /// Watched fds and the events that wake the sleep for each.
    fds: Vec<(RawFd, libc::c_short)>,
    seen_attention: u64,
    now: Instant,
    pub(crate) gates: Vec<Rc<dyn GateHook>>,
    pub(crate) gate_map: HashMap<u64, Rc<dyn Any>>,
}

impl Ctx {
    fn new(index: usize, set: ReactorSet) -> Ctx {
        Ctx {
            index,
            set,
            pollers: Vec::new(),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            fds: Vec::new(),
            seen_attention: 0,
            now: Instant::now(),
            gates: Vec::new(),
            gate_map: HashMap::new(),
        }
    }

    /// When the current loop iteration started: a timestamp for the IO
    /// path that costs nothing (accurate to one iteration).
    pub fn now(&self) -> Instant {
        self.now
    }

    /// This reactor's index in its set.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The set this reactor belongs to (to message other reactors).
    pub fn set(&self) -> &ReactorSet {
        &self.set
    }

    /// Register a poller; it runs on every loop iteration until it returns
    /// [`PollState::Done`].
    pub fn add_poller(&mut self, f: impl FnMut(&mut Ctx) -> PollState + 'static) {
        self.pollers.push(Box::new(f));
    }

    /// Number of registered pollers.
    pub fn poller_count(&self) -> usize {
        self.pollers.len()
    }

    /// Run `f` once, `after` from now.
    pub fn after(&mut self, after: Duration, f: impl FnOnce(&mut Ctx) + 'static) {
        self.push_timer(Instant::now() + after, TimerFn::Once(Box::new(f)));
    }

    /// Run `f` every `period` for as long as it returns true.
    pub fn every(&mut self, period: Duration, f: impl FnMut(&mut Ctx) -> bool + 'static) {
        self.push_timer(Instant::now() + period, TimerFn::Every(period, Box::new(f)));
    }

    /// Make readability of `fd` wake this reactor from its idle sleep. The
    /// poller that owns the fd still does the reading.
    pub fn watch_fd(&mut self, fd: RawFd) {
        if !self.fds.iter().any(|&(f, _)| f == fd) {
            self.fds.push((fd, libc::POLLIN));
        }
    }

    /// What of the watched `fd` wakes this reactor (see [`FdWake`]).
    pub fn watch_as(&mut self, fd: RawFd, wake: FdWake) {
        if let Some((_, events)) = self.fds.iter_mut().find(|(f, _)| *f == fd) {
            *events = match wake {
                FdWake::Input => libc::POLLIN,
                FdWake::Room => libc::POLLOUT,
                FdWake::Neither => 0,
            };
        }
    }

    /// Stop waking on `fd`.
    pub fn unwatch_fd(&mut self, fd: RawFd) {
        self.fds.retain(|&(f, _)| f != fd);
    }

    fn push_timer(&mut self, due: Instant, f: TimerFn) {
        self.timer_seq += 1;
        let seq = self.timer_seq;
        self.timers.push(Timer { due, seq, f });
    }

    fn run_due_timers(&mut self, now: Instant) -> bool {
        let mut ran = false;
        while self.timers.peek().is_some_and(|t| t.due <= now) {
            let Some(t) = self.timers.pop() else { break };
            ran = true;
            match t.f {
                TimerFn::Once(f) => f(self),
                TimerFn::Every(period, mut f) => {
                    if f(self) {
                        self.push_timer(now + period, TimerFn::Every(period, f));
                    }
                }
            }
        }
        ran
    }

    /// Sleep until a message, a watched fd, a quiesce request or the next
    /// timer.
    fn sleep(&mut self, core: &CoreShared) {
        core.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !core.inbox.is_empty()
            || core.attention.load(Ordering::SeqCst) != self.seen_attention
            || self.set.shared.stop.load(Ordering::SeqCst)
        {
            core.sleeping.store(false, Ordering::SeqCst);
            return;
        }
        core.sleeps.fetch_add(1, Ordering::Relaxed);
        let timeout_ms: libc::c_int = match self.timers.peek() {
            None => -1,
            Some(t) => {
                let left = t.due.saturating_duration_since(Instant::now());
                // Round up so we never wake before the timer is due.
                left.as_micros().div_ceil(1000).min(60_000) as libc::c_int
            }
        };
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(1 + self.fds.len());
        pfds.push(libc::pollfd {
            fd: core.wake_fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        pfds.extend(self.fds.iter().map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        }));
        // SAFETY: pfds is a valid array of pollfd of the given length.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
        core.sleeping.store(false, Ordering::SeqCst);
        let mut buf = 0u64;
        // SAFETY: reading 8 bytes into a u64 from our non-blocking eventfd.
        unsafe { libc::read(core.wake_fd.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
    }

    fn refresh_gates(&mut self) {
        let gates = self.gates.clone();
        let mut keep = Vec::with_capacity(gates.len());
        for g in &gates {
            if g.refresh(self) {
                keep.push(g.clone());
            } else {
                self.gate_map.remove(&g.id());
            }
        }
        // Gates created while refreshing (by replayed IO) were appended.
        keep.extend(self.gates.split_off(gates.len()));
        self.gates = keep;
    }
}
