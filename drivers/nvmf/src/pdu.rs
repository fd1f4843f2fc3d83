//! The NVMe/TCP PDUs: the common header, each type's fixed header, where
//! the digests and the data lie, and their CRC32C digests.
//!
//! Everything here reads bytes a peer sent, so every length, offset and
//! flag is checked against the others and against the limits the caller
//! gives before any data is trusted; a PDU that claims more data than the
//! caller accepts is refused from its first 8 bytes, so nobody buffers a
//! hostile length.

/// Bytes of the common header every PDU starts with.
pub const CH_LEN: usize = 8;
/// Bytes of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// Length of the connection initialisation PDUs (header only).
pub const IC_LEN: usize = 128;
/// Header length of a command capsule (common header and the 64-byte SQE).
pub const COMMAND_HLEN: usize = 72;
/// Header length of a response capsule (common header and the 16-byte CQE).
pub const RESPONSE_HLEN: usize = 24;
/// Header length of H2CData, C2HData and R2T.
pub const DATA_HLEN: usize = 24;
/// Header length of a termination request.
pub const TERM_HLEN: usize = 24;
/// Longest termination request (its data is the offending PDU header).
pub const TERM_MAX: usize = 152;

/// PDU types.
pub mod kind {
    /// Initialize Connection Request.
    pub const IC_REQ: u8 = 0x00;
    /// Initialize Connection Response.
    pub const IC_RESP: u8 = 0x01;
    /// Host to controller termination request.
    pub const H2C_TERM: u8 = 0x02;
    /// Controller to host termination request.
    pub const C2H_TERM: u8 = 0x03;
    /// Command capsule.
    pub const COMMAND: u8 = 0x04;
    /// Response capsule.
    pub const RESPONSE: u8 = 0x05;
    /// Host to controller data.
    pub const H2C_DATA: u8 = 0x06;
    /// Controller to host data.
    pub const C2H_DATA: u8 = 0x07;
    /// Ready to transfer.
    pub const R2T: u8 = 0x09;
}

/// Common header flags.
pub mod flag {
    /// A header digest follows the header.
    pub const HDGST: u8 = 0x01;
    /// A data digest follows the data.
    pub const DDGST: u8 = 0x02;
    /// The last data PDU of a transfer (H2CData, C2HData).
    pub const LAST: u8 = 0x04;
    /// C2HData: the command succeeded and no response capsule follows.
    pub const SUCCESS: u8 = 0x08;
}

/// Fatal error status of a termination request.
pub mod fes {
    /// A header field is invalid (FEI: its byte offset).
    pub const INVALID_HEADER: u16 = 0x01;
    /// A PDU came that the state of the connection does not allow.
    pub const SEQUENCE: u16 = 0x02;
    /// The header digest did not match.
    pub const HEADER_DIGEST: u16 = 0x03;
    /// Data outside the range the command or R2T asked for.
    pub const OUT_OF_RANGE: u16 = 0x04;
    /// More data in one PDU than the receiver accepts.
    pub const DATA_LIMIT: u16 = 0x05;
    /// A parameter the receiver does not support (FEI: its offset).
    pub const UNSUPPORTED: u16 = 0x06;
}

/// Which digests a connection carries (negotiated by ICReq/ICResp).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    /// Header digests.
    pub header: bool,
    /// Data digests.
    pub data: bool,
}

impl Digests {
    fn from_byte(b: u8) -> Digests {
        Digests {
            header: b & 1 != 0,
            data: b & 2 != 0,
        }
    }

    fn byte(self) -> u8 {
        self.header as u8 | (self.data as u8) << 1
    }

    fn header_len(self) -> usize {
        if self.header {
            DIGEST_LEN
        } else {
            0
        }
    }
}

/// ICReq: what the host asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcReq {
    /// PDU format version (0).
    pub pfv: u16,
    /// Host PDU data alignment: C2H data starts at a multiple of
    /// (hpda + 1) * 4 bytes.
    pub hpda: u8,
    /// Digests the host wants.
    pub digests: Digests,
    /// Outstanding R2Ts per command the host accepts, 0's based.
    pub maxr2t: u32,
}

/// ICResp: what the controller grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcResp {
    /// PDU format version (0).
    pub pfv: u16,
    /// Controller PDU data alignment, like `hpda` for host data.
    pub cpda: u8,
    /// Digests in use from now on.
    pub digests: Digests,
    /// Most data the controller accepts in one H2CData PDU.
    pub maxh2cdata: u32,
}

/// The header of an H2CData or C2HData PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataHeader {
    /// The command the data belongs to.
    pub cccid: u16,
    /// H2CData: the R2T's transfer tag (C2HData: reserved).
    pub ttag: u16,
    /// Offset of this data in the command's buffer.
    pub offset: u32,
    /// Bytes of data.
    pub length: u32,
    /// The last PDU of the transfer.
    pub last: bool,
    /// C2HData: success without a response capsule.
    pub success: bool,
}

/// An R2T: the controller is ready for `length` bytes at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2t {
    /// The command.
    pub cccid: u16,
    /// Tag the host puts in the H2CData PDUs that answer it.
    pub ttag: u16,
    /// Offset in the command's buffer.
    pub offset: u32,
    /// Bytes wanted.
    pub length: u32,
}

/// A parsed PDU; data borrows from the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pdu<'a> {
    /// Initialize Connection Request.
    IcReq(IcReq),
    /// Initialize Connection Response.
    IcResp(IcResp),
    /// A termination request from either side.
    Term {
        /// Sent by the host (H2CTermReq).
        from_host: bool,
        /// Fatal error status.
        fes: u16,
        /// Fatal error information.
        fei: u32,
        /// The header of the PDU it was about, as far as it was sent.
        header: &'a [u8],
    },
    /// A command capsule with its in-capsule data.
    Command {
        /// The submission queue entry.
        sqe: [u8; 64],
        /// In-capsule data (empty if none).
        data: &'a [u8],
    },
    /// A response capsule.
    Response([u8; 16]),
    /// Host to controller data.
    H2cData(DataHeader, &'a [u8]),
    /// Controller to host data.
    C2hData(DataHeader, &'a [u8]),
    /// Ready to transfer.
    R2t(R2t),
}

impl Pdu<'_> {
    /// The PDU's kind, for messages (never its bytes: a peer's PDU may
    /// carry megabytes).
    pub fn kind(&self) -> &'static str {
        match self {
            Pdu::IcReq(_) => "ICReq",
            Pdu::IcResp(_) => "ICResp",
            Pdu::Term {
                from_host: true, ..
            } => "H2CTermReq",
            Pdu::Term { .. } => "C2HTermReq",
            Pdu::Command { .. } => "CapsuleCmd",
            Pdu::Response(_) => "CapsuleResp",
            Pdu::H2cData(..) => "H2CData",
            Pdu::C2hData(..) => "C2HData",
            Pdu::R2t(_) => "R2T",
        }
    }
}

/// Why bytes are not a PDU. All but `DataDigest` end the connection
/// with a termination request carrying [`fes`](Self::fes) and
/// [`fei`](Self::fei).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// Not a PDU type, or not one this end receives.
    #[error("PDU type {0:#04x} is not one this end receives")]
    Type(u8),
    /// A header field does not agree with the type or the others.
    #[error("PDU type {kind:#04x}: {what} is invalid")]
    Field {
        /// The PDU type.
        kind: u8,
        /// Which field, in words.
        what: &'static str,
        /// Its byte offset in the header.
        offset: u32,
    },
    /// The PDU carries more data than the receiver accepts.
    #[error("PDU type {kind:#04x} carries {len} bytes of data, more than the {max} accepted")]
    TooLong {
        /// The PDU type.
        kind: u8,
        /// Bytes claimed.
        len: u64,
        /// Bytes accepted.
        max: u32,
    },
    /// The header digest does not match.
    #[error("PDU type {kind:#04x}: header digest mismatch")]
    HeaderDigest {
        /// The PDU type.
        kind: u8,
    },
    /// The data digest does not match. The connection goes on: the
    /// command fails with a transient transport error.
    #[error("PDU type {kind:#04x} for command {cid}: data digest mismatch")]
    DataDigest {
        /// The PDU type.
        kind: u8,
        /// The command the data was for.
        cid: u16,
        /// Bytes the PDU took in the stream.
        len: usize,
    },
}

impl PduError {
    /// The fatal error status to send in a termination request.
    pub fn fes(&self) -> u16 {
        match self {
            PduError::Type(_) | PduError::Field { .. } => fes::INVALID_HEADER,
            PduError::TooLong { .. } => fes::DATA_LIMIT,
            PduError::HeaderDigest { .. } => fes::HEADER_DIGEST,
            // Not fatal; should it end a connection, it was a bad header.
            PduError::DataDigest { .. } => fes::INVALID_HEADER,
        }
    }

    /// The fatal error information: the offending field's offset.
    pub fn fei(&self) -> u32 {
        match self {
            PduError::Type(_) => 0,
            PduError::Field { offset, .. } => *offset,
            PduError::TooLong { .. } => 4,
            PduError::HeaderDigest { .. } | PduError::DataDigest { .. } => 0,
        }
    }
}

/// What the receiving end accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receiver {
    /// The controller receives host PDUs (ICReq, commands, H2CData,
    /// H2CTermReq); the host the others.
    pub controller: bool,
    /// Digests negotiated (none before the ICReq/ICResp exchange).
    pub digests: Digests,
    /// Most data one PDU may carry.
    pub max_data: u32,
}

/// The fixed header length of `kind`, or `None` if `r` never receives it.
fn header_len(kind: u8, controller: bool) -> Option<usize> {
    match (kind, controller) {
        (kind::IC_REQ, true) | (kind::IC_RESP, false) => Some(IC_LEN),
        (kind::H2C_TERM, true) | (kind::C2H_TERM, false) => Some(TERM_HLEN),
        (kind::COMMAND, true) => Some(COMMAND_HLEN),
        (kind::RESPONSE, false) => Some(RESPONSE_HLEN),
        (kind::H2C_DATA, true) | (kind::C2H_DATA, false) | (kind::R2T, false) => Some(DATA_HLEN),
        _ => None,
    }
}

/// Whether `kind` may carry data, and whether it must.
fn data_rule(kind: u8) -> (bool, bool) {
    match kind {
        kind::COMMAND => (true, false),
        kind::H2C_DATA | kind::C2H_DATA => (true, true),
        _ => (false, false),
    }
}

/// Little-endian fields of the wire formats (PDUs, entries, Connect data).
#[inline]
pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[inline]
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A PDU's layout, worked out from its common header alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The PDU type.
    pub kind: u8,
    /// The flags byte.
    pub flags: u8,
    /// Header length.
    pub hlen: usize,
    /// Where data starts (0: no data).
    pub pdo: usize,
    /// Length of the whole PDU.
    pub plen: usize,
    /// A header digest follows the header.
    pub hdgst: bool,
    /// A data digest follows the data.
    pub ddgst: bool,
}

impl Frame {
    /// Bytes of data.
    pub fn data_len(&self) -> usize {
        if self.pdo == 0 {
            0
        } else {
            self.plen - self.pdo - if self.ddgst { DIGEST_LEN } else { 0 }
        }
    }
}

/// Check the common header in `ch` against `r`: on success, the PDU's
/// layout (the caller then waits for `plen` bytes).
pub fn frame(ch: &[u8; CH_LEN], r: &Receiver) -> Result<Frame, PduError> {
    let (k, flags, hlen, pdo) = (ch[0], ch[1], ch[2] as usize, ch[3] as usize);
    let plen = u32_at(ch, 4) as u64;
    let field = |what, offset| PduError::Field {
        kind: k,
        what,
        offset,
    };
    let want = header_len(k, r.controller).ok_or(PduError::Type(k))?;
    if hlen != want {
        return Err(field("HLEN", 2));
    }
    let ic = matches!(k, kind::IC_REQ | kind::IC_RESP);
    let term = matches!(k, kind::H2C_TERM | kind::C2H_TERM);
    let known = match k {
        kind::H2C_DATA | kind::C2H_DATA => flag::HDGST | flag::DDGST | flag::LAST | flag::SUCCESS,
        _ => flag::HDGST | flag::DDGST,
    };
    if flags & !known != 0 {
        return Err(field("FLAGS", 1));
    }
    if ic || term {
        // No digests on these, whatever was negotiated.
        if flags != 0 {
            return Err(field("FLAGS", 1));
        }
        if pdo != 0 {
            return Err(field("PDO", 3));
        }
        let ok = if ic {
            plen == IC_LEN as u64
        } else {
            (TERM_HLEN as u64..=TERM_MAX as u64).contains(&plen)
        };
        if !ok {
            return Err(field("PLEN", 4));
        }
        return Ok(Frame {
            kind: k,
            flags,
            hlen,
            pdo: 0,
            plen: plen as usize,
            hdgst: false,
            ddgst: false,
        });
    }
    let hdgst = flags & flag::HDGST != 0;
    if hdgst != r.digests.header {
        return Err(field("HDGSTF", 1));
    }
    let (may, must) = data_rule(k);
    let header_end = hlen + r.digests.header_len();
    if pdo == 0 {
        if must {
            return Err(field("PDO", 3));
        }
        if flags & flag::DDGST != 0 {
            return Err(field("DDGSTF", 1));
        }
        if plen != header_end as u64 {
            return Err(field("PLEN", 4));
        }
        return Ok(Frame {
            kind: k,
            flags,
            hlen,
            pdo: 0,
            plen: plen as usize,
            hdgst,
            ddgst: false,
        });
    }
    if !may || pdo < header_end {
        return Err(field("PDO", 3));
    }
    let ddgst = flags & flag::DDGST != 0;
    if ddgst != r.digests.data {
        return Err(field("DDGSTF", 1));
    }
    let tail = if ddgst { DIGEST_LEN as u64 } else { 0 };
    // At least one byte of data: a PDU with data has some.
    if plen < pdo as u64 + 1 + tail {
        return Err(field("PLEN", 4));
    }
    let len = plen - pdo as u64 - tail;
    if len > r.max_data as u64 {
        return Err(PduError::TooLong {
            kind: k,
            len,
            max: r.max_data,
        });
    }
    Ok(Frame {
        kind: k,
        flags,
        hlen,
        pdo,
        plen: plen as usize,
        hdgst,
        ddgst,
    })
}

/// The CRC32C digest NVMe/TCP uses.
#[inline]
pub fn digest(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Parse the PDU at the start of `buf`: `Ok(None)` if more bytes are
/// needed, otherwise the PDU and the bytes it took.
pub fn parse<'a>(buf: &'a [u8], r: &Receiver) -> Result<Option<(Pdu<'a>, usize)>, PduError> {
    let Some(ch) = buf.first_chunk::<CH_LEN>() else {
        return Ok(None);
    };
    let f = frame(ch, r)?;
    let Some(pdu) = buf.get(..f.plen) else {
        return Ok(None);
    };
    parse_frame(pdu, &f).map(|p| Some((p, f.plen)))
}

/// Parse a whole PDU whose common header gave `f`.
pub fn parse_frame<'a>(pdu: &'a [u8], f: &Frame) -> Result<Pdu<'a>, PduError> {
    let k = f.kind;
    let h = &pdu[..f.hlen];
    if f.hdgst {
        let want = u32_at(pdu, f.hlen);
        if digest(h) != want {
            return Err(PduError::HeaderDigest { kind: k });
        }
    }
    let data = if f.pdo == 0 {
        &pdu[..0]
    } else {
        &pdu[f.pdo..f.pdo + f.data_len()]
    };
    let field = |what, offset| PduError::Field {
        kind: k,
        what,
        offset,
    };
    let cid = match k {
        kind::COMMAND => u16_at(h, CH_LEN + 2),
        kind::H2C_DATA | kind::C2H_DATA => u16_at(h, 8),
        _ => 0,
    };
    if f.ddgst {
        let want = u32_at(pdu, f.plen - DIGEST_LEN);
        if digest(data) != want {
            return Err(PduError::DataDigest {
                kind: k,
                cid,
                len: f.plen,
            });
        }
    }
    Ok(match k {
        kind::IC_REQ => Pdu::IcReq(IcReq {
            pfv: u16_at(h, 8),
            hpda: h[10],
            digests: Digests::from_byte(h[11]),
            maxr2t: u32_at(h, 12),
        }),
        kind::IC_RESP => Pdu::IcResp(IcResp {
            pfv: u16_at(h, 8),
            cpda: h[10],
            digests: Digests::from_byte(h[11]),
            maxh2cdata: u32_at(h, 12),
        }),
        kind::H2C_TERM | kind::C2H_TERM => Pdu::Term {
            from_host: k == kind::H2C_TERM,
            fes: u16_at(h, 8),
            fei: u32_at(h, 10),
            header: &pdu[TERM_HLEN..f.plen],
        },
        kind::COMMAND => {
            let mut sqe = [0u8; 64];
            sqe.copy_from_slice(&h[CH_LEN..COMMAND_HLEN]);
            Pdu::Command { sqe, data }
        }
        kind::RESPONSE => {
            let mut cqe = [0u8; 16];
            cqe.copy_from_slice(&h[CH_LEN..RESPONSE_HLEN]);
            Pdu::Response(cqe)
        }
        kind::H2C_DATA | kind::C2H_DATA => {
            let hdr = DataHeader {
                cccid: cid,
                ttag: u16_at(h, 10),
                offset: u32_at(h, 12),
                length: u32_at(h, 16),
                last: f.flags & flag::LAST != 0,
                success: f.flags & flag::SUCCESS != 0,
            };
            if hdr.length as usize != data.len() {
                return Err(field("DATAL", 16));
            }
            if k == kind::H2C_DATA && hdr.success {
                return Err(field("FLAGS", 1));
            }
            if hdr.success && !hdr.last {
                return Err(field("FLAGS", 1));
            }
            if k == kind::H2C_DATA {
                Pdu::H2cData(hdr, data)
            } else {
                Pdu::C2hData(hdr, data)
            }
        }
        kind::R2T => Pdu::R2t(R2t {
            cccid: u16_at(h, 8),
            ttag: u16_at(h, 10),
            offset: u32_at(h, 12),
            length: u32_at(h, 16),
        }),
        other => return Err(PduError::Type(other)),
    })
}

/// The header fields of an H2CData or C2HData PDU whose framing checked
/// out but whose data digest did not (the receiver still has to account
/// for the data it carried). `pdu` is at least the 24-byte header.
pub fn data_header(pdu: &[u8]) -> DataHeader {
    DataHeader {
        cccid: u16_at(pdu, 8),
        ttag: u16_at(pdu, 10),
        offset: u32_at(pdu, 12),
        length: u32_at(pdu, 16),
        last: pdu[1] & flag::LAST != 0,
        success: pdu[1] & flag::SUCCESS != 0,
    }
}

/// Start a PDU in `out`: the common header and the rest of a `hlen`-byte
/// header zeroed; returns where the PDU starts.
fn begin(out: &mut Vec<u8>, k: u8, flags: u8, hlen: usize, pdo: usize, plen: usize) -> usize {
    let at = out.len();
    out.extend_from_slice(&[k, flags, hlen as u8, pdo as u8]);
    out.extend_from_slice(&(plen as u32).to_le_bytes());
    out.resize(at + hlen, 0);
    at
}

/// Where data starts after a header of `hlen` with digests `d`, aligned
/// to the receiver's PDU data alignment `pda` ((pda + 1) * 4 bytes).
pub fn data_offset(hlen: usize, d: Digests, pda: u8) -> usize {
    let end = hlen + d.header_len();
    let align = (pda as usize + 1) * 4;
    end.div_ceil(align) * align
}

/// Close a PDU that started at `at` with a `hlen`-byte header: the header
/// digest, padding up to the data, the data and its digest.
fn finish(out: &mut Vec<u8>, at: usize, hlen: usize, d: Digests, pdo: usize, data: &[u8]) {
    if d.header {
        let h = digest(&out[at..at + hlen]);
        out.extend_from_slice(&h.to_le_bytes());
    }
    if !data.is_empty() {
        out.resize(at + pdo, 0);
        out.extend_from_slice(data);
        if d.data {
            out.extend_from_slice(&digest(data).to_le_bytes());
        }
    }
}

/// Flags and layout of a PDU of `hlen` carrying `data`.
fn layout(hlen: usize, d: Digests, pda: u8, data_len: usize) -> (u8, usize, usize) {
    let mut flags = if d.header { flag::HDGST } else { 0 };
    if data_len == 0 {
        return (flags, 0, hlen + d.header_len());
    }
    let pdo = data_offset(hlen, d, pda);
    let mut plen = pdo + data_len;
    if d.data {
        flags |= flag::DDGST;
        plen += DIGEST_LEN;
    }
    (flags, pdo, plen)
}

/// Append an ICReq.
pub fn encode_ic_req(q: &IcReq, out: &mut Vec<u8>) {
    let at = begin(out, kind::IC_REQ, 0, IC_LEN, 0, IC_LEN);
    out[at + 8..at + 10].copy_from_slice(&q.pfv.to_le_bytes());
    out[at + 10] = q.hpda;
    out[at + 11] = q.digests.byte();
    out[at + 12..at + 16].copy_from_slice(&q.maxr2t.to_le_bytes());
}

/// Append an ICResp.
pub fn encode_ic_resp(p: &IcResp, out: &mut Vec<u8>) {
    let at = begin(out, kind::IC_RESP, 0, IC_LEN, 0, IC_LEN);
    out[at + 8..at + 10].copy_from_slice(&p.pfv.to_le_bytes());
    out[at + 10] = p.cpda;
    out[at + 11] = p.digests.byte();
    out[at + 12..at + 16].copy_from_slice(&p.maxh2cdata.to_le_bytes());
}

/// Append a command capsule with `data` in the capsule (may be empty);
/// `pda` is the controller's data alignment (CPDA).
pub fn encode_command(sqe: &[u8; 64], data: &[u8], d: Digests, pda: u8, out: &mut Vec<u8>) {
    let (flags, pdo, plen) = layout(COMMAND_HLEN, d, pda, data.len());
    let at = begin(out, kind::COMMAND, flags, COMMAND_HLEN, pdo, plen);
    out[at + CH_LEN..at + COMMAND_HLEN].copy_from_slice(sqe);
    finish(out, at, COMMAND_HLEN, d, pdo, data);
}

/// Append a response capsule.
pub fn encode_response(cqe: &[u8; 16], d: Digests, out: &mut Vec<u8>) {
    let (flags, pdo, plen) = layout(RESPONSE_HLEN, d, 0, 0);
    let at = begin(out, kind::RESPONSE, flags, RESPONSE_HLEN, pdo, plen);
    out[at + CH_LEN..at + RESPONSE_HLEN].copy_from_slice(cqe);
    finish(out, at, RESPONSE_HLEN, d, pdo, &[]);
}

/// Append an H2CData (`to_controller`) or C2HData PDU carrying `data`
/// (which must not be empty); `pda` is the receiver's data alignment.
pub fn encode_data(
    to_controller: bool,
    hdr: &DataHeader,
    data: &[u8],
    d: Digests,
    pda: u8,
    out: &mut Vec<u8>,
) {
    encode_data_header(to_controller, hdr, data.len(), d, pda, out);
    out.extend_from_slice(data);
    encode_data_trailer(data, d, out);
}

/// The part of a data PDU before its `len` bytes of data (header, header
/// digest, padding), for a sender that writes the data from its own
/// buffer; [`encode_data_trailer`] follows the data.
pub fn encode_data_header(
    to_controller: bool,
    hdr: &DataHeader,
    len: usize,
    d: Digests,
    pda: u8,
    out: &mut Vec<u8>,
) {
    let (mut flags, pdo, plen) = layout(DATA_HLEN, d, pda, len);
    if hdr.last {
        flags |= flag::LAST;
    }
    if hdr.success {
        flags |= flag::SUCCESS;
    }
    let k = if to_controller {
        kind::H2C_DATA
    } else {
        kind::C2H_DATA
    };
    let at = begin(out, k, flags, DATA_HLEN, pdo, plen);
    out[at + 8..at + 10].copy_from_slice(&hdr.cccid.to_le_bytes());
    out[at + 10..at + 12].copy_from_slice(&hdr.ttag.to_le_bytes());
    out[at + 12..at + 16].copy_from_slice(&hdr.offset.to_le_bytes());
    out[at + 16..at + 20].copy_from_slice(&(len as u32).to_le_bytes());
    finish(out, at, DATA_HLEN, d, pdo, &[]);
    out.resize(at + pdo, 0);
}

/// What follows a data PDU's data: its digest, if negotiated.
pub fn encode_data_trailer(data: &[u8], d: Digests, out: &mut Vec<u8>) {
    if d.data {
        out.extend_from_slice(&digest(data).to_le_bytes());
    }
}

/// Append an R2T.
pub fn encode_r2t(r: &R2t, d: Digests, out: &mut Vec<u8>) {
    let (flags, pdo, plen) = layout(DATA_HLEN, d, 0, 0);
    let at = begin(out, kind::R2T, flags, DATA_HLEN, pdo, plen);
    out[at + 8..at + 10].copy_from_slice(&r.cccid.to_le_bytes());
    out[at + 10..at + 12].copy_from_slice(&r.ttag.to_le_bytes());
    out[at + 12..at + 16].copy_from_slice(&r.offset.to_le_bytes());
    out[at + 16..at + 20].copy_from_slice(&r.length.to_le_bytes());
    finish(out, at, DATA_HLEN, d, pdo, &[]);
}

/// Append a termination request about the PDU whose header starts
/// `offending` (as much of it as fits is sent back).
pub fn encode_term(from_host: bool, fes: u16, fei: u32, offending: &[u8], out: &mut Vec<u8>) {
    let echo = &offending[..offending.len().min(TERM_MAX - TERM_HLEN)];
    let k = if from_host {
        kind::H2C_TERM
    } else {
        kind::C2H_TERM
    };
    let at = begin(out, k, 0, TERM_HLEN, 0, TERM_HLEN + echo.len());
    out[at + 8..at + 10].copy_from_slice(&fes.to_le_bytes());
    out[at + 10..at + 14].copy_from_slice(&fei.to_le_bytes());
    out.extend_from_slice(echo);
}

#[cfg(test)]
mod tests;
