//! `vhostbench`: a vhost-user-blk client (the blkio crate) that drives one
//! backend at a fixed queue depth per queue, 4 KiB random IO, and reports
//! IOPS and the backend's CPU time per IO (from /proc/PID/stat).

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use clap::{Parser, ValueEnum};
use serde_json::json;

#[path = "procstat.rs"]
mod procstat;
use procstat::cpu_ticks;

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Rw {
    Randread,
    Randwrite,
}

#[derive(Parser)]
#[command(about = "Drive a vhost-user-blk socket with 4 KiB random IO and report IOPS")]
struct Args {
    /// The backend's socket.
    #[arg(long)]
    socket: String,
    /// The backend's process id, for its CPU time.
    #[arg(long)]
    backend_pid: i32,
    #[arg(long, value_enum)]
    rw: Rw,
    #[arg(long, default_value_t = 1)]
    queues: usize,
    #[arg(long, default_value_t = 32)]
    qd: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of the same IO before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Core to pin this client to.
    #[arg(long)]
    core: Option<usize>,
    /// Free-form label copied into the output.
    #[arg(long, default_value = "")]
    label: String,
}

fn main() {
    let a = Args::parse();
    match run(&a) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn run(a: &Args) -> Result<serde_json::Value, String> {
    if let Some(core) = a.core {
        core_affinity::set_for_current(core_affinity::CoreId { id: core });
    }
    let e = |e: blkio::Error| e.to_string();
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e)?;
    b.set_str("path", &a.socket).map_err(e)?;
    b.connect().map_err(e)?;
    b.set_i32("num-queues", a.queues as i32).map_err(e)?;
    let capacity = b.get_u64("capacity").map_err(e)?;
    let mut queues = b.start().map_err(e)?.queues;
    let slots = a.queues * a.qd;
    let region = b.alloc_mem_region(slots * 4096).map_err(e)?;
    b.map_mem_region(&region).map_err(e)?;
    let blocks = capacity / 4096;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut submit = |q: &mut blkio::Blkioq, slot: usize| {
        let buf = (region.addr + slot * 4096) as *mut u8;
        let off = (next() % blocks) * 4096;
        match a.rw {
            Rw::Randread => q.read(off, buf, 4096, slot, ReqFlags::empty()),
            Rw::Randwrite => q.write(off, buf, 4096, slot, ReqFlags::empty()),
        }
    };
    for (qi, q) in queues.iter_mut().enumerate() {
        for s in 0..a.qd {
            submit(q, qi * a.qd + s);
        }
    }
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..a.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut ios = 0u64;
    let mut errors = 0u64;
    let mut phase = |secs: f64, ios: &mut u64, errors: &mut u64| -> Result<f64, String> {
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(secs);
        while Instant::now() < end {
            for q in queues.iter_mut() {
                let mut zero = Duration::ZERO;
                let n = q.do_io(&mut comps, 0, Some(&mut zero), None).map_err(e)?;
                for c in &comps[..n] {
                    // SAFETY: do_io initialised n completions.
                    let c = unsafe { c.assume_init_ref() };
                    if c.ret != 0 {
                        *errors += 1;
                    }
                    *ios += 1;
                    submit(q, c.user_data);
                }
            }
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    phase(a.warmup, &mut ios, &mut errors)?;
    ios = 0;
    let cpu0 = cpu_ticks(a.backend_pid)?;
    let elapsed = phase(a.seconds, &mut ios, &mut errors)?;
    let cpu1 = cpu_ticks(a.backend_pid)?;
    let cpu_ns = (cpu1.0 - cpu0.0) as f64 * 1e9 / 100.0;
    let minflt = cpu1.1.saturating_sub(cpu0.1);
    Ok(json!({
        "label": a.label,
        "rw": format!("{:?}", a.rw).to_lowercase(),
        "queues": a.queues,
        "qd": a.qd,
        "iops": ios as f64 / elapsed,
        "ios": ios,
        "errors": errors,
        "backend_cpu_ns_per_io": cpu_ns / ios.max(1) as f64,
        "backend_cpu_cores": cpu_ns / 1e9 / elapsed,
        "backend_minflt_per_io": minflt as f64 / ios.max(1) as f64,
    }))
}
