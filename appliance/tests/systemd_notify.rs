//! The daemon under a service manager that speaks sd_notify(3), as systemd
//! with `Type=notify` and `WatchdogSec=`: the test listens on the
//! NOTIFY_SOCKET and checks what arrives and when.

#[path = "cli/daemon.rs"]
mod daemon;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use daemon::*;

/// Every line received until `until` is among them (or 30 s pass).
fn collect(sock: &UnixDatagram, lines: &mut Vec<String>, until: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 4096];
    while !until(lines) {
        assert!(Instant::now() < deadline, "not received; got {lines:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            lines.extend(text.lines().map(str::to_string));
        }
    }
}

fn has(lines: &[String], line: &str) -> bool {
    lines.iter().any(|l| l == line)
}

/// `systemd-analyze verify` finds nothing wrong with `unit` but the
/// binaries it names, which are not installed here.
fn assert_verifies(unit: &std::path::Path) {
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .expect("systemd-analyze (package systemd)");
    let complaints: Vec<String> = String::from_utf8_lossy(&verify.stderr)
        .lines()
        .filter(|l| !l.contains("is not executable"))
        .map(str::to_string)
        .collect();
    assert!(complaints.is_empty(), "{}: {complaints:?}", unit.display());
}

fn count(lines: &[String], line: &str) -> usize {
    lines.iter().filter(|l| *l == line).count()
}

#[test]
fn the_daemon_speaks_the_systemd_notify_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let export = dir.path().join("vm.sock");
    let config = dir.path().join("init.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\nname = \"d0\"\nspec = \"ram:16M\"\n\n[[volume]]\nname = \"vol0\"\nlevel = \"single\"\nmembers = [\"d0\"]\n\n[[export]]\nname = \"vm\"\nvolume = \"vol0\"\nsocket = \"{}\"\n",
            export.display()
        ),
    )
    .unwrap();
    let api = dir.path().join("api.sock");
    // WATCHDOG_PID must be the daemon's own pid: the shell execs it.
    let mut d = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_appliance"))
        .args(["daemon", "--reactors", "2", "--api"])
        .arg(&api)
        .arg("--state")
        .arg(dir.path().join("state.toml"))
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _reap = KillOnPanic(d.id());
    let mut lines = Vec::new();

    // READY=1 means ready: the API answers and the export accepts.
    collect(&sock, &mut lines, |l| has(l, "READY=1"));
    ok(&applctl(&api, &["version"]));
    UnixStream::connect(&export).expect("the export accepts once READY=1 was sent");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("STATUS=serving 1 volumes in 1 exports on 2 reactors")),
        "{lines:?}"
    );
    assert!(
        lines.iter().position(|l| l.starts_with("STATUS=restoring"))
            < lines.iter().position(|l| l == "READY=1"),
        "{lines:?}"
    );
    // The restore pushes the start time-out back (a long one was killed
    // by TimeoutStartSec, and Restart= looped).
    let extend = lines
        .iter()
        .position(|l| l == "EXTEND_TIMEOUT_USEC=30000000")
        .expect("EXTEND_TIMEOUT_USEC during the restore");
    assert!(
        Some(extend) < lines.iter().position(|l| l == "READY=1"),
        "{lines:?}"
    );

    // The watchdog is fed (every half interval) while the reactors answer.
    collect(&sock, &mut lines, |l| count(l, "WATCHDOG=1") >= 3);

    // SIGHUP: a reload, then ready again.
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGHUP) };
    collect(&sock, &mut lines, |l| {
        has(l, "RELOADING=1") && count(l, "READY=1") >= 2
    });
    assert!(
        lines.iter().any(|l| l.starts_with("STATUS=reloaded")),
        "{lines:?}"
    );

    // SIGTERM: STOPPING=1 and the stop's progress, then a clean exit.
    // SAFETY: as above.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    collect(&sock, &mut lines, |l| has(l, "STATUS=stopped"));
    assert!(d.wait().unwrap().success());
    let stop = lines
        .iter()
        .position(|l| l == "STOPPING=1")
        .expect("STOPPING=1");
    let draining = lines
        .iter()
        .position(|l| l.starts_with("STATUS=stopping: draining 1 exports"))
        .expect("the stop's progress");
    assert!(stop < draining, "{lines:?}");
    // The stop pushes its time-out back too: two volumes slow to drain
    // passed TimeoutStopSec, were killed, and nothing was recorded clean.
    assert!(
        lines
            .iter()
            .skip(stop)
            .any(|l| l == "EXTEND_TIMEOUT_USEC=30000000"),
        "{lines:?}"
    );
}

/// From an audit: the stop began only once the API's calls in progress
/// had ended (dropping its runtime waited for them, with no bound), so a
/// call held up by a device (here an attach to a remote target that
/// accepts and never answers) kept systemd from hearing STOPPING=1 or the
/// time-out pushed back: killed at TimeoutStopSec, nothing recorded clean.
#[test]
fn the_stop_begins_while_a_call_is_held_up() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let api = dir.path().join("api.sock");
    let mut d = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["daemon", "--reactors", "1", "--api"])
        .arg(&api)
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _reap = KillOnPanic(d.id());
    let mut lines = Vec::new();
    collect(&sock, &mut lines, |l| has(l, "READY=1"));
    // A target that takes the connection and says nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let spec = format!(
        "nvmf-tcp://{}/nqn.2026-12.io.test:silent",
        silent.local_addr().unwrap()
    );
    let mut attach = Command::new(applctl_path())
        .arg("--api")
        .arg(&api)
        .args(["device", "attach", "r0", &spec])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The call is in the daemon once its connection arrives; it waits
    // for the target's answer (10 s) while the test holds it.
    let _held = accept_from(&silent);
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let extended = |l: &[String]| {
        l.iter()
            .skip_while(|l| *l != "STOPPING=1")
            .any(|l| l == "EXTEND_TIMEOUT_USEC=30000000")
    };
    collect(&sock, &mut lines, extended);
    assert!(
        attach.try_wait().unwrap().is_none(),
        "the attach ended before the stop began: {lines:?}"
    );
    // The attach is refused its further steps, and the stop ends.
    assert!(!attach.wait().unwrap().success());
    collect(&sock, &mut lines, |l| has(l, "STATUS=stopped"));
    assert!(d.wait().unwrap().success());
}

/// A daemon held in its restore: it restores a saved state whose one
/// device is a remote namespace at `silent`, a listener the test holds,
/// and waits in that attach (its connection is `conn`, accepted) until
/// the test lets `conn` and `silent` go (the device is then missing, and
/// the start goes on).
struct HeldStart {
    dir: tempfile::TempDir,
    sock: UnixDatagram,
    d: std::process::Child,
    conn: std::net::TcpStream,
    silent: std::net::TcpListener,
    _reap: KillOnPanic,
}

/// The connection the daemon makes to `silent`; fails (not hangs) if
/// nothing comes in 30 s. (The daemon is not waited for here: reaped, its
/// pid could be another process's by the time `KillOnPanic` kills it.)
fn accept_from(silent: &std::net::TcpListener) -> std::net::TcpStream {
    silent.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match silent.accept() {
            Ok((conn, _)) => return conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the daemon never connected");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn held_in_the_restore() -> HeldStart {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let state = dir.path().join("state.toml");
    std::fs::write(
        &state,
        format!(
            "[[device]]\nname = \"r0\"\nspec = \"nvmf-tcp://{}/nqn.2026-12.io.test:silent\"\n",
            silent.local_addr().unwrap()
        ),
    )
    .unwrap();
    let d = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["daemon", "--reactors", "1", "--api"])
        .arg(dir.path().join("api.sock"))
        .arg("--state")
        .arg(&state)
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reap = KillOnPanic(d.id());
    let conn = accept_from(&silent);
    HeldStart {
        dir,
        sock,
        d,
        conn,
        silent,
        _reap: reap,
    }
}

/// From an audit: a SIGHUP during the start (a long restore) was
/// answered by the reload thread, which started before the API: its
/// READY=1 told systemd the start was over before the API socket was
/// there. The reload comes once the daemon serves, after its READY=1.
#[test]
fn a_sighup_during_the_start_is_answered_once_the_daemon_serves() {
    let HeldStart {
        dir,
        sock,
        mut d,
        conn,
        silent,
        _reap,
    } = held_in_the_restore();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGHUP) };
    drop((conn, silent));
    let mut lines = Vec::new();
    collect(&sock, &mut lines, |l| {
        has(l, "RELOADING=1") && count(l, "READY=1") >= 2
    });
    let first_ready = lines.iter().position(|l| l == "READY=1");
    assert!(
        first_ready < lines.iter().position(|l| l == "RELOADING=1"),
        "{lines:?}"
    );
    assert!(
        lines[first_ready.unwrap_or(0)..]
            .iter()
            .take(2)
            .any(|l| l.starts_with("STATUS=serving")),
        "the first READY=1 is not the start's: {lines:?}"
    );
    ok(&applctl(&dir.path().join("api.sock"), &["version"]));
    // SAFETY: as above.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    collect(&sock, &mut lines, |l| has(l, "STATUS=stopped"));
    assert!(d.wait().unwrap().success());
}

/// From an audit: a SIGTERM during a long restore was not acted on: the
/// start's time-out extension ended with it, so systemd killed the daemon
/// mid-restore, and a restore that ended in time still served (READY=1)
/// before stopping. Now systemd hears STOPPING=1 at once, the stop's
/// time-out is pushed back, and the daemon stops once the restore ends,
/// never ready.
#[test]
fn a_sigterm_during_the_start_stops_it_without_serving() {
    let HeldStart {
        dir,
        sock,
        mut d,
        conn,
        silent,
        _reap,
    } = held_in_the_restore();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let mut lines = Vec::new();
    // Heard while the restore still waits.
    collect(&sock, &mut lines, |l| has(l, "STOPPING=1"));
    drop((conn, silent));
    collect(&sock, &mut lines, |l| has(l, "STATUS=stopped"));
    assert!(d.wait().unwrap().success());
    assert!(!has(&lines, "READY=1"), "{lines:?}");
    assert!(
        has(
            &lines,
            "STATUS=stopping: recording the restored volumes clean"
        ),
        "{lines:?}"
    );
    let stopping = lines.iter().position(|l| l == "STOPPING=1");
    assert!(
        lines
            .iter()
            .skip(stopping.unwrap_or(0))
            .any(|l| l == "EXTEND_TIMEOUT_USEC=30000000"),
        "{lines:?}"
    );
    // The device missing at the start stays in the state file.
    let saved = std::fs::read_to_string(dir.path().join("state.toml")).unwrap();
    assert!(saved.contains("nqn.2026-12.io.test:silent"), "{saved}");
}

/// From review: NOTIFY_SOCKET may name an abstract socket (`@name`, as
/// systemd gives services in some containers); it was taken for a path,
/// READY=1 never arrived and systemd killed the start.
#[test]
fn the_daemon_notifies_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let dir = tempfile::tempdir().unwrap();
    let name = format!("appliance-notify-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let api = dir.path().join("api.sock");
    let mut d = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["daemon", "--reactors", "1", "--api"])
        .arg(&api)
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _reap = KillOnPanic(d.id());
    let mut lines = Vec::new();
    collect(&sock, &mut lines, |l| has(l, "READY=1"));
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    collect(&sock, &mut lines, |l| has(l, "STATUS=stopped"));
    assert!(d.wait().unwrap().success());
}

/// The shipped unit: `Type=notify` with a watchdog, no error from
/// `systemd-analyze verify` (but the binaries it names, which are not
/// installed here), and hardened to an exposure of at most 4.0 of 10 in
/// `systemd-analyze security` (it was 9.6).
#[test]
fn the_systemd_unit_is_notify_and_hardened() {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/appliance.service");
    let text = std::fs::read_to_string(unit).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=30",
        "NotifyAccess=main",
        "ProtectSystem=strict",
        // A reload that is refused fails `systemctl reload` (applctl
        // waits for the outcome; `kill -HUP` returned at once).
        "ExecReload=/usr/local/bin/applctl --api /run/appliance/api.sock reload",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line}");
    }
    // systemd-analyze wants the unit under its own name.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("appliance.service");
    std::fs::write(&copy, &text).unwrap();
    assert_verifies(&copy);
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&copy)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&security.stdout);
    let level: f64 = out
        .lines()
        .find_map(|l| l.split("exposure level for appliance.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {out}"));
    assert!(level <= 4.0, "exposure {level}");
}

/// `host-setup.sh persist BDF...` writes the oneshot unit that binds the
/// controllers to vfio-pci at boot, before the appliance; a malformed
/// address is refused (exit 2) and nothing is written.
#[test]
fn host_setup_persists_vfio_bindings_as_a_unit() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/host-setup.sh");
    let dir = tempfile::tempdir().unwrap();
    // Any PCI device of this machine: the script checks that it exists.
    let bdf = std::fs::read_dir("/sys/bus/pci/devices")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .min()
        .expect("a PCI device");
    let run = |args: &[&str]| {
        Command::new("bash")
            .arg(script)
            .args(args)
            .env("APPLIANCE_UNIT_DIR", dir.path())
            .output()
            .unwrap()
    };
    let bad = run(&["persist", "12:34"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    let unit = dir.path().join("appliance-vfio.service");
    assert!(!unit.exists());
    let out = run(&["persist", &bdf]);
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        text.lines()
            .any(|l| l == format!("ExecStart=/usr/local/sbin/appliance-host-setup bind {bdf}")),
        "{text}"
    );
    for line in [
        "Before=appliance.service",
        "RequiredBy=appliance.service",
        "Type=oneshot",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line}: {text}");
    }
    assert_verifies(&unit);
}

/// From an audit: every failed start exited 1, so `Restart=on-failure`
/// started a daemon again every 2 s over a state file that could never
/// load. That exits 78 (EX_CONFIG) now, which the unit does not restart.
#[test]
fn a_state_file_that_does_not_load_exits_78_and_is_not_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.toml");
    std::fs::write(&state, "[[device]\nname = \"d0\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["daemon", "--reactors", "1", "--api"])
        .arg(dir.path().join("api.sock"))
        .arg("--state")
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/appliance.service"
    ))
    .unwrap();
    assert!(unit.contains("RestartPreventExitStatus=78"), "{unit}");
}
