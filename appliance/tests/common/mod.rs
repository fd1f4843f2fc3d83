//! What the VM tests share: the repository, the guest build, booting it.
//! Each test crate uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Build (or reuse) the guest kernel and initramfs.
pub fn guest() -> PathBuf {
    assert!(
        Command::new("qemu-system-x86_64")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok(),
        "qemu-system-x86_64 is missing: run deploy/install-deps.sh test (deploy/test.sh does)"
    );
    let out = Command::new(repo().join("deploy/vmrig/build-guest.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the guest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default(),
    )
}

/// boot.sh for `script` (in appliance/tests/vm) with `files` copied in,
/// the serial console in `log`, and boot.sh `options`; the caller appends
/// QEMU's own arguments (after the `--` already given).
pub fn boot(
    guest: &Path,
    script: &str,
    files: &[PathBuf],
    log: &Path,
    options: &[&str],
) -> Command {
    let mut cmd = Command::new(repo().join("deploy/vmrig/boot.sh"));
    cmd.arg("--guest")
        .arg(guest)
        .arg("--script")
        .arg(repo().join("appliance/tests/vm").join(script));
    for f in files {
        cmd.arg("--file").arg(f);
    }
    cmd.arg("--log")
        .arg(log)
        .args(["--mem", "512", "--timeout", "900"])
        .args(options)
        .arg("--");
    cmd.stdout(Stdio::null());
    cmd
}

/// Wait until the guest prints `line`, failing if it ends first.
pub fn wait_for_line(log: &Path, line: &str, boot: &mut Child) {
    let t = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(line)
    {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "guest never printed {line}"
        );
        assert!(boot.try_wait().unwrap().is_none(), "guest ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
}
