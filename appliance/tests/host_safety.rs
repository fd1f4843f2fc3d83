//! What a careless operator can do to the host through the daemon, and
//! must not: start a second daemon on the same state (it would write the
//! same disks), expose an export's socket to everyone, or have the daemon
//! open and write files it was never meant to touch.

#[path = "cli/daemon.rs"]
mod daemon;

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use daemon::*;

fn ram_config(dir: &std::path::Path) -> std::path::PathBuf {
    let config = dir.join("init.toml");
    std::fs::write(
        &config,
        "[[device]]\nname = \"d0\"\nspec = \"ram:16M\"\n\n[[volume]]\nname = \"vol0\"\nlevel = \"single\"\nmembers = [\"d0\"]\n",
    )
    .unwrap();
    config
}

/// Point 12: a second daemon on the same state file (or API socket) stops
/// at once with a message naming the first, and the first goes on.
#[test]
fn a_second_daemon_on_the_same_state_fails_at_once_and_names_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = ram_config(dir.path());
    let (mut first, api) = start(dir.path(), &config, "127.0.0.1:0");
    let _reap = KillOnPanic(first.id());
    for (api2, what) in [
        (dir.path().join("api2.sock"), "state file"),
        (api.clone(), "API socket"),
    ] {
        let state2 = if what == "state file" {
            dir.path().join("state.toml")
        } else {
            dir.path().join("state2.toml")
        };
        let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
            .args(["daemon", "--reactors", "1", "--api"])
            .arg(&api2)
            .arg("--state")
            .arg(&state2)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a second daemon ran on its {what}");
        assert!(
            err.contains(&format!("pid {}", first.id())) && err.contains(what),
            "{err}"
        );
    }
    // The first daemon still answers on its socket.
    ok(&applctl(&api, &["volume", "list"]));
    assert!(first.try_wait().unwrap().is_none());
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    assert!(first.wait().unwrap().success());
    // Once it is gone, a daemon starts on the same state.
    let mut again = restart(dir.path(), &api, &[], Stdio::null());
    let _reap = KillOnPanic(again.id());
    wait_up(&api, &mut again);
    // SAFETY: as above.
    unsafe { libc::kill(again.id() as i32, libc::SIGTERM) };
    assert!(again.wait().unwrap().success());
}

/// Point 13: an export's socket gets the owner, group and mode asked for
/// (a QEMU that does not run as root can be given access, and only it);
/// a mode or user that does not exist is refused with its field named.
#[test]
fn an_export_socket_gets_the_owner_group_and_mode_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let config = ram_config(dir.path());
    let (mut d, api) = start(dir.path(), &config, "127.0.0.1:0");
    let _reap = KillOnPanic(d.id());
    let sock = dir.path().join("vm.sock");
    let s = sock.to_str().unwrap();
    ok(&applctl(
        &api,
        &[
            "export",
            "create",
            "vm",
            "--volume",
            "vol0",
            "--socket",
            s,
            "--socket-mode",
            "0660",
            "--socket-owner",
            "nobody",
            "--socket-group",
            "65534",
        ],
    ));
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o660);
    assert_eq!((m.uid(), m.gid()), (65534, 65534));
    let listed = ok(&applctl(&api, &["--json", "export", "list"]));
    assert!(listed.contains("\"socket_mode\": \"0660\""), "{listed}");
    for (args, field) in [
        (vec!["--socket-mode", "0999"], "socket_mode"),
        (vec!["--socket-owner", "no-such-user-here"], "socket_owner"),
        (vec!["--socket-group", "no-such-group-here"], "socket_group"),
    ] {
        let sock2 = dir.path().join("vm2.sock");
        let mut a = vec!["export", "create", "vm2", "--volume", "vol0", "--socket"];
        a.push(sock2.to_str().unwrap());
        a.extend(args);
        let out = applctl(&api, &a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(field), "{err}");
        assert!(!sock2.exists(), "a refused export left its socket");
    }
    // The socket keeps its access across a restart (state file).
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(d.wait().unwrap().success());
    let mut d = restart(dir.path(), &api, &[], Stdio::null());
    let _reap = KillOnPanic(d.id());
    wait_up(&api, &mut d);
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o660);
    assert_eq!((m.uid(), m.gid()), (65534, 65534));
    // SAFETY: as above.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(d.wait().unwrap().success());
}

/// A loop device over a file in `dir`, detached when dropped.
struct Loop {
    dev: std::path::PathBuf,
}

impl Loop {
    fn new(dir: &std::path::Path, name: &str) -> Loop {
        let img = dir.join(name);
        std::fs::write(&img, vec![0u8; 16 << 20]).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).unwrap().trim().into();
        Loop { dev }
    }

    fn spec(&self) -> String {
        format!("file:{}", self.dev.display())
    }

    /// Whether this process can claim it exclusively now.
    fn claimable(&self) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&self.dev)
            .is_ok()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dev).output();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
    }
}

fn refused(out: &std::process::Output, code: i32, words: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(words), "{err}");
}

/// Point 11: the API names only paths under the directories the operator
/// allowed (the state directory and /dev/disk/by-id by default, more with
/// --allow-path); a planted symlink is never followed to create or open a
/// file; a block device that is mounted or held is refused, and one the
/// daemon holds cannot be claimed by anybody else.
#[test]
fn devices_are_limited_to_allowed_paths_and_block_devices_to_unused_ones() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let config = ram_config(dir.path());
    let (mut d, api) = start(dir.path(), &config, "127.0.0.1:0");
    let _reap = KillOnPanic(d.id());
    let attach = |name: &str, spec: &str| applctl(&api, &["device", "attach", name, spec]);

    // Outside the allowed directories: nothing is created or opened.
    let victim = outside.path().join("cron-x");
    let passwd_before = std::fs::metadata("/etc/passwd").unwrap().mtime();
    for spec in [
        format!("file:{}:1M", victim.display()),
        "file:/etc/passwd".to_string(),
        format!("file:{}/../x.img:1M", dir.path().display()),
        "file:relative.img:1M".to_string(),
    ] {
        refused(&attach("e", &spec), 8, "allowed");
    }
    assert!(!victim.exists());
    assert_eq!(
        std::fs::metadata("/etc/passwd").unwrap().mtime(),
        passwd_before
    );
    // A symlink inside that leads outside, to a file or as a directory.
    let secret = outside.path().join("secret");
    std::fs::write(&secret, vec![1u8; 1 << 20]).unwrap();
    std::os::unix::fs::symlink(&secret, dir.path().join("link.img")).unwrap();
    refused(
        &attach("e", &format!("file:{}/link.img", dir.path().display())),
        8,
        "symlink",
    );
    std::os::unix::fs::symlink(outside.path(), dir.path().join("sub")).unwrap();
    refused(
        &attach(
            "e",
            &format!("file:{}/sub/new.img:1M", dir.path().display()),
        ),
        8,
        "outside the allowed directories",
    );
    // A dangling symlink planted where a new file would be created: the
    // create does not follow it, and its target is never made.
    let target = dir.path().join("target.img");
    std::os::unix::fs::symlink(&target, dir.path().join("planted.img")).unwrap();
    let out = attach(
        "e",
        &format!("file:{}/planted.img:1M", dir.path().display()),
    );
    assert!(!out.status.success());
    assert!(!target.exists(), "the create followed a planted symlink");
    assert_eq!(std::fs::read(&secret).unwrap(), vec![1u8; 1 << 20]);
    // Inside, a new file is made and attached.
    ok(&attach(
        "f0",
        &format!("file:{}/f0.img:1M", dir.path().display()),
    ));
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(d.wait().unwrap().success());

    // The operator allows more: another directory and /dev.
    let mut d = restart(
        dir.path(),
        &api,
        &[
            "--allow-path",
            outside.path().to_str().unwrap(),
            "--allow-path",
            "/dev",
        ],
        Stdio::null(),
    );
    let _reap = KillOnPanic(d.id());
    wait_up(&api, &mut d);
    ok(&attach("e0", &format!("file:{}:1M", victim.display())));
    assert!(victim.exists());

    // Block devices: one mounted and one claimed by another program are
    // refused as in use; a free one is attached and claimed, so nobody
    // else can claim it until it is detached.
    let held = Loop::new(outside.path(), "held.img");
    let mounted = Loop::new(outside.path(), "mounted.img");
    let free = Loop::new(outside.path(), "free.img");
    let mkfs = Command::new("mkfs.ext4")
        .arg("-q")
        .arg(&mounted.dev)
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{mkfs:?}");
    let mnt = tempfile::tempdir().unwrap();
    let m = Command::new("mount")
        .arg(&mounted.dev)
        .arg(mnt.path())
        .output()
        .unwrap();
    assert!(m.status.success(), "{m:?}");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let _claim = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&held.dev)
            .unwrap();
        refused(&attach("b0", &held.spec()), 5, "in use");
    }
    refused(&attach("b1", &mounted.spec()), 5, "in use");
    ok(&attach("b2", &free.spec()));
    assert!(
        !free.claimable(),
        "the daemon does not hold its block device"
    );
    ok(&applctl(&api, &["device", "detach", "b2"]));
    assert!(free.claimable(), "a detached block device stays claimed");
    // The one that was held is free now and attaches.
    ok(&attach("b0", &held.spec()));
    ok(&applctl(&api, &["device", "detach", "b0"]));
    // SAFETY: as above.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(d.wait().unwrap().success());
}

/// A metrics port already taken stops the daemon before its restore: it
/// assembles nothing and records nothing (it bound the port only after
/// the restore, which had written the state file and the devices by
/// then), and its log names the address. Port 0 takes a free port, which
/// the log names.
#[test]
fn a_metrics_port_in_use_stops_the_daemon_before_it_restores_anything() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    let config = dir.path().join("init.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\nname = \"d0\"\nspec = \"file:{}:16M\"\n\n[[volume]]\nname = \"vol0\"\nlevel = \"single\"\nmembers = [\"d0\"]\n",
            image.display()
        ),
    )
    .unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let Err(log) = try_start(dir.path(), &config, &addr) else {
        panic!("the daemon started on a metrics port in use");
    };
    assert!(
        log.contains(&format!("metrics listener on {addr}")) && log.contains("in use"),
        "{log}"
    );
    assert!(!dir.path().join("state.toml").exists(), "{log}");
    assert!(!image.exists(), "{log}");

    drop(taken);
    let (mut daemon, api) = start(dir.path(), &config, "127.0.0.1:0");
    let _reap = KillOnPanic(daemon.id());
    let metrics = metrics_addr(dir.path());
    let mut s = std::net::TcpStream::connect(&metrics).unwrap();
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).unwrap();
    assert!(body.contains(" 200 OK"), "{body}");
    assert!(body.contains("appliance_volume"), "{body}");
    drop(api);
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
}
