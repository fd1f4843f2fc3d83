//! CHAOS_GDB=FILE (diagnosis of hangs in long runs): a client whose
//! request is unanswered for 8 s gets the daemon's view, the reactors'
//! counters and every thread's stack printed while it still waits;
//! CHAOS_GDB_PY=SCRIPT then runs a gdb Python script (the export queues'
//! state, say). Nothing is asserted here: the run fails on its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use appliance::manager::Manager;
use poller::ReactorSet;

use super::client::Ctl;

/// CHAOS_GDB=FILE: a client whose request is unanswered for 8 s gets
/// the daemon's view and every thread's stack printed while it still
/// waits (diagnosis of hangs in long runs).
pub fn start(
    file: String,
    clients: Vec<(String, Arc<Ctl>)>,
    current: Arc<Mutex<Arc<Manager>>>,
    set: ReactorSet,
) {
    let mut episodes = 0;
    let mut reported = false;
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        let stuck: Vec<&String> = clients
            .iter()
            .filter(|(_, c)| {
                c.busy
                    .lock()
                    .unwrap()
                    .is_some_and(|t| t.elapsed() > Duration::from_secs(8))
            })
            .map(|(n, _)| n)
            .collect();
        if stuck.is_empty() || reported {
            reported &= !stuck.is_empty();
            continue;
        }
        reported = true;
        episodes += 1;
        eprintln!("chaos watchdog: stuck {stuck:?}");
        // Where every thread is in the kernel (io_uring workers included).
        for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let stack = std::fs::read_to_string(t.path().join("stack")).unwrap_or_default();
            let top: Vec<&str> = stack
                .lines()
                .take(8)
                .map(|l| l.trim_start_matches("[<0>] "))
                .collect();
            eprintln!("chaos watchdog: {} {}", comm.trim(), top.join(" < "));
        }
        if episodes > 1 {
            continue;
        }
        // First, while it still hangs: a manager call may be what waits.
        let _ = std::process::Command::new("gdb")
            .args(["-p", &std::process::id().to_string(), "-batch"])
            .args(["-ex", "thread apply all bt 40"])
            .stdout(std::fs::File::create(&file).unwrap())
            .status();
        eprintln!("chaos watchdog: stacks in {file}");
        for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            if stat.contains("reactor") {
                eprintln!(
                    "chaos watchdog: {}",
                    stat.split(' ').take(3).collect::<Vec<_>>().join(" ")
                );
            }
        }
        for _ in 0..2 {
            for core in 0..set.len() {
                eprintln!("chaos watchdog: reactor {core}: {:?}", set.stats(core));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let mgr = current.lock().unwrap().clone();
        for s in mgr.export_stats() {
            eprintln!("chaos watchdog: {s:?}");
        }
        for v in ["r5", "r1", "single"] {
            eprintln!("chaos watchdog: {:?}", mgr.get_volume(v));
        }
        if let Ok(py) = std::env::var("CHAOS_GDB_PY") {
            let _ = std::process::Command::new("gdb")
                .args(["-p", &std::process::id().to_string(), "-batch", "-x", &py])
                .stdout(std::fs::File::create(format!("{file}.py.txt")).unwrap())
                .status();
        }
    });
}
