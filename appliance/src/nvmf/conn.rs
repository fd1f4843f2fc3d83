//! One NVMe/TCP connection (one queue), owned by the reactor it was given
//! to: non-blocking socket reads and writes, PDUs, the queue's commands
//! and the volume IO they start, all on that core.
//!
//! Order on a connection: ICReq, then Connect (which binds it to a
//! controller's admin queue or to one of its IO queues), then commands.
//! Anything the peer gets wrong in the framing ends this connection with
//! a termination request; a wrong command gets an error status. Nothing
//! a peer sends reaches another connection.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::Read;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{Completion, DeviceInfo, IoChannel, IoOp};
use nvme::spec::{Sqe, Status};
use nvmf::capsule::{self, admin as opc, fctype, status, Connect, ConnectData};
use nvmf::pdu::{self, fes, DataHeader, Digests, IcResp, Pdu, PduError, Receiver};
use poller::{Ctx, FdWake, LocalGate, PollState};

use super::admin::{self, Answer};
use super::controller::Controller;
use super::identify::{self, ADMIN_IN_CAPSULE, AER_LIMIT, IN_CAPSULE, MAX_QUEUE_ENTRIES};
use super::io::Plan;
use super::output::Output;
use super::{Port, Subsystem, TargetShared};
use crate::qos::QueueQos;
use crate::volume::VolumeConfig;

mod io_queue;

/// Most data the target takes in one H2CData PDU.
pub const MAXH2CDATA: u32 = identify::MAX_TRANSFER;
/// Bytes read from the socket per poll at most (fairness between
/// connections on one reactor).
const READ_BUDGET: usize = 1 << 20;
/// Receive buffer: room for the largest PDU with plenty to spare.
const RX_SIZE: usize = 1 << 18;
/// A new connection's receive buffer.
const RX_START: usize = 16 << 10;
/// How long a discovery controller without a keep-alive may sit idle:
/// `nvme discover` asks and leaves within a second, `connect-all` keeps
/// it while it connects to the subsystems it found, and a persistent one
/// sets a keep-alive (ours takes no event requests).
const DISCOVERY_IDLE: Duration = Duration::from_secs(30);
/// How often an admin queue looks at keep-alive and namespace changes.
const TICK: Duration = Duration::from_millis(100);
/// How long a new connection may take to send ICReq and Connect.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// How often an IO queue looks whether its controller is still alive
/// (the admin queue, perhaps on another reactor, ends it).
const IO_LIVENESS: Duration = Duration::from_millis(500);
/// How long a closing connection waits for its peer to take what is
/// left to send.
const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// How long a host may leave a write's data unsent after the target asked
/// for it (R2T) before its connection is closed: a write waiting for its
/// data lets in-capsule writes past the data budget (their data may come
/// behind them), so one left unanswered for good held that open for good
/// (review). A Linux host has given the command up by then (its IO
/// time-out is 30 s).
const R2T_WAIT: Duration = Duration::from_secs(30);

/// Admit the connection on this reactor.
pub(super) fn start(
    ctx: &mut Ctx,
    sock: TcpStream,
    port: Arc<Port>,
    shared: Arc<TargetShared>,
    peer: Option<crate::peers::PeerSlot>,
    live: super::LiveSlot,
) {
    let fd = sock.as_raw_fd();
    ctx.watch_fd(fd);
    let account = shared.memory.account(sock.peer_addr().ok().map(|a| a.ip()));
    let mut c = Conn {
        sock,
        fd,
        out_blocked: false,
        watching: FdWake::Input,
        data_held: false,
        awaiting_data: 0,
        linger_armed: false,
        port,
        shared,
        // Grown to RX_SIZE only when a PDU needs it: an idle or
        // handshaking connection holds little.
        rx: vec![0u8; RX_START],
        rx_held: false,
        rx_len: 0,
        out: Output::default(),
        phase: Phase::Init,
        digests: Digests::default(),
        hpda: 0,
        entries: 32,
        sqhd: 0,
        slots: Vec::new(),
        running: 0,
        free: Vec::new(),
        waiting: VecDeque::new(),
        deferred: VecDeque::new(),
        committed: 0,
        account,
        submitting: VecDeque::new(),
        io: None,
        comps: Vec::new(),
        aers: Vec::new(),
        closing: None,
        tick: None,
        last_tick: ctx.now(),
        opened: ctx.now(),
        ns_blocks: 0,
        counted: None,
        _peer: peer,
        _live: live,
    };
    // Wake the reactor once the handshake time is up, even if it idles
    // (a connection that sends nothing makes no other event).
    ctx.after(HANDSHAKE + TICK, |_| {});
    ctx.add_poller(move |ctx| c.poll(ctx));
}

enum Phase {
    /// Waiting for ICReq.
    Init,
    /// Waiting for Connect.
    Connecting,
    /// A controller's admin queue.
    Admin(Arc<Controller>),
    /// One of a controller's IO queues.
    Io {
        ctrl: Arc<Controller>,
        sub: Arc<Subsystem>,
        qid: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Waiting for room in the connection's data budget.
    Deferred,
    /// A write waiting for its H2CData.
    AwaitData,
    /// Waiting for the volume's gate.
    Ready,
    /// Admitted: device requests being submitted or in flight.
    Running,
}

struct Slot {
    cid: u16,
    plan: Plan,
    buf: Vec<u8>,
    received: usize,
    state: SlotState,
    /// Device requests in flight.
    pending: u32,
    /// Device requests not yet submitted: (op, offset, blocks).
    todo: VecDeque<(IoOp, u64, u64)>,
    status: Status,
    /// A data digest failed: the command fails once its data is in.
    corrupt: bool,
    /// The FUA flush was queued.
    flushed: bool,
    /// Bytes of data buffer it holds against the connection's budget.
    held: usize,
    /// When its data was asked for (R2T).
    asked: Instant,
}

/// The volume as an IO queue sees it.
struct IoPath {
    /// The volume's IO limits, this queue's buckets.
    qos: Option<QueueQos>,
    /// A timer is due then to look at a throttled command again.
    qos_timer: Option<Instant>,
    gate: LocalGate<VolumeConfig>,
    gen: u64,
    ch: Box<dyn IoChannel>,
    info: DeviceInfo,
    read_only: bool,
    /// The new generation's channel had no room: asked again then.
    retry_at: Option<Instant>,
    /// The generation whose wait for room was logged.
    retry_said: Option<u64>,
}

struct Conn {
    /// Its place in its host's share of the listener (given back when the
    /// connection is dropped).
    _peer: Option<crate::peers::PeerSlot>,
    /// Counts it against the listener's limit while it lives.
    _live: super::LiveSlot,
    sock: TcpStream,
    fd: RawFd,
    /// The last send stopped with output left that the socket had no room
    /// for.
    out_blocked: bool,
    /// What of the socket wakes the reactor's sleep (see `poll`).
    watching: FdWake,
    /// The last pass over `rx` stopped at a command whose in-capsule data
    /// the data budget had no room for.
    data_held: bool,
    /// Writes whose data the host was asked for (R2T) and has not all
    /// sent.
    awaiting_data: usize,
    /// A timer wakes the reactor at the end of the closing linger.
    linger_armed: bool,
    port: Arc<Port>,
    shared: Arc<TargetShared>,
    /// Whole PDUs may be waiting in `rx`: the last pass stopped at a full
    /// output, not at the end of what was received.
    rx_held: bool,
    /// Received bytes (`..rx_len`) not yet taken as PDUs.
    rx: Vec<u8>,
    rx_len: usize,
    /// What is waiting for the socket.
    out: Output,
    phase: Phase,
    digests: Digests,
    hpda: u8,
    /// Queue entries (Connect's SQSIZE + 1).
    entries: u32,
    sqhd: u32,
    slots: Vec<Slot>,
    /// Slots in `Running` (admitted through the gate, not yet answered):
    /// kept as a count so the poll loop does not scan every slot.
    running: usize,
    free: Vec<u16>,
    /// Commands with their data, waiting for the gate, in arrival order.
    waiting: VecDeque<u16>,
    /// Commands waiting for room in the data budget before their buffer
    /// is made (and, for a write, its R2T sent), in arrival order.
    deferred: VecDeque<u16>,
    /// Bytes of data buffers that commands in progress hold (at most
    /// 4 MiB, or one command's; see `memory::Account::may_hold`).
    committed: usize,
    /// What it told the target it holds (given back when dropped).
    account: super::memory::Account,
    /// Admitted commands with device requests left to submit.
    submitting: VecDeque<u16>,
    io: Option<IoPath>,
    comps: Vec<Completion>,
    /// Asynchronous Event Requests held (admin queue).
    aers: Vec<u16>,
    /// Closing since: no more input; gone once nothing is in flight and
    /// the output is sent (or the linger is over).
    closing: Option<Instant>,
    /// Keeps the admin queue's timer running while the connection lives.
    tick: Option<Rc<Cell<bool>>>,
    last_tick: Instant,
    /// When the connection was accepted.
    opened: Instant,
    /// Namespace size the admin queue last saw (for change events).
    ns_blocks: u64,
    /// The subsystem whose connection count this connection holds.
    counted: Option<Arc<Subsystem>>,
}

/// The header of the one C2HData PDU that carries all of a command's
/// `len` bytes (a response capsule follows: SQ flow control is on).
fn whole_read(cid: u16, len: usize) -> DataHeader {
    DataHeader {
        cccid: cid,
        ttag: 0,
        offset: 0,
        length: len as u32,
        last: true,
        success: false,
    }
}

impl Conn {
    fn poll(&mut self, ctx: &mut Ctx) -> PollState {
        let now = ctx.now();
        self.out.set_spare_limit(self.shared.spare_share());
        let mut work = self.reap();
        self.check_liveness(now);
        if self.closing.is_none() && self.output_room() {
            work |= self.receive(ctx);
        }
        // A closing connection admits nothing new: a write its host has
        // given up on must not land after the host sent it again elsewhere.
        if self.closing.is_none() {
            // A read gives its budget back once its data is queued for
            // sending, not once sent: started while the host reads
            // nothing, deferred reads would fill the output without end.
            if self.output_room() {
                work |= self.start_deferred();
            }
            work |= self.start_waiting(ctx);
        }
        work |= self.submit();
        self.refresh_generation(ctx);
        work |= self.send();
        // What it holds now, for the target's count (a connection gone
        // idle after a burst kept counting its last figure).
        self.report_held();
        if let Some(since) = self.closing {
            let lingered = now.saturating_duration_since(since);
            let drained = self.tx_pending() == 0 || lingered > CLOSE_LINGER;
            if self.inflight() == 0 && drained {
                self.finish(ctx);
                return PollState::Done;
            }
            // Only output the peer takes no more of is left: sleep until
            // the socket has room or the linger ends, as an open one does
            // (a closing peer that read nothing kept a core busy for the
            // whole linger, and one such connection every 5 s for good:
            // audit).
            let waits = self.out_blocked && !work && self.inflight() == 0;
            if !self.linger_armed {
                // Whatever the socket does: one already waiting for room
                // when it began to close (a handshake that ran out, with
                // nothing else to wake its reactor) slept for good
                // (review).
                ctx.after(CLOSE_LINGER.saturating_sub(lingered) + TICK, |_| {});
                self.linger_armed = true;
            }
            self.watch(ctx, if waits { FdWake::Room } else { FdWake::Input });
            return if waits {
                PollState::Idle
            } else {
                PollState::Busy
            };
        }
        // Output the host has no room for, and nothing else to do: the
        // reactor may sleep until the socket takes more, rather than try
        // again on every loop (a host that stopped reading kept a core
        // busy for as long as it stayed connected: audit). Input waits
        // meanwhile: it is read once there is room to answer it (a host
        // sending on while it reads nothing must not wake every sleep).
        let waits = self.out_blocked && !work && self.inflight() == 0;
        // Likewise input left unread for room in the data budget: what
        // holds the budget is let go by a timer (the volume's limits) or
        // a resume, which wake the reactor; unread input would end every
        // sleep at once.
        let held = self.data_held && !work && self.inflight() == 0;
        let wake = if waits {
            FdWake::Room
        } else if held {
            FdWake::Neither
        } else {
            FdWake::Input
        };
        self.watch(ctx, wake);
        if work || self.inflight() > 0 || (self.tx_pending() > 0 && !waits) {
            PollState::Busy
        } else {
            PollState::Idle
        }
    }

    /// Make `wake` what of the socket wakes the reactor's sleep.
    fn watch(&mut self, ctx: &mut Ctx, wake: FdWake) {
        if wake != self.watching {
            ctx.watch_as(self.fd, wake);
            self.watching = wake;
        }
    }

    fn inflight(&self) -> usize {
        self.running + self.io.as_ref().map_or(0, |io| io.ch.inflight())
    }

    fn tx_pending(&self) -> usize {
        self.out.pending()
    }

    /// Tell the target what it holds of each kind now.
    fn report_held(&mut self) {
        self.account.report(super::Held::Output, self.tx_pending());
        self.account.report(super::Held::Data, self.committed);
    }

    /// Whether the output may take more answers.
    fn output_room(&mut self) -> bool {
        let own = self.tx_pending();
        self.account.may_hold(super::Held::Output, own, 1)
    }

    fn close(&mut self, why: &str) {
        if self.closing.is_none() {
            tracing::debug!(why, "nvme/tcp: connection closing");
            self.closing = Some(Instant::now());
        }
    }

    /// End the connection with a termination request.
    fn fatal(&mut self, fes: u16, fei: u32, header: &[u8]) {
        tracing::info!(
            fes,
            fei,
            "nvme/tcp: terminating a connection on a protocol error"
        );
        pdu::encode_term(false, fes, fei, header, self.out.bytes());
        self.close("protocol error");
    }

    fn finish(&mut self, ctx: &mut Ctx) {
        ctx.unwatch_fd(self.fd);
        if let Some(t) = &self.tick {
            t.set(false);
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        match &self.phase {
            Phase::Admin(c) => {
                c.kill();
                if let Some(sub) = &c.subsystem {
                    sub.controllers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&c.cntlid);
                }
                // Held events have nobody to go to.
                self.aers.clear();
            }
            Phase::Io { ctrl, qid, .. } => {
                ctrl.state().connected.remove(qid);
            }
            _ => {}
        }
        self.uncount();
    }

    /// The association, the export and the volume are still there; the
    /// admin queue also enforces the keep-alive timeout and reports a
    /// namespace change to a held Asynchronous Event Request.
    fn check_liveness(&mut self, now: Instant) {
        if self.closing.is_some() {
            return;
        }
        if matches!(self.phase, Phase::Init | Phase::Connecting)
            && now.saturating_duration_since(self.opened) > HANDSHAKE
        {
            return self.close("no ICReq and Connect in time");
        }
        match &self.phase {
            Phase::Io { ctrl, sub, .. } => {
                if ctrl.is_dead() || sub.is_removed() {
                    self.close("controller or export gone");
                } else if self.io.as_ref().is_some_and(|io| io.gate.is_removed()) {
                    self.close("volume removed");
                } else if self.awaiting_data > 0
                    && now.saturating_duration_since(self.last_tick) >= TICK
                {
                    self.last_tick = now;
                    let unanswered = self.slots.iter().any(|s| {
                        s.state == SlotState::AwaitData
                            && now.saturating_duration_since(s.asked) > R2T_WAIT
                    });
                    if unanswered {
                        tracing::warn!("nvme/tcp: a write's data was asked for and not sent within {R2T_WAIT:?}; the connection is closed");
                        self.close("write data not sent");
                    }
                }
            }
            Phase::Admin(c) => {
                if c.is_dead() || c.subsystem.as_ref().is_some_and(|s| s.is_removed()) {
                    self.close("controller or export gone");
                    return;
                }
                if now.saturating_duration_since(self.last_tick) < TICK {
                    return;
                }
                self.last_tick = now;
                let c = c.clone();
                let expired = {
                    let st = c.state();
                    let limit = if st.kato_ms > 0 {
                        Some(Duration::from_millis(st.kato_ms as u64))
                    } else if c.is_discovery() {
                        // Open to every host, without a keep-alive: idle
                        // ones would hold the port's connections for good.
                        Some(DISCOVERY_IDLE)
                    } else {
                        None
                    };
                    limit.is_some_and(|l| now.saturating_duration_since(st.last_keep_alive) > l)
                };
                if expired {
                    tracing::warn!(cntlid = c.cntlid, host = %c.hostnqn, "nvme/tcp: keep-alive timeout expired; the controller is torn down");
                    c.kill();
                    self.close("keep-alive timeout");
                    return;
                }
                self.namespace_events(&c);
            }
            _ => {}
        }
    }

    fn namespace_events(&mut self, c: &Controller) {
        let Some(sub) = &c.subsystem else {
            return;
        };
        let blocks = sub.volume.info().num_blocks;
        let mut st = c.state();
        if blocks != self.ns_blocks {
            self.ns_blocks = blocks;
            st.ns_changed = true;
            if st.aec & super::controller::AEC_NS_ATTR != 0 && !st.ns_masked {
                st.ns_event = true;
            }
        }
        if st.ns_event {
            if let Some(cid) = self.aers.pop() {
                st.ns_event = false;
                st.ns_masked = true;
                drop(st);
                // Notice, namespace attribute changed, log page 0x04.
                self.respond(cid, Status::SUCCESS, 0x0004_0002);
            }
        }
    }

    /// Read what the socket has and act on every whole PDU, while the
    /// output has room: commands left unread wait for the host to read
    /// its answers (and its socket then fills: TCP's own flow control).
    fn receive(&mut self, ctx: &mut Ctx) -> bool {
        let mut got = 0;
        let mut work = false;
        // PDUs a full output left in the buffer come first (a partial one
        // alone is left for the next read).
        if self.rx_held {
            let before = self.rx_len;
            self.handle_pdus(ctx);
            work = self.rx_len != before;
        }
        while got < READ_BUDGET && self.closing.is_none() && !self.data_held && self.output_room() {
            if self.rx_len == self.rx.len() {
                if self.rx.len() >= RX_SIZE {
                    break;
                }
                self.rx.resize(RX_SIZE, 0);
            }
            let r = self.sock.read(&mut self.rx[self.rx_len..]);
            match r {
                Ok(0) => {
                    self.close("the host closed the connection");
                    break;
                }
                Ok(n) => {
                    self.rx_len += n;
                    got += n;
                    work = true;
                    self.handle_pdus(ctx);
                }
                Err(e) => match e.kind() {
                    std::io::ErrorKind::WouldBlock => break,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.close("socket error");
                        break;
                    }
                },
            }
        }
        work
    }

    fn receiver(&self) -> Receiver {
        let max_data = match self.phase {
            Phase::Io { .. } => IN_CAPSULE.max(MAXH2CDATA),
            _ => ADMIN_IN_CAPSULE,
        };
        Receiver {
            controller: true,
            digests: self.digests,
            max_data,
        }
    }

    fn handle_pdus(&mut self, ctx: &mut Ctx) {
        let rx = std::mem::take(&mut self.rx);
        let end = self.rx_len;
        let mut at = 0;
        self.data_held = false;
        // One answer can be a 256 KiB log page: the output stays within
        // its room and one answer, however many commands the input holds.
        while self.closing.is_none() && self.output_room() {
            let r = self.receiver();
            match pdu::parse(&rx[at..end], &r) {
                Ok(None) => break,
                Ok(Some((p, n))) => {
                    if let Pdu::Command { data, .. } = &p {
                        if !self.may_take_in_capsule(data.len()) {
                            self.data_held = true;
                            break;
                        }
                    }
                    self.handle(ctx, p, &rx[at..at + pdu::CH_LEN]);
                    at += n;
                }
                Err(PduError::DataDigest { kind, cid, len }) => {
                    if kind == pdu::kind::H2C_DATA {
                        let h = pdu::data_header(&rx[at..at + len]);
                        self.h2c_data(h, &[], true, &rx[at..at + pdu::CH_LEN]);
                    } else {
                        self.sqhd = (self.sqhd + 1) % self.entries;
                        self.respond(cid, status::TRANSPORT, 0);
                    }
                    at += len;
                }
                Err(e) => {
                    let stop = (at + 128).min(end);
                    self.fatal(e.fes(), e.fei(), &rx[at..stop]);
                    break;
                }
            }
        }
        self.rx_held = at < end && (self.data_held || !self.output_room());
        let mut rx = rx;
        // What is left is the start of the next PDU (the limits keep a
        // whole one inside the buffer).
        if at > 0 {
            rx.copy_within(at..end, 0);
        }
        self.rx_len = end - at;
        self.rx = rx;
    }

    fn handle(&mut self, ctx: &mut Ctx, p: Pdu<'_>, header: &[u8]) {
        match (&self.phase, p) {
            (Phase::Init, Pdu::IcReq(q)) => {
                if q.pfv != 0 {
                    return self.fatal(fes::UNSUPPORTED, 8, header);
                }
                if q.hpda > 31 {
                    return self.fatal(fes::INVALID_HEADER, 10, header);
                }
                self.hpda = q.hpda;
                pdu::encode_ic_resp(
                    &IcResp {
                        pfv: 0,
                        cpda: 0,
                        digests: q.digests,
                        maxh2cdata: MAXH2CDATA,
                    },
                    self.out.bytes(),
                );
                // Digests apply from the next PDU on.
                self.digests = q.digests;
                self.phase = Phase::Connecting;
            }
            (_, Pdu::Term { fes, fei, .. }) => {
                tracing::info!(fes, fei, "nvme/tcp: the host terminated the connection");
                self.close("host termination request");
            }
            (Phase::Init, _) | (_, Pdu::IcReq(_)) => self.fatal(fes::SEQUENCE, 0, header),
            (_, Pdu::Command { sqe, data }) => {
                let s = capsule::sqe_from(&sqe);
                self.sqhd = (self.sqhd + 1) % self.entries;
                self.command(ctx, &s, data);
            }
            (Phase::Io { .. }, Pdu::H2cData(h, data)) => self.h2c_data(h, data, false, header),
            (_, Pdu::H2cData(..)) => self.fatal(fes::SEQUENCE, 0, header),
            // The parser gives a controller nothing else.
            _ => self.fatal(fes::INVALID_HEADER, 0, header),
        }
    }

    fn command(&mut self, ctx: &mut Ctx, s: &Sqe, data: &[u8]) {
        let cid = s.cid();
        let fabrics = s.opcode() == capsule::OPC_FABRICS;
        let ft = capsule::fabrics_type(s);
        match &self.phase {
            Phase::Init => {}
            Phase::Connecting => {
                if fabrics && ft == fctype::CONNECT {
                    self.connect(ctx, s, data);
                    if matches!(self.phase, Phase::Connecting) {
                        // Refused: the queue is not made, and a host
                        // connects again on a new connection (Linux tears
                        // this one down). Kept, a peer sent refused
                        // Connects without end, each a warning the
                        // reactor wrote out (audit).
                        self.close("connect refused");
                    }
                } else {
                    self.respond(cid, Status::COMMAND_SEQUENCE, 0);
                }
            }
            Phase::Admin(c) => {
                let c = c.clone();
                let a = if fabrics {
                    match ft {
                        fctype::PROPERTY_GET | fctype::PROPERTY_SET => admin::property(&c, s),
                        fctype::DISCONNECT => {
                            self.respond(cid, Status::SUCCESS, 0);
                            return self.close("disconnect");
                        }
                        fctype::CONNECT => Answer::err(Status::COMMAND_SEQUENCE),
                        _ => Answer::err(Status::INVALID_FIELD),
                    }
                } else if s.opcode() == opc::ASYNC_EVENT {
                    // Held on a discovery controller too (it has no event
                    // to send): it takes the configuration and says AERL,
                    // and SPDK's host sent them again at once, without
                    // end, when they were refused (audit).
                    if self.aers.len() >= AER_LIMIT {
                        Answer::err(status::AER_LIMIT)
                    } else {
                        self.aers.push(cid);
                        // An event may be waiting already.
                        self.last_tick = self.last_tick.checked_sub(TICK).unwrap_or(self.last_tick);
                        return;
                    }
                } else {
                    admin::command(&c, s)
                };
                self.answer(cid, a);
            }
            Phase::Io { ctrl, .. } => {
                if fabrics {
                    match ft {
                        fctype::DISCONNECT => {
                            self.respond(cid, Status::SUCCESS, 0);
                            self.close("disconnect");
                        }
                        _ => self.respond(cid, Status::COMMAND_SEQUENCE, 0),
                    }
                } else if !ctrl.enabled() {
                    self.respond(cid, Status::COMMAND_SEQUENCE, 0);
                } else {
                    self.io_command(s, data);
                }
            }
        }
    }

    fn answer(&mut self, cid: u16, a: Answer) {
        if a.status.ok() && !a.data.is_empty() {
            self.send_data(cid, &a.data);
        }
        self.respond(cid, a.status, a.result);
    }

    fn respond(&mut self, cid: u16, st: Status, result: u64) {
        let qid = match &self.phase {
            Phase::Io { qid, .. } => *qid,
            _ => 0,
        };
        let cqe = capsule::completion(cid, qid, self.sqhd as u16, result, st);
        pdu::encode_response(&capsule::cqe_bytes(&cqe), self.digests, self.out.bytes());
    }

    fn send_data(&mut self, cid: u16, data: &[u8]) {
        let h = whole_read(cid, data.len());
        pdu::encode_data(false, &h, data, self.digests, self.hpda, self.out.bytes());
    }

    fn connect(&mut self, ctx: &mut Ctx, s: &Sqe, data: &[u8]) {
        let cid = s.cid();
        let c = Connect::from_sqe(s);
        // Invalid parameter: DW0 names it (bit 16: in the data, else in
        // the command; bits 15:0 its offset).
        let in_data = |at: u32| (1u64 << 16) | at as u64;
        let in_sqe = |at: u32| at as u64;
        let invalid = status::CONNECT_INVALID;
        if c.recfmt != 0 {
            return self.respond(cid, status::CONNECT_FORMAT, 0);
        }
        let d = match capsule::data_pointer(s) {
            capsule::DataPointer::InCapsule { offset: 0, len } if len as usize == data.len() => {
                ConnectData::parse(data)
            }
            _ => return self.respond(cid, status::SGL_LENGTH, 0),
        };
        let d = match d {
            Ok(d) => d,
            Err(e) => return self.respond(cid, invalid, in_data(e.0)),
        };
        let entries = c.sqsize as u32 + 1;
        if c.sqsize == 0 || entries > MAX_QUEUE_ENTRIES {
            return self.respond(cid, invalid, in_sqe(44));
        }
        let sub = if d.subnqn == capsule::DISCOVERY_NQN {
            None
        } else {
            match self.port.find(&d.subnqn) {
                Some(s) => Some(s),
                None => return self.respond(cid, invalid, in_data(capsule::CONNECT_SUBNQN_AT)),
            }
        };
        if let Some(sub) = &sub {
            if !sub.allows(&d.hostnqn) {
                tracing::warn!(host = %d.hostnqn, nqn = %sub.opts.nqn, "nvme/tcp: host not allowed");
                return self.respond(cid, status::CONNECT_HOST, 0);
            }
        }
        self.entries = entries;
        if c.qid == 0 {
            if d.cntlid != 0xffff {
                return self.respond(cid, invalid, in_data(capsule::CONNECT_CNTLID_AT));
            }
            let Some(cntlid) = self.new_cntlid(sub.as_deref()) else {
                return self.respond(cid, status::CONNECT_BUSY, 0);
            };
            let local = self.sock.local_addr().unwrap_or(self.port.addr);
            let ctrl = Arc::new(Controller::new(
                cntlid,
                d.hostnqn.clone(),
                d.host_id,
                sub.clone(),
                self.port.clone(),
                local,
                c.kato,
            ));
            if let Some(sub) = &sub {
                sub.controllers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(cntlid, ctrl.clone());
                self.ns_blocks = sub.volume.info().num_blocks;
                self.count(sub);
            }
            tracing::info!(cntlid, host = %d.hostnqn, nqn = %d.subnqn, kato_ms = ctrl.state().kato_ms, header_digest = self.digests.header, data_digest = self.digests.data, "nvme/tcp: controller connected");
            // A timer wakes the reactor for keep-alive and events even
            // when it idles.
            let alive = Rc::new(Cell::new(true));
            let a = alive.clone();
            ctx.every(TICK, move |_| a.get());
            self.tick = Some(alive);
            self.phase = Phase::Admin(ctrl);
            return self.respond(cid, Status::SUCCESS, cntlid as u64);
        }
        // An IO queue of an existing controller of this host.
        let Some(sub) = sub else {
            return self.respond(cid, invalid, in_sqe(42));
        };
        let ctrl = sub
            .controllers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&d.cntlid)
            .cloned();
        let Some(ctrl) = ctrl.filter(|c| !c.is_dead()) else {
            return self.respond(cid, invalid, in_data(capsule::CONNECT_CNTLID_AT));
        };
        if ctrl.hostnqn != d.hostnqn || ctrl.host_id != d.host_id {
            return self.respond(cid, invalid, in_data(capsule::CONNECT_HOSTNQN_AT));
        }
        {
            let mut st = ctrl.state();
            if !ctrl.enabled() || c.qid > st.io_queues || !st.connected.insert(c.qid) {
                return self.respond(cid, invalid, in_sqe(42));
            }
        }
        // Counted before the volume is opened, and the subsystem looked at
        // again: a removal that saw no connection returned (and the volume
        // could be deleted next) while this queue went on to open it.
        self.count(&sub);
        if sub.is_removed() {
            self.uncount();
            ctrl.state().connected.remove(&c.qid);
            return self.respond(cid, invalid, in_data(capsule::CONNECT_SUBNQN_AT));
        }
        // No room for another channel on the volume's devices (a drive's
        // queue pairs all taken) is for now: the host may try again.
        let mut busy = false;
        let opened = sub
            .volume
            .quiesce()
            .local(ctx)
            .map_err(|e| e.to_string())
            .and_then(|gate| {
                let (gen, v) = gate.config();
                let ch = v.device.open_channel().map_err(|e| {
                    busy = matches!(e, bdev::BdevError::Exhausted(_));
                    e.to_string()
                })?;
                Ok(IoPath {
                    qos: sub.volume.qos().map(QueueQos::new),
                    qos_timer: None,
                    gate,
                    gen,
                    ch,
                    info: v.device.info().clone(),
                    read_only: sub.opts.read_only,
                    retry_at: None,
                    retry_said: None,
                })
            });
        match opened {
            Ok(p) => self.io = Some(p),
            Err(e) => {
                tracing::error!(error = %e, nqn = %sub.opts.nqn, "nvme/tcp: opening the volume for an IO queue failed");
                self.uncount();
                ctrl.state().connected.remove(&c.qid);
                // Internal Error carries DNR: a Linux host then gives up
                // reconnecting for good (audit).
                let why = if busy {
                    status::CONNECT_BUSY
                } else {
                    status::INTERNAL
                };
                return self.respond(cid, why, 0);
            }
        }
        self.slots = (0..entries)
            .map(|_| Slot {
                cid: 0,
                plan: Plan::FLUSH,
                buf: Vec::new(),
                received: 0,
                state: SlotState::Free,
                pending: 0,
                todo: VecDeque::new(),
                status: Status::SUCCESS,
                corrupt: false,
                flushed: false,
                held: 0,
                asked: Instant::now(),
            })
            .collect();
        self.free = (0..entries as u16).rev().collect();
        // A timer wakes the reactor to see the controller end (keep-alive
        // expired, admin queue closed) when the queue idles: a host that
        // vanished sends nothing that would.
        let alive = Rc::new(Cell::new(true));
        let a = alive.clone();
        ctx.every(IO_LIVENESS, move |_| a.get());
        self.tick = Some(alive);
        self.phase = Phase::Io {
            ctrl: ctrl.clone(),
            sub,
            qid: c.qid,
        };
        self.respond(cid, Status::SUCCESS, ctrl.cntlid as u64);
    }

    fn count(&mut self, sub: &Arc<Subsystem>) {
        sub.connections.fetch_add(1, Ordering::SeqCst);
        self.counted = Some(sub.clone());
    }

    /// Take back [`count`](Self::count).
    fn uncount(&mut self) {
        if let Some(s) = self.counted.take() {
            s.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A controller ID no live controller of the subsystem has (`None`
    /// when every one is taken).
    fn new_cntlid(&self, sub: Option<&Subsystem>) -> Option<u16> {
        let Some(sub) = sub else {
            return Some(self.shared.cntlid());
        };
        let taken = sub.controllers.lock().unwrap_or_else(|e| e.into_inner());
        (0..0xffef)
            .map(|_| self.shared.cntlid())
            .find(|id| !taken.contains_key(id))
    }

    /// Write what is queued for the host.
    fn send(&mut self) -> bool {
        let mut work = false;
        self.out_blocked = false;
        while self.tx_pending() > 0 {
            match self.out.send(&mut self.sock) {
                Ok(0) => {
                    self.close("socket closed");
                    self.out.clear();
                    break;
                }
                Ok(_) => work = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.out_blocked = true;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    // The peer is gone: nothing more can be sent.
                    self.close("socket error");
                    self.out.clear();
                    break;
                }
            }
        }
        work
    }
}
