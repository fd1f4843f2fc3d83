//! Prometheus metrics, collected when scraped: each GET /metrics reads the
//! counters the data path keeps anyway (per-queue IO stats and latency
//! histograms, device error counts, reactor and quiesce stats, volume
//! state) and writes them in the OpenMetrics text format.
//!
//! The IO path never calls into a metrics library: a recorder call per IO
//! (a map lookup and shared atomics) would cost more than the rest of a RAM
//! read. Rates and quantiles are left to Prometheus (`rate()`,
//! `histogram_quantile()`), so series from many hosts aggregate; values are
//! in base units (seconds, bytes) and every family has HELP text. A deleted
//! export or volume simply stops appearing.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::manager::Manager;

mod server;
pub use server::{start, Bound};

/// The content type of a scrape.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry whose only collector reads `mgr` on each scrape.
pub fn registry(mgr: Arc<Manager>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(Appliance { mgr }));
    r
}

/// Everything the daemon reports, collected at scrape time.
struct Appliance {
    mgr: Arc<Manager>,
}

impl std::fmt::Debug for Appliance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Appliance metrics")
    }
}

/// One sample's value.
enum Value {
    Count(u64),
    Seconds(f64),
    Gauge(f64),
    /// Sum, count, and per-bucket (not cumulative) counts by upper bound.
    Histogram(f64, u64, Vec<(f64, u64)>),
}

type Labels = Vec<(&'static str, String)>;

/// A family: name (without unit or `_total`), help, unit, type, samples.
struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<&'static Unit>,
    kind: MetricType,
    rows: Vec<(Labels, Value)>,
}

const SECONDS: Unit = Unit::Seconds;
const BYTES: Unit = Unit::Bytes;

impl Family {
    fn new(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            unit: None,
            kind: MetricType::Gauge,
            rows: Vec::new(),
        }
    }

    fn counter(mut self) -> Family {
        self.kind = MetricType::Counter;
        self
    }

    fn histogram(mut self) -> Family {
        self.kind = MetricType::Histogram;
        self
    }

    fn unit(mut self, u: &'static Unit) -> Family {
        self.unit = Some(u);
        self
    }

    fn add(&mut self, labels: Labels, v: Value) {
        // prometheus-client writes label values as they are; an NQN may
        // hold any printable ASCII, and a `"` in one ended its value early
        // and made the whole scrape invalid (every alert went dark).
        let labels = labels
            .into_iter()
            .map(|(k, v)| (k, escape_label(v)))
            .collect();
        self.rows.push((labels, v));
    }

    fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        // A family with no samples (no export yet, no journal) is left
        // out: some parsers take its metadata for the next family's.
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut f = enc.encode_descriptor(self.name, self.help, self.unit, self.kind)?;
        for (labels, v) in &self.rows {
            let m = f.encode_family(labels)?;
            match v {
                Value::Count(n) => ConstCounter::new(*n).encode(m)?,
                Value::Seconds(s) => ConstCounter::new(*s).encode(m)?,
                Value::Gauge(g) => ConstGauge::new(*g).encode(m)?,
                Value::Histogram(sum, count, buckets) => {
                    let mut m = m;
                    m.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?
                }
            }
        }
        Ok(())
    }
}

/// A label value as OpenMetrics quotes it: `\`, `"` and newlines escaped.
fn escape_label(v: String) -> String {
    if !v.contains(['\\', '"', '\n']) {
        return v;
    }
    let mut out = String::with_capacity(v.len() + 4);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn g(b: bool) -> Value {
    Value::Gauge(if b { 1.0 } else { 0.0 })
}

/// The Prometheus buckets of a log2 histogram kept in-process: bucket
/// `i`'s upper bound in seconds from `bound_s(i)`, the last one open
/// (`+Inf`).
fn buckets(h: &[u64], bound_s: impl Fn(usize) -> f64) -> Vec<(f64, u64)> {
    let last = h.len().saturating_sub(1);
    h.iter()
        .enumerate()
        .map(|(i, &n)| (if i == last { f64::MAX } else { bound_s(i) }, n))
        .collect()
}

/// An export latency histogram's buckets (bound `256 ns << i`).
fn latency_buckets(h: &[u64]) -> Vec<(f64, u64)> {
    buckets(h, |i| mgmt::latency::bound_ns(i) as f64 / 1e9)
}

impl Collector for Appliance {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        for f in collect(&self.mgr) {
            f.encode(&mut enc)?;
        }
        Ok(())
    }
}

/// Every family, read from the manager now.
fn collect(mgr: &Manager) -> Vec<Family> {
    let mut out = Vec::new();
    let mut info = Family::new("appliance_build_info", "The daemon's version (always 1).");
    info.add(
        vec![("version", env!("CARGO_PKG_VERSION").to_string())],
        Value::Gauge(1.0),
    );
    out.push(info);
    let xor = crate::raid::parity::calibrate();
    let mut kernel = Family::new(
        "appliance_raid_xor_kernel_info",
        "The XOR kernel RAID5 parity uses for small (up to 8 KiB) and large buffers, chosen at start as the fastest (always 1).",
    );
    let mut speed = Family::new(
        "appliance_raid_xor_calibration_block_duration",
        "Time each XOR kernel took at start to compute one parity block from four sources of 4 KiB (small) or 64 KiB (large).",
    )
    .unit(&SECONDS);
    for class in crate::raid::parity::SizeClass::ALL {
        let buffers = ("buffers", class.label().to_string());
        kernel.add(
            vec![("kernel", xor.chosen(class).to_string()), buffers.clone()],
            Value::Gauge(1.0),
        );
        let block = (4 * class.calibration_len()) as f64;
        for s in &xor.speeds {
            speed.add(
                vec![("kernel", s.name.to_string()), buffers.clone()],
                Value::Gauge(block / s.bytes_per_sec[class as usize].max(1.0)),
            );
        }
    }
    out.push(kernel);
    out.push(speed);
    exports(mgr, &mut out);
    nvmf_exports(mgr, &mut out);
    volumes(mgr, &mut out);
    devices(mgr, &mut out);
    reactors(mgr, &mut out);
    out
}

fn exports(mgr: &Manager, out: &mut Vec<Family>) {
    let mut requests = Family::new(
        "appliance_export_requests",
        "Requests the export completed, by operation (other: flush, discard, write zeroes, get ID).",
    )
    .counter();
    let mut bytes = Family::new(
        "appliance_export_io",
        "Bytes read and written through the export.",
    )
    .counter()
    .unit(&BYTES);
    let mut errors = Family::new(
        "appliance_export_errors",
        "Requests answered with an error status (including ones refused before the volume).",
    )
    .counter();
    let mut faults = Family::new(
        "appliance_export_frontend_faults",
        "Connections dropped because the frontend broke a virtqueue or its memory.",
    )
    .counter();
    let mut inflight = Family::new(
        "appliance_export_inflight_requests",
        "Requests in flight now.",
    );
    // No UNIT line on the histogram (the name carries it): OpenMetrics
    // parsers differ on whether a histogram may have one.
    let mut latency = Family::new(
        "appliance_export_request_duration_seconds",
        "Time from a request's submission to its completion, measured on the reactor, by operation.",
    )
    .histogram();
    let mut connected = Family::new(
        "appliance_export_connected",
        "Whether a vhost-user frontend is connected (1) or not (0).",
    );
    let mut connections = Family::new(
        "appliance_export_connections",
        "vhost-user connections accepted.",
    )
    .counter();
    for (name, volume, s) in mgr.export_stats() {
        let l = |op: Option<&'static str>| {
            let mut v = vec![("export", name.clone()), ("volume", volume.clone())];
            if let Some(op) = op {
                v.push(("op", op.to_string()));
            }
            v
        };
        requests.add(l(Some("read")), Value::Count(s.reads));
        requests.add(l(Some("write")), Value::Count(s.writes));
        requests.add(l(Some("other")), Value::Count(s.others));
        bytes.add(l(Some("read")), Value::Count(s.read_bytes));
        bytes.add(l(Some("write")), Value::Count(s.write_bytes));
        errors.add(l(None), Value::Count(s.errors));
        faults.add(l(None), Value::Count(s.frontend_faults));
        inflight.add(l(None), Value::Gauge(s.inflight as f64));
        for (k, op) in ["read", "write"].into_iter().enumerate() {
            let h = &s.latency[k];
            let count = h.iter().fold(0u64, |a, &n| a.saturating_add(n));
            let sum = s.latency_sum_ns[k] as f64 / 1e9;
            latency.add(
                l(Some(op)),
                Value::Histogram(sum, count, latency_buckets(h)),
            );
        }
    }
    for e in mgr.list_exports() {
        let l = vec![
            ("export", e.decl.name.clone()),
            ("volume", e.decl.volume.clone()),
        ];
        connected.add(l.clone(), g(e.connected));
        connections.add(l, Value::Count(e.connections));
    }
    out.extend([
        requests,
        bytes,
        errors,
        faults,
        inflight,
        latency,
        connected,
        connections,
    ]);
}

fn nvmf_exports(mgr: &Manager, out: &mut Vec<Family>) {
    let mut commands = Family::new(
        "appliance_nvmf_commands",
        "Read and write commands an NVMe/TCP export completed.",
    )
    .counter();
    let mut bytes = Family::new(
        "appliance_nvmf_io",
        "Bytes an NVMe/TCP export read and wrote.",
    )
    .unit(&BYTES)
    .counter();
    let mut errors = Family::new(
        "appliance_nvmf_errors",
        "IO commands of an NVMe/TCP export that completed with an error status.",
    )
    .counter();
    let mut connections = Family::new(
        "appliance_nvmf_connections",
        "NVMe/TCP connections open now (an admin queue and the IO queues of each host).",
    );
    let mut controllers = Family::new(
        "appliance_nvmf_controllers",
        "Hosts' controllers (associations) live now.",
    );
    for e in mgr.list_nvmf_exports() {
        let l = |op: Option<&'static str>| {
            let mut v = vec![
                ("nqn", e.decl.nqn.clone()),
                ("volume", e.decl.volume.clone()),
            ];
            if let Some(op) = op {
                v.push(("op", op.to_string()));
            }
            v
        };
        for (i, op) in ["read", "write"].into_iter().enumerate() {
            commands.add(l(Some(op)), Value::Count(e.commands[i]));
            bytes.add(l(Some(op)), Value::Count(e.bytes[i]));
        }
        errors.add(l(None), Value::Count(e.errors));
        connections.add(l(None), Value::Gauge(e.connections as f64));
        controllers.add(l(None), Value::Gauge(e.controllers.len() as f64));
    }
    out.extend([commands, bytes, errors, connections, controllers]);
}

fn volumes(mgr: &Manager, out: &mut Vec<Family>) {
    let f = Family::new;
    let mut info = f(
        "appliance_volume_info",
        "A volume's level, layout and consistency policy (always 1).",
    );
    let mut state = f(
        "appliance_volume_state",
        "The volume's state: 1 for the one it is in (optimal, degraded, failed; unavailable: the saved state names it, and it did not start), 0 for the others.",
    );
    let mut size = f("appliance_volume_size", "The volume's capacity.").unit(&BYTES);
    let mut generation = f(
        "appliance_volume_generation",
        "The configuration generation (bumped by every change published to the volume's IO path).",
    );
    let mut members = f(
        "appliance_volume_members",
        "Member slots by state (in_sync, rebuilding, failed, removed).",
    );
    let mut member_errors = f(
        "appliance_volume_member_errors",
        "IOs that failed on a member, by slot and device.",
    )
    .counter();
    let mut spares = f(
        "appliance_volume_spares",
        "Spare devices assigned to the volume.",
    );
    let mut running = f(
        "appliance_volume_background_running",
        "Whether a rebuild, replacement or scrub runs (1) or not (0), by kind.",
    );
    let mut progress = f(
        "appliance_volume_background_progress_ratio",
        "How far the running or last rebuild, replacement or scrub got.",
    );
    let mut eta = f(
        "appliance_volume_background_eta",
        "Time left for the running background work at its rate so far (absent when unknown).",
    )
    .unit(&SECONDS);
    let mut mismatches = f(
        "appliance_volume_background_mismatches",
        "Parity or mirror mismatches the running or last scrub found.",
    );
    // No UNIT line (see the export latency histogram).
    let mut quiesce_wait = f(
        "appliance_volume_quiesce_wait_seconds",
        "How long suspends of the volume's IO waited for every reactor to acknowledge (the count is the number of suspends).",
    )
    .histogram();
    let mut quiesce_max = f(
        "appliance_volume_quiesce_wait_max",
        "The longest wait of one suspend for every reactor to acknowledge.",
    )
    .unit(&SECONDS);
    let mut pending = f(
        "appliance_volume_pending_changes",
        "Changes waiting to be applied (ones that hit a quiesce deadline and are retried).",
    );
    let mut fill = f(
        "appliance_volume_journal_fill_ratio",
        "How full the journal's log is.",
    );
    let mut cached = f(
        "appliance_volume_journal_cached_blocks",
        "Write-back blocks in the journal's cache, not on the members yet.",
    );
    let mut held = f(
        "appliance_volume_journal_cache_held_blocks",
        "Blocks of memory the journal's write-back cache holds and counts against its limit: whole records, kept until their last block is on the members or rewritten (at least the cached blocks, read at about the same time).",
    );
    let mut jfailed = f(
        "appliance_volume_journal_failed",
        "Whether the journal device failed (1; the volume goes on without it) or not (0).",
    );
    let mut records = f(
        "appliance_volume_journal_records",
        "Records written to the journal's log.",
    )
    .counter();
    let mut jblocks = f(
        "appliance_volume_journal_written_blocks",
        "Log blocks the journal's records took (headers, data and parity).",
    )
    .counter();
    let mut checkpoints = f(
        "appliance_volume_journal_checkpoints",
        "Journal checkpoints recorded (the log freed up to them).",
    )
    .counter();
    let mut qos = f(
        "appliance_volume_qos_limit",
        "The volume's IO limits per second that are set, by kind (read_iops, write_iops, total_iops, read_bytes, write_bytes, total_bytes).",
    );
    let mut regions = f(
        "appliance_volume_bitmap_regions",
        "Regions of the write-intent bitmap.",
    );
    let mut dirty = f(
        "appliance_volume_bitmap_dirty_regions",
        "Regions the write-intent bitmap marks dirty now.",
    );
    // Those that did not start (the saved state names them); one started
    // by a reload between the two looks is listed below.
    let views = mgr.list_volumes();
    for (name, _) in mgr.unavailable_volumes() {
        if views.iter().any(|v| v.name == name) {
            continue;
        }
        for s in ["optimal", "degraded", "failed", "unavailable"] {
            let labels = vec![("volume", name.clone()), ("state", s.to_string())];
            state.add(labels, g(s == "unavailable"));
        }
    }
    for v in views {
        let l = || vec![("volume", v.name.clone())];
        let with = |k: &'static str, val: &str| {
            let mut x = l();
            x.push((k, val.to_string()));
            x
        };
        let mut i = l();
        i.push(("level", v.level.name().to_string()));
        i.push(("layout", v.layout.clone()));
        i.push(("consistency_policy", v.consistency_policy.to_string()));
        info.add(i, Value::Gauge(1.0));
        for s in ["optimal", "degraded", "failed", "unavailable"] {
            state.add(with("state", s), g(v.state == s));
        }
        size.add(l(), Value::Gauge(v.size_bytes as f64));
        generation.add(l(), Value::Gauge(v.generation as f64));
        for s in ["in_sync", "rebuilding", "failed", "removed"] {
            let n = v.members.iter().filter(|m| m.1 == s).count();
            members.add(with("state", s), Value::Gauge(n as f64));
        }
        for (slot, ((dev, _), errs)) in v.members.iter().zip(&v.member_errors).enumerate() {
            let mut x = with("slot", &slot.to_string());
            x.push(("device", dev.clone()));
            member_errors.add(x, Value::Count(*errs));
        }
        spares.add(l(), Value::Gauge(v.spares.len() as f64));
        for kind in ["rebuild", "replace", "scrub"] {
            let on = v
                .progress
                .as_ref()
                .is_some_and(|p| p.kind == kind && !p.finished);
            running.add(with("kind", kind), g(on));
        }
        if let Some(p) = &v.progress {
            progress.add(with("kind", p.kind), Value::Gauge(p.fraction));
            if !p.finished && p.eta_seconds >= 0.0 {
                eta.add(with("kind", p.kind), Value::Gauge(p.eta_seconds));
            }
            if p.kind == "scrub" {
                mismatches.add(l(), Value::Gauge(p.mismatches as f64));
            }
        }
        let q = &v.quiesce;
        // Suspend waits: bucket i below 1 us << i.
        let b = buckets(&q.wait_hist, |i| (1u64 << i) as f64 / 1e6);
        // The count from the buckets themselves: the suspend counter is
        // read apart from them, and a suspend ending between the two reads
        // made _count differ from the +Inf bucket (OpenMetrics forbids it).
        let count = q.wait_hist.iter().fold(0u64, |a, &n| a.saturating_add(n));
        quiesce_wait.add(
            l(),
            Value::Histogram(q.wait_ns_total as f64 / 1e9, count, b),
        );
        quiesce_max.add(l(), Value::Gauge(v.quiesce.wait_ns_max as f64 / 1e9));
        pending.add(l(), Value::Gauge(v.pending_changes as f64));
        if let Some(j) = v.journal_state {
            fill.add(l(), Value::Gauge(j.fill));
            cached.add(l(), Value::Gauge(j.cached_blocks as f64));
            held.add(l(), Value::Gauge(j.held_blocks as f64));
            jfailed.add(l(), g(j.failed));
        }
        if let Some(c) = v.journal_counts {
            records.add(l(), Value::Count(c.records));
            jblocks.add(l(), Value::Count(c.blocks));
            checkpoints.add(l(), Value::Count(c.checkpoints));
        }
        for (kind, limit) in [
            ("read_iops", v.qos.read_iops),
            ("write_iops", v.qos.write_iops),
            ("total_iops", v.qos.total_iops),
            ("read_bytes", v.qos.read_bytes),
            ("write_bytes", v.qos.write_bytes),
            ("total_bytes", v.qos.total_bytes),
        ] {
            if limit > 0 {
                qos.add(with("kind", kind), Value::Gauge(limit as f64));
            }
        }
        if let Some((_, r, d)) = v.bitmap {
            regions.add(l(), Value::Gauge(r as f64));
            dirty.add(l(), Value::Gauge(d as f64));
        }
    }
    out.extend([
        info,
        state,
        size,
        generation,
        members,
        member_errors,
        spares,
        running,
        progress,
        eta,
        mismatches,
        quiesce_wait,
        quiesce_max,
        pending,
        fill,
        cached,
        held,
        jfailed,
        records,
        jblocks,
        checkpoints,
        qos,
        regions,
        dirty,
    ]);
}

fn devices(mgr: &Manager, out: &mut Vec<Family>) {
    let f = Family::new;
    let mut info = f(
        "appliance_device_info",
        "A device's kind and what uses it (always 1).",
    );
    let mut size = f("appliance_device_size", "The device's capacity.").unit(&BYTES);
    let mut failed = f(
        "appliance_device_failed",
        "Whether the device failed as a volume member (1) or not (0).",
    );
    let mut missing = f(
        "appliance_device_missing",
        "Whether the saved state names the device but it could not be opened at the start (1) or not (0).",
    );
    let mut errors = f(
        "appliance_device_io_errors",
        "Requests the device completed with an error.",
    )
    .counter();
    let mut timeouts = f(
        "appliance_device_timeouts",
        "Commands that did not complete within the device's time-out (NVMe).",
    )
    .counter();
    let mut aborts = f(
        "appliance_device_aborts",
        "Abort commands sent for timed-out commands (NVMe).",
    )
    .counter();
    let mut resets = f("appliance_device_resets", "Controller resets (NVMe).").counter();
    for d in mgr.list_devices() {
        let l = || vec![("device", d.decl.name.clone())];
        let kind = d
            .decl
            .spec
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        let mut i = l();
        i.push(("kind", kind));
        i.push(("used_by", d.used_by.clone()));
        info.add(i, Value::Gauge(1.0));
        let bytes = d.num_blocks.saturating_mul(d.decl.block_size as u64);
        size.add(l(), Value::Gauge(bytes as f64));
        failed.add(l(), g(d.health == "failed"));
        missing.add(l(), g(d.health == "missing"));
        errors.add(l(), Value::Count(d.errors.io_errors));
        timeouts.add(l(), Value::Count(d.errors.timeouts));
        aborts.add(l(), Value::Count(d.errors.aborts));
        resets.add(l(), Value::Count(d.errors.resets));
    }
    out.extend([
        info, size, failed, missing, errors, timeouts, aborts, resets,
    ]);
}

fn reactors(mgr: &Manager, out: &mut Vec<Family>) {
    let f = Family::new;
    let mut loops = f("appliance_reactor_loops", "Reactor loop iterations.").counter();
    let mut busy = f(
        "appliance_reactor_busy",
        "Time the reactor spent in iterations that did work (rate() of it is the busy ratio).",
    )
    .counter()
    .unit(&SECONDS);
    let mut messages = f(
        "appliance_reactor_messages",
        "Messages the reactor ran (work sent by the control plane).",
    )
    .counter();
    let mut sleeps = f(
        "appliance_reactor_sleeps",
        "Times the reactor went to sleep for lack of work.",
    )
    .counter();
    let set = mgr.reactors();
    for core in 0..set.len() {
        let Some(st) = set.stats(core) else { continue };
        let l = vec![("reactor", core.to_string())];
        loops.add(l.clone(), Value::Count(st.loops));
        busy.add(l.clone(), Value::Seconds(st.busy_ns as f64 / 1e9));
        messages.add(l.clone(), Value::Count(st.messages));
        sleeps.add(l, Value::Count(st.sleeps));
    }
    out.extend([loops, busy, messages, sleeps]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_in_seconds_and_end_open() {
        let mut h = [0u64; mgmt::latency::BUCKETS];
        h[0] = 2;
        h[5] = 3;
        let b = latency_buckets(&h);
        assert_eq!(b.len(), h.len());
        assert_eq!(b[0], (256e-9, 2));
        assert_eq!(b[5], ((256u64 << 5) as f64 / 1e9, 3));
        assert_eq!(b.last().map(|x| x.0), Some(f64::MAX));
    }
}
