//! `applctl stats`, with `--watch`: per-export IOPS, bandwidth and latency
//! percentiles between two samples of the daemon's counters (which only
//! grow), as SPDK's bdev_get_iostat or iostat -x would show them. The
//! daemon keeps histograms, never rates; rates are the client's business.

use mgmt::pb;
use serde::Serialize;

use crate::{out, table, Client, Failure};

/// One export (or, with `export` empty, one volume: its exports together)
/// over one interval.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rates {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub export: String,
    pub volume: String,
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_mib_s: f64,
    pub write_mib_s: f64,
    /// Latency percentiles in microseconds (bucket upper bounds), `None`
    /// when no such request completed in the interval.
    pub read_p50_us: Option<f64>,
    pub read_p99_us: Option<f64>,
    pub write_p50_us: Option<f64>,
    pub write_p99_us: Option<f64>,
    pub errors: u64,
    pub inflight: u64,
}

/// The `q` quantile of a histogram ([`mgmt::latency`]) as its bucket's
/// upper bound, in microseconds.
pub fn quantile_us(h: &[u64], q: f64) -> Option<f64> {
    mgmt::latency::quantile_ns(h, q).map(|ns| ns as f64 / 1000.0)
}

fn delta(a: &[u64], b: &[u64]) -> Vec<u64> {
    b.iter()
        .enumerate()
        .map(|(i, &n)| n.saturating_sub(a.get(i).copied().unwrap_or(0)))
        .collect()
}

/// The rates of every export in `now` against `before`, `secs` apart (an
/// export new since `before` counts from zero).
pub fn rates(before: &[pb::ExportStat], now: &[pb::ExportStat], secs: f64) -> Vec<Rates> {
    let secs = secs.max(1e-6);
    let mut out: Vec<Rates> = now
        .iter()
        .map(|n| {
            let zero = pb::ExportStat::default();
            let b = before
                .iter()
                .find(|b| b.export == n.export)
                .unwrap_or(&zero);
            let per_s = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
            let rl = delta(&b.read_latency_buckets, &n.read_latency_buckets);
            let wl = delta(&b.write_latency_buckets, &n.write_latency_buckets);
            Rates {
                export: n.export.clone(),
                volume: n.volume.clone(),
                read_iops: per_s(b.reads, n.reads),
                write_iops: per_s(b.writes, n.writes),
                read_mib_s: per_s(b.read_bytes, n.read_bytes) / (1 << 20) as f64,
                write_mib_s: per_s(b.write_bytes, n.write_bytes) / (1 << 20) as f64,
                read_p50_us: quantile_us(&rl, 0.5),
                read_p99_us: quantile_us(&rl, 0.99),
                write_p50_us: quantile_us(&wl, 0.5),
                write_p99_us: quantile_us(&wl, 0.99),
                errors: n.errors.saturating_sub(b.errors),
                inflight: n.inflight,
            }
        })
        .collect();
    out.sort_by(|a, b| a.export.cmp(&b.export));
    out
}

/// What each export did between `before` and `now` (an export new since
/// counts from zero; one gone since is left out), added up per volume,
/// as one "export" named after the volume with an empty export name.
/// Deltas first, then sums: an export that comes or goes in between does
/// not skew its volume's figures. In-flight counts are the current ones.
pub fn by_volume(before: &[pb::ExportStat], now: &[pb::ExportStat]) -> Vec<pb::ExportStat> {
    let mut out: Vec<pb::ExportStat> = Vec::new();
    for n in now {
        let zero = pb::ExportStat::default();
        let b = before
            .iter()
            .find(|b| b.export == n.export)
            .unwrap_or(&zero);
        let i = match out.iter().position(|v| v.volume == n.volume) {
            Some(i) => i,
            None => {
                out.push(pb::ExportStat {
                    volume: n.volume.clone(),
                    ..Default::default()
                });
                out.len() - 1
            }
        };
        let v = &mut out[i];
        let d = |x: u64, y: u64| y.saturating_sub(x);
        v.reads = v.reads.saturating_add(d(b.reads, n.reads));
        v.writes = v.writes.saturating_add(d(b.writes, n.writes));
        v.read_bytes = v.read_bytes.saturating_add(d(b.read_bytes, n.read_bytes));
        v.write_bytes = v
            .write_bytes
            .saturating_add(d(b.write_bytes, n.write_bytes));
        v.others = v.others.saturating_add(d(b.others, n.others));
        v.errors = v.errors.saturating_add(d(b.errors, n.errors));
        v.frontend_faults = v
            .frontend_faults
            .saturating_add(d(b.frontend_faults, n.frontend_faults));
        v.inflight = v.inflight.saturating_add(n.inflight);
        for (sum, h) in [
            (
                &mut v.read_latency_buckets,
                delta(&b.read_latency_buckets, &n.read_latency_buckets),
            ),
            (
                &mut v.write_latency_buckets,
                delta(&b.write_latency_buckets, &n.write_latency_buckets),
            ),
        ] {
            if sum.len() < h.len() {
                sum.resize(h.len(), 0);
            }
            for (a, b) in sum.iter_mut().zip(h) {
                *a = a.saturating_add(b);
            }
        }
    }
    out
}

/// The rates of every volume (its exports together).
pub fn volume_rates(before: &[pb::ExportStat], now: &[pb::ExportStat], secs: f64) -> Vec<Rates> {
    // The sums are deltas already: against nothing.
    let mut out = rates(&[], &by_volume(before, now), secs);
    out.sort_by(|a, b| a.volume.cmp(&b.volume));
    out
}

/// The table's header and rows (the first column is the volume's name
/// for volume rows).
pub fn rows(r: &[Rates]) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    (
        vec![
            if r.first()
                .is_some_and(|x| x.export.is_empty() && !x.volume.is_empty())
            {
                "VOLUME"
            } else {
                "EXPORT"
            },
            "R_IOPS",
            "W_IOPS",
            "R_MIB/S",
            "W_MIB/S",
            "R_P50_US",
            "R_P99_US",
            "W_P50_US",
            "W_P99_US",
            "ERRORS",
            "INFLIGHT",
        ],
        r.iter()
            .map(|x| {
                vec![
                    if x.export.is_empty() {
                        x.volume.clone()
                    } else {
                        x.export.clone()
                    },
                    format!("{:.0}", x.read_iops),
                    format!("{:.0}", x.write_iops),
                    format!("{:.1}", x.read_mib_s),
                    format!("{:.1}", x.write_mib_s),
                    us(x.read_p50_us),
                    us(x.read_p99_us),
                    us(x.write_p50_us),
                    us(x.write_p99_us),
                    x.errors.to_string(),
                    x.inflight.to_string(),
                ]
            })
            .collect(),
    )
}

/// `stats --watch SECS [--count N]`: a table (or a JSON line) of rates
/// every SECS seconds.
pub async fn watch(
    c: &mut Client,
    json: bool,
    secs: f64,
    count: Option<u32>,
) -> Result<(), Failure> {
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(Failure(
            2,
            "--watch: a number of seconds, above 0 and at most 86400".into(),
        ));
    }
    let mut before = c
        .export_stats(pb::ExportStatsRequest {})
        .await?
        .into_inner()
        .exports;
    let mut at = std::time::Instant::now();
    let mut n = 0u32;
    while count.is_none_or(|c| n < c) {
        tokio::time::sleep(std::time::Duration::from_secs_f64(secs)).await;
        let now = c
            .export_stats(pb::ExportStatsRequest {})
            .await?
            .into_inner()
            .exports;
        let t = std::time::Instant::now();
        let secs = t.duration_since(at).as_secs_f64();
        let r = rates(&before, &now, secs);
        let v = volume_rates(&before, &now, secs);
        let text = if json {
            let line = serde_json::json!({"exports": r, "volumes": v});
            serde_json::to_string(&line).map_err(|e| Failure(1, e.to_string()))? + "\n"
        } else {
            let (eh, er) = rows(&r);
            let (vh, vr) = rows(&v);
            table(&eh, er) + &table(&vh, vr) + "\n"
        };
        // A reader that went away (`| head`) ends the watch.
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return Ok(());
        }
        (before, at) = (now, t);
        n += 1;
    }
    Ok(())
}

/// `stats`: reactors, and each export's IO since it was created.
pub async fn totals(c: &mut Client, json: bool) -> Result<(), Failure> {
    let r = c
        .reactor_stats(pb::ReactorStatsRequest {})
        .await?
        .into_inner();
    // A daemon from before ExportStats: no exports shown.
    let e = match c.export_stats(pb::ExportStatsRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::Unimplemented => Default::default(),
        Err(s) => return Err(s.into()),
    };
    #[derive(serde::Serialize)]
    struct Both {
        reactors: Vec<pb::ReactorStat>,
        exports: Vec<pb::ExportStat>,
    }
    let both = Both {
        reactors: r.reactors,
        exports: e.exports,
    };
    out(json, &both, || {
        let reactors = table(
            &["CORE", "BUSY_MS", "LOOPS", "SLEEPS"],
            both.reactors
                .iter()
                .map(|s| {
                    vec![
                        s.core.to_string(),
                        (s.busy_ns / 1_000_000).to_string(),
                        s.loops.to_string(),
                        s.sleeps.to_string(),
                    ]
                })
                .collect(),
        );
        let mut exports: Vec<&pb::ExportStat> = both.exports.iter().collect();
        exports.sort_by(|a, b| a.export.cmp(&b.export));
        let us = |h: &[u64], q| quantile_us(h, q).map_or("-".to_string(), |v| format!("{v:.1}"));
        let exports = table(
            &[
                "EXPORT",
                "VOLUME",
                "READS",
                "WRITES",
                "READ_MIB",
                "WRITE_MIB",
                "R_P99_US",
                "W_P99_US",
                "ERRORS",
            ],
            exports
                .iter()
                .map(|s| {
                    vec![
                        s.export.clone(),
                        s.volume.clone(),
                        s.reads.to_string(),
                        s.writes.to_string(),
                        (s.read_bytes >> 20).to_string(),
                        (s.write_bytes >> 20).to_string(),
                        us(&s.read_latency_buckets, 0.99),
                        us(&s.write_latency_buckets, 0.99),
                        s.errors.to_string(),
                    ]
                })
                .collect(),
        );
        format!("{reactors}\n{exports}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_percentiles_between_two_samples() {
        let mut a = pb::ExportStat {
            export: "e".into(),
            reads: 100,
            read_bytes: 100 << 12,
            read_latency_buckets: vec![0; 32],
            write_latency_buckets: vec![0; 32],
            ..Default::default()
        };
        let mut b = a.clone();
        b.reads = 1100;
        b.read_bytes = 1100 << 12;
        // 990 reads in bucket 3 (< 2048 ns), 10 in bucket 10 (< 262 us).
        b.read_latency_buckets[3] = 990;
        b.read_latency_buckets[10] = 10;
        let r = rates(&[a.clone()], &[b.clone()], 2.0);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].read_iops, 500.0);
        assert!((r[0].read_mib_s - 1000.0 * 4096.0 / 2.0 / 1048576.0).abs() < 1e-9);
        assert_eq!(r[0].read_p50_us, Some(2.048));
        assert_eq!(r[0].read_p99_us, Some(2.048));
        assert_eq!(quantile_us(&b.read_latency_buckets, 0.999), Some(262.144));
        assert_eq!(r[0].write_p50_us, None);
        // An export new since the first sample counts from zero.
        a.export = "other".into();
        let r = rates(&[a], &[b], 1.0);
        assert_eq!(r[0].read_iops, 1100.0);
    }

    #[test]
    fn a_volume_adds_up_its_exports() {
        let e = |export: &str, volume: &str, reads: u64, slow: u64| pb::ExportStat {
            export: export.into(),
            volume: volume.into(),
            reads,
            read_latency_buckets: {
                let mut h = vec![0; 32];
                h[2] = reads - slow;
                h[12] = slow;
                h
            },
            ..Default::default()
        };
        let before = [e("a", "v", 0, 0), e("b", "v", 0, 0), e("c", "w", 0, 0)];
        let now = [
            e("a", "v", 900, 0),
            e("b", "v", 100, 100),
            e("c", "w", 10, 0),
        ];
        let v = volume_rates(&before, &now, 1.0);
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].volume.as_str(), v[0].read_iops), ("v", 1000.0));
        assert!(v[0].export.is_empty());
        // 10 % of v's reads were slow: its p99 is theirs, p50 the fast.
        assert_eq!(v[0].read_p99_us, Some(1048.576));
        assert_eq!(v[0].read_p50_us, Some(1.024));
        assert_eq!((v[1].volume.as_str(), v[1].read_iops), ("w", 10.0));
        let (head, rows) = rows(&v);
        assert_eq!((head[0], rows[0][0].as_str()), ("VOLUME", "v"));
        // An export deleted in between is left out, not subtracted.
        let v = volume_rates(&now, &now[1..], 1.0);
        assert_eq!((v[0].volume.as_str(), v[0].read_iops), ("v", 0.0));
    }
}
