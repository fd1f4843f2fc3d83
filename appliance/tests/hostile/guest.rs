//! A hand-made vhost-user frontend for the hostile tests: its own guest
//! memory (a memfd), split virtqueues laid out in it, and the vhost crate's
//! `Frontend` for the protocol, so a test can write any descriptor chain
//! and send any message a well-behaved QEMU never would.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::export::{Export, ExportOptions};
use appliance::volume::Volume;
use bdev::{BlockDevice, RamDevice};
use poller::{ReactorConfig, Reactors};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const MEM: usize = 4 << 20;
pub const QSIZE: u16 = 16;
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;
pub const IN: u32 = 0;
pub const OUT: u32 = 1;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
pub const UNTOUCHED: u8 = 0xee;
/// VIRTIO_RING_F_EVENT_IDX.
pub const EVENT_IDX: u32 = 29;

/// Guest memory and split virtqueues laid out in it.
pub struct Guest {
    pub base: *mut u8,
    pub file: File,
    pub queues: Vec<Vq>,
    pub frontend: Frontend,
    pub event_idx: bool,
}

pub struct Vq {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub last_used: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

/// A step between memory set-up and queue start (frontend, guest memory).
pub type Prepare = dyn Fn(&mut Frontend, *mut u8);

/// How a test's frontend sets itself up.
pub struct Setup<'a> {
    pub queues: usize,
    pub event_idx: bool,
    /// The memfd's name (it shows in /proc/PID/maps).
    pub name: &'a std::ffi::CStr,
    /// Virtio features asked for besides VERSION_1, PROTOCOL_FEATURES and
    /// INDIRECT_DESC (and EVENT_IDX), offered or not.
    pub features: u64,
    /// Protocol features asked for besides CONFIG and MQ.
    pub protocol: VhostUserProtocolFeatures,
    /// The call "eventfd" of each queue (a test may pass anything).
    pub call: &'a dyn Fn(usize) -> EventFd,
    /// Whether the daemon takes that call fd (asserted with REPLY_ACK).
    pub call_taken: bool,
    /// Called once guest memory is set, before the queues start.
    pub prepare: Option<&'a Prepare>,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            queues: 1,
            event_idx: false,
            name: c"guest",
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            call: &|_| EventFd::new(0).unwrap(),
            call_taken: true,
            prepare: None,
        }
    }
}

/// A memfd of MEM bytes called `name`, mapped shared here.
pub fn guest_memory(name: &std::ffi::CStr) -> (File, *mut u8) {
    // SAFETY: plain syscalls; results checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM as u64).unwrap();
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    } as *mut u8;
    assert_ne!(base as isize, -1);
    (file, base)
}

impl Guest {
    pub fn new(sock: &std::path::Path, nq: usize) -> Guest {
        Guest::with_features(sock, nq, false)
    }

    pub fn with_features(sock: &std::path::Path, nq: usize, event_idx: bool) -> Guest {
        Guest::setup(
            sock,
            Setup {
                queues: nq,
                event_idx,
                ..Default::default()
            },
        )
    }

    /// A guest whose memory is a memfd called `name`.
    pub fn named(
        sock: &std::path::Path,
        nq: usize,
        event_idx: bool,
        name: &std::ffi::CStr,
    ) -> Guest {
        Guest::setup(
            sock,
            Setup {
                queues: nq,
                event_idx,
                name,
                ..Default::default()
            },
        )
    }

    pub fn setup(sock: &std::path::Path, s: Setup) -> Guest {
        let (file, base) = guest_memory(s.name);
        let mut f = Frontend::connect(sock, s.queues as u64).unwrap();
        f.set_owner().unwrap();
        let features = f.get_features().unwrap();
        // VERSION_1 | PROTOCOL_FEATURES | INDIRECT_DESC (+ EVENT_IDX).
        let want = (1u64 << 32) | (1 << 30) | (1 << 28) | (u64::from(s.event_idx) << EVENT_IDX);
        assert_eq!(features & want, want);
        f.set_features(want | s.features).unwrap();
        let pf = f.get_protocol_features().unwrap();
        f.set_protocol_features(
            pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ | s.protocol),
        )
        .unwrap();
        if s.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every message waits for the daemon's answer.
            f.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        }
        f.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: base as u64,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }])
        .unwrap();
        if let Some(prepare) = s.prepare {
            prepare(&mut f, base);
        }
        let mut g = Guest {
            base,
            file,
            queues: Vec::new(),
            frontend: f,
            event_idx: s.event_idx,
        };
        for q in 0..s.queues {
            let at = 0x1000 * (1 + 4 * q as u64);
            let vq = Vq {
                desc: at,
                avail: at + 0x1000,
                used: at + 0x2000,
                next_avail: 0,
                last_used: 0,
                kick: EventFd::new(0).unwrap(),
                call: (s.call)(q),
            };
            g.start_queue(q, &vq, s.call_taken);
            g.queues.push(vq);
        }
        g
    }

    /// Set up and enable queue `q` as `vq` describes it.
    fn start_queue(&mut self, q: usize, vq: &Vq, call_taken: bool) {
        let (f, base) = (&mut self.frontend, self.base as u64);
        f.set_vring_num(q, QSIZE).unwrap();
        f.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: base + vq.desc,
                used_ring_addr: base + vq.used,
                avail_ring_addr: base + vq.avail,
                log_addr: None,
            },
        )
        .unwrap();
        f.set_vring_base(q, vq.next_avail).unwrap();
        let call = f.set_vring_call(q, &vq.call);
        assert_eq!(call.is_ok(), call_taken, "call fd taken: {call:?}");
        f.set_vring_kick(q, &vq.kick).unwrap();
        f.set_vring_enable(q, true).unwrap();
    }

    /// The memory table entry of this guest's memory.
    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: self.base as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    pub fn write<T: Copy>(&self, gpa: u64, v: T) {
        assert!(gpa as usize + std::mem::size_of::<T>() <= MEM);
        // SAFETY: inside our mapping.
        unsafe { std::ptr::write_volatile(self.base.add(gpa as usize) as *mut T, v) }
    }

    pub fn read<T: Copy>(&self, gpa: u64) -> T {
        // SAFETY: inside our mapping.
        unsafe { std::ptr::read_volatile(self.base.add(gpa as usize) as *const T) }
    }

    pub fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + 16 * i as u64;
        self.write(at, addr);
        self.write(at + 8, len);
        self.write(at + 12, flags);
        self.write(at + 14, next);
    }

    pub fn header(&self, gpa: u64, kind: u32, sector: u64) {
        self.write(gpa, kind);
        self.write(gpa + 4, 0u32);
        self.write(gpa + 8, sector);
    }

    /// Offer chain `head` on queue `q` and kick.
    pub fn offer(&mut self, q: usize, head: u16) {
        let vq = &self.queues[q];
        let slot = vq.next_avail % QSIZE;
        self.write(vq.avail + 4 + 2 * slot as u64, head);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let (old, new) = (vq.next_avail, vq.next_avail.wrapping_add(1));
        self.write(vq.avail + 2, new);
        self.queues[q].next_avail = new;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // With EVENT_IDX a driver kicks only when the device's avail_event
        // (after the used ring) lies in [old, new): vring_need_event.
        let vq = &self.queues[q];
        let wanted = !self.event_idx || {
            let event: u16 = self.read(vq.used + 4 + 8 * QSIZE as u64);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        };
        if wanted {
            vq.kick.write(1).unwrap();
        }
    }

    /// The next used entry of queue `q` within `wait`: (id, len).
    pub fn used_within(&mut self, q: usize, wait: Duration) -> Option<(u32, u32)> {
        let t = Instant::now();
        let vq = &self.queues[q];
        loop {
            let idx: u16 = self.read(vq.used + 2);
            if idx != vq.last_used {
                let slot = vq.last_used % QSIZE;
                let id: u32 = self.read(vq.used + 4 + 8 * slot as u64);
                let len: u32 = self.read(vq.used + 8 + 8 * slot as u64);
                self.queues[q].last_used = vq.last_used.wrapping_add(1);
                return Some((id, len));
            }
            if t.elapsed() > wait {
                return None;
            }
            // Spin briefly (a quick answer lets a caller race the
            // device's idle handling), then stop burning the core.
            if t.elapsed() < Duration::from_micros(200) {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Wait for the next used entry of queue `q`: (id, len).
    pub fn used(&mut self, q: usize) -> (u32, u32) {
        self.used_within(q, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no completion on queue {q}"))
    }

    /// Offer a well-formed 4 KiB read of sector 0 on queue `q`; returns
    /// the status byte's address.
    pub fn offer_read(&mut self, q: usize) -> u64 {
        let (t, h, d, s) = (
            self.queues[q].desc,
            0x20000 + 0x10000 * q as u64,
            0x40000 + 0x10000 * q as u64,
            0x60000 + q as u64,
        );
        self.header(h, IN, 0);
        self.write(s, UNTOUCHED);
        self.desc(t, 0, h, 16, NEXT, 1);
        self.desc(t, 1, d, 4096, NEXT | WRITE, 2);
        self.desc(t, 2, s, 1, WRITE, 0);
        self.offer(q, 0);
        s
    }

    /// A well-formed 4 KiB read of sector 0: must succeed.
    pub fn good_read(&mut self, q: usize) {
        let s = self.offer_read(q);
        assert_eq!(self.used(q), (0, 4097));
        assert_eq!(
            self.read::<u8>(s),
            S_OK,
            "a good request after the hostile ones"
        );
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: our own mapping of MEM bytes, used by nobody after this.
        unsafe { libc::munmap(self.base.cast(), MEM) };
    }
}

/// Reactors and exports of 1 MiB RAM volumes on them.
pub struct Rig {
    pub exports: Vec<Export>,
    /// The volume of each export.
    pub volumes: Vec<Volume>,
    pub reactors: Reactors,
    pub dir: tempfile::TempDir,
    pub sock: std::path::PathBuf,
    /// The socket of each export (`sock` is the first).
    pub socks: Vec<std::path::PathBuf>,
}

pub fn rig(nq: u16) -> Rig {
    rig_with(nq, ReactorConfig::default().idle_spin)
}

pub fn rig_with(nq: u16, idle_spin: Duration) -> Rig {
    rig_of(nq, idle_spin, 1)
}

/// `count` exports with `nq` queues each; queue i of every export runs on
/// reactor i modulo 2, so their queues share reactors.
pub fn rig_of(nq: u16, idle_spin: Duration, count: usize) -> Rig {
    rig_custom(nq, idle_spin, count, |_| {})
}

/// As [`rig_of`], with the first export's options changed by `first`.
pub fn rig_custom(
    nq: u16,
    idle_spin: Duration,
    count: usize,
    first: impl Fn(&mut ExportOptions),
) -> Rig {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        idle_spin,
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut exports = Vec::new();
    let mut volumes = Vec::new();
    let mut socks = Vec::new();
    for i in 0..count {
        let dev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("ram", 4096, 256).unwrap());
        let volume = Volume::new(reactors.set(), &format!("vol{i}"), dev);
        let sock = dir.path().join(format!("h{i}.sock"));
        let mut opts = ExportOptions {
            serial: "h".into(),
            ..ExportOptions::new(sock.clone(), nq)
        };
        if i == 0 {
            first(&mut opts);
        }
        exports.push(Export::create(reactors.set(), &volume, opts).unwrap());
        volumes.push(volume);
        socks.push(sock);
    }
    Rig {
        exports,
        volumes,
        reactors,
        sock: socks[0].clone(),
        socks,
        dir,
    }
}

/// Offer a one-off chain built by `build` (descriptors from index 0) and
/// return (used len, status byte at `status`).
pub fn exchange(g: &mut Guest, build: impl FnOnce(&Guest, u64), status: u64) -> (u32, u8) {
    g.write(status, UNTOUCHED);
    let t = g.queues[0].desc;
    build(g, t);
    g.offer(0, 0);
    let (id, len) = g.used(0);
    assert_eq!(id, 0);
    (len, g.read(status))
}
