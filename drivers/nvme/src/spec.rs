//! What the NVMe specification (base 1.4, NVM command set) fixes: register
//! offsets and fields, command and completion layouts, opcodes and status
//! codes. Both the driver and the software controller use these, so a
//! misreading of the specification shows up as a disagreement with QEMU's
//! controller in the VM test rather than being agreed on silently.

/// Controller Capabilities (64-bit).
pub const REG_CAP: usize = 0x00;
/// Version.
pub const REG_VS: usize = 0x08;
/// Controller Configuration.
pub const REG_CC: usize = 0x14;
/// Controller Status.
pub const REG_CSTS: usize = 0x1c;
/// Admin Queue Attributes.
pub const REG_AQA: usize = 0x24;
/// Admin Submission Queue base (64-bit).
pub const REG_ASQ: usize = 0x28;
/// Admin Completion Queue base (64-bit).
pub const REG_ACQ: usize = 0x30;
/// First doorbell.
pub const REG_DOORBELLS: usize = 0x1000;

/// The memory page size the driver programs (CC.MPS = 0).
pub const PAGE: usize = 4096;

/// CC.EN.
pub const CC_EN: u32 = 1;
/// CSTS.RDY.
pub const CSTS_RDY: u32 = 1;
/// CSTS.CFS: controller fatal status.
pub const CSTS_CFS: u32 = 2;

/// Fields of CAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Maximum queue entries supported (1-based).
    pub fn mqes(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }
    /// Worst-case time for CSTS.RDY to follow CC.EN, in milliseconds.
    pub fn timeout_ms(self) -> u64 {
        ((self.0 >> 24) & 0xff).max(1) * 500
    }
    /// Doorbell stride in bytes.
    pub fn doorbell_stride(self) -> usize {
        4 << ((self.0 >> 32) & 0xf)
    }
    /// The NVM command set is supported.
    pub fn nvm_command_set(self) -> bool {
        (self.0 >> 37) & 1 == 1
    }
    /// Smallest memory page size, in bytes.
    pub fn mps_min(self) -> usize {
        1 << (12 + ((self.0 >> 48) & 0xf))
    }
}

/// Byte offset of submission queue `qid`'s tail doorbell.
pub fn sq_doorbell(qid: u16, stride: usize) -> usize {
    REG_DOORBELLS + (2 * qid as usize) * stride
}

/// Byte offset of completion queue `qid`'s head doorbell.
pub fn cq_doorbell(qid: u16, stride: usize) -> usize {
    REG_DOORBELLS + (2 * qid as usize + 1) * stride
}

/// CC value for an enabled controller with 64-byte submission and 16-byte
/// completion entries, 4 KiB pages, the NVM command set, round robin.
pub const CC_ENABLE: u32 = CC_EN | (6 << 16) | (4 << 20);

/// Admin opcodes.
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Feature: Number of Queues.
    pub const FEAT_NUM_QUEUES: u32 = 0x07;
    /// Identify CNS: namespace.
    pub const CNS_NAMESPACE: u32 = 0x00;
    /// Identify CNS: controller.
    pub const CNS_CONTROLLER: u32 = 0x01;
    /// Identify CNS: active namespace ID list.
    pub const CNS_ACTIVE_NS: u32 = 0x02;
}

/// NVM command set opcodes.
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management (deallocate = discard).
    pub const DSM: u8 = 0x09;
    /// Write Zeroes: deallocate the blocks too.
    pub const WZ_DEAC: u32 = 1 << 25;
    /// Dataset Management: the ranges are to be deallocated.
    pub const DSM_AD: u32 = 1 << 2;
    /// Most ranges in one Dataset Management command.
    pub const DSM_MAX_RANGES: usize = 256;
    /// Most blocks in one Write Zeroes command (NLB is 16 bits, 0-based).
    pub const WZ_MAX_BLOCKS: u64 = 1 << 16;
}

/// CDW0 PSDT = 01b: the data pointer is an SGL (metadata contiguous).
pub const PSDT_SGL: u32 = 1 << 14;
/// SGL descriptor identifier: data block (type 0, subtype address).
pub const SGL_DATA_BLOCK: u8 = 0x00;
/// SGL descriptor identifier: last segment (type 3, subtype address).
pub const SGL_LAST_SEGMENT: u8 = 0x30;

/// An SGL descriptor in the form it takes in DPTR or in a segment: address,
/// then length and identifier (byte 15).
pub fn sgl_descriptor(addr: u64, len: u32, id: u8) -> [u64; 2] {
    [addr, len as u64 | (id as u64) << 56]
}

/// A submission queue entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Sqe {
    /// Opcode, fused and PRP/SGL bits, command identifier.
    pub cdw0: u32,
    /// Namespace.
    pub nsid: u32,
    /// Reserved.
    pub rsvd: [u32; 2],
    /// Metadata pointer.
    pub mptr: u64,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 or list.
    pub prp2: u64,
    /// Command dwords 10 to 15.
    pub cdw: [u32; 6],
}

const _: () = assert!(std::mem::size_of::<Sqe>() == 64);

impl Sqe {
    /// An entry for `opcode` on namespace `nsid`.
    pub fn new(opcode: u8, nsid: u32) -> Sqe {
        Sqe {
            cdw0: opcode as u32,
            nsid,
            ..Sqe::default()
        }
    }
    /// The opcode.
    pub fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }
    /// The command identifier.
    pub fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }
    /// Set the command identifier.
    pub fn set_cid(&mut self, cid: u16) {
        self.cdw0 = (self.cdw0 & 0xffff) | ((cid as u32) << 16);
    }
    /// Starting LBA of a read, write or write-zeroes.
    pub fn slba(&self) -> u64 {
        self.cdw[0] as u64 | ((self.cdw[1] as u64) << 32)
    }
    /// Set the block range of a read, write or write-zeroes (`blocks` >= 1).
    pub fn set_range(&mut self, slba: u64, blocks: u32) {
        self.cdw[0] = slba as u32;
        self.cdw[1] = (slba >> 32) as u32;
        self.cdw[2] = (self.cdw[2] & !0xffff) | (blocks - 1);
    }
    /// Number of blocks of a read, write or write-zeroes.
    pub fn nlb(&self) -> u32 {
        (self.cdw[2] & 0xffff) + 1
    }
}

/// A completion queue entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Cqe {
    /// Command specific result.
    pub result: u32,
    /// Reserved.
    pub rsvd: u32,
    /// Submission queue head and identifier.
    pub sq: u32,
    /// Command identifier, phase and status.
    pub status: u32,
}

const _: () = assert!(std::mem::size_of::<Cqe>() == 16);

impl Cqe {
    /// The command identifier.
    pub fn cid(&self) -> u16 {
        self.status as u16
    }
    /// The phase tag.
    pub fn phase(&self) -> bool {
        (self.status >> 16) & 1 == 1
    }
    /// Do Not Retry: the command would fail again.
    pub fn dnr(&self) -> bool {
        self.status >> 31 & 1 == 1
    }
    /// Status code type and status code; (0, 0) is success.
    pub fn code(&self) -> Status {
        Status {
            sct: ((self.status >> 25) & 0x7) as u8,
            sc: (self.status >> 17) as u8,
        }
    }
    /// Dword 3 for command `cid` with `phase` and `status`.
    pub fn dw3(cid: u16, phase: bool, status: Status) -> u32 {
        cid as u32
            | (phase as u32) << 16
            | (status.sc as u32) << 17
            | (status.sct as u32 & 7) << 25
            | 1 << 31 // do not retry: the driver decides that itself
    }
}

/// A completion's status code type and status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Status code type: 0 generic, 1 command specific, 2 media.
    pub sct: u8,
    /// Status code.
    pub sc: u8,
}

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status { sct: 0, sc: 0 };
    /// Invalid command opcode.
    pub const INVALID_OPCODE: Status = Status { sct: 0, sc: 0x01 };
    /// Invalid field in command.
    pub const INVALID_FIELD: Status = Status { sct: 0, sc: 0x02 };
    /// Data transfer error (the software controller's IOMMU fault).
    pub const DATA_TRANSFER: Status = Status { sct: 0, sc: 0x04 };
    /// Command abort requested.
    pub const ABORT_REQUESTED: Status = Status { sct: 0, sc: 0x07 };
    /// Command aborted due to SQ deletion.
    pub const ABORTED_SQ_DELETION: Status = Status { sct: 0, sc: 0x08 };
    /// Command sequence error.
    pub const COMMAND_SEQUENCE: Status = Status { sct: 0, sc: 0x0c };
    /// Invalid namespace or format.
    pub const INVALID_NAMESPACE: Status = Status { sct: 0, sc: 0x0b };
    /// LBA out of range.
    pub const LBA_OUT_OF_RANGE: Status = Status { sct: 0, sc: 0x80 };
    /// Namespace Not Ready (a device sends it with Do Not Retry clear
    /// while it comes ready).
    pub const NAMESPACE_NOT_READY: Status = Status { sct: 0, sc: 0x82 };
    /// Invalid queue identifier.
    pub const INVALID_QID: Status = Status { sct: 1, sc: 0x01 };
    /// Invalid queue size.
    pub const INVALID_QSIZE: Status = Status { sct: 1, sc: 0x02 };
    /// Write fault.
    pub const WRITE_FAULT: Status = Status { sct: 2, sc: 0x80 };
    /// Unrecovered read error.
    pub const UNRECOVERED_READ: Status = Status { sct: 2, sc: 0x81 };

    /// Whether the command succeeded.
    pub fn ok(self) -> bool {
        self == Status::SUCCESS
    }
    /// Whether it is a media error (status code type 2).
    pub fn media(self) -> bool {
        self.sct == 2
    }
    /// The 16-bit form used in error messages and metrics.
    pub fn raw(self) -> u16 {
        (self.sct as u16) << 8 | self.sc as u16
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match *self {
            Status::SUCCESS => "success",
            Status::INVALID_OPCODE => "invalid opcode",
            Status::INVALID_FIELD => "invalid field in command",
            Status::DATA_TRANSFER => "data transfer error",
            Status::ABORT_REQUESTED => "command abort requested",
            Status::ABORTED_SQ_DELETION => "aborted by queue deletion",
            Status::COMMAND_SEQUENCE => "command sequence error",
            Status::INVALID_NAMESPACE => "invalid namespace",
            Status::LBA_OUT_OF_RANGE => "LBA out of range",
            Status::INVALID_QID => "invalid queue identifier",
            Status::INVALID_QSIZE => "invalid queue size",
            Status::WRITE_FAULT => "write fault",
            Status::UNRECOVERED_READ => "unrecovered read error",
            _ => "status",
        };
        write!(f, "{what} (sct {:#x}, sc {:#x})", self.sct, self.sc)
    }
}

/// What Identify Controller says that the driver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifyController {
    /// PCI vendor ID.
    pub vid: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Maximum data transfer size as a power of two of the minimum page
    /// size; 0 means no limit.
    pub mdts: u8,
    /// Number of namespaces.
    pub nn: u32,
    /// Optional NVM commands (bit 2 DSM, bit 3 Write Zeroes).
    pub oncs: u16,
    /// Volatile write cache present.
    pub vwc: bool,
    /// SGL support (bits 1:0: 1 any alignment, 2 dword-aligned data blocks).
    pub sgls: u32,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_matches(|c: char| c == ' ' || c == '\0')
        .to_string()
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    le32(b, at) as u64 | (le32(b, at + 4) as u64) << 32
}

impl IdentifyController {
    /// Parse the 4 KiB Identify Controller data structure.
    pub fn parse(b: &[u8; 4096]) -> IdentifyController {
        IdentifyController {
            vid: le16(b, 0),
            serial: text(&b[4..24]),
            model: text(&b[24..64]),
            firmware: text(&b[64..72]),
            mdts: b[77],
            nn: le32(b, 516),
            oncs: le16(b, 520),
            vwc: b[525] & 1 == 1,
            sgls: le32(b, 536),
        }
    }

    /// Write this structure (the software controller's side).
    pub fn write(&self, b: &mut [u8; 4096]) {
        b.fill(0);
        b[0..2].copy_from_slice(&self.vid.to_le_bytes());
        pad(&mut b[4..24], &self.serial);
        pad(&mut b[24..64], &self.model);
        pad(&mut b[64..72], &self.firmware);
        b[77] = self.mdts;
        b[516..520].copy_from_slice(&self.nn.to_le_bytes());
        b[520..522].copy_from_slice(&self.oncs.to_le_bytes());
        b[525] = self.vwc as u8;
        b[536..540].copy_from_slice(&self.sgls.to_le_bytes());
    }

    /// Dataset Management is supported.
    pub fn dsm(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }
    /// SGLs are supported for NVM commands; `Some(true)` when data blocks
    /// must be dword aligned.
    pub fn sgl(&self) -> Option<bool> {
        match self.sgls & 3 {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        }
    }
    /// Write Zeroes is supported.
    pub fn write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }
}

fn pad(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// What Identify Namespace says that the driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Size in logical blocks.
    pub nsze: u64,
    /// Log2 of the logical block size of the formatted LBA format.
    pub lbads: u8,
    /// Metadata bytes per block of the formatted LBA format.
    pub ms: u16,
    /// The formatted LBA format's index (FLBAS bits 3:0, and 6:5 above
    /// them since NVMe 2.0).
    pub format: u8,
    /// The highest LBA format index the table holds (NLBAF).
    pub nlbaf: u8,
    /// Namespace Globally Unique Identifier (all zeros: none).
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier (all zeros: none).
    pub eui64: [u8; 8],
}

impl IdentifyNamespace {
    /// Parse the 4 KiB Identify Namespace data structure. (A format past
    /// the table, `format > nlbaf`, is the caller's to refuse: its entry
    /// is whatever the device left there.)
    pub fn parse(b: &[u8; 4096]) -> IdentifyNamespace {
        let flbas = b[26];
        // Bits 6:5 are the upper two bits of the index (NVMe 2.0): read as
        // bits 3:0 alone, format 16 and up was taken for format 0 and up,
        // and every block address was off by their size ratio.
        let format = (flbas & 0xf) | ((flbas >> 5) & 3) << 4;
        let lbaf = le32(b, 128 + 4 * format as usize);
        IdentifyNamespace {
            nsze: le64(b, 0),
            lbads: (lbaf >> 16) as u8,
            ms: lbaf as u16,
            format,
            nlbaf: b[25],
            nguid: b[104..120].try_into().unwrap_or_default(),
            eui64: b[120..128].try_into().unwrap_or_default(),
        }
    }

    /// Write this structure as LBA format 0 (the software controller's side).
    pub fn write(&self, b: &mut [u8; 4096]) {
        b.fill(0);
        for at in [0, 8, 16] {
            b[at..at + 8].copy_from_slice(&self.nsze.to_le_bytes());
        }
        let lbaf = (self.lbads as u32) << 16 | self.ms as u32;
        let at = 128 + 4 * self.format as usize;
        b[at..at + 4].copy_from_slice(&lbaf.to_le_bytes());
        b[25] = self.nlbaf;
        b[26] = (self.format & 0xf) | (self.format >> 4 & 3) << 5;
        b[104..120].copy_from_slice(&self.nguid);
        b[120..128].copy_from_slice(&self.eui64);
    }
}

/// What a namespace says it is, when it says: its NGUID, else its EUI-64
/// (`None` when both are zeros).
pub fn namespace_ids(ns: &IdentifyNamespace) -> Option<String> {
    if ns.nguid != [0; 16] {
        Some(format!("nguid.{}", hex(&ns.nguid)))
    } else if ns.eui64 != [0; 8] {
        Some(format!("eui.{}", hex(&ns.eui64)))
    } else {
        None
    }
}

/// A name for namespace `nsid` of a drive that stays with its storage
/// wherever the drive is plugged: [`namespace_ids`], else (after Linux's
/// `wwid`) the controller's vendor, serial and model, in hex, with the
/// namespace ID. Its size is no part of it: a namespace may grow.
pub fn namespace_identity(c: &IdentifyController, ns: &IdentifyNamespace, nsid: u32) -> String {
    namespace_ids(ns).unwrap_or_else(|| {
        format!(
            "nvme.{:04x}-{}-{}-{nsid:08x}",
            c.vid,
            hex(c.serial.as_bytes()),
            hex(c.model.as_bytes())
        )
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From review: FLBAS bits 6:5 (the index's upper bits, NVMe 2.0)
    /// were ignored.
    #[test]
    fn an_lba_format_index_above_15_is_read_whole() {
        let ns = IdentifyNamespace {
            nsze: 1000,
            lbads: 12,
            ms: 0,
            format: 17,
            nlbaf: 20,
            nguid: [3; 16],
            eui64: [4; 8],
        };
        let mut b = [0u8; 4096];
        ns.write(&mut b);
        // A decoy at index 1, where the old reading looked.
        b[132..136].copy_from_slice(&(9u32 << 16).to_le_bytes());
        assert_eq!(IdentifyNamespace::parse(&b), ns);
    }

    #[test]
    fn qemu_cap_reads_as_the_rig_measured_it() {
        // CAP of QEMU 7.2's emulated controller, from test-rig.md.
        let cap = Cap(0x004018200f0107ff);
        assert_eq!(cap.mqes(), 2048);
        assert_eq!(cap.timeout_ms(), 7500);
        assert_eq!(cap.doorbell_stride(), 4);
        assert!(cap.nvm_command_set());
        assert_eq!(cap.mps_min(), 4096);
        assert_eq!(sq_doorbell(1, 4), 0x1008);
        assert_eq!(cq_doorbell(1, 4), 0x100c);
    }

    #[test]
    fn completion_status_round_trips() {
        for st in [
            Status::SUCCESS,
            Status::UNRECOVERED_READ,
            Status::INVALID_QID,
        ] {
            let c = Cqe {
                status: Cqe::dw3(77, true, st),
                ..Cqe::default()
            };
            assert_eq!((c.cid(), c.phase(), c.code()), (77, true, st));
        }
    }

    #[test]
    fn identify_structures_round_trip() {
        let ctrl = IdentifyController {
            vid: 0x1b36,
            serial: "deadbeef0".into(),
            model: "QEMU NVMe Ctrl".into(),
            firmware: "1.0".into(),
            mdts: 7,
            nn: 2,
            oncs: 0xc,
            vwc: true,
            sgls: 1,
        };
        let mut b = [0u8; 4096];
        ctrl.write(&mut b);
        assert_eq!(IdentifyController::parse(&b), ctrl);
        let ns = IdentifyNamespace {
            nsze: 1 << 20,
            lbads: 12,
            ms: 0,
            format: 0,
            nlbaf: 0,
            nguid: [0; 16],
            eui64: [0; 8],
        };
        ns.write(&mut b);
        assert_eq!(IdentifyNamespace::parse(&b), ns);
    }

    /// A namespace is known by its NGUID, else its EUI-64, else its
    /// controller's vendor, serial and model and its ID; never by size.
    #[test]
    fn a_namespace_is_named_by_its_identifiers() {
        let c = IdentifyController::parse(&[0u8; 4096]);
        let c = IdentifyController {
            vid: 0x1b36,
            serial: "S1".into(),
            model: "M".into(),
            ..c
        };
        let mut ns = IdentifyNamespace::parse(&[0u8; 4096]);
        assert_eq!(namespace_identity(&c, &ns, 2), "nvme.1b36-5331-4d-00000002");
        assert_eq!(namespace_ids(&ns), None);
        ns.eui64 = [0xab; 8];
        assert_eq!(namespace_identity(&c, &ns, 2), "eui.abababababababab");
        ns.nguid[15] = 1;
        ns.nsze = 7;
        assert_eq!(
            namespace_identity(&c, &ns, 2),
            "nguid.00000000000000000000000000000001"
        );
    }
}
