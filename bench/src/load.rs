//! What the benchmark clients (`vhostbench`, `nvmfbench`) share: the load
//! they drive, how they time it, and the figures they print (IOPS and the
//! backend's CPU time and page faults per IO, from /proc/PID/stat).

use serde_json::json;

/// Random reads or random writes.
#[derive(Clone, Copy, clap::ValueEnum, Debug)]
pub enum Rw {
    /// 4 KiB random reads.
    Randread,
    /// 4 KiB random writes.
    Randwrite,
}

/// The load and where it is measured.
#[derive(clap::Args)]
pub struct Load {
    /// The backend's process id, for its CPU time.
    #[arg(long)]
    pub backend_pid: i32,
    #[arg(long, value_enum)]
    pub rw: Rw,
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Seconds of the same IO before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Core to pin this client to.
    #[arg(long)]
    pub core: Option<usize>,
    /// Free-form label copied into the output.
    #[arg(long, default_value = "")]
    pub label: String,
}

/// The backend's CPU ticks (user + system) and minor page faults so far.
fn cpu_ticks(pid: i32) -> Result<(u64, u64), String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let after = s.rfind(')').map(|i| &s[i + 2..]).ok_or("bad stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let p = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("bad stat field")
    };
    Ok((p(11)? + p(12)?, p(7)?))
}

/// A xorshift generator for the offsets.
pub fn offsets() -> impl FnMut() -> u64 {
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    }
}

impl Load {
    /// Pin the client to its core, if one was given.
    pub fn pin(&self) {
        if let Some(core) = self.core {
            core_affinity::set_for_current(core_affinity::CoreId { id: core });
        }
    }

    /// Run `phase(seconds, ios, errors)` (which drives IO for that long
    /// and returns the seconds it took) for the warm-up, then measured;
    /// the figures as one JSON line.
    pub fn measure(
        &self,
        mut phase: impl FnMut(f64, &mut u64, &mut u64) -> Result<f64, String>,
    ) -> Result<serde_json::Value, String> {
        let (mut ios, mut errors) = (0u64, 0u64);
        phase(self.warmup, &mut ios, &mut errors)?;
        ios = 0;
        let cpu0 = cpu_ticks(self.backend_pid)?;
        let elapsed = phase(self.seconds, &mut ios, &mut errors)?;
        let cpu1 = cpu_ticks(self.backend_pid)?;
        let cpu_ns = (cpu1.0 - cpu0.0) as f64 * 1e9 / 100.0;
        let minflt = cpu1.1.saturating_sub(cpu0.1);
        Ok(json!({
            "label": self.label,
            "rw": format!("{:?}", self.rw).to_lowercase(),
            "queues": self.queues,
            "qd": self.qd,
            "iops": ios as f64 / elapsed,
            "ios": ios,
            "errors": errors,
            "backend_cpu_ns_per_io": cpu_ns / ios.max(1) as f64,
            "backend_cpu_cores": cpu_ns / 1e9 / elapsed,
            "backend_minflt_per_io": minflt as f64 / ios.max(1) as f64,
        }))
    }
}

/// Print the figures, or the error and exit 1.
pub fn report(r: Result<serde_json::Value, String>) {
    match r {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
