//! `nvmfbench`: an NVMe/TCP host (the project's `nvmf::host`) that drives
//! one subsystem at a fixed queue depth per IO queue, 4 KiB random IO, and
//! reports IOPS and the target's CPU time per IO (from /proc/PID/stat), in
//! the same form as `vhostbench`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use nvme::spec::{io as cmd, Sqe};
use nvmf::host::{Controller, HostConfig, Queue};

#[path = "load.rs"]
mod load;
use load::{Load, Rw};

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
    #[command(flatten)]
    load: Load,
}

fn main() {
    load::report(run(&Args::parse()));
}

fn run(args: &Args) -> Result<serde_json::Value, String> {
    let a = &args.load;
    a.pin();
    let e = |e: nvmf::host::HostError| e.to_string();
    let cfg = HostConfig {
        hostnqn: args.hostnqn.clone(),
        ..Default::default()
    };
    let mut c = Controller::connect(args.addr, &args.nqn, &cfg).map_err(e)?;
    let n = (a.queues - 1) as u32;
    c.set_features(0x07, n | n << 16).map_err(e)?;
    let ns = c.identify(0, 1).map_err(e)?;
    let blocks = u64::from_le_bytes(ns[0..8].try_into().map_err(|_| "identify")?);
    let mut queues: Vec<Queue> = (1..=a.queues as u16)
        .map(|qid| c.io_queue(qid, a.qd as u16 + 1))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let data = vec![0x5au8; 4096];
    let mut next = load::offsets();
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
    // One thread drives every queue in turn: it waits for a completion,
    // takes every other one already received, and sends as many new
    // commands in one write, so QD per queue stays constant and the
    // client pays two system calls per batch, not per IO.
    let phase = |secs: f64, ios: &mut u64, errors: &mut u64| -> Result<f64, String> {
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
    a.measure(phase)
}
