//! The daemon's inventory (attached devices, volumes, exports) and every
//! operator change to it. The gRPC service and the start-up restore both
//! come through here, so one set of checks guards every path.
//!
//! Each change validates everything first and only then acts, so a refused
//! call leaves the state as it was. Changes serialize on one lock (like
//! md's reconfig_mutex); the IO path never takes it: a volume's changes
//! reach the reactors through its quiesce epoch. After every change the
//! state is saved to the state file, if there is one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bdev::BlockDevice;
use poller::{QuiesceError, ReactorSet};

use crate::config::{Config, DeviceDecl, ExportDecl, VolumeDecl};
use crate::export::{Export, ExportError, ExportOptions};
use crate::raid::assembly::{self, AssemblyError, VolumeSpec};
use crate::raid::geometry::Layout;
use crate::raid::members::{FailureSink, MemberState};
use crate::raid::monitor::{Monitor, OpError};
use crate::raid::superblock::{Level as SbLevel, SuperblockError};
use crate::volume::{Volume, VolumeConfig};

/// How long a change waits for a volume's IO to drain.
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
    /// Not enough of something the machine has (memory for RAM devices).
    #[error("{0}")]
    ResourceExhausted(String),
    /// Something below failed.
    #[error("{0}")]
    Internal(String),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> MgmtError {
    MgmtError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

fn from_quiesce(what: &str, e: QuiesceError) -> MgmtError {
    match e {
        QuiesceError::DeadlineExceeded { .. } => {
            MgmtError::DeadlineExceeded(format!("{what}: {e}"))
        }
        _ => MgmtError::Internal(format!("{what}: {e}")),
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
    }
}

fn from_export(e: ExportError) -> MgmtError {
    match e {
        ExportError::InvalidArgument { field, reason } => invalid(field, reason),
        ExportError::AlreadyExists(_) => MgmtError::AlreadyExists(e.to_string()),
        ExportError::Connected(_) => MgmtError::FailedPrecondition(e.to_string()),
        ExportError::Quiesce(q) => from_quiesce("export", q),
        ExportError::Os { .. } => MgmtError::Internal(e.to_string()),
    }
}

/// The machine's memory (MemTotal), if /proc/meminfo says.
fn memory_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// md's write-behind limit: 1..=16383 (md's COUNTER_MAX / 2).
fn check_write_behind(limit: u32) -> Result<(), MgmtError> {
    if !(1..=16383).contains(&limit) {
        return Err(invalid(
            "write_behind",
            format!("{limit} is not in 1..=16383 (0 turns it off)"),
        ));
    }
    Ok(())
}

/// A bitmap region size in KiB: 0 (the default) or a power of two from
/// 64 KiB to 4 GiB.
fn check_bitmap_chunk(kib: u32) -> Result<(), MgmtError> {
    if kib != 0 && (!kib.is_power_of_two() || !(64..=4 << 20).contains(&kib)) {
        return Err(invalid(
            "bitmap_chunk_kib",
            format!("{kib} is not a power of two from 64 (64 KiB) to 4194304 (4 GiB)"),
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
    /// "ok", "failed" or "rebuilding".
    pub health: &'static str,
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
    /// The journal's mode, log fill (0..=1), write-back cached blocks and
    /// whether its device failed (the volume then goes on without it).
    pub journal_state: Option<(crate::raid::journal::JournalMode, f64, u64, bool)>,
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

struct Dev {
    decl: DeviceDecl,
    dev: Arc<dyn BlockDevice>,
}

struct Vol {
    decl: VolumeDecl,
    level: Level,
    volume: Volume,
    /// RAID volumes only.
    monitor: Option<Monitor>,
    /// Reclaims the journal's log, if the volume has a journal.
    checkpointer: Option<crate::raid::journal::Checkpointer>,
}

impl Vol {
    /// Member and spare device names now (a spare that replaced a failed
    /// member is a member from then on).
    fn roles(&self) -> (Vec<String>, Vec<String>) {
        match &self.monitor {
            Some(m) => {
                let s = m.snapshot();
                // A failed slot may hold a stand-in (another member's
                // device) or a device the operator may detach: only the
                // live members are recorded.
                let mut members: Vec<String> = Vec::new();
                for (d, st) in s.members.into_iter().zip(&s.states) {
                    if *st != MemberState::Failed && !members.contains(&d) {
                        members.push(d);
                    }
                }
                // A replacement's new device is in use (and blank at a
                // restart, so it comes back as nothing).
                if let Some((_, d)) = s.replacing {
                    members.push(d);
                }
                (members, s.spares)
            }
            None => (self.decl.members.clone(), vec![]),
        }
    }
}

struct Exp {
    decl: ExportDecl,
    export: Export,
}

#[derive(Default)]
struct State {
    devices: BTreeMap<String, Dev>,
    volumes: BTreeMap<String, Vol>,
    exports: BTreeMap<String, Exp>,
}

impl State {
    /// Which volume holds device `name`, and how.
    fn user_of(&self, name: &str) -> Option<(String, &'static str, &'static str)> {
        for (vname, v) in &self.volumes {
            if v.decl.journal.as_deref() == Some(name) {
                return Some((vname.clone(), "journal of", "ok"));
            }
            match &v.monitor {
                Some(m) => {
                    let s = m.snapshot();
                    if let Some(i) = s.members.iter().position(|d| d == name) {
                        let health = match s.states[i] {
                            MemberState::InSync => "ok",
                            MemberState::Rebuilding => "rebuilding",
                            MemberState::Failed => "failed",
                        };
                        // A failed member's device is out of the volume.
                        if s.states[i] != MemberState::Failed {
                            return Some((vname.clone(), "volume", health));
                        }
                    }
                    if s.spares.iter().any(|d| d == name) {
                        return Some((vname.clone(), "spare of", "ok"));
                    }
                }
                None if v.decl.members.iter().any(|d| d == name) => {
                    return Some((vname.clone(), "volume", "ok"))
                }
                None => {}
            }
        }
        None
    }

    /// Whether the machine has room for a RAM device `name` of `size`
    /// bytes (replacing `had` bytes of it). RAM devices are mapped lazily:
    /// one larger than the machine would have the daemon killed when it
    /// fills, long after the call said yes.
    fn check_ram(&self, name: &str, had: u64, size: u64) -> Result<(), MgmtError> {
        let taken: u64 = self
            .devices
            .values()
            .filter(|d| d.decl.spec.starts_with("ram:"))
            .map(|d| d.dev.info().size_bytes())
            .sum();
        let after = taken - had + size;
        match memory_total() {
            Some(total) if after > total => Err(MgmtError::ResourceExhausted(format!(
                "device {name}: {size} bytes of RAM asked, {} already in other RAM devices, the machine has {total}",
                taken - had
            ))),
            _ => Ok(()),
        }
    }

    fn device(&self, field: &'static str, name: &str) -> Result<&Dev, MgmtError> {
        check_name(field, name)?;
        self.devices
            .get(name)
            .ok_or_else(|| MgmtError::NotFound(format!("device {name} is not attached")))
    }

    fn volume(&self, name: &str) -> Result<&Vol, MgmtError> {
        check_name("volume", name)?;
        self.volumes
            .get(name)
            .ok_or_else(|| MgmtError::NotFound(format!("volume {name} does not exist")))
    }

    fn config(&self) -> Config {
        Config {
            devices: self.devices.values().map(|d| d.decl.clone()).collect(),
            volumes: self
                .volumes
                .values()
                .map(|v| {
                    let (members, spares) = v.roles();
                    VolumeDecl {
                        members,
                        spares,
                        min_rebuild_bytes_per_sec: v.monitor.as_ref().map_or(0, |m| m.rate().0),
                        max_rebuild_bytes_per_sec: v.monitor.as_ref().map_or(0, |m| m.rate().1),
                        ..v.decl.clone()
                    }
                })
                .collect(),
            exports: self.exports.values().map(|e| e.decl.clone()).collect(),
        }
    }
}

/// The inventory and its changes.
pub struct Manager {
    set: ReactorSet,
    state: Mutex<State>,
    state_file: Option<PathBuf>,
    /// Do not write the state file: while restoring (a half-restored state
    /// must never replace the full one) and once stopping.
    quiet: std::sync::atomic::AtomicBool,
    /// Stopping: changes are refused (set under the state lock).
    closed: std::sync::atomic::AtomicBool,
}

impl Manager {
    /// An empty inventory served by `set`; changes are saved to
    /// `state_file` if given.
    pub fn new(set: &ReactorSet, state_file: Option<PathBuf>) -> Manager {
        Manager {
            set: set.clone(),
            state: Mutex::new(State::default()),
            state_file,
            quiet: Default::default(),
            closed: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, for a change: refused once the daemon is stopping (a
    /// call that outlived the API's shutdown must not act or save).
    fn lock_for_change(&self) -> Result<MutexGuard<'_, State>, MgmtError> {
        let s = self.lock();
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(MgmtError::FailedPrecondition(
                "the daemon is stopping".into(),
            ));
        }
        Ok(s)
    }

    /// Save the state; a failure is logged and reported, the change stands
    /// (it has happened on the devices already).
    fn save(&self, s: &State) -> Result<(), MgmtError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        if self.quiet.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        s.config().save(path).map_err(|e| {
            tracing::error!(error = %e, "saving the daemon state");
            MgmtError::Internal(format!(
                "the change was made but saving the state failed: {e}"
            ))
        })
    }

    /// The reactors.
    pub fn reactors(&self) -> &ReactorSet {
        &self.set
    }

    /// Bring up everything `config` declares, in order; the first error
    /// stops it (the caller should refuse to start).
    ///
    /// `initial` says the configuration is the operator's initial setup
    /// (`--config`, no state yet): RAID volumes on blank devices are then
    /// created. Restoring saved state, a volume is only ever assembled from
    /// its superblocks (except on RAM devices, which start blank).
    pub fn restore(&self, config: &Config, initial: bool) -> Result<(), String> {
        use std::sync::atomic::Ordering::SeqCst;
        self.quiet.store(true, SeqCst);
        self.restore_all(config, initial)?;
        self.quiet.store(false, SeqCst);
        let s = self.lock();
        self.save(&s).map_err(|e| e.to_string())
    }

    fn restore_all(&self, config: &Config, initial: bool) -> Result<(), String> {
        for d in &config.devices {
            self.attach_device(d.clone())
                .map_err(|e| format!("device {}: {e}", d.name))?;
        }
        for v in &config.volumes {
            self.restore_volume(v, initial)
                .map_err(|e| format!("volume {}: {e}", v.name))?;
        }
        for e in &config.exports {
            self.create_export(e.clone())
                .map_err(|err| format!("export {}: {err}", e.name))?;
        }
        Ok(())
    }

    // ---- devices ----

    /// Attach a device.
    pub fn attach_device(&self, decl: DeviceDecl) -> Result<DeviceView, MgmtError> {
        self.attach_device_wrapped(decl, |d| d)
    }

    /// Attach a device as `wrap` returns it once opened (the demo wraps
    /// its members in fault injectors, to pull one).
    pub fn attach_device_wrapped(
        &self,
        mut decl: DeviceDecl,
        wrap: impl FnOnce(Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice>,
    ) -> Result<DeviceView, MgmtError> {
        check_name("name", &decl.name)?;
        if decl.block_size == 0 {
            decl.block_size = 4096;
        }
        if decl.block_size != 512 && decl.block_size != 4096 {
            return Err(invalid(
                "block_size",
                format!("{} is not 512 or 4096", decl.block_size),
            ));
        }
        let mut s = self.lock_for_change()?;
        if s.devices.contains_key(&decl.name) {
            return Err(MgmtError::AlreadyExists(format!(
                "device {} is already attached",
                decl.name
            )));
        }
        if decl.spec.starts_with("file:") || decl.spec.starts_with("nvme:") {
            if let Some(d) = s.devices.values().find(|d| {
                same_file(&d.decl.spec, &decl.spec)
                    || crate::devspec::same_nvme(&d.decl.spec, &decl.spec)
            }) {
                return Err(MgmtError::AlreadyExists(format!(
                    "{} is already attached as device {}",
                    decl.spec, d.decl.name
                )));
            }
        }
        if let Some(size) = decl
            .spec
            .strip_prefix("ram:")
            .and_then(|z| crate::devspec::parse_size(z).ok())
        {
            s.check_ram(&decl.name, 0, size)?;
        }
        let dev = wrap(
            crate::devspec::open_named(&decl.name, &decl.spec, decl.block_size).map_err(|e| {
                if crate::devspec::names_missing(&decl.spec) {
                    MgmtError::NotFound(e)
                } else {
                    invalid("spec", e)
                }
            })?,
        );
        let view = DeviceView {
            num_blocks: dev.info().num_blocks,
            decl: decl.clone(),
            used_by: String::new(),
            health: "ok",
        };
        s.devices.insert(decl.name.clone(), Dev { decl, dev });
        self.save(&s)?;
        Ok(view)
    }

    /// Every device with its user and health.
    pub fn list_devices(&self) -> Vec<DeviceView> {
        let s = self.lock();
        s.devices.keys().map(|n| Self::device_view(&s, n)).collect()
    }

    /// Detach a device no volume uses.
    pub fn detach_device(&self, name: &str) -> Result<(), MgmtError> {
        let mut s = self.lock_for_change()?;
        s.device("name", name)?;
        if let Some((v, how, _)) = s.user_of(name) {
            return Err(MgmtError::FailedPrecondition(format!(
                "device {name} is in use ({how} {v})"
            )));
        }
        s.devices.remove(name);
        self.save(&s)
    }

    /// Grow a RAM, null or file device to `size_bytes` (qemu's
    /// block_resize). A plain volume over it grows with it: the volume
    /// switches to the grown device through its quiesce epoch, and every
    /// export of the volume tells its connected frontend (vhost-user
    /// CONFIG_CHANGE_MSG), so the guest sees the new capacity. Returns the
    /// device and the exports whose frontend acknowledged the change.
    /// Shrinking is refused (it would cut off data), and so is a device
    /// in a RAID volume or journal: the array's size is in its superblocks
    /// and does not follow its members.
    pub fn resize_device(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<(DeviceView, Vec<String>), MgmtError> {
        let mut s = self.lock_for_change()?;
        let d = s.device("name", name)?;
        let info = d.dev.info().clone();
        let bs = info.block_size as u64;
        if size_bytes == 0 || !size_bytes.is_multiple_of(bs) {
            return Err(invalid(
                "size_bytes",
                format!("{size_bytes} is not a positive multiple of the block size {bs}"),
            ));
        }
        let have = info.size_bytes();
        if size_bytes < have {
            return Err(invalid(
                "size_bytes",
                format!("{size_bytes} is smaller than the device ({have} bytes); shrinking would cut off data"),
            ));
        }
        let spec = resized_spec(&d.decl.spec, size_bytes).ok_or_else(|| {
            MgmtError::FailedPrecondition(format!(
                "device {name} ({}) cannot be resized: only ram, null and file devices can",
                d.decl.spec
            ))
        })?;
        let volume = match s.user_of(name) {
            None => None,
            Some((v, "volume", _)) if s.volumes[&v].level == Level::Single => Some(v),
            Some((v, how, _)) => {
                return Err(MgmtError::FailedPrecondition(format!(
                "device {name} is in use ({how} {v}); a RAID volume does not grow with its members"
            )))
            }
        };
        if size_bytes == have {
            return Ok((Self::device_view(&s, name), vec![]));
        }
        if d.decl.spec.starts_with("ram:") {
            // The old and the new mapping are both there during the copy.
            s.check_ram(name, 0, size_bytes)?;
        }
        let old = d.dev.clone();
        let blocks = size_bytes / bs;
        let resize = |dev: &Arc<dyn BlockDevice>| {
            dev.resized(blocks).map_err(|e| match e {
                bdev::BdevError::Unsupported(m) => MgmtError::FailedPrecondition(m),
                bdev::BdevError::InvalidArgument(m) => invalid("size_bytes", m),
                e => MgmtError::Internal(format!("resizing device {name}: {e}")),
            })
        };
        let grown = match &volume {
            // The copy (RAM) or truncate (file) runs while the volume is
            // quiesced: no IO reaches either object meanwhile.
            Some(v) => s.volumes[v]
                .volume
                .quiesce()
                .reconfigure(QUIESCE_TIMEOUT, |_| {
                    let grown = resize(&old)?;
                    Ok((
                        VolumeConfig {
                            device: grown.clone(),
                        },
                        grown,
                    ))
                })
                .map_err(|e| match e {
                    poller::ReconfigureError::Quiesce(q) => from_quiesce(v, q),
                    poller::ReconfigureError::Rejected(m) => m,
                })?,
            None => resize(&old)?,
        };
        if let Some(d) = s.devices.get_mut(name) {
            d.dev = grown;
            d.decl.spec = spec;
        }
        self.save(&s)?;
        let view = Self::device_view(&s, name);
        // The frontends answer in their own time: not under the lock.
        let notifiers: Vec<(String, crate::export::Notifier)> = match &volume {
            Some(v) => s
                .exports
                .values()
                .filter(|e| &e.decl.volume == v)
                .map(|e| (e.decl.name.clone(), e.export.notifier()))
                .collect(),
            None => vec![],
        };
        drop(s);
        let mut notified = Vec::new();
        {
            for (export, n) in notifiers {
                match n.config_changed() {
                    Ok(true) => notified.push(export),
                    // No frontend: the next one reads the new size.
                    Ok(false) => {}
                    Err(err) => {
                        tracing::warn!(export = %export, error = %err, "telling the frontend about the new capacity failed; the guest sees it after a reconnect")
                    }
                }
            }
        }
        tracing::info!(device = name, size_bytes, volume = ?volume, notified = ?notified, "device resized");
        Ok((view, notified))
    }

    fn device_view(s: &State, name: &str) -> DeviceView {
        let d = &s.devices[name];
        let (used_by, health) = match s.user_of(name) {
            Some((v, how, health)) => (format!("{how} {v}"), health),
            None => (String::new(), "ok"),
        };
        DeviceView {
            decl: d.decl.clone(),
            num_blocks: d.dev.info().num_blocks,
            used_by,
            health,
        }
    }

    // ---- volumes ----

    /// Check a volume declaration against the inventory: the level, member
    /// and spare counts, that every device is attached, distinct and free,
    /// and the geometry. Returns the level, members and spares.
    fn check_volume(
        s: &State,
        decl: &VolumeDecl,
        restoring: bool,
    ) -> Result<(Level, Devices, Devices), MgmtError> {
        check_name("name", &decl.name)?;
        if s.volumes.contains_key(&decl.name) {
            return Err(MgmtError::AlreadyExists(format!(
                "volume {} already exists",
                decl.name
            )));
        }
        let level = Level::parse(&decl.level).ok_or_else(|| {
            invalid(
                "level",
                format!("{:?} is not single, raid1 or raid5", decl.level),
            )
        })?;
        let (min, max) = match level {
            Level::Single => (1, 1),
            Level::Raid1 => (2, 32),
            Level::Raid5 => (3, 32),
        };
        let n = decl.members.len();
        // A degraded volume is saved with its surviving members only; its
        // superblocks say how many it has.
        let min = if restoring { 1 } else { min };
        if n < min || n > max {
            return Err(invalid(
                "members",
                format!("{} takes {min}..={max} members, got {n}", level.name()),
            ));
        }
        if level == Level::Single && !decl.spares.is_empty() {
            return Err(invalid("spares", "a single-device volume has no spares"));
        }
        if decl.bitmap && level == Level::Single {
            return Err(invalid(
                "bitmap",
                "a single-device volume has nothing to resynchronise",
            ));
        }
        if decl.bitmap && decl.journal.as_deref().is_some_and(|j| !j.is_empty()) {
            return Err(invalid(
                "bitmap",
                "a volume with a journal needs no bitmap: the journal closes the write hole (choose one)",
            ));
        }
        check_bitmap_chunk(decl.bitmap_chunk_kib)?;
        // At a restart the superblocks decide (a bitmap may be gone).
        if decl.write_behind > 0 && !restoring {
            check_write_behind(decl.write_behind)?;
            if level != Level::Raid1 || !decl.bitmap {
                return Err(invalid(
                    "write_behind",
                    "write-behind is for a RAID1 with a write-intent bitmap",
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut get =
            |field: &'static str, name: &String| -> Result<Arc<dyn BlockDevice>, MgmtError> {
                let d = s.device(field, name)?;
                if !seen.insert(name.clone()) {
                    return Err(invalid(field, format!("device {name} is named twice")));
                }
                if let Some((v, how, _)) = s.user_of(name) {
                    return Err(MgmtError::FailedPrecondition(format!(
                        "device {name} is in use ({how} {v})"
                    )));
                }
                Ok(d.dev.clone())
            };
        let members = decl
            .members
            .iter()
            .map(|m| get("members", m))
            .collect::<Result<Vec<_>, _>>()?;
        let spares = decl
            .spares
            .iter()
            .map(|m| get("spares", m))
            .collect::<Result<Vec<_>, _>>()?;
        let bs = members[0].info().block_size;
        if let Some(d) = members
            .iter()
            .chain(&spares)
            .find(|d| d.info().block_size != bs)
        {
            return Err(MgmtError::FailedPrecondition(format!(
                "device {} has {}-byte blocks, the first member {bs}",
                d.info().name,
                d.info().block_size
            )));
        }
        let smallest = members
            .iter()
            .map(|d| d.info().num_blocks)
            .min()
            .unwrap_or(0);
        if let Some(d) = spares.iter().find(|d| d.info().num_blocks < smallest) {
            return Err(MgmtError::FailedPrecondition(format!(
                "spare {} is smaller than the smallest member",
                d.info().name
            )));
        }
        if level == Level::Raid5 {
            let c = decl.chunk_kib;
            if !(4..=1024).contains(&c) || !c.is_power_of_two() {
                return Err(invalid(
                    "chunk_kib",
                    format!("{c} is not a power of two in 4..=1024"),
                ));
            }
            Layout::parse(&decl.layout).map_err(|e| invalid("layout", e.to_string()))?;
        }
        if level != Level::Single {
            let offset_bytes = 1u64 << 20;
            if smallest * bs as u64 <= offset_bytes + (decl.chunk_kib as u64) * 1024 {
                return Err(invalid(
                    "members",
                    "too small: each member needs more than 1 MiB for the superblock and data offset plus one chunk",
                ));
            }
        }
        Ok((level, members, spares))
    }

    /// Start the monitor of a RAID volume whose device is `device`.
    fn start_raid(
        &self,
        decl: &VolumeDecl,
        opened: (
            Arc<dyn crate::raid::monitor::RaidDevice>,
            assembly::VolumeMeta,
            bool,
        ),
        spares: Vec<Arc<dyn BlockDevice>>,
        rx: std::sync::mpsc::Receiver<crate::raid::members::Event>,
    ) -> Result<(Volume, Monitor, Option<crate::raid::journal::Checkpointer>), MgmtError> {
        let (device, meta, was_clean) = opened;
        let volume = Volume::new(&self.set, &decl.name, device.clone());
        let checkpointer = device
            .journal()
            .map(|j| crate::raid::journal::Checkpointer::start(j, volume.clone()));
        let monitor = Monitor::start(&self.set, volume.clone(), device, rx, spares);
        monitor.set_meta(meta);
        monitor.set_rate(
            decl.min_rebuild_bytes_per_sec,
            decl.max_rebuild_bytes_per_sec,
        );
        if decl.serialize {
            monitor
                .set_serialize(true)
                .map_err(|e| from_op(&decl.name, e))?;
        }
        if decl.write_behind > 0 {
            // The superblocks decide whether a bitmap came back; without
            // one write-behind stays off rather than the volume.
            if let Err(e) = monitor.set_write_behind(decl.write_behind as u64) {
                tracing::warn!(volume = %decl.name, error = %e, "write-behind not restored");
            }
        }
        monitor
            .open(was_clean)
            .map_err(|e| from_op(&decl.name, e))?;
        Ok((volume, monitor, checkpointer))
    }

    /// The journal device a declaration names, checked: RAID5 only,
    /// attached, free, not a member or spare, same block size.
    fn check_journal(
        s: &State,
        decl: &VolumeDecl,
        level: Level,
    ) -> Result<Option<Arc<dyn BlockDevice>>, MgmtError> {
        let Some(name) = decl.journal.as_deref().filter(|n| !n.is_empty()) else {
            return Ok(None);
        };
        if level != Level::Raid5 {
            return Err(invalid("journal", "only a RAID5 volume has a journal"));
        }
        let d = s.device("journal", name)?;
        if decl.members.iter().chain(&decl.spares).any(|m| m == name) {
            return Err(invalid(
                "journal",
                format!("device {name} is also a member or spare"),
            ));
        }
        if let Some((v, how, _)) = s.user_of(name) {
            return Err(MgmtError::FailedPrecondition(format!(
                "device {name} is in use ({how} {v})"
            )));
        }
        crate::raid::journal::block_size_ok(d.dev.as_ref())
            .map_err(MgmtError::FailedPrecondition)?;
        let want = decl
            .members
            .first()
            .and_then(|m| s.devices.get(m))
            .map_or(4096, |m| m.dev.info().block_size);
        if d.dev.info().block_size != want {
            return Err(MgmtError::FailedPrecondition(format!(
                "journal {name} has {}-byte blocks, the members {want}",
                d.dev.info().block_size
            )));
        }
        if d.dev.info().num_blocks < 1 + 1024 {
            return Err(MgmtError::FailedPrecondition(format!(
                "journal {name} is too small: it needs at least 1025 blocks"
            )));
        }
        Ok(Some(d.dev.clone()))
    }

    /// Create a volume; RAID members get fresh superblocks (`force` to
    /// overwrite another volume's).
    pub fn create_volume(&self, decl: VolumeDecl, force: bool) -> Result<VolumeView, MgmtError> {
        let mut s = self.lock_for_change()?;
        let (level, members, spares) = Self::check_volume(&s, &decl, false)?;
        let jdev = Self::check_journal(&s, &decl, level)?;
        let mode = crate::raid::journal::JournalMode::parse(&decl.journal_mode)
            .map_err(|e| invalid("journal_mode", e))?;
        if jdev.is_none() && !decl.journal_mode.is_empty() {
            return Err(invalid(
                "journal_mode",
                "a journal mode needs a journal device",
            ));
        }
        let (volume, monitor, checkpointer) = match level {
            Level::Single => (
                Volume::new(&self.set, &decl.name, members[0].clone()),
                None,
                None,
            ),
            Level::Raid1 | Level::Raid5 => {
                let bs = members[0].info().block_size as u64;
                let spec = VolumeSpec {
                    name: decl.name.clone(),
                    level: if level == Level::Raid1 {
                        SbLevel::Raid1
                    } else {
                        SbLevel::Raid5
                    },
                    layout: Layout::parse(&decl.layout).unwrap_or(Layout::LeftSymmetric),
                    // Validated (4..=1024 KiB) for RAID5; unused by RAID1.
                    chunk_bytes: if level == Level::Raid5 {
                        decl.chunk_kib * 1024
                    } else {
                        64 << 10
                    },
                    data_offset: (1 << 20) / bs,
                    members,
                    bitmap_chunk_bytes: if decl.bitmap {
                        bitmap_chunk_bytes(decl.bitmap_chunk_kib)
                    } else {
                        0
                    },
                };
                let (tx, rx) = std::sync::mpsc::channel();
                let (device, meta) =
                    assembly::create(&spec, FailureSink::new(tx), force).map_err(|e| match e {
                        AssemblyError::Invalid(m) => invalid("members", m),
                        AssemblyError::InUse { .. } => {
                            MgmtError::FailedPrecondition(format!("{e} (set force to overwrite)"))
                        }
                        AssemblyError::Io { .. } => MgmtError::Internal(e.to_string()),
                    })?;
                let device = match jdev {
                    Some(jdev) => {
                        let j = crate::raid::journal::Journal::format_with(jdev, mode)
                            .map_err(|e| MgmtError::Internal(format!("journal: {e}")))?;
                        device.with_journal(j).ok_or_else(|| {
                            invalid("journal", "only a RAID5 volume has a journal")
                        })?
                    }
                    None => device,
                };
                let (v, m, c) = self.start_raid(&decl, (device, meta, true), spares, rx)?;
                (v, Some(m), c)
            }
        };
        s.volumes.insert(
            decl.name.clone(),
            Vol {
                decl: decl.clone(),
                level,
                volume,
                monitor,
                checkpointer,
            },
        );
        self.save(&s)?;
        Ok(Self::view(&s, &decl.name))
    }

    /// Bring back a volume the state file declares: assembled from its
    /// members' superblocks; created anew only if every device is blank
    /// (RAM devices start blank on every start).
    fn restore_volume(&self, decl: &VolumeDecl, initial: bool) -> Result<(), MgmtError> {
        // A device named twice (a state file of an older version) counts once.
        let mut decl = decl.clone();
        let mut seen: Vec<String> = Vec::new();
        decl.members.retain(|m| {
            let first = !seen.contains(m);
            seen.push(m.clone());
            first
        });
        decl.spares.retain(|m| !seen.contains(m));
        let decl = &decl;
        let mut s = self.lock_for_change()?;
        let (level, members, spares) = Self::check_volume(&s, decl, true)?;
        let jdev = Self::check_journal(&s, decl, level)?;
        if level == Level::Single {
            let volume = Volume::new(&self.set, &decl.name, members[0].clone());
            s.volumes.insert(
                decl.name.clone(),
                Vol {
                    decl: decl.clone(),
                    level,
                    volume,
                    monitor: None,
                    checkpointer: None,
                },
            );
            return Ok(());
        }
        let all: Vec<Arc<dyn BlockDevice>> = members.iter().chain(&spares).cloned().collect();
        let mut blank = Vec::new();
        let mut readable = Vec::new();
        for d in &all {
            match assembly::read_superblock(d.as_ref()) {
                Ok(Err(SuperblockError::Foreign)) => {
                    blank.push(d.clone());
                    readable.push(d.clone());
                }
                Ok(_) => readable.push(d.clone()),
                // A dead device is a missing member: assembly decides
                // whether the volume can start without it.
                Err(e) => {
                    tracing::warn!(volume = decl.name, device = %d.info().name, error = %e, "device unreadable; left out")
                }
            }
        }
        let all = readable;
        // Only RAM-like devices come back blank on their own; a blank file
        // or disk may be a wrong path or a replaced disk: never create a
        // volume over it unasked.
        let volatile = all.iter().all(|d| {
            s.devices.get(&d.info().name).is_some_and(|x| {
                x.decl.spec.starts_with("ram:") || x.decl.spec.starts_with("null:")
            })
        });
        drop(s);
        if !all.is_empty() && blank.len() == all.len() && !volatile && !initial {
            return Err(MgmtError::FailedPrecondition(format!(
                "no superblock of volume {} on its devices; refusing to create it over them (create it again by hand, with force, if that is intended)",
                decl.name
            )));
        }
        if !all.is_empty() && blank.len() == all.len() {
            tracing::info!(
                volume = decl.name,
                "every member is blank: creating the volume"
            );
            return self.create_volume(decl.clone(), false).map(|_| ());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = FailureSink::new(tx);
        let ours: Vec<Arc<dyn BlockDevice>> = all
            .iter()
            .filter(|d| !blank.iter().any(|b| Arc::ptr_eq(b, d)))
            .cloned()
            .collect();
        let mut report = assembly::assemble(&ours, move |_| sink.clone());
        if !report.problems.is_empty() {
            let list: Vec<String> = report
                .problems
                .iter()
                .map(|(d, why)| format!("{d}: {why}"))
                .collect();
            return Err(MgmtError::FailedPrecondition(format!(
                "refusing to assemble: {}",
                list.join("; ")
            )));
        }
        let Some(i) = report
            .volumes
            .iter()
            .position(|v| v.meta.template.name == decl.name)
        else {
            return Err(MgmtError::FailedPrecondition(format!(
                "no superblock of volume {} on its devices",
                decl.name
            )));
        };
        let v = report.volumes.remove(i);
        // The superblocks say what the volume is: a takeover or bitmap
        // change recorded there just before a crash may not have reached
        // the state file.
        let sb = &v.meta.template;
        let sb_level = if sb.level == SbLevel::Raid5 {
            Level::Raid5
        } else {
            Level::Raid1
        };
        if sb_level != level {
            tracing::warn!(
                volume = decl.name,
                state_file = level.name(),
                superblocks = sb_level.name(),
                "the superblocks' level wins"
            );
        }
        let mut fixed = decl.clone();
        fixed.level = sb_level.name().to_string();
        if sb_level == Level::Raid5 {
            fixed.chunk_kib = sb.chunk_bytes / 1024;
            fixed.layout = sb.layout.name().to_string();
        }
        fixed.bitmap = sb.bitmap_rows_per_bit > 0;
        let (decl, level) = (&fixed, sb_level);
        if !v.stale.is_empty() {
            tracing::warn!(volume = decl.name, stale = ?v.stale, "stale members left out");
        }
        let in_volume: Vec<String> = v
            .device
            .member_devices()
            .iter()
            .map(|d| d.info().name.clone())
            .collect();
        // Blank devices are spares again; so are declared spares that the
        // volume does not use.
        let spares: Vec<Arc<dyn BlockDevice>> = blank
            .into_iter()
            .filter(|d| !in_volume.contains(&d.info().name))
            .collect();
        // Before any IO: the journal's durable records go to the members,
        // so no stripe is left half written.
        let device = match jdev {
            Some(jdev) => {
                let slots: Vec<Option<Arc<dyn BlockDevice>>> = v
                    .device
                    .member_devices()
                    .into_iter()
                    .zip(v.device.member_states())
                    .map(|(d, st)| (st != MemberState::Failed).then_some(d))
                    .collect();
                let geo = v.device.parity_geometry();
                let (j, rep) = crate::raid::journal::Journal::replay(jdev, &slots, geo.as_ref())
                    .map_err(|e| {
                        MgmtError::FailedPrecondition(format!(
                            "journal of volume {0}: {e}; refusing to start the volume without it (`appliance daemon --drop-journal {0}` starts it without the journal, losing write-back data only the journal held)",
                            decl.name
                        ))
                    })?;
                tracing::info!(
                    volume = decl.name,
                    records = rep.records,
                    blocks = rep.blocks,
                    "journal replayed"
                );
                v.device
                    .with_journal(j)
                    .ok_or_else(|| invalid("journal", "only a RAID5 volume has a journal"))?
            }
            None => v.device,
        };
        let (volume, monitor, checkpointer) =
            self.start_raid(decl, (device, v.meta, v.was_clean), spares, rx)?;
        let mut s = self.lock();
        s.volumes.insert(
            decl.name.clone(),
            Vol {
                decl: decl.clone(),
                level,
                volume,
                monitor: Some(monitor),
                checkpointer,
            },
        );
        Ok(())
    }

    fn view(s: &State, name: &str) -> VolumeView {
        let v = &s.volumes[name];
        let info = v.volume.info();
        let exports = s
            .exports
            .values()
            .filter(|e| e.decl.volume == name)
            .map(|e| e.decl.name.clone())
            .collect();
        // One consistent look at the members and background work.
        let snap = v.monitor.as_ref().map(|m| m.snapshot());
        let write_mostly: Vec<String> = snap.as_ref().map_or(vec![], |snap| {
            snap.members
                .iter()
                .zip(&snap.write_mostly)
                .filter(|x| *x.1)
                .map(|x| x.0.clone())
                .collect()
        });
        let bitmap = snap
            .as_ref()
            .and_then(|snap| snap.bitmap.as_ref())
            .map(|b| (b.region_bytes(), b.bits(), b.dirty_regions()));
        let serialize = snap.as_ref().is_some_and(|snap| snap.serialize);
        let write_behind = snap.as_ref().map_or((0, 0), |snap| snap.write_behind);
        let consistency_policy = if v.monitor.is_none() {
            "none"
        } else if v.checkpointer.is_some() {
            "journal"
        } else if bitmap.is_some() {
            "bitmap"
        } else {
            "resync"
        };
        let (members, spares, state, progress) = match snap {
            Some(snap) => {
                let down = snap
                    .states
                    .iter()
                    .filter(|&&x| x != MemberState::InSync)
                    .count();
                let state = if down == 0 {
                    "optimal"
                } else if down > snap.max_failures {
                    "failed"
                } else {
                    "degraded"
                };
                let settled = snap.settled();
                let slots = snap.states.len();
                let progress = snap.rebuild.map(|p| ProgressView {
                    kind: if p.slot == usize::MAX {
                        "scrub"
                    } else if p.slot == slots {
                        "replace"
                    } else {
                        "rebuild"
                    },
                    fraction: p.fraction(),
                    eta_seconds: if settled {
                        0.0
                    } else {
                        p.eta().map_or(-1.0, |d| d.as_secs_f64())
                    },
                    finished: settled,
                    error: p.error().unwrap_or_default(),
                    mismatches: p.mismatches.load(std::sync::atomic::Ordering::Relaxed),
                    bytes: p.bytes.load(std::sync::atomic::Ordering::Relaxed),
                    min_bytes_per_sec: p
                        .min_bytes_per_sec
                        .load(std::sync::atomic::Ordering::Relaxed),
                    max_bytes_per_sec: p
                        .max_bytes_per_sec
                        .load(std::sync::atomic::Ordering::Relaxed),
                });
                let members = snap
                    .members
                    .into_iter()
                    .zip(snap.states.iter().map(|&x| state_name(x)))
                    .collect();
                (members, snap.spares, state, progress)
            }
            None => (
                vec![(v.decl.members[0].clone(), "in_sync")],
                vec![],
                "optimal",
                None,
            ),
        };
        VolumeView {
            name: name.to_string(),
            level: v.level,
            state,
            size_bytes: info.size_bytes(),
            block_size: info.block_size,
            chunk_kib: if v.level == Level::Raid5 {
                v.decl.chunk_kib
            } else {
                0
            },
            layout: if v.level == Level::Raid5 {
                v.decl.layout.clone()
            } else {
                String::new()
            },
            members,
            write_mostly,
            spares,
            progress,
            generation: v.volume.quiesce().config().0,
            exports,
            quiesce: v.volume.quiesce().stats(),
            journal: v.decl.journal.clone(),
            consistency_policy,
            bitmap,
            serialize,
            write_behind,
            suspended: v.volume.suspended_range().get().map(|(lo, hi)| {
                let bs = info.block_size as u64;
                (lo * bs, hi * bs)
            }),
            journal_state: v.checkpointer.as_ref().map(|c| {
                let j = c.journal();
                (j.mode(), j.usage(), j.cache().len(), j.has_failed())
            }),
        }
    }

    /// Describe a volume.
    pub fn get_volume(&self, name: &str) -> Result<VolumeView, MgmtError> {
        let s = self.lock();
        s.volume(name)?;
        Ok(Self::view(&s, name))
    }

    /// Describe every volume.
    pub fn list_volumes(&self) -> Vec<VolumeView> {
        let s = self.lock();
        s.volumes.keys().map(|n| Self::view(&s, n)).collect()
    }

    /// Stop a volume that no export uses. Its superblocks are recorded
    /// clean and kept (like md's --stop): creating a volume on its devices
    /// again needs `force`, so data is never lost by a slip.
    pub fn delete_volume(&self, name: &str) -> Result<(), MgmtError> {
        let mut s = self.lock_for_change()?;
        s.volume(name)?;
        let users: Vec<String> = s
            .exports
            .values()
            .filter(|e| e.decl.volume == name)
            .map(|e| e.decl.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {name} is exported by {}; delete the export first",
                users.join(", ")
            )));
        }
        let v = &s.volumes[name];
        // No IO can reach it after this; only then is it recorded clean.
        v.volume
            .quiesce()
            .remove(QUIESCE_TIMEOUT)
            .map_err(|e| from_quiesce(name, e))?;
        if let Some(m) = &v.monitor {
            if let Err(e) = m.close() {
                tracing::error!(volume = name, error = %e, "recording a clean stop");
            }
        }
        s.volumes.remove(name);
        self.save(&s)
    }

    fn monitor<'a>(s: &'a State, volume: &str) -> Result<&'a Monitor, MgmtError> {
        s.volume(volume)?.monitor.as_ref().ok_or_else(|| {
            MgmtError::FailedPrecondition(format!(
                "volume {volume} is a single device: it has no members to change"
            ))
        })
    }

    /// Fail a member (md's --fail).
    pub fn fail_member(&self, volume: &str, device: &str) -> Result<VolumeView, MgmtError> {
        let s = self.lock_for_change()?;
        let m = Self::monitor(&s, volume)?;
        s.device("device", device)?;
        m.fail_member(device).map_err(|e| from_op(volume, e))?;
        self.save(&s)?;
        Ok(Self::view(&s, volume))
    }

    /// Replace in-sync member `device` by `with` without going degraded
    /// (md's --replace): `with` is written along and the member copied to
    /// it in the background; then it takes the slot and `device` is free.
    pub fn replace_member(
        &self,
        volume: &str,
        device: &str,
        with: &str,
    ) -> Result<VolumeView, MgmtError> {
        let s = self.lock_for_change()?;
        let m = Self::monitor(&s, volume)?;
        s.device("device", device)?;
        let dev = s.device("replacement", with)?.dev.clone();
        if device == with {
            return Err(invalid("replacement", "is the member itself"));
        }
        if let Some((v, how, _)) = s.user_of(with) {
            return Err(MgmtError::FailedPrecondition(format!(
                "device {with} is in use ({how} {v})"
            )));
        }
        m.replace_member(device, dev)
            .map_err(|e| from_op(volume, e))?;
        self.save(&s)?;
        Ok(Self::view(&s, volume))
    }

    /// Add a hot spare (used at once if a member has failed).
    pub fn add_spare(&self, volume: &str, device: &str) -> Result<VolumeView, MgmtError> {
        let s = self.lock_for_change()?;
        let m = Self::monitor(&s, volume)?;
        let dev = s.device("device", device)?.dev.clone();
        if let Some((v, how, _)) = s.user_of(device) {
            return Err(if v == volume {
                MgmtError::AlreadyExists(format!("device {device} is already {how} {v}"))
            } else {
                MgmtError::FailedPrecondition(format!("device {device} is in use ({how} {v})"))
            });
        }
        let snap = m.snapshot();
        let first = s.devices.get(&snap.members[0]).map(|d| d.dev.clone());
        if let Some(first) = first {
            let need = snap
                .members
                .iter()
                .filter_map(|n| s.devices.get(n))
                .map(|d| d.dev.info().num_blocks)
                .min()
                .unwrap_or(0);
            if dev.info().block_size != first.info().block_size || dev.info().num_blocks < need {
                return Err(MgmtError::FailedPrecondition(format!(
                    "device {device} ({} blocks of {} bytes) cannot stand in for a member ({need} blocks of {} bytes)",
                    dev.info().num_blocks,
                    dev.info().block_size,
                    first.info().block_size
                )));
            }
        }
        m.add_spare(dev).map_err(|e| from_op(volume, e))?;
        self.save(&s)?;
        Ok(Self::view(&s, volume))
    }

    /// Remove an unused hot spare.
    pub fn remove_spare(&self, volume: &str, device: &str) -> Result<VolumeView, MgmtError> {
        let s = self.lock_for_change()?;
        let m = Self::monitor(&s, volume)?;
        s.device("device", device)?;
        m.remove_spare(device).map_err(|e| match e {
            OpError::NotFound(d) => MgmtError::FailedPrecondition(format!(
                "device {d} is not a spare of volume {volume}"
            )),
            e => from_op(volume, e),
        })?;
        self.save(&s)?;
        Ok(Self::view(&s, volume))
    }

    /// Take a device out of a volume (md's --fail --remove): a spare is
    /// removed; an in-sync or rebuilding member is failed (refused if that
    /// would lose data), which releases its device (a spare takes its
    /// place); a failed member's device is already free.
    pub fn remove_member(&self, volume: &str, device: &str) -> Result<VolumeView, MgmtError> {
        let s = self.lock_for_change()?;
        let m = Self::monitor(&s, volume)?;
        s.device("device", device)?;
        let snap = m.snapshot();
        if snap.spares.iter().any(|d| d == device) {
            m.remove_spare(device).map_err(|e| from_op(volume, e))?;
        } else {
            let slot = snap
                .members
                .iter()
                .zip(&snap.states)
                .position(|(d, st)| d == device && *st != MemberState::Failed);
            let failed = snap.members.iter().any(|d| d == device);
            match (slot, failed) {
                (Some(_), _) => m.fail_member(device).map_err(|e| from_op(volume, e))?,
                (None, true) => {}
                (None, false) => {
                    return Err(MgmtError::FailedPrecondition(format!(
                        "device {device} is not a member or spare of volume {volume}"
                    )))
                }
            }
        }
        self.save(&s)?;
        Ok(Self::view(&s, volume))
    }

    /// Start a scrub (check, or repair).
    pub fn start_scrub(&self, volume: &str, repair: bool) -> Result<VolumeView, MgmtError> {
        let s = self.lock_for_change()?;
        Self::monitor(&s, volume)?
            .scrub(repair)
            .map_err(|e| from_op(volume, e))?;
        Ok(Self::view(&s, volume))
    }

    /// Stop a running scrub. A rebuild is not stopped: that would leave
    /// the volume degraded for nothing.
    pub fn stop_background(&self, volume: &str) -> Result<VolumeView, MgmtError> {
        let s = self.lock_for_change()?;
        let snap = Self::monitor(&s, volume)?.snapshot();
        match snap.rebuild.filter(|p| !p.is_finished()) {
            None => Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} has no scrub running"
            ))),
            Some(p) if p.slot != usize::MAX => Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} is rebuilding; a rebuild is not stopped (it would leave the volume degraded)"
            ))),
            Some(p) => {
                p.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(Self::view(&s, volume))
            }
        }
    }

    /// Limit every rebuild and scrub of the volume, the running one
    /// included, to `max` bytes per second (0: none), and to `min` while
    /// the volume serves guest IO (0: no yielding), as md's
    /// sync_speed_max/min; kept in the state file.
    pub fn set_rebuild_rate(
        &self,
        volume: &str,
        min: u64,
        max: u64,
    ) -> Result<VolumeView, MgmtError> {
        if max > 0 && min > max {
            return Err(invalid(
                "min_bytes_per_sec",
                format!("{min} is above the maximum {max}"),
            ));
        }
        let s = self.lock_for_change()?;
        Self::monitor(&s, volume)?.set_rate(min, max);
        self.save(&s)?;
        Ok(Self::view(&s, volume))
    }

    /// Mark a RAID1 member write-mostly (md's write-mostly: read only when
    /// no other in-sync member can serve), or clear the mark.
    pub fn set_write_mostly(
        &self,
        volume: &str,
        device: &str,
        on: bool,
    ) -> Result<VolumeView, MgmtError> {
        let s = self.lock_for_change()?;
        let m = Self::monitor(&s, volume)?;
        s.device("device", device)?;
        m.set_write_mostly(device, on)
            .map_err(|e| from_op(volume, e))?;
        self.save(&s)?;
        Ok(Self::view(&s, volume))
    }

    /// md's write-behind for a RAID1 (`limit` writes to write-mostly
    /// members in the background at once; 0 turns it off and waits for
    /// the ones in flight); kept in the state file. Needs the bitmap.
    pub fn set_write_behind(&self, volume: &str, limit: u32) -> Result<VolumeView, MgmtError> {
        if limit > 0 {
            check_write_behind(limit)?;
        }
        let mut s = self.lock_for_change()?;
        Self::monitor(&s, volume)?
            .set_write_behind(limit as u64)
            .map_err(|e| from_op(volume, e))?;
        if let Some(v) = s.volumes.get_mut(volume) {
            v.decl.write_behind = limit;
        }
        self.save(&s)?;
        Ok(Self::view(&s, volume))
    }

    /// Turn md's serialize_policy on or off for a RAID1 volume; kept in the
    /// state file.
    pub fn set_serialize(&self, volume: &str, on: bool) -> Result<VolumeView, MgmtError> {
        let mut s = self.lock_for_change()?;
        Self::monitor(&s, volume)?
            .set_serialize(on)
            .map_err(|e| from_op(volume, e))?;
        if let Some(v) = s.volumes.get_mut(volume) {
            v.decl.serialize = on;
        }
        self.save(&s)?;
        Ok(Self::view(&s, volume))
    }

    /// Hold writes to bytes `lo..hi` of a volume (md's suspend_lo and
    /// suspend_hi): once this returns none is in flight and new ones wait
    /// until [`resume_range`](Self::resume_range); reads go on. Not kept
    /// across a restart (md does not either).
    pub fn suspend_range(&self, volume: &str, lo: u64, hi: u64) -> Result<VolumeView, MgmtError> {
        let s = self.lock_for_change()?;
        let v = s.volume(volume)?;
        let info = v.volume.info();
        let bs = info.block_size as u64;
        if !lo.is_multiple_of(bs) || !hi.is_multiple_of(bs) {
            return Err(invalid(
                "lo_bytes",
                format!("lo and hi must be multiples of the block size {bs}"),
            ));
        }
        if hi <= lo || hi > info.size_bytes() {
            return Err(invalid(
                "hi_bytes",
                format!(
                    "the range {lo}..{hi} must be non-empty and end within the volume ({} bytes)",
                    info.size_bytes()
                ),
            ));
        }
        if let Some((a, b)) = v.volume.suspended_range().get() {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} already holds writes to {}..{}; resume it first",
                a * bs,
                b * bs
            )));
        }
        v.volume
            .suspend_range(lo / bs, hi / bs, Duration::from_secs(30))
            .map_err(|e| from_quiesce("volume", e))?;
        Ok(Self::view(&s, volume))
    }

    /// Let a volume's held writes go.
    pub fn resume_range(&self, volume: &str) -> Result<VolumeView, MgmtError> {
        let s = self.lock_for_change()?;
        let v = s.volume(volume)?;
        if v.volume.suspended_range().get().is_none() {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} holds no writes"
            )));
        }
        v.volume.resume_range();
        Ok(Self::view(&s, volume))
    }

    /// Change a two-member volume's level online (md's takeover): RAID1 to
    /// RAID5 with `chunk_kib` chunks (0: 64), or RAID5 to RAID1.
    pub fn takeover(
        &self,
        volume: &str,
        level: &str,
        chunk_kib: u32,
    ) -> Result<VolumeView, MgmtError> {
        let to = match Level::parse(level) {
            Some(Level::Raid1) => SbLevel::Raid1,
            Some(Level::Raid5) => SbLevel::Raid5,
            _ => return Err(invalid("level", format!("{level:?} is not raid1 or raid5"))),
        };
        let chunk_kib = if chunk_kib == 0 { 64 } else { chunk_kib };
        if !(4..=1024).contains(&chunk_kib) || !chunk_kib.is_power_of_two() {
            return Err(invalid(
                "chunk_kib",
                format!("{chunk_kib} is not a power of two in 4..=1024"),
            ));
        }
        let mut s = self.lock_for_change()?;
        Self::monitor(&s, volume)?
            .takeover(to, chunk_kib * 1024)
            .map_err(|e| from_op(volume, e))?;
        if let Some(v) = s.volumes.get_mut(volume) {
            v.level = if to == SbLevel::Raid5 {
                Level::Raid5
            } else {
                Level::Raid1
            };
            v.decl.level = v.level.name().to_string();
            v.decl.chunk_kib = chunk_kib;
            v.decl.layout = "left-symmetric".into();
        }
        self.save(&s)?;
        Ok(Self::view(&s, volume))
    }

    /// Give a RAID volume a write-intent bitmap (`chunk_kib` per region,
    /// 0 for the default), or take it away (md's `--grow --bitmap`).
    pub fn set_bitmap(
        &self,
        volume: &str,
        enabled: bool,
        chunk_kib: u32,
    ) -> Result<VolumeView, MgmtError> {
        check_bitmap_chunk(chunk_kib)?;
        let mut s = self.lock_for_change()?;
        let m = Self::monitor(&s, volume)?;
        m.set_bitmap(enabled.then(|| bitmap_chunk_bytes(chunk_kib)))
            .map_err(|e| from_op(volume, e))?;
        if let Some(v) = s.volumes.get_mut(volume) {
            v.decl.bitmap = enabled;
            v.decl.bitmap_chunk_kib = if enabled { chunk_kib } else { 0 };
        }
        self.save(&s)?;
        Ok(Self::view(&s, volume))
    }

    /// Give a RAID5 volume a journal online: `device` is formatted as its
    /// log and every write from then on goes through it (`mode`:
    /// write-through by default, or write-back).
    pub fn add_journal(
        &self,
        volume: &str,
        device: &str,
        mode: &str,
    ) -> Result<VolumeView, MgmtError> {
        check_name("device", device)?;
        let mode = if mode.is_empty() {
            crate::raid::journal::JournalMode::WriteThrough
        } else {
            crate::raid::journal::JournalMode::parse(mode).map_err(|e| invalid("mode", e))?
        };
        let mut s = self.lock_for_change()?;
        let v = s.volume(volume)?;
        if let Some(j) = v
            .decl
            .journal
            .as_deref()
            .filter(|_| v.checkpointer.is_some())
        {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} already has a journal ({j})"
            )));
        }
        let mut decl = v.decl.clone();
        decl.journal = Some(device.to_string());
        decl.journal_mode = mode.name().to_string();
        let level = v.level;
        let Some(jdev) = Self::check_journal(&s, &decl, level)? else {
            return Err(invalid("device", "is empty"));
        };
        let monitor = Self::monitor(&s, volume)?;
        let j = crate::raid::journal::Journal::format_with(jdev, mode).map_err(|e| {
            MgmtError::Internal(format!("volume {volume}: formatting journal {device}: {e}"))
        })?;
        monitor
            .set_journal(Some(j.clone()))
            .map_err(|e| from_op(volume, e))?;
        let v = s
            .volumes
            .get_mut(volume)
            .ok_or_else(|| MgmtError::NotFound(format!("volume {volume} does not exist")))?;
        v.checkpointer = Some(crate::raid::journal::Checkpointer::start(
            j,
            v.volume.clone(),
        ));
        v.decl = decl;
        self.save(&s)?;
        Ok(Self::view(&s, volume))
    }

    /// Take a RAID5 volume's journal away online. A write-back cache drains
    /// to the members first; the journal's device is free afterwards.
    pub fn remove_journal(&self, volume: &str) -> Result<VolumeView, MgmtError> {
        let mut s = self.lock_for_change()?;
        let v = s.volume(volume)?;
        let Some(c) = v.checkpointer.as_ref() else {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} has no journal"
            )));
        };
        let j = c.journal().clone();
        if j.mode() == crate::raid::journal::JournalMode::WriteBack {
            j.set_mode(
                crate::raid::journal::JournalMode::WriteThrough,
                &v.volume,
                Duration::from_secs(30),
            )
            .map_err(|e| {
                MgmtError::DeadlineExceeded(format!("volume {volume}: draining the journal: {e}"))
            })?;
        }
        let cached = j.cache().len();
        if cached > 0 {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume}: {cached} acknowledged blocks are still only in the journal's cache; retry once they have drained"
            )));
        }
        Self::monitor(&s, volume)?
            .set_journal(None)
            .map_err(|e| from_op(volume, e))?;
        let v = s
            .volumes
            .get_mut(volume)
            .ok_or_else(|| MgmtError::NotFound(format!("volume {volume} does not exist")))?;
        // Nothing reaches the journal any more: stop its checkpointer.
        v.checkpointer = None;
        v.decl.journal = None;
        v.decl.journal_mode = String::new();
        self.save(&s)?;
        Ok(Self::view(&s, volume))
    }

    /// Switch a volume's journal mode online (see `Journal::set_mode`).
    pub fn set_journal_mode(&self, volume: &str, mode: &str) -> Result<VolumeView, MgmtError> {
        if mode.is_empty() {
            return Err(invalid("mode", "write-through or write-back"));
        }
        let mode =
            crate::raid::journal::JournalMode::parse(mode).map_err(|e| invalid("mode", e))?;
        let mut s = self.lock_for_change()?;
        let v = s.volume(volume)?;
        let Some(c) = v.checkpointer.as_ref() else {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} has no journal"
            )));
        };
        let result = c
            .journal()
            .set_mode(mode, &v.volume, Duration::from_secs(30));
        // The mode in force is the journal's, whatever became of the drain.
        let now = c.journal().mode();
        if let Some(v) = s.volumes.get_mut(volume) {
            v.decl.journal_mode = now.name().to_string();
        }
        self.save(&s)?;
        result.map_err(|e| MgmtError::DeadlineExceeded(format!("volume {volume}: {e}")))?;
        Ok(Self::view(&s, volume))
    }

    // ---- exports ----

    /// Export a volume over vhost-user-blk.
    pub fn create_export(&self, mut decl: ExportDecl) -> Result<ExportView, MgmtError> {
        check_name("name", &decl.name)?;
        let mut s = self.lock_for_change()?;
        if s.exports.contains_key(&decl.name) {
            return Err(MgmtError::AlreadyExists(format!(
                "export {} already exists",
                decl.name
            )));
        }
        let volume = s.volume(&decl.volume)?.volume.clone();
        if !decl.socket.is_absolute() {
            return Err(invalid("socket", "must be an absolute path"));
        }
        if let Some(e) = s.exports.values().find(|e| e.decl.socket == decl.socket) {
            return Err(MgmtError::AlreadyExists(format!(
                "export {} already serves {}",
                e.decl.name,
                decl.socket.display()
            )));
        }
        if decl.num_queues == 0 {
            decl.num_queues = 1;
        }
        if decl.serial.is_empty() {
            decl.serial = decl.name.chars().take(20).collect();
        }
        if let Some(&c) = decl.queue_cores.iter().find(|&&c| c >= self.set.len()) {
            return Err(invalid(
                "queue_cores",
                format!(
                    "reactor {c} does not exist (reactors 0..{})",
                    self.set.len()
                ),
            ));
        }
        if decl.queue_cores.len() > decl.num_queues as usize {
            return Err(invalid(
                "queue_cores",
                format!(
                    "{} entries for {} queue(s)",
                    decl.queue_cores.len(),
                    decl.num_queues
                ),
            ));
        }
        let export = Export::create(
            &self.set,
            &volume,
            ExportOptions {
                socket: decl.socket.clone(),
                num_queues: decl.num_queues,
                read_only: decl.read_only,
                serial: decl.serial.clone(),
                queue_cores: decl.queue_cores.clone(),
            },
        )
        .map_err(from_export)?;
        let view = ExportView {
            decl: decl.clone(),
            connected: false,
            connections: 0,
        };
        s.exports.insert(decl.name.clone(), Exp { decl, export });
        self.save(&s)?;
        Ok(view)
    }

    /// Every export.
    pub fn list_exports(&self) -> Vec<ExportView> {
        self.lock()
            .exports
            .values()
            .map(|e| ExportView {
                decl: e.decl.clone(),
                connected: e.export.is_connected(),
                connections: e.export.connections(),
            })
            .collect()
    }

    /// Every export's name, volume and IO counters.
    pub fn export_stats(&self) -> Vec<(String, String, crate::export::stats::IoSnapshot)> {
        self.lock()
            .exports
            .values()
            .map(|e| (e.decl.name.clone(), e.decl.volume.clone(), e.export.stats()))
            .collect()
    }

    /// Delete an export; refused while a frontend is connected unless
    /// `force`.
    pub fn delete_export(&self, name: &str, force: bool) -> Result<(), MgmtError> {
        check_name("name", name)?;
        let mut s = self.lock_for_change()?;
        let e = s
            .exports
            .get_mut(name)
            .ok_or_else(|| MgmtError::NotFound(format!("export {name} does not exist")))?;
        e.export.delete(force).map_err(from_export)?;
        s.exports.remove(name);
        self.save(&s)
    }

    // ---- daemon ----

    /// Health of every volume.
    pub fn health(&self) -> Health {
        let mut problems = Vec::new();
        if self.set.is_stopped() {
            problems.push("the reactors have stopped".to_string());
        }
        for v in self.list_volumes() {
            if v.state != "optimal" {
                problems.push(format!("volume {} is {}", v.name, v.state));
            }
            if v.journal_state.is_some_and(|j| j.3) {
                problems.push(format!(
                    "volume {}: its journal device failed; writes go on without write-hole protection",
                    v.name
                ));
            }
        }
        Health {
            status: if problems.is_empty() {
                "ok"
            } else {
                "degraded"
            },
            problems,
        }
    }

    /// Stop serving: exports disconnect (in-flight IO drains), volumes are
    /// recorded clean. The state file keeps them for the next start.
    pub fn shutdown(&self) {
        let s = self.lock();
        if !self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = self.save(&s);
        }
        drop(s);
        self.shutdown_without_saving();
    }

    /// Stop everything, leaving the state file as it is (after a failed
    /// restore, so the file still says what should run).
    pub fn shutdown_without_saving(&self) {
        let mut s = self.lock();
        self.quiet.store(true, std::sync::atomic::Ordering::SeqCst);
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        for (name, mut e) in std::mem::take(&mut s.exports) {
            if let Err(err) = e.export.delete(true) {
                tracing::error!(export = name, error = %err, "deleting the export at shutdown");
            }
        }
        for (name, v) in std::mem::take(&mut s.volumes) {
            if let Some(m) = &v.monitor {
                if let Err(err) = m.close() {
                    tracing::error!(volume = name, error = %err, "recording a clean shutdown");
                }
            }
        }
    }
}

/// Whether two `file:` specifications name the same file.
/// The specification of a device grown to `size` bytes: the size it
/// names changes (a restart must find the file at that size); `file:PATH`
/// takes its size from the file. None for kinds that cannot be resized.
fn resized_spec(spec: &str, size: u64) -> Option<String> {
    let (kind, rest) = spec.split_once(':')?;
    match kind {
        "ram" | "null" => Some(format!("{kind}:{size}")),
        "file" => match crate::devspec::file_path(rest) {
            (path, Some(_)) => Some(format!("file:{path}:{size}")),
            (_, None) => Some(spec.to_string()),
        },
        _ => None,
    }
}

fn same_file(a: &str, b: &str) -> bool {
    let path = |s: &str| {
        let p = crate::devspec::file_path(s.trim_start_matches("file:")).0;
        std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p))
    };
    a.starts_with("file:") && b.starts_with("file:") && path(a) == path(b)
}
