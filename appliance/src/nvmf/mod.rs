//! Volumes exported over NVMe/TCP (NVMe over Fabrics 1.1, TCP transport).
//!
//! One subsystem per exported volume, named by its NQN, with one
//! namespace (NSID 1). A listener thread per address accepts connections
//! and hands each socket to a reactor, which owns it from then on: the
//! connection's PDUs, commands and the volume IO they start are all on
//! that core, non-blocking, like a vhost-user virtqueue. What the queues
//! of one controller share (its registers, features, keep-alive, pending
//! events) sits in a `Controller` behind a mutex that only admin commands
//! and connects take, never the IO path.
//!
//! Every listener also serves the discovery controller (the well-known
//! discovery NQN), whose log lists the subsystems on that listener a host
//! may connect to.

mod admin;
mod conn;
mod controller;
mod identify;
mod io;
mod memory;
mod output;

pub(crate) use memory::{Held, MEMORY, SHARE_MAX};

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use poller::ReactorSet;

use crate::volume::Volume;

pub use controller::Controller;

/// Why an NVMe/TCP export could not be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum NvmfError {
    /// A field of the request is not valid.
    #[error("nvme/tcp export: {field}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The NQN is exported already.
    #[error("nvme/tcp export: {0} is exported already")]
    Exists(String),
    /// No such export.
    #[error("nvme/tcp export: no subsystem {0}")]
    NotFound(String),
    /// The listen address could not be bound.
    #[error("nvme/tcp export: listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// What an NVMe/TCP export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsystemOptions {
    /// The subsystem's NQN.
    pub nqn: String,
    /// Where it listens.
    pub listen: SocketAddr,
    /// Host NQNs allowed to connect.
    pub hosts: Vec<String>,
    /// Any host may connect (the list is ignored).
    pub allow_any_host: bool,
    /// The serial number hosts see (at most 20 ASCII characters).
    pub serial: String,
    /// The namespace's NGUID (and UUID): stable for the export.
    pub nguid: [u8; 16],
    /// Writes are refused.
    pub read_only: bool,
}

/// An exported volume as a subsystem.
pub struct Subsystem {
    /// What it is.
    pub opts: SubsystemOptions,
    /// The volume behind NSID 1.
    pub volume: Volume,
    /// Controllers by ID.
    controllers: Mutex<HashMap<u16, Arc<Controller>>>,
    /// Set when the export is deleted: its connections close.
    removed: AtomicBool,
    /// Connections open now (admin and IO).
    connections: AtomicUsize,
    /// Read commands completed, for metrics and the SMART log.
    pub reads: AtomicU64,
    /// Write commands completed.
    pub writes: AtomicU64,
    /// Bytes read, by commands that succeeded.
    pub read_bytes: AtomicU64,
    /// Bytes written, by commands that succeeded.
    pub write_bytes: AtomicU64,
    /// IO commands that completed with an error status.
    pub errors: AtomicU64,
}

impl Subsystem {
    /// Whether `hostnqn` may connect.
    pub fn allows(&self, hostnqn: &str) -> bool {
        self.opts.allow_any_host || self.opts.hosts.iter().any(|h| h == hostnqn)
    }

    /// Whether the export was deleted.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Controllers (hosts' admin queues) live now.
    pub fn controllers(&self) -> Vec<Arc<Controller>> {
        self.controllers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// What a listener serves.
struct Port {
    subsystems: RwLock<Vec<Arc<Subsystem>>>,
    /// Bumped whenever the list changes (the discovery log's GENCTR).
    generation: AtomicU64,
    stop: AtomicBool,
    addr: SocketAddr,
    /// Connections open on this listener now.
    live: AtomicUsize,
    /// Of them, per peer (`crate::peers`).
    peers: Arc<crate::peers::PeerCounts>,
}

impl Port {
    fn find(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.subsystems
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|s| s.opts.nqn == nqn && !s.is_removed())
            .cloned()
    }
}

struct Listener {
    port: Arc<Port>,
    /// The listening socket (a second descriptor of the one the accept
    /// loop blocks on), to wake that loop with shutdown(2).
    socket: TcpListener,
    thread: Option<JoinHandle<()>>,
}

/// The NVMe/TCP target: listeners and their subsystems.
pub struct Target {
    set: ReactorSet,
    shared: Arc<TargetShared>,
    listeners: Mutex<HashMap<SocketAddr, Listener>>,
}

/// What every connection of the target reads.
pub(crate) struct TargetShared {
    /// Next reactor to give a connection to.
    next_core: AtomicUsize,
    /// Next controller ID (1..=0xffef).
    next_cntlid: AtomicUsize,
    /// Connections a listener keeps open at most: more are closed as
    /// they come (each holds buffers; peers are not trusted).
    max_connections: AtomicUsize,
    /// Connections open now, on every listener.
    live: AtomicUsize,
    /// What the connections hold that their peers decide the size of.
    memory: Arc<memory::Memory>,
}

/// Buffers kept for reuse a connection may hold at least (see
/// `memory` for the most): two of the largest transfers.
const SHARE_MIN: usize = 2 * identify::MAX_TRANSFER as usize;

impl TargetShared {
    fn cntlid(&self) -> u16 {
        let n = self.next_cntlid.fetch_add(1, Ordering::SeqCst);
        (n % 0xffef) as u16 + 1
    }

    /// The bytes of buffers kept for reuse a connection may hold now:
    /// 4 MiB while there are few connections, less as more connect.
    pub(crate) fn spare_share(&self) -> usize {
        (MEMORY / self.live.load(Ordering::Relaxed).max(1)).clamp(SHARE_MIN, SHARE_MAX)
    }
}

/// Connections per listener at most, by default.
pub const MAX_CONNECTIONS: usize = 1024;

/// How long a deleted export waits for its connections to close.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

impl Target {
    /// A target whose connections run on the reactors of `set`.
    pub fn new(set: &ReactorSet) -> Target {
        Target {
            set: set.clone(),
            shared: Arc::new(TargetShared {
                next_core: AtomicUsize::new(0),
                next_cntlid: AtomicUsize::new(0),
                max_connections: AtomicUsize::new(MAX_CONNECTIONS),
                live: AtomicUsize::new(0),
                memory: Default::default(),
            }),
            listeners: Mutex::new(HashMap::new()),
        }
    }

    /// Export `volume` as the subsystem `opts.nqn` on `opts.listen`.
    pub fn add(
        &self,
        volume: &Volume,
        opts: SubsystemOptions,
    ) -> Result<Arc<Subsystem>, NvmfError> {
        check(&opts)?;
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        for l in listeners.values() {
            if l.port.find(&opts.nqn).is_some() {
                return Err(NvmfError::Exists(opts.nqn.clone()));
            }
        }
        let make = |listen: SocketAddr| {
            Arc::new(Subsystem {
                opts: SubsystemOptions {
                    listen,
                    ..opts.clone()
                },
                volume: volume.clone(),
                controllers: Mutex::new(HashMap::new()),
                removed: AtomicBool::new(false),
                connections: AtomicUsize::new(0),
                reads: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                read_bytes: AtomicU64::new(0),
                write_bytes: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            })
        };
        // Listeners are kept by the address they bound (port 0 binds a
        // new one each time).
        if let Some(l) = listeners.get(&opts.listen) {
            let sub = make(l.port.addr);
            l.port
                .subsystems
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .push(sub.clone());
            l.port.generation.fetch_add(1, Ordering::SeqCst);
            return Ok(sub);
        }
        let socket = TcpListener::bind(opts.listen).map_err(|source| NvmfError::Listen {
            addr: opts.listen,
            source,
        })?;
        let addr = socket.local_addr().map_err(|source| NvmfError::Listen {
            addr: opts.listen,
            source,
        })?;
        let wake = socket.try_clone().map_err(|source| NvmfError::Listen {
            addr: opts.listen,
            source,
        })?;
        let sub = make(addr);
        let port = Arc::new(Port {
            subsystems: RwLock::new(vec![sub.clone()]),
            generation: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            addr,
            live: AtomicUsize::new(0),
            peers: Default::default(),
        });
        let thread = {
            let (port, set, shared) = (port.clone(), self.set.clone(), self.shared.clone());
            std::thread::Builder::new()
                .name(format!("nvmf-listen-{}", addr.port()))
                .spawn(move || accept_loop(socket, port, set, shared))
                .map_err(|source| NvmfError::Listen {
                    addr: opts.listen,
                    source,
                })?
        };
        tracing::info!(nqn = %opts.nqn, %addr, "nvme/tcp: listening");
        listeners.insert(
            addr,
            Listener {
                port,
                socket: wake,
                thread: Some(thread),
            },
        );
        Ok(sub)
    }

    /// The subsystem `nqn`.
    pub fn get(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.values().find_map(|l| l.port.find(nqn))
    }

    /// Every subsystem.
    pub fn list(&self) -> Vec<Arc<Subsystem>> {
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners
            .values()
            .flat_map(|l| {
                l.port
                    .subsystems
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            })
            .collect()
    }

    /// Stop exporting `nqn`: its connections finish the commands they
    /// started and close; the listener stops with its last subsystem.
    pub fn remove(&self, nqn: &str) -> Result<(), NvmfError> {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let Some((&key, sub)) = listeners
            .iter()
            .find_map(|(k, l)| l.port.find(nqn).map(|s| (k, s)))
        else {
            return Err(NvmfError::NotFound(nqn.into()));
        };
        sub.removed.store(true, Ordering::SeqCst);
        let empty = {
            let l = &listeners[&key];
            let mut subs = l.port.subsystems.write().unwrap_or_else(|e| e.into_inner());
            subs.retain(|s| !Arc::ptr_eq(s, &sub));
            l.port.generation.fetch_add(1, Ordering::SeqCst);
            subs.is_empty()
        };
        if empty {
            if let Some(mut l) = listeners.remove(&key) {
                l.port.stop.store(true, Ordering::SeqCst);
                // Wake the accept loop so it sees the stop: shutdown(2)
                // ends a blocked accept(2) on Linux. (A connection to the
                // listener woke it before, but not once its address was
                // gone from the host: the join below waited for ever,
                // holding this lock, and every export call after it.)
                use std::os::fd::AsRawFd;
                // SAFETY: shutdown(2) on a descriptor this listener owns.
                if unsafe { libc::shutdown(l.socket.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
                    let e = std::io::Error::last_os_error();
                    tracing::warn!(addr = %l.port.addr, error = %e, "nvme/tcp: waking the listener");
                    let _ =
                        std::net::TcpStream::connect_timeout(&l.port.addr, Duration::from_secs(1));
                }
                if let Some(t) = l.thread.take() {
                    let _ = t.join();
                }
            }
        }
        drop(listeners);
        // Wake every reactor so idle connections see the removal, then
        // wait (bounded) for them to close: the volume may be deleted next.
        let deadline = std::time::Instant::now() + CLOSE_WAIT;
        while sub.connections() > 0
            && !self.set.is_stopped()
            && std::time::Instant::now() < deadline
        {
            for core in 0..self.set.len() {
                let _ = self.set.send(core, Box::new(|_| {}));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if sub.connections() > 0 && !self.set.is_stopped() {
            tracing::warn!(
                nqn,
                connections = sub.connections(),
                "nvme/tcp: connections still closing"
            );
        }
        Ok(())
    }

    /// Keep at most `n` connections open per listener (new ones beyond are
    /// closed at once).
    pub fn set_max_connections(&self, n: usize) {
        self.shared.max_connections.store(n, Ordering::SeqCst);
    }

    /// Stop every export.
    pub fn shutdown(&self) {
        for s in self.list() {
            let _ = self.remove(&s.opts.nqn);
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn check(o: &SubsystemOptions) -> Result<(), NvmfError> {
    let bad = |field, reason: &str| {
        Err(NvmfError::Invalid {
            field,
            reason: reason.into(),
        })
    };
    if !nvmf::capsule::valid_nqn(&o.nqn) || o.nqn == nvmf::capsule::DISCOVERY_NQN {
        return bad(
            "nqn",
            "must start with \"nqn.\", be at most 223 printable ASCII characters and not be the discovery NQN",
        );
    }
    if let Some(h) = o.hosts.iter().find(|h| !nvmf::capsule::valid_nqn(h)) {
        return Err(NvmfError::Invalid {
            field: "hosts",
            reason: format!("{h:?} is not an NQN"),
        });
    }
    if o.serial.len() > 20 || !o.serial.bytes().all(|c| c.is_ascii_graphic() || c == b' ') {
        return bad("serial", "at most 20 printable ASCII characters");
    }
    Ok(())
}

/// A stable NGUID for `key` (an export's volume and NQN): four CRC32Cs
/// with different seeds, marked as an RFC 9562 version-8 UUID.
pub fn stable_nguid(key: &str) -> [u8; 16] {
    let mut g = [0u8; 16];
    for (i, chunk) in g.chunks_mut(4).enumerate() {
        let c = crc32c::crc32c_append(0x9e37_79b9u32.wrapping_mul(i as u32 + 1), key.as_bytes());
        chunk.copy_from_slice(&c.to_be_bytes());
    }
    g[6] = (g[6] & 0x0f) | 0x80;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

/// One connection counted against its listener's limit until dropped
/// (with the connection, or with the message that was to start it).
pub(super) struct LiveSlot(Arc<Port>, Arc<TargetShared>);

impl LiveSlot {
    fn take(port: &Arc<Port>, shared: &Arc<TargetShared>, max: usize) -> Option<LiveSlot> {
        if port.live.fetch_add(1, Ordering::SeqCst) >= max {
            port.live.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        shared.live.fetch_add(1, Ordering::SeqCst);
        Some(LiveSlot(port.clone(), shared.clone()))
    }
}

impl Drop for LiveSlot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
        self.1.live.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(socket: TcpListener, port: Arc<Port>, set: ReactorSet, shared: Arc<TargetShared>) {
    for stream in socket.incoming() {
        if port.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "nvme/tcp: accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = stream.peer_addr().ok();
        let max = shared.max_connections.load(Ordering::SeqCst);
        // Counted here, not when its reactor takes it: a burst of
        // connections all passed the check before any was counted.
        let Some(live) = LiveSlot::take(&port, &shared, max) else {
            tracing::warn!(?peer, listen = %port.addr, "nvme/tcp: too many connections; this one is closed");
            drop(stream);
            continue;
        };
        let slot = match peer {
            Some(p) => match port.peers.take(p.ip(), max) {
                Some(slot) => Some(slot),
                None => {
                    tracing::warn!(?peer, listen = %port.addr, "nvme/tcp: this host holds its share of the connections; this one is closed");
                    drop(stream);
                    continue;
                }
            },
            None => None,
        };
        if let Err(e) = stream
            .set_nonblocking(true)
            .and_then(|_| stream.set_nodelay(true))
        {
            tracing::warn!(error = %e, ?peer, "nvme/tcp: connection setup failed");
            continue;
        }
        let cores = set.len().max(1);
        let core = shared.next_core.fetch_add(1, Ordering::Relaxed) % cores;
        let (port, shared) = (port.clone(), shared.clone());
        let msg = Box::new(move |ctx: &mut poller::Ctx| {
            conn::start(ctx, stream, port, shared, slot, live)
        });
        if set.send(core, msg).is_err() {
            tracing::warn!(
                ?peer,
                "nvme/tcp: the reactors are stopped; connection dropped"
            );
        }
    }
}
