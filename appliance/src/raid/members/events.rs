//! What the IO path and background work tell a volume's monitor (member
//! failures, the end of a rebuild or replacement run), and the ledger that
//! holds completions back until a reported failure is on disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use bdev::{Completion, IoError};

use super::{device_id, Member, MemberSet, Replacement};

/// A member failed an IO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberFailure {
    /// Which member (its slot in the volume).
    pub member: usize,
    /// Which device was in the slot (see [`device_id`]): a report about a
    /// device the slot no longer holds is stale and ignored.
    pub device: usize,
    /// What the IO got.
    pub error: IoError,
}

/// What the IO path and background work tell a volume's monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A member failed an IO.
    Failed(MemberFailure),
    /// The rebuild of a slot (the slot after the last member's: the
    /// replacement's copy) finished.
    Rebuilt(usize, Run),
    /// The rebuild of a slot (or the replacement) stopped with an error.
    RebuildAborted(usize, Run, String),
}

/// Which run of a rebuild or replacement an event is about: its cursor,
/// which every run gets anew (a run interrupted by a new generation and
/// going on keeps it). An event that arrives after its run ended (a
/// duplicate, or one queued while an operator started another run of the
/// same slot, even onto the same device) names a cursor the volume no
/// longer has, and is ignored. The event holds the cursor, so no later
/// run can be given its address.
#[derive(Clone)]
pub struct Run(Arc<AtomicU64>);

impl Run {
    /// The run whose cursor is `cursor`.
    pub fn of(cursor: &Arc<AtomicU64>) -> Run {
        Run(cursor.clone())
    }

    /// Whether `cursor` is this run's.
    pub fn is(&self, cursor: &Arc<AtomicU64>) -> bool {
        Arc::ptr_eq(&self.0, cursor)
    }

    /// Whether this run is the rebuild of `slot` in `set`.
    pub fn rebuilds(&self, set: &MemberSet, slot: usize) -> bool {
        matches!(&set.rebuilding, Some((s, c)) if *s == slot && self.is(c))
    }

    /// `set`'s replacement, if this run is it.
    pub fn replacement<'a>(&self, set: &'a MemberSet) -> Option<&'a Replacement> {
        set.replacing.as_ref().filter(|r| self.is(&r.cursor))
    }
}

impl PartialEq for Run {
    fn eq(&self, other: &Run) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Run {}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "run@{:p}", Arc::as_ptr(&self.0))
    }
}

/// Member failures reported and recorded on disk, counted. A write that
/// completes while a failure is reported but not yet in the superblocks
/// may have skipped the failed member: it is acknowledged only once the
/// failure is recorded, or a restart could read the member's stale data
/// as current (md holds such writes until its superblock update, too).
#[derive(Default)]
pub struct FailureLedger {
    reported: AtomicU64,
    persisted: AtomicU64,
    changed: Mutex<()>,
    cv: std::sync::Condvar,
}

impl FailureLedger {
    /// Failures reported so far.
    #[inline]
    pub fn reported(&self) -> u64 {
        self.reported.load(Ordering::SeqCst)
    }

    /// Failures recorded on disk so far (all reported ones up to this).
    #[inline]
    pub fn persisted(&self) -> u64 {
        self.persisted.load(Ordering::SeqCst)
    }

    /// Whether a reported failure is not recorded yet.
    #[inline]
    pub fn unpersisted(&self) -> bool {
        self.persisted() < self.reported()
    }

    /// Count `member`'s failure and mark it gone, once: `None` if it was
    /// gone already. Under the ledger's lock, so a recorder that reads
    /// the count and the gone flags together (`consistent`) never sees a
    /// count whose flag is not set yet; and the count rises before the
    /// flag, so a channel that sees the flag sees the count.
    fn report(&self, member: &Member, may_fail: impl FnOnce() -> bool) -> Option<u64> {
        let g = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        if member.is_gone() || !may_fail() {
            return None;
        }
        let seq = self.reported.fetch_add(1, Ordering::SeqCst) + 1;
        member.gone.store(true, Ordering::SeqCst);
        drop(g);
        self.cv.notify_all();
        Some(seq)
    }

    /// Run `f` (which reads gone flags) with no report in between, and
    /// return the count of failures reported as of then with its result:
    /// recording what `f` saw covers every failure up to that count.
    pub fn consistent<R>(&self, f: impl FnOnce() -> R) -> (u64, R) {
        let _g = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        (self.reported(), f())
    }

    /// Every failure up to `seq` is recorded on disk (or needs no record).
    pub fn mark_persisted(&self, seq: u64) {
        self.persisted.fetch_max(seq, Ordering::SeqCst);
        self.wake();
    }

    fn wake(&self) {
        drop(self.changed.lock().unwrap_or_else(|e| e.into_inner()));
        self.cv.notify_all();
    }

    /// Wait up to `timeout` for a failure to record; returns the reported
    /// count when one is waiting.
    pub fn wait_unpersisted(&self, timeout: std::time::Duration) -> Option<u64> {
        let g = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .cv
            .wait_timeout_while(g, timeout, |_| !self.unpersisted())
            .unwrap_or_else(|e| e.into_inner());
        self.unpersisted().then(|| self.reported())
    }
}

/// Where channels send member failures; cloneable into every channel.
#[derive(Clone)]
pub struct FailureSink {
    tx: Arc<Mutex<Option<Sender<Event>>>>,
    ledger: Arc<FailureLedger>,
    /// Events sent so far: the monitor is idle only once it has taken
    /// as many.
    sent: Arc<AtomicU64>,
    /// Made for a monitor (`new`), even once it has closed.
    monitored: bool,
}

impl FailureSink {
    /// Failures go to `tx`.
    pub fn new(tx: Sender<Event>) -> FailureSink {
        FailureSink {
            tx: Arc::new(Mutex::new(Some(tx))),
            ledger: Arc::default(),
            sent: Arc::default(),
            monitored: true,
        }
    }

    /// A sink that drops reports (for devices used without a monitor).
    pub fn none() -> FailureSink {
        FailureSink {
            tx: Arc::new(Mutex::new(None)),
            ledger: Arc::default(),
            sent: Arc::default(),
            monitored: false,
        }
    }

    /// The count of failures reported and recorded.
    pub fn ledger(&self) -> &Arc<FailureLedger> {
        &self.ledger
    }

    /// Events sent to the monitor so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Whether the sink was made for a monitor (which may have closed
    /// since): what only a monitor can record is waited for then.
    pub fn has_monitor(&self) -> bool {
        self.monitored
    }

    /// Whether a monitor receives the reports.
    pub fn is_watched(&self) -> bool {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Stop sending (the monitor is going away): failures then need no
    /// record to be waited for.
    pub fn close(&self) {
        *self.tx.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.ledger.mark_persisted(self.ledger.reported());
    }

    /// Report that `member` (in `slot`) failed. The first report of a
    /// device marks it gone for every core at once, counts the failure
    /// in the ledger and tells the monitor; later ones do nothing. Called
    /// on a reactor, only when an IO has failed.
    pub fn report(&self, slot: usize, member: &Member, error: IoError) {
        self.report_if(slot, member, error, || true);
    }

    /// [`report`](Self::report) the error `slots[slot]` got, unless it is
    /// a media error (a block the device cannot read or write; it still
    /// answers) and the member is the last one in sync: md's RAID1 never
    /// fails its last member in sync, only the request fails, and the
    /// rest of the volume stays readable. Decided under the ledger's lock,
    /// so two cores seeing errors on two mirrors at once fail one at most.
    /// False if the member was kept.
    pub fn report_in(&self, slots: &[Member], slot: usize, error: IoError) -> bool {
        let Some(member) = slots.get(slot) else {
            return false;
        };
        let mut kept = false;
        self.report_if(slot, member, error, || {
            kept = matches!(error, IoError::Media(_))
                && !slots.iter().enumerate().any(|(i, o)| {
                    i != slot && o.state == super::MemberState::InSync && !o.is_gone()
                });
            !kept
        });
        !kept
    }

    fn report_if(&self, slot: usize, member: &Member, error: IoError, may: impl FnOnce() -> bool) {
        member.errors.fetch_add(1, Ordering::Relaxed);
        let Some(seq) = self.ledger.report(member, may) else {
            return;
        };
        let sent = self.event(Event::Failed(MemberFailure {
            member: slot,
            device: device_id(&member.dev),
            error,
        }));
        if !sent {
            // No monitor records it: nothing to wait for.
            self.ledger.mark_persisted(seq);
        }
    }

    /// Tell the monitor about background work (or a failure); false if
    /// no monitor takes it.
    pub fn event(&self, e: Event) -> bool {
        let g = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = g.as_ref() else {
            return false;
        };
        // Counted before it is in the channel (`Monitor::idle`).
        self.sent.fetch_add(1, Ordering::SeqCst);
        let sent = tx.send(e).is_ok();
        if !sent {
            self.sent.fetch_sub(1, Ordering::SeqCst);
        }
        sent
    }
}

/// Completions held until the failures reported before them are recorded
/// (see [`FailureLedger`]). A channel passes every completion through it.
#[derive(Default)]
pub struct HeldCompletions {
    held: std::collections::VecDeque<(u64, Completion)>,
}

impl HeldCompletions {
    /// Move `done` to `out`, holding back what must wait for the ledger.
    /// Returns how many went out.
    #[inline]
    pub fn pass(
        &mut self,
        ledger: &FailureLedger,
        done: &mut Vec<Completion>,
        out: &mut Vec<Completion>,
    ) -> usize {
        if self.held.is_empty() && !ledger.unpersisted() {
            let n = done.len();
            out.append(done);
            return n;
        }
        let need = ledger.reported();
        self.held.extend(done.drain(..).map(|c| (need, c)));
        let persisted = ledger.persisted();
        let mut n = 0;
        while self
            .held
            .front()
            .is_some_and(|(need, _)| *need <= persisted)
        {
            if let Some((_, c)) = self.held.pop_front() {
                out.push(c);
                n += 1;
            }
        }
        n
    }

    /// Completions held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}
