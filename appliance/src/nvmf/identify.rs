//! The data structures a host reads: Identify (controller, namespace,
//! active namespace list, namespace identification descriptors) and the
//! log pages (error, SMART / health, firmware slot, changed namespace
//! list, discovery). Offsets follow the NVMe base specification 1.4 and
//! NVMe over Fabrics 1.1.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{Controller, Subsystem};

/// The version the controller reports (NVMe 1.3: the host reads the
/// namespace descriptors, and no I/O command set specific structures).
pub const VERSION: u32 = 0x0001_0300;
/// Largest transfer the target offers: 2^MDTS pages of 4 KiB.
pub const MDTS: u8 = 5;
/// Largest transfer in bytes.
pub const MAX_TRANSFER: u32 = 4096 << MDTS;

/// MDTS for a volume: the target's limit, or the volume's if smaller
/// (a power of two of 4 KiB pages, at least one page).
pub fn mdts(info: &bdev::DeviceInfo) -> u8 {
    let pages = (info.max_transfer / 4096).max(1);
    let fit = 31 - pages.leading_zeros();
    (fit as u8).min(MDTS)
}
/// In-capsule data an IO queue accepts.
pub const IN_CAPSULE: u32 = 8192;
/// In-capsule data the admin queue accepts (what Linux sends there).
pub const ADMIN_IN_CAPSULE: u32 = 8192;
/// Entries per queue at most (CAP.MQES + 1).
pub const MAX_QUEUE_ENTRIES: u32 = 1024;
/// Outstanding Asynchronous Event Requests allowed (AERL + 1).
pub const AER_LIMIT: usize = 4;
/// Log page: error information.
pub const LOG_ERROR: u8 = 0x01;
/// Log page: SMART / health information.
pub const LOG_SMART: u8 = 0x02;
/// Log page: firmware slot information.
pub const LOG_FIRMWARE: u8 = 0x03;
/// Log page: changed namespace list.
pub const LOG_CHANGED_NS: u8 = 0x04;
/// Log page: discovery.
pub const LOG_DISCOVERY: u8 = 0x70;

/// CAP: MQES, CQR, TO 7.5 s, the NVM command set, 4 KiB pages.
pub fn cap() -> u64 {
    (MAX_QUEUE_ENTRIES as u64 - 1) | 1 << 16 | 15 << 24 | 1 << 37
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// An ASCII field padded with spaces.
fn ascii(b: &mut [u8], at: usize, len: usize, s: &str) {
    let f = &mut b[at..at + len];
    f.fill(b' ');
    let n = s.len().min(len);
    f[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// A NUL-padded string field.
fn string(b: &mut [u8], at: usize, len: usize, s: &str) {
    let n = s.len().min(len - 1);
    b[at..at + n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Identify Controller.
pub fn controller(c: &Controller) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let info = c.subsystem.as_ref().map(|s| s.volume.info());
    let (serial, model, nqn) = match &c.subsystem {
        Some(s) => (
            s.opts.serial.as_str(),
            "appliance volume",
            s.opts.nqn.as_str(),
        ),
        None => ("", "appliance discovery", nvmf::capsule::DISCOVERY_NQN),
    };
    ascii(&mut b, 4, 20, serial);
    ascii(&mut b, 24, 40, model);
    ascii(&mut b, 64, 8, env!("CARGO_PKG_VERSION"));
    b[72] = 6; // RAB
               // CMIC: the subsystem may have several controllers (several hosts,
               // or one host over several paths).
    b[76] = if c.is_discovery() { 0 } else { 0x02 };
    b[77] = info.as_ref().map_or(MDTS, mdts);
    put(&mut b, 78, &c.cntlid.to_le_bytes());
    put(&mut b, 80, &VERSION.to_le_bytes());
    // OAES: namespace attribute notices.
    let oaes: u32 = if c.is_discovery() { 0 } else { 1 << 8 };
    put(&mut b, 92, &oaes.to_le_bytes());
    b[111] = if c.is_discovery() { 2 } else { 1 }; // CNTRLTYPE
    b[258] = 3; // ACL: 4 aborts
    b[259] = (AER_LIMIT - 1) as u8; // AERL
    b[260] = 0x03; // FRMW: one slot, read only
    b[261] = 0x04; // LPA: extended data (offsets) for Get Log Page
    b[262] = 0; // ELPE: one error log entry
    put(&mut b, 320, &1u16.to_le_bytes()); // KAS: 100 ms
    b[512] = 0x66; // SQES
    b[513] = 0x44; // CQES
    put(&mut b, 514, &(MAX_QUEUE_ENTRIES as u16).to_le_bytes()); // MAXCMD
    if let Some(info) = &info {
        put(&mut b, 516, &1u32.to_le_bytes()); // NN
                                               // ONCS: Dataset Management, Write Zeroes, as the volume does them.
        let oncs = (info.discard as u16) << 2 | (info.write_zeroes as u16) << 3;
        put(&mut b, 520, &oncs.to_le_bytes());
        b[525] = info.flush as u8; // VWC
    }
    // SGLS: supported, offsets in data block descriptors.
    put(&mut b, 536, &(1u32 | 1 << 20).to_le_bytes());
    string(&mut b, 768, 256, nqn);
    let ioccsz = (64 + IN_CAPSULE) / 16;
    put(&mut b, 1792, &ioccsz.to_le_bytes());
    put(&mut b, 1796, &1u32.to_le_bytes()); // IORCSZ
                                            // ICDOFF 0, FCATT 0 (dynamic controller model), MSDBD 1, OFCS:
                                            // Disconnect is supported.
    b[1803] = 1;
    put(&mut b, 1804, &1u16.to_le_bytes());
    b
}

/// Identify Namespace for NSID 1 of `s`.
pub fn namespace(s: &Subsystem) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let info = s.volume.info();
    put(&mut b, 0, &info.num_blocks.to_le_bytes()); // NSZE
    put(&mut b, 8, &info.num_blocks.to_le_bytes()); // NCAP
    put(&mut b, 16, &info.num_blocks.to_le_bytes()); // NUSE
    b[25] = 0; // NLBAF: one format
    b[26] = 0; // FLBAS
    b[30] = 1; // NMIC: may be shared by several controllers
               // NOIOB: the volume's preferred boundary (a RAID5 stripe).
    let noiob = u16::try_from(info.optimal_io_boundary).unwrap_or(0);
    put(&mut b, 46, &noiob.to_le_bytes());
    put(&mut b, 104, &s.opts.nguid); // NGUID
    let lbads = info.block_size.trailing_zeros() as u8;
    b[130] = lbads; // LBAF0: LBADS
    b
}

/// The active namespace list after `nsid`.
pub fn active_namespaces(after: u32) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    if after < 1 {
        put(&mut b, 0, &1u32.to_le_bytes());
    }
    b
}

/// Namespace identification descriptors: the NGUID and the same bytes as
/// a UUID.
pub fn descriptors(s: &Subsystem) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0] = 2; // NIDT: NGUID
    b[1] = 16;
    put(&mut b, 4, &s.opts.nguid);
    b[20] = 3; // NIDT: UUID
    b[21] = 16;
    put(&mut b, 24, &s.opts.nguid);
    b
}

/// The SMART / health log: counters from the subsystem.
pub fn smart(s: Option<&Subsystem>) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    put(&mut b, 1, &300u16.to_le_bytes()); // composite temperature, K
    b[3] = 100; // available spare
    b[4] = 10; // threshold
    if let Some(s) = s {
        let n =
            |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed) as u128;
        // Data units: thousands of 512-byte units, rounded up (what
        // `nvme smart-log` shows as data read and written).
        let units = |bytes: u128| bytes.div_ceil(512 * 1000);
        put(&mut b, 32, &units(n(&s.read_bytes)).to_le_bytes());
        put(&mut b, 48, &units(n(&s.write_bytes)).to_le_bytes());
        put(&mut b, 64, &n(&s.reads).to_le_bytes()); // host read commands
        put(&mut b, 80, &n(&s.writes).to_le_bytes()); // host write commands
    }
    b
}

/// The firmware slot log: slot 1 active, running this version.
pub fn firmware() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0] = 1; // AFI
    ascii(&mut b, 8, 8, env!("CARGO_PKG_VERSION"));
    b
}

/// The changed namespace list.
pub fn changed_namespaces(changed: bool) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    if changed {
        put(&mut b, 0, &1u32.to_le_bytes());
    }
    b
}

/// One discovery log entry per subsystem `hostnqn` may use.
pub fn discovery(
    subsystems: &[Arc<Subsystem>],
    hostnqn: &str,
    addr: SocketAddr,
    generation: u64,
) -> Vec<u8> {
    let visible: Vec<_> = subsystems
        .iter()
        .filter(|s| !s.is_removed() && s.allows(hostnqn))
        .collect();
    // An IPv4 host reached through a dual-stack listener sees its own
    // family, not "::ffff:a.b.c.d" (audit: its host then needed IPv6 and
    // connected to the same subsystem twice).
    let ip = addr.ip().to_canonical();
    let mut b = vec![0u8; 1024 * (1 + visible.len())];
    put(&mut b, 0, &generation.to_le_bytes()); // GENCTR
    put(&mut b, 8, &(visible.len() as u64).to_le_bytes()); // NUMREC
    for (i, s) in visible.iter().enumerate() {
        let e = 1024 * (i + 1);
        b[e] = 3; // TRTYPE: TCP
        b[e + 1] = if ip.is_ipv4() { 1 } else { 2 }; // ADRFAM
        b[e + 2] = 2; // SUBTYPE: NVMe subsystem
                      // TREQ 0 (not specified): older libnvme adds a TLS option the
                      // 6.1 kernel refuses when it says "not required".
        put(&mut b, e + 4, &1u16.to_le_bytes()); // PORTID
        put(&mut b, e + 6, &0xffffu16.to_le_bytes()); // CNTLID: dynamic
        put(&mut b, e + 8, &32u16.to_le_bytes()); // ASQSZ
        ascii(&mut b, e + 32, 32, &addr.port().to_string()); // TRSVCID
        string(&mut b, e + 256, 256, &s.opts.nqn); // SUBNQN
        ascii(&mut b, e + 512, 256, &ip.to_string()); // TRADDR
                                                      // TSAS: no security.
    }
    b
}
