//! The quiesce epoch under load: no IO ever runs across a configuration
//! change, none is lost, failed or reordered, and deadlines change nothing.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use poller::{
    Admission, Ctx, Domain, LocalGate, PollState, QuiesceError, QuiesceObject, ReactorConfig,
    Reactors, ReconfigureError,
};
use rand::{Rng, SeedableRng};

/// The configuration an IO reads: a generation stamp checked at both ends.
#[derive(Debug)]
struct Layout {
    stamp: u64,
}

#[derive(Default)]
struct Checks {
    inflight: AtomicI64,
    started: AtomicU64,
    completed: AtomicU64,
    violations: AtomicU64,
    removed_failures: AtomicU64,
    changing: AtomicBool,
}

struct Io {
    seq: u64,
    generation: u64,
    stamp: u64,
    polls_left: u32,
}

struct Worker {
    gate: LocalGate<Layout>,
    checks: Arc<Checks>,
    inflight: VecDeque<Io>,
    next_seq: u64,
    last_started_seq: Option<u64>,
    budget: u64,
    rng: rand::rngs::SmallRng,
}

impl Worker {
    fn start(&mut self, seq: u64) {
        let (generation, layout) = self.gate.config();
        if self.checks.changing.load(Ordering::SeqCst) {
            self.checks.violations.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(prev) = self.last_started_seq {
            if seq != prev + 1 {
                self.checks.violations.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.last_started_seq = Some(seq);
        self.checks.inflight.fetch_add(1, Ordering::SeqCst);
        self.checks.started.fetch_add(1, Ordering::SeqCst);
        self.inflight.push_back(Io {
            seq,
            generation,
            stamp: layout.stamp,
            polls_left: self.rng.gen_range(0..4),
        });
    }
}

fn spawn_worker(ctx: &mut Ctx, obj: &QuiesceObject<Layout>, checks: Arc<Checks>, budget: u64) {
    let gate = match obj.local(ctx) {
        Ok(g) => g,
        Err(_) => return,
    };
    let w = Rc::new(RefCell::new(Worker {
        gate,
        checks,
        inflight: VecDeque::new(),
        next_seq: 0,
        last_started_seq: None,
        budget,
        rng: rand::rngs::SmallRng::seed_from_u64(ctx.index() as u64),
    }));
    ctx.add_poller(move |ctx| poll_worker(ctx, &w));
}

fn poll_worker(ctx: &mut Ctx, w: &Rc<RefCell<Worker>>) -> PollState {
    let mut me = w.borrow_mut();
    // Complete IO whose time has come.
    let mut i = 0;
    while i < me.inflight.len() {
        if me.inflight[i].polls_left == 0 {
            let io = me.inflight.remove(i).unwrap();
            let (generation, layout) = me.gate.config();
            if generation != io.generation || layout.stamp != io.stamp || layout.stamp != generation
            {
                me.checks.violations.fetch_add(1, Ordering::SeqCst);
            }
            if me.checks.changing.load(Ordering::SeqCst) {
                me.checks.violations.fetch_add(1, Ordering::SeqCst);
            }
            me.checks.inflight.fetch_sub(1, Ordering::SeqCst);
            me.checks.completed.fetch_add(1, Ordering::SeqCst);
            me.gate.end();
            let _ = io.seq;
        } else {
            me.inflight[i].polls_left -= 1;
            i += 1;
        }
    }
    // Issue new IO up to queue depth 8.
    while me.budget > 0 && me.inflight.len() < 8 {
        me.budget -= 1;
        let seq = me.next_seq;
        me.next_seq += 1;
        if me.gate.try_begin() {
            me.start(seq);
        } else {
            let w2 = w.clone();
            let gate = me.gate.clone();
            drop(me);
            gate.park(ctx, move |_, admission| {
                let mut me = w2.borrow_mut();
                match admission {
                    Admission::Admitted => me.start(seq),
                    Admission::Removed => {
                        me.checks.removed_failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
            me = w.borrow_mut();
            break;
        }
    }
    if me.budget == 0 && me.inflight.is_empty() && me.gate.parked() == 0 {
        PollState::Done
    } else {
        PollState::Busy
    }
}

fn reactors(n: usize) -> Reactors {
    Reactors::start(ReactorConfig {
        count: n,
        idle_spin: Duration::from_millis(1),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn reconfiguration_never_overlaps_io_and_loses_nothing() {
    let r = reactors(2);
    let obj = QuiesceObject::new(r.set(), "vol0", Layout { stamp: 1 });
    let checks = Arc::new(Checks::default());
    let budget = 200_000u64;
    for core in 0..2 {
        let (o, c) = (obj.clone(), checks.clone());
        r.set()
            .call(core, Duration::from_secs(5), move |ctx| {
                spawn_worker(ctx, &o, c, budget)
            })
            .unwrap();
    }
    let changes = Arc::new(AtomicU64::new(0));
    let expiries = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let (obj, checks, changes, expiries) = (
                obj.clone(),
                checks.clone(),
                changes.clone(),
                expiries.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(t);
                for i in 0..1000 {
                    let timeout = if rng.gen_ratio(1, 5) {
                        Duration::ZERO
                    } else {
                        Duration::from_secs(10)
                    };
                    // Nesting: sometimes hold an outer suspend around the change.
                    let outer = if i % 7 == 0 {
                        obj.suspend(Duration::from_secs(10)).ok()
                    } else {
                        None
                    };
                    let before = obj.config();
                    let res = obj.reconfigure(timeout, |cur: &Layout| {
                        checks.changing.store(true, Ordering::SeqCst);
                        if checks.inflight.load(Ordering::SeqCst) != 0 {
                            checks.violations.fetch_add(1, Ordering::SeqCst);
                        }
                        std::thread::yield_now();
                        checks.changing.store(false, Ordering::SeqCst);
                        Ok::<_, ()>((
                            Layout {
                                stamp: cur.stamp + 1,
                            },
                            (),
                        ))
                    });
                    match res {
                        Ok(()) => {
                            changes.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(ReconfigureError::Quiesce(QuiesceError::DeadlineExceeded {
                            ..
                        })) => {
                            expiries.fetch_add(1, Ordering::SeqCst);
                            // Nothing changed by this call; others may have.
                            assert!(obj.config().0 >= before.0);
                        }
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                    drop(outer);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Let the workers finish their budget.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while checks.completed.load(Ordering::SeqCst) < 2 * budget
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (generation, layout) = obj.config();
    println!(
        "changes {} expiries {} generation {} completed {}",
        changes.load(Ordering::SeqCst),
        expiries.load(Ordering::SeqCst),
        generation,
        checks.completed.load(Ordering::SeqCst)
    );
    assert_eq!(checks.violations.load(Ordering::SeqCst), 0);
    assert_eq!(
        checks.completed.load(Ordering::SeqCst),
        2 * budget,
        "no IO lost"
    );
    assert_eq!(checks.started.load(Ordering::SeqCst), 2 * budget);
    assert_eq!(checks.removed_failures.load(Ordering::SeqCst), 0);
    assert_eq!(generation, 1 + changes.load(Ordering::SeqCst));
    assert_eq!(layout.stamp, generation);
    assert!(
        changes.load(Ordering::SeqCst) > 1000,
        "most changes went through"
    );
    r.shutdown().unwrap();
}

#[test]
fn a_deadline_expiry_changes_nothing_and_names_the_stuck_reactor() {
    let r = reactors(2);
    let obj = QuiesceObject::new(r.set(), "vol-stuck", Layout { stamp: 1 });
    // Reactor 1 starts an IO and never ends it.
    let o = obj.clone();
    r.set()
        .call(1, Duration::from_secs(5), move |ctx| {
            let g = o.local(ctx).unwrap();
            assert!(g.try_begin());
            std::mem::forget(g);
        })
        .unwrap();
    let res = obj.reconfigure(Duration::from_millis(100), |_| {
        Ok::<_, ()>((Layout { stamp: 99 }, ()))
    });
    match res {
        Err(ReconfigureError::Quiesce(QuiesceError::DeadlineExceeded {
            pending, name, ..
        })) => {
            assert_eq!(pending, vec![1]);
            assert_eq!(name, "vol-stuck");
        }
        other => panic!("expected a deadline error, got {other:?}"),
    }
    assert_eq!(obj.config().0, 1);
    assert_eq!(obj.config().1.stamp, 1);
    // Released: new IO on reactor 0 is admitted again.
    let o = obj.clone();
    let admitted = r
        .set()
        .call(0, Duration::from_secs(5), move |ctx| {
            o.local(ctx).unwrap().try_begin()
        })
        .unwrap();
    assert!(admitted, "the object was resumed after the deadline");
    r.shutdown().unwrap();
}

#[test]
fn suspend_from_a_reactor_is_an_error_not_a_deadlock() {
    let r = reactors(1);
    let obj = QuiesceObject::new(r.set(), "vol1", Layout { stamp: 1 });
    let res = r
        .set()
        .call(0, Duration::from_secs(5), move |_| {
            obj.suspend(Duration::from_secs(5)).map(|_| ())
        })
        .unwrap();
    assert_eq!(res, Err(QuiesceError::OnReactor("vol1".into(), 0)));
    r.shutdown().unwrap();
}

#[test]
fn parked_io_waits_in_order_and_resumes_under_the_new_generation() {
    let r = reactors(1);
    let obj = QuiesceObject::new(r.set(), "vol2", Layout { stamp: 1 });
    let guard = obj.suspend(Duration::from_secs(5)).unwrap();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (o, l) = (obj.clone(), log.clone());
    r.set()
        .call(0, Duration::from_secs(5), move |ctx| {
            let g = o.local(ctx).unwrap();
            assert!(
                g.is_suspended(),
                "a gate made under a suspend starts closed"
            );
            for i in 0..5 {
                assert!(!g.try_begin(), "suspended gate admits nothing");
                let (l, g2) = (l.clone(), g.clone());
                g.park(ctx, move |_, a| {
                    assert_eq!(a, Admission::Admitted);
                    l.lock()
                        .unwrap()
                        .push((i, g2.generation(), g2.is_suspended()));
                    g2.end();
                });
            }
        })
        .unwrap();
    assert!(
        log.lock().unwrap().is_empty(),
        "nothing ran while suspended"
    );
    // Change under the outer suspend (nested), then release both.
    obj.reconfigure(Duration::from_secs(5), |_| {
        Ok::<_, ()>((Layout { stamp: 2 }, ()))
    })
    .unwrap();
    assert!(
        log.lock().unwrap().is_empty(),
        "still suspended by the outer guard"
    );
    drop(guard);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while log.lock().unwrap().len() < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        *log.lock().unwrap(),
        (0..5).map(|i| (i, 2, false)).collect::<Vec<_>>()
    );
    r.shutdown().unwrap();
}

#[test]
fn rejected_changes_publish_nothing() {
    let r = reactors(1);
    let obj = QuiesceObject::new(r.set(), "vol3", Layout { stamp: 1 });
    let res = obj.reconfigure(Duration::from_secs(5), |_| {
        Err::<(Layout, ()), _>("bad member")
    });
    assert!(matches!(res, Err(ReconfigureError::Rejected("bad member"))));
    assert_eq!(obj.config().0, 1);
    // And the object is not left suspended.
    obj.reconfigure(Duration::from_secs(5), |_| {
        Ok::<_, ()>((Layout { stamp: 2 }, ()))
    })
    .unwrap();
    assert_eq!(obj.config().0, 2);
    r.shutdown().unwrap();
}

#[test]
fn suspend_races_removal_without_crashing() {
    for round in 0..20 {
        let r = reactors(2);
        let domain = Arc::new(Domain::new(r.set()));
        let name = format!("vol-{round}");
        let obj = domain.create(&name, Layout { stamp: 1 }).unwrap();
        let checks = Arc::new(Checks::default());
        for core in 0..2 {
            let (o, c) = (obj.clone(), checks.clone());
            r.set()
                .call(core, Duration::from_secs(5), move |ctx| {
                    spawn_worker(ctx, &o, c, 50_000)
                })
                .unwrap();
        }
        let barrier = Arc::new(Barrier::new(4));
        let mut threads = Vec::new();
        for t in 0..3 {
            let (domain, name, obj, barrier) =
                (domain.clone(), name.clone(), obj.clone(), barrier.clone());
            threads.push(std::thread::spawn(move || {
                barrier.wait();
                let mut ok = 0;
                for _ in 0..200 {
                    let res = if t == 0 {
                        domain.suspend(&name, Duration::from_secs(10)).map(drop)
                    } else {
                        obj.reconfigure(Duration::from_secs(10), |c: &Layout| {
                            Ok::<_, ()>((Layout { stamp: c.stamp + 1 }, ()))
                        })
                        .map_err(|e| match e {
                            ReconfigureError::Quiesce(q) => q,
                            ReconfigureError::Rejected(()) => unreachable!(),
                        })
                    };
                    match res {
                        Ok(()) => ok += 1,
                        Err(QuiesceError::NotFound(n)) => assert_eq!(n, name),
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                ok
            }));
        }
        barrier.wait();
        std::thread::sleep(Duration::from_micros(200 * round));
        domain.remove(&name, Duration::from_secs(10)).unwrap();
        for t in threads {
            t.join().unwrap();
        }
        // Gone for good: every later call is a clear NotFound.
        assert!(matches!(
            domain.suspend(&name, Duration::from_secs(1)),
            Err(QuiesceError::NotFound(_))
        ));
        assert!(matches!(
            obj.suspend(Duration::from_secs(1)),
            Err(QuiesceError::NotFound(_))
        ));
        assert!(matches!(
            domain.remove(&name, Duration::from_secs(1)),
            Err(QuiesceError::NotFound(_))
        ));
        assert!(matches!(
            domain.get::<Layout>(&name),
            Err(QuiesceError::NotFound(_))
        ));
        assert_eq!(checks.violations.load(Ordering::SeqCst), 0);
        // Every issued IO either completed or was failed as removed.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let done = checks.completed.load(Ordering::SeqCst)
                + checks.removed_failures.load(Ordering::SeqCst);
            let issued_all = r
                .set()
                .call(0, Duration::from_secs(5), |ctx| ctx.poller_count())
                .unwrap()
                + r.set()
                    .call(1, Duration::from_secs(5), |ctx| ctx.poller_count())
                    .unwrap();
            if issued_all == 0 {
                assert!(done > 0);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "workers did not finish"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(checks.inflight.load(Ordering::SeqCst), 0);
        r.shutdown().unwrap();
    }
}

#[test]
fn domain_refuses_duplicates_and_unknown_names() {
    let r = reactors(1);
    let d = Domain::new(r.set());
    d.create("a", Layout { stamp: 1 }).unwrap();
    assert_eq!(
        d.create("a", Layout { stamp: 1 }).err(),
        Some(QuiesceError::AlreadyExists("a".into()))
    );
    assert!(matches!(
        d.suspend("nope", Duration::from_secs(1)),
        Err(QuiesceError::NotFound(_))
    ));
    assert!(matches!(d.get::<u32>("a"), Err(QuiesceError::WrongType(_))));
    assert_eq!(d.names(), vec!["a".to_string()]);
    r.shutdown().unwrap();
}

#[test]
fn suspend_waits_are_counted_in_the_histogram() {
    let r = reactors(2);
    let obj = QuiesceObject::new(r.set(), "vol-h", Layout { stamp: 1 });
    for _ in 0..5 {
        drop(obj.suspend(Duration::from_secs(5)).unwrap());
    }
    let s = obj.stats();
    assert_eq!(s.suspends, 5);
    assert_eq!(s.wait_hist.iter().sum::<u64>(), 5, "{s:?}");
    // The longest wait sits in the last bucket holding any, or below it.
    let last = s.wait_hist.iter().rposition(|&n| n > 0).unwrap();
    assert!(s.wait_ns_max / 1000 < 1u64 << last || last == s.wait_hist.len() - 1);
    r.shutdown().unwrap();
}
