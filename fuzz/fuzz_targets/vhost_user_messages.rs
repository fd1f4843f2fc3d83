//! Fuzz the vhost-user message handler: the export's connection loop (the
//! vhost crate's framing and our handler behind it) reads a frontend's
//! byte stream, with eventfds and memory fds attached where the input says,
//! over a real socket pair. Never a panic, a hang or a crash; the daemon's
//! reactors serve whatever queues the input manages to start.
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use appliance::export::{Export, ExportOptions};
use appliance::volume::Volume;
use bdev::{BlockDevice, NullDevice};
use libfuzzer_sys::fuzz_target;
use poller::{ReactorConfig, Reactors};

struct Rig {
    reactors: Reactors,
    export: Export,
    _dir: std::path::PathBuf,
}

fn rig() -> &'static Rig {
    static RIG: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let p = *RIG.get_or_init(|| {
        let reactors = Reactors::start(ReactorConfig {
            count: 1,
            idle_spin: Duration::from_micros(50),
            ..Default::default()
        })
        .expect("reactors");
        let dev: Arc<dyn BlockDevice> =
            Arc::new(NullDevice::new("null", 4096, 1 << 16).expect("null device"));
        let volume = Volume::new(reactors.set(), "fuzz", dev);
        let dir = std::env::temp_dir().join(format!("vu-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let opts = ExportOptions {
            serial: "fuzz".into(),
            ..ExportOptions::new(dir.join("vu.sock"), 2)
        };
        let export = Export::create(reactors.set(), &volume, opts).expect("export");
        Box::leak(Box::new(Rig {
            reactors,
            export,
            _dir: dir,
        })) as *const Rig as usize
    });
    // SAFETY: leaked above, never freed.
    unsafe { &*(p as *const Rig) }
}

/// An fd of the kind `kind` asks for: an eventfd, or a memfd of a few
/// pages (guest memory, an inflight area).
fn make_fd(kind: u8) -> Option<OwnedFd> {
    // SAFETY: plain syscalls; the fds are owned from here on.
    unsafe {
        if kind & 1 == 0 {
            let fd = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
            (fd >= 0).then(|| OwnedFd::from_raw_fd(fd))
        } else {
            let fd = libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC);
            if fd < 0 {
                return None;
            }
            let pages = 1 + (kind as i64 >> 1 & 0xf);
            libc::ftruncate(fd, pages * 4096);
            Some(OwnedFd::from_raw_fd(fd))
        }
    }
}

/// Send `bytes` with `fds` attached in one sendmsg.
fn send(sock: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> bool {
    // Always sendmsg with MSG_NOSIGNAL: libFuzzer's main does not ignore
    // SIGPIPE as a Rust main would, and the handler may close first.
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let space = if raw.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE only computes a size.
        unsafe { libc::CMSG_SPACE((raw.len() * 4) as u32) as usize }
    };
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr zeroed, then every pointer set to live buffers.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if space > 0 {
            msg.msg_control = cbuf.as_mut_ptr() as *mut _;
            msg.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((raw.len() * 4) as u32) as usize;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c) as *mut i32, raw.len());
        }
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) == bytes.len() as isize
    }
}

fuzz_target!(|data: &[u8]| {
    let rig = rig();
    let Ok((frontend, backend)) = UnixStream::pair() else {
        return;
    };
    // Chunks: [kind][len lo][len hi][bytes]; kind bit 7 attaches fds to
    // the chunk: bits 0-1 how many (1-3), bits 2-6 which kinds. All of it
    // is sent before the handler runs, on this thread (a thread per run
    // made the fuzzer 50 times slower); the socket is non-blocking, so
    // input beyond what its buffer holds is dropped instead of blocking.
    let _ = frontend.set_nonblocking(true);
    let mut rest = data;
    while rest.len() >= 3 {
        let kind = rest[0];
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let (chunk, tail) = rest[3..].split_at(len);
        rest = tail;
        let fds: Vec<OwnedFd> = if kind & 0x80 != 0 {
            (0..1 + (kind & 3))
                .filter_map(|i| make_fd(kind >> (2 + i)))
                .collect()
        } else {
            Vec::new()
        };
        if chunk.is_empty() || !send(&frontend, chunk, &fds) {
            break;
        }
    }
    let _ = frontend.shutdown(std::net::Shutdown::Write);
    // Replies go to `frontend`, never read; it stays open until the
    // handler is done with the connection.
    rig.export.fuzz_connection(rig.reactors.set(), backend);
    drop(frontend);
});
