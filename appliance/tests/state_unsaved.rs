//! What the API answers when the state file cannot be written: the change
//! stays made (it runs), the caller hears that it will not survive a
//! restart, and nothing keeps running that the call said was gone.

use appliance::config::{DeviceDecl, NvmfExportDecl, VolumeDecl};
use appliance::manager::{Manager, MgmtError};
use poller::{ReactorConfig, Reactors};

fn ram(name: &str) -> DeviceDecl {
    DeviceDecl {
        name: name.into(),
        spec: "ram:16M".into(),
        block_size: 4096,
    }
}

/// The state file's place taken by a directory that is not empty: every
/// save fails (a full or read-only filesystem does the same).
fn break_state(path: &std::path::Path) {
    std::fs::remove_file(path).unwrap();
    std::fs::create_dir(path).unwrap();
    std::fs::write(path.join("keep"), b"x").unwrap();
}

/// A manager on one reactor keeping its state file in a directory of its
/// own: (reactors, directory, state file, manager).
fn manager() -> (Reactors, tempfile::TempDir, std::path::PathBuf, Manager) {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.toml");
    let mgr = Manager::new(reactors.set(), Some(state.clone()));
    (reactors, dir, state, mgr)
}

fn unsaved(r: Result<impl std::fmt::Debug, MgmtError>) -> bool {
    matches!(r, Err(MgmtError::Internal(m)) if m.contains("saving the state failed"))
}

/// From an audit: a RAID change logged its failed save and answered OK,
/// so a setting kept only in the state file was gone at the next start.
/// And deleting an NVMe/TCP export returned at the failed save before the
/// subsystem was stopped: hosts went on being served by an export the API
/// said was gone (a second delete: NotFound; a new one: AlreadyExists).
#[test]
fn a_change_whose_state_cannot_be_saved_says_so_and_a_deleted_export_stops() {
    let (reactors, _dir, state, mgr) = manager();
    for d in ["a", "b"] {
        mgr.attach_device(ram(d)).unwrap();
    }
    mgr.create_volume(VolumeDecl::new("v", "raid1", &["a", "b"]), false)
        .unwrap();
    let nqn = "nqn.2026-12.io.example:v";
    mgr.create_nvmf_export(NvmfExportDecl {
        nqn: nqn.into(),
        volume: "v".into(),
        listen: "127.0.0.1:0".into(),
        allow_any_host: true,
        ..Default::default()
    })
    .unwrap();
    let listen = mgr.list_nvmf_exports()[0].decl.listen.clone();
    std::net::TcpStream::connect(&listen).expect("the export listens");
    break_state(&state);

    assert!(unsaved(mgr.set_serialize("v", true)));
    assert!(mgr.get_volume("v").unwrap().serialize, "the change is made");

    assert!(unsaved(mgr.delete_nvmf_export(nqn)));
    assert!(mgr.list_nvmf_exports().is_empty());
    assert!(
        std::net::TcpStream::connect(&listen).is_err(),
        "the deleted export still listens"
    );
    mgr.shutdown();
    drop(mgr);
    reactors.shutdown().unwrap();
}

/// From review: a journal given with the state file unwritable answered OK
/// (only the state file names it: a start without it there never replays
/// what write-back acknowledged), and one taken away returned at the
/// failed save before its device was erased (a state file still naming
/// it would replay its old log over later writes).
#[test]
fn a_journal_added_or_removed_whose_state_cannot_be_saved_says_so() {
    let (reactors, _dir, state, mgr) = manager();
    for d in ["a", "b", "c", "j"] {
        mgr.attach_device(ram(d)).unwrap();
    }
    mgr.create_volume(VolumeDecl::new("v", "raid5", &["a", "b", "c"]), false)
        .unwrap();
    break_state(&state);
    assert!(unsaved(mgr.add_journal("v", "j", "write-back", false)));
    let js = mgr
        .get_volume("v")
        .unwrap()
        .journal_state
        .expect("attached");
    // From an audit: it went write-back all the same, acknowledging
    // writes from a log no state file names (a crash lost them).
    assert_eq!(
        js.mode,
        appliance::raid::journal::JournalMode::WriteThrough,
        "write-back before the state file names the journal"
    );
    assert!(unsaved(mgr.remove_journal("v")));
    assert!(mgr.get_volume("v").unwrap().journal_state.is_none());
    let j = mgr
        .list_devices()
        .into_iter()
        .find(|d| d.decl.name == "j")
        .unwrap();
    assert_eq!(j.used_by, "", "the journal's device is let go");
    // Erased: taken again without force; saved, it goes write-back.
    std::fs::remove_dir_all(&state).unwrap();
    let v = mgr.add_journal("v", "j", "write-back", false).unwrap();
    assert_eq!(
        v.journal_state.map(|j| j.mode),
        Some(appliance::raid::journal::JournalMode::WriteBack)
    );
    let saved = appliance::config::Config::load(&state).unwrap();
    assert_eq!(saved.volumes[0].journal_mode, "write-back");
    mgr.shutdown();
    drop(mgr);
    reactors.shutdown().unwrap();
}
