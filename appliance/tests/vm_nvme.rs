//! The NVMe driver on real (emulated) controllers through VFIO: the
//! appliance runs inside a QEMU guest (q35, intel-iommu with caching mode,
//! five emulated NVMe controllers), binds them to vfio-pci and runs its
//! demo on them: a RAID5 over four namespaces with the fifth as hot spare,
//! exported over vhost-user-blk to a blkio client that verifies every
//! block. QEMU makes one controller fail mid-run (every IO after its 400th
//! gets an error status, through blkdebug); the volume goes on degraded,
//! rebuilds onto the spare, and no read returns wrong data.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{boot, guest};

/// What both guests take into /rig: the appliance (stripped: an unstripped
/// debug binary is ~150 MB and the guest needs only the code), the C
/// runtime's unwinder it links, and the script that binds the controllers.
fn rig_files(dir: &std::path::Path) -> Vec<PathBuf> {
    vec![
        stripped_appliance(dir),
        PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
        common::repo().join("appliance/tests/vm/vfio-bind-nvme.sh"),
    ]
}

/// QEMU's emulated NVMe controller `i` on drive `nv{i}`, 4 KiB blocks.
fn nvme_device(i: usize) -> String {
    format!("nvme,serial=appl{i},drive=nv{i},logical_block_size=4096,physical_block_size=4096")
}

/// Run the guest to its end; its serial console, once it succeeded.
fn run_guest(cmd: &mut Command, log: &std::path::Path) -> String {
    let status = cmd.status().unwrap();
    let serial = std::fs::read_to_string(log).unwrap_or_default();
    println!("{serial}");
    assert!(status.success(), "guest failed ({status}):\n{serial}");
    serial
}

fn stripped_appliance(dir: &std::path::Path) -> PathBuf {
    let out = dir.join("appliance");
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(env!("CARGO_BIN_EXE_appliance"))
        .arg(&out)
        .status()
        .expect("objcopy (binutils) runs");
    assert!(status.success(), "objcopy failed");
    out
}

/// blkdebug rules: count read and write requests (state k -> k+1), then
/// fail every request from state `after` on with EIO, which QEMU's NVMe
/// controller reports as a media error status.
fn failing_rules(after: u32) -> String {
    let mut s = String::new();
    for k in 1..after {
        for ev in ["read_aio", "write_aio"] {
            s += &format!(
                "[set-state]\nstate = \"{k}\"\nevent = \"{ev}\"\nnew_state = \"{}\"\n\n",
                k + 1
            );
        }
    }
    for ev in ["read_aio", "write_aio"] {
        s += &format!("[inject-error]\nstate = \"{after}\"\nevent = \"{ev}\"\nerrno = \"5\"\n\n");
    }
    s
}

#[test]
fn a_raid5_over_nvme_controllers_through_vfio_survives_one_failing() {
    let guest = guest();
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let rules = dir.path().join("fail.conf");
    std::fs::write(&rules, failing_rules(400)).unwrap();
    let log = dir.path().join("serial.log");
    let mut cmd = boot(
        &guest,
        "nvme-guest.sh",
        &rig_files(dir.path()),
        &log,
        &["--mem", "1024", "--append", "intel_iommu=on iommu=pt"],
    );
    // The IOMMU must exist before the devices it translates.
    cmd.args([
        "-machine",
        "kernel-irqchip=split",
        "-device",
        "intel-iommu,intremap=on,caching-mode=on",
    ]);
    for i in 0..5 {
        let img = dir.path().join(format!("nvme{i}.img"));
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(48 << 20).unwrap();
        let drive = if i == 2 {
            format!(
                "if=none,id=nv{i},format=raw,file.driver=blkdebug,file.config={},file.image.filename={}",
                rules.display(),
                img.display()
            )
        } else {
            format!("if=none,id=nv{i},format=raw,file={}", img.display())
        };
        cmd.arg("-drive").arg(drive);
        cmd.arg("-device").arg(nvme_device(i));
    }
    let serial = run_guest(&mut cmd, &log);
    assert_eq!(
        serial.matches("NVMe controller ready").count(),
        5,
        "five controllers brought up through VFIO"
    );
    assert!(
        serial.contains("rebuild onto spare"),
        "the failing controller's member was replaced by the spare"
    );
    assert!(
        serial.contains("demo PASSED"),
        "every block verified, no errors"
    );
    assert!(
        serial.contains("DMAR-FAULTS 0"),
        "no DMA outside what the driver mapped"
    );
}

/// The same driver without an IOMMU: VFIO's no-IOMMU mode (a vfio module
/// built with it, as Debian's is not), DMA by physical address from
/// /proc/self/pagemap, queues and bounce buffers in hugepages. A RAID5 over
/// three controllers loses a member mid-run and is rebuilt onto the fourth
/// while every block is verified.
#[test]
fn a_raid5_over_nvme_controllers_without_an_iommu_survives_a_pulled_member() {
    let guest = guest();
    let out = Command::new(common::repo().join("deploy/vmrig/build-vfio-noiommu.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building vfio with the no-IOMMU mode: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ko = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let module = dir.path().join("vfio-noiommu.ko");
    std::fs::copy(&ko, &module).unwrap();
    let mut files = rig_files(dir.path());
    files.push(module);
    let log = dir.path().join("serial.log");
    let mut cmd = boot(
        &guest,
        "nvme-noiommu-guest.sh",
        &files,
        &log,
        &["--mem", "1024"],
    );
    for i in 0..4 {
        let img = dir.path().join(format!("nvme{i}.img"));
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(32 << 20).unwrap();
        cmd.arg("-drive").arg(format!(
            "if=none,id=nv{i},format=raw,file={}",
            img.display()
        ));
        cmd.arg("-device").arg(nvme_device(i));
    }
    let serial = run_guest(&mut cmd, &log);
    assert!(serial.contains("no-IOMMU mode: Y"), "{serial}");
    assert_eq!(
        serial
            .matches("NVMe controller opened through VFIO without an IOMMU")
            .count(),
        4,
        "four controllers opened in no-IOMMU mode"
    );
    assert_eq!(serial.matches("NVMe controller ready").count(), 4);
    assert!(serial.contains("rebuild onto spare"), "{serial}");
    assert!(
        serial.contains("demo PASSED"),
        "every block verified, no errors"
    );
}
