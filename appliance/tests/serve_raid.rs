//! `appliance serve --raid5`: the volume is created on blank files, comes
//! back from its superblocks after a clean stop and after a crash (with a
//! parity resync), and keeps a client's data through both.

use std::io::{BufRead, BufReader};
use std::mem::MaybeUninit;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

fn serve(sock: &Path, members: &[String]) -> (Child, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["serve", "--socket"])
        .arg(sock)
        .arg("--raid5")
        .arg(members.join(","))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in out.by_ref() {
        let line = line.unwrap();
        let done = line.starts_with("serving ");
        lines.push(line);
        if done {
            break;
        }
    }
    assert!(lines.iter().any(|l| l.starts_with("serving ")), "{lines:?}");
    std::thread::spawn(move || for _ in out {});
    (child, lines)
}

fn io(sock: &Path, write: Option<u8>, offset: u64) -> Vec<u8> {
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    let mut q = b.start().unwrap().queues.pop().unwrap();
    let region = b.alloc_mem_region(1 << 20).unwrap();
    b.map_mem_region(&region).unwrap();
    let buf = region.addr as *mut u8;
    let data = unsafe { std::slice::from_raw_parts_mut(buf, 1 << 20) };
    let mut c = [MaybeUninit::<Completion>::uninit()];
    let mut wait = |q: &mut blkio::Blkioq| {
        let mut t = Duration::from_secs(20);
        assert_eq!(q.do_io(&mut c, 1, Some(&mut t), None).unwrap(), 1);
        assert_eq!(unsafe { c[0].assume_init_ref() }.ret, 0);
    };
    if let Some(v) = write {
        for (i, x) in data.iter_mut().enumerate() {
            *x = v ^ (i as u8) ^ (i >> 12) as u8;
        }
        q.write(offset, buf, 1 << 20, 1, ReqFlags::empty());
        wait(&mut q);
        q.flush(2, ReqFlags::empty());
        wait(&mut q);
    }
    data.fill(0);
    q.read(offset, buf, 1 << 20, 3, ReqFlags::empty());
    wait(&mut q);
    data.to_vec()
}

fn expected(v: u8) -> Vec<u8> {
    (0..1usize << 20)
        .map(|i| v ^ (i as u8) ^ (i >> 12) as u8)
        .collect()
}

fn stop(mut child: Child, signal: i32) {
    unsafe { libc::kill(child.id() as i32, signal) };
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            if signal == libc::SIGTERM {
                assert!(status.success(), "{status}");
            }
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "serve did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_raid5_export_survives_clean_and_unclean_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("r.sock");
    let files: Vec<String> = (0..3)
        .map(|i| dir.path().join(format!("m{i}")).display().to_string())
        .collect();
    let create: Vec<String> = files.iter().map(|f| format!("file:{f}:32M")).collect();
    let reopen: Vec<String> = files.iter().map(|f| format!("file:{f}")).collect();

    let (child, lines) = serve(&sock, &create);
    assert!(
        lines.iter().any(|l| l.contains("created RAID5")),
        "{lines:?}"
    );
    assert_eq!(io(&sock, Some(7), 4 << 20), expected(7));
    stop(child, libc::SIGTERM);

    let (child, lines) = serve(&sock, &reopen);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("assembled") && l.contains("last shutdown clean")),
        "{lines:?}"
    );
    assert_eq!(
        io(&sock, None, 4 << 20),
        expected(7),
        "data after a clean restart"
    );
    assert_eq!(io(&sock, Some(9), 12 << 20), expected(9));
    stop(child, libc::SIGKILL);

    let (child, lines) = serve(&sock, &reopen);
    assert!(
        lines.iter().any(|l| l.contains("last shutdown UNCLEAN")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("resynchronising")),
        "{lines:?}"
    );
    assert_eq!(io(&sock, None, 4 << 20), expected(7), "data after a crash");
    assert_eq!(io(&sock, None, 12 << 20), expected(9));
    stop(child, libc::SIGTERM);

    // Blank devices mixed with members are refused, and nothing is written.
    let extra = dir.path().join("blank").display().to_string();
    let mut mixed = reopen.clone();
    mixed.push(format!("file:{extra}:32M"));
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["serve", "--socket"])
        .arg(dir.path().join("x.sock"))
        .arg("--raid5")
        .arg(mixed.join(","))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("blank"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
