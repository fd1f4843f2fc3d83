//! The daemon's inventory (attached devices, volumes and exports) and every
//! operator change to it. The gRPC service and the start-up restore both
//! come through here, so one set of checks guards every path.
//!
//! Locking: the inventory's lock is held only for short looks and
//! inserts, never across a quiesce or device IO, so a stuck volume holds
//! up nobody but its own callers. A RAID volume's changes go through its
//! monitor's one transaction (`raid::transaction`), which serializes them
//! per volume; different volumes change in parallel. Device roles live in
//! one register (`roles`), claimed inside those transactions. The state
//! file is written by the transaction that changes what it says, after the
//! superblocks and before the new generation is published.

mod assemble;
mod changes;
mod delete;
mod devices;
mod exports;
mod import;
mod inventory;
mod lifecycle;
mod nvmf;
mod reload;
mod roles;
mod statefile;
mod unavailable;
mod unserved;
mod views;
mod volumes;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bdev::BlockDevice;
use poller::{QuiesceError, ReactorSet, SuspendGuard};

use crate::config::{DeviceDecl, ExportDecl, VolumeDecl};
use crate::export::{Export, ExportError};
use crate::raid::members::MemberState;
use crate::raid::monitor::{Monitor, OpError};
use crate::volume::Volume;
use inventory::Inventory;

pub use nvmf::NvmfExportView;
pub use reload::ReloadReport;
pub use roles::RoleBook;
pub use unavailable::UnavailableView;

/// How long a change waits for a volume's IO to drain, by default.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a change was refused; nothing changed. The variants are the gRPC
/// status codes they become.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MgmtError {
    /// A field of the request is wrong.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The state does not allow the change.
    #[error("{0}")]
    FailedPrecondition(String),
    /// IO did not drain in time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The caller may not name this (a path outside the allowed directories).
    #[error("{0}")]
    PermissionDenied(String),
    /// Not enough of something the machine has (memory for RAM devices).
    #[error("{0}")]
    ResourceExhausted(String),
    /// Something outside the daemon that the call needs does not answer
    /// (a remote target): worth trying again later.
    #[error("{0}")]
    Unavailable(String),
    /// Something below failed.
    #[error("{0}")]
    Internal(String),
}

impl MgmtError {
    /// The same error, its message after `what` (what was done before
    /// the step that failed).
    pub(crate) fn after(self, what: &str) -> MgmtError {
        self.reworded(|m| format!("{what}; {m}"))
    }

    /// The same error, `also` (what else came of it) after its message.
    pub(crate) fn also(self, also: &str) -> MgmtError {
        self.reworded(|m| format!("{m}; {also}"))
    }

    /// The same kind of error, its message `with(message)`.
    fn reworded(self, with: impl FnOnce(String) -> String) -> MgmtError {
        match self {
            MgmtError::InvalidArgument { field, reason } => MgmtError::InvalidArgument {
                field,
                reason: with(reason),
            },
            MgmtError::NotFound(m) => MgmtError::NotFound(with(m)),
            MgmtError::AlreadyExists(m) => MgmtError::AlreadyExists(with(m)),
            MgmtError::FailedPrecondition(m) => MgmtError::FailedPrecondition(with(m)),
            MgmtError::DeadlineExceeded(m) => MgmtError::DeadlineExceeded(with(m)),
            MgmtError::PermissionDenied(m) => MgmtError::PermissionDenied(with(m)),
            MgmtError::ResourceExhausted(m) => MgmtError::ResourceExhausted(with(m)),
            MgmtError::Unavailable(m) => MgmtError::Unavailable(with(m)),
            MgmtError::Internal(m) => MgmtError::Internal(with(m)),
        }
    }
}

/// Why a restore stopped: the part of the configuration that failed and
/// the call's own error.
#[derive(Debug, thiserror::Error)]
#[error("{part}: {source}")]
pub struct RestoreError {
    /// "device d0", "volume vol0", "export e0" or "state file".
    pub part: String,
    /// What the call bringing it up said.
    pub source: MgmtError,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> MgmtError {
    MgmtError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

fn from_quiesce(what: &str, e: QuiesceError) -> MgmtError {
    match e {
        e if e.is_deadline() => MgmtError::DeadlineExceeded(format!("{what}: {e}")),
        // Its volume was deleted meanwhile, or the daemon is stopping.
        QuiesceError::NotFound(_) => MgmtError::NotFound(format!("{what}: {e}")),
        QuiesceError::Stopped(_) => MgmtError::Unavailable(format!("{what}: {e}")),
        e => MgmtError::Internal(format!("{what}: {e}")),
    }
}

fn from_op(volume: &str, e: OpError) -> MgmtError {
    match e {
        OpError::NotFound(d) => MgmtError::FailedPrecondition(format!(
            "device {d} is not a member or spare of volume {volume}"
        )),
        OpError::AlreadyExists(d) => {
            MgmtError::AlreadyExists(format!("device {d} is already part of volume {volume}"))
        }
        OpError::FailedPrecondition(m) => MgmtError::FailedPrecondition(format!("{volume}: {m}")),
        OpError::DeadlineExceeded(m) => MgmtError::DeadlineExceeded(format!("{volume}: {m}")),
        OpError::Internal(m) => MgmtError::Internal(format!("{volume}: {m}")),
        OpError::Gone(m) => {
            MgmtError::NotFound(format!("volume {volume} was deleted meanwhile: {m}"))
        }
        // A call that reached the volume as the daemon's stop closed it
        // (audit: it said FailedPrecondition, a refusal of the call).
        OpError::Stopped(m) => {
            MgmtError::Unavailable(format!("{volume}: {m} (the daemon is stopping)"))
        }
    }
}

fn from_export(e: ExportError) -> MgmtError {
    match e {
        ExportError::InvalidArgument { field, reason } => invalid(field, reason),
        ExportError::AlreadyExists(_) => MgmtError::AlreadyExists(e.to_string()),
        // The frontend is outside: what it did is not the daemon's fault.
        ExportError::Connected(_) | ExportError::Busy(..) | ExportError::Frontend { .. } => {
            MgmtError::FailedPrecondition(e.to_string())
        }
        ExportError::Quiesce(q) => from_quiesce("export", q),
        ExportError::Os { ref source, .. } => {
            // Mostly the socket path the caller named: its error is the
            // caller's to mend, not the daemon's (audit: all Internal).
            let m = e.to_string();
            match source.raw_os_error() {
                Some(libc::EACCES | libc::EPERM) => MgmtError::PermissionDenied(m),
                Some(libc::ENAMETOOLONG | libc::EINVAL) => MgmtError::InvalidArgument {
                    field: "socket",
                    reason: m,
                },
                Some(libc::ENOENT | libc::ENOTDIR | libc::EROFS | libc::ELOOP) => {
                    MgmtError::FailedPrecondition(m)
                }
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOSPC) => {
                    MgmtError::ResourceExhausted(m)
                }
                _ => MgmtError::Internal(m),
            }
        }
    }
}

/// A number the state file keeps: TOML integers are signed 64-bit, and
/// one larger value in a declaration would make every later save fail.
fn check_storable(field: &'static str, v: u64) -> Result<(), MgmtError> {
    if v > i64::MAX as u64 {
        return Err(invalid(
            field,
            format!(
                "{v} is above {}, the largest the state file holds",
                i64::MAX
            ),
        ));
    }
    Ok(())
}

/// md's write-behind limit: 1..=16383 (md's COUNTER_MAX / 2).
fn check_write_behind(limit: u32) -> Result<(), MgmtError> {
    let most = crate::raid::md::bitmap::MAX_WRITE_BEHIND;
    if !(1..=most).contains(&limit) {
        return Err(invalid(
            "write_behind",
            format!("{limit} is not in 1..={most} (0 turns it off)"),
        ));
    }
    Ok(())
}

/// A bitmap region size in KiB: 0 (the default) or a power of two from
/// 64 KiB to 4 GiB.
fn check_bitmap_chunk(kib: u32) -> Result<(), MgmtError> {
    // md's bitmap chunk is a 32-bit byte count: 2 GiB is the largest
    // power of two (4 GiB was taken, used as 2 GiB, and kept as asked).
    if kib != 0 && (!kib.is_power_of_two() || !(64..=2 << 20).contains(&kib)) {
        return Err(invalid(
            "bitmap_chunk_kib",
            format!("{kib} is not a power of two from 64 (64 KiB) to 2097152 (2 GiB)"),
        ));
    }
    Ok(())
}

/// Bytes of a bitmap region of `kib` KiB (0: md's default, 64 MiB).
fn bitmap_chunk_bytes(kib: u32) -> u64 {
    if kib == 0 {
        crate::raid::bitmap::DEFAULT_CHUNK_BYTES
    } else {
        kib as u64 * 1024
    }
}

/// 16 bytes (a UUID, an NGUID) as 32 lower-case hex digits.
fn hex(g: &[u8; 16]) -> String {
    g.iter().map(|b| format!("{b:02x}")).collect()
}

/// The serial a disk shows when none is given: its volume's name, the same
/// through every export of it; a name longer than the 20 bytes a serial
/// holds is its first 12 and a hash of the whole (cut to 20, two volumes
/// whose names shared those were one serial in one guest: review).
fn default_serial(volume: &str) -> String {
    if volume.len() <= 20 {
        return volume.to_string();
    }
    let head: String = volume.chars().take(12).collect();
    format!(
        "{head}-{:07x}",
        crc32c::crc32c(volume.as_bytes()) & 0x0fff_ffff
    )
}

/// Names of devices, volumes and exports: safe in paths, logs and tables.
fn check_name(field: &'static str, name: &str) -> Result<(), MgmtError> {
    if name.is_empty() || name.len() > 32 {
        return Err(invalid(field, format!("{name:?} must be 1..=32 bytes")));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        || name.starts_with('.')
    {
        return Err(invalid(
            field,
            format!("{name:?} may hold only A-Z a-z 0-9 . _ - and not start with ."),
        ));
    }
    Ok(())
}

/// Devices in order.
type Devices = Vec<Arc<dyn BlockDevice>>;

/// Volume levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// One device, no redundancy, no superblock.
    Single,
    /// Mirror.
    Raid1,
    /// Distributed parity.
    Raid5,
}

impl Level {
    /// Parse the configuration name.
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "single" => Some(Level::Single),
            "raid1" => Some(Level::Raid1),
            "raid5" => Some(Level::Raid5),
            _ => None,
        }
    }

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            Level::Single => "single",
            Level::Raid1 => "raid1",
            Level::Raid5 => "raid5",
        }
    }
}

/// A device as listed.
#[derive(Debug, Clone)]
pub struct DeviceView {
    /// How it was attached.
    pub decl: DeviceDecl,
    /// Its size in blocks.
    pub num_blocks: u64,
    /// "" when free, else "volume NAME" or "spare of NAME".
    pub used_by: String,
    /// "ok", "failed", "rebuilding", or "missing" (named by the saved
    /// state, not found at the start).
    pub health: &'static str,
    /// Errors, time-outs, aborts and resets the device counted.
    pub errors: bdev::ErrorCounts,
}

/// A rebuild or scrub as shown.
#[derive(Debug, Clone)]
pub struct ProgressView {
    /// "rebuild" or "scrub".
    pub kind: &'static str,
    /// 0..=1.
    pub fraction: f64,
    /// Seconds left at the rate so far.
    pub eta_seconds: f64,
    /// Whether it ended.
    pub finished: bool,
    /// Why it failed, or "".
    pub error: String,
    /// Parity or mirror mismatches found (scrub).
    pub mismatches: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Rate limit (0: none).
    pub max_bytes_per_sec: u64,
    /// The rate it yields to while guest IO runs (0: it does not yield).
    pub min_bytes_per_sec: u64,
}

/// A journal as a volume view shows it.
#[derive(Debug, Clone, Copy)]
pub struct JournalState {
    /// Write-through or write-back.
    pub mode: crate::raid::journal::JournalMode,
    /// How full its log is (0..=1).
    pub fill: f64,
    /// Write-back blocks acknowledged and not on the members yet.
    pub cached_blocks: u64,
    /// Blocks of memory the write-back cache holds: whole records, so at
    /// least `cached_blocks`, more while a record is partly overwritten.
    pub held_blocks: u64,
    /// Whether its device failed (the volume then goes on without it).
    pub failed: bool,
    /// Failed, and the state file names it no more: the writes made
    /// without it are answered (until then they wait).
    pub given_up: bool,
}

/// A volume as described.
#[derive(Debug, Clone)]
pub struct VolumeView {
    /// Name.
    pub name: String,
    /// Level.
    pub level: Level,
    /// "optimal", "degraded" or "failed".
    pub state: &'static str,
    /// Capacity.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// RAID5 chunk in KiB (0 otherwise).
    pub chunk_kib: u32,
    /// RAID5 layout ("" otherwise).
    pub layout: String,
    /// (device, state) by slot.
    pub members: Vec<(String, &'static str)>,
    /// IOs that failed on each slot's device while in the slot.
    pub member_errors: Vec<u64>,
    /// Members marked write-mostly.
    pub write_mostly: Vec<String>,
    /// Spare device names.
    pub spares: Vec<String>,
    /// The running or last rebuild or scrub.
    pub progress: Option<ProgressView>,
    /// Configuration generation.
    pub generation: u64,
    /// Exports of this volume.
    pub exports: Vec<String>,
    /// Its quiesce epochs so far.
    pub quiesce: poller::QuiesceStats,
    /// Its journal device.
    pub journal: Option<String>,
    /// The journal's mode, log fill, cache and health.
    pub journal_state: Option<JournalState>,
    /// What the journal has written and checkpointed so far.
    pub journal_counts: Option<crate::raid::journal::JournalCounts>,
    /// How the volume stays consistent after an unclean shutdown (md's
    /// consistency_policy): "resync" (the whole volume), "bitmap" (the
    /// regions the write-intent bitmap marks), "journal", or "none".
    pub consistency_policy: &'static str,
    /// The write-intent bitmap: bytes of each member per region, regions,
    /// regions marked dirty now.
    pub bitmap: Option<(u64, u64, u64)>,
    /// The byte range whose writes are held (md's suspend_lo/hi).
    pub suspended: Option<(u64, u64)>,
    /// RAID1: md's serialize_policy is on.
    pub serialize: bool,
    /// RAID1: md's write-behind limit (0: off) and the writes in the
    /// background now.
    pub write_behind: (u64, u64),
    /// Suspended as a whole by an operator (dm's suspend).
    pub suspended_whole: bool,
    /// A suspend holds it now (a change waiting for its IO to drain, or
    /// the operator's).
    pub quiescing: bool,
    /// Changes waiting to be applied (events that hit a deadline).
    pub pending_changes: usize,
    /// Its IO limits.
    pub qos: crate::qos::QosLimits,
}

/// An export as listed.
#[derive(Debug, Clone)]
pub struct ExportView {
    /// How it was created.
    pub decl: ExportDecl,
    /// Whether a frontend is connected.
    pub connected: bool,
    /// Connections accepted so far.
    pub connections: u64,
    /// While the frontend logs dirty pages (live migration): the pages
    /// logged so far.
    pub dirty_log: Option<u64>,
}

/// Whole-daemon health.
#[derive(Debug, Clone)]
pub struct Health {
    /// "ok" or "degraded".
    pub status: &'static str,
    /// What is wrong.
    pub problems: Vec<String>,
}

fn state_name(s: MemberState) -> &'static str {
    match s {
        MemberState::InSync => "in_sync",
        MemberState::Rebuilding => "rebuilding",
        MemberState::Failed => "failed",
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Dev {
    decl: DeviceDecl,
    dev: Arc<dyn BlockDevice>,
    /// What storage it is, as found at attach
    /// ([`crate::devspec::resolved_identity`]).
    identity: Option<String>,
    /// Its specification's storage keys as found at attach
    /// ([`crate::devspec::storage_keys`]): what a new spec is compared
    /// with, never worked out again under the inventory's lock (a file on
    /// a mount that stopped answering hung every call).
    keys: Vec<String>,
}

/// A volume in the inventory.
struct Vol {
    volume: Volume,
    /// RAID volumes only.
    monitor: Option<Monitor>,
    /// What the state file says of it, kept current by every change.
    decl: Arc<Mutex<VolumeDecl>>,
    /// Serializes the changes its monitor does not make (range holds,
    /// whole-volume suspend, a single device's resize, deletion).
    busy: Mutex<()>,
    /// An operator's whole-volume suspend (dm's suspend), until resumed.
    held: Mutex<Option<SuspendGuard>>,
    /// Being deleted: no new export.
    deleting: AtomicBool,
    /// One bitmap change at a time: each writes the region size asked for
    /// into the declaration before its transaction (the transaction's
    /// save keeps it) and puts the old one back if that fails; two at once
    /// could put back a size over the other's bitmap.
    bitmap_calls: Mutex<()>,
}

impl Vol {
    fn level(&self) -> Level {
        Level::parse(&lock(&self.decl).level).unwrap_or(Level::Single)
    }
}

struct Exp {
    decl: ExportDecl,
    export: Export,
    /// Its socket's path with the directory resolved (`exports::socket_key`).
    socket_key: std::path::PathBuf,
}

impl Exp {
    /// Its declaration as it runs: once a queue was moved at runtime,
    /// every queue's reactor as it is now.
    fn decl(&self) -> ExportDecl {
        ExportDecl {
            queue_cores: if self.export.queues_moved() {
                self.export.queue_cores()
            } else {
                self.decl.queue_cores.clone()
            },
            ..self.decl.clone()
        }
    }
}

/// What the manager and its volumes' hooks share.
struct Shared {
    set: ReactorSet,
    inv: Mutex<Inventory>,
    roles: RoleBook,
    state_file: Option<PathBuf>,
    /// One save at a time, each of the whole inventory as it is then, so
    /// the file ends with the latest state; what saves keep between them.
    saving: Mutex<statefile::Saves>,
    /// Do not write the state file: while restoring (a half-restored state
    /// must never replace the full one) and once stopping.
    quiet: AtomicBool,
    /// Stopping: changes are refused.
    closed: AtomicBool,
    /// How long a change waits for a volume's IO to drain.
    timeout: Mutex<Duration>,
    /// Wraps every device attached (tests: fault injection that survives
    /// a restore).
    wrapper: Mutex<Option<DeviceWrapper>>,
    /// What a reload reads.
    config_file: Mutex<Option<PathBuf>>,
    /// One reload at a time.
    reloading: Mutex<()>,
    /// The daemon's stop has begun: calls still running (a reload's next
    /// step) are refused, before `closed` (set once the stop has saved).
    stopping: AtomicBool,
    /// Where `file:` devices may be; `None` (a library user's manager)
    /// allows any path. The daemon always sets it.
    allowed: Mutex<Option<crate::devpaths::AllowedPaths>>,
    /// The NVMe/TCP target (its listeners start with the first export).
    target: crate::nvmf::Target,
    /// The largest state file a new declaration may make (see
    /// `check_room`).
    state_limit: std::sync::atomic::AtomicUsize,
    /// The state file's problems as the health last saw them (see
    /// `save_problems`).
    save_problems: Mutex<Vec<String>>,
}

/// What [`Manager::set_device_wrapper`] takes.
pub type DeviceWrapper = Arc<dyn Fn(Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> + Send + Sync>;

impl Shared {
    /// Save the state; a failure is logged and reported, the change stands
    /// (it has happened on the devices already).
    fn save(&self) -> Result<(), MgmtError> {
        self.save_unless(false)
    }

    /// Save the state now, or say why it was not: also while the daemon
    /// starts or stops, when [`save`](Self::save) leaves it to the save
    /// at the end of that.
    fn save_now(&self) -> Result<(), MgmtError> {
        self.save_unless(true)
    }

    fn timeout(&self) -> Duration {
        *lock(&self.timeout)
    }
}

thread_local! {
    /// This thread applies a configuration file: a restore's or a
    /// reload's (see [`ApplyingFile`]).
    static APPLYING_FILE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While it lives, this thread applies a configuration file the daemon
/// read (at most `MAX_FILE`), not a caller's declarations one by one:
/// what it makes is not refused for room (`check_room`).
struct ApplyingFile(bool);

impl ApplyingFile {
    fn begin() -> ApplyingFile {
        ApplyingFile(APPLYING_FILE.with(|a| a.replace(true)))
    }
}

impl Drop for ApplyingFile {
    fn drop(&mut self) {
        APPLYING_FILE.with(|a| a.set(self.0));
    }
}

fn applying_file() -> bool {
    APPLYING_FILE.with(std::cell::Cell::get)
}

/// The inventory and its changes.
pub struct Manager {
    shared: Arc<Shared>,
}

impl Manager {
    /// An empty inventory served by `set`; changes are saved to
    /// `state_file` if given.
    pub fn new(set: &ReactorSet, state_file: Option<PathBuf>) -> Manager {
        Manager {
            shared: Arc::new(Shared {
                set: set.clone(),
                inv: Mutex::new(Inventory::default()),
                roles: RoleBook::default(),
                state_file,
                saving: Mutex::new(Default::default()),
                quiet: Default::default(),
                closed: Default::default(),
                timeout: Mutex::new(QUIESCE_TIMEOUT),
                wrapper: Mutex::new(None),
                config_file: Mutex::new(None),
                reloading: Mutex::new(()),
                stopping: AtomicBool::new(false),
                allowed: Mutex::new(None),
                target: crate::nvmf::Target::new(set),
                state_limit: statefile::STATE_LIMIT.into(),
                save_problems: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Wrap every device attached from now on (the restore's included) in
    /// what `wrap` returns: for tests that inject faults into a daemon's
    /// devices across restarts.
    pub fn set_device_wrapper(&self, wrap: DeviceWrapper) {
        *lock(&self.shared.wrapper) = Some(wrap);
    }

    /// Limit `file:` devices to these directories from now on (the restore's
    /// included).
    pub fn set_allowed_paths(&self, allowed: crate::devpaths::AllowedPaths) {
        *lock(&self.shared.allowed) = Some(allowed);
    }

    /// How long changes wait for a volume's IO to drain (30 s by default);
    /// applies to volumes created afterwards.
    pub fn set_change_timeout(&self, timeout: Duration) {
        *lock(&self.shared.timeout) = timeout;
    }

    /// The largest state file a new device, volume or export may make
    /// (5 MiB under the largest the daemon reads back, by default); a
    /// declaration past it is refused.
    pub fn set_state_file_limit(&self, bytes: usize) {
        self.shared.state_limit.store(bytes, Ordering::Relaxed);
    }

    fn inv(&self) -> MutexGuard<'_, Inventory> {
        lock(&self.shared.inv)
    }

    /// The daemon's stop begins: the API is closed; a reload still
    /// running makes no further change (each of its steps is refused).
    pub fn begin_stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether [`begin_stop`](Self::begin_stop) was called.
    pub fn is_stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    /// Refused once the daemon is stopping (a call that outlived the API's
    /// shutdown must not act or save). Unavailable, as gRPC has it for a
    /// state that passes: a script tells it from a refusal of the call
    /// itself (FailedPrecondition), and tries again (audit).
    fn check_open(&self) -> Result<(), MgmtError> {
        if self.shared.closed.load(Ordering::SeqCst) || self.shared.stopping.load(Ordering::SeqCst)
        {
            return Err(MgmtError::Unavailable("the daemon is stopping".into()));
        }
        Ok(())
    }

    fn save(&self) -> Result<(), MgmtError> {
        self.shared.save()
    }

    /// The reactors.
    pub fn reactors(&self) -> &ReactorSet {
        &self.shared.set
    }
}

#[cfg(test)]
mod tests {
    use super::{default_serial, Manager, MgmtError};
    use crate::config::DeviceDecl;

    /// From an audit: a call refused because the daemon stops came back as
    /// FailedPrecondition, the code of a refusal of the call itself; a
    /// script could not tell that trying again after the restart works.
    #[test]
    fn a_call_during_the_stop_is_unavailable() {
        let reactors = poller::Reactors::start(poller::ReactorConfig {
            count: 1,
            ..Default::default()
        })
        .unwrap();
        let mgr = Manager::new(reactors.set(), None);
        mgr.begin_stop();
        let r = mgr.attach_device(DeviceDecl {
            name: "d".into(),
            spec: "ram:4M".into(),
            block_size: 4096,
        });
        assert!(matches!(r, Err(MgmtError::Unavailable(_))), "{r:?}");
        mgr.shutdown();
        drop(mgr);
        let _ = reactors.shutdown();
    }

    /// From an audit: the health waited for a save under way, and a save
    /// held by a disk or mount that stopped answering held every health
    /// call (the gRPC health, the metrics' scrape) with it. It says what
    /// it saw last instead.
    #[test]
    fn the_health_does_not_wait_for_a_save() {
        let (reactors, _dir, mgr) = super::reload::tests::with_state_file();
        assert!(mgr.health().problems.is_empty());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            // A save that does not end until the health has answered.
            let held = super::lock(&mgr.shared.saving);
            s.spawn(|| tx.send(mgr.health()).unwrap());
            let h = rx.recv_timeout(std::time::Duration::from_secs(60));
            drop(held);
            let h = h.expect("the health waited for the save");
            assert!(h.problems.is_empty(), "{h:?}");
        });
        super::reload::tests::stop(reactors, mgr);
    }

    #[test]
    fn a_default_serial_fits_20_bytes_and_long_names_stay_apart() {
        assert_eq!(default_serial("vol0"), "vol0");
        assert_eq!(
            default_serial("exactly-twenty-bytes"),
            "exactly-twenty-bytes"
        );
        let a = default_serial("customer-a-database-data");
        let b = default_serial("customer-a-database-logs");
        assert!(a.len() <= 20 && b.len() <= 20, "{a} {b}");
        assert!(a.starts_with("customer-a-d"), "{a}");
        assert_ne!(a, b);
        assert_eq!(a, default_serial("customer-a-database-data"), "stable");
    }
}
