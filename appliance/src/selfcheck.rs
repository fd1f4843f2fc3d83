//! The daemon's self-check on an embedded default: RAM devices, a verified
//! workload on every reactor, and quiesce cycles racing it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{BlockDevice, RamDevice};
use poller::{Domain, ReactorConfig, Reactors};

use crate::stats::{percentile, process_cpu_time};
use crate::workload::{Totals, Workload, WorkloadParams};

/// What to run.
#[derive(Debug, Clone)]
pub struct SelfCheckOptions {
    /// Reactor threads.
    pub reactors: usize,
    /// Cores to pin them to (default: the first available ones).
    pub cores: Option<Vec<usize>>,
    /// How long the workload runs.
    pub duration: Duration,
    /// Size of the RAM device in MiB.
    pub device_mib: u64,
    /// Pause between reconfigurations.
    pub reconfigure_every: Duration,
}

impl Default for SelfCheckOptions {
    fn default() -> Self {
        SelfCheckOptions {
            reactors: 2,
            cores: None,
            duration: Duration::from_secs(3),
            device_mib: 256,
            reconfigure_every: Duration::from_millis(5),
        }
    }
}

/// What the self-check measured.
#[derive(Debug, Clone)]
pub struct SelfCheckReport {
    /// Per reactor totals.
    pub per_core: Vec<Totals>,
    /// All reactors.
    pub totals: Totals,
    /// Wall time of the workload.
    pub elapsed: Duration,
    /// Process CPU time per completed IO, in nanoseconds.
    pub cpu_ns_per_io: f64,
    /// Reactor busy time per completed IO, in nanoseconds.
    pub busy_ns_per_io: f64,
    /// Configuration changes made while IO ran.
    pub reconfigurations: usize,
    /// Suspend-to-published latency, median and 99th percentile.
    pub quiesce_p50: Duration,
    /// See `quiesce_p50`.
    pub quiesce_p99: Duration,
    /// The volume's final configuration generation.
    pub final_generation: u64,
    /// Pinned core of each reactor.
    pub pinned: Vec<Option<usize>>,
    /// The first error, if any.
    pub first_error: Option<String>,
}

impl SelfCheckReport {
    /// Whether everything checked out.
    pub fn passed(&self) -> bool {
        self.totals.clean()
            && self.totals.ios > 0
            && self.totals.reads_verified > 0
            && self.final_generation == 1 + self.reconfigurations as u64
    }
}

/// The configuration the self-check's volume publishes on each change.
#[derive(Debug)]
pub struct SelfCheckVolume {
    /// Which device it runs on.
    pub device: String,
    /// Bumped by each reconfiguration.
    pub changes: u64,
}

/// Run the self-check on `reactors` (started by the caller).
pub fn run_on(reactors: &Reactors, opts: &SelfCheckOptions) -> Result<SelfCheckReport, String> {
    let set = reactors.set();
    let blocks = opts.device_mib * (1 << 20) / 4096;
    let dev: Arc<dyn BlockDevice> =
        Arc::new(RamDevice::new("ram0", 4096, blocks).map_err(|e| e.to_string())?);
    let domain = Domain::new(set);
    let volume = domain
        .create(
            "selfcheck",
            SelfCheckVolume {
                device: dev.info().name.clone(),
                changes: 0,
            },
        )
        .map_err(|e| e.to_string())?;
    let busy_before: u64 = (0..set.len())
        .filter_map(|c| set.stats(c))
        .map(|s| s.busy_ns)
        .sum();
    let cpu_before = process_cpu_time();
    let start = Instant::now();
    let workload = Workload::start(set, dev.clone(), &volume, WorkloadParams::default())?;
    let mut latencies = Vec::new();
    while start.elapsed() < opts.duration {
        let t = Instant::now();
        volume
            .reconfigure(Duration::from_secs(5), |v| {
                Ok::<_, String>((
                    SelfCheckVolume {
                        device: v.device.clone(),
                        changes: v.changes + 1,
                    },
                    (),
                ))
            })
            .map_err(|e| format!("reconfiguring the self-check volume: {e}"))?;
        latencies.push(t.elapsed());
        std::thread::sleep(opts.reconfigure_every);
    }
    let first_error = workload.first_error();
    let per_core = workload.per_core();
    let totals = workload.stop(Duration::from_secs(10))?;
    let elapsed = start.elapsed();
    let cpu = process_cpu_time() - cpu_before;
    let busy_after: u64 = (0..set.len())
        .filter_map(|c| set.stats(c))
        .map(|s| s.busy_ns)
        .sum();
    let ios = totals.ios.max(1) as f64;
    let report = SelfCheckReport {
        per_core,
        totals,
        elapsed,
        cpu_ns_per_io: cpu.as_nanos() as f64 / ios,
        busy_ns_per_io: (busy_after - busy_before) as f64 / ios,
        reconfigurations: latencies.len(),
        quiesce_p50: percentile(&mut latencies, 50.0),
        quiesce_p99: percentile(&mut latencies, 99.0),
        final_generation: volume.config().0,
        pinned: (0..set.len())
            .map(|c| set.stats(c).and_then(|s| s.pinned_core))
            .collect(),
        first_error,
    };
    domain
        .remove("selfcheck", Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    Ok(report)
}

/// Start reactors as `opts` says.
pub fn start_reactors(opts: &SelfCheckOptions) -> Result<Reactors, String> {
    Reactors::start(ReactorConfig {
        count: opts.reactors,
        cores: opts.cores.clone(),
        ..Default::default()
    })
    .map_err(|e| e.to_string())
}

/// The report as a person reads it.
pub fn render(report: &SelfCheckReport) -> String {
    let secs = report.elapsed.as_secs_f64();
    let mut s = String::new();
    s.push_str("reactor  pinned  IOs        IOPS       verified reads  errors\n");
    for (i, t) in report.per_core.iter().enumerate() {
        let pin = report
            .pinned
            .get(i)
            .copied()
            .flatten()
            .map_or("no".to_string(), |c| format!("core {c}"));
        s.push_str(&format!(
            "{i:<8} {pin:<7} {:<10} {:<10.0} {:<15} {}\n",
            t.ios,
            t.ios as f64 / secs,
            t.reads_verified,
            t.errors + t.verify_failures
        ));
    }
    s.push_str(&format!(
        "total: {} IOs of 4 KiB at QD 32 per reactor in {:.2} s = {:.0} IOPS; {} reads verified; \
         {} errors, {} verify failures, {} IOs crossed a reconfiguration\n",
        report.totals.ios,
        secs,
        report.totals.ios as f64 / secs,
        report.totals.reads_verified,
        report.totals.errors,
        report.totals.verify_failures,
        report.totals.generation_changes_in_flight
    ));
    s.push_str(&format!(
        "cpu per IO: {:.0} ns (process), {:.0} ns (reactor busy time)\n",
        report.cpu_ns_per_io, report.busy_ns_per_io
    ));
    s.push_str(&format!(
        "quiesce: {} reconfigurations under load, suspend-to-resume p50 {:?} p99 {:?}, final generation {}\n",
        report.reconfigurations, report.quiesce_p50, report.quiesce_p99, report.final_generation
    ));
    if let Some(e) = &report.first_error {
        s.push_str(&format!("first error: {e}\n"));
    }
    s.push_str(if report.passed() {
        "self-check PASSED\n"
    } else {
        "self-check FAILED\n"
    });
    s
}
