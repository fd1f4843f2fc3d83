//! Prometheus metrics: a sampler thread reads the counters the data path
//! keeps anyway (per-queue IO stats, reactor stats, quiesce stats, volume
//! state) once a period and publishes them through the `metrics` crate.
//! The IO path itself never calls into the metrics recorder: a recorder
//! call per IO (a map lookup and shared atomics) would cost more than the
//! rest of a RAM read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge};

use crate::export::stats::{quantile, IoSnapshot};
use crate::manager::Manager;

/// How often the sampler publishes.
pub const PERIOD: Duration = Duration::from_secs(1);

/// Start the HTTP listener on `addr` (GET /metrics) and the sampler; the
/// sampler stops when `stop` is set.
pub fn start(
    addr: SocketAddr,
    mgr: Arc<Manager>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        // The sampler refreshes every live series each period; the series
        // of a deleted export or volume stop changing and go away.
        .idle_timeout(metrics_util::MetricKindMask::ALL, Some(PERIOD * 10))
        .install()
        .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let mut s = Sampler::default();
            while !stop.load(Ordering::SeqCst) {
                s.sample(&mgr);
                std::thread::sleep(PERIOD);
            }
        })
        .map_err(|e| format!("spawning the metrics sampler: {e}"))
}

/// What the last sample saw, for rates.
#[derive(Default)]
pub struct Sampler {
    at: Option<Instant>,
    exports: HashMap<String, IoSnapshot>,
    busy: HashMap<usize, u64>,
}

impl Sampler {
    /// Publish everything once.
    pub fn sample(&mut self, mgr: &Manager) {
        let now = Instant::now();
        let secs = self.at.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        self.at = Some(now);

        for (name, volume, s) in mgr.export_stats() {
            let l = [("export", name.clone()), ("volume", volume)];
            counter!("appliance_export_reads_total", &l).absolute(s.reads);
            counter!("appliance_export_writes_total", &l).absolute(s.writes);
            counter!("appliance_export_read_bytes_total", &l).absolute(s.read_bytes);
            counter!("appliance_export_written_bytes_total", &l).absolute(s.write_bytes);
            counter!("appliance_export_other_requests_total", &l).absolute(s.others);
            counter!("appliance_export_errors_total", &l).absolute(s.errors);
            counter!("appliance_export_frontend_faults_total", &l).absolute(s.frontend_faults);
            gauge!("appliance_export_queue_depth", &l).set(s.inflight as f64);
            let prev = self.exports.get(&name).cloned().unwrap_or_default();
            if secs > 0.0 {
                let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
                gauge!("appliance_export_read_iops", &l).set(rate(s.reads, prev.reads));
                gauge!("appliance_export_write_iops", &l).set(rate(s.writes, prev.writes));
                gauge!("appliance_export_read_bytes_per_second", &l)
                    .set(rate(s.read_bytes, prev.read_bytes));
                gauge!("appliance_export_write_bytes_per_second", &l)
                    .set(rate(s.write_bytes, prev.write_bytes));
            }
            // Latency over the last period; left as it was if no IO ran.
            let h = prev.latency_since(&s);
            for (k, op) in ["read", "write"].iter().enumerate() {
                for q in ["0.5", "0.9", "0.99"] {
                    let qf: f64 = q.parse().unwrap_or(0.5);
                    if let Some(d) = quantile(&h[k], qf) {
                        gauge!(
                            format!("appliance_export_{op}_latency_seconds"),
                            "export" => name.clone(),
                            "quantile" => q
                        )
                        .set(d.as_secs_f64());
                    }
                }
            }
            self.exports.insert(name, s);
        }

        for v in mgr.list_volumes() {
            let l = [("volume", v.name.clone())];
            gauge!("appliance_volume_degraded", &l).set((v.state == "degraded") as u8 as f64);
            gauge!("appliance_volume_failed", &l).set((v.state == "failed") as u8 as f64);
            gauge!("appliance_volume_size_bytes", &l).set(v.size_bytes as f64);
            gauge!("appliance_volume_generation", &l).set(v.generation as f64);
            let (fraction, running) = match &v.progress {
                Some(p) if !p.finished => (p.fraction, 1.0),
                _ => (1.0, 0.0),
            };
            gauge!("appliance_volume_resync_fraction", &l).set(fraction);
            gauge!("appliance_volume_resync_running", &l).set(running);
            for state in ["in_sync", "rebuilding", "failed"] {
                let n = v.members.iter().filter(|m| m.1 == state).count();
                gauge!("appliance_volume_members", "volume" => v.name.clone(), "state" => state)
                    .set(n as f64);
            }
            gauge!("appliance_volume_spares", &l).set(v.spares.len() as f64);
            counter!("appliance_volume_quiesce_total", &l).absolute(v.quiesce.suspends);
            gauge!("appliance_volume_quiesce_wait_seconds_total", &l)
                .set(v.quiesce.wait_ns_total as f64 / 1e9);
            gauge!("appliance_volume_quiesce_wait_seconds_max", &l)
                .set(v.quiesce.wait_ns_max as f64 / 1e9);
            if let Some((_, fill, cached, failed)) = v.journal_state {
                gauge!("appliance_volume_journal_fill_ratio", &l).set(fill);
                gauge!("appliance_volume_journal_cached_blocks", &l).set(cached as f64);
                gauge!("appliance_volume_journal_failed", &l).set(failed as u8 as f64);
            }
            if let Some((_, regions, dirty)) = v.bitmap {
                gauge!("appliance_volume_bitmap_regions", &l).set(regions as f64);
                gauge!("appliance_volume_bitmap_dirty_regions", &l).set(dirty as f64);
            }
        }

        let set = mgr.reactors();
        for core in 0..set.len() {
            let Some(st) = set.stats(core) else { continue };
            let l = [("core", core.to_string())];
            counter!("appliance_reactor_loops_total", &l).absolute(st.loops);
            counter!("appliance_reactor_busy_nanoseconds_total", &l).absolute(st.busy_ns);
            if let Some(prev) = self.busy.insert(core, st.busy_ns) {
                if secs > 0.0 {
                    let ratio = st.busy_ns.saturating_sub(prev) as f64 / 1e9 / secs;
                    gauge!("appliance_reactor_busy_ratio", &l).set(ratio.min(1.0));
                }
            }
        }
    }
}
