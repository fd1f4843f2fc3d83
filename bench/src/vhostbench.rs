//! `vhostbench`: a vhost-user-blk client (the blkio crate) that drives one
//! backend at a fixed queue depth per queue, 4 KiB random IO, and reports
//! IOPS and the backend's CPU time per IO (from /proc/PID/stat).

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use clap::Parser;

#[path = "load.rs"]
mod load;
use load::{Load, Rw};

#[derive(Parser)]
#[command(about = "Drive a vhost-user-blk socket with 4 KiB random IO and report IOPS")]
struct Args {
    /// The backend's socket.
    #[arg(long)]
    socket: String,
    #[command(flatten)]
    load: Load,
}

fn main() {
    load::report(run(&Args::parse()));
}

fn run(args: &Args) -> Result<serde_json::Value, String> {
    let a = &args.load;
    a.pin();
    let e = |e: blkio::Error| e.to_string();
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e)?;
    b.set_str("path", &args.socket).map_err(e)?;
    b.connect().map_err(e)?;
    b.set_i32("num-queues", a.queues as i32).map_err(e)?;
    let capacity = b.get_u64("capacity").map_err(e)?;
    let mut queues = b.start().map_err(e)?.queues;
    let slots = a.queues * a.qd;
    let region = b.alloc_mem_region(slots * 4096).map_err(e)?;
    b.map_mem_region(&region).map_err(e)?;
    let blocks = capacity / 4096;
    let mut next = load::offsets();
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
    let phase = |secs: f64, ios: &mut u64, errors: &mut u64| -> Result<f64, String> {
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
    a.measure(phase)
}
