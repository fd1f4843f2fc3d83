//! `applctl nvmf` against a daemon process: an NVMe/TCP export made,
//! listed, used by a host, kept across a restart with the same identity,
//! refused on bad input, and deleted.

#[path = "cli/daemon.rs"]
mod daemon;

use daemon::*;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use nvme::spec::{io as cmd, Sqe};
use nvmf::host::{Controller, HostConfig};

const NQN: &str = "nqn.2026-12.io.appliance:cli0";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:cccccccc-0000-0000-0000-000000000003";

fn host() -> HostConfig {
    HostConfig {
        hostnqn: HOST.into(),
        timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

fn rw(op: u8, slba: u64) -> Sqe {
    let mut s = Sqe::new(op, 1);
    s.set_range(slba, 1);
    s
}

#[test]
fn nvmf_exports_are_made_used_kept_and_deleted_through_applctl() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("init.toml");
    std::fs::write(
        &config,
        "[[device]]\nname = \"d0\"\nspec = \"ram:64M\"\n\n[[volume]]\nname = \"v0\"\nlevel = \"single\"\nmembers = [\"d0\"]\n",
    )
    .unwrap();
    let (mut daemon, api) = start(dir.path(), &config, "127.0.0.1:0");
    let metrics = metrics_addr(dir.path());
    let _reap = KillOnPanic(daemon.id());
    // Port 0: the export binds one and says which (a port picked free
    // here could be taken by another test before the daemon bound it).
    let listen = "127.0.0.1:0".to_string();

    let refused = |args: &[&str], code: i32, why: &str| {
        let out = applctl(&api, args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    };
    refused(
        &[
            "nvmf",
            "create",
            "not-an-nqn",
            "--volume",
            "v0",
            "--listen",
            &listen,
            "--host",
            HOST,
        ],
        2,
        "nqn",
    );
    refused(
        &[
            "nvmf",
            "create",
            NQN,
            "--volume",
            "v0",
            "--listen",
            "localhost",
            "--host",
            HOST,
        ],
        2,
        "is not IP:PORT",
    );
    refused(
        &["nvmf", "create", NQN, "--volume", "v0", "--listen", &listen],
        2,
        "no host may connect",
    );
    refused(
        &[
            "nvmf", "create", NQN, "--volume", "nope", "--listen", &listen, "--host", HOST,
        ],
        3,
        "volume nope does not exist",
    );
    refused(
        &[
            "nvmf", "create", NQN, "--volume", "v0", "--listen", &listen, "--host", "bad host",
        ],
        2,
        "is not an NQN",
    );

    let e: serde_json::Value = serde_json::from_str(&ok(&applctl(
        &api,
        &[
            "--json", "nvmf", "create", NQN, "--volume", "v0", "--listen", &listen, "--host", HOST,
        ],
    )))
    .unwrap();
    let nguid = e["nguid"].as_str().unwrap().to_string();
    assert_eq!(nguid.len(), 32, "{e}");
    let listen = e["listen"].as_str().unwrap().to_string();
    assert!(!listen.ends_with(":0"), "{e}");
    refused(
        &[
            "nvmf", "create", NQN, "--volume", "v0", "--listen", &listen, "--host", HOST,
        ],
        4,
        "already exists",
    );
    // The volume is in use while exported.
    refused(&["volume", "delete", "v0"], 5, "delete the export first");

    // A host writes through it and sees the NGUID the API shows.
    let addr: SocketAddr = listen.parse().unwrap();
    let mut c = Controller::connect(addr, NQN, &host()).unwrap();
    c.set_features(0x07, 0).unwrap();
    let ns = c.identify(0, 1).unwrap();
    let seen: String = ns[104..120].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(seen, nguid);
    let mut q = c.io_queue(1, 8).unwrap();
    let data = vec![0x5au8; 4096];
    q.exec(rw(cmd::WRITE, 7), &data, 0).unwrap();
    let list = ok(&applctl(&api, &["nvmf", "list"]));
    assert!(list.contains(NQN) && list.contains(HOST), "{list}");
    // Prometheus sees the export, its host and the write.
    let metrics_text = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&metrics).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    for want in [
        format!("appliance_nvmf_commands_total{{nqn=\"{NQN}\",volume=\"v0\",op=\"write\"}} 1"),
        format!("appliance_nvmf_io_bytes_total{{nqn=\"{NQN}\",volume=\"v0\",op=\"write\"}} 4096"),
        format!("appliance_nvmf_controllers{{nqn=\"{NQN}\",volume=\"v0\"}} 1"),
    ] {
        assert!(
            metrics_text.contains(&want),
            "{want} not in:\n{metrics_text}"
        );
    }
    drop(q);
    drop(c);

    // Kept across a restart, with the same identity.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    let mut daemon = restart(dir.path(), &api, &[], Stdio::null());
    let _reap = KillOnPanic(daemon.id());
    wait_up(&api, &mut daemon);
    let l: serde_json::Value =
        serde_json::from_str(&ok(&applctl(&api, &["--json", "nvmf", "list"]))).unwrap();
    assert_eq!(l["exports"][0]["nguid"], nguid.as_str(), "{l}");
    let mut c = Controller::connect(addr, NQN, &host()).unwrap();
    c.set_features(0x07, 0).unwrap();
    let mut q = c.io_queue(1, 8).unwrap();
    // A RAM device starts blank after a restart; the export is back.
    q.exec(rw(cmd::READ, 7), &[], 4096).unwrap();

    // Deleting it closes the host's queues.
    ok(&applctl(&api, &["nvmf", "delete", NQN]));
    assert!(q.exec(rw(cmd::READ, 7), &[], 4096).is_err());
    refused(&["nvmf", "delete", NQN], 3, "does not exist");
    ok(&applctl(&api, &["volume", "delete", "v0"]));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
}

/// A reload makes, changes and removes NVMe/TCP exports as the file says.
#[test]
fn nvmf_exports_follow_a_reload() {
    use appliance::config::{Config, DeviceDecl, NvmfExportDecl, VolumeDecl};
    let reactors = poller::Reactors::start(poller::ReactorConfig::default()).unwrap();
    let m = appliance::manager::Manager::new(reactors.set(), None);
    let mut config = Config {
        devices: vec![DeviceDecl {
            name: "d".into(),
            spec: "ram:16M".into(),
            block_size: 4096,
        }],
        volumes: vec![VolumeDecl::new("v", "single", &["d"])],
        ..Default::default()
    };
    assert!(m.reload(&config).refused.is_empty());
    config.nvmf_exports.push(NvmfExportDecl {
        nqn: NQN.into(),
        volume: "v".into(),
        listen: "127.0.0.1:0".into(),
        hosts: vec![HOST.into()],
        ..Default::default()
    });
    let rep = m.reload(&config);
    assert_eq!(
        rep.applied,
        vec![format!("create nvme/tcp export {NQN}")],
        "{rep:?}"
    );
    // The port it bound is what the state says from now on.
    let listen = m.list_nvmf_exports()[0].decl.listen.clone();
    config.nvmf_exports[0].listen = listen.clone();
    let addr: SocketAddr = listen.parse().unwrap();
    assert!(Controller::connect(addr, NQN, &host()).is_ok());
    // Nothing changed: nothing done (the NGUID made at creation stays).
    assert_eq!(m.reload(&config), Default::default());
    // Another host list: the export is made again with it.
    config.nvmf_exports[0].hosts = vec!["nqn.2014-08.org.nvmexpress:uuid:other".into()];
    let rep = m.reload(&config);
    assert_eq!(rep.applied.len(), 2, "{rep:?}");
    assert!(
        Controller::connect(addr, NQN, &host()).is_err(),
        "the old host is no longer allowed"
    );
    config.nvmf_exports.clear();
    let rep = m.reload(&config);
    assert_eq!(
        rep.applied,
        vec![format!("delete nvme/tcp export {NQN}")],
        "{rep:?}"
    );
    assert!(m.list_nvmf_exports().is_empty());
    m.shutdown();
}
