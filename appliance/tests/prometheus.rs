//! The daemon's /metrics as Prometheus and Grafana see it: a scrape under
//! IO and a member failure, parsed by an OpenMetrics parser, follows the
//! conventions (HELP on every family, base units, `_total` only on
//! counters, histograms whose buckets add up, no rates or quantiles
//! computed in the daemon), counts device and member errors, and has every
//! metric the Grafana dashboard in deploy/ uses.

mod common;
#[path = "cli/daemon.rs"]
mod daemon;

use daemon::*;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use openmetrics_parser::{
    openmetrics::parse_openmetrics, MetricsExposition, OpenMetricsType, OpenMetricsValue,
};

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

/// GET /metrics: the content type and the body.
fn scrape(addr: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (ctype, body.to_string())
}

/// The value of the sample of family `name` whose labels include `want`
/// (counters by their total, gauges by their value, histograms by count).
fn value(e: &Exposition, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let f = e.families.get(name)?;
    f.iter_samples().find_map(|s| {
        let ls = s.get_labelset().ok()?;
        if !want.iter().all(|(k, v)| ls.get_label_value(k) == Some(*v)) {
            return None;
        }
        Some(match &s.value {
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            OpenMetricsValue::Gauge(g) => g.as_f64(),
            OpenMetricsValue::Histogram(h) => h.count.unwrap_or(0) as f64,
            _ => return None,
        })
    })
}

/// Names a PromQL query can use for the families of `e`: a counter's
/// `_total`, a histogram's `_bucket`, `_sum` and `_count`, a gauge's name.
fn series_names(e: &Exposition) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (name, f) in &e.families {
        match f.family_type {
            OpenMetricsType::Counter => {
                out.insert(format!("{name}_total"));
            }
            OpenMetricsType::Histogram => {
                for s in ["bucket", "sum", "count"] {
                    out.insert(format!("{name}_{s}"));
                }
            }
            _ => {
                out.insert(name.clone());
            }
        }
    }
    out
}

/// Every convention the scrape must follow; returns what it broke.
fn conventions(e: &Exposition) -> Vec<String> {
    let mut bad = Vec::new();
    for (name, f) in &e.families {
        if !name.starts_with("appliance_") {
            bad.push(format!("{name}: not under the appliance_ prefix"));
        }
        if f.help.trim().is_empty() {
            bad.push(format!("{name}: no HELP"));
        }
        // Base units only, spelled out as the suffix.
        for unit in [
            "nanoseconds",
            "microseconds",
            "milliseconds",
            "_ns",
            "_us",
            "_ms",
            "_kib",
            "_mib",
            "_gib",
            "_percent",
        ] {
            if name.contains(unit) {
                bad.push(format!("{name}: not in base units ({unit})"));
            }
        }
        if !f.unit.is_empty() && !name.ends_with(&format!("_{}", f.unit)) {
            bad.push(format!("{name}: unit {} is not its suffix", f.unit));
        }
        // Rates and quantiles are Prometheus's to compute.
        for computed in ["per_second", "iops", "_rate", "quantile", "percentile"] {
            if name.contains(computed) {
                bad.push(format!("{name}: a value computed in the daemon"));
            }
        }
        if f.get_label_names().iter().any(|l| l == "quantile") {
            bad.push(format!("{name}: quantile label"));
        }
        match f.family_type {
            OpenMetricsType::Counter => {}
            OpenMetricsType::Gauge | OpenMetricsType::Histogram => {
                if name.ends_with("_total") {
                    bad.push(format!("{name}: _total on a non-counter"));
                }
            }
            _ => bad.push(format!("{name}: type {:?}", f.family_type)),
        }
        for s in f.iter_samples() {
            if let OpenMetricsValue::Histogram(h) = &s.value {
                let counts: Vec<f64> = h.buckets.iter().map(|b| b.count.as_f64()).collect();
                if counts.windows(2).any(|w| w[1] < w[0]) {
                    bad.push(format!("{name}: buckets not cumulative"));
                }
                let inf = h.buckets.last().filter(|b| b.upper_bound.is_infinite());
                if inf.map(|b| b.count.as_f64()) != Some(h.count.unwrap_or(0) as f64) {
                    bad.push(format!("{name}: +Inf bucket is not the count"));
                }
                if h.sum.is_none() {
                    bad.push(format!("{name}: no _sum"));
                }
            }
        }
    }
    bad
}

/// Metric names the dashboard's queries use.
fn dashboard_metrics(dashboard: &serde_json::Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find("appliance_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn a_scrape_follows_prometheus_conventions_and_has_what_the_dashboard_uses() {
    // From review: a `"` or `\` in an NQN (any printable ASCII is one)
    // went into a label unescaped and made the whole scrape invalid.
    const NQN: &str = "nqn.2026-12.io.test:a\"b\\c";
    // The NVMe/TCP port is picked free, and picked again should another
    // test take it first.
    let (dir, mut daemon, api, _) = start_on_a_free_port(|dir, port| {
        let mut toml = String::new();
        for i in 0..3 {
            toml += &format!(
                "[[device]]\nname = \"m{i}\"\nspec = \"file:{}:32M\"\n\n",
                dir.join(format!("m{i}.img")).display()
            );
        }
        toml += &format!(
            "[[device]]\nname = \"j\"\nspec = \"ram:32M\"\n\n\
             [[device]]\nname = \"r0\"\nspec = \"ram:64M\"\n\n\
             [[device]]\nname = \"r1\"\nspec = \"ram:64M\"\n\n\
             [[volume]]\nname = \"vol1\"\nlevel = \"raid1\"\nmembers = [\"r0\", \"r1\"]\n\
             bitmap = true\nmax_rebuild_bytes_per_sec = 1048576\n\
             [volume.qos]\ntotal_iops = 1000000\n\n\
             [[volume]]\nname = \"vol0\"\nlevel = \"raid5\"\nmembers = [\"m0\", \"m1\", \"m2\"]\n\
             journal = \"j\"\nchunk_kib = 64\n\n\
             [[export]]\nname = \"vm\"\nvolume = \"vol0\"\nsocket = \"{}\"\n\n\
             [[nvmf_export]]\nnqn = {NQN:?}\nvolume = \"vol1\"\nlisten = \"127.0.0.1:{port}\"\n\
             allow_any_host = true\n",
            dir.join("vm.sock").display(),
        );
        toml
    });
    let sock = dir.path().join("vm.sock");
    let member = |i: usize| dir.path().join(format!("m{i}.img"));
    let metrics = metrics_addr(dir.path());
    let _reap = KillOnPanic(daemon.id());

    // Verified writes and reads, then member 1's file loses its data
    // underneath (truncated): reads of it come back short, the volume
    // fails the member and serves the reads from parity.
    let mut disk = common::Disk::connect(&sock).unwrap();
    for i in 0..8u64 {
        let p = common::pattern(7, i << 20, common::Disk::BUF);
        disk.buf().copy_from_slice(&p);
        assert_eq!(disk.write(i << 20, common::Disk::BUF), 0);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(member(1))
        .unwrap()
        .set_len(0)
        .unwrap();
    for i in 0..8u64 {
        assert_eq!(disk.read(i << 20, common::Disk::BUF), 0);
        assert!(
            disk.buf() == common::pattern(7, i << 20, common::Disk::BUF).as_slice(),
            "MiB {i} read back wrong"
        );
    }

    // A scrub of the RAID1 at 1 MiB/s runs through the scrape.
    ok(&applctl(&api, &["volume", "scrub", "vol1"]));

    // Counters are read at scrape time: the next scrape has it all (the
    // scrub's time left once it has a rate).
    let t = Instant::now();
    let e = loop {
        let (ctype, body) = scrape(&metrics);
        assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
        let e = parse_openmetrics(&body).unwrap_or_else(|err| panic!("{err:?}\n{body}"));
        let degraded = [("volume", "vol0"), ("state", "degraded")];
        if value(&e, "appliance_volume_state", &degraded) == Some(1.0)
            && value(&e, "appliance_volume_background_eta_seconds", &[]).is_some()
        {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let bad = conventions(&e);
    assert!(bad.is_empty(), "{bad:#?}");
    let nvmf = e.families.get("appliance_nvmf_connections");
    let nqns: Vec<String> = nvmf
        .map(|f| {
            f.iter_samples()
                .filter_map(|s| Some(s.get_labelset().ok()?.get_label_value("nqn")?.to_string()))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        // (The parser leaves the escapes in.)
        nqns.iter()
            .any(|n| *n == NQN.replace('\\', "\\\\").replace('"', "\\\"")),
        "the NVMe/TCP export's NQN label: {nqns:?}"
    );

    let export = [("export", "vm"), ("volume", "vol0")];
    let op = |o| [export[0], export[1], ("op", o)];
    let v = |name, labels: &[(&str, &str)]| value(&e, name, labels).unwrap_or(-1.0);
    assert_eq!(v("appliance_export_requests", &op("write")), 8.0);
    assert_eq!(v("appliance_export_requests", &op("read")), 8.0);
    assert_eq!(
        v("appliance_export_io_bytes", &op("write")),
        (8 << 20) as f64
    );
    assert_eq!(
        v("appliance_export_request_duration_seconds", &op("read")),
        8.0
    );
    assert_eq!(v("appliance_export_errors", &export), 0.0);
    assert_eq!(v("appliance_export_connected", &export), 1.0);
    // The failure, seen from the device and from the volume's slot.
    assert!(v("appliance_device_io_errors", &[("device", "m1")]) >= 1.0);
    assert_eq!(v("appliance_device_io_errors", &[("device", "m0")]), 0.0);
    let slot1 = [("volume", "vol0"), ("slot", "1"), ("device", "m1")];
    assert!(v("appliance_volume_member_errors", &slot1) >= 1.0);
    assert_eq!(
        v(
            "appliance_volume_members",
            &[("volume", "vol0"), ("state", "failed")]
        ),
        1.0
    );
    assert_eq!(v("appliance_device_failed", &[("device", "m1")]), 1.0);
    // The journal logged the writes; the member change was a quiesce.
    assert!(v("appliance_volume_journal_records", &[("volume", "vol0")]) >= 8.0);
    // A histogram's value here is its count: the suspends so far.
    assert!(
        v(
            "appliance_volume_quiesce_wait_seconds",
            &[("volume", "vol0")]
        ) >= 1.0
    );
    assert!(v("appliance_reactor_loops", &[("reactor", "1")]) > 0.0);

    let scrub = [("volume", "vol1"), ("kind", "scrub")];
    assert_eq!(v("appliance_volume_background_running", &scrub), 1.0);
    let done = v("appliance_volume_background_progress_ratio", &scrub);
    assert!((0.0..1.0).contains(&done), "{done}");
    assert_eq!(
        v(
            "appliance_volume_background_mismatches",
            &[("volume", "vol1")]
        ),
        0.0
    );
    assert!(v("appliance_volume_bitmap_regions", &[("volume", "vol1")]) >= 1.0);
    let limit = [("volume", "vol1"), ("kind", "total_iops")];
    assert_eq!(v("appliance_volume_qos_limit", &limit), 1e6);
    // For each buffer size, the XOR kernel chosen at start is one of
    // those it measured, and the fastest of them.
    for buffers in ["small", "large"] {
        let took = |k: &str| {
            value(
                &e,
                "appliance_raid_xor_calibration_block_duration_seconds",
                &[("kernel", k), ("buffers", buffers)],
            )
        };
        let measured: Vec<(&str, f64)> = ["avx512", "avx512vl", "avx2", "portable"]
            .into_iter()
            .filter_map(|k| took(k).map(|s| (k, s)))
            .collect();
        assert!(measured.iter().any(|m| m.0 == "portable"), "{measured:?}");
        assert!(measured.iter().all(|m| m.1 > 0.0), "{measured:?}");
        let fastest = measured
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|m| m.0)
            .unwrap_or_default();
        assert_eq!(
            value(
                &e,
                "appliance_raid_xor_kernel_info",
                &[("kernel", fastest), ("buffers", buffers)]
            ),
            Some(1.0),
            "{buffers}: {measured:?}"
        );
    }

    // Every metric the dashboard queries is in the scrape.
    let path = common::repo().join("deploy/grafana/appliance.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let used = dashboard_metrics(&dashboard);
    let have = series_names(&e);
    let missing: Vec<&String> = used.difference(&have).collect();
    assert!(missing.is_empty(), "the dashboard uses {missing:?}");
    assert!(used.len() >= 20, "{used:?}");

    ok(&applctl(&api, &["volume", "stop-scrub", "vol1"]));
    drop(disk);
    // A scraper that sent one byte of its request and went quiet: the
    // stop waited for it for good (found by review), and systemd would
    // have killed the daemon with its exports undrained.
    let mut stalled = std::net::TcpStream::connect(&metrics).unwrap();
    std::io::Write::write_all(&mut stalled, b"G").unwrap();
    // A full scrape after it: the byte has reached the server, and one
    // stalled scraper holds nobody up.
    scrape(&metrics);
    // It is let go once its time for the headers is up (idle scrapers
    // held a descriptor each for good: enough of them left the daemon
    // none for its exports).
    stalled
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut sink = Vec::new();
    let t = Instant::now();
    let closed = std::io::Read::read_to_end(&mut stalled, &mut sink);
    assert!(closed.is_ok(), "open after {:?}: {closed:?}", t.elapsed());
    // Another, connected at the stop.
    let mut stalled = std::net::TcpStream::connect(&metrics).unwrap();
    std::io::Write::write_all(&mut stalled, b"G").unwrap();
    scrape(&metrics);
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the daemon did not stop with a scraper connected"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    drop(stalled);
}

/// One scraper address holds at most three quarters of the listener's
/// connections: a scraper gone wild (here 48 connections that sent a byte
/// and went quiet) leaves room for Prometheus on another address.
#[test]
fn one_peer_cannot_take_every_metrics_connection() {
    let reactors = poller::Reactors::start(poller::ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let mgr = std::sync::Arc::new(appliance::manager::Manager::new(reactors.set(), None));
    let bound = appliance::metrics::Bound::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = bound.addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = appliance::metrics::start(bound, mgr.clone(), stop.clone()).unwrap();
    let held: Vec<std::net::TcpStream> = (0..48)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            std::io::Write::write_all(&mut s, b"G").unwrap();
            s
        })
        .collect();
    // The 49th from the same address is closed unanswered.
    let mut extra = std::net::TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let _ = write!(extra, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut out = Vec::new();
    let _ = extra.read_to_end(&mut out);
    assert!(out.is_empty(), "the 49th was answered");
    // Another address is served.
    let mut other = common::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), addr);
    write!(other, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    other.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.") && out.contains(" 200 "), "{out}");
    drop(held);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    server.join().unwrap();
    mgr.shutdown();
    drop(mgr);
    let _ = reactors.shutdown();
}
