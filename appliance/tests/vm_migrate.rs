//! Live migration of a QEMU guest (TCG) whose disk is a vhost-user-blk
//! export of a RAID5: the destination QEMU starts with -incoming and its own
//! export of the same volume, the source migrates to it over a unix socket
//! while fio writes and verifies in the guest, and then the guest migrates
//! back to a third QEMU on the first export. fio finishes on the last one
//! with no IO error and every block verified.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{boot, guest, wait_for_line};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// A QEMU (through boot.sh) that is killed if the test ends early.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            // boot.sh's process group: QEMU with it.
            unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }
}

fn wait_for(path: &Path, what: &str) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what} never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A QMP connection.
struct Qmp(BufReader<UnixStream>);

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        wait_for(path, "the QMP socket");
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(t.elapsed() < Duration::from_secs(30), "QMP: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = Qmp(BufReader::new(s));
        let mut greeting = String::new();
        q.0.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("QMP"), "{greeting}");
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    /// Send a command and return its answer (events are skipped).
    fn cmd(&mut self, c: &str) -> serde_json::Value {
        self.0.get_mut().write_all(c.as_bytes()).unwrap();
        self.0.get_mut().write_all(b"\n").unwrap();
        loop {
            let mut line = String::new();
            assert!(self.0.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_some() {
                eprintln!("QMP event: {line}");
            }
            if v.get("return").is_some() || v.get("error").is_some() {
                assert!(v.get("error").is_none(), "{c}: {v}");
                return v["return"].clone();
            }
        }
    }

    /// Migrate to `uri` and wait until it completed; how long it took.
    fn migrate(&mut self, uri: &str) -> Duration {
        let t = Instant::now();
        // As fast as the host goes: the default 128 MiB/s makes a 512 MiB
        // guest take seconds longer.
        self.cmd(
            r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":10737418240}}"#,
        );
        self.cmd(&format!(
            r#"{{"execute":"migrate","arguments":{{"uri":"{uri}"}}}}"#
        ));
        loop {
            let s = self.cmd(r#"{"execute":"query-migrate"}"#);
            match s["status"].as_str().unwrap_or("") {
                "completed" => return t.elapsed(),
                "failed" | "cancelled" => panic!("migration {uri}: {s}"),
                _ => {}
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "migration hangs: {s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A QEMU of the test guest on `sock`'s export, with QMP at `qmp`,
/// waiting for a migration at `incoming` if given.
fn qemu(guest: &Path, log: &Path, sock: &Path, qmp: &Path, incoming: Option<&Path>) -> Vm {
    let mut cmd = boot(guest, "migrate-guest.sh", &[], log, &["--timeout", "400"]);
    cmd.arg("-chardev")
        .arg(format!("socket,id=d,path={},reconnect=1", sock.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=d,num-queues=1"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(i) = incoming {
        cmd.arg("-incoming").arg(format!("unix:{}", i.display()));
    }
    // Its own process group, so a failed test takes QEMU with boot.sh.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    Vm(cmd.spawn().unwrap())
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

// Not in the suite yet: under TCG here it fails in about half the runs, and
// not only through the appliance. The guest kernel panicked on the first
// destination in 1 of 4 runs with fio; and with no vhost-user disk at all
// (a guest busy writing tmpfs) the source QEMU's QMP connection broke right
// after a completed migration in 2 of 4 runs. Run it by hand with
// `cargo nextest run -p appliance --test vm_migrate --run-ignored all`.
#[test]
#[ignore = "flaky under TCG on this rig (see above); run by hand"]
fn a_guest_on_a_raid5_export_migrates_there_and_back_under_verified_writes() {
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (d.join("a.sock"), d.join("b.sock"));
    let config = d.join("migrate.toml");
    let mut toml = String::new();
    for i in 0..3 {
        toml += &format!("[[device]]\nname = \"m{i}\"\nspec = \"ram:64M\"\n\n");
    }
    toml += "[[volume]]\nname = \"v\"\nlevel = \"raid5\"\nmembers = [\"m0\", \"m1\", \"m2\"]\nchunk_kib = 64\n\n";
    for (name, sock) in [("a", &a), ("b", &b)] {
        toml += &format!(
            "[[export]]\nname = \"{name}\"\nvolume = \"v\"\nsocket = \"{}\"\nlive_migration = true\n\n",
            sock.display()
        );
    }
    std::fs::write(&config, toml).unwrap();
    let daemon_log = d.join("daemon.log");
    let _daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_appliance"))
            .arg("daemon")
            .arg("--api")
            .arg(d.join("api.sock"))
            .arg("--state")
            .arg(d.join("state.toml"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,appliance::export::backend=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&daemon_log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for(&a, "export a");
    wait_for(&b, "export b");

    let logs: Vec<PathBuf> = (0..3).map(|i| d.join(format!("serial{i}.log"))).collect();
    let qmps: Vec<PathBuf> = (0..3).map(|i| d.join(format!("qmp{i}.sock"))).collect();
    let migs: Vec<PathBuf> = (0..2).map(|i| d.join(format!("mig{i}.sock"))).collect();

    // The source runs fio on export a.
    let mut src = qemu(&guest, &logs[0], &a, &qmps[0], None);
    wait_for_line(&logs[0], "FIO-START", &mut src.0);
    std::thread::sleep(Duration::from_secs(2));

    // To a destination on export b, while fio runs.
    let dst = qemu(&guest, &logs[1], &b, &qmps[1], Some(&migs[0]));
    let mut q0 = Qmp::connect(&qmps[0]);
    let mut q1 = Qmp::connect(&qmps[1]);
    wait_for(&migs[0], "the destination's migration socket");
    let there = q0.migrate(&format!("unix:{}", migs[0].display()));
    q0.cmd(r#"{"execute":"quit"}"#);
    let _ = src.0.wait();
    assert!(
        !read(&logs[0]).contains("FIO-VERIFY OK"),
        "fio finished before the migration: it proves nothing\n{}",
        read(&logs[0])
    );
    std::thread::sleep(Duration::from_secs(2));

    // And back, to a new QEMU on export a (its first frontend is gone).
    let mut back = qemu(&guest, &logs[2], &a, &qmps[2], Some(&migs[1]));
    let _q2 = Qmp::connect(&qmps[2]);
    wait_for(&migs[1], "the second destination's migration socket");
    let back_time = q1.migrate(&format!("unix:{}", migs[1].display()));
    q1.cmd(r#"{"execute":"quit"}"#);
    drop(dst);
    println!("migration there {there:?}, back {back_time:?}");

    let status = back.0.wait().unwrap();
    let serial = read(&logs[2]);
    println!(
        "source:\n{}\nfirst destination:\n{}\nlast:\n{serial}",
        read(&logs[0]),
        read(&logs[1])
    );
    println!("daemon:\n{}", read(&daemon_log));
    assert!(status.success(), "guest failed ({status}):\n{serial}");
    assert!(serial.contains("FIO-VERIFY OK"), "{serial}");
    assert!(serial.contains("GUEST-ALL-OK"), "{serial}");
    let daemon = read(&daemon_log);
    assert!(daemon.contains("dirty logging"), "{daemon}");
}
