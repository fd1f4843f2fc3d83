//! The NVMe driver's own cost per IO: one channel driven from a plain
//! thread on core 0 against the software controller (storing nothing) on
//! core 1. The controller is the driver's peer here, so what counts is the
//! driver's time inside `submit` and inside `poll` calls that returned
//! completions, per IO; an empty poll is waiting, not work. Each timed call
//! also pays for two clock reads, measured and subtracted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{BlockDevice, Completion, IoOp, IoRequest, IoVec, SgList};
use nvme::soft::{SoftConfig, SoftController};
use nvme::{Controller, Namespace, Options};
use serde_json::json;

fn clock_pair_ns() -> f64 {
    let n = 200_000;
    let t = Instant::now();
    let mut sink = Duration::ZERO;
    for _ in 0..n {
        let a = Instant::now();
        sink += a.elapsed();
    }
    std::hint::black_box(sink);
    t.elapsed().as_nanos() as f64 / n as f64
}

/// `settle`: after submitting, sleep this long before polling, so nearly
/// every poll reaps completions (for counting instructions under callgrind,
/// where an empty poll would be counted as work).
pub fn run(
    write: bool,
    io_bytes: usize,
    qd: usize,
    seconds: f64,
    registered: bool,
    settle: Option<Duration>,
) -> Result<serde_json::Value, String> {
    let bs = if io_bytes < 4096 { 512 } else { 4096 };
    let blocks = (1u64 << 30) / bs as u64;
    let soft = SoftController::start(
        "bench",
        SoftConfig {
            namespaces: vec![(bs as u32, blocks)],
            null_data: true,
            core: Some(1),
            max_queue_entries: 1024,
            ..SoftConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let ctrl = Controller::new(
        soft.transport(),
        Options {
            queue_depth: 256,
            ..Options::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let ns = Arc::new(Namespace::new(&ctrl, 1, "nvme-bench").map_err(|e| e.to_string())?);
    core_affinity::set_for_current(core_affinity::CoreId { id: 0 });
    let mut ch = ns.open_channel().map_err(|e| e.to_string())?;
    let mut mem = memmap2::MmapOptions::new()
        .len((qd * io_bytes).div_ceil(4096) * 4096)
        .populate()
        .map_anon()
        .map_err(|e| e.to_string())?;
    let base = mem.as_mut_ptr();
    if registered {
        // SAFETY: `mem` outlives the channel's IO and is unregistered below.
        unsafe { ctrl.register_memory(base, mem.len()) }.map_err(|e| e.to_string())?;
    }
    let per_io_blocks = (io_bytes / bs) as u64;
    let span = blocks / per_io_blocks;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut free: Vec<usize> = (0..qd).collect();
    let mut out: Vec<Completion> = Vec::with_capacity(qd);
    let (mut ios, mut errors, mut polls, mut empty_polls) = (0u64, 0u64, 0u64, 0u64);
    let (mut t_submit, mut t_poll, mut timed_calls) = (Duration::ZERO, Duration::ZERO, 0u64);
    let t0 = Instant::now();
    let deadline = Duration::from_secs_f64(seconds);
    while t0.elapsed() < deadline {
        while let Some(i) = free.pop() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mut sg = SgList::new();
            // SAFETY: slot i's buffer belongs to request i until it completes.
            sg.push(unsafe { IoVec::new(base.add(i * io_bytes), io_bytes) });
            let req = IoRequest {
                op: if write { IoOp::Write } else { IoOp::Read },
                offset_blocks: (rng % span) * per_io_blocks,
                num_blocks: per_io_blocks,
                sg,
                tag: i as u64,
            };
            let t = Instant::now();
            let r = ch.submit(req);
            t_submit += t.elapsed();
            timed_calls += 1;
            if r.is_err() {
                return Err("channel refused a request at QD below its depth".into());
            }
        }
        if let Some(d) = settle {
            std::thread::sleep(d);
        }
        for _ in 0..64 {
            let t = Instant::now();
            let n = ch.poll(&mut out);
            polls += 1;
            if n > 0 {
                t_poll += t.elapsed();
                timed_calls += 1;
                break;
            }
            empty_polls += 1;
        }
        for c in out.drain(..) {
            ios += 1;
            errors += c.result.is_err() as u64;
            free.push(c.tag as usize);
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    // Drain before unregistering the memory.
    let drain = Instant::now();
    while ch.inflight() > 0 && drain.elapsed() < Duration::from_secs(10) {
        ch.poll(&mut out);
    }
    drop(ch);
    if registered {
        ctrl.unregister_memory(base).map_err(|e| e.to_string())?;
    }
    if errors > 0 {
        return Err(format!("{errors} IOs failed"));
    }
    let clock = clock_pair_ns();
    let raw = (t_submit + t_poll).as_nanos() as f64 / ios.max(1) as f64;
    let net = raw - clock * timed_calls as f64 / ios.max(1) as f64;
    Ok(json!({
        "bench": "nvme-driver",
        "rw": if write { "randwrite" } else { "randread" },
        "io_bytes": io_bytes,
        "qd": qd,
        "registered_memory": registered,
        "bounced_commands": ctrl.bounced_commands(),
        "iops": ios as f64 / elapsed,
        "driver_ns_per_io": net,
        "driver_ns_per_io_raw": raw,
        "clock_pair_ns": clock,
        "submit_ns_per_io": t_submit.as_nanos() as f64 / ios.max(1) as f64,
        "poll_ns_per_io": t_poll.as_nanos() as f64 / ios.max(1) as f64,
        "ios": ios,
        "polls": polls,
        "empty_polls": empty_polls,
        "seconds": elapsed,
    }))
}
