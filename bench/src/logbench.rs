//! `logbench`: what dirty logging for live migration costs a vhost-user-blk
//! backend. A minimal frontend (the vhost crate's, with its own guest
//! memory in a memfd and one split virtqueue) drives 4 KiB random IO at a
//! fixed queue depth, busy-polling the used ring, and reports IOPS and the
//! backend's CPU time per IO (from /proc/PID/stat). With `--log` it does
//! what QEMU does while it migrates: a shared-memory log (SET_LOG_BASE,
//! LOG_SHMFD), VHOST_F_LOG_ALL on, and the log read and cleared every
//! `--sync-ms` as the migration thread's dirty-bitmap sync does. libblkio
//! (`vhostbench`) cannot turn logging on, hence this client.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

#[path = "load.rs"]
mod load;
use load::{Load, Rw};

/// Guest memory: rings, request headers and status bytes, data buffers.
const MEM: u64 = 64 << 20;
const QSIZE: u16 = 256;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HEADERS: u64 = 0x10000;
const STATUS: u64 = 0x20000;
const DATA: u64 = 0x100000;
/// Bytes of log for `MEM` (one bit per 4 KiB page).
const LOG_BYTES: u64 = MEM / 4096 / 8;

const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const LOG_ALL: u64 = 1 << 26;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
/// VRING_USED_F_NO_NOTIFY.
const NO_NOTIFY: u16 = 1;

#[derive(Parser)]
#[command(about = "Drive a vhost-user-blk socket with 4 KiB random IO, dirty logging on or off")]
struct Args {
    /// The backend's socket.
    #[arg(long)]
    socket: String,
    /// Turn dirty logging on, as a migrating QEMU does.
    #[arg(long)]
    log: bool,
    /// Milliseconds between two syncs (read and clear) of the log.
    #[arg(long, default_value_t = 100)]
    sync_ms: u64,
    #[command(flatten)]
    load: Load,
}

fn main() {
    load::report(run(&Args::parse()));
}

fn memfd(name: &std::ffi::CStr, len: u64) -> Result<(File, *mut u8), String> {
    // SAFETY: plain syscall; result checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).map_err(|e| format!("memfd size: {e}"))?;
    // SAFETY: a shared mapping of the whole memfd, checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    Ok((f, p as *mut u8))
}

/// The guest side: its memory and the queue's indices.
struct Guest {
    base: *mut u8,
    next_avail: u16,
    last_used: u16,
}

impl Guest {
    fn put<T: Copy>(&self, gpa: u64, v: T) {
        // SAFETY: every gpa used here is a constant offset inside MEM.
        unsafe { std::ptr::write_volatile(self.base.add(gpa as usize) as *mut T, v) }
    }

    fn get<T: Copy>(&self, gpa: u64) -> T {
        // SAFETY: as in `put`.
        unsafe { std::ptr::read_volatile(self.base.add(gpa as usize) as *const T) }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + 16 * i as u64;
        self.put(at, addr);
        self.put(at + 8, len);
        self.put(at + 12, flags);
        self.put(at + 14, next);
    }

    /// Request `slot` (descriptors 3*slot..3*slot+2) for `sector`.
    fn offer(&mut self, slot: u16, rw: Rw, sector: u64) {
        let (h, s, d) = (
            HEADERS + 16 * slot as u64,
            STATUS + slot as u64,
            DATA + 4096 * slot as u64,
        );
        let kind: u32 = match rw {
            Rw::Randread => 0,
            Rw::Randwrite => 1,
        };
        self.put(h, kind);
        self.put(h + 4, 0u32);
        self.put(h + 8, sector);
        self.put(s, 0xffu8);
        let head = 3 * slot;
        let data_flags = match rw {
            Rw::Randread => NEXT | WRITE,
            Rw::Randwrite => NEXT,
        };
        self.desc(head, h, 16, NEXT, head + 1);
        self.desc(head + 1, d, 4096, data_flags, head + 2);
        self.desc(head + 2, s, 1, WRITE, 0);
        self.put(AVAIL + 4 + 2 * (self.next_avail % QSIZE) as u64, head);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Make the offered requests visible; whether the device wants a kick.
    fn publish(&self) -> bool {
        fence(Ordering::SeqCst);
        self.put(AVAIL + 2, self.next_avail);
        fence(Ordering::SeqCst);
        self.get::<u16>(USED) & NO_NOTIFY == 0
    }

    /// The next used entry's slot and status, if any; an error for an
    /// entry naming no request of ours (`qd` of them in flight).
    fn reap(&mut self, qd: usize) -> Result<Option<(u16, u8)>, String> {
        let idx: u16 = self.get(USED + 2);
        if idx == self.last_used {
            return Ok(None);
        }
        fence(Ordering::Acquire);
        let e = USED + 4 + 8 * (self.last_used % QSIZE) as u64;
        let head: u32 = self.get(e);
        if !head.is_multiple_of(3) || head as usize >= 3 * qd {
            return Err(format!(
                "the backend returned descriptor {head}, not a request's head"
            ));
        }
        self.last_used = self.last_used.wrapping_add(1);
        let slot = (head / 3) as u16;
        Ok(Some((slot, self.get(STATUS + slot as u64))))
    }
}

/// SET_LOG_BASE with the log's fd (LOG_SHMFD), sent by hand: the vhost
/// crate's frontend waits for a 16-byte answer, and libvhost-user
/// (qemu-storage-daemon) answers with the specification's u64, so the
/// crate's call never returns against it. Either answer is read here.
fn set_log_base(
    sock: &std::os::unix::net::UnixStream,
    log: &File,
    size: u64,
) -> Result<(), String> {
    use std::io::Read;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    const SET_LOG_BASE: u32 = 6;
    let mut msg = Vec::with_capacity(28);
    msg.extend(SET_LOG_BASE.to_le_bytes());
    msg.extend(1u32.to_le_bytes()); // version 1
    msg.extend(16u32.to_le_bytes());
    msg.extend(size.to_le_bytes());
    msg.extend(0u64.to_le_bytes()); // offset
    sock.send_with_fd(&msg[..], log.as_raw_fd())
        .map_err(|e| format!("SET_LOG_BASE: {e}"))?;
    let mut r = sock;
    // A backend that never answers fails the run rather than hangs it.
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("socket: {e}"))?;
    let mut hdr = [0u8; 12];
    r.read_exact(&mut hdr)
        .map_err(|e| format!("SET_LOG_BASE's answer: {e}"))?;
    let len = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) != SET_LOG_BASE || len > 64 {
        return Err(format!("SET_LOG_BASE answered with {hdr:?}"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .map_err(|e| format!("SET_LOG_BASE's answer: {e}"))?;
    sock.set_read_timeout(None)
        .map_err(|e| format!("socket: {e}"))?;
    Ok(())
}

/// A protocol error, with the message it answered.
fn e(what: &'static str) -> impl Fn(vhost::Error) -> String {
    move |err| format!("{what}: {err}")
}

fn run(args: &Args) -> Result<serde_json::Value, String> {
    let a = &args.load;
    a.pin();
    if a.queues != 1 {
        return Err("logbench drives one queue".into());
    }
    if a.qd == 0 || 3 * a.qd > QSIZE as usize {
        return Err(format!("--qd must be 1 to {}", QSIZE / 3));
    }
    let (mem_file, base) = memfd(c"logbench-guest", MEM)?;
    let stream = std::os::unix::net::UnixStream::connect(&args.socket)
        .map_err(|e| format!("connecting to {}: {e}", args.socket))?;
    let raw = stream.try_clone().map_err(|e| format!("socket: {e}"))?;
    let mut f = Frontend::from_stream(stream, 1);
    f.set_owner().map_err(e("SET_OWNER"))?;
    let offered = f.get_features().map_err(e("GET_FEATURES"))?;
    let base_features = VERSION_1 | PROTOCOL_FEATURES;
    if offered & (base_features | LOG_ALL) != base_features | LOG_ALL {
        return Err(format!(
            "the backend does not offer VERSION_1, PROTOCOL_FEATURES and LOG_ALL ({offered:#x})"
        ));
    }
    f.set_features(base_features).map_err(e("SET_FEATURES"))?;
    let pf = f
        .get_protocol_features()
        .map_err(e("GET_PROTOCOL_FEATURES"))?;
    let want = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::LOG_SHMFD;
    if !pf.contains(want) {
        return Err(format!("the backend lacks CONFIG or LOG_SHMFD ({pf:?})"));
    }
    f.set_protocol_features(want)
        .map_err(e("SET_PROTOCOL_FEATURES"))?;
    let (_, config) = f
        .get_config(
            0,
            8,
            vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
            &[0; 8],
        )
        .map_err(e("GET_CONFIG"))?;
    let sectors = u64::from_le_bytes(config[..8].try_into().map_err(|_| "short config")?);
    let blocks = sectors / 8;
    if blocks == 0 {
        return Err("the disk is empty".into());
    }
    f.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: base as u64,
        mmap_offset: 0,
        mmap_handle: mem_file.as_raw_fd(),
    }])
    .map_err(e("SET_MEM_TABLE"))?;
    let log = if args.log {
        let (log_file, log_base) = memfd(c"logbench-log", LOG_BYTES)?;
        set_log_base(&raw, &log_file, LOG_BYTES)?;
        f.set_features(base_features | LOG_ALL)
            .map_err(e("SET_FEATURES (LOG_ALL)"))?;
        Some((log_file, log_base))
    } else {
        None
    };
    let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
    let call = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
    f.set_vring_num(0, QSIZE).map_err(e("SET_VRING_NUM"))?;
    f.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: u32::from(args.log),
            desc_table_addr: base as u64 + DESC,
            used_ring_addr: base as u64 + USED,
            avail_ring_addr: base as u64 + AVAIL,
            log_addr: args.log.then_some(USED),
        },
    )
    .map_err(e("SET_VRING_ADDR"))?;
    f.set_vring_base(0, 0).map_err(e("SET_VRING_BASE"))?;
    f.set_vring_call(0, &call).map_err(e("SET_VRING_CALL"))?;
    f.set_vring_kick(0, &kick).map_err(e("SET_VRING_KICK"))?;
    f.set_vring_enable(0, true).map_err(e("SET_VRING_ENABLE"))?;

    let mut g = Guest {
        base,
        next_avail: 0,
        last_used: 0,
    };
    let mut next = load::offsets();
    for slot in 0..a.qd as u16 {
        g.offer(slot, a.rw, (next() % blocks) * 8);
    }
    if g.publish() {
        let _ = kick.write(1);
    }
    // The log's words, read and cleared as QEMU's sync does.
    let words = (LOG_BYTES / 8) as usize;
    let sync = Duration::from_millis(args.sync_ms.max(1));
    let mut synced = Instant::now();
    let mut pages = 0u64;
    let phase = |secs: f64, ios: &mut u64, errors: &mut u64| -> Result<f64, String> {
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(secs);
        let mut n = 0u32;
        let mut last = t0;
        loop {
            let mut got = false;
            while let Some((slot, status)) = g.reap(a.qd)? {
                got = true;
                *ios += 1;
                if status != 0 {
                    *errors += 1;
                }
                g.offer(slot, a.rw, (next() % blocks) * 8);
            }
            if got {
                last = Instant::now();
                if g.publish() {
                    let _ = kick.write(1);
                }
            }
            n = n.wrapping_add(1);
            if n.is_multiple_of(1024) {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if now.duration_since(last) > Duration::from_secs(5) {
                    return Err(format!("no completion for 5 s ({} requests done)", *ios));
                }
                if let Some((_, log)) = &log {
                    if now.duration_since(synced) >= sync {
                        synced = now;
                        for i in 0..words {
                            // SAFETY: word i of the mapped log; the backend
                            // sets bits in it only atomically.
                            let w = unsafe { &*(log.add(8 * i) as *const AtomicU64) };
                            if w.load(Ordering::Relaxed) != 0 {
                                pages += u64::from(w.swap(0, Ordering::AcqRel).count_ones());
                            }
                        }
                    }
                }
            }
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    let mut v = a.measure(phase)?;
    v["dirty_log"] = serde_json::json!(args.log);
    v["pages_synced"] = serde_json::json!(pages);
    Ok(v)
}
