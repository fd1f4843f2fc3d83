//! `microbench`: figures for the foundation (reactors, quiesce, devices).
//! Prints one JSON object per measurement on stdout; bench/run.sh turns
//! them into a table in bench/results/.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod nvme_driver;
mod rebuild;
mod resync;

use appliance::stats::{percentile, process_cpu_time};
use appliance::workload::{Workload, WorkloadParams};
use bdev::{BlockDevice, FileDevice, IoChannel, IoOp, IoRequest, IoVec, RamDevice, SgList};
use clap::{Parser, Subcommand, ValueEnum};
use poller::{PollState, QuiesceObject, ReactorConfig, Reactors};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Micro-benchmarks of reactors, the quiesce epoch and devices")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Kind {
    Ram,
    File,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Rw {
    Randread,
    Randwrite,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum RaidRw {
    Randread,
    Randwrite,
    Seqwrite,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cross-core message round trip between two reactors.
    Msg {
        #[arg(long, default_value_t = 200_000)]
        rounds: usize,
    },
    /// Suspend-to-all-acknowledged latency with IO running on every reactor.
    Quiesce {
        #[arg(long, default_value_t = 2)]
        reactors: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// IOPS and CPU per IO of a device at QD 32, 4 KiB, on one reactor.
    Device {
        #[arg(long, value_enum)]
        kind: Kind,
        #[arg(long, value_enum)]
        rw: Rw,
        /// Backing file for --kind file.
        #[arg(long, default_value = "/dev/shm/microbench.img")]
        path: std::path::PathBuf,
        #[arg(long, default_value_t = 256)]
        mib: u64,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// XOR parity throughput against memcpy on the same buffers.
    Xor {
        /// Bytes per source buffer.
        #[arg(long, default_value_t = 65536)]
        size: usize,
        /// Number of sources XORed into one result.
        #[arg(long, default_value_t = 4)]
        sources: usize,
        /// This kernel instead of the one chosen at start (avx512,
        /// avx512vl, avx2, portable).
        #[arg(long)]
        kernel: Option<String>,
    },
    /// A RAID volume over RAM members against one member alone, one
    /// reactor, QD 32: 4 KiB random read/write, or 1 MiB-aligned
    /// sequential full-stripe writes.
    Raid {
        #[arg(long)]
        level: u32,
        #[arg(long, value_enum)]
        rw: RaidRw,
        #[arg(long, default_value_t = 4)]
        members: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// RAID5 only: journal every stripe update (write-through) on a RAM
        /// journal device, checkpointed when half full.
        #[arg(long)]
        journal: bool,
        /// With --journal: write-back (acknowledged once in the journal;
        /// reclaim to the members rides on later writes).
        #[arg(long)]
        write_back: bool,
        /// Random IO over the first this many MiB only (0: everything): a
        /// hot set, where write-back absorbs overwrites.
        #[arg(long, default_value_t = 0)]
        span_mib: u64,
        /// Delay every member completion by this many microseconds (slow
        /// members behind a RAM journal: where write-back pays).
        #[arg(long, default_value_t = 0)]
        member_latency_us: u64,
        /// Keep a write-intent bitmap (64 MiB regions), written by its
        /// daemon thread, as a volume created with --bitmap does.
        #[arg(long)]
        bitmap: bool,
        /// With --journal: the journal is this file (created or
        /// truncated, 512 MiB; removed at the end), not RAM, so its flush
        /// is an fdatasync.
        #[arg(long)]
        journal_file: Option<std::path::PathBuf>,
        /// Members (and the one-member row) are namespaces of the software
        /// NVMe controller, storing nothing, on core 1: the RAID's own
        /// cost over a driver that DMAs in place or bounces. CPU per IO
        /// leaves the controller's thread out.
        #[arg(long)]
        nvme: bool,
    },
    /// Resync after an unclean stop, with and without a write-intent
    /// bitmap: 4 RAM members, random 4 KiB writes over a hot set, then
    /// the time and bytes the resync takes.
    Resync {
        /// Member size.
        #[arg(long, default_value_t = 1024)]
        member_mib: u64,
        /// Bytes of the volume written before the stop.
        #[arg(long, default_value_t = 16)]
        span_mib: u64,
    },
    /// RAID5 journal figures on RAM devices: replay time per GiB of log
    /// (write-through and write-back records), and reclaim throughput (a
    /// full write-back cache drained to the members).
    Journal {
        /// Size of the journal's log.
        #[arg(long, default_value_t = 1024)]
        log_mib: u64,
    },
    /// The NVMe driver's CPU per IO (submit + completion) against the
    /// software controller on another core, one channel, random IO.
    Nvme {
        #[arg(long, value_enum)]
        rw: Rw,
        #[arg(long, default_value_t = 4096)]
        io_bytes: usize,
        #[arg(long, default_value_t = 32)]
        qd: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Register the buffers for direct DMA (else they are bounced).
        #[arg(long)]
        registered: bool,
        /// Sleep this many microseconds after each submission round before
        /// polling (for instruction counts under callgrind).
        #[arg(long)]
        settle_us: Option<u64>,
    },
    /// Rebuild onto a hot spare after a member fails: RAID1 of two and
    /// RAID5 of four over RAM members, idle and under 4 KiB guest IO,
    /// against one member's sequential write bandwidth.
    Rebuild {
        #[arg(long, default_value_t = 256)]
        member_mib: u64,
    },
    /// A single-threaded RAM read loop to count instructions per IO under
    /// `valgrind --tool=callgrind` (run once with --ios 0 for the baseline).
    RamLoop {
        #[arg(long, default_value_t = 100_000)]
        ios: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Msg { rounds } => msg(rounds),
        Cmd::Quiesce { reactors, seconds } => quiesce(reactors, seconds),
        Cmd::Device {
            kind,
            rw,
            path,
            mib,
            seconds,
        } => device(kind, rw, &path, mib, seconds),
        Cmd::RamLoop { ios } => ram_loop(ios),
        Cmd::Nvme {
            rw,
            io_bytes,
            qd,
            seconds,
            registered,
            settle_us,
        } => nvme_driver::run(
            matches!(rw, Rw::Randwrite),
            io_bytes,
            qd,
            seconds,
            registered,
            settle_us.map(Duration::from_micros),
        ),
        Cmd::Journal { log_mib } => journal_bench(log_mib),
        Cmd::Resync {
            member_mib,
            span_mib,
        } => resync::run(member_mib, span_mib),
        Cmd::Rebuild { member_mib } => rebuild::run(member_mib),
        Cmd::Xor {
            size,
            sources,
            kernel,
        } => xor(size, sources, kernel.as_deref()),
        Cmd::Raid {
            level,
            rw,
            members,
            seconds,
            journal,
            write_back,
            span_mib,
            member_latency_us,
            bitmap,
            journal_file,
            nvme,
        } => raid(
            level,
            rw,
            members,
            seconds,
            (journal, write_back, bitmap, nvme),
            (span_mib, member_latency_us, journal_file),
        ),
    };
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn start(count: usize) -> Result<Reactors, String> {
    Reactors::start(ReactorConfig {
        count,
        ..Default::default()
    })
    .map_err(|e| e.to_string())
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

fn msg(rounds: usize) -> Result<serde_json::Value, String> {
    let r = start(2)?;
    let set = r.set().clone();
    let samples = Arc::new(std::sync::Mutex::new(Vec::with_capacity(rounds)));
    let finished = Arc::new(AtomicBool::new(false));
    let (s2, f2) = (samples.clone(), finished.clone());
    set.call(0, Duration::from_secs(5), move |ctx| {
        let pong = Arc::new(AtomicBool::new(true));
        let mut sent_at = Instant::now();
        let mut local = Vec::with_capacity(rounds);
        ctx.add_poller(move |ctx| {
            if !pong.load(Ordering::Acquire) {
                return PollState::Busy;
            }
            if local.len() < rounds + 1 {
                let now = Instant::now();
                local.push(now - sent_at);
                sent_at = now;
                pong.store(false, Ordering::Release);
                let p = pong.clone();
                let sent = ctx.set().send(
                    1,
                    Box::new(move |ctx| {
                        let p2 = p.clone();
                        let _ = ctx
                            .set()
                            .send(0, Box::new(move |_| p2.store(true, Ordering::Release)));
                    }),
                );
                if sent.is_err() {
                    pong.store(true, Ordering::Release);
                }
                return PollState::Busy;
            }
            local.remove(0); // the first sample is not a round trip
            *s2.lock().unwrap_or_else(|e| e.into_inner()) = std::mem::take(&mut local);
            f2.store(true, Ordering::Release);
            PollState::Done
        });
    })?;
    while !finished.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10));
    }
    r.shutdown().map_err(|e| e.to_string())?;
    let mut s = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    let mean = s.iter().sum::<Duration>() / s.len().max(1) as u32;
    Ok(json!({
        "bench": "message_round_trip",
        "rounds": s.len(),
        "mean_us": us(mean),
        "p50_us": us(percentile(&mut s, 50.0)),
        "p99_us": us(percentile(&mut s, 99.0)),
    }))
}

fn quiesce(reactors: usize, seconds: f64) -> Result<serde_json::Value, String> {
    let r = start(reactors)?;
    let dev: Arc<dyn BlockDevice> =
        Arc::new(RamDevice::new("ram", 4096, 16384).map_err(|e| e.to_string())?);
    let obj = QuiesceObject::new(r.set(), "bench-vol", 0u64);
    let w = Workload::start(
        r.set(),
        dev,
        &obj,
        WorkloadParams {
            verify: false,
            read_percent: 50,
            ..Default::default()
        },
    )?;
    let mut samples = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        let g = obj
            .suspend(Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        samples.push(t.elapsed());
        drop(g);
        std::thread::sleep(Duration::from_millis(1));
    }
    let totals = w.stop(Duration::from_secs(10))?;
    r.shutdown().map_err(|e| e.to_string())?;
    if !totals.clean() {
        return Err(format!(
            "IO failed during the quiesce benchmark: {totals:?}"
        ));
    }
    Ok(json!({
        "bench": "quiesce_suspend_to_acked",
        "reactors": reactors,
        "suspends": samples.len(),
        "ios_during": totals.ios,
        "p50_us": us(percentile(&mut samples, 50.0)),
        "p99_us": us(percentile(&mut samples, 99.0)),
        "max_us": us(*samples.iter().max().unwrap_or(&Duration::ZERO)),
    }))
}

fn device(
    kind: Kind,
    rw: Rw,
    path: &std::path::Path,
    mib: u64,
    seconds: f64,
) -> Result<serde_json::Value, String> {
    let bytes = mib << 20;
    let dev: Arc<dyn BlockDevice> = match kind {
        Kind::Ram => {
            let d = RamDevice::new("ram", 4096, bytes / 4096).map_err(|e| e.to_string())?;
            prefill(&d)?;
            Arc::new(d)
        }
        Kind::File => {
            // A fully written file, so reads do not hit holes.
            std::fs::write(path, vec![0xabu8; bytes as usize])
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let d = FileDevice::open(path, 4096).map_err(|e| e.to_string())?;
            if !d.uses_direct_io() {
                eprintln!(
                    "note: {} does not allow O_DIRECT; buffered IO",
                    path.display()
                );
            }
            Arc::new(d)
        }
    };
    let r = start(1)?;
    let obj = QuiesceObject::new(r.set(), "bench-dev", 0u64);
    let busy0 = r.set().stats(0).map_or(0, |s| s.busy_ns);
    let cpu0 = process_cpu_time();
    let t0 = Instant::now();
    let w = Workload::start(
        r.set(),
        dev,
        &obj,
        WorkloadParams {
            queue_depth: 32,
            io_bytes: 4096,
            read_percent: if matches!(rw, Rw::Randread) { 100 } else { 0 },
            verify: false,
            span_bytes: 0,
        },
    )?;
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let totals = w.stop(Duration::from_secs(10))?;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = (process_cpu_time() - cpu0).as_nanos() as f64;
    let busy = r.set().stats(0).map_or(0, |s| s.busy_ns) - busy0;
    r.shutdown().map_err(|e| e.to_string())?;
    if matches!(kind, Kind::File) {
        let _ = std::fs::remove_file(path);
    }
    if !totals.clean() {
        return Err(format!("IO failed: {totals:?}"));
    }
    let ios = totals.ios.max(1) as f64;
    let floor = match kind {
        Kind::Ram => Some(copy_floor_ns(bytes, matches!(rw, Rw::Randread), seconds)),
        Kind::File => None,
    };
    Ok(json!({
        "bench": "device",
        "kind": format!("{kind:?}").to_lowercase(),
        "rw": format!("{rw:?}").to_lowercase(),
        "ios": totals.ios,
        "iops": ios / elapsed,
        "cpu_ns_per_io": cpu / ios,
        "busy_ns_per_io": busy as f64 / ios,
        "plain_copy_ns_per_io": floor,
    }))
}

/// What a plain copy of a random 4 KiB block costs on this machine, out
/// of (or, for writes, into) a touched buffer of `bytes`, to or from 32
/// rotating buffers (the queue depth's): the floor under a RAM device's
/// request, which copies the same way. No prefetch, as a simple loop has.
fn copy_floor_ns(bytes: u64, read: bool, seconds: f64) -> f64 {
    let blocks = (bytes / 4096).max(1) as usize;
    let mut big = vec![0xabu8; blocks * 4096];
    let mut small = vec![0x5au8; 32 * 4096];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let (mut n, t) = (0u64, Instant::now());
    while t.elapsed().as_secs_f64() < seconds {
        for i in 0..1024 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x as usize % blocks) * 4096;
            let buf = (i % 32) * 4096;
            if read {
                small[buf..buf + 4096].copy_from_slice(&big[at..at + 4096]);
            } else {
                big[at..at + 4096].copy_from_slice(&small[buf..buf + 4096]);
            }
        }
        n += 1024;
    }
    std::hint::black_box((&big, &small));
    t.elapsed().as_nanos() as f64 / n as f64
}

/// CPU time of this process's threads named `name` (from /proc; clock
/// ticks, so only good over seconds): a helper thread left out of a figure.
fn thread_cpu_time(name: &str) -> Duration {
    // SAFETY: sysconf reads a constant.
    let tick = 1.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut secs = 0.0;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is the 3rd field,
        // utime and stime the 14th and 15th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            f.get(i - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        secs += (ticks(14) + ticks(15)) * tick;
    }
    Duration::from_secs_f64(secs)
}

fn prefill(d: &RamDevice) -> Result<(), String> {
    let mut ch = d.open_channel().map_err(|e| e.to_string())?;
    let chunk = 1 << 20;
    let mut buf = vec![0xabu8; chunk];
    let blocks = (chunk / 4096) as u64;
    let mut lba = 0;
    while lba < d.info().num_blocks {
        run(ch.as_mut(), IoOp::Write, lba, blocks, &mut buf)?;
        lba += blocks;
    }
    Ok(())
}

fn run(
    ch: &mut dyn IoChannel,
    op: IoOp,
    lba: u64,
    blocks: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    let mut sg = SgList::new();
    // SAFETY: we wait for the completion before touching buf again.
    sg.push(unsafe { IoVec::new(buf.as_mut_ptr(), buf.len()) });
    let req = IoRequest {
        op,
        offset_blocks: lba,
        num_blocks: blocks,
        sg,
        tag: 0,
    };
    ch.submit(req).map_err(|_| "channel busy".to_string())?;
    let mut out = Vec::new();
    while out.is_empty() {
        ch.poll(&mut out);
    }
    out[0].result.map_err(|e| e.to_string())
}

fn ram_loop(ios: u64) -> Result<serde_json::Value, String> {
    let d = RamDevice::new("ram", 4096, 1024).map_err(|e| e.to_string())?;
    prefill(&d)?;
    let mut ch = d.open_channel().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::with_capacity(1);
    let counter = AtomicU64::new(0);
    for i in 0..ios {
        let mut sg = SgList::new();
        // SAFETY: the completion is polled before the next use of buf.
        sg.push(unsafe { IoVec::new(buf.as_mut_ptr(), 4096) });
        let req = IoRequest {
            op: IoOp::Read,
            offset_blocks: (i * 7) % 1024,
            num_blocks: 1,
            sg,
            tag: i,
        };
        if ch.submit(req).is_err() {
            return Err("busy".into());
        }
        out.clear();
        ch.poll(&mut out);
        counter.fetch_add(out.len() as u64, Ordering::Relaxed);
    }
    Ok(json!({"bench": "ram_loop", "ios": counter.load(Ordering::Relaxed)}))
}

fn xor(size: usize, sources: usize, kernel: Option<&str>) -> Result<serde_json::Value, String> {
    use appliance::raid::parity::{calibrate, kernel_name, kernel_named, xor_gen, SizeClass};
    if sources == 0 || size == 0 {
        return Err("need at least one source of at least one byte".into());
    }
    // 64-byte aligned, as the stripe buffers (DMA pages) are: a large
    // Vec sits 16 bytes into its page, and every vector load then spans
    // two cache lines.
    let raw: Vec<Vec<u8>> = (0..=sources).map(|i| vec![i as u8; size + 64]).collect();
    let at = |v: &Vec<u8>| v.as_ptr().align_offset(64);
    let (dst_raw, src_raw) = raw.split_first().ok_or("no buffers")?;
    let srcs: Vec<&[u8]> = src_raw.iter().map(|v| &v[at(v)..at(v) + size]).collect();
    let views = srcs.clone();
    let mut dst_buf = dst_raw.clone();
    let off = at(&dst_buf);
    let dst = &mut dst_buf[off..off + size];
    // Enough rounds for about a second of work at 10 GB/s.
    let rounds = ((10usize << 30) / (size * sources)).clamp(3, 1 << 20);
    // The choice (its calibration) and the lookup are made before the
    // clock starts.
    calibrate();
    let named = match kernel {
        Some(k) => Some(kernel_named(k).ok_or_else(|| format!("this CPU has no XOR kernel {k}"))?),
        None => None,
    };
    let t = Instant::now();
    for _ in 0..rounds {
        match &named {
            Some(k) => k.xor_gen(dst, &views),
            None => xor_gen(dst, &views),
        }
        std::hint::black_box(&dst);
    }
    let xor_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..rounds {
        for s in &srcs {
            dst.copy_from_slice(s);
            std::hint::black_box(&dst);
        }
    }
    let copy_s = t.elapsed().as_secs_f64();
    let bytes = (rounds * size * sources) as f64;
    Ok(json!({
        "bench": "xor",
        "kernel": kernel.unwrap_or(kernel_name(size)),
        "calibration_gbps": SizeClass::ALL
            .iter()
            .map(|&c| {
                let speeds = calibrate()
                    .speeds
                    .iter()
                    .map(|k| (k.name.to_string(), json!(k.bytes_per_sec[c as usize] / 1e9)))
                    .collect::<serde_json::Map<_, _>>();
                (c.label().to_string(), json!(speeds))
            })
            .collect::<serde_json::Map<_, _>>(),
        "size": size,
        "sources": sources,
        "xor_gbps": bytes / xor_s / 1e9,
        "memcpy_gbps": bytes / copy_s / 1e9,
        "ratio": copy_s / xor_s,
    }))
}

fn raid(
    level: u32,
    rw: RaidRw,
    members: usize,
    seconds: f64,
    (journal, write_back, bitmap, nvme): (bool, bool, bool, bool),
    (span_mib, member_latency_us, journal_file): (u64, u64, Option<std::path::PathBuf>),
) -> Result<serde_json::Value, String> {
    use appliance::raid::geometry::Layout;
    use appliance::raid::members::{FailureSink, Member, MemberState};
    use appliance::raid::monitor::RaidDevice;
    use appliance::raid::raid1::Raid1Device;
    use appliance::raid::raid5::Raid5Device;
    let member_blocks = (256u64 << 20) / 4096;
    if nvme && (journal || member_latency_us > 0) {
        return Err("--nvme goes without --journal and --member-latency-us".into());
    }
    // One namespace per member and one for the one-member row.
    let soft = if nvme {
        let soft = nvme::soft::SoftController::start(
            "raid",
            nvme::soft::SoftConfig {
                namespaces: vec![(4096, member_blocks); members + 1],
                null_data: true,
                core: Some(1),
                max_queue_entries: 1024,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let ctrl = nvme::Controller::new(
            soft.transport(),
            nvme::Options {
                queue_depth: 256,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?;
        // The controller first: it shuts down while the device runs.
        Some((ctrl, soft))
    } else {
        None
    };
    let mk = |i: usize| -> Result<Arc<dyn BlockDevice>, String> {
        if let Some((ctrl, _)) = &soft {
            let nsid = (i.min(members) + 1) as u32;
            let ns =
                nvme::Namespace::new(ctrl, nsid, &format!("m{i}")).map_err(|e| e.to_string())?;
            return Ok(Arc::new(ns));
        }
        let d = RamDevice::new(&format!("m{i}"), 4096, member_blocks).map_err(|e| e.to_string())?;
        prefill(&d)?;
        if member_latency_us == 0 {
            return Ok(Arc::new(d));
        }
        let f = bdev::FaultDevice::new(Arc::new(d));
        f.control()
            .set_latency(Duration::from_micros(member_latency_us));
        Ok(Arc::new(f))
    };
    let ms: Vec<Member> = (0..members)
        .map(|i| {
            mk(i).map(|dev| Member {
                dev,
                state: MemberState::InSync,
                write_mostly: false,
                gone: Default::default(),
                errors: Default::default(),
                readd: false,
            })
        })
        .collect::<Result<_, _>>()?;
    let mut journal_handle = None;
    // The bitmap block sits after the superblock's 4 KiB: data from 1 MiB.
    let offset = if bitmap { 256 } else { 0 };
    let volume: Arc<dyn RaidDevice> = match level {
        1 => Arc::new(
            Raid1Device::new("r1", ms, offset, FailureSink::none()).map_err(|e| e.to_string())?,
        ),
        5 => {
            let r5 = Raid5Device::new(
                "r5",
                ms,
                64 << 10,
                Layout::LeftSymmetric,
                offset,
                FailureSink::none(),
            )
            .map_err(|e| e.to_string())?;
            if journal {
                let jdev: Arc<dyn BlockDevice> = match &journal_file {
                    Some(path) => {
                        let f = std::fs::File::create(path)
                            .map_err(|e| format!("creating {}: {e}", path.display()))?;
                        f.set_len(512 << 20)
                            .map_err(|e| format!("sizing {}: {e}", path.display()))?;
                        Arc::new(bdev::FileDevice::open(path, 4096).map_err(|e| e.to_string())?)
                    }
                    None => {
                        let d = RamDevice::new("journal", 4096, (512 << 20) / 4096)
                            .map_err(|e| e.to_string())?;
                        prefill(&d)?;
                        Arc::new(d)
                    }
                };
                use appliance::raid::journal::JournalMode;
                let mode = if write_back {
                    JournalMode::WriteBack
                } else {
                    JournalMode::WriteThrough
                };
                let j = appliance::raid::journal::Journal::format_with(jdev, mode)
                    .map_err(|e| e.to_string())?;
                journal_handle = Some(j.clone());
                Arc::new(r5.with_journal(j))
            } else {
                Arc::new(r5)
            }
        }
        l => return Err(format!("level {l} is not 1 or 5")),
    };
    let mut _bitmap_daemon = None;
    let volume: Arc<dyn BlockDevice> = if bitmap {
        use appliance::raid::bitmap::{self, Bitmap, BitmapDaemon};
        let rows = volume.rows();
        let rpb = bitmap::rows_per_bit(&rows, bitmap::DEFAULT_CHUNK_BYTES);
        let b = Arc::new(Bitmap::new(&rows, rpb, [7; 16]).map_err(|e| e.to_string())?);
        b.set_members(volume.member_devices());
        _bitmap_daemon = Some(BitmapDaemon::start("bench", b.clone()).map_err(|e| e.to_string())?);
        volume.with_member_set(volume.member_set().with_bitmap(Some(b)))
    } else {
        volume
    };
    let single = mk(99)?;
    // One RAM device as large as all the members together: the volume's
    // memory footprint (a larger RAM device is slower by itself: TLB and
    // cache misses), for reads and plain members only.
    let footprint: Option<Arc<dyn BlockDevice>> =
        if matches!(rw, RaidRw::Randread) && member_latency_us == 0 && !nvme {
            let d = RamDevice::new("footprint", 4096, member_blocks * members as u64)
                .map_err(|e| e.to_string())?;
            prefill(&d)?;
            Some(Arc::new(d))
        } else {
            None
        };
    let (read_percent, io_bytes) = match rw {
        RaidRw::Randread => (100, 4096),
        RaidRw::Randwrite => (0, 4096),
        // A full stripe of a 4-member RAID5 with 64 KiB chunks.
        RaidRw::Seqwrite => (0, 64 << 10),
    };
    let io_bytes = if matches!(rw, RaidRw::Seqwrite) && level == 5 {
        (64 << 10) * (members - 1)
    } else {
        io_bytes
    };
    let mut out = serde_json::Map::new();
    let runs: Vec<(&str, Arc<dyn BlockDevice>)> = [("volume", volume), ("one_member", single)]
        .into_iter()
        .chain(footprint.map(|d| ("same_footprint", d)))
        .collect();
    for (label, dev) in runs {
        let r = start(1)?;
        let vol = appliance::volume::Volume::new(r.set(), "bench-raid", dev);
        // The journal's log is reclaimed at checkpoints under the volume's
        // quiesce epoch, as in the daemon.
        let _checkpoints = match (&journal_handle, label) {
            (Some(j), "volume") => Some(appliance::raid::journal::Checkpointer::start(
                j.clone(),
                vol.clone(),
            )),
            _ => None,
        };
        let cpu0 = process_cpu_time().saturating_sub(thread_cpu_time("soft-nvme-raid"));
        let bounced0 = soft.as_ref().map_or(0, |(c, _)| c.bounced_commands());
        let t0 = Instant::now();
        let w = Workload::start_on_volume(
            r.set(),
            &vol,
            WorkloadParams {
                queue_depth: 32,
                io_bytes,
                read_percent,
                verify: false,
                span_bytes: span_mib << 20,
            },
        )?;
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let totals = w.stop(Duration::from_secs(10))?;
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = (process_cpu_time().saturating_sub(thread_cpu_time("soft-nvme-raid")))
            .saturating_sub(cpu0)
            .as_nanos() as f64;
        let bounced = soft.as_ref().map_or(0, |(c, _)| c.bounced_commands()) - bounced0;
        r.shutdown().map_err(|e| e.to_string())?;
        if !totals.clean() {
            return Err(format!("IO failed: {totals:?}"));
        }
        out.insert(
            label.to_string(),
            json!({
                "iops": totals.ios as f64 / elapsed,
                "mb_per_s": totals.ios as f64 * io_bytes as f64 / elapsed / 1e6,
                "cpu_ns_per_io": cpu / totals.ios.max(1) as f64,
                "bounced_per_io": bounced as f64 / totals.ios.max(1) as f64,
            }),
        );
    }
    if let Some(path) = &journal_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(json!({
        "bench": "raid",
        "journal": if journal { if write_back { "write-back" } else { "write-through" } } else { "" },
        "bitmap": bitmap,
        "level": level,
        "members": members,
        "span_mib": span_mib,
        "member_latency_us": member_latency_us,
        "journal_device": if journal_file.is_some() { "file" } else { "ram" },
        "members_on": if nvme { "soft-nvme" } else { "ram" },
        "rw": format!("{rw:?}").to_lowercase(),
        "io_bytes": io_bytes,
        "results": out,
    }))
}

/// Replay and reclaim figures for the RAID5 journal (see `Cmd::Journal`).
fn journal_bench(log_mib: u64) -> Result<serde_json::Value, String> {
    use appliance::raid::geometry::Layout;
    use appliance::raid::journal::{Journal, JournalMode};
    use appliance::raid::members::{FailureSink, Member, MemberState};
    use appliance::raid::raid5::Raid5Device;
    let members: Vec<Arc<dyn BlockDevice>> = (0..4)
        .map(|i| {
            let d = RamDevice::new(&format!("m{i}"), 4096, (256 << 20) / 4096)
                .map_err(|e| e.to_string())?;
            prefill(&d)?;
            Ok(Arc::new(d) as Arc<dyn BlockDevice>)
        })
        .collect::<Result<_, String>>()?;
    let raid = |j: &Arc<Journal>| -> Result<Raid5Device, String> {
        Ok(Raid5Device::new(
            "r5",
            members
                .iter()
                .map(|d| Member {
                    dev: d.clone(),
                    state: MemberState::InSync,
                    write_mostly: false,
                    gone: Default::default(),
                    errors: Default::default(),
                    readd: false,
                })
                .collect(),
            64 << 10,
            Layout::LeftSymmetric,
            0,
            FailureSink::none(),
        )
        .map_err(|e| e.to_string())?
        .with_journal(j.clone()))
    };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut out = serde_json::Map::new();
    for mode in [JournalMode::WriteThrough, JournalMode::WriteBack] {
        // Fill most of the log with 4 KiB random writes (no checkpoints),
        // then time the replay a restart would do.
        let jdev = RamDevice::new("j", 4096, (log_mib + 1) << 8).map_err(|e| e.to_string())?;
        prefill(&jdev)?;
        let jdev: Arc<dyn BlockDevice> = Arc::new(jdev);
        let j = Journal::format_with(jdev.clone(), mode).map_err(|e| e.to_string())?;
        let r5 = raid(&j)?;
        let geo = *r5.geometry();
        let blocks = r5.info().num_blocks;
        let mut ch = r5.open_channel().map_err(|e| e.to_string())?;
        let mut buf = vec![0x5au8; 4096];
        let mut writes = 0u64;
        while j.usage() < 0.6 {
            run(ch.as_mut(), IoOp::Write, next(blocks), 1, &mut buf)?;
            writes += 1;
        }
        let log_bytes = j.usage() * (log_mib << 20) as f64;
        drop(ch);
        drop(r5);
        let slots: Vec<Option<Arc<dyn BlockDevice>>> = members.iter().cloned().map(Some).collect();
        let t = Instant::now();
        let (_, rep) = Journal::replay(jdev, &slots, Some(&geo)).map_err(|e| e.to_string())?;
        let secs = t.elapsed().as_secs_f64();
        out.insert(
            format!("replay_{}", mode.name()),
            json!({
                "writes": writes,
                "log_bytes": log_bytes,
                "records": rep.records,
                "blocks": rep.blocks,
                "seconds": secs,
                "seconds_per_gib_of_log": secs / (log_bytes / (1u64 << 30) as f64),
            }),
        );
    }
    // Reclaim: fill the write-back cache with random 4 KiB blocks, then
    // switch to write-through, which drains it to the members.
    let jdev = RamDevice::new("j", 4096, (log_mib + 1) << 8).map_err(|e| e.to_string())?;
    let j =
        Journal::format_with(Arc::new(jdev), JournalMode::WriteBack).map_err(|e| e.to_string())?;
    let r5: Arc<dyn BlockDevice> = Arc::new(raid(&j)?);
    let blocks = r5.info().num_blocks;
    let reactors = start(1)?;
    let vol = appliance::volume::Volume::new(reactors.set(), "bench-journal", r5.clone());
    let mut ch = r5.open_channel().map_err(|e| e.to_string())?;
    let mut buf = vec![0xa5u8; 4096];
    let cache = j.cache();
    let mut last = 0;
    // Until the cache stops growing (it is full: writes go write-through),
    // or the log is 40 % full (nothing checkpoints it here). Each block is
    // written three times: past a burst, the cache admits only blocks
    // written again, and only while cached blocks get rewritten (see
    // `WriteCache::admit_once`).
    for i in 0.. {
        let b = next(blocks);
        for _ in 0..3 {
            run(ch.as_mut(), IoOp::Write, b, 1, &mut buf)?;
        }
        if i % 4096 == 4095 {
            if cache.len() == last || j.usage() > 0.4 {
                break;
            }
            last = cache.len();
        }
    }
    drop(ch);
    let cached = cache.len();
    let t = Instant::now();
    j.set_mode(JournalMode::WriteThrough, &vol, Duration::from_secs(300))
        .map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    reactors.shutdown().map_err(|e| e.to_string())?;
    out.insert(
        "reclaim".into(),
        json!({
            "blocks": cached,
            "seconds": secs,
            "blocks_per_second": cached as f64 / secs,
            "mb_per_second": cached as f64 * 4096.0 / secs / 1e6,
        }),
    );
    Ok(json!({"bench": "journal", "log_mib": log_mib, "results": out}))
}
