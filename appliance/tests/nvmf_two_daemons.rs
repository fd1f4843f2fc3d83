//! Two appliance daemons: B exports a volume over NVMe/TCP; A runs a
//! RAID1 of a local file and B's namespace (write-mostly, the remote
//! mirror) and exports it over NVMe/TCP itself. A host writes and reads
//! through A while B is killed and started again: the writes wait for the
//! mirror to come back within the loss timeout, nothing fails, and both
//! copies hold every write.

#[path = "cli/daemon.rs"]
mod daemon;

use daemon::*;

use std::net::SocketAddr;
use std::time::Duration;

use nvme::spec::{io as cmd, Sqe};
use nvmf::host::{Controller, HostConfig, Queue};

const REMOTE: &str = "nqn.2026-12.io.appliance:b-vol";
const MIRROR: &str = "nqn.2026-12.io.appliance:a-mirror";

fn host() -> HostConfig {
    HostConfig {
        timeout: Duration::from_secs(60),
        ..Default::default()
    }
}

fn queue(addr: SocketAddr, nqn: &str) -> (Controller, Queue) {
    let mut c = Controller::connect(addr, nqn, &host()).unwrap();
    c.set_features(0x07, 0).unwrap();
    let q = c.io_queue(1, 16).unwrap();
    (c, q)
}

fn write(q: &mut Queue, lba: u64, fill: u8) {
    let mut s = Sqe::new(cmd::WRITE, 1);
    s.set_range(lba, 8);
    q.exec(s, &vec![fill; 32768], 0).unwrap();
}

fn read(q: &mut Queue, lba: u64, blocks: u32) -> Vec<u8> {
    let mut s = Sqe::new(cmd::READ, 1);
    s.set_range(lba, blocks);
    q.exec(s, &[], blocks as usize * 4096).unwrap().data
}

#[test]
fn a_remote_mirror_rides_out_its_daemon_restarting() {
    remote_mirror(false);
}

/// With md's write-behind (a bitmap, and writes to the write-mostly
/// member acknowledged before it has them), writes complete while the
/// remote daemon is away and reach it once it is back.
#[test]
fn with_write_behind_writes_go_on_while_the_remote_mirror_is_away() {
    remote_mirror(true);
}

fn remote_mirror(write_behind: bool) {
    let (dir_b, mut b, api_b, port_b) = start_on_a_free_port(|dir, port_b| {
        format!(
            "[[device]]\nname = \"bf\"\nspec = \"file:{}:64M\"\n\n[[volume]]\nname = \"bv\"\nlevel = \"single\"\nmembers = [\"bf\"]\n\n[[nvmf_export]]\nnqn = \"{REMOTE}\"\nvolume = \"bv\"\nlisten = \"127.0.0.1:{port_b}\"\nallow_any_host = true\n",
            dir.join("b.img").display()
        )
    });
    let mut reap_b = KillOnPanic(b.id());

    let (_dir_a, mut a, api_a, port_a) = start_on_a_free_port(|dir, port_a| {
        format!(
            "[[device]]\nname = \"near\"\nspec = \"file:{}:64M\"\n\n[[device]]\nname = \"far\"\nspec = \"nvmf-tcp://127.0.0.1:{port_b}/{REMOTE}?loss-timeout=60\"\n\n[[volume]]\nname = \"mirror\"\nlevel = \"raid1\"\nmembers = [\"near\", \"far\"]\n{}\n[[nvmf_export]]\nnqn = \"{MIRROR}\"\nvolume = \"mirror\"\nlisten = \"127.0.0.1:{port_a}\"\nallow_any_host = true\n",
            dir.join("a.img").display(),
            if write_behind {
                "bitmap = true\nwrite_behind = 256\n"
            } else {
                ""
            }
        )
    });
    let _reap_a = KillOnPanic(a.id());
    ok(&applctl(
        &api_a,
        &["volume", "write-mostly", "mirror", "far"],
    ));
    // The remote namespace is not known to hold only zeros: the new
    // mirror's initial sync runs first (a write to a region it repairs
    // waits for it, and its IO to the mirror for the loss time-out).
    ok(&applctl(
        &api_a,
        &["volume", "wait", "mirror", "--timeout", "120"],
    ));

    let addr_a: SocketAddr = format!("127.0.0.1:{port_a}").parse().unwrap();
    let (_ca, mut q) = queue(addr_a, MIRROR);
    for i in 0..16u64 {
        write(&mut q, i * 8, i as u8 + 1);
    }

    // B dies; a writer keeps going through A, its writes waiting for the
    // mirror. B comes back on its state and file.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(b.id() as i32, libc::SIGKILL) };
    let _ = b.wait();
    let writer = std::thread::spawn(move || {
        for i in 16..32u64 {
            write(&mut q, i * 8, i as u8 + 1);
        }
        q
    });
    std::thread::sleep(Duration::from_millis(500));
    if write_behind {
        // Acknowledged once the local member has them.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !writer.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "writes waited for the mirror"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    } else {
        // A mirror write completes only once both members have it, so
        // with B away none can have finished.
        assert!(!writer.is_finished(), "writes completed without the mirror");
    }
    let log_b = dir_b.path().join("restart.log");
    b = restart(
        dir_b.path(),
        &api_b,
        &[],
        std::fs::File::create(&log_b).unwrap().into(),
    );
    reap_b.0 = b.id();
    wait_up(&api_b, &mut b);
    // Its port may have been taken while it was down (then its export is
    // kept unserved, and A waits for nothing): said with its log.
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&applctl(&api_b, &["--json", "nvmf", "list"]))).unwrap();
    assert_eq!(
        listed["exports"][0]["not_served"],
        "",
        "{listed}\n{}",
        std::fs::read_to_string(&log_b).unwrap_or_default()
    );
    let mut q = writer.join().unwrap();

    // Every write reads back through A, and A's mirror never failed.
    for i in 0..32u64 {
        assert!(
            read(&mut q, i * 8, 8).iter().all(|&x| x == i as u8 + 1),
            "write {i} through A"
        );
    }
    let v: serde_json::Value = serde_json::from_str(&ok(&applctl(
        &api_a,
        &["--json", "volume", "show", "mirror"],
    )))
    .unwrap();
    assert_eq!(v["state"], "VOLUME_STATE_OPTIMAL", "{v}");

    // B's copy holds them too (the member's data follows md's metadata:
    // find the first write, then compare the rest from there).
    let addr_b: SocketAddr = format!("127.0.0.1:{port_b}").parse().unwrap();
    let (_cb, mut qb) = queue(addr_b, REMOTE);
    let start = (0..4096u64)
        .find(|&lba| read(&mut qb, lba, 1).iter().all(|&x| x == 1))
        .expect("the first write is on B");
    // (Writes behind reach B once it is back: wait for the last.)
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !read(&mut qb, start + 31 * 8, 8).iter().all(|&x| x == 32) {
        assert!(
            std::time::Instant::now() < deadline,
            "the writes behind never reached B"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..32u64 {
        assert!(
            read(&mut qb, start + i * 8, 8)
                .iter()
                .all(|&x| x == i as u8 + 1),
            "write {i} on B"
        );
    }
    drop(qb);
    drop(q);
    for (p, _) in [(&mut a, &api_a), (&mut b, &api_b)] {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(p.id() as i32, libc::SIGTERM) };
        assert!(p.wait().unwrap().success());
    }
}
