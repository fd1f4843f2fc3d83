//! `nvmfbench`: an NVMe/TCP host (the project's `nvmf::host`) that drives
//! one subsystem at a fixed queue depth per IO queue, 4 KiB random IO, and
//! reports IOPS and the target's CPU time per IO (from /proc/PID/stat), in
//! the same form as `vhostbench`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use nvme::spec::{io as cmd, Sqe};
use nvmf::host::{Controller, HostConfig, Queue};
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
#[command(about = "Drive an NVMe/TCP subsystem with 4 KiB random IO and report IOPS")]
struct Args {
    /// The target's IP:PORT.
    #[arg(long)]
    addr: SocketAddr,
    /// The subsystem.
    #[arg(long)]
    nqn: String,
    /// This host's NQN.
    #[arg(
        long,
        default_value = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000bead"
    )]
    hostnqn: String,
    /// The target's process id, for its CPU time.
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
    let e = |e: nvmf::host::HostError| e.to_string();
    let cfg = HostConfig {
        hostnqn: a.hostnqn.clone(),
        ..Default::default()
    };
    let mut c = Controller::connect(a.addr, &a.nqn, &cfg).map_err(e)?;
    let n = (a.queues - 1) as u32;
    c.set_features(0x07, n | n << 16).map_err(e)?;
    let ns = c.identify(0, 1).map_err(e)?;
    let blocks = u64::from_le_bytes(ns[0..8].try_into().map_err(|_| "identify")?);
    let mut queues: Vec<Queue> = (1..=a.queues as u16)
        .map(|qid| c.io_queue(qid, a.qd as u16 + 1))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let data = vec![0x5au8; 4096];
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut submit = |q: &mut Queue| {
        let mut s = Sqe::new(
            match a.rw {
                Rw::Randread => cmd::READ,
                Rw::Randwrite => cmd::WRITE,
            },
            1,
        );
        s.set_range(next() % blocks, 1);
        match a.rw {
            Rw::Randread => q.send(s, &[], 4096),
            Rw::Randwrite => q.send(s, &data, 0),
        }
        .map(|_| ())
    };
    for q in queues.iter_mut() {
        for _ in 0..a.qd {
            submit(q).map_err(e)?;
        }
    }
    let mut ios = 0u64;
    let mut errors = 0u64;
    // One thread drives every queue in turn: it waits for a completion,
    // takes every other one already received, and sends as many new
    // commands in one write, so QD per queue stays constant and the
    // client pays two system calls per batch, not per IO.
    let mut phase = |secs: f64, ios: &mut u64, errors: &mut u64| -> Result<f64, String> {
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(secs);
        while Instant::now() < end {
            for q in queues.iter_mut() {
                let mut r = Some(q.recv().map_err(e)?);
                let mut done = 0;
                while let Some(reply) = r {
                    if !reply.status().ok() {
                        *errors += 1;
                    }
                    done += 1;
                    r = q.try_recv().map_err(e)?;
                }
                *ios += done;
                for _ in 0..done {
                    submit(q).map_err(e)?;
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
