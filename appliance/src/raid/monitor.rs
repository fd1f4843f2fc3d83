//! The volume's monitor: turns member failures reported by channels into a
//! new configuration generation, through the quiesce epoch.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bdev::{BdevError, BlockDevice};

use poller::ReactorSet;

use std::sync::atomic::AtomicU64;

use super::bitmap::{Bitmap, BitmapDaemon};
use super::geometry::Raid5Geometry;
use super::members::{device_id, Event, MemberSet, MemberState};
use super::rebuild::{RebuildProgress, Rebuilder, Rows, Scrubber};
use crate::volume::{Volume, VolumeConfig};

/// A RAID device that can describe the next generation. A level says
/// how its generations are built and how a rebuild or scrub walks it; the
/// member lifecycle itself is shared (`MemberSet`) and the defaults here
/// serve every level.
pub trait RaidDevice: BlockDevice {
    /// Members, rebuild state and what generations share.
    fn member_set(&self) -> &MemberSet;
    /// The same device over another member set (the next generation).
    fn with_member_set(&self, set: MemberSet) -> Arc<dyn RaidDevice>;
    /// The rows a rebuild or scrub walks.
    fn rows(&self) -> Rows;
    /// The members a rebuild of `slot` reads (and XORs).
    fn rebuild_sources(&self, slot: usize) -> Vec<usize>;
    /// RAID5 geometry, for a scrub that checks parity; `None` for mirrors.
    fn parity_geometry(&self) -> Option<Raid5Geometry>;
    /// How many members can be missing with no data lost.
    fn max_failures(&self) -> usize;
    /// The same device journalling its writes in `journal`, if the level
    /// has a journal (RAID5).
    fn with_journal(&self, _journal: Arc<super::journal::Journal>) -> Option<Arc<dyn RaidDevice>> {
        None
    }
    /// Its journal.
    fn journal(&self) -> Option<Arc<super::journal::Journal>> {
        None
    }
    /// The same device without its journal, if the level has one.
    fn without_journal(&self) -> Option<Arc<dyn RaidDevice>> {
        None
    }

    /// Member states in slot order.
    fn member_states(&self) -> Vec<MemberState> {
        self.member_set().states()
    }

    /// Identity of the device in each slot (see `members::device_id`).
    fn member_ids(&self) -> Vec<usize> {
        self.member_set()
            .members
            .iter()
            .map(|m| device_id(&m.dev))
            .collect()
    }

    /// The device in each slot.
    fn member_devices(&self) -> Vec<Arc<dyn BlockDevice>> {
        self.member_set()
            .members
            .iter()
            .map(|m| m.dev.clone())
            .collect()
    }

    /// The same device with `slot` failed.
    fn with_member_failed(&self, slot: usize) -> Result<Arc<dyn RaidDevice>, BdevError> {
        Ok(self.with_member_set(self.member_set().failed(&self.info().name, slot)?))
    }

    /// The same device with failed `slot` taken by `dev`, to be rebuilt
    /// from row `cursor` on (0 for a new member; a superblock checkpoint
    /// when resuming after a restart).
    fn with_member_replaced(
        &self,
        slot: usize,
        dev: Arc<dyn BlockDevice>,
        cursor: u64,
    ) -> Result<Arc<dyn RaidDevice>, BdevError> {
        let rows = self.rows();
        let info = self.info();
        let set = self.member_set().replaced(
            &info.name,
            slot,
            dev,
            cursor,
            rows.offset + rows.total,
            info.block_size,
        )?;
        Ok(self.with_member_set(set))
    }

    /// The same device with rebuilt `slot` in sync.
    fn with_member_in_sync(&self, slot: usize) -> Result<Arc<dyn RaidDevice>, BdevError> {
        Ok(self.with_member_set(self.member_set().in_sync(
            &self.info().name,
            slot,
            self.rows().count,
        )?))
    }

    /// Start rebuilding the replaced member as a poller on this reactor.
    fn start_rebuild(&self, ctx: &mut poller::Ctx) -> Result<Arc<RebuildProgress>, BdevError> {
        let set = self.member_set();
        let name = &self.info().name;
        let Some((slot, cursor)) = set.rebuilding.clone() else {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: nothing to rebuild"
            )));
        };
        let sources = self.rebuild_sources(slot);
        if sources.is_empty() {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: no member in sync to rebuild from"
            )));
        }
        spawn_rebuilder(self, ctx, slot, sources, None, cursor)
    }

    /// Start copying a hot replacement's slot to its new device as a
    /// poller on this reactor: a rebuild whose one source is the slot
    /// itself and whose target is the new device (index: the member count).
    fn start_replace(&self, ctx: &mut poller::Ctx) -> Result<Arc<RebuildProgress>, BdevError> {
        let set = self.member_set();
        let name = &self.info().name;
        let Some(r) = set.replacing.clone() else {
            return Err(BdevError::InvalidArgument(format!(
                "{name}: nothing to replace"
            )));
        };
        // The new device is the target, after the members.
        let target = set.members.len();
        spawn_rebuilder(self, ctx, target, vec![r.slot], Some(&r.dev), r.cursor)
    }

    /// The slots a scrub reads: every member, or for a degraded mirror
    /// the in-sync ones when two or more are left (a three-way mirror that
    /// lost one can still differ between the other two, and md resyncs
    /// it). A degraded RAID5 has nothing left to check against.
    fn scrub_members(&self) -> Result<Vec<usize>, String> {
        let set = self.member_set();
        let mut in_sync: Vec<usize> = (0..set.members.len())
            .filter(|&i| set.members[i].state == MemberState::InSync)
            .collect();
        // The first is a mirror repair's reference: not a write-mostly one
        // if another is in sync (with write-behind it may lag).
        in_sync.sort_by_key(|&i| set.members[i].write_mostly);
        let mirror = self.parity_geometry().is_none();
        let rebuilding = set
            .members
            .iter()
            .any(|m| m.state == MemberState::Rebuilding);
        if in_sync.len() == set.members.len() || (mirror && !rebuilding && in_sync.len() >= 2) {
            Ok(in_sync)
        } else if mirror {
            Err("a scrub needs two mirrors in sync and no rebuild running".into())
        } else {
            Err("a scrub needs every member in sync".into())
        }
    }

    /// Start a consistency check (or repair) as a poller on this reactor.
    /// Call it with the volume suspended: writes after it see the scrub.
    /// With `dirty`, only the regions its write-intent bitmap marks are
    /// walked (the resync after an unclean shutdown).
    fn start_scrub(
        &self,
        ctx: &mut poller::Ctx,
        repair: bool,
        dirty: Option<Arc<Bitmap>>,
    ) -> Result<Arc<RebuildProgress>, BdevError> {
        let set = self.member_set();
        let in_sync = self
            .scrub_members()
            .map_err(|m| BdevError::InvalidArgument(format!("{}: {m}", self.info().name)))?;
        // A failed slot's channel is never used; it goes to an in-sync
        // device, as a failed slot's own device may be gone.
        let channels = set
            .members
            .iter()
            .map(|m| match m.state {
                MemberState::InSync => m.dev.open_channel(),
                _ => set.members[in_sync[0]].dev.open_channel(),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rows = self.rows();
        let progress = Arc::new(RebuildProgress::new(
            usize::MAX,
            rows.count,
            Arc::new(AtomicU64::new(0)),
        ));
        set.scrubbing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut s = Scrubber::new(
            rows,
            self.parity_geometry(),
            channels,
            set.locks.clone(),
            progress.clone(),
            repair,
        )
        .reading(in_sync)
        .clearing_when_done(set.scrubbing.clone())
        .watching(set.activity.clone());
        if let Some(b) = dirty {
            s = s.only_dirty(b);
        }
        ctx.add_poller(move |_| s.poll());
        Ok(progress)
    }
}

/// Run a rebuild of `target` from `sources` on this reactor, with one
/// channel per member (and `extra`, the target when it is not a member,
/// after them), from row `cursor` on.
fn spawn_rebuilder<D: RaidDevice + ?Sized>(
    device: &D,
    ctx: &mut poller::Ctx,
    target: usize,
    sources: Vec<usize>,
    extra: Option<&Arc<dyn BlockDevice>>,
    cursor: Arc<AtomicU64>,
) -> Result<Arc<RebuildProgress>, BdevError> {
    let set = device.member_set();
    let channels = set
        .members
        .iter()
        .map(|m| &m.dev)
        .chain(extra)
        .map(|d| d.open_channel().map(|c| (c, device_id(d))))
        .collect::<Result<Vec<_>, _>>()?;
    let rows = device.rows();
    let progress = Arc::new(RebuildProgress::new(target, rows.count, cursor));
    let mut r = Rebuilder::new(
        rows,
        target,
        sources,
        channels,
        set.locks.clone(),
        progress.clone(),
        set.failures.clone(),
    )
    .watching(set.activity.clone());
    ctx.add_poller(move |_| r.poll());
    Ok(progress)
}

/// A consistent view of a volume's members, spares and background work.
pub struct Snapshot {
    /// Member states by slot.
    pub states: Vec<MemberState>,
    /// Device names by slot.
    pub members: Vec<String>,
    /// Write-mostly flags by slot.
    pub write_mostly: Vec<bool>,
    /// Spare device names.
    pub spares: Vec<String>,
    /// Members the level can lose without losing data.
    pub max_failures: usize,
    /// The running or last rebuild or scrub.
    pub rebuild: Option<Arc<RebuildProgress>>,
    /// The write-intent bitmap, if the volume keeps one.
    pub bitmap: Option<Arc<Bitmap>>,
    /// A hot replacement running: the slot and the new device's name.
    pub replacing: Option<(usize, String)>,
    /// RAID1: md's serialize_policy is on.
    pub serialize: bool,
    /// RAID1: md's write-behind limit (0: off) and the writes in the
    /// background now.
    pub write_behind: (u64, u64),
}

impl Snapshot {
    /// Whether the background work has ended and its outcome is in the
    /// member states: a rebuild's worker finishes a moment before the
    /// monitor marks the member in sync, and a caller that waited for
    /// "finished" must then see the volume optimal.
    pub fn settled(&self) -> bool {
        self.rebuild.as_ref().is_none_or(|p| {
            p.is_finished()
                && (p.slot == usize::MAX
                    || p.error().is_some()
                    || if p.slot == self.states.len() {
                        // A replacement's copy: settled once the new device
                        // has the slot (or the replacement was given up).
                        self.replacing.is_none()
                    } else {
                        self.states.get(p.slot) != Some(&MemberState::Rebuilding)
                    })
        })
    }
}

/// Applies member failures to a volume, replaces failed members with
/// spares and runs their rebuild; stops when every sender is gone.
pub struct Monitor {
    state: Arc<Mutex<MonitorState>>,
    thread: Option<JoinHandle<()>>,
    /// Tells the thread to end: it holds the volume's device, whose member
    /// channels hold the failure senders, so it would never see them gone.
    quit: Arc<std::sync::atomic::AtomicBool>,
    set: ReactorSet,
    volume: Volume,
}

/// Why an operator's change was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// The device is not bound to this volume (as a member or spare).
    #[error("{0}: not a member or spare of this volume")]
    NotFound(String),
    /// The device is already part of this volume.
    #[error("{0}: already a member or spare of this volume")]
    AlreadyExists(String),
    /// The change is not possible in the volume's state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The volume did not quiesce in time (IO in flight did not drain).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The reconfiguration itself failed.
    #[error("{0}")]
    Internal(String),
}

/// Why applying a change failed: the quiesce deadline passed (the caller
/// may retry), or anything else.
#[derive(Debug)]
enum ChangeError {
    Deadline(String),
    Other(String),
}

impl From<String> for ChangeError {
    fn from(s: String) -> ChangeError {
        ChangeError::Other(s)
    }
}

impl std::fmt::Display for ChangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangeError::Deadline(m) | ChangeError::Other(m) => f.write_str(m),
        }
    }
}

impl From<ChangeError> for OpError {
    fn from(e: ChangeError) -> OpError {
        match e {
            ChangeError::Deadline(m) => OpError::DeadlineExceeded(m),
            ChangeError::Other(m) => OpError::Internal(m),
        }
    }
}

struct MonitorState {
    current: Arc<dyn RaidDevice>,
    /// Where the volume's state is recorded (superblocks), if it has any.
    meta: Option<super::assembly::VolumeMeta>,
    spares: Vec<Arc<dyn BlockDevice>>,
    rebuild: Option<Arc<RebuildProgress>>,
    /// Rate limits for every rebuild and scrub (bytes/s, 0: none), like
    /// md's sync_speed_max, and the floor it yields to guest IO down to
    /// (sync_speed_min; 0: it does not yield).
    max_rate: u64,
    min_rate: u64,
    /// Writes the write-intent bitmap, if the volume keeps one.
    bitmap: Option<BitmapDaemon>,
}

impl MonitorState {
    /// Background work started: it runs under the volume's rate limit.
    fn started(&mut self, p: Arc<RebuildProgress>) {
        p.max_bytes_per_sec
            .store(self.max_rate, std::sync::atomic::Ordering::SeqCst);
        p.min_bytes_per_sec
            .store(self.min_rate, std::sync::atomic::Ordering::SeqCst);
        self.rebuild = Some(p);
    }
}

const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a running rebuild's cursor is written to the superblocks.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How soon the thread notices it should end.
const QUIT_POLL: Duration = Duration::from_millis(100);

/// Record how far a running rebuild got, so a restart resumes there.
fn checkpoint(s: &mut MonitorState) -> Result<(), String> {
    let Some(p) = s
        .rebuild
        .as_ref()
        .filter(|p| p.slot != usize::MAX && !p.is_finished())
    else {
        return Ok(());
    };
    let cursor = p.cursor.load(std::sync::atomic::Ordering::SeqCst);
    let cur = s.current.clone();
    let Some(meta) = s.meta.as_mut() else {
        return Ok(());
    };
    if meta.template.rebuild_checkpoint == cursor {
        return Ok(());
    }
    meta.template.rebuild_checkpoint = cursor;
    meta.record(cur.as_ref(), &cur.member_devices(), false)
        .map_err(|e| e.to_string())
}

fn publish(volume: &Volume, next: &Arc<dyn RaidDevice>) -> Result<(), ChangeError> {
    // The bitmap goes to the new member set from now on (a spare being
    // rebuilt included), before any of its writes can.
    if let Some(b) = &next.member_set().bitmap {
        b.set_members(super::assembly::live_members(next.as_ref()));
    }
    let dev: Arc<dyn BlockDevice> = next.clone();
    let behind = next.member_set().behind.clone();
    volume
        .quiesce()
        .reconfigure(CHANGE_TIMEOUT, |_| {
            // Writes still going to write-mostly members in the background
            // are part of the old generation's IO (md's barrier waits for
            // them too): a rebuild must not read a region one of them is
            // still writing.
            behind.drain(CHANGE_TIMEOUT)?;
            Ok::<_, String>((VolumeConfig { device: dev }, ()))
        })
        .map_err(|e| match e {
            poller::ReconfigureError::Quiesce(poller::QuiesceError::DeadlineExceeded {
                ..
            }) => ChangeError::Deadline(e.to_string()),
            e => ChangeError::Other(e.to_string()),
        })
}

/// Start the thread that writes `b`. Should that fail, every region is
/// marked dirty on the members at once, so no write ever waits for a bit
/// and an unclean shutdown resynchronises everything, as without a bitmap.
fn start_bitmap(name: &str, b: Arc<Bitmap>) -> BitmapDaemon {
    match BitmapDaemon::start(name, b.clone()) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(volume = name, error = %e, "write-intent bitmap thread not started; marking every region dirty");
            let all = b.all_dirty();
            let members = b.members();
            b.write_to(&members, &all);
            b.load(&all);
            BitmapDaemon::stopped(b)
        }
    }
}

/// The monitor thread: apply events as they come, checkpoint a running
/// rebuild once a second, end when told or when every sender is gone.
fn watch(
    rx: Receiver<Event>,
    st: &Mutex<MonitorState>,
    set: &ReactorSet,
    volume: &Volume,
    quit: &std::sync::atomic::AtomicBool,
) {
    let mut last_checkpoint = std::time::Instant::now();
    while !quit.load(std::sync::atomic::Ordering::SeqCst) {
        let ev = match rx.recv_timeout(QUIT_POLL) {
            Ok(ev) => Some(ev),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
        let res = match ev {
            Some(ev) => handle(set, volume, &mut s, ev),
            None if last_checkpoint.elapsed() >= CHECKPOINT_EVERY => {
                last_checkpoint = std::time::Instant::now();
                checkpoint(&mut s).map_err(ChangeError::from)
            }
            None => Ok(()),
        };
        if let Err(e) = res {
            tracing::error!(volume = volume.name(), error = %e, "volume reconfiguration");
        }
    }
}

impl Monitor {
    /// Watch `rx` for events of `volume`, whose device is `device`; rebuilds
    /// run on reactor `rebuild_core` of `set`.
    pub fn start(
        set: &ReactorSet,
        volume: Volume,
        device: Arc<dyn RaidDevice>,
        rx: Receiver<Event>,
        spares: Vec<Arc<dyn BlockDevice>>,
    ) -> Monitor {
        let bitmap = device
            .member_set()
            .bitmap
            .clone()
            .map(|b| start_bitmap(volume.name(), b));
        let state = Arc::new(Mutex::new(MonitorState {
            current: device,
            meta: None,
            spares,
            rebuild: None,
            max_rate: 0,
            min_rate: 0,
            bitmap,
        }));
        let (set_outer, vol_outer) = (set.clone(), volume.clone());
        let (st, set) = (state.clone(), set.clone());
        let quit = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let q = quit.clone();
        let thread = std::thread::Builder::new()
            .name(format!("monitor-{}", volume.name()))
            .spawn(move || watch(rx, &st, &set, &volume, &q))
            .ok();
        Monitor {
            state,
            thread,
            quit,
            set: set_outer,
            volume: vol_outer,
        }
    }

    /// An operator fails the member on device `name` (md's `--fail`).
    /// Refused if it is not bound to this volume, already failed, or if
    /// losing it would lose data.
    pub fn fail_member(&self, name: &str) -> Result<(), OpError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let devs = s.current.member_devices();
        let states = s.current.member_states();
        let Some(slot) = (0..devs.len())
            .find(|&i| devs[i].info().name == name && states[i] != MemberState::Failed)
        else {
            return Err(if devs.iter().any(|d| d.info().name == name) {
                OpError::FailedPrecondition(format!("{name} has already failed"))
            } else {
                OpError::NotFound(name.to_string())
            });
        };
        let degraded = states
            .iter()
            .filter(|&&st| st != MemberState::InSync)
            .count();
        if states[slot] == MemberState::InSync && degraded >= s.current.max_failures() {
            return Err(OpError::FailedPrecondition(format!(
                "failing {name} would lose data: {degraded} member(s) already missing or rebuilding"
            )));
        }
        let ev = Event::Failed(super::members::MemberFailure {
            member: slot,
            device: super::members::device_id(&devs[slot]),
            error: bdev::IoError::DeviceFailed,
        });
        handle(&self.set, &self.volume, &mut s, ev).map_err(OpError::from)
    }

    /// Give the volume a journal, or take it away, through the quiesce
    /// epoch: once this returns, every write goes through the new one (or
    /// straight to the members), and nothing is in flight through the old.
    pub fn set_journal(
        &self,
        journal: Option<Arc<super::journal::Journal>>,
    ) -> Result<(), OpError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if journal.is_some() && s.current.member_set().bitmap.is_some() {
            return Err(OpError::FailedPrecondition(
                "the volume keeps a write-intent bitmap; remove it before adding a journal (the journal makes it redundant)".into(),
            ));
        }
        let next = match journal {
            Some(j) => s.current.with_journal(j),
            None => s.current.without_journal(),
        }
        .ok_or_else(|| OpError::FailedPrecondition("only a RAID5 volume has a journal".into()))?;
        publish(&self.volume, &next)?;
        s.current = next;
        Ok(())
    }

    /// Replace in-sync member `name` by `dev` without ever being degraded
    /// (md's --replace): `dev` gets every write to the slot while the slot
    /// is copied to it in the background; then it takes the slot, in sync,
    /// and the old device is free. A member failing meanwhile ends it.
    pub fn replace_member(
        &self,
        name: &str,
        dev: Arc<dyn BlockDevice>,
    ) -> Result<Arc<RebuildProgress>, OpError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let devs = s.current.member_devices();
        let states = s.current.member_states();
        let Some(slot) = devs.iter().position(|d| d.info().name == name) else {
            return Err(OpError::NotFound(name.to_string()));
        };
        if states[slot] != MemberState::InSync {
            return Err(OpError::FailedPrecondition(format!(
                "{name} is not in sync; a failed member is replaced by adding a spare"
            )));
        }
        let new = dev.info().name.clone();
        if devs.iter().any(|d| d.info().name == new)
            || s.spares.iter().any(|d| d.info().name == new)
        {
            return Err(OpError::AlreadyExists(new));
        }
        if s.rebuild.as_ref().is_some_and(|p| !p.is_finished()) {
            return Err(OpError::FailedPrecondition(
                "a rebuild, scrub or replacement is already running".into(),
            ));
        }
        let cur = s.current.clone();
        let rows = cur.rows();
        let set = cur
            .member_set()
            .with_replacement(&cur.info().name, slot, dev, rows.offset + rows.total)
            .map_err(|e| OpError::FailedPrecondition(e.to_string()))?;
        let next = cur.with_member_set(set);
        publish(&self.volume, &next)?;
        s.current = next.clone();
        let core = self.set.len() - 1;
        let progress = self
            .set
            .call(core, CHANGE_TIMEOUT, move |ctx| {
                next.start_replace(ctx).map_err(|e| e.to_string())
            })
            .map_err(OpError::Internal)?
            .map_err(OpError::Internal)?;
        tracing::info!(
            volume = self.volume.name(),
            member = name,
            with = new,
            "replacement started"
        );
        s.started(progress.clone());
        Ok(progress)
    }

    /// Give the volume a write-intent bitmap of `chunk_bytes` regions, or
    /// (with `None`) take it away; through the quiesce epoch and recorded
    /// in the superblocks.
    pub fn set_bitmap(&self, chunk_bytes: Option<u64>) -> Result<(), OpError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let cur = s.current.clone();
        let has = cur.member_set().bitmap.is_some();
        let Some(template) = s.meta.as_ref().map(|m| m.template.clone()) else {
            return Err(OpError::FailedPrecondition(
                "the volume keeps no superblocks to record a bitmap in".into(),
            ));
        };
        let next = match chunk_bytes {
            Some(_) if has => {
                return Err(OpError::FailedPrecondition(
                    "the volume already keeps a write-intent bitmap".into(),
                ))
            }
            Some(_) if cur.journal().is_some() => return Err(OpError::FailedPrecondition(
                "the volume has a journal, which already closes the write hole; remove it first"
                    .into(),
            )),
            Some(chunk) => {
                let b = super::assembly::new_bitmap(cur.as_ref(), &template, chunk)
                    .map_err(OpError::FailedPrecondition)?;
                cur.with_member_set(cur.member_set().with_bitmap(Some(b)))
            }
            None if !has => return Ok(()),
            None if cur.member_set().behind.limit() > 0 => {
                return Err(OpError::FailedPrecondition(
                    "write-behind needs the bitmap; turn write-behind off first".into(),
                ))
            }
            None => cur.with_member_set(cur.member_set().with_bitmap(None)),
        };
        publish(&self.volume, &next)?;
        if let Some(b) = next.member_set().bitmap.clone() {
            // Writes from before the bitmap may still sit in the members'
            // caches; they must be durable before the superblocks say
            // that only marked regions can be inconsistent.
            for d in super::assembly::live_members(next.as_ref()) {
                super::journal::sync(d.as_ref(), bdev::IoOp::Flush, 0, &mut [])
                    .map_err(OpError::Internal)?;
            }
            s.bitmap = Some(start_bitmap(self.volume.name(), b));
        } else {
            s.bitmap = None;
        }
        s.current = next.clone();
        let rpb = next
            .member_set()
            .bitmap
            .as_ref()
            .map_or(0, |b| b.rows_per_bit());
        if let Some(meta) = s.meta.as_mut() {
            meta.template.bitmap_rows_per_bit = rpb;
            meta.record(next.as_ref(), &next.member_devices(), false)
                .map_err(|e| OpError::Internal(e.to_string()))?;
        }
        Ok(())
    }

    /// Change the level of a two-member volume online (md's takeover):
    /// a RAID1 of two becomes a RAID5 of two with `chunk_bytes` chunks, or
    /// back. The members stay as they are, since a two-member RAID5's
    /// parity is a copy of its one data chunk: the same bytes at the same
    /// places as a mirror. Through the quiesce epoch, recorded in the
    /// superblocks.
    pub fn takeover(&self, to: super::superblock::Level, chunk_bytes: u32) -> Result<(), OpError> {
        use super::superblock::Level;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let cur = s.current.clone();
        let name = cur.info().name.clone();
        let now = if cur.parity_geometry().is_some() {
            Level::Raid5
        } else {
            Level::Raid1
        };
        let precondition = |m: String| Err(OpError::FailedPrecondition(m));
        if now == to {
            return precondition(format!("{name} is already {to:?}"));
        }
        let set = cur.member_set();
        if set.members.len() != 2 {
            return precondition(format!(
                "takeover needs exactly two members; {name} has {} (md reshapes first)",
                set.members.len()
            ));
        }
        if set.members.iter().any(|m| m.state != MemberState::InSync) {
            return precondition(format!("{name}: takeover needs both members in sync"));
        }
        if s.rebuild.as_ref().is_some_and(|p| !p.is_finished()) {
            return precondition(format!("{name}: a rebuild or scrub is running"));
        }
        if cur.journal().is_some() {
            return precondition(format!("{name}: remove the journal first"));
        }
        if set.bitmap.is_some() {
            return precondition(format!(
                "{name}: remove the write-intent bitmap first (its regions are counted in the level's rows)"
            ));
        }
        if set.members.iter().any(|m| m.write_mostly) {
            return precondition(format!(
                "{name}: clear write-mostly first (a RAID5 reads every member)"
            ));
        }
        if set.serialize.load(std::sync::atomic::Ordering::SeqCst) {
            return precondition(format!(
                "{name}: turn the serialize policy off first (a RAID1 setting)"
            ));
        }
        if set.behind.limit() > 0 {
            return precondition(format!(
                "{name}: turn write-behind off first (a RAID1 setting)"
            ));
        }
        let Some(template) = s.meta.as_ref().map(|m| m.template.clone()) else {
            return precondition(format!("{name} keeps no superblocks to record a level in"));
        };
        let layout = super::geometry::Layout::LeftSymmetric;
        let next: Arc<dyn RaidDevice> = match to {
            Level::Raid5 => Arc::new(
                super::raid5::Raid5Device::over(
                    &name,
                    set.clone(),
                    chunk_bytes,
                    layout,
                    template.data_offset,
                )
                .map_err(|e| OpError::FailedPrecondition(e.to_string()))?,
            ),
            Level::Raid1 => Arc::new(
                super::raid1::Raid1Device::over(&name, set.clone(), template.data_offset)
                    .map_err(|e| OpError::FailedPrecondition(e.to_string()))?,
            ),
        };
        if next.info().num_blocks != cur.info().num_blocks {
            return precondition(format!(
                "{name}: as {to:?} it would hold {} blocks instead of {}; the member data size must be a multiple of the chunk",
                next.info().num_blocks,
                cur.info().num_blocks
            ));
        }
        publish(&self.volume, &next)?;
        s.current = next.clone();
        if let Some(meta) = s.meta.as_mut() {
            meta.template.level = to;
            meta.template.layout = layout;
            meta.template.chunk_bytes = chunk_bytes;
            meta.record(next.as_ref(), &next.member_devices(), false)
                .map_err(|e| OpError::Internal(e.to_string()))?;
        }
        tracing::info!(volume = name, level = ?to, "takeover done");
        Ok(())
    }

    /// md's write-behind on a mirror: writes are acknowledged once the
    /// members that are not write-mostly have them, and go on to the
    /// write-mostly ones in the background, at most `limit` at once (0
    /// turns it off; once this returns no write is in the background).
    /// Needs the write-intent bitmap, as md does: a crash must leave the
    /// regions of background writes marked for the resync.
    pub fn set_write_behind(&self, limit: u64) -> Result<(), OpError> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let set = s.current.member_set();
        if s.current.parity_geometry().is_some() {
            return Err(OpError::FailedPrecondition(
                "write-behind applies to the write-mostly members of a RAID1".into(),
            ));
        }
        if limit > 0 && set.bitmap.is_none() {
            return Err(OpError::FailedPrecondition(
                "write-behind needs a write-intent bitmap (a crash must leave the regions of background writes marked); add one first".into(),
            ));
        }
        set.behind.set_limit(limit);
        if limit == 0 {
            // Writes that went behind drain here.
            let _quiet = self
                .volume
                .suspend(CHANGE_TIMEOUT)
                .map_err(|e| OpError::DeadlineExceeded(e.to_string()))?;
            set.behind
                .drain(CHANGE_TIMEOUT)
                .map_err(OpError::DeadlineExceeded)?;
        }
        Ok(())
    }

    /// md's serialize_policy on a mirror: with it on, overlapping writes
    /// reach the members one after the other (each locks its regions), so
    /// concurrent writes from several cores never leave the mirrors
    /// different. Once this returns, no write in flight predates it.
    pub fn set_serialize(&self, on: bool) -> Result<(), OpError> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.current.parity_geometry().is_some() {
            return Err(OpError::FailedPrecondition(
                "serialize_policy applies to RAID1; RAID5 writes are serialised per stripe already"
                    .into(),
            ));
        }
        s.current
            .member_set()
            .serialize
            .store(on, std::sync::atomic::Ordering::SeqCst);
        // Writes that started without locking drain here.
        drop(
            self.volume
                .suspend(CHANGE_TIMEOUT)
                .map_err(|e| OpError::DeadlineExceeded(e.to_string()))?,
        );
        Ok(())
    }

    /// Mark a mirror member write-mostly (read only when no other in-sync
    /// member can serve), or clear it. Through the quiesce epoch, and
    /// recorded in the superblocks.
    pub fn set_write_mostly(&self, name: &str, on: bool) -> Result<(), OpError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.current.parity_geometry().is_some() {
            return Err(OpError::FailedPrecondition(
                "write-mostly applies to RAID1 mirrors; a RAID5 reads every member".into(),
            ));
        }
        let devs = s.current.member_devices();
        let Some(slot) = devs.iter().position(|d| d.info().name == name) else {
            return Err(OpError::NotFound(name.to_string()));
        };
        if s.current.member_set().members[slot].write_mostly == on {
            return Ok(());
        }
        let set = s
            .current
            .member_set()
            .with_write_mostly(&s.current.info().name, slot, on)
            .map_err(|e| OpError::Internal(e.to_string()))?;
        let next = s.current.with_member_set(set);
        publish(&self.volume, &next)?;
        s.current = next;
        record_changes(&mut s)?;
        Ok(())
    }

    /// Start a scrub: count parity mismatches (md's `check`), and with
    /// `repair` rewrite them from the data. Only on a healthy volume.
    pub fn scrub(&self, repair: bool) -> Result<Arc<RebuildProgress>, OpError> {
        self.scrub_regions(repair, None)
    }

    /// A scrub of the regions `dirty` marks, or of everything.
    fn scrub_regions(
        &self,
        repair: bool,
        dirty: Option<Arc<Bitmap>>,
    ) -> Result<Arc<RebuildProgress>, OpError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.current
            .scrub_members()
            .map_err(OpError::FailedPrecondition)?;
        if s.rebuild.as_ref().is_some_and(|p| !p.is_finished()) {
            return Err(OpError::FailedPrecondition(
                "a rebuild or scrub is already running".into(),
            ));
        }
        let cur = s.current.clone();
        let core = self.set.len() - 1;
        // Start it with the volume suspended, so every write after it sees
        // the scrub (RAID1 writes then take region locks).
        let _quiet = self
            .volume
            .suspend(CHANGE_TIMEOUT)
            .map_err(|e| OpError::Internal(e.to_string()))?;
        // Writes still going to write-mostly members would read as
        // mismatches (and a repair could copy over them).
        cur.member_set()
            .behind
            .drain(CHANGE_TIMEOUT)
            .map_err(OpError::DeadlineExceeded)?;
        let progress = self
            .set
            .call(core, CHANGE_TIMEOUT, move |ctx| {
                cur.start_scrub(ctx, repair, dirty)
                    .map_err(|e| e.to_string())
            })
            .map_err(OpError::Internal)?
            .map_err(OpError::FailedPrecondition)?;
        s.started(progress.clone());
        Ok(progress)
    }

    /// Add a hot spare; it is used at once if a slot is failed.
    pub fn add_spare(&self, dev: Arc<dyn BlockDevice>) -> Result<(), OpError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let name = dev.info().name.clone();
        let bound = s
            .current
            .member_devices()
            .iter()
            .any(|d| d.info().name == name)
            || s.spares.iter().any(|d| d.info().name == name);
        if bound {
            return Err(OpError::AlreadyExists(name));
        }
        s.spares.push(dev);
        let failed = s
            .current
            .member_states()
            .iter()
            .position(|&st| st == MemberState::Failed);
        match failed {
            Some(slot) => start_spare(&self.set, &self.volume, &mut s, slot).map_err(OpError::from),
            None => Ok(()),
        }
    }

    /// Remove a hot spare that is not in use.
    pub fn remove_spare(&self, name: &str) -> Result<(), OpError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.spares.iter().position(|d| d.info().name == name) {
            Some(i) => {
                s.spares.remove(i);
                Ok(())
            }
            None => Err(OpError::NotFound(name.to_string())),
        }
    }

    /// Record every change in the members' superblocks from now on.
    pub fn set_meta(&self, meta: super::assembly::VolumeMeta) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).meta = Some(meta);
    }

    /// The volume goes into service: its superblocks say "dirty" until
    /// [`close`](Self::close), so a crash in between is noticed at the
    /// next assembly. If the last shutdown was not clean, parity is
    /// resynchronised first (md's resync: a repairing scrub, in the
    /// background, IO allowed).
    pub fn open(&self, was_clean: bool) -> Result<Option<Arc<RebuildProgress>>, OpError> {
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let cur = s.current.clone();
            if let Some(meta) = s.meta.as_mut() {
                meta.record(cur.as_ref(), &cur.member_devices(), false)
                    .map_err(|e| OpError::Internal(e.to_string()))?;
            }
        }
        // A rebuild interrupted by the restart goes on from its checkpoint.
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.current.member_states().contains(&MemberState::Rebuilding) {
                let cur = s.current.clone();
                let core = self.set.len() - 1;
                let progress = self
                    .set
                    .call(core, CHANGE_TIMEOUT, move |ctx| {
                        cur.start_rebuild(ctx).map_err(|e| e.to_string())
                    })
                    .map_err(OpError::Internal)?
                    .map_err(OpError::Internal)?;
                tracing::info!(
                    volume = self.volume.name(),
                    slot = progress.slot,
                    from = progress.cursor.load(std::sync::atomic::Ordering::SeqCst),
                    "rebuild resumed"
                );
                s.started(progress.clone());
                return Ok(Some(progress));
            }
        }
        if was_clean {
            return Ok(None);
        }
        let scrubbable = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .scrub_members();
        if scrubbable.is_err() {
            // A degraded RAID5 (or a mirror down to one) after a crash may
            // hold stripes whose parity does not match their data; nothing
            // can tell which. Say so.
            tracing::warn!(volume = self.volume.name(), "unclean shutdown of a degraded volume: stripes written at the crash may be inconsistent");
            return Ok(None);
        }
        let bitmap = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .member_set()
            .bitmap
            .clone();
        if let Some(b) = &bitmap {
            let dirty = b.dirty_regions();
            if dirty == 0 {
                tracing::info!(
                    volume = self.volume.name(),
                    "unclean shutdown, but the write-intent bitmap marks no region: no resync needed"
                );
                b.thaw();
                return Ok(None);
            }
            tracing::warn!(
                volume = self.volume.name(),
                regions = dirty,
                of = b.bits(),
                "unclean shutdown: resynchronising the regions the write-intent bitmap marks"
            );
            // Its bits stay (frozen at assembly) until the resync has
            // covered them.
        } else {
            tracing::warn!(
                volume = self.volume.name(),
                "unclean shutdown: resynchronising parity"
            );
        }
        self.scrub_regions(true, bitmap).map(Some)
    }

    /// Clean shutdown: record "clean" in the superblocks. Call with no IO
    /// running (after the exports are gone).
    pub fn close(&self) -> Result<(), OpError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = s.rebuild.as_ref() {
            p.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            let t = std::time::Instant::now();
            while !p.is_finished() && t.elapsed() < CHANGE_TIMEOUT {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // The bitmap thread ends first: nothing is written after "clean".
        s.bitmap = None;
        let cur = s.current.clone();
        // A cancelled resync leaves the volume dirty, as it is.
        let resync_done = s.rebuild.as_ref().is_none_or(|p| p.error().is_none());
        if let Some(meta) = s.meta.as_mut() {
            meta.record(cur.as_ref(), &cur.member_devices(), resync_done)
                .map_err(|e| OpError::Internal(e.to_string()))?;
        }
        Ok(())
    }

    /// Member states of the current generation.
    pub fn member_states(&self) -> Vec<MemberState> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .member_states()
    }

    /// The devices in the slots of the current generation.
    pub fn member_devices(&self) -> Vec<Arc<dyn BlockDevice>> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .member_devices()
    }

    /// The running or last rebuild.
    pub fn rebuild(&self) -> Option<Arc<RebuildProgress>> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rebuild
            .clone()
    }

    /// Limit every rebuild and scrub, the running one included, to
    /// `max` bytes per second (0: no limit), and while the volume serves
    /// guest IO to `min` (0: it does not yield), as md's sync_speed_max and
    /// sync_speed_min.
    pub fn set_rate(&self, min: u64, max: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.max_rate = max;
        s.min_rate = min;
        if let Some(p) = &s.rebuild {
            p.max_bytes_per_sec
                .store(max, std::sync::atomic::Ordering::SeqCst);
            p.min_bytes_per_sec
                .store(min, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The limits set by [`set_rate`](Self::set_rate): (min, max).
    pub fn rate(&self) -> (u64, u64) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.min_rate, s.max_rate)
    }

    /// What an operator sees of the volume now.
    pub fn snapshot(&self) -> Snapshot {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Snapshot {
            states: s.current.member_states(),
            members: s
                .current
                .member_devices()
                .iter()
                .map(|d| d.info().name.clone())
                .collect(),
            write_mostly: s
                .current
                .member_set()
                .members
                .iter()
                .map(|m| m.write_mostly)
                .collect(),
            spares: s.spares.iter().map(|d| d.info().name.clone()).collect(),
            max_failures: s.current.max_failures(),
            rebuild: s.rebuild.clone(),
            bitmap: s.current.member_set().bitmap.clone(),
            replacing: s
                .current
                .member_set()
                .replacing
                .as_ref()
                .map(|r| (r.slot, r.dev.info().name.clone())),
            serialize: s
                .current
                .member_set()
                .serialize
                .load(std::sync::atomic::Ordering::SeqCst),
            write_behind: {
                let b = &s.current.member_set().behind;
                (b.limit(), b.inflight())
            },
        }
    }

    /// Spares left.
    pub fn spares(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .spares
            .len()
    }
}

fn handle(
    set: &ReactorSet,
    volume: &Volume,
    s: &mut MonitorState,
    ev: Event,
) -> Result<(), ChangeError> {
    let res = apply(set, volume, s, ev);
    // Whatever changed is recorded before the next event.
    record_changes(s)?;
    res
}

/// Write the members' superblocks if their states or flags changed.
fn record_changes(s: &mut MonitorState) -> Result<(), ChangeError> {
    if let Some(meta) = s.meta.as_mut() {
        let cur = s.current.clone();
        let codes: Vec<u8> = cur.member_set().members.iter().map(|m| m.code()).collect();
        if codes != meta.template.slot_states {
            meta.record(cur.as_ref(), &cur.member_devices(), false)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn apply(
    set: &ReactorSet,
    volume: &Volume,
    s: &mut MonitorState,
    ev: Event,
) -> Result<(), ChangeError> {
    match ev {
        Event::Failed(f) => {
            if s.current.member_states().get(f.member) == Some(&MemberState::Failed)
                || s.current.member_ids().get(f.member) != Some(&f.device)
            {
                return Ok(()); // already handled, or about a device since replaced
            }
            let next = s
                .current
                .with_member_failed(f.member)
                .map_err(|e| e.to_string())?;
            publish(volume, &next)?;
            tracing::warn!(volume = volume.name(), member = f.member, error = %f.error, "member marked failed");
            s.current = next;
            // A rebuild onto this slot stops, and so does a replacement's
            // copy (the new generation has none); wait for it so the device
            // is no longer written when it is handed back.
            let copy = s.current.member_states().len();
            if let Some(p) = s
                .rebuild
                .as_ref()
                .filter(|p| (p.slot == f.member || p.slot == copy) && !p.is_finished())
            {
                p.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                let t = std::time::Instant::now();
                while !p.is_finished() && t.elapsed() < CHANGE_TIMEOUT {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            start_spare(set, volume, s, f.member)
        }
        Event::Rebuilt(slot) if slot == s.current.member_states().len() => {
            finish_replace(volume, s)
        }
        Event::RebuildAborted(slot, why) if slot == s.current.member_states().len() => {
            // The copy stopped or the new device failed a write: the slot
            // keeps its device; writes stop going to the new one.
            if s.current.member_set().replacing.is_none() {
                return Ok(());
            }
            tracing::error!(volume = volume.name(), error = %why, "replacement given up");
            if let Some(p) = s.rebuild.as_ref().filter(|p| !p.is_finished()) {
                p.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            let next = s
                .current
                .with_member_set(s.current.member_set().replacement_over(false));
            publish(volume, &next)?;
            s.current = next;
            Ok(())
        }
        Event::Rebuilt(slot) => {
            if s.current.member_states().get(slot) != Some(&MemberState::Rebuilding) {
                return Ok(()); // the slot failed meanwhile
            }
            let next = s
                .current
                .with_member_in_sync(slot)
                .map_err(|e| e.to_string())?;
            publish(volume, &next)?;
            tracing::info!(
                volume = volume.name(),
                slot,
                "rebuild finished; member in sync"
            );
            // Every row was rewritten from the others: the regions a crash
            // left marked are consistent now.
            if let Some(b) = &next.member_set().bitmap {
                b.thaw();
            }
            s.current = next;
            Ok(())
        }
        Event::RebuildAborted(slot, why) => {
            tracing::error!(volume = volume.name(), slot, error = %why, "rebuild aborted");
            Ok(())
        }
    }
}

/// The copy of a hot replacement is done: the new device takes the slot.
fn finish_replace(volume: &Volume, s: &mut MonitorState) -> Result<(), ChangeError> {
    let Some(r) = s.current.member_set().replacing.clone() else {
        return Ok(()); // given up meanwhile
    };
    // What the copy wrote must be durable before the superblocks name it.
    super::journal::sync(r.dev.as_ref(), bdev::IoOp::Flush, 0, &mut [])?;
    let old = s.current.member_devices()[r.slot].info().name.clone();
    let next = s
        .current
        .with_member_set(s.current.member_set().replacement_over(true));
    publish(volume, &next)?;
    s.current = next;
    if let Some(meta) = s.meta.as_mut() {
        meta.member_uuids[r.slot] = *uuid::Uuid::new_v4().as_bytes();
        let cur = s.current.clone();
        meta.record(cur.as_ref(), &cur.member_devices(), false)
            .map_err(|e| e.to_string())?;
    }
    tracing::info!(volume = volume.name(), slot = r.slot, old = old, new = %r.dev.info().name, "replacement finished; the old device is free");
    Ok(())
}

/// Put a spare into failed `slot` and start rebuilding it.
fn start_spare(
    set: &ReactorSet,
    volume: &Volume,
    s: &mut MonitorState,
    slot: usize,
) -> Result<(), ChangeError> {
    let Some(spare) = s.spares.first().cloned() else {
        return Ok(());
    };
    let next = match s.current.with_member_replaced(slot, spare, 0) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(volume = volume.name(), slot, error = %e, "spare not used");
            return Ok(());
        }
    };
    publish(volume, &next)?;
    s.spares.remove(0);
    s.current = next.clone();
    // The rebuild runs on the last reactor, away from reactor 0 which
    // usually carries the first queues.
    let core = set.len() - 1;
    let progress = set.call(core, CHANGE_TIMEOUT, move |ctx| {
        next.start_rebuild(ctx).map_err(|e| e.to_string())
    })??;
    tracing::info!(
        volume = volume.name(),
        slot,
        stripes = progress.total,
        "rebuild started onto a spare"
    );
    s.started(progress);
    Ok(())
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.quit.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn snap(states: Vec<MemberState>, p: Option<Arc<RebuildProgress>>) -> Snapshot {
        Snapshot {
            members: states.iter().map(|_| String::new()).collect(),
            write_mostly: states.iter().map(|_| false).collect(),
            states,
            spares: vec![],
            max_failures: 1,
            rebuild: p,
            bitmap: None,
            replacing: None,
            serialize: false,
            write_behind: (0, 0),
        }
    }

    #[test]
    fn a_rebuild_is_settled_only_once_its_member_is_in_sync() {
        use MemberState::{InSync, Rebuilding};
        assert!(snap(vec![InSync, InSync], None).settled());
        let p = Arc::new(RebuildProgress::new(0, 8, Arc::new(AtomicU64::new(8))));
        let s = snap(vec![Rebuilding, InSync], Some(p.clone()));
        assert!(!s.settled(), "still running");
        p.mark_finished(None);
        assert!(!s.settled(), "worker done, monitor has not applied it");
        assert!(snap(vec![InSync, InSync], Some(p.clone())).settled());
        let aborted = Arc::new(RebuildProgress::new(0, 8, Arc::new(AtomicU64::new(3))));
        aborted.mark_finished(Some("cancelled"));
        assert!(snap(vec![Rebuilding, InSync], Some(aborted)).settled());
        let scrub = Arc::new(RebuildProgress::new(
            usize::MAX,
            8,
            Arc::new(AtomicU64::new(8)),
        ));
        assert!(!snap(vec![InSync, InSync], Some(scrub.clone())).settled());
        scrub.mark_finished(None);
        assert!(snap(vec![InSync, InSync], Some(scrub)).settled());
    }
}
