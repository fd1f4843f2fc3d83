//! A blocking NVMe/TCP host: one TCP connection per queue, commands
//! pipelined on it (send several, then receive their completions in
//! whatever order the controller finishes them). It is what the tests and
//! tools use to talk to the target; it trusts nothing the controller
//! sends either.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nvme::spec::{Cqe, Sqe, Status};

use crate::capsule::{self, admin, fctype, prop, Connect, ConnectData, Property};
use crate::pdu::{self, DataHeader, Digests, IcReq, Pdu, PduError, Receiver};

/// Why a host call failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The socket failed.
    #[error("nvme/tcp host: {0}")]
    Io(#[from] std::io::Error),
    /// The controller sent something the protocol does not allow.
    #[error("nvme/tcp host: {0}")]
    Protocol(String),
    /// The controller sent a malformed PDU.
    #[error("nvme/tcp host: {0}")]
    Pdu(#[from] PduError),
    /// The controller ended the connection with a termination request.
    #[error(
        "nvme/tcp host: the controller terminated the connection (FES {fes:#x}, FEI {fei:#x})"
    )]
    Terminated {
        /// Fatal error status.
        fes: u16,
        /// Fatal error information.
        fei: u32,
    },
    /// A command completed with an error status.
    #[error("nvme/tcp host: command {opcode:#04x} failed: {status}")]
    Status {
        /// The command's opcode.
        opcode: u8,
        /// Its status.
        status: Status,
        /// Result dword 0 (Connect: which parameter was invalid).
        result: u32,
    },
    /// No answer in time.
    #[error("nvme/tcp host: no answer in {0:?}")]
    Timeout(Duration),
}

/// How the host connects.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The host's NQN.
    pub hostnqn: String,
    /// The host identifier.
    pub host_id: [u8; 16],
    /// Digests to ask for.
    pub digests: Digests,
    /// Keep-alive timeout to ask for, in milliseconds (0: none).
    pub kato_ms: u32,
    /// How long any answer may take.
    pub timeout: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001".into(),
            host_id: [1; 16],
            digests: Digests::default(),
            kato_ms: 0,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A completed command.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The completion entry.
    pub cqe: Cqe,
    /// Data read (empty for commands without).
    pub data: Vec<u8>,
}

impl Reply {
    /// Its status.
    pub fn status(&self) -> Status {
        self.cqe.code()
    }
}

struct Pending {
    write: Vec<u8>,
    read: Vec<u8>,
    read_len: usize,
    received: usize,
}

/// One queue's connection.
pub struct Queue {
    stream: TcpStream,
    /// Received bytes; `..rx_at` are taken already.
    rx: Vec<u8>,
    rx_at: usize,
    /// Commands sent but not yet written to the socket.
    tx: Vec<u8>,
    digests: Digests,
    cpda: u8,
    maxh2cdata: u32,
    in_capsule: usize,
    qid: u16,
    next_cid: u16,
    pending: HashMap<u16, Pending>,
    timeout: Duration,
}

impl Queue {
    /// Open a TCP connection to `addr` and exchange ICReq/ICResp.
    pub fn open(addr: SocketAddr, cfg: &HostConfig) -> Result<Queue, HostError> {
        Queue::over(TcpStream::connect_timeout(&addr, cfg.timeout)?, cfg)
    }

    /// Exchange ICReq/ICResp over `stream`, a connection made by the
    /// caller (from a source address of its choice, say).
    pub fn over(stream: TcpStream, cfg: &HostConfig) -> Result<Queue, HostError> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(cfg.timeout))?;
        let mut q = Queue {
            stream,
            rx: Vec::with_capacity(1 << 16),
            rx_at: 0,
            tx: Vec::with_capacity(1 << 16),
            digests: Digests::default(),
            cpda: 0,
            maxh2cdata: 4096,
            in_capsule: 0,
            qid: 0,
            next_cid: 0,
            pending: HashMap::new(),
            timeout: cfg.timeout,
        };
        let mut b = Vec::new();
        pdu::encode_ic_req(
            &IcReq {
                pfv: 0,
                hpda: 0,
                digests: cfg.digests,
                maxr2t: 0,
            },
            &mut b,
        );
        q.stream.write_all(&b)?;
        let deadline = Instant::now() + cfg.timeout;
        let resp = q.next_pdu(Some(deadline), |p| match p {
            Pdu::IcResp(r) => Ok(r),
            other => Err(HostError::Protocol(format!(
                "expected ICResp, got {}",
                other.kind()
            ))),
        })?;
        match resp.ok_or(HostError::Timeout(cfg.timeout))? {
            r if r.pfv != 0 => Err(HostError::Protocol(format!("ICResp PFV {}", r.pfv))),
            r if r.maxh2cdata < 4096 || !r.maxh2cdata.is_multiple_of(4) => Err(
                HostError::Protocol(format!("ICResp MAXH2CDATA {}", r.maxh2cdata)),
            ),
            // The data offset is a byte: (CPDA + 1) * 4 must fit in it.
            r if r.cpda > 31 => Err(HostError::Protocol(format!("ICResp CPDA {}", r.cpda))),
            r if r.digests != cfg.digests => Err(HostError::Protocol(format!(
                "asked for digests {:?}, granted {:?}",
                cfg.digests, r.digests
            ))),
            r => {
                q.digests = r.digests;
                q.cpda = r.cpda;
                q.maxh2cdata = r.maxh2cdata;
                Ok(q)
            }
        }
    }

    /// The connection and what ICResp granted (digests, CPDA,
    /// MAXH2CDATA), for a caller that drives the queue itself.
    pub fn into_parts(self) -> (TcpStream, Digests, u8, u32) {
        (self.stream, self.digests, self.cpda, self.maxh2cdata)
    }

    /// Send Connect for queue `qid` of `subnqn`; returns the controller ID.
    pub fn connect(
        &mut self,
        qid: u16,
        sqsize: u16,
        cntlid: u16,
        subnqn: &str,
        cfg: &HostConfig,
    ) -> Result<u16, HostError> {
        let mut s = capsule::fabrics_sqe(fctype::CONNECT);
        Connect {
            recfmt: 0,
            qid,
            sqsize,
            cattr: 0,
            kato: if qid == 0 { cfg.kato_ms } else { 0 },
        }
        .to_sqe(&mut s);
        let data = ConnectData {
            host_id: cfg.host_id,
            cntlid,
            subnqn: subnqn.into(),
            hostnqn: cfg.hostnqn.clone(),
        }
        .encode();
        // Connect's data always rides in the capsule (8 KiB allowed on the
        // admin queue, and IO queues allow at least the 1 KiB).
        self.in_capsule = data.len();
        let r = self.exec(s, &data, 0)?;
        self.qid = qid;
        Ok(r.cqe.result as u16)
    }

    /// Data up to this many bytes goes in the capsule.
    pub fn set_in_capsule(&mut self, bytes: usize) {
        self.in_capsule = bytes;
    }

    /// Write the commands sent so far to the socket.
    pub fn flush(&mut self) -> Result<(), HostError> {
        if !self.tx.is_empty() {
            self.stream.write_all(&self.tx)?;
            self.tx.clear();
        }
        Ok(())
    }

    /// Send a command with `write` data (in the capsule if it fits, else
    /// when the controller asks with R2T) expecting `read_len` bytes back.
    /// Returns the command identifier it was given.
    pub fn send(&mut self, mut s: Sqe, write: &[u8], read_len: usize) -> Result<u16, HostError> {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        s.set_cid(cid);
        let len = write.len().max(read_len);
        let inline = !write.is_empty() && write.len() <= self.in_capsule;
        if len > 0 {
            capsule::set_data_pointer(&mut s, inline, len as u32);
        }
        // Written with the next flush (a receive flushes first), so a
        // batch of commands costs one system call.
        pdu::encode_command(
            &capsule::sqe_bytes(&s),
            if inline { write } else { &[] },
            self.digests,
            self.cpda,
            &mut self.tx,
        );
        self.pending.insert(
            cid,
            Pending {
                write: if inline { Vec::new() } else { write.to_vec() },
                read: vec![0u8; read_len],
                read_len,
                received: 0,
            },
        );
        Ok(cid)
    }

    /// Wait for the next command to complete (answering R2Ts meanwhile).
    pub fn recv(&mut self) -> Result<Reply, HostError> {
        self.reply(true)?.ok_or(HostError::Timeout(self.timeout))
    }

    /// The next completion if one is in what was received already
    /// (without reading the socket).
    pub fn try_recv(&mut self) -> Result<Option<Reply>, HostError> {
        self.reply(false)
    }

    fn reply(&mut self, block: bool) -> Result<Option<Reply>, HostError> {
        self.flush()?;
        // One time-out for the whole reply, however many PDUs bring it: a
        // target that sends its data a byte at a time, each just within
        // a time-out of its own, held one Identify for hours.
        let deadline = block.then(|| Instant::now() + self.timeout);
        loop {
            let Some(step) = self.next_pdu(deadline, |p| Ok(Step::from(p)))? else {
                return Ok(None);
            };
            match step {
                Step::Response(cqe) => {
                    let Some(p) = self.pending.remove(&cqe.cid()) else {
                        return Err(HostError::Protocol(format!(
                            "a response for command {} that is not outstanding",
                            cqe.cid()
                        )));
                    };
                    if cqe.code().ok() && p.received != p.read_len {
                        return Err(HostError::Protocol(format!(
                            "command {} succeeded with {} of {} bytes read",
                            cqe.cid(),
                            p.received,
                            p.read_len
                        )));
                    }
                    return Ok(Some(Reply { cqe, data: p.read }));
                }
                Step::Data(h, data) => {
                    let Some(p) = self.pending.get_mut(&h.cccid) else {
                        return Err(HostError::Protocol(format!(
                            "data for command {} that is not outstanding",
                            h.cccid
                        )));
                    };
                    let at = h.offset as usize;
                    // In order, as the channel wants it: data repeated over
                    // what came already would be counted twice, and the
                    // command would pass as complete with a hole in it.
                    if at != p.received {
                        return Err(HostError::Protocol(format!(
                            "C2HData at {at} for command {}, {} bytes expected there",
                            h.cccid, p.received
                        )));
                    }
                    let Some(dst) = p.read.get_mut(at..at.saturating_add(data.len())) else {
                        return Err(HostError::Protocol(format!(
                            "C2HData at {at}+{} beyond the {} bytes asked",
                            data.len(),
                            p.read_len
                        )));
                    };
                    dst.copy_from_slice(&data);
                    p.received += data.len();
                    if h.success {
                        let p = self
                            .pending
                            .remove(&h.cccid)
                            .unwrap_or_else(|| unreachable!());
                        if p.received != p.read_len {
                            return Err(HostError::Protocol(format!(
                                "command {} succeeded with {} of {} bytes read",
                                h.cccid, p.received, p.read_len
                            )));
                        }
                        let cqe = capsule::completion(h.cccid, self.qid, 0, 0, Status::SUCCESS);
                        return Ok(Some(Reply { cqe, data: p.read }));
                    }
                }
                Step::R2t(r) => self.answer_r2t(r)?,
                Step::Term(fes, fei) => return Err(HostError::Terminated { fes, fei }),
            }
        }
    }

    fn answer_r2t(&mut self, r: pdu::R2t) -> Result<(), HostError> {
        let Some(p) = self.pending.get(&r.cccid) else {
            return Err(HostError::Protocol(format!(
                "R2T for command {} that is not outstanding",
                r.cccid
            )));
        };
        let (at, len) = (r.offset as usize, r.length as usize);
        if at + len > p.write.len() || len == 0 {
            return Err(HostError::Protocol(format!(
                "R2T for {at}+{len} of a {}-byte write",
                p.write.len()
            )));
        }
        let mut b = Vec::with_capacity(len + 64);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(self.maxh2cdata as usize);
            let h = DataHeader {
                cccid: r.cccid,
                ttag: r.ttag,
                offset: (at + done) as u32,
                length: n as u32,
                last: done + n == len,
                success: false,
            };
            pdu::encode_data(
                true,
                &h,
                &p.write[at + done..at + done + n],
                self.digests,
                self.cpda,
                &mut b,
            );
            done += n;
        }
        self.flush()?;
        self.stream.write_all(&b)?;
        Ok(())
    }

    /// Send a command and wait for it; an error status is an error.
    pub fn exec(&mut self, s: Sqe, write: &[u8], read_len: usize) -> Result<Reply, HostError> {
        let opcode = s.opcode();
        self.send(s, write, read_len)?;
        let r = self.recv()?;
        let status = r.status();
        if !status.ok() {
            return Err(HostError::Status {
                opcode,
                status,
                result: r.cqe.result,
            });
        }
        Ok(r)
    }

    /// Read until one whole PDU is buffered, until `deadline` (or,
    /// without one, take only what is buffered already), give it to `f`,
    /// drop it.
    fn next_pdu<T>(
        &mut self,
        deadline: Option<Instant>,
        f: impl FnOnce(Pdu<'_>) -> Result<T, HostError>,
    ) -> Result<Option<T>, HostError> {
        let r = Receiver {
            controller: false,
            digests: self.digests,
            max_data: 1 << 24,
        };
        loop {
            if let Some((p, n)) = pdu::parse(&self.rx[self.rx_at..], &r)? {
                let out = f(p);
                self.rx_at += n;
                if self.rx_at == self.rx.len() {
                    self.rx.clear();
                    self.rx_at = 0;
                }
                return out.map(Some);
            }
            let Some(deadline) = deadline else {
                return Ok(None);
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(HostError::Timeout(self.timeout));
            }
            // A read waits at most what is left (with the socket's own
            // time-out of the whole, an exchange took up to twice it).
            let _ = self
                .stream
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))));
            // Keep only the incomplete PDU before reading more.
            self.rx.drain(..self.rx_at);
            self.rx_at = 0;
            let len = self.rx.len();
            self.rx.resize(len + 65536, 0);
            let got = self.stream.read(&mut self.rx[len..]);
            self.rx.truncate(len + *got.as_ref().unwrap_or(&0));
            match got {
                Ok(0) => {
                    return Err(HostError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the controller closed the connection",
                    )))
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(HostError::Timeout(self.timeout))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

enum Step {
    Response(Cqe),
    Data(DataHeader, Vec<u8>),
    R2t(pdu::R2t),
    Term(u16, u32),
}

impl From<Pdu<'_>> for Step {
    fn from(p: Pdu<'_>) -> Step {
        match p {
            Pdu::Response(c) => Step::Response(capsule::cqe_from(&c)),
            Pdu::C2hData(h, d) => Step::Data(h, d.to_vec()),
            Pdu::R2t(r) => Step::R2t(r),
            Pdu::Term { fes, fei, .. } => Step::Term(fes, fei),
            // The parser gives the host nothing else.
            _ => Step::Term(0, 0),
        }
    }
}

/// A controller: its admin queue, enabled.
pub struct Controller {
    /// The admin queue.
    pub admin: Queue,
    /// The controller ID the subsystem gave.
    pub cntlid: u16,
    /// Identify Controller's data.
    pub id: Vec<u8>,
    addr: SocketAddr,
    subnqn: String,
    cfg: HostConfig,
    io_in_capsule: usize,
}

impl Controller {
    /// Connect the admin queue of `subnqn` at `addr` and enable the
    /// controller (CC.EN, then wait for CSTS.RDY).
    pub fn connect(
        addr: SocketAddr,
        subnqn: &str,
        cfg: &HostConfig,
    ) -> Result<Controller, HostError> {
        let mut admin = Queue::open(addr, cfg)?;
        let cntlid = admin.connect(0, 31, 0xffff, subnqn, cfg)?;
        admin.set_in_capsule(8192);
        let mut c = Controller {
            admin,
            cntlid,
            id: Vec::new(),
            addr,
            subnqn: subnqn.into(),
            cfg: cfg.clone(),
            io_in_capsule: 0,
        };
        let cap = c.property_get(prop::CAP, true)?;
        let to = Duration::from_millis(((cap >> 24) & 0xff) * 500).max(Duration::from_secs(1));
        // IOSQES 6, IOCQES 4, EN.
        c.property_set(prop::CC, (6 << 16) | (4 << 20) | 1)?;
        let deadline = Instant::now() + to;
        while c.property_get(prop::CSTS, false)? & 1 == 0 {
            if Instant::now() >= deadline {
                return Err(HostError::Timeout(to));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        c.id = c.identify(1, 0)?;
        // IOCCSZ: 16-byte units of an IO queue's capsule, the SQE included.
        let ioccsz = u32::from_le_bytes([c.id[1792], c.id[1793], c.id[1794], c.id[1795]]);
        c.io_in_capsule = (ioccsz as usize * 16).saturating_sub(64);
        Ok(c)
    }

    /// Read a property.
    pub fn property_get(&mut self, offset: u32, wide: bool) -> Result<u64, HostError> {
        let mut s = capsule::fabrics_sqe(fctype::PROPERTY_GET);
        Property {
            wide,
            offset,
            value: 0,
        }
        .to_sqe(&mut s);
        let r = self.admin.exec(s, &[], 0)?;
        Ok(r.cqe.result as u64 | (r.cqe.rsvd as u64) << 32)
    }

    /// Write a 4-byte property.
    pub fn property_set(&mut self, offset: u32, value: u32) -> Result<(), HostError> {
        let mut s = capsule::fabrics_sqe(fctype::PROPERTY_SET);
        Property {
            wide: false,
            offset,
            value: value as u64,
        }
        .to_sqe(&mut s);
        self.admin.exec(s, &[], 0).map(|_| ())
    }

    /// Identify with `cns` for namespace `nsid`: 4096 bytes.
    pub fn identify(&mut self, cns: u8, nsid: u32) -> Result<Vec<u8>, HostError> {
        let mut s = Sqe::new(admin::IDENTIFY, nsid);
        s.cdw[0] = cns as u32;
        Ok(self.admin.exec(s, &[], 4096)?.data)
    }

    /// Get Log Page `lid`: `len` bytes from byte `offset`.
    pub fn log_page(&mut self, lid: u8, len: usize, offset: u64) -> Result<Vec<u8>, HostError> {
        let mut s = Sqe::new(admin::GET_LOG_PAGE, 0xffff_ffff);
        let numd = (len / 4).saturating_sub(1) as u32;
        s.cdw[0] = lid as u32 | (numd & 0xffff) << 16;
        s.cdw[1] = numd >> 16;
        s.cdw[2] = offset as u32;
        s.cdw[3] = (offset >> 32) as u32;
        Ok(self.admin.exec(s, &[], len)?.data)
    }

    /// Set Features `fid` to `value`: the result dword.
    pub fn set_features(&mut self, fid: u8, value: u32) -> Result<u32, HostError> {
        let mut s = Sqe::new(admin::SET_FEATURES, 0);
        s.cdw[0] = fid as u32;
        s.cdw[1] = value;
        Ok(self.admin.exec(s, &[], 0)?.cqe.result)
    }

    /// Send Keep Alive.
    pub fn keep_alive(&mut self) -> Result<(), HostError> {
        self.admin
            .exec(Sqe::new(admin::KEEP_ALIVE, 0), &[], 0)
            .map(|_| ())
    }

    /// Open IO queue `qid` with `entries` entries on its own connection.
    pub fn io_queue(&self, qid: u16, entries: u16) -> Result<Queue, HostError> {
        self.io_queue_over(
            TcpStream::connect_timeout(&self.addr, self.cfg.timeout)?,
            qid,
            entries,
        )
    }

    /// IO queue `qid` over `stream`, a connection to the controller's
    /// address made by the caller.
    pub fn io_queue_over(
        &self,
        stream: TcpStream,
        qid: u16,
        entries: u16,
    ) -> Result<Queue, HostError> {
        let mut q = Queue::over(stream, &self.cfg)?;
        q.connect(
            qid,
            entries.saturating_sub(1).max(1),
            self.cntlid,
            &self.subnqn,
            &self.cfg,
        )?;
        q.set_in_capsule(self.io_in_capsule);
        Ok(q)
    }
}
