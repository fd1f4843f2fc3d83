//! A real Linux guest (QEMU, TCG) on the appliance's vhost-user-blk
//! exports: dd and fio with crc32c verification, discard, mkfs.ext4 with
//! files and fsck. The host then checks the guest's data in the backing file.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{boot, guest, wait_for_line};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn serve(socket: &Path, device: &str, queues: u16, serial: &str) -> Server {
    serve_logged(socket, device, queues, serial, Stdio::null())
}

fn serve_logged(socket: &Path, device: &str, queues: u16, serial: &str, log: Stdio) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["serve", "--socket"])
        .arg(socket)
        .args([
            "--device",
            device,
            "--num-queues",
            &queues.to_string(),
            "--serial",
            serial,
        ])
        // Every vhost-user message of the export, so a reconnect that stops
        // half-way shows where.
        .env("RUST_LOG", "info,appliance::export::backend=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !socket.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "appliance did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Server(child)
}

#[test]
fn a_linux_guest_verifies_data_and_runs_ext4_on_the_exports() {
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let img = PathBuf::from(format!("/dev/shm/appliance-vm-{}.img", std::process::id()));
    let _cleanup = Cleanup(img.clone());
    let (sock_a, sock_b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let _a = serve(
        &sock_a,
        &format!("file:{}:256M", img.display()),
        2,
        "vm-test-vda",
    );
    let _b = serve(&sock_b, "ram:128M", 1, "vm-test-vdb");
    let mut pattern = vec![0u8; 16 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut pattern)
        .unwrap();
    let pattern_path = dir.path().join("pattern.bin");
    std::fs::write(&pattern_path, &pattern).unwrap();
    let log = dir.path().join("serial.log");
    let status = boot(
        &guest,
        "vhost-guest.sh",
        std::slice::from_ref(&pattern_path),
        &log,
        &["--smp", "2"],
    )
    .arg("-chardev")
    .arg(format!("socket,id=a,path={}", sock_a.display()))
    .args(["-device", "vhost-user-blk-pci,chardev=a,num-queues=2"])
    .arg("-chardev")
    .arg(format!("socket,id=b,path={}", sock_b.display()))
    .args(["-device", "vhost-user-blk-pci,chardev=b,num-queues=1"])
    .status()
    .unwrap();
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    println!("{serial}");
    assert!(status.success(), "guest failed ({status}):\n{serial}");
    for want in [
        "DD-VERIFY OK",
        "FIO-VERIFY OK",
        "FSCK OK",
        "FILES OK",
        "GUEST-ALL-OK",
    ] {
        assert!(
            serial.contains(want),
            "guest did not report {want}:\n{serial}"
        );
    }
    assert!(
        !serial.contains("I/O error"),
        "the guest saw IO errors:\n{serial}"
    );
    // What the guest wrote is in the backing file, where it put it.
    let data = std::fs::read(&img).unwrap();
    assert!(
        data[1 << 20..17 << 20] == pattern[..],
        "pattern not found in the backing file"
    );
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn the_guest_survives_an_appliance_crash_and_restart_without_io_errors() {
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let img = PathBuf::from(format!(
        "/dev/shm/appliance-vm-restart-{}.img",
        std::process::id()
    ));
    let _cleanup = Cleanup(img.clone());
    let sock = dir.path().join("r.sock");
    let device = format!("file:{}:256M", img.display());
    let mut server = Some(serve(&sock, &device, 1, "vm-restart"));
    let log = dir.path().join("serial.log");
    // It takes about 30 s; a hang in QEMU's reconnect (see
    // .config/nextest.toml) ends at the guest's timeout.
    let mut vm = boot(&guest, "restart-guest.sh", &[], &log, &["--timeout", "240"])
        .arg("-chardev")
        .arg(format!("socket,id=r,path={},reconnect=1", sock.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=r,num-queues=1"])
        .spawn()
        .unwrap();
    // Wait for fio to start, let it run, then crash the appliance (SIGKILL:
    // no chance to drain) and start a new one on the same socket and file.
    wait_for_line(&log, "FIO-START", &mut vm);
    std::thread::sleep(Duration::from_millis(1500));
    let mut s = server.take().unwrap();
    unsafe { libc::kill(s.0.id() as i32, libc::SIGKILL) };
    let _ = s.0.wait();
    std::mem::forget(s);
    std::thread::sleep(Duration::from_millis(500));
    let second_log = dir.path().join("second.log");
    let s2 = serve_logged(
        &sock,
        &format!("file:{}", img.display()),
        1,
        "vm-restart",
        Stdio::from(std::fs::File::create(&second_log).unwrap()),
    );
    let status = vm.wait().unwrap();
    drop(s2);
    let restarted = std::fs::read_to_string(&second_log).unwrap_or_default();
    println!("restarted appliance:\n{restarted}");
    assert!(
        restarted.contains("frontend connected"),
        "QEMU never reconnected:\n{restarted}"
    );
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    println!("{serial}");
    assert!(status.success(), "guest failed ({status}):\n{serial}");
    assert!(serial.contains("FIO-VERIFY OK"), "{serial}");
    assert!(serial.contains("GUEST-ALL-OK"), "{serial}");
    assert!(!serial.contains("I/O error"), "{serial}");
}

fn guest_rides_out_member_failure(
    level: appliance::raid::superblock::Level,
    members: usize,
    script: &str,
) {
    use appliance::export::{Export, ExportOptions};
    use appliance::raid::assembly::{create, VolumeSpec};
    use appliance::raid::members::{FailureSink, MemberState};
    use appliance::raid::monitor::Monitor;
    use appliance::volume::Volume;
    use bdev::{BlockDevice, FaultDevice, RamDevice};
    use std::sync::Arc;

    let guest = guest();
    let reactors = poller::Reactors::start(poller::ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let ram = |n: &str| {
        Arc::new(RamDevice::new(n, 4096, (48 << 20) / 4096 + 256).unwrap()) as Arc<dyn BlockDevice>
    };
    let faults: Vec<Arc<FaultDevice>> = (0..members)
        .map(|i| Arc::new(FaultDevice::new(ram(&format!("m{i}")))))
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let (device, meta) = create(
        &VolumeSpec::new(
            "vmraid",
            level,
            faults
                .iter()
                .map(|f| f.clone() as Arc<dyn BlockDevice>)
                .collect(),
        ),
        FailureSink::new(tx),
        false,
    )
    .unwrap();
    let volume = Volume::new(reactors.set(), "vmraid", device.clone());
    let monitor = Monitor::start(
        reactors.set(),
        volume.clone(),
        device,
        rx,
        vec![ram("spare")],
    );
    monitor.set_meta(meta);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("raid.sock");
    let export = Export::create(
        reactors.set(),
        &volume,
        ExportOptions {
            serial: "vm-raid".into(),
            ..ExportOptions::new(sock.clone(), 1)
        },
    )
    .unwrap();
    let log = dir.path().join("serial.log");
    let mut vm = boot(&guest, script, &[], &log, &[])
        .arg("-chardev")
        .arg(format!("socket,id=r,path={}", sock.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=r,num-queues=1"])
        .spawn()
        .unwrap();
    wait_for_line(&log, "FIO-START", &mut vm);
    std::thread::sleep(Duration::from_millis(1500));
    faults[1].control().pull();
    let status = vm.wait().unwrap();
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    println!("{serial}");
    assert!(status.success(), "guest failed ({status}):\n{serial}");
    assert!(
        serial.contains("FIO-VERIFY OK") && serial.contains("GUEST-ALL-OK"),
        "{serial}"
    );
    // The spare took the failed slot and was rebuilt.
    let t = Instant::now();
    while !monitor
        .member_states()
        .iter()
        .all(|s| *s == MemberState::InSync)
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{:?}",
            monitor.member_states()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(monitor.rebuild().is_some_and(|p| p.fraction() == 1.0));
    export.delete(true).unwrap();
    drop(monitor);
    reactors.shutdown().unwrap();
}

#[test]
fn a_guest_on_a_raid5_export_rides_out_a_member_failure_and_rebuild() {
    guest_rides_out_member_failure(
        appliance::raid::superblock::Level::Raid5,
        4,
        "raid-guest.sh",
    );
}

#[test]
fn a_guest_on_a_raid1_export_rides_out_a_member_failure_and_rebuild() {
    guest_rides_out_member_failure(
        appliance::raid::superblock::Level::Raid1,
        2,
        "raid1-guest.sh",
    );
}

/// The operator grows the device under a running guest's disk: the
/// management call (the manager, as gRPC runs it) resizes the device and
/// its single volume, the export sends CONFIG_CHANGE_MSG, QEMU re-reads
/// the configuration space and interrupts the guest, whose kernel shows
/// the new size; then the guest writes and verifies data in the new part.
#[test]
fn a_running_guest_sees_its_disk_grow() {
    use appliance::config::{DeviceDecl, ExportDecl, VolumeDecl};
    use appliance::manager::Manager;

    let guest = guest();
    let reactors = poller::Reactors::start(poller::ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let m = Manager::new(reactors.set(), None);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("grow.sock");
    let img = dir.path().join("grow.img");
    m.attach_device(DeviceDecl {
        name: "d0".into(),
        spec: format!("file:{}:64M", img.display()),
        block_size: 4096,
    })
    .unwrap();
    m.create_volume(VolumeDecl::new("v0", "single", &["d0"]), false)
        .unwrap();
    m.create_export(ExportDecl {
        name: "e0".into(),
        volume: "v0".into(),
        socket: sock.clone(),
        num_queues: 1,
        read_only: false,
        serial: "vm-grow".into(),
        queue_cores: vec![],
        ..Default::default()
    })
    .unwrap();
    let log = dir.path().join("serial.log");
    let mut vm = boot(&guest, "resize-guest.sh", &[], &log, &[])
        .arg("-chardev")
        .arg(format!("socket,id=g,path={}", sock.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=g,num-queues=1"])
        .spawn()
        .unwrap();
    wait_for_line(&log, "RESIZE-WAIT", &mut vm);
    let (view, told) = m.resize_device("d0", 128 << 20).unwrap();
    assert_eq!(told, vec!["e0".to_string()], "QEMU did not acknowledge");
    assert_eq!(
        view.decl.spec,
        format!("file:{}:{}", img.display(), 128u64 << 20)
    );
    let status = vm.wait().unwrap();
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    println!("{serial}");
    assert!(status.success(), "guest failed ({status}):\n{serial}");
    for want in [
        "vda grew to 262144",
        "FIO-VERIFY OK",
        "HEAD OK",
        "GUEST-ALL-OK",
    ] {
        assert!(
            serial.contains(want),
            "guest did not report {want}:\n{serial}"
        );
    }
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 128 << 20);
    m.shutdown();
    reactors.shutdown().unwrap();
}
