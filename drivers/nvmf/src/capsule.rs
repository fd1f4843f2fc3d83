//! Submission and completion entries as bytes, and the fabrics commands
//! (NVMe over Fabrics 1.1: Connect, Property Get/Set, Disconnect).

use nvme::spec::{Cqe, Sqe, Status};

/// The fabrics command opcode; the command type is byte 4.
pub const OPC_FABRICS: u8 = 0x7f;
/// Fabrics command types.
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
    /// Disconnect (an IO queue).
    pub const DISCONNECT: u8 = 0x08;
}

/// Admin opcodes a fabrics controller serves.
pub mod admin {
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0c;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
}

/// Properties (the fabrics form of the controller registers).
pub mod prop {
    /// Controller capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version.
    pub const VS: u32 = 0x08;
    /// Controller configuration.
    pub const CC: u32 = 0x14;
    /// Controller status.
    pub const CSTS: u32 = 0x1c;
    /// NVM subsystem reset.
    pub const NSSR: u32 = 0x20;
}

/// The well-known NQN of a discovery controller.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// SGL descriptor identifiers (byte 15 of DPTR) NVMe/TCP commands use.
pub mod sgl {
    /// Data block, offset subtype: data in the capsule.
    pub const IN_CAPSULE: u8 = 0x01;
    /// Transport data block: data moved by R2T/H2CData or C2HData.
    pub const TRANSPORT: u8 = 0x5a;
}

/// Status codes fabrics adds to the ones `nvme::spec::Status` names.
pub mod status {
    use super::Status;
    /// Internal error.
    pub const INTERNAL: Status = Status { sct: 0, sc: 0x06 };
    /// Data SGL length invalid.
    pub const SGL_LENGTH: Status = Status { sct: 0, sc: 0x0f };
    /// SGL descriptor type invalid.
    pub const SGL_TYPE: Status = Status { sct: 0, sc: 0x11 };
    /// SGL offset invalid.
    pub const SGL_OFFSET: Status = Status { sct: 0, sc: 0x16 };
    /// Transient transport error (a data digest mismatch).
    pub const TRANSPORT: Status = Status { sct: 0, sc: 0x22 };
    /// Namespace not ready.
    pub const NS_NOT_READY: Status = Status { sct: 0, sc: 0x82 };
    /// Asynchronous event request limit exceeded.
    pub const AER_LIMIT: Status = Status { sct: 1, sc: 0x05 };
    /// Invalid log page.
    pub const INVALID_LOG: Status = Status { sct: 1, sc: 0x09 };
    /// Feature identifier not saveable.
    pub const NOT_SAVEABLE: Status = Status { sct: 1, sc: 0x0d };
    /// Connect: incompatible format.
    pub const CONNECT_FORMAT: Status = Status { sct: 1, sc: 0x80 };
    /// Connect: controller busy.
    pub const CONNECT_BUSY: Status = Status { sct: 1, sc: 0x81 };
    /// Connect: invalid parameters (DW0 says which).
    pub const CONNECT_INVALID: Status = Status { sct: 1, sc: 0x82 };
    /// Connect: the host may not use the subsystem.
    pub const CONNECT_HOST: Status = Status { sct: 1, sc: 0x84 };
}

use crate::pdu::{u16_at, u32_at};

#[inline]
fn u64_at(b: &[u8], at: usize) -> u64 {
    u32_at(b, at) as u64 | (u32_at(b, at + 4) as u64) << 32
}

/// A submission entry from its 64 bytes.
pub fn sqe_from(b: &[u8; 64]) -> Sqe {
    let mut cdw = [0u32; 6];
    for (i, w) in cdw.iter_mut().enumerate() {
        *w = u32_at(b, 40 + 4 * i);
    }
    Sqe {
        cdw0: u32_at(b, 0),
        nsid: u32_at(b, 4),
        rsvd: [u32_at(b, 8), u32_at(b, 12)],
        mptr: u64_at(b, 16),
        prp1: u64_at(b, 24),
        prp2: u64_at(b, 32),
        cdw,
    }
}

/// A submission entry's 64 bytes.
pub fn sqe_bytes(s: &Sqe) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0..4].copy_from_slice(&s.cdw0.to_le_bytes());
    b[4..8].copy_from_slice(&s.nsid.to_le_bytes());
    b[8..12].copy_from_slice(&s.rsvd[0].to_le_bytes());
    b[12..16].copy_from_slice(&s.rsvd[1].to_le_bytes());
    b[16..24].copy_from_slice(&s.mptr.to_le_bytes());
    b[24..32].copy_from_slice(&s.prp1.to_le_bytes());
    b[32..40].copy_from_slice(&s.prp2.to_le_bytes());
    for (i, w) in s.cdw.iter().enumerate() {
        b[40 + 4 * i..44 + 4 * i].copy_from_slice(&w.to_le_bytes());
    }
    b
}

/// A completion entry from its 16 bytes.
pub fn cqe_from(b: &[u8; 16]) -> Cqe {
    Cqe {
        result: u32_at(b, 0),
        rsvd: u32_at(b, 4),
        sq: u32_at(b, 8),
        status: u32_at(b, 12),
    }
}

/// A completion entry's 16 bytes.
pub fn cqe_bytes(c: &Cqe) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&c.result.to_le_bytes());
    b[4..8].copy_from_slice(&c.rsvd.to_le_bytes());
    b[8..12].copy_from_slice(&c.sq.to_le_bytes());
    b[12..16].copy_from_slice(&c.status.to_le_bytes());
    b
}

/// A completion for command `cid` of queue `qid` whose head is `sqhd`:
/// result dwords 0 and 1 and `status`. Over a fabric there is no phase
/// and the host decides about retries itself, so DNR is set only for
/// errors a retry cannot fix (not for a controller busy for now: Linux
/// never reconnects after a Connect that failed with DNR).
pub fn completion(cid: u16, qid: u16, sqhd: u16, result: u64, status: Status) -> Cqe {
    let dnr = !status.ok()
        && status != self::status::TRANSPORT
        && status != self::status::NS_NOT_READY
        && status != self::status::CONNECT_BUSY;
    Cqe {
        result: result as u32,
        rsvd: (result >> 32) as u32,
        sq: sqhd as u32 | (qid as u32) << 16,
        status: cid as u32
            | (status.sc as u32) << 17
            | (status.sct as u32 & 7) << 25
            | (dnr as u32) << 31,
    }
}

/// The data pointer of a command: where its data is, per NVMe/TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPointer {
    /// In the capsule, at `offset`, `len` bytes.
    InCapsule {
        /// Offset into the in-capsule data.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// Moved by the transport (R2T/H2CData, C2HData).
    Transport {
        /// Bytes.
        len: u32,
    },
    /// Any other descriptor (PRPs, keyed SGLs...): not for this transport.
    Other(u8),
}

/// The data pointer in `s`'s DPTR (an SGL descriptor over fabrics).
pub fn data_pointer(s: &Sqe) -> DataPointer {
    let psdt = (s.cdw0 >> 14) & 3;
    let id = (s.prp2 >> 56) as u8;
    // Over fabrics PSDT is 01b (SGL, metadata contiguous); PRPs and the
    // metadata-SGL form are not for this transport.
    if psdt != 1 {
        return DataPointer::Other(0);
    }
    let len = s.prp2 as u32;
    match id {
        sgl::IN_CAPSULE => DataPointer::InCapsule {
            offset: s.prp1,
            len,
        },
        sgl::TRANSPORT => DataPointer::Transport { len },
        other => DataPointer::Other(other),
    }
}

/// Set `s`'s data pointer to `len` bytes in the capsule or by transport.
pub fn set_data_pointer(s: &mut Sqe, in_capsule: bool, len: u32) {
    s.cdw0 = (s.cdw0 & !(3 << 14)) | 1 << 14;
    let id = if in_capsule {
        sgl::IN_CAPSULE
    } else {
        sgl::TRANSPORT
    };
    s.prp1 = 0;
    s.prp2 = len as u64 | (id as u64) << 56;
}

/// The fields of a Connect command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect {
    /// Record format (0).
    pub recfmt: u16,
    /// Queue: 0 admin, otherwise an IO queue.
    pub qid: u16,
    /// Submission queue size, 0's based.
    pub sqsize: u16,
    /// Connect attributes (bit 2: SQ flow control disable).
    pub cattr: u8,
    /// Keep-alive timeout in milliseconds (admin queue).
    pub kato: u32,
}

impl Connect {
    /// Read from a Connect command.
    pub fn from_sqe(s: &Sqe) -> Connect {
        Connect {
            recfmt: s.cdw[0] as u16,
            qid: (s.cdw[0] >> 16) as u16,
            sqsize: s.cdw[1] as u16,
            cattr: (s.cdw[1] >> 16) as u8,
            kato: s.cdw[2],
        }
    }

    /// Write into a Connect command.
    pub fn to_sqe(&self, s: &mut Sqe) {
        s.cdw[0] = self.recfmt as u32 | (self.qid as u32) << 16;
        s.cdw[1] = self.sqsize as u32 | (self.cattr as u32) << 16;
        s.cdw[2] = self.kato;
    }
}

/// Bytes of the Connect command's data.
pub const CONNECT_DATA_LEN: usize = 1024;
/// Where the subsystem NQN lies in the Connect data.
pub const CONNECT_SUBNQN_AT: u32 = 256;
/// Where the host NQN lies in the Connect data.
pub const CONNECT_HOSTNQN_AT: u32 = 512;
/// Where the controller ID lies in the Connect data.
pub const CONNECT_CNTLID_AT: u32 = 16;

/// The Connect command's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectData {
    /// Host identifier.
    pub host_id: [u8; 16],
    /// Controller ID: 0xffff for any (dynamic model), else the admin
    /// queue's controller for an IO queue.
    pub cntlid: u16,
    /// The subsystem asked for.
    pub subnqn: String,
    /// The host.
    pub hostnqn: String,
}

/// Why Connect data is not valid: the offset of the bad field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connect data: invalid field at byte {0}")]
pub struct ConnectDataError(pub u32);

/// An NQN field: NUL-terminated (or the full 256 bytes) printable ASCII.
fn nqn(b: &[u8], at: u32) -> Result<String, ConnectDataError> {
    let f = &b[at as usize..at as usize + 256];
    let end = f.iter().position(|&c| c == 0).unwrap_or(f.len());
    let s = &f[..end];
    if s.is_empty() || !s.iter().all(|c| c.is_ascii_graphic()) {
        return Err(ConnectDataError(at));
    }
    Ok(String::from_utf8_lossy(s).into_owned())
}

impl ConnectData {
    /// Parse the 1024 bytes of Connect data.
    pub fn parse(b: &[u8]) -> Result<ConnectData, ConnectDataError> {
        if b.len() < CONNECT_DATA_LEN {
            return Err(ConnectDataError(0));
        }
        let mut host_id = [0u8; 16];
        host_id.copy_from_slice(&b[..16]);
        Ok(ConnectData {
            host_id,
            cntlid: u16_at(b, 16),
            subnqn: nqn(b, CONNECT_SUBNQN_AT)?,
            hostnqn: nqn(b, CONNECT_HOSTNQN_AT)?,
        })
    }

    /// The 1024 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; CONNECT_DATA_LEN];
        b[..16].copy_from_slice(&self.host_id);
        b[16..18].copy_from_slice(&self.cntlid.to_le_bytes());
        for (at, s) in [
            (CONNECT_SUBNQN_AT, &self.subnqn),
            (CONNECT_HOSTNQN_AT, &self.hostnqn),
        ] {
            let n = s.len().min(255);
            b[at as usize..at as usize + n].copy_from_slice(&s.as_bytes()[..n]);
        }
        b
    }
}

/// Whether `s` is a valid NQN to configure: "nqn." form, at most 223
/// bytes (NVMe base spec), printable ASCII.
pub fn valid_nqn(s: &str) -> bool {
    s.len() <= 223
        && s.starts_with("nqn.")
        && s.len() > 4
        && s.bytes().all(|c| c.is_ascii_graphic())
}

/// A Property Get or Set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Property {
    /// 8 bytes (else 4).
    pub wide: bool,
    /// Offset of the property.
    pub offset: u32,
    /// Value to set.
    pub value: u64,
}

impl Property {
    /// Read from a Property Get or Set command.
    pub fn from_sqe(s: &Sqe) -> Property {
        Property {
            wide: s.cdw[0] & 7 == 1,
            offset: s.cdw[1],
            value: s.cdw[2] as u64 | (s.cdw[3] as u64) << 32,
        }
    }

    /// Write into a Property Get or Set command.
    pub fn to_sqe(&self, s: &mut Sqe) {
        s.cdw[0] = self.wide as u32;
        s.cdw[1] = self.offset;
        s.cdw[2] = self.value as u32;
        s.cdw[3] = (self.value >> 32) as u32;
    }
}

/// The fabrics command type of `s` (byte 4).
pub fn fabrics_type(s: &Sqe) -> u8 {
    s.nsid as u8
}

/// A fabrics command of type `ft`.
pub fn fabrics_sqe(ft: u8) -> Sqe {
    Sqe::new(OPC_FABRICS, ft as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let mut b = [0u8; 64];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(7).wrapping_add(1);
        }
        assert_eq!(sqe_bytes(&sqe_from(&b)), b);
        let c = completion(0x1234, 3, 17, 0xdead_beef_0000_0001, Status::INVALID_FIELD);
        let back = cqe_from(&cqe_bytes(&c));
        assert_eq!(back, c);
        assert_eq!(back.cid(), 0x1234);
        assert_eq!(back.code(), Status::INVALID_FIELD);
    }

    /// DNR only on errors a retry cannot fix: Linux never reconnects after
    /// a Connect that failed with it, so a controller busy for now must
    /// not carry it (audit).
    #[test]
    fn do_not_retry_is_set_only_where_a_retry_cannot_help() {
        let dnr = |s: Status| completion(1, 0, 0, 0, s).status >> 31 == 1;
        assert!(dnr(Status::INVALID_FIELD));
        assert!(dnr(status::INTERNAL));
        assert!(!dnr(status::CONNECT_BUSY));
        assert!(!dnr(status::TRANSPORT));
        assert!(!dnr(status::NS_NOT_READY));
        assert!(!dnr(Status::SUCCESS));
    }

    #[test]
    fn connect_data_round_trips_and_checks_nqns() {
        let d = ConnectData {
            host_id: [3; 16],
            cntlid: 0xffff,
            subnqn: "nqn.2026-12.io.example:vol".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1".into(),
        };
        let b = d.encode();
        assert_eq!(ConnectData::parse(&b), Ok(d));
        let mut bad = b.clone();
        bad[CONNECT_HOSTNQN_AT as usize] = 0;
        assert_eq!(
            ConnectData::parse(&bad),
            Err(ConnectDataError(CONNECT_HOSTNQN_AT))
        );
        bad = b;
        bad[CONNECT_SUBNQN_AT as usize + 3] = 0x07;
        assert!(ConnectData::parse(&bad).is_err());
        assert!(ConnectData::parse(&[0u8; 100]).is_err());
    }

    #[test]
    fn data_pointers() {
        let mut s = Sqe::new(0x01, 1);
        set_data_pointer(&mut s, true, 4096);
        assert_eq!(
            data_pointer(&s),
            DataPointer::InCapsule {
                offset: 0,
                len: 4096
            }
        );
        set_data_pointer(&mut s, false, 8192);
        assert_eq!(data_pointer(&s), DataPointer::Transport { len: 8192 });
        assert_eq!(data_pointer(&Sqe::new(0x02, 1)), DataPointer::Other(0));
    }
}
