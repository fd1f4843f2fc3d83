//! A namespace of a remote NVMe/TCP subsystem as a block device
//! (`nvmf-tcp://HOST:PORT/NQN[/NSID]`), so a RAID member can live on
//! another appliance.
//!
//! The association (the admin queue) is held by a control thread that
//! sends Keep Alive and, when the connection is lost, connects again
//! every `reconnect_delay`. Each core's channel owns one IO queue on its
//! own non-blocking socket, polled like any other channel; a channel dials
//! on a short-lived thread so no reactor waits for TCP. Requests survive a
//! lost connection: they are sent again once the channel is back, and
//! fail only when the connection stayed lost for `loss_timeout` (the host
//! side of ctrl_loss_tmo), so a blip never fails a RAID member.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bdev::{
    BdevError, BlockDevice, Completion, DeviceInfo, IoChannel, IoError, IoOp, IoRequest,
    SubmitError,
};
use nvme::spec::{io as cmd, Sqe, Status};

use crate::capsule;
use crate::examine::Examined;
use crate::host::{Controller, HostConfig, HostError, Queue};
use crate::pdu::{self, DataHeader, Digests, Pdu, Receiver};

/// Where a remote namespace is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The target's address.
    pub addr: SocketAddr,
    /// The subsystem.
    pub nqn: String,
    /// The namespace.
    pub nsid: u32,
}

impl Remote {
    /// Parse the part of `nvmf-tcp://HOST:PORT/NQN[/NSID]` after the
    /// scheme's colon (`//HOST:PORT/NQN[/NSID]`).
    pub fn parse(rest: &str) -> Result<Remote, String> {
        let (host, nqn, nsid) = Self::split(rest)?;
        let addr = host
            .to_socket_addrs()
            .map_err(|e| format!("{host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host}: no address"))?;
        Ok(Remote {
            addr,
            nqn: nqn.to_string(),
            nsid,
        })
    }

    /// [`parse`](Self::parse) without looking the host up: `HOST:PORT`
    /// as written, the NQN and the namespace (1 when not given).
    pub fn split(rest: &str) -> Result<(&str, &str, u32), String> {
        let rest = rest
            .strip_prefix("//")
            .ok_or("expected nvmf-tcp://HOST:PORT/NQN[/NSID]")?;
        let (host, path) = rest
            .split_once('/')
            .ok_or("expected nvmf-tcp://HOST:PORT/NQN[/NSID]")?;
        let (nqn, nsid) = match path.rsplit_once('/') {
            Some((nqn, n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => {
                let nsid: u32 = n.parse().map_err(|_| format!("namespace {n:?}"))?;
                if nsid == 0 || nsid == u32::MAX {
                    return Err(format!("namespace {nsid} is not a namespace ID"));
                }
                (nqn, nsid)
            }
            _ => (path, 1),
        };
        if !capsule::valid_nqn(nqn) {
            return Err(format!("{nqn:?} is not an NQN"));
        }
        Ok((host, nqn, nsid))
    }
}

/// How the device behaves when the network does not.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// How the host connects (its NQN, digests, keep-alive timeout).
    pub host: HostConfig,
    /// Requests fail once the connection has been lost this long.
    pub loss_timeout: Duration,
    /// Time between attempts to connect again.
    pub reconnect_delay: Duration,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            host: HostConfig {
                kato_ms: 10_000,
                ..HostConfig::default()
            },
            loss_timeout: Duration::from_secs(30),
            reconnect_delay: Duration::from_secs(1),
        }
    }
}

/// Largest request the device takes (split into commands of the
/// target's MDTS).
const MAX_REQUEST: u32 = 8 << 20;
/// IO queue entries each channel asks for.
const QUEUE_ENTRIES: u16 = 128;
/// Data queued to send past which received PDUs wait: each R2T answered
/// adds its data (and a PDU header, padded to the target's CPDA) to the
/// send buffer, and a target that asks in 1-byte R2Ts while it reads
/// nothing would grow it without end.
const TX_HIGH: usize = 4 << 20;

/// What the control thread and the channels share.
struct Assoc {
    remote: Remote,
    opts: DeviceOptions,
    stop: AtomicBool,
    /// Controller ID of the live association; `u64::MAX`: none.
    cntlid: AtomicU64,
    /// Bumped at every new association: queues of an older one are gone.
    epoch: AtomicU64,
    /// IO queues granted, and which are taken by channels.
    qids: Mutex<Vec<bool>>,
    /// Since when the association is lost (`None`: it is up).
    lost_since: Mutex<Option<Instant>>,
    /// What the controller and namespace were at the first connect: a
    /// later association must find the same namespace, taking as much.
    attached: Examined,
    /// Writes (and discards) completed so far, and the most of them that
    /// a completed flush covers (those completed before it was sent).
    written: AtomicU64,
    flushed: AtomicU64,
    /// A new association came while writes were not covered by a flush:
    /// the target's cache may have lost them (a power cycle shows as
    /// nothing but a new association). The next flush fails, so the
    /// volume above fails the member and resynchronises it.
    cache_lost: AtomicBool,
}

impl Assoc {
    fn lost_for(&self) -> Option<Duration> {
        self.lost_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
    }
}

/// A remote namespace.
pub struct NvmfDevice {
    info: DeviceInfo,
    assoc: Arc<Assoc>,
    control: Option<JoinHandle<()>>,
}

/// Connect the admin queue, ask for IO queues; the controller and the
/// queues granted.
fn associate(r: &Remote, host: &HostConfig) -> Result<(Controller, u16), HostError> {
    let mut c = Controller::connect(r.addr, &r.nqn, host)?;
    let n = 63u32;
    let granted = c.set_features(0x07, n | n << 16)?;
    // 0's based, and never more than asked (a grant of 0xffff wrapped
    // to no queue at all).
    let queues = ((granted & 0xffff).min(granted >> 16).min(n) + 1) as u16;
    Ok((c, queues))
}

impl NvmfDevice {
    /// Connect to `remote` (failing at once if it cannot be reached or is
    /// not a usable namespace) and keep the association alive from then on.
    pub fn connect(
        name: &str,
        remote: Remote,
        opts: DeviceOptions,
    ) -> Result<NvmfDevice, BdevError> {
        let fail = |e: HostError| BdevError::Os {
            what: format!("{name}: connecting to {} at {}", remote.nqn, remote.addr),
            // The socket's own error keeps its kind (refused, timed out):
            // a caller tells an unreachable target from a refusing one.
            source: match e {
                HostError::Io(io) => io,
                HostError::Timeout(_) => {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, e.to_string())
                }
                e => std::io::Error::other(e.to_string()),
            },
        };
        let (mut c, queues) = associate(&remote, &opts.host).map_err(fail)?;
        let ns = c.identify(0x00, remote.nsid).map_err(fail)?;
        let n = Examined::of(&c.id, &ns).map_err(|why| {
            BdevError::Unsupported(format!(
                "{name}: namespace {} of {} is not usable ({why})",
                remote.nsid, remote.nqn
            ))
        })?;
        let info = DeviceInfo {
            name: name.to_string(),
            block_size: 1 << n.lbads,
            num_blocks: n.nsze,
            // Larger requests (a mirror's 1 MiB rebuild rows) are split
            // into commands of `max_command` here.
            max_transfer: MAX_REQUEST,
            optimal_io_boundary: 0,
            min_io_blocks: 1,
            flush: n.volatile,
            discard: n.discard,
            write_zeroes: false,
        };
        let assoc = Arc::new(Assoc {
            remote,
            opts,
            stop: AtomicBool::new(false),
            cntlid: AtomicU64::new(c.cntlid as u64),
            epoch: AtomicU64::new(1),
            qids: Mutex::new(vec![false; queues as usize]),
            lost_since: Mutex::new(None),
            attached: n,
            written: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            cache_lost: AtomicBool::new(false),
        });
        let a = assoc.clone();
        let control = std::thread::Builder::new()
            .name(format!("nvmf-{name}"))
            .spawn(move || control(a, Some(c)))
            .map_err(|source| BdevError::Os {
                what: format!("{name}: starting its keep-alive thread"),
                source,
            })?;
        Ok(NvmfDevice {
            info,
            assoc,
            control: Some(control),
        })
    }

    /// Whether the association is up now.
    pub fn connected(&self) -> bool {
        self.assoc.lost_for().is_none()
    }
}

impl Drop for NvmfDevice {
    fn drop(&mut self) {
        // Not joined: the thread may be waiting for an unreachable target
        // (a timeout of seconds), and the last handle may go on a reactor.
        // It sees the stop at its next step and ends on its own.
        self.assoc.stop.store(true, Ordering::SeqCst);
        drop(self.control.take());
    }
}

/// Sleep up to `d`, waking early when asked to stop.
fn nap(a: &Assoc, d: Duration) {
    let end = Instant::now() + d;
    while !a.stop.load(Ordering::SeqCst) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

/// The control thread: Keep Alive while the association is up; connect
/// again while it is not.
fn control(a: Arc<Assoc>, mut ctrl: Option<Controller>) {
    let kato = Duration::from_millis(a.opts.host.kato_ms.max(1000) as u64);
    // Keep Alive every half KATO from the last one sent, however long its
    // answer took: napping half KATO after a slow answer sent the next past
    // KATO, and the target dropped the association (every channel then
    // reconnected and sent its IO again, over and over).
    let mut last_sent: Option<Instant> = None;
    // Why the last attempt to connect again failed (logged when it changes).
    let mut refused: Option<String> = None;
    while !a.stop.load(Ordering::SeqCst) {
        match &mut ctrl {
            Some(c) => {
                let wait = last_sent.map_or(kato / 2, |t| (kato / 2).saturating_sub(t.elapsed()));
                nap(&a, wait);
                last_sent = Some(Instant::now());
                if a.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Err(e) = c.keep_alive() {
                    tracing::warn!(nqn = %a.remote.nqn, addr = %a.remote.addr, error = %e, "nvme/tcp: lost the connection to the target; connecting again");
                    a.cntlid.store(u64::MAX, Ordering::SeqCst);
                    *a.lost_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                    ctrl = None;
                }
            }
            None => match associate(&a.remote, &a.opts.host).and_then(|(mut c, q)| {
                let ns = c.identify(0x00, a.remote.nsid)?;
                let now = Examined::of(&c.id, &ns).map_err(|why| {
                    HostError::Protocol(format!(
                        "namespace {} is not usable now ({why})",
                        a.remote.nsid
                    ))
                })?;
                match a.attached.still(&now) {
                    Ok(()) => Ok((c, q)),
                    Err(why) => Err(HostError::Protocol(format!(
                        "namespace {}: {why}",
                        a.remote.nsid
                    ))),
                }
            }) {
                Ok((c, granted)) => {
                    refused = None;
                    tracing::info!(nqn = %a.remote.nqn, addr = %a.remote.addr, cntlid = c.cntlid, "nvme/tcp: connected to the target again");
                    // Fewer IO queues granted: the others are not handed
                    // out again, not even after a later grant of more (a
                    // channel may still hold one); the device takes fewer
                    // channels until it is attached anew.
                    // A channel that keeps one past the grant cannot
                    // connect, and its requests fail at the loss timeout:
                    // said, so that is not a mystery.
                    let mut q = a.qids.lock().unwrap_or_else(|e| e.into_inner());
                    if (granted as usize) < q.len() {
                        let stranded = q[granted as usize..].iter().filter(|t| **t).count();
                        q.truncate(granted as usize);
                        if stranded > 0 {
                            tracing::warn!(nqn = %a.remote.nqn, addr = %a.remote.addr, granted, stranded, "nvme/tcp: the target grants fewer IO queues than before; channels on the others cannot connect again");
                        }
                    }
                    drop(q);
                    // Before the channels see the new association: a flush
                    // they send on it must know.
                    let written = a.written.load(Ordering::SeqCst);
                    let at_risk = written > a.flushed.load(Ordering::SeqCst);
                    if a.attached.volatile && at_risk {
                        a.cache_lost.store(true, Ordering::SeqCst);
                    }
                    a.epoch.fetch_add(1, Ordering::SeqCst);
                    // A write the old association completed between the
                    // look above and the new epoch (a channel still
                    // reading its old connection) is at risk too; later
                    // ones see the new epoch (`account`).
                    if a.attached.volatile && a.written.load(Ordering::SeqCst) > written {
                        a.cache_lost.store(true, Ordering::SeqCst);
                    }
                    // Its controller ID last, after the epoch: a channel
                    // that reads this ID reads the new epoch after it, and
                    // never dials the new association as the old one
                    // (its writes would count as the old one's, at risk).
                    a.cntlid.store(c.cntlid as u64, Ordering::SeqCst);
                    if a.cache_lost.load(Ordering::SeqCst) {
                        tracing::warn!(nqn = %a.remote.nqn, addr = %a.remote.addr, "nvme/tcp: writes the target took before it came back may be lost with its volatile cache; the next flush fails");
                    }
                    *a.lost_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    ctrl = Some(c);
                }
                Err(e) => {
                    // Said once per reason: a target that answers with
                    // another namespace is the operator's to see, not a
                    // debug line (it fails the device at the loss time-out).
                    let why = e.to_string();
                    if refused.as_ref() != Some(&why) {
                        tracing::warn!(nqn = %a.remote.nqn, addr = %a.remote.addr, error = %why, "nvme/tcp: connecting again failed; trying on");
                        refused = Some(why);
                    }
                    nap(&a, a.opts.reconnect_delay)
                }
            },
        }
    }
}

impl BlockDevice for NvmfDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// A reconnect finds the same NGUID ([`Examined::still`]).
    fn identity(&self) -> Option<String> {
        self.assoc.attached.identity.clone()
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        let qid = {
            let mut q = self.assoc.qids.lock().unwrap_or_else(|e| e.into_inner());
            let Some(i) = q.iter().position(|t| !t) else {
                // Out of room, not broken: the volume refuses the open
                // rather than fail the member (as for a local drive).
                return Err(BdevError::Exhausted(format!(
                    "{}: every IO queue the target granted ({}) is in use",
                    self.info.name,
                    q.len()
                )));
            };
            q[i] = true;
            i as u16 + 1
        };
        Ok(Box::new(NvmfChannel {
            assoc: self.assoc.clone(),
            info: self.info.clone(),
            qid,
            conn: None,
            dialing: None,
            next_dial: Instant::now(),
            sent: HashMap::new(),
            waiting: VecDeque::new(),
            done: Vec::new(),
            next_cid: 0,
            parts: HashMap::new(),
        }))
    }
}

/// One IO queue's connection.
struct Conn {
    stream: TcpStream,
    rx: Vec<u8>,
    rx_len: usize,
    tx: Vec<u8>,
    tx_at: usize,
    digests: Digests,
    cpda: u8,
    maxh2cdata: u32,
    epoch: u64,
}

/// A sent request: the request, the bytes of read data received (of a
/// write: the bytes sent so far, in the capsule or asked for by R2T),
/// and when it came (kept when it is sent again).
struct Sent {
    req: IoRequest,
    received: usize,
    at: Instant,
    /// A flush: the writes completed when it was sent (it covers them).
    covers: u64,
}

struct NvmfChannel {
    assoc: Arc<Assoc>,
    info: DeviceInfo,
    qid: u16,
    conn: Option<Conn>,
    dialing: Option<mpsc::Receiver<Result<Conn, HostError>>>,
    /// No new dial before this (one every reconnect delay).
    next_dial: Instant,
    sent: HashMap<u16, Sent>,
    /// Requests not sent yet (or sent on a connection that was lost),
    /// with when they came.
    waiting: VecDeque<(IoRequest, Instant)>,
    done: Vec<Completion>,
    next_cid: u16,
    /// Requests split into several commands (their parts carry the
    /// request's tag): parts left and the first error.
    parts: HashMap<u64, (usize, Option<IoError>)>,
}

impl Drop for NvmfChannel {
    fn drop(&mut self) {
        let mut q = self.assoc.qids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = q.get_mut(self.qid as usize - 1) {
            *t = false;
        }
    }
}

/// Connect IO queue `qid` of association `cntlid` (blocking: on its own
/// thread).
fn dial(a: &Assoc, qid: u16, cntlid: u16, epoch: u64) -> Result<Conn, HostError> {
    let mut q = Queue::open(a.remote.addr, &a.opts.host)?;
    q.connect(qid, QUEUE_ENTRIES - 1, cntlid, &a.remote.nqn, &a.opts.host)?;
    let (stream, digests, cpda, maxh2cdata) = q.into_parts();
    stream.set_nonblocking(true)?;
    Ok(Conn {
        stream,
        // Room for the largest PDU a read can bring.
        rx: vec![0u8; a.attached.max_command as usize + (64 << 10)],
        rx_len: 0,
        tx: Vec::with_capacity(1 << 16),
        tx_at: 0,
        digests,
        cpda,
        maxh2cdata,
        epoch,
    })
}

fn error_of(req: &IoRequest, st: Status) -> IoError {
    if st.media() {
        IoError::Media(req.offset_blocks)
    } else {
        IoError::Device(st.raw())
    }
}

impl NvmfChannel {
    /// Count what `s`'s completion (`r`), read from a connection of
    /// association `epoch`, makes durable or at risk; a flush after the
    /// target may have lost its cache fails (once).
    fn account(&self, epoch: u64, s: &Sent, r: Result<(), IoError>) -> Result<(), IoError> {
        let a = &self.assoc;
        match (s.req.op, r) {
            (IoOp::Write | IoOp::Discard, Ok(())) => {
                a.written.fetch_add(1, Ordering::SeqCst);
                // Completed by an association that is gone already: its
                // target may have lost it with its cache. (The connection
                // is the caller's to name: it is out of `self.conn` while
                // its PDUs are handled, and this was never true.)
                if a.attached.volatile && epoch != a.epoch.load(Ordering::SeqCst) {
                    a.cache_lost.store(true, Ordering::SeqCst);
                }
                Ok(())
            }
            (IoOp::Flush, Ok(())) if a.cache_lost.swap(false, Ordering::SeqCst) => {
                tracing::warn!(nqn = %a.remote.nqn, "nvme/tcp: a flush after the target came back fails: writes it had taken may be lost");
                Err(IoError::DeviceFailed)
            }
            (IoOp::Flush, Ok(())) => {
                a.flushed.fetch_max(s.covers, Ordering::SeqCst);
                Ok(())
            }
            (_, r) => r,
        }
    }

    fn finish(&mut self, tag: u64, result: Result<(), IoError>) {
        if let Some((left, err)) = self.parts.get_mut(&tag) {
            *left -= 1;
            if let Err(e) = result {
                err.get_or_insert(e);
            }
            if *left > 0 {
                return;
            }
            let result = err.map_or(Ok(()), Err);
            self.parts.remove(&tag);
            self.done.push(Completion { tag, result });
            return;
        }
        self.done.push(Completion { tag, result });
    }

    /// Fail the requests that have waited for the loss timeout: their
    /// connection stayed lost that long, or the target did not answer
    /// (then the connection is dropped too: a late answer must never
    /// complete a later request that reuses its command ID). A request is
    /// timed from when it came, so one that comes after a long outage
    /// still has the whole timeout for the connection to come back.
    fn check_loss(&mut self) {
        let limit = self.assoc.opts.loss_timeout;
        // One clock read per poll; nothing allocated while none is late.
        let now = Instant::now();
        let late = |at: &Instant| now.saturating_duration_since(*at) >= limit;
        let stuck = self.sent.values().any(|s| late(&s.at));
        if stuck {
            tracing::warn!(qid = self.qid, "nvme/tcp: a request got no answer in the loss timeout; the queue's connection is dropped");
            self.lose();
        }
        if !self.waiting.iter().any(|(_, at)| late(at)) {
            return;
        }
        let e = if self.conn.is_some() || stuck {
            IoError::TimedOut
        } else {
            IoError::DeviceFailed
        };
        let (old, keep): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(_, at)| late(at));
        self.waiting = keep;
        for (r, _) in old {
            self.finish(r.tag, Err(e));
        }
    }

    /// Drop a lost connection: what was sent goes again on the next one,
    /// first, each keeping the time it came.
    fn lose(&mut self) {
        self.conn = None;
        let mut again: Vec<(IoRequest, Instant)> =
            self.sent.drain().map(|(_, s)| (s.req, s.at)).collect();
        // Oldest first (the block layer above does not depend on order
        // between requests in flight together).
        again.sort_by_key(|(_, at)| *at);
        for r in again.into_iter().rev() {
            self.waiting.push_front(r);
        }
    }

    fn connect_if_needed(&mut self) {
        let epoch = self.assoc.epoch.load(Ordering::SeqCst);
        if self.conn.as_ref().is_some_and(|c| c.epoch != epoch) {
            // A new association: this queue's is gone on the target.
            self.lose();
        }
        if self.conn.is_some() {
            return;
        }
        if let Some(rx) = &self.dialing {
            match rx.try_recv() {
                Ok(Ok(c)) => {
                    self.dialing = None;
                    self.conn = Some(c);
                }
                Ok(Err(e)) => {
                    tracing::debug!(qid = self.qid, error = %e, "nvme/tcp: connecting an IO queue failed");
                    self.dialing = None;
                }
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => self.dialing = None,
            }
            return;
        }
        if self.waiting.is_empty() || Instant::now() < self.next_dial {
            return;
        }
        self.next_dial = Instant::now() + self.assoc.opts.reconnect_delay;
        let cntlid = self.assoc.cntlid.load(Ordering::SeqCst);
        if cntlid == u64::MAX {
            return;
        }
        // After the controller ID (which the control thread stores after
        // the epoch): the epoch of that association or a later one. A
        // later one (a whole reconnect between the two loads) would label
        // the old ID as new: looked at again (review).
        let epoch = self.assoc.epoch.load(Ordering::SeqCst);
        if self.assoc.cntlid.load(Ordering::SeqCst) != cntlid {
            return;
        }
        let (tx, rx) = mpsc::channel();
        let a = self.assoc.clone();
        let qid = self.qid;
        let spawned = std::thread::Builder::new()
            .name("nvmf-dial".into())
            .spawn(move || {
                let _ = tx.send(dial(&a, qid, cntlid as u16, epoch));
            });
        if spawned.is_ok() {
            self.dialing = Some(rx);
        }
    }

    fn free_cid(&mut self) -> u16 {
        loop {
            let c = self.next_cid;
            self.next_cid = self.next_cid.wrapping_add(1);
            if !self.sent.contains_key(&c) {
                return c;
            }
        }
    }

    /// Put waiting requests on the wire, as many as the queue takes.
    fn send_waiting(&mut self) {
        while self.conn.is_some() && self.sent.len() < QUEUE_ENTRIES as usize - 1 {
            let Some((req, came)) = self.waiting.pop_front() else {
                break;
            };
            let cid = self.free_cid();
            let bs = self.info.block_size as u64;
            let bytes = (req.num_blocks * bs) as usize;
            let nsid = self.assoc.remote.nsid;
            let in_capsule = self.assoc.attached.in_capsule;
            let Some(c) = self.conn.as_mut() else { break };
            let mut s;
            let mut inline = Vec::new();
            match req.op {
                IoOp::Read | IoOp::Write => {
                    s = Sqe::new(
                        if req.op == IoOp::Read {
                            cmd::READ
                        } else {
                            cmd::WRITE
                        },
                        nsid,
                    );
                    s.set_range(req.offset_blocks, req.num_blocks as u32);
                    let capsule_data = req.op == IoOp::Write && bytes <= in_capsule;
                    if capsule_data {
                        inline.resize(bytes, 0);
                        // SAFETY: the request's memory (IoVec's contract).
                        unsafe { bdev::sg::copy_out(&req.sg, 0, &mut inline) };
                    }
                    capsule::set_data_pointer(&mut s, capsule_data, bytes as u32);
                }
                IoOp::Flush => s = Sqe::new(cmd::FLUSH, nsid),
                IoOp::Discard => {
                    s = Sqe::new(cmd::DSM, nsid);
                    s.cdw[1] = cmd::DSM_AD;
                    inline.resize(16, 0);
                    inline[4..8].copy_from_slice(&(req.num_blocks as u32).to_le_bytes());
                    inline[8..16].copy_from_slice(&req.offset_blocks.to_le_bytes());
                    capsule::set_data_pointer(&mut s, true, 16);
                }
                IoOp::WriteZeroes => {
                    self.finish(req.tag, Err(IoError::Unsupported(IoOp::WriteZeroes)));
                    continue;
                }
            }
            s.set_cid(cid);
            pdu::encode_command(
                &capsule::sqe_bytes(&s),
                &inline,
                c.digests,
                c.cpda,
                &mut c.tx,
            );
            // A write whose data rode in the capsule has sent it all.
            let sent_data = if req.op == IoOp::Write && !inline.is_empty() {
                bytes
            } else {
                0
            };
            self.sent.insert(
                cid,
                Sent {
                    covers: self.assoc.written.load(Ordering::SeqCst),
                    req,
                    received: sent_data,
                    at: came,
                },
            );
        }
    }

    /// Write what is queued; read and act on what came.
    fn pump(&mut self) {
        let Some(c) = self.conn.as_mut() else { return };
        let mut broken = false;
        while c.tx_at < c.tx.len() {
            match c.stream.write(&c.tx[c.tx_at..]) {
                Ok(0) => {
                    broken = true;
                    break;
                }
                Ok(n) => c.tx_at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if c.tx_at == c.tx.len() {
            c.tx.clear();
            c.tx_at = 0;
        }
        loop {
            if broken || c.rx_len == c.rx.len() {
                break;
            }
            match c.stream.read(&mut c.rx[c.rx_len..]) {
                Ok(0) => broken = true,
                Ok(n) => c.rx_len += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => broken = true,
            }
        }
        if !broken {
            broken = self.take_pdus().is_err();
        }
        if broken {
            tracing::debug!(
                qid = self.qid,
                "nvme/tcp: an IO queue's connection was lost"
            );
            self.lose();
        }
    }

    /// Act on every whole PDU received.
    fn take_pdus(&mut self) -> Result<(), ()> {
        let Some(mut c) = self.conn.take() else {
            return Ok(());
        };
        let r = Receiver {
            controller: false,
            digests: c.digests,
            // More than a read can bring is an error, never a PDU that
            // cannot fit the buffer and would wedge the queue.
            max_data: self.assoc.attached.max_command,
        };
        let rx = std::mem::take(&mut c.rx);
        let mut at = 0;
        let mut result = Ok(());
        // Past the mark, what is left waits in the receive buffer (which,
        // full, is not read) until the target takes what we send.
        while c.tx.len() - c.tx_at < TX_HIGH {
            match pdu::parse(&rx[at..c.rx_len], &r) {
                Ok(None) => break,
                Ok(Some((p, n))) => {
                    if self.handle(&mut c, p).is_err() {
                        result = Err(());
                        break;
                    }
                    at += n;
                }
                Err(e) => {
                    tracing::warn!(qid = self.qid, error = %e, "nvme/tcp: the target sent a bad PDU");
                    result = Err(());
                    break;
                }
            }
        }
        c.rx = rx;
        c.rx.copy_within(at..c.rx_len, 0);
        c.rx_len -= at;
        self.conn = Some(c);
        result
    }

    fn handle(&mut self, c: &mut Conn, p: Pdu<'_>) -> Result<(), ()> {
        match p {
            Pdu::Response(b) => {
                let cqe = capsule::cqe_from(&b);
                let st = cqe.code();
                // Success for a write whose data the target never asked
                // for (or we have not sent) is a lie: what the member
                // holds is not known. The connection ends; the write stays
                // in flight and goes again on the next one.
                let s = self.sent.get(&cqe.cid()).ok_or(())?;
                let bytes = (s.req.num_blocks * self.info.block_size as u64) as usize;
                if st.ok() && s.req.op == IoOp::Write && s.received != bytes {
                    return Err(());
                }
                let s = self.sent.remove(&cqe.cid()).ok_or(())?;
                let r = if !st.ok() {
                    Err(error_of(&s.req, st))
                } else if s.req.op == IoOp::Read && s.received != bytes {
                    Err(IoError::Short {
                        done: s.received as u64,
                        expected: bytes as u64,
                    })
                } else {
                    Ok(())
                };
                let r = self.account(c.epoch, &s, r);
                self.finish(s.req.tag, r);
            }
            Pdu::C2hData(h, data) => {
                let Some(s) = self.sent.get_mut(&h.cccid) else {
                    return Err(());
                };
                let bytes = (s.req.num_blocks * self.info.block_size as u64) as usize;
                let at = h.offset as usize;
                if s.req.op != IoOp::Read || at != s.received || at + data.len() > bytes {
                    return Err(());
                }
                // SAFETY: the request's memory is ours until it completes
                // (IoVec's contract); the range was checked above.
                unsafe { bdev::sg::copy_in(&s.req.sg, at, data) };
                s.received += data.len();
                if h.success {
                    let s = self.sent.remove(&h.cccid).ok_or(())?;
                    let r = if s.received == bytes {
                        Ok(())
                    } else {
                        Err(IoError::Short {
                            done: s.received as u64,
                            expected: bytes as u64,
                        })
                    };
                    self.finish(s.req.tag, r);
                }
            }
            Pdu::R2t(r) => {
                let Some(s) = self.sent.get_mut(&r.cccid) else {
                    return Err(());
                };
                let bytes = (s.req.num_blocks * self.info.block_size as u64) as usize;
                let (at, len) = (r.offset as usize, r.length as usize);
                // One R2T at a time (we ask for MAXR2T 0), each for the
                // data after what was sent: a repeated or overlapping one
                // would have us send the same data again, as often as a
                // hostile target likes, into an unbounded buffer.
                if s.req.op != IoOp::Write || len == 0 || at != s.received || at + len > bytes {
                    return Err(());
                }
                s.received += len;
                let mut done = 0;
                let mut chunk = Vec::with_capacity(len.min(c.maxh2cdata as usize));
                while done < len {
                    let n = (len - done).min(c.maxh2cdata as usize);
                    chunk.resize(n, 0);
                    // SAFETY: as above; the device only reads it.
                    unsafe { bdev::sg::copy_out(&s.req.sg, at + done, &mut chunk) };
                    let h = DataHeader {
                        cccid: r.cccid,
                        ttag: r.ttag,
                        offset: (at + done) as u32,
                        length: n as u32,
                        last: done + n == len,
                        success: false,
                    };
                    pdu::encode_data(true, &h, &chunk, c.digests, c.cpda, &mut c.tx);
                    done += n;
                }
            }
            // A termination request or anything else: the connection ends.
            _ => return Err(()),
        }
        Ok(())
    }
}

impl IoChannel for NvmfChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if let Err(e) = bdev::validate(&self.info, &req) {
            self.finish(req.tag, Err(e));
            return Ok(());
        }
        if req.op == IoOp::Discard && req.num_blocks > u32::MAX as u64 {
            self.finish(req.tag, Err(IoError::Unsupported(IoOp::Discard)));
            return Ok(());
        }
        if self.waiting.len() + self.sent.len() >= 4 * QUEUE_ENTRIES as usize {
            return Err(SubmitError::Busy(req));
        }
        let now = Instant::now();
        let max = (self.assoc.attached.max_command / self.info.block_size) as u64;
        if matches!(req.op, IoOp::Read | IoOp::Write) && req.num_blocks > max {
            // Commands of the target's MDTS, the request completing with
            // its last part.
            let bs = self.info.block_size as usize;
            let n = req.num_blocks.div_ceil(max) as usize;
            // Tags name requests in flight (the channel contract): parts
            // are counted by it.
            debug_assert!(
                !self.parts.contains_key(&req.tag),
                "tag {} in flight twice",
                req.tag
            );
            self.parts.insert(req.tag, (n, None));
            let mut at = 0;
            while at < req.num_blocks {
                let blocks = max.min(req.num_blocks - at);
                self.waiting.push_back((
                    IoRequest {
                        op: req.op,
                        offset_blocks: req.offset_blocks + at,
                        num_blocks: blocks,
                        sg: bdev::sg::slice(&req.sg, at as usize * bs, blocks as usize * bs),
                        tag: req.tag,
                    },
                    now,
                ));
                at += blocks;
            }
        } else {
            self.waiting.push_back((req, now));
        }
        self.send_waiting();
        self.pump();
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        if !self.waiting.is_empty() || !self.sent.is_empty() {
            self.connect_if_needed();
            self.send_waiting();
            self.pump();
            self.check_loss();
        }
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }

    fn inflight(&self) -> usize {
        self.waiting.len() + self.sent.len() + self.done.len()
    }
}
