//! Linux's own NVMe/TCP host in a QEMU guest (nvme_tcp, nvme-cli) against
//! the appliance daemon on the host, through QEMU's user-mode network:
//! discovery, connect, fio with crc32c verification on a RAID5 while a
//! member fails and is rebuilt, ext4 and fsck, a resize seen through the
//! asynchronous event, and the appliance killed and restarted under fio
//! while the kernel reconnects.

mod common;
#[path = "cli/daemon.rs"]
mod daemon;

use std::process::Stdio;
use std::time::Duration;

use common::{boot, guest, wait_for_line};
use daemon::*;

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5a5a5a5a-1111-2222-3333-444444444444";
const HOSTID: &str = "5a5a5a5a-1111-2222-3333-444444444444";
const R5: &str = "nqn.2026-12.io.appliance:r5";
const ONE: &str = "nqn.2026-12.io.appliance:one";
const HIDDEN: &str = "nqn.2026-12.io.appliance:hidden";

#[test]
fn a_linux_host_uses_volumes_over_nvme_tcp_through_failure_resize_and_restart() {
    let guest = guest();
    // The NVMe/TCP port is picked free, and picked again should another
    // test take it first. Device files are beside the state (the daemon
    // allows them there).
    let (dir, mut daemon, api, port) = start_on_a_free_port(|dir, port| {
        let mut toml = String::new();
        for n in ["m0", "m1", "m2", "s0"] {
            toml += &format!(
                "[[device]]\nname = \"{n}\"\nspec = \"file:{}:128M\"\n\n",
                dir.join(format!("{n}.img")).display()
            );
        }
        toml += "[[device]]\nname = \"d4\"\nspec = \"ram:64M\"\n\n[[device]]\nname = \"d5\"\nspec = \"ram:16M\"\n\n";
        toml += "[[volume]]\nname = \"r5\"\nlevel = \"raid5\"\nmembers = [\"m0\", \"m1\", \"m2\"]\nspares = [\"s0\"]\n\n";
        toml += "[[volume]]\nname = \"one\"\nlevel = \"single\"\nmembers = [\"d4\"]\n\n";
        toml += "[[volume]]\nname = \"hid\"\nlevel = \"single\"\nmembers = [\"d5\"]\n\n";
        for (nqn, vol, host) in [
            (R5, "r5", HOSTNQN),
            (ONE, "one", HOSTNQN),
            (
                HIDDEN,
                "hid",
                "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000beef",
            ),
        ] {
            toml += &format!(
                "[[nvmf_export]]\nnqn = \"{nqn}\"\nvolume = \"{vol}\"\nlisten = \"127.0.0.1:{port}\"\nhosts = [\"{host}\"]\n\n"
            );
        }
        toml
    });
    let mut reap = KillOnPanic(daemon.id());

    let params = dir.path().join("params");
    std::fs::write(
        &params,
        format!("PORT={port}\nHOSTNQN={HOSTNQN}\nHOSTID={HOSTID}\nR5={R5}\nONE={ONE}\nHIDDEN={HIDDEN}\n"),
    )
    .unwrap();
    let log = dir.path().join("serial.log");
    let mut vm = boot(&guest, "nvmf-guest.sh", &[params], &log, &["--smp", "2"])
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0",
        ])
        .spawn()
        .unwrap();

    // A member fails under fio: the spare takes its place and is rebuilt.
    wait_for_line(&log, "FIO-START", &mut vm);
    std::thread::sleep(Duration::from_millis(1500));
    ok(&applctl(&api, &["volume", "fail", "r5", "m1"]));

    // The single volume's device grows: the guest hears of it.
    wait_for_line(&log, "RESIZE-READY", &mut vm);
    ok(&applctl(&api, &["device", "resize", "d4", "128M"]));

    // The appliance dies under fio and comes back on its state.
    wait_for_line(&log, "RESTART-READY", &mut vm);
    std::thread::sleep(Duration::from_millis(1000));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGKILL) };
    let _ = daemon.wait();
    std::thread::sleep(Duration::from_millis(1000));
    let second = dir.path().join("second.log");
    daemon = restart(
        dir.path(),
        &api,
        &[],
        Stdio::from(std::fs::File::create(&second).unwrap()),
    );
    reap.0 = daemon.id();
    wait_up(&api, &mut daemon);

    let status = vm.wait().unwrap();
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    println!("{serial}");
    let restarted = std::fs::read_to_string(&second).unwrap_or_default();
    assert!(
        status.success(),
        "guest failed ({status}):\n{serial}\nrestarted appliance:\n{restarted}"
    );
    for want in [
        "DISCOVER OK",
        "HIDDEN REFUSED",
        "FIO-VERIFY OK",
        "FSCK OK",
        "RESIZE OK",
        "FILES OK",
        "FIO-RESTART OK",
        // The kernel lost the controllers under fio and got them back.
        "Successfully reconnected",
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
    assert!(
        restarted.contains("controller connected"),
        "the guest never reconnected:\n{restarted}"
    );
    // One of the two controllers runs with both digests (CRC32C).
    assert!(
        restarted.contains("header_digest=true data_digest=true"),
        "no controller with digests:\n{restarted}"
    );
    // The spare took the failed member's slot.
    let members = volume_members(&api, "r5");
    assert!(
        members.iter().any(|m| m == "s0") && !members.iter().any(|m| m == "m1"),
        "{members:?}"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
}
