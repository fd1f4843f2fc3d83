//! `applctl` end to end against a running `appliance daemon` process: an
//! initial TOML setup, tables and JSON, a failure and its rebuild, exit
//! codes that mean something, a clean stop on SIGTERM, and a broken
//! configuration refused with its line.

mod common;
#[path = "cli/daemon.rs"]
mod daemon;

use daemon::*;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.") && out.contains(" 200 "), "{out}");
    out
}

/// The value of the first sample of `metric` whose labels contain `labels`.
fn sample(text: &str, metric: &str, labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with('{'))
        .find(|l| l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Scrape until `metric{labels}` satisfies `ok` (the sampler publishes
/// once a second).
fn wait_metric(addr: &str, metric: &str, labels: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let t = Instant::now();
    loop {
        let text = scrape(addr);
        if let Some(v) = sample(&text, metric, labels).filter(|&v| ok(v)) {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{metric}{{{labels}}}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An initial configuration of `devices` file devices d0.. of `size`, a
/// RAID5 vol0 over d0-d2 with `volume_extra` TOML lines, exported as vm;
/// its path and the export's socket.
fn raid5_config(dir: &Path, devices: usize, size: &str, volume_extra: &str) -> (PathBuf, PathBuf) {
    let config = dir.join("init.toml");
    let sock = dir.join("vm.sock");
    let mut toml = String::new();
    for i in 0..devices {
        toml += &format!(
            "[[device]]\nname = \"d{i}\"\nspec = \"file:{}:{size}\"\n\n",
            dir.join(format!("d{i}.img")).display()
        );
    }
    toml += &format!(
        "[[volume]]\nname = \"vol0\"\nlevel = \"raid5\"\nmembers = [\"d0\", \"d1\", \"d2\"]\n{volume_extra}\n[[export]]\nname = \"vm\"\nvolume = \"vol0\"\nsocket = \"{}\"\n",
        sock.display()
    );
    std::fs::write(&config, toml).unwrap();
    (config, sock)
}

#[test]
fn applctl_drives_the_daemon_with_tables_json_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("init.toml");
    let sock = dir.path().join("vm.sock");
    std::fs::write(
        &config,
        format!(
            r#"
[[device]]
name = "d0"
spec = "ram:32M"
[[device]]
name = "d1"
spec = "ram:32M"
[[device]]
name = "d2"
spec = "ram:32M"
[[device]]
name = "d3"
spec = "ram:32M"

[[volume]]
name = "vol0"
level = "raid5"
members = ["d0", "d1", "d2"]
spares = ["d3"]
chunk_kib = 128

[[export]]
name = "vm"
volume = "vol0"
socket = "{}"
num_queues = 2
"#,
            sock.display()
        ),
    )
    .unwrap();
    let (mut daemon, api) = start(dir.path(), &config, "127.0.0.1:0");
    let metrics = metrics_addr(dir.path());
    let _reap = KillOnPanic(daemon.id());

    // Metrics move under IO.
    let mut disk = common::Disk::connect(&sock).unwrap();
    for i in 0..16u64 {
        disk.buf().fill(i as u8);
        assert_eq!(disk.write(i << 20, common::Disk::BUF), 0);
    }
    assert_eq!(disk.read(0, common::Disk::BUF), 0);
    let (writes, reads) = (
        r#"export="vm",volume="vol0",op="write""#,
        r#"export="vm",volume="vol0",op="read""#,
    );
    wait_metric(&metrics, "appliance_export_requests_total", writes, |v| {
        v >= 16.0
    });
    let bytes = wait_metric(&metrics, "appliance_export_io_bytes_total", writes, |v| {
        v > 0.0
    });
    assert_eq!(bytes, (16 << 20) as f64);
    wait_metric(&metrics, "appliance_export_requests_total", reads, |v| {
        v >= 1.0
    });
    let timed = wait_metric(
        &metrics,
        "appliance_export_request_duration_seconds_count",
        writes,
        |v| v >= 16.0,
    );
    let inf = wait_metric(
        &metrics,
        "appliance_export_request_duration_seconds_bucket",
        &format!("le=\"+Inf\",{writes}"),
        |v| v >= 16.0,
    );
    assert!(inf >= timed, "{inf} {timed}");
    wait_metric(
        &metrics,
        "appliance_reactor_loops_total",
        r#"reactor="1""#,
        |v| v > 0.0,
    );
    wait_metric(
        &metrics,
        "appliance_volume_state",
        r#"volume="vol0",state="optimal""#,
        |v| v == 1.0,
    );
    for i in 16..24u64 {
        assert_eq!(disk.write(i << 20, common::Disk::BUF), 0);
    }
    wait_metric(&metrics, "appliance_export_requests_total", writes, |v| {
        v >= 24.0
    });
    drop(disk);

    let table = ok(&applctl(&api, &["volume", "list"]));
    let row = table.lines().find(|l| l.starts_with("vol0")).unwrap();
    assert!(row.contains("raid5") && row.contains("optimal"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&applctl(&api, &["--json", "volume", "show", "vol0"]))).unwrap();
    assert_eq!(json["chunk_kib"], 128);
    assert_eq!(json["level"], "LEVEL_RAID5", "enums by name in JSON");
    assert_eq!(json["state"], "VOLUME_STATE_OPTIMAL");
    assert_eq!(json["layout"], "LAYOUT_LEFT_SYMMETRIC");
    assert_eq!(json["consistency_policy"], "CONSISTENCY_POLICY_RESYNC");
    assert_eq!(json["members"][0]["state"], "MEMBER_STATE_IN_SYNC");
    assert_eq!(json["members"].as_array().unwrap().len(), 3);
    assert_eq!(json["spares"][0], "d3");
    let exports = ok(&applctl(&api, &["export", "list"]));
    assert!(exports.contains(&sock.display().to_string()), "{exports}");

    // From an audit: `applctl health` said "degraded" with exit 0, so
    // `applctl health || alert` never fired.
    assert_eq!(applctl(&api, &["health"]).status.code(), Some(0));
    ok(&applctl(&api, &["volume", "fail", "vol0", "d1"]));
    let waited = ok(&applctl(
        &api,
        &["volume", "wait", "vol0", "--timeout", "120"],
    ));
    assert!(waited.contains("rebuild finished"), "{waited}");
    wait_metric(
        &metrics,
        "appliance_volume_quiesce_wait_seconds_count",
        r#"volume="vol0""#,
        |v| v >= 2.0,
    );
    wait_metric(
        &metrics,
        "appliance_volume_background_progress_ratio",
        r#"volume="vol0",kind="rebuild""#,
        |v| v == 1.0,
    );
    let devices = ok(&applctl(&api, &["device", "list"]));
    let d3 = devices.lines().find(|l| l.starts_with("d3")).unwrap();
    assert!(d3.contains("volume vol0"), "{devices}");

    let code = |args: &[&str]| applctl(&api, args).status.code();
    assert_eq!(code(&["volume", "fail", "vol0", "nope"]), Some(3));
    assert_eq!(code(&["volume", "show", "nope"]), Some(3));
    assert_eq!(code(&["device", "attach", "d0", "ram:1M"]), Some(4));
    assert_eq!(code(&["device", "detach", "d0"]), Some(5));
    assert_eq!(code(&["device", "attach", "x", "tape:1M"]), Some(2));
    assert_eq!(
        code(&[
            "volume",
            "create",
            "x",
            "--level",
            "raid9",
            "--members",
            "a"
        ]),
        Some(2)
    );
    assert_eq!(code(&["export", "delete", "nope"]), Some(3));
    // Write-behind is a mirror's (with a bitmap): refused on a RAID5.
    assert_eq!(code(&["volume", "write-behind", "vol0", "64"]), Some(5));
    assert_eq!(code(&["volume", "write-behind", "vol0", "--off"]), Some(5));
    // Resize: a RAID member is refused; a free device grows, never shrinks.
    assert_eq!(code(&["device", "resize", "d0", "64M"]), Some(5));
    ok(&applctl(&api, &["device", "attach", "x1", "ram:4M"]));
    let grown: serde_json::Value = serde_json::from_str(&ok(&applctl(
        &api,
        &["--json", "device", "resize", "x1", "8M"],
    )))
    .unwrap();
    assert_eq!(grown["device"]["num_blocks"], 2048, "{grown}");
    assert_eq!(grown["device"]["spec"], format!("ram:{}", 8 << 20));
    assert_eq!(code(&["device", "resize", "x1", "4M"]), Some(2));
    assert_eq!(code(&["device", "resize", "x1", "lots"]), Some(2));
    ok(&applctl(&api, &["device", "detach", "x1"]));
    let unreachable = Command::new(applctl_path())
        .args(["--api", "/nonexistent/api.sock", "version"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(7));
    let said = String::from_utf8_lossy(&unreachable.stderr).to_string();
    // Why, not only tonic's "transport error" (audit).
    assert!(
        said.contains("/nonexistent/api.sock") && said.contains("No such file"),
        "{said}"
    );
    // A daemon that takes the connection and never answers: --deadline
    // gives up (exit 6) rather than hang a script.
    let mute = dir.path().join("mute.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&mute).unwrap();
    let hung = Command::new(applctl_path())
        .args([
            "--deadline",
            "1",
            "--api",
            mute.to_str().unwrap(),
            "version",
        ])
        .output()
        .unwrap();
    assert_eq!(hung.status.code(), Some(6), "{hung:?}");
    let help = ok(&Command::new(applctl_path()).arg("--help").output().unwrap());
    assert!(
        help.contains("Examples") && help.contains("Exit codes"),
        "{help}"
    );
    // A member failed with no spare left: degraded, which health says in
    // its exit code.
    ok(&applctl(&api, &["volume", "fail", "vol0", "d0"]));
    let health = applctl(&api, &["health"]);
    assert_eq!(health.status.code(), Some(10), "{health:?}");
    assert!(
        String::from_utf8_lossy(&health.stdout).contains("vol0"),
        "{health:?}"
    );

    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no clean stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let state = std::fs::read_to_string(dir.path().join("state.toml")).unwrap();
    assert!(
        state.contains("\"d3\""),
        "the spare became a member: {state}"
    );

    // A broken initial setup: refused, with the line named.
    std::fs::remove_file(dir.path().join("state.toml")).unwrap();
    std::fs::write(
        &config,
        "[[device]]\nname = \"d0\"\nspec = \"ram:1M\"\nsize = 3\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["daemon", "--api"])
        .arg(dir.path().join("api2.sock"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    // EX_CONFIG: systemd does not start it again over the same file.
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 4") && err.contains("size"), "{err}");
}

#[test]
fn a_journalled_raid5_comes_back_from_sigkill_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let (config, sock) = raid5_config(
        dir.path(),
        4,
        "32M",
        "journal = \"d3\"\njournal_mode = \"write-back\"\n",
    );
    let (mut daemon, api) = start(dir.path(), &config, "127.0.0.1:0");
    let _reap = KillOnPanic(daemon.id());
    let mut disk = common::Disk::connect(&sock).unwrap();
    for i in 0..12u64 {
        let p = common::pattern(i, i << 20, common::Disk::BUF);
        disk.buf().copy_from_slice(&p);
        assert_eq!(disk.write(i << 20, common::Disk::BUF), 0);
    }
    assert_eq!(disk.flush(), 0);
    // Acknowledged but not flushed: in write-back, acknowledged means
    // durable in the journal, so it must be there after the crash.
    disk.buf().fill(0x5a);
    assert_eq!(disk.write(20 << 20, common::Disk::BUF), 0);
    drop(disk);
    daemon.kill().unwrap();
    daemon.wait().unwrap();

    // The restart replays the journal before any IO, then resyncs.
    let log = dir.path().join("restart.log");
    let mut daemon = restart(
        dir.path(),
        &api,
        &[],
        std::fs::File::create(&log).unwrap().into(),
    );
    let _reap_restarted = KillOnPanic(daemon.id());
    wait_up(&api, &mut daemon);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("journal replayed"), "{text}");
    let show = ok(&applctl(&api, &["volume", "show", "vol0"]));
    assert!(show.contains("journal: d3 (write-back)"), "{show}");
    ok(&applctl(
        &api,
        &["volume", "wait", "vol0", "--timeout", "120"],
    ));
    let mut disk = common::Disk::connect(&sock).unwrap();
    for i in 0..12u64 {
        assert_eq!(disk.read(i << 20, common::Disk::BUF), 0);
        assert!(
            disk.buf() == common::pattern(i, i << 20, common::Disk::BUF).as_slice(),
            "flushed data at {} MiB lost",
            i
        );
    }
    assert_eq!(disk.read(20 << 20, common::Disk::BUF), 0);
    assert!(
        disk.buf().iter().all(|&x| x == 0x5a),
        "an acknowledged write-back write was lost"
    );
    drop(disk);
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
}

/// `appliance demo --keep` stays up with its volume under the management
/// API: `applctl` sees the rebuilt write-back RAID5 and its export, can
/// act on it, and Ctrl-C stops everything cleanly.
#[test]
fn the_kept_demo_is_driven_with_applctl() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (sock, api) = (dir.path().join("demo.sock"), dir.path().join("api.sock"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args([
            "demo",
            "--member-mib",
            "16",
            "--before-failure",
            "0.3",
            "--keep",
            "--socket",
        ])
        .arg(&sock)
        .arg("--api")
        .arg(&api)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _reap = KillOnPanic(child.id());
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        let up = l.contains("listening on");
        seen.push(l);
        if up {
            break;
        }
    }
    assert!(seen.iter().any(|l| l.contains("demo PASSED")), "{seen:?}");
    assert!(seen.iter().any(|l| l.contains("applctl --api")), "{seen:?}");
    let v = ok(&applctl(&api, &["--json", "volume", "show", "demo"]));
    assert!(v.contains("\"state\": \"VOLUME_STATE_OPTIMAL\""), "{v}");
    assert!(
        v.contains("\"journal_mode\": \"JOURNAL_MODE_WRITE_BACK\""),
        "{v}"
    );
    assert!(
        v.contains("ram-spare"),
        "the spare took the failed slot: {v}"
    );
    let e = ok(&applctl(&api, &["export", "list"]));
    assert!(e.contains("demo"), "{e}");
    ok(&applctl(
        &api,
        &["volume", "journal-mode", "demo", "write-through"],
    ));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    assert!(!sock.exists() && !api.exists(), "sockets removed at exit");
}

/// A RAID5 with a write-intent bitmap, killed with SIGKILL after writes to
/// two places: the restart resynchronises only the regions the bitmap
/// marks, and the bitmap is switched off and on again with `applctl`.
#[test]
fn a_bitmap_narrows_the_resync_after_sigkill_and_is_switched_online() {
    let dir = tempfile::tempdir().unwrap();
    let (config, sock) = raid5_config(
        dir.path(),
        3,
        "64M",
        "bitmap = true\nbitmap_chunk_kib = 1024\n",
    );
    let (mut daemon, api) = start(dir.path(), &config, "127.0.0.1:0");
    let metrics = metrics_addr(dir.path());
    let _reap = KillOnPanic(daemon.id());
    let show = ok(&applctl(&api, &["volume", "show", "vol0"]));
    assert!(show.contains("consistency policy: bitmap ("), "{show}");
    let mut disk = common::Disk::connect(&sock).unwrap();
    // Two places 40 MiB apart: two regions of each member (1 MiB each).
    for at in [0u64, 40 << 20] {
        let p = common::pattern(at, at, common::Disk::BUF);
        disk.buf().copy_from_slice(&p);
        assert_eq!(disk.write(at, common::Disk::BUF), 0);
    }
    assert_eq!(disk.flush(), 0);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&applctl(&api, &["--json", "volume", "show", "vol0"]))).unwrap();
    let dirty = json["bitmap"]["dirty_regions"].as_u64().unwrap();
    let regions = json["bitmap"]["regions"].as_u64().unwrap();
    let region_bytes = json["bitmap"]["region_bytes"].as_u64().unwrap();
    assert_eq!(region_bytes, 1 << 20);
    assert!(
        (1..=4).contains(&dirty) && regions >= 60,
        "{dirty} of {regions} regions dirty"
    );
    wait_metric(
        &metrics,
        "appliance_volume_bitmap_dirty_regions",
        "volume=\"vol0\"",
        |v| v >= 1.0,
    );
    // Written again just before the kill: the regions are marked at the
    // kill (a quiet region's bit goes 5-10 s after its last write).
    for at in [0u64, 40 << 20] {
        let p = common::pattern(at, at, common::Disk::BUF);
        disk.buf().copy_from_slice(&p);
        assert_eq!(disk.write(at, common::Disk::BUF), 0);
    }
    drop(disk);
    daemon.kill().unwrap();
    daemon.wait().unwrap();

    let log = dir.path().join("restart.log");
    let mut daemon = restart(
        dir.path(),
        &api,
        &[],
        std::fs::File::create(&log).unwrap().into(),
    );
    let _reap_restarted = KillOnPanic(daemon.id());
    wait_up(&api, &mut daemon);
    ok(&applctl(
        &api,
        &["volume", "wait", "vol0", "--timeout", "120"],
    ));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("resynchronising the regions the write-intent bitmap marks"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&applctl(&api, &["--json", "volume", "show", "vol0"]))).unwrap();
    let resynced = json["progress"]["bytes"].as_u64().unwrap_or(0);
    assert!(
        resynced > 0 && resynced <= dirty * region_bytes,
        "resync read {resynced} bytes per member; the bitmap marked {dirty} regions of {region_bytes}"
    );
    let mut disk = common::Disk::connect(&sock).unwrap();
    for at in [0u64, 40 << 20] {
        assert_eq!(disk.read(at, common::Disk::BUF), 0);
        assert!(disk.buf() == common::pattern(at, at, common::Disk::BUF).as_slice());
    }
    drop(disk);

    // Switched online: off, bad input refused, on again.
    let show = ok(&applctl(&api, &["volume", "bitmap", "vol0", "--off"]));
    assert!(show.contains("consistency policy: resync"), "{show}");
    let bad = applctl(&api, &["volume", "bitmap", "vol0", "--chunk-kib", "100"]);
    assert_eq!(bad.status.code(), Some(2), "not a power of two: {bad:?}");
    let missing = applctl(&api, &["volume", "bitmap", "nope"]);
    assert_eq!(missing.status.code(), Some(3), "{missing:?}");
    let show = ok(&applctl(
        &api,
        &["volume", "bitmap", "vol0", "--chunk-kib", "2048"],
    ));
    assert!(show.contains("consistency policy: bitmap ("), "{show}");
    assert!(show.contains("2.0 MiB"), "{show}");
    let again = applctl(&api, &["volume", "bitmap", "vol0"]);
    assert_eq!(again.status.code(), Some(5), "already has one: {again:?}");
    // Takeover needs two members (this RAID5 has three).
    let t = applctl(&api, &["volume", "takeover", "vol0", "--level", "raid1"]);
    assert_eq!(t.status.code(), Some(5), "{t:?}");
    assert!(
        String::from_utf8_lossy(&t.stderr).contains("exactly two"),
        "{t:?}"
    );
    let t = applctl(&api, &["volume", "takeover", "vol0", "--level", "raid6"]);
    assert_eq!(t.status.code(), Some(2), "{t:?}");
    let huge = applctl(&api, &["device", "attach", "huge", "ram:16T"]);
    assert_eq!(huge.status.code(), Some(9), "resource exhausted: {huge:?}");
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
}

/// A journal device that died while the daemon was down stops the volume
/// at the next start with a message that names the way out; starting with
/// `--drop-journal` assembles it without the journal, resynchronised, with
/// every write that reached the members (write-through: all acknowledged).
#[test]
fn a_dead_journal_is_dropped_at_start_only_when_the_operator_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (config, sock) = raid5_config(dir.path(), 4, "32M", "journal = \"d3\"\n");
    let (mut daemon, api) = start(dir.path(), &config, "127.0.0.1:0");
    let _reap = KillOnPanic(daemon.id());
    let mut disk = common::Disk::connect(&sock).unwrap();
    for i in 0..4u64 {
        let p = common::pattern(i, i << 20, common::Disk::BUF);
        disk.buf().copy_from_slice(&p);
        assert_eq!(disk.write(i << 20, common::Disk::BUF), 0);
    }
    drop(disk);
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    // The journal device dies: both copies of its superblock are gone
    // (its first and last blocks).
    use std::os::unix::fs::FileExt;
    let j = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("d3.img"))
        .unwrap();
    j.write_all_at(&[0xa5; 4096], 0).unwrap();
    j.write_all_at(&[0xa5; 4096], (32 << 20) - 4096).unwrap();

    let restart = |extra: &[&str]| restart(dir.path(), &api, extra, Stdio::piped());
    // The volume is left out of the start (any other would start), and
    // says why: health and the volume itself name the way out.
    let mut left_out = daemon::restart(dir.path(), &api, &[], Stdio::null());
    let _reap_left_out = KillOnPanic(left_out.id());
    wait_up(&api, &mut left_out);
    let health = applctl(&api, &["health"]);
    assert_eq!(health.status.code(), Some(10), "{health:?}");
    let why = String::from_utf8_lossy(&health.stdout);
    assert!(
        why.contains("--drop-journal vol0"),
        "names the way out: {why}"
    );
    let show = applctl(&api, &["volume", "show", "vol0"]);
    assert_eq!(show.status.code(), Some(5), "{show:?}");
    // The volume list shows it, as declared, with why it did not start.
    let list = ok(&applctl(&api, &["volume", "list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("vol0") && l.contains("unavailable")),
        "{list}"
    );
    assert!(
        list.contains("vol0 did not start:") && list.contains("--drop-journal vol0"),
        "{list}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&applctl(&api, &["--json", "volume", "list"]))).unwrap();
    let v = &json["volumes"][0];
    assert_eq!(v["state"], "VOLUME_STATE_UNAVAILABLE", "{json}");
    assert_eq!(v["journal"], "d3", "{json}");
    assert_eq!(v["members"].as_array().map(Vec::len), Some(3), "{json}");
    // Its export is kept, and listed as such.
    let exports = ok(&applctl(&api, &["export", "list"]));
    assert!(
        exports
            .lines()
            .any(|l| l.starts_with("vm") && l.contains("volume did not start")),
        "{exports}"
    );
    unsafe { libc::kill(left_out.id() as i32, libc::SIGTERM) };
    assert!(left_out.wait().unwrap().success());
    let wrong = restart(&["--drop-journal", "nope"])
        .wait_with_output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("no such volume"),
        "{wrong:?}"
    );

    let mut daemon = restart(&["--drop-journal", "vol0"]);
    let _reap_restarted = KillOnPanic(daemon.id());
    wait_up(&api, &mut daemon);
    ok(&applctl(
        &api,
        &["volume", "wait", "vol0", "--timeout", "120"],
    ));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&applctl(&api, &["--json", "volume", "show", "vol0"]))).unwrap();
    assert_eq!(json["journal"], "", "{json}");
    assert_eq!(
        json["consistency_policy"], "CONSISTENCY_POLICY_RESYNC",
        "{json}"
    );
    let state = std::fs::read_to_string(dir.path().join("state.toml")).unwrap();
    assert!(!state.contains("journal"), "the state forgets it: {state}");
    let mut disk = common::Disk::connect(&sock).unwrap();
    for i in 0..4u64 {
        assert_eq!(disk.read(i << 20, common::Disk::BUF), 0);
        assert!(
            disk.buf() == common::pattern(i, i << 20, common::Disk::BUF).as_slice(),
            "data at {i} MiB"
        );
    }
    drop(disk);
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
}

/// The new change paths from the command line: a whole-volume suspend
/// and resume, a queue moved to another reactor, and a reload by SIGHUP
/// and by `applctl reload` after the configuration file changed.
#[test]
fn suspend_move_queue_and_reload_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _sock) = raid5_config(dir.path(), 4, "16M", "");
    let (mut daemon, api) = start(dir.path(), &config, "127.0.0.1:0");
    let _reap = KillOnPanic(daemon.id());
    let show = |api: &Path| ok(&applctl(api, &["volume", "show", "vol0"]));
    ok(&applctl(&api, &["volume", "suspend", "vol0"]));
    assert!(show(&api).contains("SUSPENDED"), "{}", show(&api));
    assert_eq!(
        applctl(&api, &["volume", "suspend", "vol0"]).status.code(),
        Some(5)
    );
    ok(&applctl(&api, &["volume", "resume", "vol0"]));
    assert!(!show(&api).contains("SUSPENDED"));
    let out = ok(&applctl(
        &api,
        &[
            "--json",
            "export",
            "move-queue",
            "vm",
            "--queue",
            "0",
            "--core",
            "1",
        ],
    ));
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["queue_cores"], serde_json::json!([1]), "{out}");
    assert_eq!(
        applctl(
            &api,
            &["export", "move-queue", "vm", "--queue", "3", "--core", "0"]
        )
        .status
        .code(),
        Some(2)
    );
    // A volume made through the API since the start.
    ok(&applctl(
        &api,
        &[
            "volume",
            "create",
            "w",
            "--level",
            "single",
            "--members",
            "d3",
        ],
    ));
    // The state file (what a restart starts from) is edited by hand: vol0
    // gets an IO limit. SIGHUP applies it. The initial --config is not
    // read again: reading it undid every API change made since the start
    // (the queue's move, the volume w) at each reload.
    let state = dir.path().join("state.toml");
    let text = std::fs::read_to_string(&state).unwrap();
    let mut cfg: toml::Table = toml::from_str(&text).unwrap();
    let vol0 = cfg["volume"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|v| v["name"].as_str() == Some("vol0"))
        .unwrap()
        .as_table_mut()
        .unwrap();
    let mut qos = toml::Table::new();
    qos.insert("write_iops".into(), 5000.into());
    vol0.insert("qos".into(), qos.into());
    std::fs::write(&state, toml::to_string(&cfg).unwrap()).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGHUP) };
    let t = Instant::now();
    let limit = || {
        let out = ok(&applctl(&api, &["--json", "volume", "show", "vol0"]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["qos"]["write_iops"].as_u64()
    };
    while limit() != Some(5000) {
        assert!(t.elapsed() < Duration::from_secs(30), "SIGHUP did nothing");
        std::thread::sleep(Duration::from_millis(50));
    }
    // What the API made stays.
    let out = ok(&applctl(&api, &["--json", "export", "list"]));
    let l: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        l["exports"][0]["queue_cores"],
        serde_json::json!([1]),
        "{out}"
    );
    ok(&applctl(&api, &["volume", "show", "w"]));
    assert_eq!(ok(&applctl(&api, &["reload"])), "nothing to change\n");
    // A reader that goes away (`applctl ... | head -1`) before the answer
    // comes: print! panicked (exit 101).
    let mut child = Command::new(applctl_path())
        .arg("--api")
        .arg(&api)
        .args(["--json", "volume", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    // SAFETY: as above.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
}

/// Shell completions and man pages come from the CLI definition, without
/// a daemon: every subcommand and the closed value sets (levels, layouts,
/// journal modes) are in them, and a value outside a set is refused by
/// applctl itself, naming the ones it takes.
#[test]
fn completions_and_man_pages_are_generated_from_the_cli() {
    let nowhere = Path::new("/nonexistent/api.sock");
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(&applctl(nowhere, &["completions", shell]));
        for word in [
            "volume",
            "takeover",
            "journal-mode",
            "left-asymmetric",
            "write-back",
            "raid5",
        ] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    ok(&applctl(nowhere, &["man", dir.path().to_str().unwrap()]));
    for page in [
        "applctl.1",
        "applctl-volume-create.1",
        "applctl-export-create.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
    }
    let create = std::fs::read_to_string(dir.path().join("applctl-volume-create.1")).unwrap();
    for word in ["\\-\\-level", "right\\-symmetric", "write\\-through"] {
        assert!(create.contains(word), "no {word} in the page");
    }
    let bad = applctl(
        nowhere,
        &[
            "volume",
            "create",
            "v",
            "--level",
            "raid6",
            "--members",
            "a",
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("single, raid1, raid5"), "{err}");
}

/// `applctl stats --watch` shows each export's IOPS, bandwidth and latency
/// percentiles between samples of the daemon's counters, while a real
/// vhost-user-blk client (blkio) reads and writes; `stats` alone shows the
/// totals since the export was created.
#[test]
fn stats_watch_shows_rates_of_a_busy_export() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let config = dir.path().join("init.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\nname = \"d0\"\nspec = \"ram:64M\"\n\n[[volume]]\nname = \"vol0\"\nlevel = \"single\"\nmembers = [\"d0\"]\n\n[[export]]\nname = \"vm\"\nvolume = \"vol0\"\nsocket = \"{}\"\n",
            sock.display()
        ),
    )
    .unwrap();
    let (mut d, api) = start(dir.path(), &config, "127.0.0.1:0");
    let _reap = KillOnPanic(d.id());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, path) = (stop.clone(), sock.clone());
    let io = std::thread::spawn(move || {
        let mut disk = common::Disk::connect(&path).expect("blkio client");
        let mut n = 0u64;
        while !s.load(std::sync::atomic::Ordering::SeqCst) {
            let off = (n % 1024) * 4096;
            assert_eq!(disk.write(off, 4096), 0);
            assert_eq!(disk.read(off, 4096), 0);
            n += 1;
        }
        n
    });
    let json = ok(&applctl(
        &api,
        &["--json", "stats", "--watch", "0.5", "--count", "2"],
    ));
    let text = ok(&applctl(&api, &["stats", "--watch", "0.5", "--count", "1"]));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let done = io.join().unwrap();
    assert!(done > 0);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{json}");
    for l in &lines {
        // The volume's row adds its exports up: here the one.
        let v = &l["volumes"][0];
        assert_eq!(
            (&v["volume"], v.get("export")),
            (&l["exports"][0]["volume"], None)
        );
        assert_eq!(v["read_iops"], l["exports"][0]["read_iops"], "{l}");
        let e = &l["exports"][0];
        assert_eq!(e["export"], "vm");
        assert!(e["read_iops"].as_f64().unwrap() > 0.0, "{l}");
        assert!(e["write_iops"].as_f64().unwrap() > 0.0, "{l}");
        let (p50, p99) = (
            e["read_p50_us"].as_f64().unwrap(),
            e["read_p99_us"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p99 >= p50, "{l}");
    }
    assert!(text.contains("R_IOPS") && text.contains("vm"), "{text}");
    assert!(text.contains("VOLUME"), "{text}");
    let totals: serde_json::Value =
        serde_json::from_str(&ok(&applctl(&api, &["--json", "stats"]))).unwrap();
    let e = &totals["exports"][0];
    assert!(e["reads"].as_u64().unwrap() >= done, "{totals}");
    assert_eq!(e["read_latency_buckets"].as_array().unwrap().len(), 32);
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(d.wait().unwrap().success());
}
