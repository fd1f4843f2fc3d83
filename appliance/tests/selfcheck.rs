//! The embedded-default self-check, in process and as the real binary.

use std::process::Command;
use std::time::Duration;

use appliance::selfcheck::{run_on, start_reactors, SelfCheckOptions};

#[test]
fn selfcheck_verifies_io_on_every_reactor_across_reconfigurations() {
    let opts = SelfCheckOptions {
        reactors: 2,
        duration: Duration::from_millis(800),
        device_mib: 32,
        reconfigure_every: Duration::from_millis(2),
        ..Default::default()
    };
    let reactors = start_reactors(&opts).unwrap();
    let report = run_on(&reactors, &opts).unwrap();
    assert!(report.passed(), "{report:?}");
    for (core, t) in report.per_core.iter().enumerate() {
        assert!(t.ios > 0, "reactor {core} did no IO");
        assert!(t.reads_verified > 0, "reactor {core} verified nothing");
    }
    assert!(report.reconfigurations > 10);
    assert_eq!(report.final_generation, 1 + report.reconfigurations as u64);
    reactors.shutdown().unwrap();
}

#[test]
fn selfcheck_binary_runs_and_exits_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["selfcheck", "--seconds", "0.5", "--device-mib", "32"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("self-check PASSED"), "{stdout}");
    assert!(stdout.contains("reactors stopped cleanly"), "{stdout}");
}

#[test]
fn selfcheck_refuses_bad_arguments_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["selfcheck", "--seconds", "-1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["selfcheck", "--seconds", "nan"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seconds"));
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["selfcheck", "--reactors", "0", "--seconds", "0.1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reactor count"));
}

#[test]
fn keep_mode_idles_near_zero_cpu_and_stops_on_sigint() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args([
            "selfcheck",
            "--seconds",
            "0.2",
            "--device-mib",
            "32",
            "--keep",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // Wait until the self-check is over and the daemon says it idles.
    for line in lines.by_ref() {
        let line = line.unwrap();
        let idle = line.contains("running idle");
        seen.push(line);
        if idle {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("self-check PASSED")),
        "{seen:?}"
    );
    // Let the reactors pass their idle spin and settle.
    std::thread::sleep(Duration::from_millis(300));
    let ticks = |pid: i32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = (ticks(pid) - before) as f64 / 100.0 / 2.0;
    assert!(used < 0.05, "idle daemon used {:.1} % CPU", used * 100.0);
    unsafe { libc::kill(pid, libc::SIGINT) };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("reactors stopped cleanly")),
        "{rest:?}"
    );
}

#[test]
fn the_demo_survives_a_member_failure_and_verifies_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("demo.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args([
            "demo",
            "--member-mib",
            "16",
            "--before-failure",
            "0.5",
            "--socket",
        ])
        .arg(&sock)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rebuild finished"), "{stdout}");
    assert!(stdout.contains(" 0 mismatches, 0 errors"), "{stdout}");
    assert!(stdout.contains("demo PASSED"), "{stdout}");
    assert!(!sock.exists(), "socket removed at exit");
}
