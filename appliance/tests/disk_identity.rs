//! A single-device volume has no superblock to say which disk it is on:
//! the state file names its device by address. A disk swapped in at that
//! address (a drive replaced in the same PCI slot, a remote target serving
//! another namespace under the same NQN) was given to the guest at the
//! next start, and the guest's writes went over another disk's data. The
//! disk's own name (its NGUID here) is recorded now, and a start on
//! another disk leaves the volume out, saying why.

use std::net::SocketAddr;
use std::path::Path;

use appliance::config::{Config, DeviceDecl, VolumeDecl};
use appliance::manager::{Manager, MgmtError};
use appliance::nvmf::{SubsystemOptions, Target};
use appliance::volume::Volume;
use bdev::RamDevice;
use poller::{ReactorConfig, Reactors};

const NQN: &str = "nqn.2026-12.io.appliance:identity";

fn reactors() -> Reactors {
    Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap()
}

/// Serve `volume` as namespace 1 of [`NQN`] on `listen`, its NGUID `nguid`.
fn serve(target: &Target, volume: &Volume, listen: SocketAddr, nguid: [u8; 16]) -> SocketAddr {
    target
        .add(
            volume,
            SubsystemOptions {
                nqn: NQN.into(),
                listen,
                hosts: vec![],
                allow_any_host: true,
                serial: "identity".into(),
                nguid,
                read_only: false,
            },
        )
        .unwrap()
        .opts
        .listen
}

/// The appliance: a manager saving to `state`, started from it if it
/// exists, and its reactors.
fn start(state: &Path) -> (Manager, Reactors) {
    let r = reactors();
    let mgr = Manager::new(r.set(), Some(state.to_path_buf()));
    if state.exists() {
        mgr.restore(&Config::load(state).unwrap(), false)
            .expect("the start goes on");
    }
    (mgr, r)
}

fn stop((mgr, r): (Manager, Reactors)) {
    mgr.shutdown();
    drop(mgr);
    let _ = r.shutdown();
}

fn device_id(state: &Path) -> String {
    Config::load(state).unwrap().volumes[0].device_id.clone()
}

#[test]
fn a_single_volume_is_not_started_on_another_disk_at_its_address() {
    let remote = reactors();
    let disk = |name: &str| {
        Volume::new(
            remote.set(),
            name,
            std::sync::Arc::new(RamDevice::new(name, 4096, 4096).unwrap()),
        )
    };
    let (a, b) = (disk("a"), disk("b"));
    let (id_a, id_b) = ([0xa1; 16], [0xb2; 16]);
    let name_a = format!("nguid.{}", "a1".repeat(16));
    let name_b = format!("nguid.{}", "b2".repeat(16));
    let target = Target::new(remote.set());
    let addr = serve(&target, &a, "127.0.0.1:0".parse().unwrap(), id_a);

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.toml");
    let app = start(&state);
    app.0
        .attach_device(DeviceDecl {
            name: "r".into(),
            spec: format!("nvmf-tcp://{addr}/{NQN}/1"),
            block_size: 4096,
        })
        .unwrap();
    app.0
        .create_volume(VolumeDecl::new("v", "single", &["r"]), false)
        .unwrap();
    assert_eq!(device_id(&state), name_a, "recorded at creation");
    stop(app);

    // Another disk under the same NQN at the same address.
    target.remove(NQN).unwrap();
    serve(&target, &b, addr, id_b);
    let app = start(&state);
    match app.0.get_volume("v") {
        Err(MgmtError::FailedPrecondition(m)) => {
            assert!(m.contains(&name_a) && m.contains(&name_b), "{m}")
        }
        other => panic!("the volume started on another disk: {other:?}"),
    }
    let listed = app.0.volume_listing().1;
    assert!(
        listed.len() == 1 && listed[0].reason.contains(&name_b),
        "{listed:?}"
    );
    assert_eq!(device_id(&state), name_a, "kept as it was");
    stop(app);

    // Its own disk back: it starts.
    target.remove(NQN).unwrap();
    serve(&target, &a, addr, id_a);
    let app = start(&state);
    app.0.get_volume("v").expect("started on its own disk");
    stop(app);

    // The operator takes the other disk for the volume, as the refusal
    // says: the state file names it, and a reload starts the volume.
    target.remove(NQN).unwrap();
    serve(&target, &b, addr, id_b);
    let app = start(&state);
    assert!(app.0.get_volume("v").is_err());
    let mut edited = Config::load(&state).unwrap();
    edited.volumes[0].device_id = name_b.clone();
    edited.save(&state).unwrap();
    let rep = app.0.reload_file(&state).unwrap();
    assert!(rep.refused.is_empty(), "{rep:?}");
    app.0.get_volume("v").expect("started on the disk named");
    assert_eq!(device_id(&state), name_b);
    stop(app);
}

/// A state file of an older version names no disk: the volume starts on
/// the one there, which is recorded from then on.
#[test]
fn a_single_volume_saved_without_its_disk_records_the_one_it_starts_on() {
    let remote = reactors();
    let volume = Volume::new(
        remote.set(),
        "a",
        std::sync::Arc::new(RamDevice::new("a", 4096, 4096).unwrap()),
    );
    let target = Target::new(remote.set());
    let addr = serve(&target, &volume, "127.0.0.1:0".parse().unwrap(), [7; 16]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.toml");
    let mut old = Config::default();
    old.devices.push(DeviceDecl {
        name: "r".into(),
        spec: format!("nvmf-tcp://{addr}/{NQN}/1"),
        block_size: 4096,
    });
    old.volumes.push(VolumeDecl::new("v", "single", &["r"]));
    old.save(&state).unwrap();
    let app = start(&state);
    app.0.get_volume("v").expect("started");
    assert_eq!(device_id(&state), format!("nguid.{}", "07".repeat(16)));
    stop(app);
}
