//! What the tests share: the repository, the guest build and booting it
//! (VM tests), a blkio disk and data patterns, journal checkpoints taken
//! from a plain thread. Each test crate uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Build (or reuse) the guest kernel and initramfs.
pub fn guest() -> PathBuf {
    assert!(
        Command::new("qemu-system-x86_64")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok(),
        "qemu-system-x86_64 is missing: run deploy/install-deps.sh test (deploy/test.sh does)"
    );
    let out = Command::new(repo().join("deploy/vmrig/build-guest.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the guest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default(),
    )
}

/// boot.sh for `script` (in appliance/tests/vm) with `files` and
/// fio-check.sh copied in, the serial console in `log`, and boot.sh
/// `options`; the caller appends QEMU's own arguments (after the `--`
/// already given).
pub fn boot(
    guest: &Path,
    script: &str,
    files: &[PathBuf],
    log: &Path,
    options: &[&str],
) -> Command {
    let mut cmd = Command::new(repo().join("deploy/vmrig/boot.sh"));
    cmd.arg("--guest")
        .arg(guest)
        .arg("--script")
        .arg(repo().join("appliance/tests/vm").join(script));
    // The check every script's verified fio runs share.
    cmd.arg("--file")
        .arg(repo().join("appliance/tests/vm/fio-check.sh"));
    for f in files {
        cmd.arg("--file").arg(f);
    }
    cmd.arg("--log")
        .arg(log)
        .args(["--mem", "512", "--timeout", "900"])
        .args(options)
        .arg("--");
    cmd.stdout(Stdio::null());
    cmd
}

/// `len` random bytes.
pub fn random(len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut v = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut v)
        .unwrap();
    v
}

/// Sparse blank disk images `vdX.img` in `dir`, one per letter, of
/// `bytes` each.
pub fn blank_disks(
    dir: &Path,
    letters: std::ops::RangeInclusive<char>,
    bytes: u64,
) -> Vec<PathBuf> {
    letters
        .map(|c| {
            let p = dir.join(format!("vd{c}.img"));
            std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
            p
        })
        .collect()
}

/// `cmd` (a boot.sh) with each of `disks` as a virtio disk, run to its
/// end: the serial log, the guest's script having succeeded.
pub fn run_with_disks(mut cmd: Command, disks: &[PathBuf], log: &Path) -> String {
    for p in disks {
        cmd.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe",
            p.display()
        ));
    }
    let status = cmd.status().unwrap();
    let serial = std::fs::read_to_string(log).unwrap_or_default();
    println!("{serial}");
    assert!(status.success(), "guest failed ({status}):\n{serial}");
    serial
}

/// Wait until the guest prints `line`, failing if it ends first.
pub fn wait_for_line(log: &Path, line: &str, boot: &mut Child) {
    let t = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(line)
    {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "guest never printed {line}"
        );
        assert!(boot.try_wait().unwrap().is_none(), "guest ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A vhost-user-blk disk seen through the real client (blkio), with one
/// queue and a 1 MiB buffer; IO is synchronous.
pub struct Disk {
    // Field order: the queue goes before the instance it belongs to.
    q: blkio::Blkioq,
    _region: blkio::MemoryRegion,
    buf: *mut u8,
    b: blkio::Blkio,
}

// SAFETY: `buf` points into `_region`, which the Disk owns and moves with it.
unsafe impl Send for Disk {}

impl Disk {
    pub const BUF: usize = 1 << 20;

    pub fn connect(sock: &Path) -> Result<Disk, String> {
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").map_err(|e| e.to_string())?;
        b.set_str("path", sock.to_str().unwrap())
            .map_err(|e| e.to_string())?;
        b.connect().map_err(|e| e.to_string())?;
        let q = b
            .start()
            .map_err(|e| e.to_string())?
            .queues
            .pop()
            .ok_or("no queue")?;
        let region = b.alloc_mem_region(Self::BUF).map_err(|e| e.to_string())?;
        b.map_mem_region(&region).map_err(|e| e.to_string())?;
        let buf = region.addr as *mut u8;
        Ok(Disk {
            q,
            _region: region,
            buf,
            b,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.b.get_u64("capacity").unwrap()
    }

    /// The IO buffer.
    pub fn buf(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.buf, Self::BUF) }
    }

    fn wait(&mut self) -> i32 {
        self.wait_up_to(Duration::from_secs(30))
    }

    fn wait_up_to(&mut self, limit: Duration) -> i32 {
        let mut c = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
        let mut t = limit;
        let n = self.q.do_io(&mut c, 1, Some(&mut t), None).unwrap();
        assert_eq!(n, 1, "no completion within {limit:?}");
        unsafe { c[0].assume_init_ref() }.ret
    }

    /// Write `len` bytes of the buffer at `offset`; the request's result.
    pub fn write(&mut self, offset: u64, len: usize) -> i32 {
        self.q
            .write(offset, self.buf, len, 0, blkio::ReqFlags::empty());
        self.wait()
    }

    /// A write that may take up to `limit` (a device made slow on purpose).
    pub fn write_up_to(&mut self, offset: u64, len: usize, limit: Duration) -> i32 {
        self.q
            .write(offset, self.buf, len, 0, blkio::ReqFlags::empty());
        self.wait_up_to(limit)
    }

    /// Read `len` bytes at `offset` into the buffer; the request's result.
    pub fn read(&mut self, offset: u64, len: usize) -> i32 {
        self.q
            .read(offset, self.buf, len, 0, blkio::ReqFlags::empty());
        self.wait()
    }

    /// Queue a write of buffer bytes `at..at + len` to `offset`, tagged
    /// `tag`, without waiting (see [`next`](Self::next)).
    pub fn start_write(&mut self, offset: u64, at: usize, len: usize, tag: usize) {
        assert!(at + len <= Self::BUF);
        // SAFETY: inside the region, which outlives the request.
        let buf = unsafe { self.buf.add(at) };
        self.q
            .write(offset, buf, len, tag, blkio::ReqFlags::empty());
        // Sent now: libblkio only queues it until its next do_io, and a
        // queue that went idle (its reactor asleep until a kick) would not
        // see it before the test waits for its answer. Tests that went on
        // to wait for its effects hung when the reactor slept in between.
        let mut none: [std::mem::MaybeUninit<blkio::Completion>; 0] = [];
        let mut t = Duration::ZERO;
        let _ = self.q.do_io(&mut none, 0, Some(&mut t), None);
    }

    /// The next completion within `limit`: its tag and result.
    pub fn next(&mut self, limit: Duration) -> Option<(usize, i32)> {
        let mut c = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
        let mut t = limit;
        match self.q.do_io(&mut c, 1, Some(&mut t), None) {
            Ok(1) => {
                // SAFETY: do_io filled one completion.
                let c = unsafe { c[0].assume_init_ref() };
                Some((c.user_data, c.ret))
            }
            _ => None,
        }
    }

    pub fn flush(&mut self) -> i32 {
        self.q.flush(0, blkio::ReqFlags::empty());
        self.wait()
    }
}

/// The bytes a test writes at `offset` with `seed`.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            (x ^ (x >> 13) ^ (x >> 29)) as u8
        })
        .collect()
}

/// Checkpoint `journal` whenever its log is half full, flushing through a
/// fresh channel of `dev`, as the daemon's checkpointer does but without
/// reactors, until `stop`. Returns the checkpoints completed.
pub fn checkpoint_until(
    dev: std::sync::Arc<dyn bdev::BlockDevice>,
    journal: std::sync::Arc<appliance::raid::journal::Journal>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut done = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            if journal.usage() > 0.5 {
                let flush = || {
                    let failed = |reason: String| appliance::raid::RaidError::Io {
                        device: dev.info().name.clone(),
                        what: "flush".into(),
                        reason,
                    };
                    let mut ch = dev.open_channel().map_err(|e| failed(e.to_string()))?;
                    bdev::conformance::run_one(ch.as_mut(), bdev::IoRequest::flush(1))
                        .map_err(|e| failed(e.to_string()))
                };
                done += journal.checkpoint(flush).unwrap() as usize;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        done
    })
}

/// A TCP connection to `addr` from the local address `from` (another
/// host, as far as the target can tell).
pub fn connect_from(from: std::net::Ipv4Addr, addr: std::net::SocketAddr) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let std::net::SocketAddr::V4(to) = addr else {
        panic!("an IPv4 listener");
    };
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a socket of our own, and sockaddr_in values that live
    // through each call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let s = std::net::TcpStream::from_raw_fd(fd);
        let src = sin(from, 0);
        assert_eq!(
            libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), len),
            0
        );
        let dst = sin(*to.ip(), to.port());
        assert_eq!(
            libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len),
            0
        );
        s
    }
}

/// A device that takes at most `max_transfer` bytes a request, as an NVMe
/// namespace takes 1 MiB: larger ones fail, as the NVMe driver fails them.
/// Two requests in flight with one tag fail too (drivers track requests by
/// tag: an NVMe/TCP device splits its own by tag).
pub struct Small {
    inner: std::sync::Arc<dyn bdev::BlockDevice>,
    info: bdev::DeviceInfo,
}

impl Small {
    /// `inner`, taking at most `max_transfer` bytes a request.
    pub fn device(
        inner: std::sync::Arc<dyn bdev::BlockDevice>,
        max_transfer: u32,
    ) -> std::sync::Arc<dyn bdev::BlockDevice> {
        let info = bdev::DeviceInfo {
            max_transfer,
            ..inner.info().clone()
        };
        std::sync::Arc::new(Small { inner, info })
    }
}

struct SmallChannel {
    inner: Box<dyn bdev::IoChannel>,
    info: bdev::DeviceInfo,
    refused: Vec<bdev::Completion>,
    tags: std::collections::HashSet<u64>,
}

impl bdev::BlockDevice for Small {
    fn info(&self) -> &bdev::DeviceInfo {
        &self.info
    }
    fn open_channel(&self) -> Result<Box<dyn bdev::IoChannel>, bdev::BdevError> {
        Ok(Box::new(SmallChannel {
            inner: self.inner.open_channel()?,
            info: self.info.clone(),
            refused: Vec::new(),
            tags: Default::default(),
        }))
    }
}

impl bdev::IoChannel for SmallChannel {
    fn submit(&mut self, req: bdev::IoRequest) -> Result<(), bdev::SubmitError> {
        if !self.tags.insert(req.tag) {
            panic!("tag {:#x} is in flight already", req.tag);
        }
        if let Err(e) = bdev::validate(&self.info, &req) {
            self.refused.push(bdev::Completion {
                tag: req.tag,
                result: Err(e),
            });
            return Ok(());
        }
        let tag = req.tag;
        self.inner.submit(req).inspect_err(|_| {
            self.tags.remove(&tag);
        })
    }
    fn poll(&mut self, out: &mut Vec<bdev::Completion>) -> usize {
        let from = out.len();
        out.append(&mut self.refused);
        self.inner.poll(out);
        for c in &out[from..] {
            self.tags.remove(&c.tag);
        }
        out.len() - from
    }
    fn inflight(&self) -> usize {
        self.refused.len() + self.inner.inflight()
    }
}

/// Each device behind a fault injector: the injectors, and the same as
/// the devices a volume is given.
#[allow(clippy::type_complexity)]
pub fn behind_faults(
    devs: &[std::sync::Arc<dyn bdev::BlockDevice>],
) -> (
    Vec<std::sync::Arc<bdev::FaultDevice>>,
    Vec<std::sync::Arc<dyn bdev::BlockDevice>>,
) {
    let faults: Vec<std::sync::Arc<bdev::FaultDevice>> = devs
        .iter()
        .map(|d| std::sync::Arc::new(bdev::FaultDevice::new(d.clone())))
        .collect();
    let members = faults
        .iter()
        .map(|f| f.clone() as std::sync::Arc<dyn bdev::BlockDevice>)
        .collect();
    (faults, members)
}
