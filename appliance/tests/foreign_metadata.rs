//! A device the operator names for a new role must not hold what belongs
//! to something else: another volume's superblock, md's metadata, a
//! superblock that cannot be read (a damaged member of a real volume), a
//! journal. Each is refused with a clear status unless forced, as mdadm's
//! --add refuses a device of another array; a former member of the same
//! volume comes back without force (md's re-add).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use appliance::config::{DeviceDecl, VolumeDecl};
use appliance::manager::{Manager, MgmtError};
use appliance::raid::assembly::read_superblock;
use appliance::raid::superblock::SuperblockError;
use bdev::{BlockDevice, FileDevice};
use poller::{ReactorConfig, Reactors};

struct Rig {
    mgr: Manager,
    dir: tempfile::TempDir,
    _reactors: Reactors,
}

fn rig() -> Rig {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let mgr = Manager::new(reactors.set(), None);
    Rig {
        mgr,
        dir: tempfile::tempdir().unwrap(),
        _reactors: reactors,
    }
}

impl Rig {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn attach(&self, names: &[&str]) {
        for n in names {
            self.mgr
                .attach_device(DeviceDecl {
                    name: n.to_string(),
                    spec: format!("file:{}:16M", self.path(n).display()),
                    block_size: 4096,
                })
                .unwrap();
        }
    }

    fn detach(&self, names: &[&str]) {
        for n in names {
            self.mgr.detach_device(n).unwrap();
        }
    }

    fn raid1(&self, name: &str, members: &[&str]) {
        self.mgr
            .create_volume(VolumeDecl::new(name, "raid1", members), false)
            .unwrap();
    }
}

fn refused(r: Result<impl std::fmt::Debug, MgmtError>, what: &str) {
    match r {
        Err(MgmtError::FailedPrecondition(m)) => {
            assert!(m.contains(what), "{m}");
            assert!(m.contains("force"), "{m}");
        }
        other => panic!("not refused ({what}): {other:?}"),
    }
}

fn superblock(path: &Path) -> Result<String, SuperblockError> {
    let dev = FileDevice::open(path, 4096).unwrap();
    let dev: &dyn BlockDevice = &dev;
    read_superblock(dev).unwrap().map(|sb| sb.name)
}

#[test]
fn a_device_of_another_volume_is_no_spare_or_replacement_unless_forced() {
    let rig = rig();
    rig.attach(&["a", "b", "x0", "x1", "blank"]);
    // "other" leaves its superblocks on x0 and x1 when it is stopped: a
    // volume of this appliance (or of another) whose devices are free.
    rig.raid1("other", &["x0", "x1"]);
    rig.mgr.delete_volume("other").unwrap();
    rig.raid1("v", &["a", "b"]);

    refused(rig.mgr.add_spare("v", "x0", false), "\"other\"");
    refused(rig.mgr.replace_member("v", "a", "x1", false), "\"other\"");
    // Nothing was written: "other" can still be assembled from them.
    rig.detach(&["x0", "x1"]);
    assert_eq!(superblock(&rig.path("x0")).unwrap(), "other");
    assert_eq!(superblock(&rig.path("x1")).unwrap(), "other");
    rig.attach(&["x0", "x1"]);

    // A blank device needs no force; forced, another volume's is taken.
    rig.mgr.add_spare("v", "blank", false).unwrap();
    rig.mgr.add_spare("v", "x0", true).unwrap();
    rig.mgr.replace_member("v", "a", "x1", true).unwrap();
    let spares = rig.mgr.get_volume("v").unwrap().spares;
    assert!(spares.contains(&"x0".to_string()), "{spares:?}");
    rig.mgr.delete_volume("v").unwrap();
    rig.detach(&["x0"]);
    assert!(
        superblock(&rig.path("x0")).is_err(),
        "a forced spare is blank until it takes a slot"
    );

    // A journal (of a stopped volume, its writes perhaps not on its
    // members yet): refused; forced, it is a journal no more.
    rig.attach(&["j"]);
    rig.detach(&["j"]);
    {
        let j: std::sync::Arc<dyn BlockDevice> =
            std::sync::Arc::new(FileDevice::open(&rig.path("j"), 4096).unwrap());
        appliance::raid::journal::Journal::format(j).unwrap();
    }
    rig.attach(&["j", "c", "d"]);
    rig.raid1("w", &["c", "d"]);
    refused(rig.mgr.add_spare("w", "j", false), "journal");
    rig.mgr.add_spare("w", "j", true).unwrap();
    rig.mgr.delete_volume("w").unwrap();
    rig.detach(&["j"]);
    let j = FileDevice::open(&rig.path("j"), 4096).unwrap();
    assert!(!appliance::raid::journal::holds_journal(&j));
}

/// From an audit: a single-device volume took any device, one holding a
/// stopped volume's superblock too, and its guest's first writes
/// destroyed that member. Refused unless forced, as for a RAID member;
/// forced, the device is passed through untouched.
#[test]
fn a_device_of_another_volume_is_no_single_volume_unless_forced() {
    let rig = rig();
    rig.attach(&["x0", "x1", "blank"]);
    rig.raid1("other", &["x0", "x1"]);
    rig.mgr.delete_volume("other").unwrap();
    let single = |dev: &str, force: bool| {
        rig.mgr.create_volume(
            VolumeDecl::new(&format!("s-{dev}"), "single", &[dev]),
            force,
        )
    };
    refused(single("x0", false), "\"other\"");
    single("blank", false).unwrap();
    single("x0", true).unwrap();
    rig.mgr.delete_volume("s-x0").unwrap();
    rig.detach(&["x0"]);
    assert_eq!(superblock(&rig.path("x0")).unwrap(), "other");
}

#[test]
fn a_damaged_superblock_is_not_a_blank_device() {
    let rig = rig();
    rig.attach(&["a", "b", "x0", "x1", "c"]);
    rig.raid1("other", &["x0", "x1"]);
    rig.mgr.delete_volume("other").unwrap();
    rig.detach(&["x0"]);
    // One flipped bit inside x0's md superblock (4 KiB in).
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(rig.path("x0"))
        .unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, 4096 + 100).unwrap();
    byte[0] ^= 1;
    f.write_all_at(&byte, 4096 + 100).unwrap();
    drop(f);
    assert!(matches!(
        superblock(&rig.path("x0")),
        Err(SuperblockError::Corrupt { .. })
    ));
    rig.attach(&["x0"]);

    // Not as a member, not as a spare of a new volume, not as a spare or
    // replacement of a running one, not as a journal.
    let decl = VolumeDecl::new("w", "raid1", &["x0", "c"]);
    refused(rig.mgr.create_volume(decl, false), "x0");
    let mut decl = VolumeDecl::new("w", "raid1", &["a", "b"]);
    decl.spares = vec!["x0".into()];
    refused(rig.mgr.create_volume(decl, false), "cannot be used");
    rig.raid1("v", &["a", "b"]);
    refused(rig.mgr.add_spare("v", "x0", false), "cannot be used");
    refused(
        rig.mgr.replace_member("v", "b", "x0", false),
        "cannot be used",
    );
    // Its damaged bytes are still there for whoever repairs it.
    rig.detach(&["x0"]);
    assert!(matches!(
        superblock(&rig.path("x0")),
        Err(SuperblockError::Corrupt { .. })
    ));
}

/// A journal is replayed only over a volume whose superblocks say RAID5:
/// they win over the declaration, and a volume they call a mirror has no
/// parity geometry to keep the log's records inside its data area. The
/// journal was replayed first and refused after, so a record (its nonce
/// and checksum anyone can compute) wrote a member's superblock.
#[test]
fn a_journal_is_not_replayed_over_members_that_say_they_are_a_mirror() {
    use appliance::raid::journal::{Entry, Journal};
    use appliance::raid::superblock::Level;
    let rig = rig();
    rig.attach(&["a", "b", "c", "j"]);
    let mut decl = VolumeDecl::new("v", "raid5", &["a", "b", "c"]);
    decl.journal = Some("j".into());
    rig.mgr.create_volume(decl.clone(), false).unwrap();
    rig.mgr.shutdown();
    let config = restart_config(&rig, &["a", "b", "c", "j"], vec![decl]);
    let open = |n: &str| -> std::sync::Arc<dyn BlockDevice> {
        std::sync::Arc::new(FileDevice::open(&rig.path(n), 4096).unwrap())
    };
    // The members say mirror now.
    for n in ["a", "b", "c"] {
        let dev = open(n);
        let mut sb = read_superblock(dev.as_ref()).unwrap().unwrap();
        sb.level = Level::Raid1;
        appliance::raid::assembly::write_superblock(dev.as_ref(), &sb).unwrap();
        assert_eq!(
            read_superblock(dev.as_ref()).unwrap().unwrap().level,
            Level::Raid1
        );
    }
    // A record for member 0's block 1: md's superblock.
    let jdev = open("j");
    let j = Journal::format(jdev.clone()).unwrap();
    let data = vec![0xaau8; 4096];
    let mut r = j.record(
        &[Entry {
            member: 0,
            count: 1,
            block: 1,
        }],
        &[data.as_slice()],
    );
    let (at, _) = j.reserve(&mut r, true).unwrap();
    OpenOptions::new()
        .write(true)
        .open(rig.path("j"))
        .unwrap()
        .write_all_at(&r, at * 4096)
        .unwrap();
    drop(j);
    drop(jdev);

    // Left out of the start (the rest would start), with why.
    let (mgr, reactors) = restore(&config, None).expect("the start goes on");
    let err = mgr.get_volume("v").expect_err("started").to_string();
    assert!(err.contains("RAID5"), "{err}");
    mgr.shutdown();
    drop(mgr);
    let _ = reactors.shutdown();
    let a = open("a");
    let sb = read_superblock(a.as_ref()).unwrap();
    assert!(
        sb.as_ref().is_ok_and(|sb| sb.name == "v"),
        "member a's superblock was written over: {sb:?}"
    );
}

/// A declared spare that came back holding another volume's superblock
/// (the disk was used elsewhere while the daemon was down) was taken as
/// a spare all the same, and the clean stop wrote this volume's spare
/// mark over the other volume's superblock. It is left out now.
#[test]
fn a_declared_spare_that_belongs_to_another_volume_now_is_left_alone() {
    use appliance::raid::assembly::{create, VolumeSpec};
    use appliance::raid::members::FailureSink;
    use appliance::raid::superblock::Level;
    let rig = rig();
    let config = mirror_with_spare(&rig);
    // Meanwhile the spare's disk became a member of "other".
    let s: std::sync::Arc<dyn BlockDevice> =
        std::sync::Arc::new(FileDevice::open(&rig.path("s"), 4096).unwrap());
    let x: std::sync::Arc<dyn BlockDevice> =
        std::sync::Arc::new(FileDevice::create(&rig.path("x"), 4096, 16 << 20).unwrap());
    create(
        &VolumeSpec::new("other", Level::Raid1, vec![s, x]),
        FailureSink::none(),
        // Over v's spare mark, as whoever took the disk did.
        true,
    )
    .unwrap();

    assert_eq!(restored_spares(&config), Vec::<String>::new());
    assert_eq!(superblock(&rig.path("s")).unwrap(), "other");
}

/// From an audit: a declared spare holding md's spare mark was taken
/// whatever array the mark named; one of another array (its disk moved
/// there while the daemon was down) then had this volume's mark written
/// over it at the clean stop, and could be rebuilt over. Only a mark of
/// this volume's is its spare.
#[test]
fn a_declared_spare_marked_for_another_array_is_left_alone() {
    use appliance::raid::assembly::{create, write_spare_superblocks, VolumeSpec};
    use appliance::raid::members::FailureSink;
    use appliance::raid::superblock::Level;
    let rig = rig();
    let config = mirror_with_spare(&rig);
    let file = |n: &str| -> std::sync::Arc<dyn BlockDevice> {
        std::sync::Arc::new(FileDevice::create(&rig.path(n), 4096, 16 << 20).unwrap())
    };
    let (x0, x1) = (file("x0"), file("x1"));
    create(
        &VolumeSpec::new("other", Level::Raid1, vec![x0.clone(), x1]),
        FailureSink::none(),
        false,
    )
    .unwrap();
    let other = read_superblock(x0.as_ref()).unwrap().unwrap();
    let s: std::sync::Arc<dyn BlockDevice> =
        std::sync::Arc::new(FileDevice::open(&rig.path("s"), 4096).unwrap());
    write_spare_superblocks(&other, std::slice::from_ref(&s));
    let before = std::fs::read(rig.path("s")).unwrap();
    drop(s);

    assert_eq!(restored_spares(&config), Vec::<String>::new());
    assert!(
        std::fs::read(rig.path("s")).unwrap() == before,
        "the other array's spare was written over"
    );
}

/// A declared spare whose metadata cannot be used (a damaged superblock
/// at the spare's mark) refused the whole volume at a restart, and with
/// it the daemon's start: a spare is not needed to start, so it is left
/// out and the volume starts without it, the device untouched.
#[test]
fn a_spare_with_a_damaged_superblock_is_left_out_not_a_refusal() {
    let rig = rig();
    let config = mirror_with_spare(&rig);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(rig.path("s"))
        .unwrap();
    let mut sb = [0u8; 4096];
    f.read_exact_at(&mut sb, 4096).unwrap();
    sb[100] ^= 0x5a;
    f.write_all_at(&sb, 4096).unwrap();
    drop(f);
    assert!(
        !matches!(superblock(&rig.path("s")), Err(SuperblockError::Foreign)),
        "the damage is seen as a superblock that cannot be used"
    );

    assert_eq!(restored_spares(&config), Vec::<String>::new());
    let mut after = [0u8; 4096];
    std::fs::File::open(rig.path("s"))
        .unwrap()
        .read_exact_at(&mut after, 4096)
        .unwrap();
    assert!(after == sb, "the spare's device was written to");
}

/// The spares of volume v restored from `config` (its two members
/// checked), the manager stopped again.
fn restored_spares(config: &appliance::config::Config) -> Vec<String> {
    let (mgr, reactors) = restore(config, None).unwrap();
    let v = mgr.get_volume("v").unwrap();
    assert_eq!(v.members.len(), 2, "{:?}", v.members);
    mgr.shutdown();
    drop(mgr);
    let _ = reactors.shutdown();
    v.spares
}

/// A mirror v over a and b with spare s, made and stopped; the state file
/// it leaves.
fn mirror_with_spare(rig: &Rig) -> appliance::config::Config {
    rig.attach(&["a", "b", "s"]);
    let mut decl = VolumeDecl::new("v", "raid1", &["a", "b"]);
    decl.spares = vec!["s".into()];
    rig.mgr.create_volume(decl.clone(), false).unwrap();
    rig.mgr.shutdown();
    restart_config(rig, &["a", "b", "s"], vec![decl])
}

/// The state file as a manager that has stopped leaves it, the rig's
/// devices named by path (files that exist now).
fn restart_config(
    rig: &Rig,
    devices: &[&str],
    volumes: Vec<VolumeDecl>,
) -> appliance::config::Config {
    appliance::config::Config {
        devices: devices
            .iter()
            .map(|n| DeviceDecl {
                name: n.to_string(),
                spec: format!("file:{}", rig.path(n).display()),
                block_size: 4096,
            })
            .collect(),
        volumes,
        exports: vec![],
        nvmf_exports: vec![],
    }
}

/// A manager on fresh reactors (saving to `state`) restoring `config`;
/// the error if refused.
fn restore(
    config: &appliance::config::Config,
    state: Option<PathBuf>,
) -> Result<(Manager, Reactors), String> {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let mgr = Manager::new(reactors.set(), state);
    match mgr.restore(config, false) {
        Ok(()) => Ok((mgr, reactors)),
        Err(e) => {
            mgr.shutdown_without_saving();
            drop(mgr);
            let _ = reactors.shutdown();
            Err(e.to_string())
        }
    }
}

/// The volume a restart assembles is the one the state file pins by its
/// UUID: among its declared devices, members of another volume of the
/// same name (disks moved in, an md array called the same) were taken
/// for it when their UUID sorted first, their superblocks rewritten and
/// the guest's writes sent to them.
#[test]
fn a_restart_assembles_the_volume_of_its_uuid_not_its_name() {
    use appliance::raid::assembly::{create, write_superblock, VolumeSpec};
    use appliance::raid::members::FailureSink;
    use appliance::raid::superblock::Level;
    let rig = rig();
    rig.attach(&["a", "b", "c", "d"]);
    rig.raid1("v", &["a", "b"]);
    rig.mgr.shutdown();
    // The state file's declaration, as saved: with the UUID.
    let saved = {
        let dev = FileDevice::open(&rig.path("a"), 4096).unwrap();
        let dev: &dyn BlockDevice = &dev;
        read_superblock(dev).unwrap().unwrap().volume_uuid
    };
    let uuid: String = saved.iter().map(|b| format!("{b:02x}")).collect();
    // Another "v" on c and d whose UUID sorts first.
    let open = |n: &str| -> std::sync::Arc<dyn BlockDevice> {
        std::sync::Arc::new(FileDevice::open(&rig.path(n), 4096).unwrap())
    };
    create(
        &VolumeSpec::new("v", Level::Raid1, vec![open("c"), open("d")]),
        FailureSink::none(),
        false,
    )
    .unwrap();
    for n in ["c", "d"] {
        let dev = open(n);
        let mut sb = read_superblock(dev.as_ref()).unwrap().unwrap();
        sb.volume_uuid = [0; 16];
        write_superblock(dev.as_ref(), &sb).unwrap();
    }
    // The state names a and c (c in place of b: a renumbered disk).
    let mut decl = VolumeDecl::new("v", "raid1", &["a", "c"]);
    decl.uuid = uuid.clone();
    let config = restart_config(&rig, &["a", "b", "c", "d"], vec![decl]);
    let (mgr, reactors) = restore(&config, None).expect("v starts from a");
    let c_before = read_superblock(open("c").as_ref()).unwrap().unwrap();
    let v = mgr.get_volume("v").unwrap();
    assert_eq!(v.state, "degraded", "{v:?}");
    assert!(
        v.members.iter().any(|(d, _)| d == "a") && !v.members.iter().any(|(d, _)| d == "c"),
        "{:?}",
        v.members
    );
    mgr.shutdown();
    drop(mgr);
    let _ = reactors.shutdown();
    let c = read_superblock(open("c").as_ref()).unwrap().unwrap();
    assert_eq!(
        c.events, c_before.events,
        "the other v's member was rewritten"
    );
    let a = read_superblock(open("a").as_ref()).unwrap().unwrap();
    assert_eq!(a.volume_uuid, saved);
    drop(rig);
}

/// Each volume's journal is pinned by its identity in the state file:
/// with two volumes' journal devices swapped (renamed, renumbered), a
/// restart replayed the other volume's records over its members, and
/// that volume lost what only its journal held.
#[test]
fn a_journal_of_another_volume_is_not_replayed() {
    let rig = rig();
    let names = ["a0", "a1", "a2", "b0", "b1", "b2", "ja", "jb"];
    rig.attach(&names);
    let mut decls = Vec::new();
    for v in ["a", "b"] {
        let m: Vec<String> = (0..3).map(|i| format!("{v}{i}")).collect();
        let m: Vec<&str> = m.iter().map(|s| s.as_str()).collect();
        let mut decl = VolumeDecl::new(v, "raid5", &m);
        decl.journal = Some(format!("j{v}"));
        rig.mgr.create_volume(decl.clone(), false).unwrap();
        decls.push(decl);
    }
    rig.mgr.shutdown();
    // A start with a state file: what it saves pins each journal.
    let state = rig.path("state.toml");
    let (mgr, reactors) =
        restore(&restart_config(&rig, &names, decls), Some(state.clone())).unwrap();
    mgr.shutdown();
    drop(mgr);
    let _ = reactors.shutdown();
    let saved = appliance::config::Config::load(&state).unwrap();
    assert!(
        saved.volumes.iter().all(|d| d.journal_id.len() == 16),
        "{saved:?}"
    );
    // The journal devices swapped.
    let mut swapped = saved.clone();
    swapped.volumes[0].journal = Some("jb".into());
    swapped.volumes[1].journal = Some("ja".into());
    let (mgr, reactors) = restore(&swapped, None).expect("the start goes on");
    for v in ["a", "b"] {
        let e = mgr
            .get_volume(v)
            .expect_err("started over another volume's journal")
            .to_string();
        assert!(e.contains("another volume's journal"), "{e}");
    }
    mgr.shutdown();
    drop(mgr);
    let _ = reactors.shutdown();
    // As saved, both start.
    let (mgr, reactors) = restore(&saved, None).unwrap();
    mgr.shutdown();
    drop(mgr);
    let _ = reactors.shutdown();
    drop(rig);
}
