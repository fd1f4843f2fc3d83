//! vhost-user-blk exports: a unix socket per export, the protocol on a
//! control thread, the virtqueues on the reactors.

mod backend;
mod budget;
pub mod chain;
mod dirtylog;
mod error;
mod eventfd;
mod fault;
mod frontend;
mod inflight;
mod memory;
mod pieces;
mod queue;
pub mod request;
mod ring;
mod sigbus;
mod socket;
pub mod stats;
mod watchdog;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use poller::{QuiesceObject, ReactorSet};
use vhost::vhost_user::BackendReqHandler;

use crate::volume::Volume;
use backend::Handler;
pub use error::{ExportError, FrontendError, QueueError};
pub use request::{Limits, ID_BYTES};
pub use socket::SocketAccess;

/// Largest data segment, advertised as size_max.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest number of data segments, advertised as seg_max.
pub const SEG_MAX: u32 = 126;
pub use watchdog::FRONTEND_IO_TIMEOUT;

/// How long a queue's stop, a change of guest memory or an export's
/// creation waits for IO in flight, unless the options say otherwise.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How to export a volume.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Unix socket the VM's QEMU (or any vhost-user frontend) connects to.
    pub socket: PathBuf,
    /// Number of virtqueues (1..=64).
    pub num_queues: u16,
    /// Refuse writes, discards and write-zeroes.
    pub read_only: bool,
    /// GET_ID answer (at most 20 bytes).
    pub serial: String,
    /// Reactor for each queue, by queue index modulo its length; empty means
    /// queue i on reactor i modulo the reactor count.
    pub queue_cores: Vec<usize>,
    /// Bytes of guest memory the frontend may have mapped (it may also be
    /// pinned for DMA); 0: the host's physical memory.
    pub memory_limit: u64,
    /// Owner, group and mode of the socket.
    pub access: SocketAccess,
    /// Offer dirty logging (VHOST_F_LOG_ALL), so QEMU can live-migrate
    /// the VM. On by default: it costs nothing until a migration turns
    /// logging on (see docs/decisions.md); off, QEMU refuses to migrate.
    pub live_migration: bool,
    /// How long stopping a queue waits for its requests in flight, and a
    /// change of guest memory for the queues to drain; `None`: 30 s.
    pub drain_timeout: Option<Duration>,
}

impl ExportOptions {
    /// A writable export with `num_queues` queues on `socket`, no serial,
    /// queue i on reactor i.
    pub fn new(socket: PathBuf, num_queues: u16) -> ExportOptions {
        ExportOptions {
            socket,
            num_queues,
            read_only: false,
            serial: String::new(),
            queue_cores: vec![],
            memory_limit: 0,
            access: SocketAccess::default(),
            live_migration: true,
            drain_timeout: None,
        }
    }

    /// How long a stop or a change of guest memory waits for the queues.
    pub(crate) fn drain(&self) -> Duration {
        self.drain_timeout.unwrap_or(DRAIN_TIMEOUT)
    }

    /// The reactor of each queue as these options place them, of `cores`.
    pub fn placement(&self, cores: usize) -> Vec<usize> {
        (0..self.num_queues as usize)
            .map(|q| self.queue_core(q, cores))
            .collect()
    }

    fn queue_core(&self, queue: usize, cores: usize) -> usize {
        if self.queue_cores.is_empty() {
            queue % cores
        } else {
            self.queue_cores[queue % self.queue_cores.len()] % cores
        }
    }
}

/// What the control thread and the protocol handler share.
pub struct ExportShared {
    options: ExportOptions,
    volume: Volume,
    limits: Arc<Limits>,
    /// Guest memory of the current connection, changed only quiesced.
    memory: QuiesceObject<memory::GuestMap>,
    connected: AtomicBool,
    /// Being deleted without force: a frontend that connects now is let
    /// go at once (see `refuse_connections`). Held while `connected` is
    /// set, so the two decide one after the other.
    closing: Mutex<bool>,
    connections: AtomicU64,
    /// The connected frontend's backend request channel, if it set one up.
    frontend: Mutex<Option<frontend::FrontendChannel>>,
    /// Held by a notification from start to answer: the channel is out of
    /// `frontend` meanwhile, and a second notification must wait for it,
    /// not find it gone and skip its message.
    notifying: Mutex<()>,
    /// The connection (by `connections`) whose backend request channel
    /// failed a notification and was dropped: later notifications on it
    /// are refused, not taken for a frontend without a channel.
    channel_failed: AtomicU64,
    /// The capacity (in sectors) a frontend of this export last read from
    /// the configuration space; `u64::MAX`: none since the export was made.
    told: AtomicU64,
    /// The last connection [`ExportShared::tell_if_behind`] told, and
    /// whether it is telling one now.
    caught_up: AtomicU64,
    catching_up: AtomicBool,
    /// Per queue index; they outlive connections, so counts accumulate.
    stats: Vec<Arc<stats::IoStats>>,
    /// The reactor of each queue (moved at runtime by `move_queue`).
    cores: Mutex<Vec<usize>>,
    /// The current connection's protocol handler, for a change made from
    /// the API while it is connected.
    handler: Mutex<Option<std::sync::Weak<Mutex<Handler>>>>,
    /// A queue was moved at runtime: its reactor is the operator's choice.
    moved: AtomicBool,
    /// The current connection's fault signal, raised when its frontend
    /// broke something of its own: the control thread drops it.
    fault: Mutex<Arc<fault::FaultSignal>>,
    /// A second handle of the connected frontend's socket: a delete shuts
    /// it down, which ends a read or write the control thread is blocked in.
    conn: Mutex<Option<UnixStream>>,
    /// Since when the control thread waits on the frontend (the watchdog
    /// drops a connection that keeps it waiting too long).
    io_clock: watchdog::IoClock,
    /// Runners told to stop that did not within the drain time-out (their
    /// device holds requests): by queue index. Such a runner still
    /// answers into the guest's rings when its requests end, so its queue
    /// does not start again, on any connection, until it has stopped.
    lingering: Mutex<Vec<(u32, Arc<queue::QueueShared>)>>,
    /// A frontend of this export made one of our eventfd writes block:
    /// connections are refused for a while (see `eventfd::Cooldown`).
    cooldown: Arc<eventfd::Cooldown>,
}

impl ExportShared {
    /// The current connection's fault signal.
    pub(crate) fn fault(&self) -> Arc<fault::FaultSignal> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A frontend read `capacity` (sectors) from the configuration space.
    pub(crate) fn read_capacity(&self, capacity: u64) {
        self.told.store(capacity, Ordering::SeqCst);
    }

    /// Whether the connected frontend, with a backend channel, has read
    /// another capacity than the volume's now, and was not told of it on
    /// this connection.
    fn behind(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
            && self.told.load(Ordering::SeqCst) != self.volume.info().size_bytes() / request::SECTOR
            && self.caught_up.load(Ordering::SeqCst) != self.connections.load(Ordering::SeqCst)
            && self
                .frontend
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    /// Tell the connected frontend of a capacity it has not read, once per
    /// connection, when its ring runs: it read the configuration before
    /// a resize it was not told of (it was away then, or the daemon has
    /// restarted since), and QEMU reconnecting does not read it again, so
    /// its guest kept the old size until the VM restarted. (QEMU reads it
    /// again; some versions tell the guest only of a changed capacity,
    /// newer ones always, so a guest may see one needless configuration
    /// interrupt after a restart of the daemon.) On a thread of its own:
    /// the frontend reads the configuration from this export's thread
    /// before it answers. One at a time: a frontend reconnecting in a loop
    /// costs one thread, which looks again for a connection that came
    /// while it was at work.
    pub(crate) fn tell_if_behind(self: &Arc<Self>) {
        if !self.behind() || self.catching_up.swap(true, Ordering::SeqCst) {
            return;
        }
        // Not kept alive by the thread but while it talks: a deleted
        // export lets go of its volume and devices.
        let weak = Arc::downgrade(self);
        let name = format!("export:{}", self.options.socket.display());
        let spawned = std::thread::Builder::new()
            .name("vhost-told".into())
            .spawn(move || loop {
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                if shared.behind() {
                    let connection = shared.connections.load(Ordering::SeqCst);
                    let n = Notifier {
                        name: name.clone(),
                        shared: shared.clone(),
                    };
                    match n.config_changed() {
                        Ok(true) => tracing::info!(export = name, "frontend told of the capacity it had not read"),
                        // Its channel went meanwhile: the notification
                        // that took it tells the frontend.
                        Ok(false) => {}
                        Err(e) => tracing::warn!(export = name, error = %e, "telling the frontend of the capacity it had not read failed; its guest sees it once the frontend reads the configuration again"),
                    }
                    // Once per connection, whatever came of it: a frontend
                    // that does not read it again would be told at every
                    // ring start.
                    shared.caught_up.store(connection, Ordering::SeqCst);
                }
                shared.catching_up.store(false, Ordering::SeqCst);
                // A ring that started meanwhile found this thread at work.
                if !shared.behind() || shared.catching_up.swap(true, Ordering::SeqCst) {
                    return;
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the thread that tells a frontend of the capacity");
            self.catching_up.store(false, Ordering::SeqCst);
        }
    }

    /// The reactor queue `index` runs on.
    pub(crate) fn queue_core(&self, index: usize) -> usize {
        self.cores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(index)
            .copied()
            .unwrap_or(0)
    }
}

/// Tells an export's frontend that the configuration space changed.
pub struct Notifier {
    name: String,
    shared: Arc<ExportShared>,
}

impl Notifier {
    /// See [`Export::notify_config_change`].
    pub fn config_changed(&self) -> Result<bool, ExportError> {
        let _one_at_a_time = self
            .shared
            .notifying
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Out of the lock while talking: the export's thread takes it when
        // a connection ends or sets up its channel.
        let (connection, taken) = {
            let mut ch = self
                .shared
                .frontend
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !self.shared.connected.load(Ordering::SeqCst) {
                return Ok(false);
            }
            (self.shared.connections.load(Ordering::SeqCst), ch.take())
        };
        let Some(mut c) = taken else {
            if self.shared.channel_failed.load(Ordering::SeqCst) == connection {
                return Err(ExportError::Frontend {
                    export: self.name.clone(),
                    source: FrontendError::ChannelFailed,
                });
            }
            return Ok(false);
        };
        match c.config_changed() {
            Ok(()) => {
                // Back, unless the connection changed meanwhile.
                let mut ch = self
                    .shared
                    .frontend
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if ch.is_none()
                    && self.shared.connected.load(Ordering::SeqCst)
                    && self.shared.connections.load(Ordering::SeqCst) == connection
                {
                    *ch = Some(c);
                }
                Ok(true)
            }
            // A channel out of step (a late answer) is not used again, and
            // the notifications after it say so.
            Err(source) => {
                self.shared
                    .channel_failed
                    .store(connection, Ordering::SeqCst);
                Err(ExportError::Frontend {
                    export: self.name.clone(),
                    source,
                })
            }
        }
    }
}

/// A live export. Delete it with [`Export::delete`].
pub struct Export {
    name: String,
    shared: Arc<ExportShared>,
    shutdown: Arc<OwnedFd>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn eventfd() -> Result<OwnedFd, ExportError> {
    // SAFETY: plain syscall, result checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(ExportError::Os {
            what: "creating an eventfd".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn limits_for(volume: &Volume, opts: &ExportOptions) -> Limits {
    let info = volume.info();
    let mut serial = [0u8; ID_BYTES];
    serial[..opts.serial.len()].copy_from_slice(opts.serial.as_bytes());
    Limits {
        capacity_sectors: info.size_bytes() / request::SECTOR,
        block_size: info.block_size,
        // virtio-blk has no limit on a request's total size other than
        // seg_max x size_max, and a guest's segments are as large as its
        // pages make them (64 KiB ones on some): a guest may send all of
        // it, and what the device cannot take at once goes in pieces (an
        // NVMe member's 1 MiB gave seg_max 1 before, and a Linux guest one
        // page per request).
        max_transfer: SEG_MAX * SIZE_MAX,
        part_max: request::part_max(&info),
        size_max: SIZE_MAX,
        seg_max: SEG_MAX,
        // Also the write-zeroes limit; a RAID5 writes zeroes like data, so
        // it cannot take more at once than a write.
        max_discard_sectors: ((1u64 << 30).min(info.max_transfer as u64) / request::SECTOR) as u32,
        read_only: opts.read_only,
        discard: info.discard,
        write_zeroes: info.write_zeroes,
        flush: true,
        serial,
    }
}

impl Export {
    /// Export `volume` over vhost-user-blk on `opts.socket`. The volume is
    /// quiesced while the export attaches.
    pub fn create(
        set: &ReactorSet,
        volume: &Volume,
        opts: ExportOptions,
    ) -> Result<Export, ExportError> {
        if opts.num_queues == 0 || opts.num_queues > 64 {
            return Err(ExportError::InvalidArgument {
                field: "num_queues",
                reason: format!("must be 1..=64, got {}", opts.num_queues),
            });
        }
        if opts.serial.len() > ID_BYTES || !opts.serial.is_ascii() {
            return Err(ExportError::InvalidArgument {
                field: "serial",
                reason: format!("must be at most {ID_BYTES} ASCII bytes"),
            });
        }
        socket::check_socket_path(&opts.socket)?;
        let guard = volume.suspend(opts.drain())?;
        let listener = socket::bind_listening(&opts.socket, &opts.access).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                // Bound by someone else since it was checked.
                return ExportError::AlreadyExists(opts.socket.clone());
            }
            ExportError::Os {
                what: format!("binding {}", opts.socket.display()),
                source,
            }
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ExportError::Os {
                what: "making the listener non-blocking".into(),
                source,
            })?;
        let name = format!("export:{}", opts.socket.display());
        let opts_queues = opts.num_queues as usize;
        let opts_cores = opts.clone();
        let shared = Arc::new(ExportShared {
            limits: Arc::new(limits_for(volume, &opts)),
            memory: QuiesceObject::new(set, format!("{name}/memory"), memory::GuestMap::default()),
            options: opts,
            volume: volume.clone(),
            connected: AtomicBool::new(false),
            closing: Mutex::new(false),
            connections: AtomicU64::new(0),
            frontend: Mutex::new(None),
            notifying: Mutex::new(()),
            channel_failed: AtomicU64::new(0),
            told: AtomicU64::new(u64::MAX),
            caught_up: AtomicU64::new(0),
            catching_up: AtomicBool::new(false),
            stats: (0..opts_queues)
                .map(|_| Arc::new(stats::IoStats::default()))
                .collect(),
            cores: Mutex::new(
                (0..opts_queues)
                    .map(|q| opts_cores.queue_core(q, set.len()))
                    .collect(),
            ),
            handler: Mutex::new(None),
            moved: AtomicBool::new(false),
            fault: Mutex::new(Arc::new(fault::FaultSignal::new()?)),
            conn: Mutex::new(None),
            io_clock: watchdog::IoClock::default(),
            lingering: Mutex::new(Vec::new()),
            cooldown: Arc::default(),
        });
        watchdog::watch(&shared);
        let shutdown = Arc::new(eventfd()?);
        let (s2, sd2, set2) = (shared.clone(), shutdown.clone(), set.clone());
        let thread = std::thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || serve(listener, set2, s2, sd2))
            .map_err(|source| ExportError::Os {
                what: "spawning the export thread".into(),
                source,
            })?;
        drop(guard);
        tracing::info!(export = %name, volume = volume.name(), "export ready");
        Ok(Export {
            name,
            shared,
            shutdown,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// For the fuzz target: serve `stream` as a connection on this thread
    /// until it ends, exactly as an accepted one is served.
    #[doc(hidden)]
    pub fn fuzz_connection(&self, set: &ReactorSet, stream: UnixStream) {
        if let Ok(c) = stream.try_clone() {
            *self.shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
            self.shared.connections.fetch_add(1, Ordering::SeqCst);
        }
        let _ = serve_connection(stream, set, &self.shared, &self.shutdown);
    }

    /// For tests: as if a frontend of this export had made one of our
    /// eventfd writes block (the watchdog's part is tested on its own).
    #[doc(hidden)]
    pub fn strike_for_test(&self) {
        self.shared.cooldown.strike();
    }

    /// IO counters summed over the queues.
    pub fn stats(&self) -> stats::IoSnapshot {
        let mut s = stats::IoSnapshot::default();
        for q in &self.shared.stats {
            q.add_to(&mut s);
        }
        s.frontend_faults = self.shared.fault().count();
        s
    }

    /// Its name (derived from the socket path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether a frontend is connected.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// While the connected frontend logs dirty pages (a live migration
    /// is copying the guest): the page bits set in its log so far.
    pub fn dirty_log(&self) -> Option<u64> {
        let (_, map) = self.shared.memory.config();
        map.log.get().map(|l| l.counts().0)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Tell the connected frontend that the configuration space changed
    /// (the volume was resized), so it reads it again and the guest sees
    /// the new capacity. Ok(false): no frontend, or one without a backend
    /// request channel; a frontend that starts anew reads the new size,
    /// and one that comes back with a channel is told once its ring runs
    /// ([`ExportShared::tell_if_behind`]).
    /// Call it from a control thread other than the export's (the
    /// frontend asks the export for the new configuration before it
    /// answers).
    pub fn notify_config_change(&self) -> Result<bool, ExportError> {
        self.notifier().config_changed()
    }

    /// A handle that tells the frontend of a configuration change, usable
    /// after the caller let go of its own locks (the exchange can take up
    /// to 10 s with a slow or hostile frontend).
    pub fn notifier(&self) -> Notifier {
        Notifier {
            name: self.name.clone(),
            shared: self.shared.clone(),
        }
    }

    /// The connection's handler, while a frontend is connected.
    fn handler(&self) -> Option<Arc<Mutex<Handler>>> {
        self.shared
            .handler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|w| w.upgrade())
    }

    /// Writes the queues hold for the volume's suspended range now.
    pub fn parked_writes(&self) -> u64 {
        self.handler().map_or(0, |h| {
            h.lock().unwrap_or_else(|e| e.into_inner()).parked_writes()
        })
    }

    /// Queues whose stop was left to linger (their device held requests
    /// past the drain time-out) and whose runner has not stopped yet: no
    /// ring index can be given for them before.
    pub fn lingering_queues(&self) -> usize {
        self.shared
            .lingering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, r)| r.wait_stopped(Duration::ZERO).is_none())
            .count()
    }

    /// Whether a queue was moved at runtime.
    pub fn queues_moved(&self) -> bool {
        self.shared.moved.load(Ordering::SeqCst)
    }

    /// The reactor each queue runs on.
    pub fn queue_cores(&self) -> Vec<usize> {
        self.shared
            .cores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Move queue `queue` to reactor `core` (of `reactors`), as one
    /// change: a running queue stops taking requests and drains the ones
    /// in flight (its quiesce), the core changes, and it starts again on
    /// the new reactor from where it stopped; a queue not running yet
    /// starts there when the frontend starts it. Nothing is lost or
    /// answered twice: the ring position carries over.
    pub fn move_queue(&self, queue: u16, core: usize, reactors: usize) -> Result<(), ExportError> {
        let n = self.shared.options.num_queues;
        if queue >= n {
            return Err(ExportError::InvalidArgument {
                field: "queue",
                reason: format!("the export has queues 0..{n}"),
            });
        }
        if core >= reactors {
            return Err(ExportError::InvalidArgument {
                field: "core",
                reason: format!("reactor {core} does not exist (reactors 0..{reactors})"),
            });
        }
        let handler = self.handler();
        self.shared.moved.store(true, Ordering::SeqCst);
        let Some(handler) = handler.filter(|_| self.is_connected()) else {
            self.shared.cores.lock().unwrap_or_else(|e| e.into_inner())[queue as usize] = core;
            return Ok(());
        };
        let mut h = handler.lock().unwrap_or_else(|e| e.into_inner());
        let _held = watchdog::held_elsewhere(&self.shared);
        h.move_queue(queue as u32, core)
            .map_err(|e| ExportError::Busy(self.name.clone(), format!("moving queue {queue}: {e}")))
    }

    /// Delete the export. With a frontend connected this is refused unless
    /// `force`; forced, in-flight IO drains and the frontend is
    /// disconnected. After a refusal the export goes on serving.
    pub fn delete(&self, force: bool) -> Result<(), ExportError> {
        if !force {
            self.refuse_connections()?;
        }
        self.shutdown_thread();
        Ok(())
    }

    /// Let no frontend connect from now on, unless one is connected
    /// already (refused then, the export serving on): a delete without
    /// force checked and tore down in two steps, and a VM that connected
    /// in between was cut off (audit). A frontend connecting meanwhile is
    /// either seen here or let go at once, never both (one lock).
    pub fn refuse_connections(&self) -> Result<(), ExportError> {
        let mut closing = self
            .shared
            .closing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.is_connected() {
            return Err(ExportError::Connected(self.name.clone()));
        }
        *closing = true;
        Ok(())
    }

    fn shutdown_thread(&self) {
        let one = 1u64;
        // SAFETY: 8-byte write to our eventfd.
        unsafe { libc::write(self.shutdown.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(c) = &*self.shared.conn.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
            let _ = std::fs::remove_file(&self.shared.options.socket);
            // The guest memory object goes too: every reactor drops its
            // gate, and with it its view of the guest's memory. Runners
            // whose device still holds requests hold it: it goes once they
            // have stopped (given up after a wait, the guest's whole
            // memory stayed mapped and pinned after its VM was gone).
            let lingering: Vec<Arc<queue::QueueShared>> = self
                .shared
                .lingering
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(_, r)| r.clone())
                .filter(|r| r.wait_stopped(Duration::ZERO).is_none())
                .collect();
            if lingering.is_empty() {
                release(&self.name, &self.shared.memory);
            } else {
                release_after(&self.name, self.shared.memory.clone(), lingering);
            }
        }
    }
}

/// Let an export's guest memory go: the map a frontend's disconnect may
/// not have replaced (the object keeps its last one; runners held it),
/// then the gates.
fn release(name: &str, memory: &QuiesceObject<memory::GuestMap>) {
    let emptied = memory
        .reconfigure(Duration::from_secs(10), |_| {
            Ok::<_, String>((memory::GuestMap::default(), ()))
        })
        .map_err(|e| e.to_string());
    let removed = memory
        .remove(Duration::from_secs(10))
        .map_err(|e| e.to_string());
    if let Err(e) = emptied.and(removed) {
        tracing::warn!(export = %name, error = %e, "releasing guest memory");
    }
}

/// Remove an export's guest memory once `runners` (whose devices hold
/// requests) have stopped, on a thread of its own.
fn release_after(
    name: &str,
    memory: QuiesceObject<memory::GuestMap>,
    runners: Vec<Arc<queue::QueueShared>>,
) {
    tracing::warn!(export = %name, queues = runners.len(), "the guest memory is released once the queues whose devices hold requests have stopped");
    let name = name.to_string();
    let spawned = std::thread::Builder::new()
        .name("export-release".into())
        .spawn(move || {
            for r in &runners {
                while r.wait_stopped(Duration::from_secs(1)).is_none() {}
            }
            release(&name, &memory);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "no thread to release guest memory later: it stays mapped");
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.shutdown_thread();
    }
}

/// What woke the control thread.
#[derive(PartialEq)]
enum Woke {
    /// The socket is readable.
    Readable,
    /// The export is being deleted.
    Shutdown,
    /// The frontend broke something of its own.
    Fault,
}

/// Wait until `fd` is readable, shutdown is signalled or (with `fault`)
/// the frontend faulted.
fn wait_readable(fd: RawFd, shutdown: RawFd, fault: Option<RawFd>) -> Woke {
    let pfd = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [pfd(fd), pfd(shutdown), pfd(fault.unwrap_or(-1))];
    loop {
        // SAFETY: valid array of three pollfds (a negative fd is ignored).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Woke::Shutdown;
        }
        return if fds[1].revents != 0 {
            Woke::Shutdown
        } else if fds[2].revents != 0 {
            Woke::Fault
        } else {
            Woke::Readable
        };
    }
}

/// Accept connections one after another (a reconnect gets a fresh protocol
/// state) until shutdown.
fn serve(
    listener: UnixListener,
    set: ReactorSet,
    shared: Arc<ExportShared>,
    shutdown: Arc<OwnedFd>,
) {
    loop {
        if wait_readable(listener.as_raw_fd(), shutdown.as_raw_fd(), None) == Woke::Shutdown {
            return;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::error!(error = %e, "accepting a vhost-user connection");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let configured = stream
            .set_nonblocking(false)
            .and_then(|()| stream.try_clone());
        match configured {
            Ok(c) => {
                // Counted under the same lock the watchdog checks it in.
                let mut conn = shared.conn.lock().unwrap_or_else(|e| e.into_inner());
                *conn = Some(c);
                shared.connections.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::error!(error = %e, "configuring a vhost-user connection");
                continue;
            }
        }
        if serve_connection(stream, &set, &shared, &shutdown) {
            return;
        }
    }
}

/// Serve one connection until the frontend goes, its fault drops it, or
/// the export shuts down (true).
fn serve_connection(
    stream: UnixStream,
    set: &ReactorSet,
    shared: &Arc<ExportShared>,
    shutdown: &OwnedFd,
) -> bool {
    // A fault of the previous connection is not this one's: a signal of
    // its own (runners of the last one may still finish into memory its
    // frontend truncated, and raise theirs).
    let fault = {
        let mut current = shared.fault.lock().unwrap_or_else(|e| e.into_inner());
        match current.next() {
            Ok(f) => *current = Arc::new(f),
            Err(e) => {
                tracing::warn!(error = %e, "no fault signal of its own for a connection: it shares the last one's");
                current.take();
            }
        }
        current.clone()
    };
    {
        let closing = shared.closing.lock().unwrap_or_else(|e| e.into_inner());
        if *closing {
            // The export is being deleted without force (see
            // `refuse_connections`): this frontend is let go.
            drop(closing);
            *shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
            tracing::info!(socket = %shared.options.socket.display(), "a frontend connected to an export being deleted: let go");
            return false;
        }
        if let Some((left, first)) = shared.cooldown.refuse() {
            drop(closing);
            *shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
            if first {
                tracing::warn!(socket = %shared.options.socket.display(), refused_for_s = left.as_secs(), "a frontend of this export made our writes to its eventfds block: its connections are refused for a while");
            }
            return false;
        }
        shared.connected.store(true, Ordering::SeqCst);
    }
    // The protocol's log lines name their socket: two frontends of one
    // volume (a live migration) interleave. (Reactor threads log without
    // it.)
    let span = tracing::info_span!("vhost", socket = %shared.options.socket.display());
    let _entered = span.enter();
    tracing::info!("vhost-user frontend connected");
    let handler = Arc::new(Mutex::new(Handler::new(set.clone(), shared.clone())));
    *shared.handler.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(&handler));
    let mut conn = BackendReqHandler::from_stream(stream, handler.clone());
    let stop = loop {
        match wait_readable(conn.as_raw_fd(), shutdown.as_raw_fd(), Some(fault.raw_fd())) {
            Woke::Readable => {}
            Woke::Shutdown => break true,
            Woke::Fault => {
                if fault.take() {
                    tracing::warn!(
                        "dropping a vhost-user frontend that broke its queue or its memory"
                    );
                    break false;
                }
                continue;
            }
        }
        let (backend_req, reply_ack) = {
            let mut h = handler.lock().unwrap_or_else(|e| e.into_inner());
            h.set_asks_reply(frontend::next_asks_reply(conn.as_raw_fd()));
            (h.backend_req(), h.reply_ack())
        };
        if backend_req {
            if let Some(ch) = frontend::peek_backend_channel(conn.as_raw_fd(), reply_ack) {
                *shared.frontend.lock().unwrap_or_else(|e| e.into_inner()) = Some(ch);
            }
        }
        let answered = frontend::next_needs_answer(conn.as_raw_fd());
        shared
            .io_clock
            .start(shared.connections.load(Ordering::SeqCst));
        let handled = conn.handle_request();
        shared.io_clock.stop();
        if let Err(e) = handled {
            match e {
                // Our handler refused one request; the frontend got the
                // failure (REPLY_ACK) and the connection goes on.
                vhost::vhost_user::Error::InvalidParam
                | vhost::vhost_user::Error::InvalidOperation(_)
                    if !answered =>
                {
                    continue;
                }
                // A request the frontend waits for an answer to failed, and
                // the crate sends no answer then: QEMU would wait for good
                // (holding its main loop). Closing tells it at once.
                vhost::vhost_user::Error::InvalidParam
                | vhost::vhost_user::Error::InvalidOperation(_) => {
                    tracing::warn!(error = %e, "a vhost-user request that must be answered failed: the connection closes");
                }
                vhost::vhost_user::Error::Disconnected
                | vhost::vhost_user::Error::PartialMessage => {
                    tracing::info!("vhost-user frontend disconnected");
                }
                e => tracing::warn!(error = %e, "vhost-user connection closed after an error"),
            }
            break false;
        }
    };
    handler
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .disconnect();
    *shared.frontend.lock().unwrap_or_else(|e| e.into_inner()) = None;
    *shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    drop(conn);
    shared.connected.store(false, Ordering::SeqCst);
    stop
}
