//! Growing a device under a live export: the volume follows through its
//! quiesce epoch, queues already running accept the new blocks, the
//! contents are kept, and a frontend that set up the backend request
//! channel is told (CONFIG_CHANGE_MSG) and reads the new capacity.
//! The clients are real: blkio for IO, and the vhost crate's `Frontend`
//! with its `FrontendReqHandler` for the notification.

use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use appliance::config::{DeviceDecl, ExportDecl, VolumeDecl};
use appliance::manager::{Manager, MgmtError};
use poller::{ReactorConfig, Reactors};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::VhostBackend;

mod common;
use common::{pattern, Disk};

#[path = "hostile/guest.rs"]
mod guest;
use guest::{Guest, Setup};

const MIB: u64 = 1 << 20;

fn capacity_bytes(f: &mut Frontend) -> u64 {
    let (_, cfg) = f
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .unwrap();
    u64::from_le_bytes(cfg[..8].try_into().unwrap()) * 512
}

/// What a frontend does on CONFIG_CHANGE_MSG (QEMU's vhost-user-blk):
/// read the configuration space again, then answer.
struct OnChange {
    /// Taken away to disconnect: the handler thread must not keep the
    /// connection open.
    frontend: Mutex<Option<Frontend>>,
    seen: mpsc::Sender<u64>,
    /// The status it answers with (0: applied).
    status: std::sync::atomic::AtomicU64,
}

impl VhostUserFrontendReqHandler for OnChange {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        let mut f = self.frontend.lock().unwrap();
        let cap = capacity_bytes(f.as_mut().ok_or(std::io::ErrorKind::NotConnected)?);
        self.seen.send(cap).unwrap();
        Ok(self.status.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// A frontend with the backend request channel set up; its handler runs
/// on its own thread.
fn frontend_with_channel(sock: &Path) -> (Frontend, mpsc::Receiver<u64>, Arc<OnChange>) {
    let mut f = Frontend::connect(sock, 1).unwrap();
    f.set_owner().unwrap();
    let features = f.get_features().unwrap();
    let want = (1u64 << 32) | (1 << 30); // VERSION_1 | PROTOCOL_FEATURES
    assert_eq!(features & want, want);
    f.set_features(want).unwrap();
    let pf = f.get_protocol_features().unwrap();
    let need = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ;
    assert!(pf.contains(need), "offered {pf:?}");
    f.set_protocol_features(need).unwrap();
    let (rx, on) = backend_channel(&mut f);
    (f, rx, on)
}

/// Set up `f`'s backend request channel, answered as [`OnChange`] does on
/// a thread of its own; the capacities it reads.
fn backend_channel(f: &mut Frontend) -> (mpsc::Receiver<u64>, Arc<OnChange>) {
    let (tx, rx) = mpsc::channel();
    let on = Arc::new(OnChange {
        frontend: Mutex::new(Some(f.clone())),
        seen: tx,
        status: Default::default(),
    });
    let mut handler = FrontendReqHandler::new(on.clone()).unwrap();
    handler.set_reply_ack_flag(true);
    // The handler's own fd is its receiving end; the backend gets the other.
    // SAFETY: the fd belongs to `handler`, alive for the call.
    let tx = unsafe { std::os::fd::BorrowedFd::borrow_raw(handler.get_tx_raw_fd()) };
    f.set_backend_request_fd(&tx).unwrap();
    std::thread::spawn(move || while handler.handle_request().is_ok() {});
    (rx, on)
}

/// A blkio client, once the export takes a connection again (it does after
/// the previous one is gone).
fn connect_again(sock: &Path) -> Disk {
    loop {
        match Disk::connect(sock) {
            Ok(d) => return d,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn fill(d: &mut Disk, seed: u64, offset: u64, len: usize) {
    d.buf()[..len].copy_from_slice(&pattern(seed, offset, len));
    assert_eq!(d.write(offset, len), 0, "write at {offset}");
}

fn check(d: &mut Disk, seed: u64, offset: u64, len: usize) {
    assert_eq!(d.read(offset, len), 0, "read at {offset}");
    assert!(
        d.buf()[..len] == pattern(seed, offset, len)[..],
        "data at {offset} differs"
    );
}

/// A manager on `count` reactors, without a state file, exporting
/// [`export_one_mib`] on a socket in a directory of its own.
fn one_mib_export(count: usize) -> (Reactors, Manager, tempfile::TempDir, std::path::PathBuf) {
    let reactors = Reactors::start(ReactorConfig {
        count,
        ..Default::default()
    })
    .unwrap();
    let m = Manager::new(reactors.set(), None);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("r.sock");
    export_one_mib(&m, &sock);
    (reactors, m, dir, sock)
}

/// Device d0 (1 MiB of RAM), its volume v0 and export e0 on `sock`.
fn export_one_mib(m: &Manager, sock: &Path) {
    m.attach_device(DeviceDecl {
        name: "d0".into(),
        spec: "ram:1M".into(),
        block_size: 4096,
    })
    .unwrap();
    m.create_volume(VolumeDecl::new("v0", "single", &["d0"]), false)
        .unwrap();
    m.create_export(ExportDecl {
        name: "e0".into(),
        volume: "v0".into(),
        socket: sock.to_path_buf(),
        num_queues: 1,
        ..Default::default()
    })
    .unwrap();
}

#[test]
fn a_grown_device_grows_its_volume_and_the_frontend_is_told() {
    let (reactors, m, _dir, sock) = one_mib_export(2);

    // A connected client keeps its queue while the device grows under it.
    let mut d = Disk::connect(&sock).unwrap();
    assert_eq!(d.capacity(), MIB);
    fill(&mut d, 1, 0, 64 << 10);
    fill(&mut d, 2, MIB - 4096, 4096);
    let (view, told) = m.resize_device("d0", 2 * MIB).unwrap();
    assert_eq!(view.num_blocks, 512);
    assert_eq!(view.decl.spec, format!("ram:{}", 2 * MIB));
    assert_eq!(m.get_volume("v0").unwrap().size_bytes, 2 * MIB);
    // blkio sets up no backend request channel: nobody to tell.
    assert!(told.is_empty(), "{told:?}");
    check(&mut d, 1, 0, 64 << 10);
    check(&mut d, 2, MIB - 4096, 4096);
    drop(d);

    // A frontend with the channel hears of the next change, and reads the
    // new size from the configuration space before it answers.
    // (The export takes it once the last connection is gone.)
    let (mut f, seen, on) = frontend_with_channel(&sock);
    assert_eq!(capacity_bytes(&mut f), 2 * MIB);
    let (_, told) = m.resize_device("d0", 4 * MIB).unwrap();
    assert_eq!(told, vec!["e0".to_string()]);
    assert_eq!(
        seen.recv_timeout(Duration::from_secs(10)).unwrap(),
        4 * MIB,
        "the frontend read the old capacity after the notification"
    );
    assert_eq!(capacity_bytes(&mut f), 4 * MIB);
    on.frontend.lock().unwrap().take();
    drop(f);

    // The next client sees the new size, the old data and the new blocks.
    let mut d = connect_again(&sock);
    assert_eq!(d.capacity(), 4 * MIB);
    check(&mut d, 1, 0, 64 << 10);
    check(&mut d, 2, MIB - 4096, 4096);
    fill(&mut d, 3, 4 * MIB - 64 * 1024, 64 << 10);
    check(&mut d, 3, 4 * MIB - 64 * 1024, 64 << 10);
    drop(d);

    // A frontend that passes a file, not a socket, as its channel: the
    // message is refused, and nothing is ever written into the file.
    let bogus = tempfile::tempfile().unwrap();
    let mut f = Frontend::connect(&sock, 1).unwrap();
    f.set_owner().unwrap();
    f.get_features().unwrap();
    f.set_features((1u64 << 32) | (1 << 30)).unwrap();
    f.get_protocol_features().unwrap();
    f.set_protocol_features(
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ,
    )
    .unwrap();
    // The crate's backend refuses it and drops the connection; any answer
    // to the next request (or its failure) means the message was handled.
    let _ = f.set_backend_request_fd(&bogus);
    let _ = f.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8]);
    let (_, told) = m.resize_device("d0", 5 * MIB).unwrap();
    assert!(told.is_empty(), "{told:?}");
    assert_eq!(bogus.metadata().unwrap().len(), 0);
    drop(f);
    let mut d = connect_again(&sock);
    assert_eq!(d.capacity(), 5 * MIB);
    check(&mut d, 3, 4 * MIB - 64 * 1024, 64 << 10);
    drop(d);

    // Refusals change nothing.
    let err = m.resize_device("d0", MIB).unwrap_err();
    assert!(
        matches!(
            err,
            MgmtError::InvalidArgument {
                field: "size_bytes",
                ..
            }
        ),
        "{err:?}"
    );
    let err = m.resize_device("d0", 6 * MIB + 512).unwrap_err();
    assert!(matches!(err, MgmtError::InvalidArgument { .. }), "{err:?}");
    assert!(matches!(
        m.resize_device("nope", 4 * MIB),
        Err(MgmtError::NotFound(_))
    ));
    assert_eq!(m.get_volume("v0").unwrap().size_bytes, 5 * MIB);
    m.shutdown();
    reactors.shutdown().unwrap();
}

/// From an audit: a resize whose state save failed returned before the
/// frontends were told, so the guest kept the old capacity until it
/// reconnected, and a retry of the same size told nobody either. The
/// frontends are told whatever the save does; a retry saves again and
/// tells them again.
#[test]
fn a_resize_whose_save_fails_still_tells_the_frontend_and_a_retry_saves_it() {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.toml");
    let m = Manager::new(reactors.set(), Some(state.clone()));
    let sock = dir.path().join("r.sock");
    export_one_mib(&m, &sock);
    let (f, seen, on) = frontend_with_channel(&sock);
    // The state file cannot be written: a directory holds its place.
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("in-the-way"), b"x").unwrap();
    let err = m.resize_device("d0", 2 * MIB).unwrap_err();
    assert!(matches!(err, MgmtError::Internal(_)), "{err:?}");
    assert_eq!(
        seen.recv_timeout(Duration::from_secs(10)).unwrap(),
        2 * MIB,
        "the frontend was not told"
    );
    // Mended: the retry saves the new size and tells the frontend again.
    std::fs::remove_dir_all(&state).unwrap();
    let (_, told) = m.resize_device("d0", 2 * MIB).unwrap();
    assert_eq!(told, vec!["e0".to_string()]);
    assert_eq!(seen.recv_timeout(Duration::from_secs(10)).unwrap(), 2 * MIB);
    let saved = appliance::config::Config::load(&state).unwrap();
    assert_eq!(saved.devices[0].spec, format!("ram:{}", 2 * MIB));
    on.frontend.lock().unwrap().take();
    drop(f);
    m.shutdown();
    reactors.shutdown().unwrap();
}

#[test]
fn a_raid_member_is_not_resized_under_its_array() {
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let m = Manager::new(reactors.set(), None);
    for n in ["a", "b"] {
        m.attach_device(DeviceDecl {
            name: n.into(),
            spec: "ram:8M".into(),
            block_size: 4096,
        })
        .unwrap();
    }
    m.create_volume(VolumeDecl::new("mirror", "raid1", &["a", "b"]), false)
        .unwrap();
    let size = m.get_volume("mirror").unwrap().size_bytes;
    let err = m.resize_device("a", 16 * MIB).unwrap_err();
    match &err {
        MgmtError::FailedPrecondition(msg) => assert!(msg.contains("mirror"), "{msg}"),
        e => panic!("{e:?}"),
    }
    assert_eq!(m.list_devices()[0].num_blocks, (8 * MIB) / 4096);
    assert_eq!(m.get_volume("mirror").unwrap().size_bytes, size);
    m.shutdown();
    reactors.shutdown().unwrap();
}

/// A 1 MiB RAM volume exported on one reactor: (reactors, export, its
/// directory, its socket).
fn ram_export() -> (
    Reactors,
    appliance::export::Export,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    use appliance::export::{Export, ExportOptions};
    use appliance::volume::Volume;
    use bdev::{BlockDevice, RamDevice};
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("d", 4096, 256).unwrap());
    let volume = Volume::new(reactors.set(), "v", dev);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("v.sock");
    let export =
        Export::create(reactors.set(), &volume, ExportOptions::new(sock.clone(), 1)).unwrap();
    (reactors, export, dir, sock)
}

/// Notifications sent at the same moment (two resizes racing) are each
/// delivered: the second waits for the first's answer rather than finding
/// the channel in use and skipping its message.
#[test]
fn notifications_at_the_same_moment_all_reach_the_frontend() {
    let (reactors, export, _dir, sock) = ram_export();
    let (mut f, seen, on) = frontend_with_channel(&sock);
    assert_eq!(capacity_bytes(&mut f), MIB);
    let rounds = 20;
    for round in 0..rounds {
        let told: Vec<Result<bool, String>> = std::thread::scope(|s| {
            let senders: Vec<_> = (0..2)
                .map(|_| {
                    let n = export.notifier();
                    s.spawn(move || n.config_changed().map_err(|e| e.to_string()))
                })
                .collect();
            senders.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(told, vec![Ok(true), Ok(true)], "round {round}");
    }
    for i in 0..2 * rounds {
        let cap = seen.recv_timeout(Duration::from_secs(10));
        assert_eq!(cap, Ok(MIB), "message {i}");
    }
    on.frontend.lock().unwrap().take();
    drop(f);
    export.delete(true).unwrap();
    reactors.shutdown().unwrap();
}

/// From an audit: a notification that failed (here the frontend answers
/// that it could not apply it) drops the channel for the rest of the
/// connection, as its answers may be out of step. Every later notification
/// on that connection was then taken for a frontend without a channel:
/// Ok(false), nothing logged, and a resize said no frontend was told. It
/// is refused now, saying why; a new connection's channel works again.
#[test]
fn a_channel_that_failed_once_is_reported_on_every_later_notification() {
    let (reactors, export, _dir, sock) = ram_export();
    let (mut f, seen, on) = frontend_with_channel(&sock);
    assert_eq!(capacity_bytes(&mut f), MIB);
    on.status.store(1, std::sync::atomic::Ordering::SeqCst);
    let first = export.notifier().config_changed();
    assert!(
        first
            .as_ref()
            .is_err_and(|e| e.to_string().contains("status 1")),
        "{first:?}"
    );
    assert_eq!(seen.recv_timeout(Duration::from_secs(10)), Ok(MIB));
    for _ in 0..2 {
        let later = export.notifier().config_changed();
        assert!(
            later
                .as_ref()
                .is_err_and(|e| e.to_string().contains("failed earlier on this connection")),
            "{later:?}"
        );
    }
    on.frontend.lock().unwrap().take();
    drop(f);
    // A new connection (served once the old one is gone) with a channel
    // of its own is told again.
    let (mut f, seen, on) = frontend_with_channel(&sock);
    assert_eq!(capacity_bytes(&mut f), MIB);
    assert_eq!(
        export
            .notifier()
            .config_changed()
            .map_err(|e| e.to_string()),
        Ok(true)
    );
    assert_eq!(seen.recv_timeout(Duration::from_secs(10)), Ok(MIB));
    on.frontend.lock().unwrap().take();
    drop(f);
    export.delete(true).unwrap();
    reactors.shutdown().unwrap();
}

/// From an audit: a configuration read past our 60 bytes was refused
/// (a zero-size reply). SPDK's vhost-user initiator reads 256 bytes at
/// once and takes a short reply for a failed device; a frontend may also
/// size its read to a newer struct. Past our fields the space reads as
/// zeros, up to the 256 bytes a frontend may ask for.
#[test]
fn the_whole_config_space_a_frontend_may_read_is_answered() {
    let (reactors, export, _dir, sock) = ram_export();
    let (mut f, _seen, on) = frontend_with_channel(&sock);
    let (_, cfg) = f
        .get_config(0, 256, VhostUserConfigFlags::WRITABLE, &[0u8; 256])
        .expect("SPDK's read of 256 bytes");
    assert_eq!(cfg.len(), 256);
    assert_eq!(u64::from_le_bytes(cfg[..8].try_into().unwrap()) * 512, MIB);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 4096);
    assert!(cfg[60..].iter().all(|&b| b == 0), "{:?}", &cfg[60..]);
    // A read of the tail alone, as of a field newer than ours.
    let (_, tail) = f
        .get_config(60, 36, VhostUserConfigFlags::WRITABLE, &[0u8; 36])
        .expect("a newer field");
    assert_eq!(tail, vec![0u8; 36]);
    // From an audit: the rust-vmm frontends (cloud-hypervisor, Firecracker)
    // read the space at VHOST_USER_CONFIG_OFFSET; that was refused, and
    // such a VM never got its disk.
    let (_, at_0x100) = f
        .get_config(
            vhost::vhost_user::message::VHOST_USER_CONFIG_OFFSET,
            60,
            VhostUserConfigFlags::WRITABLE,
            &[0u8; 60],
        )
        .expect("cloud-hypervisor's read");
    assert_eq!(at_0x100[..], cfg[..60]);
    // The connection still serves.
    assert_eq!(capacity_bytes(&mut f), MIB);
    on.frontend.lock().unwrap().take();
    drop(f);
    export.delete(true).unwrap();
    reactors.shutdown().unwrap();
}

/// QEMU reads the configuration space when it starts, and on a
/// notification only: reconnecting, it does not. A frontend away during a
/// resize (or across a restart of the daemon) kept the old size, and its
/// guest with it, until the VM restarted. It is told once its ring runs.
#[test]
fn a_frontend_back_after_a_resize_it_missed_is_told_once_its_ring_runs() {
    let (reactors, m, _dir, sock) = one_mib_export(1);
    // Its start: it reads the configuration, and its ring runs.
    let first = Guest::setup(
        &sock,
        Setup {
            prepare: Some(&|f, _| assert_eq!(capacity_bytes(f), MIB)),
            ..Default::default()
        },
    );
    drop(first);
    let (_, told) = m.resize_device("d0", 2 * MIB).unwrap();
    assert!(told.is_empty(), "nobody to tell: {told:?}");
    // Back, as QEMU reconnecting: the backend channel set up, the
    // configuration not read.
    // (A prepare step outlives the test: it is 'static.)
    type Channel = Mutex<Option<(mpsc::Receiver<u64>, Arc<OnChange>)>>;
    static CHANNEL: Channel = Mutex::new(None);
    let _back = Guest::setup(
        &sock,
        Setup {
            protocol: VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::BACKEND_REQ,
            prepare: Some(&|f, _| *CHANNEL.lock().unwrap() = Some(backend_channel(f))),
            ..Default::default()
        },
    );
    let (seen, _on) = CHANNEL.lock().unwrap().take().unwrap();
    assert_eq!(
        seen.recv_timeout(Duration::from_secs(30)),
        Ok(2 * MIB),
        "told of the capacity it missed"
    );
    m.shutdown();
    reactors.shutdown().unwrap();
}
