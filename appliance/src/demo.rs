//! The demo on an embedded default: a RAM-backed RAID5 with a hot spare,
//! exported over vhost-user-blk and driven by a real vhost-user-blk client
//! (the blkio crate). A member fails mid-run; the spare is rebuilt while
//! the client keeps writing and verifying; at the end every block the
//! client wrote is read back and checked.

use std::io::Write;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::FaultDevice;
use blkio::{Blkio, Completion, ReqFlags};
use poller::{ReactorConfig, Reactors};

use crate::config::{DeviceDecl, ExportDecl, VolumeDecl};
use crate::manager::{Manager, MgmtError};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Reactor threads.
    pub reactors: usize,
    /// Size of each RAID member in MiB.
    pub member_mib: u64,
    /// Seconds of client IO before the member fails.
    pub before_failure: f64,
    /// Where the export listens.
    pub socket: PathBuf,
    /// Member device specifications (3 or more); empty: four RAM members.
    pub members: Vec<String>,
    /// The hot spare's specification; None: a RAM spare.
    pub spare: Option<String>,
    /// Pull a member after `before_failure` seconds. False: a member is
    /// expected to fail on its own (a real device made to fail).
    pub pull: bool,
}

/// What the demo saw.
#[derive(Debug, Clone, Default)]
pub struct DemoReport {
    /// Client requests completed.
    pub ios: u64,
    /// Client reads whose data was checked.
    pub verified: u64,
    /// Reads that returned the wrong data (must be 0).
    pub mismatches: u64,
    /// Requests that failed (must be 0).
    pub errors: u64,
    /// Seconds the rebuild took.
    pub rebuild_secs: f64,
    /// Member states at the end ("in_sync", ...).
    pub states: Vec<String>,
    /// Client IOPS over the run.
    pub iops: f64,
}

impl DemoReport {
    /// Whether the demo showed what it should.
    pub fn passed(&self) -> bool {
        self.errors == 0
            && self.mismatches == 0
            && self.verified > 0
            && !self.states.is_empty()
            && self.states.iter().all(|s| s == "in_sync")
    }
}

struct Client {
    stop: Arc<AtomicBool>,
    verify_all: Arc<AtomicBool>,
    ios: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<(u64, u64, u64), String>>,
}

/// 4 KiB blocks the client writes: a (block, version) pattern.
fn fill(buf: &mut [u8], block: u64, version: u32) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = (block << 24) ^ ((version as u64) << 8) ^ i as u64;
        w.copy_from_slice(&v.to_le_bytes());
    }
}

fn start_client(socket: &Path, blocks: u64) -> Result<Client, String> {
    let e = |e: blkio::Error| format!("blkio: {e}");
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e)?;
    b.set_str("path", &socket.display().to_string())
        .map_err(e)?;
    b.connect().map_err(e)?;
    b.set_i32("num-queues", 1).map_err(e)?;
    let mut q = b.start().map_err(e)?.queues.pop().ok_or("no queue")?;
    const QD: usize = 16;
    let region = b.alloc_mem_region(QD * 4096).map_err(e)?;
    b.map_mem_region(&region).map_err(e)?;
    let stop = Arc::new(AtomicBool::new(false));
    let verify_all = Arc::new(AtomicBool::new(false));
    let ios = Arc::new(AtomicU64::new(0));
    let (s, v, n) = (stop.clone(), verify_all.clone(), ios.clone());
    let thread = std::thread::spawn(move || -> Result<(u64, u64, u64), String> {
        let _keep = b;
        let mut versions = vec![0u32; blocks as usize];
        let mut busy = vec![false; blocks as usize];
        let mut slots: Vec<Option<(u64, bool, u32)>> = vec![None; QD];
        let mut rng = 0x1234_5678_9abc_def1u64;
        let (mut verified, mut mismatches, mut errors) = (0u64, 0u64, 0u64);
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..QD).map(|_| MaybeUninit::uninit()).collect();
        let mut sweep: Option<u64> = None;
        loop {
            let stopping = s.load(Ordering::SeqCst);
            if v.load(Ordering::SeqCst) && sweep.is_none() {
                sweep = Some(0);
            }
            // Fill free slots.
            for (i, slot) in slots.iter_mut().enumerate() {
                if slot.is_some() || stopping {
                    continue;
                }
                let (block, write) = match sweep.as_mut() {
                    Some(next) => {
                        // Final pass: read every block that was written.
                        while *next < blocks
                            && (versions[*next as usize] == 0 || busy[*next as usize])
                        {
                            *next += 1;
                        }
                        if *next >= blocks {
                            continue;
                        }
                        *next += 1;
                        (*next - 1, false)
                    }
                    None => {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let block = rng % blocks;
                        if busy[block as usize] {
                            continue;
                        }
                        (block, !rng.is_multiple_of(3))
                    }
                };
                busy[block as usize] = true;
                let buf = (region.addr + i * 4096) as *mut u8;
                if write {
                    let version = versions[block as usize] + 1;
                    // SAFETY: slot i's buffer is ours until its completion.
                    fill(
                        unsafe { std::slice::from_raw_parts_mut(buf, 4096) },
                        block,
                        version,
                    );
                    q.write(block * 4096, buf, 4096, i, ReqFlags::empty());
                    *slot = Some((block, true, version));
                } else {
                    q.read(block * 4096, buf, 4096, i, ReqFlags::empty());
                    *slot = Some((block, false, versions[block as usize]));
                }
            }
            if slots.iter().all(|x| x.is_none()) {
                if stopping || sweep.is_some_and(|n| n >= blocks) {
                    break;
                }
                continue;
            }
            let mut timeout = Duration::from_secs(30);
            let got = q
                .do_io(&mut comps, 1, Some(&mut timeout), None)
                .map_err(|e| format!("blkio: {e}"))?;
            if got == 0 {
                return Err("the export stopped answering".into());
            }
            for c in &comps[..got] {
                // SAFETY: do_io initialised `got` completions.
                let c = unsafe { c.assume_init_ref() };
                let i = c.user_data;
                let Some((block, write, version)) = slots.get_mut(i).and_then(|x| x.take()) else {
                    continue;
                };
                busy[block as usize] = false;
                n.fetch_add(1, Ordering::Relaxed);
                if c.ret != 0 {
                    errors += 1;
                    continue;
                }
                if write {
                    versions[block as usize] = version;
                } else if version > 0 {
                    let mut want = vec![0u8; 4096];
                    fill(&mut want, block, version);
                    // SAFETY: as above.
                    let got = unsafe {
                        std::slice::from_raw_parts((region.addr + i * 4096) as *const u8, 4096)
                    };
                    verified += 1;
                    if got != want.as_slice() {
                        mismatches += 1;
                    }
                }
            }
        }
        Ok((verified, mismatches, errors))
    });
    Ok(Client {
        stop,
        verify_all,
        ios,
        thread,
    })
}

/// What stays up after the demo (for `--keep`): the volume and its export
/// live in a [`Manager`], so `applctl` can drive them over the API.
pub struct Running {
    /// The reactors.
    pub reactors: Reactors,
    /// Devices, the volume and its export.
    pub manager: Arc<Manager>,
}

/// Run the demo, printing as it goes. Everything goes through the
/// [`Manager`], as an operator's calls would.
pub fn run(opts: &DemoOptions, out: &mut dyn Write) -> Result<(DemoReport, Running), String> {
    let reactors = Reactors::start(ReactorConfig {
        count: opts.reactors,
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    let mgr = Arc::new(Manager::new(reactors.set(), None));
    match setup(&mgr, opts, out) {
        Ok(report) => Ok((
            report,
            Running {
                reactors,
                manager: mgr,
            },
        )),
        Err(e) => {
            mgr.shutdown_without_saving();
            let _ = reactors.shutdown();
            Err(e)
        }
    }
}

fn setup(mgr: &Manager, opts: &DemoOptions, out: &mut dyn Write) -> Result<DemoReport, String> {
    let e = |e: MgmtError| e.to_string();
    let decl = |name: &str, spec: String| DeviceDecl {
        name: name.into(),
        spec,
        block_size: 4096,
    };
    let ram = |mib: u64| format!("ram:{mib}M");
    let member_specs: Vec<String> = if opts.members.is_empty() {
        (0..4).map(|_| ram(opts.member_mib + 1)).collect()
    } else {
        opts.members.clone()
    };
    if member_specs.len() < 3 {
        return Err(format!(
            "a RAID5 needs 3 or more members, {} given",
            member_specs.len()
        ));
    }
    let prefix = if opts.members.is_empty() { "ram" } else { "m" };
    let names: Vec<String> = (0..member_specs.len())
        .map(|i| format!("{prefix}{i}"))
        .collect();
    // Members sit behind fault injectors, so one can be pulled as a dying
    // disk would be (a real IO failure, not an operator's `fail`).
    let mut faults: Vec<Arc<FaultDevice>> = Vec::new();
    for (name, spec) in names.iter().zip(&member_specs) {
        mgr.attach_device_wrapped(decl(name, spec.clone()), |d| {
            let f = Arc::new(FaultDevice::new(d));
            faults.push(f.clone());
            f
        })
        .map_err(e)?;
    }
    let spare_name = if opts.members.is_empty() {
        "ram-spare"
    } else {
        "spare"
    };
    let spare_spec = opts
        .spare
        .clone()
        .unwrap_or_else(|| ram(opts.member_mib + 1));
    mgr.attach_device(decl(spare_name, spare_spec.clone()))
        .map_err(e)?;
    mgr.attach_device(decl("ram-journal", ram(64))).map_err(e)?;
    let v = mgr
        .create_volume(
            VolumeDecl {
                members: names.clone(),
                spares: vec![spare_name.into()],
                journal: Some("ram-journal".into()),
                journal_mode: "write-back".into(),
                ..VolumeDecl::new("demo", "raid5", &[])
            },
            true,
        )
        .map_err(e)?;
    mgr.create_export(ExportDecl {
        name: "demo".into(),
        volume: "demo".into(),
        socket: opts.socket.clone(),
        num_queues: 2,
        read_only: false,
        serial: "appliance-demo".into(),
        queue_cores: vec![],
        ..Default::default()
    })
    .map_err(e)?;
    let what = if opts.members.is_empty() {
        format!("4 RAM members of {} MiB", opts.member_mib)
    } else {
        format!("{} members ({})", names.len(), member_specs.join(", "))
    };
    let _ = writeln!(
        out,
        "RAID5 over {what} (64 KiB chunks, left-symmetric) + 1 hot spare ({spare_spec}) + a write-back journal (64 MiB RAM): {} MiB, exported on {}",
        v.size_bytes >> 20,
        opts.socket.display()
    );
    let client_blocks = (v.size_bytes / 4096).min(16384);
    let client = start_client(&opts.socket, client_blocks)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(opts.before_failure));
    if opts.pull {
        let _ = writeln!(
            out,
            "client (blkio, QD 16): {} IOs so far; failing member {} (pulled)",
            client.ios.load(Ordering::Relaxed),
            names[2]
        );
        faults[2].control().pull();
    } else {
        let _ = writeln!(
            out,
            "client (blkio, QD 16): {} IOs so far; waiting for a member to fail on its own",
            client.ios.load(Ordering::Relaxed)
        );
    }
    let t_fail = Instant::now();
    // Show the rebuild onto the spare: a bar redrawn in place on a
    // terminal, a line per tenth otherwise.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut shown = -1i64;
    let mut seen = false;
    loop {
        let v = mgr.get_volume("demo").map_err(e)?;
        let rebuild = v.progress.as_ref().filter(|p| p.kind == "rebuild");
        if rebuild.is_none() && seen && v.state == "optimal" {
            // Done, and followed at once by the resync the member's
            // failure interrupted (members that held old data are
            // synchronised first).
            break;
        }
        if let Some(p) = rebuild {
            seen = true;
            let f = p.fraction;
            let bar = "#".repeat((f * 40.0) as usize);
            let eta = if p.eta_seconds >= 0.0 {
                format!("{:.1}s", p.eta_seconds)
            } else {
                "-".into()
            };
            let tenth = (f * 10.0) as i64;
            if tty {
                let _ = write!(
                    out,
                    "\rrebuild onto {spare_name} [{bar:<40}] {:5.1}% eta {eta}   ",
                    f * 100.0
                );
            } else if tenth != shown {
                shown = tenth;
                let _ = writeln!(
                    out,
                    "rebuild onto {spare_name} [{bar:<40}] {:5.1}% eta {eta}",
                    f * 100.0
                );
            }
            let _ = out.flush();
            if p.finished {
                if !p.error.is_empty() {
                    return Err(format!("rebuild failed: {}", p.error));
                }
                if v.state == "optimal" {
                    break;
                }
            }
        }
        if t_fail.elapsed() > Duration::from_secs(300) {
            return Err(match v.progress {
                None => "no member failed and no rebuild started in 5 minutes".into(),
                Some(_) => "rebuild did not finish in 5 minutes".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rebuild_secs = t_fail.elapsed().as_secs_f64();
    let _ = writeln!(
        out,
        "\nrebuild finished in {rebuild_secs:.2} s; verifying every block the client wrote"
    );
    client.verify_all.store(true, Ordering::SeqCst);
    let (verified, mismatches, errors) = client
        .thread
        .join()
        .map_err(|_| "client panicked".to_string())??;
    client.stop.store(true, Ordering::SeqCst);
    let ios = client.ios.load(Ordering::Relaxed);
    let v = mgr.get_volume("demo").map_err(e)?;
    let report = DemoReport {
        ios,
        verified,
        mismatches,
        errors,
        rebuild_secs,
        states: v.members.iter().map(|m| m.1.to_string()).collect(),
        iops: ios as f64 / t0.elapsed().as_secs_f64(),
    };
    let _ = writeln!(
        out,
        "{} IOs ({:.0} IOPS through vhost-user-blk), {} reads verified, {} mismatches, {} errors; members {:?}",
        report.ios, report.iops, report.verified, report.mismatches, report.errors, report.states
    );
    if let Some(j) = v.journal_state {
        let _ = writeln!(
            out,
            "journal ({}): log {:.0} % full, {} blocks acknowledged and not yet on the members",
            j.mode.name(),
            j.fill * 100.0,
            j.cached_blocks
        );
    }
    let _ = writeln!(
        out,
        "{}",
        if report.passed() {
            "demo PASSED"
        } else {
            "demo FAILED"
        }
    );
    Ok(report)
}
