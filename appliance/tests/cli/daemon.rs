//! Running the daemon and applctl as processes, for the command-line and
//! host-safety tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Kills a spawned process if the test panics before stopping it, so a
/// failed test leaves no daemon behind.
pub struct KillOnPanic(pub u32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

/// The newest modification time of the files under `dir`.
fn newest(dir: &Path) -> Option<std::time::SystemTime> {
    let m = std::fs::metadata(dir).ok()?;
    if !m.is_dir() {
        return m.modified().ok();
    }
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest(&e.path()))
        .max()
}

/// applctl, built when it is missing or older than the sources of its
/// crate: `cargo test -p appliance` alone does not build other packages'
/// binaries, and one from an older tree would speak an older API. (Not
/// by running cargo every time: under the test runner's environment that
/// rebuilds it, 10 s a test.)
pub fn applctl_path() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let bin = PathBuf::from(env!("CARGO_BIN_EXE_appliance"));
            let p = bin.with_file_name("applctl");
            let mgmt = Path::new(env!("CARGO_MANIFEST_DIR")).join("../mgmt");
            let built = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
            if built.is_none() || built < newest(&mgmt) {
                let cargo = option_env!("CARGO").unwrap_or("cargo");
                let st = Command::new(cargo)
                    .args(["build", "-q", "-p", "mgmt", "--bin", "applctl"])
                    .current_dir(env!("CARGO_MANIFEST_DIR"))
                    .status()
                    .unwrap();
                assert!(st.success());
            }
            assert!(p.exists(), "{} was not built", p.display());
            p
        })
        .clone()
}

/// A TCP port free on the loopback now. Another test may take it before
/// it is bound: a daemon listening on it is started with
/// `start_on_a_free_port`, and the metrics listener takes port 0 (see
/// `metrics_addr`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn applctl(api: &Path, args: &[&str]) -> Output {
    Command::new(applctl_path())
        .arg("--api")
        .arg(api)
        .args(args)
        .output()
        .unwrap()
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The devices in `volume`'s slots, as `applctl --json volume show` has
/// them.
pub fn volume_members(api: &Path, volume: &str) -> Vec<String> {
    let out = ok(&applctl(api, &["--json", "volume", "show", volume]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {out}"))
        .iter()
        .map(|m| m["device"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The daemon on `config` in `dir`, its metrics on `metrics`, once its
/// API answers.
pub fn start(dir: &Path, config: &Path, metrics: &str) -> (Child, PathBuf) {
    try_start(dir, config, metrics).unwrap_or_else(|log| panic!("{log}"))
}

/// As `start`, but a daemon that stops before its API answers is the
/// caller's to judge: the error holds why, and its log.
pub fn try_start(dir: &Path, config: &Path, metrics: &str) -> Result<(Child, PathBuf), String> {
    let api = dir.join("api.sock");
    let log = dir.join("daemon.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["daemon", "--reactors", "2", "--metrics", metrics, "--api"])
        .arg(&api)
        .arg("--state")
        .arg(dir.join("state.toml"))
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _reap = KillOnPanic(child.id());
    let t = Instant::now();
    while applctl(&api, &["version"]).status.code() != Some(0) {
        // Why it did not come up is in its log: a test that fails here
        // says so (one CI run only said that it had not).
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("the daemon stopped ({status}):\n{}", log_of(&log)));
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the daemon did not come up:\n{}",
            log_of(&log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, api))
}

/// A daemon whose setup (written by `setup` for a directory and a port)
/// listens on a TCP port picked free. Another test may bind that port
/// before the daemon does; the daemon then stops, and it is started
/// again on another port, in a new directory (so that nothing of the
/// try before is restored).
pub fn start_on_a_free_port(
    setup: impl Fn(&Path, u16) -> String,
) -> (tempfile::TempDir, Child, PathBuf, u16) {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("setup.toml");
        std::fs::write(&config, setup(dir.path(), port)).unwrap();
        match try_start(dir.path(), &config, "127.0.0.1:0") {
            Ok((child, api)) => return (dir, child, api, port),
            Err(log) if log.contains("Address already in use") => continue,
            Err(log) => panic!("{log}"),
        }
    }
    panic!("five ports picked free were taken before the daemon bound them")
}

/// The address the daemon started in `dir` by `start` with metrics on
/// port 0 bound for them, as its log says (it binds them before its API
/// answers).
pub fn metrics_addr(dir: &Path) -> String {
    let log = log_of(&dir.join("daemon.log"));
    log.lines()
        .find_map(|l| {
            let rest = &l[l.find("metrics: listening")?..];
            let addr = &rest[rest.find("addr=")? + "addr=".len()..];
            Some(addr.split_whitespace().next().unwrap_or("").to_string())
        })
        .unwrap_or_else(|| panic!("no metrics address in the daemon's log:\n{log}"))
}

/// The daemon's log, as far as it was written.
fn log_of(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_else(|e| format!("({}: {e})", log.display()))
}

/// The daemon again on the state in `dir` (no --config), with `extra`
/// arguments and its log to `stderr`.
pub fn restart(dir: &Path, api: &Path, extra: &[&str], stderr: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["daemon", "--reactors", "2", "--api"])
        .arg(api)
        .arg("--state")
        .arg(dir.join("state.toml"))
        .args(extra)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Wait until the API of `daemon` answers (it must not stop meanwhile).
pub fn wait_up(api: &Path, daemon: &mut Child) {
    let t = Instant::now();
    while applctl(api, &["version"]).status.code() != Some(0) {
        assert!(daemon.try_wait().unwrap().is_none(), "the daemon stopped");
        assert!(t.elapsed() < Duration::from_secs(30), "no restart");
        std::thread::sleep(Duration::from_millis(50));
    }
}
