//! Reactor behaviour: messages, back-pressure, timers, idle sleep, panics.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use poller::{current_reactor, PollState, ReactorConfig, ReactorError, Reactors, SendError};

fn start(count: usize) -> Reactors {
    Reactors::start(ReactorConfig {
        count,
        idle_spin: Duration::from_micros(200),
        ..Default::default()
    })
    .expect("start reactors")
}

#[test]
fn messages_run_on_their_reactor_in_order() {
    let r = start(2);
    let (tx, rx) = mpsc::channel();
    for i in 0..100u32 {
        let tx = tx.clone();
        r.set()
            .send_timeout(
                (i % 2) as usize,
                Box::new(move |ctx| tx.send((ctx.index(), current_reactor(), i)).unwrap()),
                Duration::from_secs(5),
            )
            .unwrap();
    }
    let mut last = [None::<u32>; 2];
    for _ in 0..100 {
        let (idx, cur, i) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(idx as u32, i % 2);
        assert_eq!(cur, Some(idx));
        if let Some(prev) = last[idx] {
            assert!(i > prev, "messages to one reactor ran out of order");
        }
        last[idx] = Some(i);
    }
    r.shutdown().unwrap();
}

#[test]
fn a_full_inbox_pushes_back_and_drops_nothing() {
    let r = Reactors::start(ReactorConfig {
        count: 1,
        inbox_capacity: 4,
        ..Default::default()
    })
    .unwrap();
    let (block_tx, block_rx) = mpsc::channel::<()>();
    let ran = Arc::new(AtomicUsize::new(0));
    // Hold the reactor inside a message so the inbox fills up.
    r.set()
        .send(0, Box::new(move |_| block_rx.recv().unwrap()))
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut accepted = 0;
    let mut refused = 0;
    for _ in 0..10 {
        let ran = ran.clone();
        match r.set().send(
            0,
            Box::new(move |_| {
                ran.fetch_add(1, Ordering::SeqCst);
            }),
        ) {
            Ok(()) => accepted += 1,
            Err(SendError::Full(_)) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(accepted, 4, "capacity is 4");
    assert_eq!(refused, 6);
    block_tx.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while ran.load(Ordering::SeqCst) < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(ran.load(Ordering::SeqCst), 4, "every accepted message ran");
    assert!(matches!(
        r.set().send(7, Box::new(|_| {})),
        Err(SendError::NoSuchReactor(7, _))
    ));
    r.shutdown().unwrap();
}

#[test]
fn timers_fire_in_order_and_periodic_ones_stop() {
    let r = start(1);
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    r.set()
        .send(
            0,
            Box::new(move |ctx| {
                let t = tx.clone();
                ctx.after(Duration::from_millis(30), move |_| t.send("late").unwrap());
                let t = tx.clone();
                ctx.after(Duration::from_millis(5), move |_| t.send("early").unwrap());
                let mut n = 0;
                ctx.every(Duration::from_millis(2), move |_| {
                    n += 1;
                    tx2.send("tick").unwrap();
                    n < 3
                });
            }),
        )
        .unwrap();
    let got: Vec<&str> = (0..5)
        .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
        .collect();
    assert_eq!(got.iter().filter(|s| **s == "tick").count(), 3);
    let early = got.iter().position(|s| *s == "early").unwrap();
    assert_eq!(got[4], "late");
    assert!(early < 4);
    assert!(
        rx.recv_timeout(Duration::from_millis(50)).is_err(),
        "periodic timer stopped"
    );
    r.shutdown().unwrap();
}

#[test]
fn pollers_run_until_done() {
    let r = start(1);
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    r.set()
        .send(
            0,
            Box::new(move |ctx| {
                ctx.add_poller(move |_| {
                    if c.fetch_add(1, Ordering::SeqCst) + 1 >= 1000 {
                        PollState::Done
                    } else {
                        PollState::Busy
                    }
                })
            }),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while count.load(Ordering::SeqCst) < 1000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        count.load(Ordering::SeqCst),
        1000,
        "poller removed after Done"
    );
    let left = r
        .set()
        .call(0, Duration::from_secs(5), |ctx| ctx.poller_count())
        .unwrap();
    assert_eq!(left, 0);
    r.shutdown().unwrap();
}

fn cpu_ticks_of_self() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; after the ')' they are 12 and 13.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn idle_reactors_sleep_and_wake_on_messages() {
    let r = start(2);
    std::thread::sleep(Duration::from_millis(100));
    let before = cpu_ticks_of_self();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let ticks = cpu_ticks_of_self() - before;
    let hz = 100.0; // USER_HZ on Linux
    let cpu = ticks as f64 / hz / t0.elapsed().as_secs_f64();
    // Two spinning reactors would show ~200 %; sleeping ones ~0 %.
    assert!(cpu < 0.10, "idle reactors used {:.1} % CPU", cpu * 100.0);
    for core in 0..2 {
        assert!(r.set().stats(core).unwrap().sleeps > 0);
        // A message wakes a sleeping reactor promptly.
        let t = Instant::now();
        let idx = r
            .set()
            .call(core, Duration::from_secs(5), |ctx| ctx.index())
            .unwrap();
        assert_eq!(idx, core);
        assert!(t.elapsed() < Duration::from_secs(1));
    }
    r.shutdown().unwrap();
}

#[test]
fn a_watched_fd_wakes_a_sleeping_reactor() {
    let r = start(1);
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (rfd, wfd) = (fds[0], fds[1]);
    let (tx, rx) = mpsc::channel();
    r.set()
        .send(
            0,
            Box::new(move |ctx| {
                ctx.watch_fd(rfd);
                ctx.add_poller(move |_| {
                    let mut b = [0u8; 1];
                    // The read end is blocking; only read when poll says so.
                    let mut p = libc::pollfd {
                        fd: rfd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    if unsafe { libc::poll(&mut p, 1, 0) } == 1
                        && unsafe { libc::read(rfd, b.as_mut_ptr().cast(), 1) } == 1
                    {
                        tx.send(b[0]).unwrap();
                        return PollState::Done;
                    }
                    PollState::Idle
                });
            }),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let sleeps = r.set().stats(0).unwrap().sleeps;
    assert!(sleeps > 0, "reactor went to sleep");
    assert_eq!(unsafe { libc::write(wfd, b"x".as_ptr().cast(), 1) }, 1);
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), b'x');
    r.shutdown().unwrap();
    unsafe {
        libc::close(rfd);
        libc::close(wfd);
    }
}

#[test]
fn a_panicking_reactor_stops_the_set_with_context() {
    let r = start(2);
    r.set()
        .send(1, Box::new(|_| panic!("disk on fire")))
        .unwrap();
    assert!(r.set().wait_stopped(Duration::from_secs(5)), "set stopped");
    match r.shutdown() {
        Err(ReactorError::Panicked { core, message }) => {
            assert_eq!(core, 1);
            assert!(message.contains("disk on fire"));
        }
        other => panic!("expected a panic report, got {other:?}"),
    }
}

#[test]
fn more_reactors_than_cores_run_unpinned() {
    let cores = core_count();
    let r = start(cores + 2);
    for core in 0..cores + 2 {
        let got = r
            .set()
            .call(core, Duration::from_secs(5), |ctx| ctx.index())
            .unwrap();
        assert_eq!(got, core);
        assert_eq!(r.set().stats(core).unwrap().pinned_core, None);
    }
    r.shutdown().unwrap();
    let r = start(1);
    r.set().call(0, Duration::from_secs(5), |_| ()).unwrap();
    assert!(
        r.set().stats(0).unwrap().pinned_core.is_some(),
        "one reactor is pinned"
    );
    r.shutdown().unwrap();
}

#[test]
fn bad_configs_are_refused() {
    let e = Reactors::start(ReactorConfig {
        count: 0,
        ..Default::default()
    });
    assert!(matches!(e, Err(ReactorError::InvalidConfig(_))));
    let e = Reactors::start(ReactorConfig {
        inbox_capacity: 0,
        ..Default::default()
    });
    assert!(matches!(e, Err(ReactorError::InvalidConfig(_))));
}

fn core_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A call the reactor takes too late is never run: a reactor held inside
/// a message until the test lets it go takes the call only after its
/// caller gave up.
#[test]
fn a_call_taken_too_late_never_runs() {
    let r = start(1);
    let (block_tx, block_rx) = mpsc::channel::<()>();
    let (held_tx, held_rx) = mpsc::channel::<()>();
    r.set()
        .send(
            0,
            Box::new(move |_| {
                held_tx.send(()).unwrap();
                block_rx.recv().unwrap();
            }),
        )
        .unwrap();
    held_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let r2 = ran.clone();
    let e = r
        .set()
        .call_unless_late(0, Duration::from_millis(100), move |_| {
            r2.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap_err();
    assert!(e.contains("will not run"), "{e}");
    block_tx.send(()).unwrap();
    // Anything sent after it runs after it: once this answers, the late
    // call had its turn.
    r.set().call(0, Duration::from_secs(30), |_| ()).unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the late call ran");
    // On time, it runs and answers.
    let ran2 = ran.clone();
    let v = r
        .set()
        .call_unless_late(0, Duration::from_secs(30), move |_| {
            ran2.fetch_add(1, Ordering::SeqCst);
            7
        })
        .unwrap();
    assert_eq!((v, ran.load(Ordering::SeqCst)), (7, 1));
    r.shutdown().unwrap();
}
