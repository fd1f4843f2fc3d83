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
