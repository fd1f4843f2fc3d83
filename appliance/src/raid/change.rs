//! Every change to a RAID volume as a value, and the plan for it: what the
//! next generation is, which device roles it claims and frees, what it
//! records and which background work it starts. Planning is pure: it
//! validates the change against the current generation and touches
//! nothing; `transaction` carries a plan out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bdev::BlockDevice;

use super::bitmap::Bitmap;
use super::journal::{Journal, JournalMode};
use super::level::RaidDevice;
use super::members::{device_id, MemberState, MissingDevice, Run, WriteBehind};
use super::monitor::{MonitorState, OpError};
use super::superblock::{Level, Superblock};
use super::worker::Job;

mod kinds;

pub use kinds::{Change, Role};

/// A member failed in the IO path and its failure is not yet published.
/// A bitmap made now would not mark what it missed before, and once the
/// failure is published the member would count as re-addable from that
/// bitmap (md never re-adds across a change of bitmap).
pub(crate) fn failing_unrecorded(set: &super::members::MemberSet) -> bool {
    set.members
        .iter()
        .any(|m| m.state != MemberState::Failed && m.is_gone())
}

pub(crate) const FAILING_UNRECORDED: &str =
    "a member failed and its failure is not recorded yet; try again once it is";

/// Why an operator may not fail the member in `slot` of `set`: it is in
/// sync and `max_failures` members are already missing or rebuilding.
pub(crate) fn fail_would_lose_data(
    set: &super::members::MemberSet,
    slot: usize,
    max_failures: usize,
) -> Option<String> {
    let m = set.members.get(slot)?;
    let degraded = set
        .members
        .iter()
        .filter(|m| m.recorded_state() != MemberState::InSync)
        .count();
    (m.recorded_state() == MemberState::InSync && degraded >= max_failures).then(|| {
        format!(
            "failing {} would lose data: {degraded} member(s) already missing or rebuilding",
            m.dev.info().name
        )
    })
}

/// A value the IO path reads through a shared atomic, set while the volume
/// is suspended.
pub(crate) enum Setting {
    Serialize(Arc<AtomicBool>, bool),
    Behind(Arc<WriteBehind>, u64),
    /// Write-back on or off (off also starts draining the cache).
    WriteBack(Arc<Journal>, bool),
}

impl Setting {
    pub(crate) fn apply(&self) {
        match self {
            Setting::Serialize(f, on) => f.store(*on, Ordering::SeqCst),
            Setting::Behind(b, n) => b.set_limit(*n),
            Setting::WriteBack(j, on) => j.set_write_back(*on),
        }
    }
}

/// What to do once the volume runs again.
pub(crate) enum After {
    StartBitmap(Arc<Bitmap>),
    StopBitmap,
    ThawBitmap,
    StartCheckpointer(Arc<Journal>),
    StopCheckpointer,
    /// The run (a replacement's copy) was given up: its progress says why.
    GiveUp(Run, String),
}

/// An edit of the superblock template a change records.
pub(crate) type TemplateEdit = Box<dyn FnOnce(&mut Superblock) + Send>;

/// How a change is carried out. Built by [`plan`]; nothing in it has
/// happened yet.
#[derive(Default)]
pub(crate) struct Plan {
    /// For the log.
    pub what: String,
    /// The next generation, if the device changes.
    pub next: Option<Arc<dyn RaidDevice>>,
    /// The spares afterwards, if they change.
    pub spares: Option<Vec<Arc<dyn BlockDevice>>>,
    /// Roles given inside the transaction: (device, role, the role of
    /// this volume it may already have instead of being free).
    pub claims: Vec<(Arc<dyn BlockDevice>, Role, Option<Role>)>,
    /// Roles changed or (None) given up once the volume runs again.
    pub roles_after: Vec<(String, Option<Role>)>,
    /// Background work for the next generation.
    pub start: Option<(Job, Option<Arc<Bitmap>>)>,
    /// Write the superblocks (with these template edits).
    pub record: bool,
    pub template: Option<TemplateEdit>,
    /// A slot whose device is new: it gets a new member identity.
    pub new_uuid: Option<usize>,
    /// Devices flushed before the superblocks are written.
    pub flush_first: Vec<Arc<dyn BlockDevice>>,
    /// Devices whose old superblock is erased (a new spare or replacement).
    pub erase: Vec<Arc<dyn BlockDevice>>,
    /// A new write-intent bitmap, written clear to the members before the
    /// superblocks name it.
    pub new_bitmap: Option<Arc<Bitmap>>,
    /// The journal superblock to write (mode), before the publish.
    pub journal_super: Option<(Arc<Journal>, JournalMode)>,
    pub settings: Vec<Setting>,
    pub after: Vec<After>,
    /// Changes to make next, each its own transaction.
    pub follow: Vec<Change>,
    /// Whether the volume must be suspended (every change but a no-op).
    pub quiesce: bool,
}

fn precondition<T>(m: impl Into<String>) -> Result<T, OpError> {
    Err(OpError::FailedPrecondition(m.into()))
}

/// Whether background work is running now.
fn busy(s: &MonitorState) -> bool {
    s.rebuild.as_ref().is_some_and(|p| !p.is_finished())
}

/// Whether `dev` can take a member's place: every request the volume
/// sends its members. The volume's limits were worked out from the members
/// it was made of, and an export told its guest so; a device that refuses
/// a request within them (a discard, write zeroes) would be failed by the
/// first such guest request, though healthy, and with it perhaps the
/// volume. RAID5 sends its members pieces of a chunk at most, and writes
/// zeroes as data. A mirror passes requests on as they are, but takes at
/// once only what its devices do (exports split by it, generation by
/// generation): a device must take one of its rows, which its rebuild
/// copies whole.
fn check_capable(cur: &dyn RaidDevice, dev: &dyn BlockDevice) -> Result<(), OpError> {
    let (v, d) = (cur.info(), dev.info());
    let (transfer, discard, zeroes) = match cur.parity_geometry() {
        Some(g) => {
            let chunk = g.chunk_blocks().saturating_mul(u64::from(v.block_size));
            (u64::from(v.max_transfer).min(chunk), false, false)
        }
        None => {
            let row = cur.rows().blocks.saturating_mul(u64::from(v.block_size));
            (
                u64::from(v.max_transfer).min(row),
                v.discard,
                v.write_zeroes,
            )
        }
    };
    let mut lacks = Vec::new();
    if u64::from(d.max_transfer) < transfer {
        lacks.push(format!(
            "requests of {transfer} bytes (it takes {} at most)",
            d.max_transfer
        ));
    }
    if discard && !d.discard {
        lacks.push("discard".to_string());
    }
    if zeroes && !d.write_zeroes {
        lacks.push("write zeroes".to_string());
    }
    if lacks.is_empty() {
        return Ok(());
    }
    precondition(format!(
        "{} cannot stand in for a member of {}: the volume sends its members {}",
        d.name,
        v.name,
        lacks.join(", ")
    ))
}

/// The slot holding the device named `name`, if any.
fn slot_of(cur: &dyn RaidDevice, name: &str) -> Option<usize> {
    cur.member_devices()
        .iter()
        .position(|d| !MissingDevice::is(d.as_ref()) && d.info().name == name)
}

/// The first failed slot.
fn failed_slot(cur: &dyn RaidDevice) -> Option<usize> {
    cur.member_states()
        .iter()
        .position(|&st| st == MemberState::Failed)
}

/// Whether `name` is bound to the volume in any role.
fn bound(s: &MonitorState, name: &str) -> Option<Role> {
    let cur = &s.current;
    if let Some(slot) = slot_of(cur.as_ref(), name) {
        return Some(match cur.member_set().members[slot].state {
            MemberState::Failed => Role::Failed,
            _ => Role::Member,
        });
    }
    if s.spares.iter().any(|d| d.info().name == name) {
        return Some(Role::Spare);
    }
    if cur
        .member_set()
        .replacing
        .as_ref()
        .is_some_and(|r| r.dev.info().name == name)
    {
        return Some(Role::Replacement);
    }
    if cur
        .journal()
        .is_some_and(|j| j.device().info().name == name)
    {
        return Some(Role::Journal);
    }
    None
}

fn bdev_err(e: bdev::BdevError) -> OpError {
    OpError::FailedPrecondition(e.to_string())
}

/// Validate `change` against the volume's current state and plan it.
pub(crate) fn plan(
    s: &MonitorState,
    template: Option<&Superblock>,
    change: Change,
) -> Result<Plan, OpError> {
    let cur = s.current.clone();
    let set = cur.member_set();
    let name = cur.info().name.clone();
    let mut p = Plan {
        what: format!("{change:?}"),
        quiesce: true,
        ..Plan::default()
    };
    match change {
        Change::Fail { slot, device, .. } => {
            let Some(m) = set.members.get(slot) else {
                return Err(OpError::NotFound(format!("slot {slot}")));
            };
            if m.state == MemberState::Failed || device_id(&m.dev) != device {
                // Handled already, or about a device since replaced.
                return Ok(Plan::default());
            }
            let next = cur.with_member_failed(slot).map_err(bdev_err)?;
            p.roles_after
                .push((m.dev.info().name.clone(), Some(Role::Failed)));
            if let Some(r) = &set.replacing {
                // A replacement stops when any member fails (`failed`).
                p.roles_after.push((r.dev.info().name.clone(), None));
            }
            p.next = Some(next);
            p.record = true;
            if !s.spares.is_empty() {
                p.follow.push(Change::UseSpare);
            }
        }
        Change::UseSpare => {
            // The first spare that takes what this volume sends its
            // members: one added under other rules (a RAID5's, before a
            // takeover into a mirror) may not.
            let Some(slot) = failed_slot(cur.as_ref()) else {
                return Ok(Plan::default());
            };
            let Some(at) = s.spares.iter().position(|d| {
                check_capable(cur.as_ref(), d.as_ref())
                    .inspect_err(|e| tracing::warn!(volume = %name, spare = %d.info().name, error = %e, "spare passed over"))
                    .is_ok()
            }) else {
                return Ok(Plan::default());
            };
            let spare = s.spares[at].clone();
            if set.rebuilding.is_some() || set.replacing.is_some() {
                // One copy at a time (a rebuild beside a replacement
                // orphaned the replacement: its progress, its stop and
                // the close's wait lost it); this runs again when it is
                // done.
                return Ok(Plan::default());
            }
            let next = match cur.with_member_replaced(slot, spare.clone(), 0) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(volume = %name, slot, error = %e, "spare not used");
                    return Ok(Plan::default());
                }
            };
            let old = &set.members[slot].dev;
            if !MissingDevice::is(old.as_ref()) {
                p.roles_after.push((old.info().name.clone(), None));
            }
            p.roles_after
                .push((spare.info().name.clone(), Some(Role::Member)));
            let mut spares = s.spares.clone();
            spares.remove(at);
            p.spares = Some(spares);
            p.start = Some((
                Job::Rebuild {
                    slot,
                    dev: device_id(&spare),
                },
                None,
            ));
            p.next = Some(next);
            p.record = true;
            p.template = Some(Box::new(|t| t.rebuild_checkpoint = 0));
        }
        Change::Rebuilt(slot, run) => {
            // The slot failed meanwhile, or (a late event) a newer run
            // rebuilds it now.
            if set.members.get(slot).map(|m| m.state) != Some(MemberState::Rebuilding)
                || !run.rebuilds(set, slot)
            {
                return Ok(Plan::default());
            }
            // What the rebuild wrote must be durable before the superblocks
            // say the member is in sync.
            p.flush_first.push(set.members[slot].dev.clone());
            p.next = Some(cur.with_member_in_sync(slot).map_err(bdev_err)?);
            p.record = true;
            p.template = Some(Box::new(|t| t.rebuild_checkpoint = 0));
            // Another failed slot takes a spare first: the resync below
            // follows the last rebuild (a rebuild started after it would
            // cut it short).
            if !s.spares.is_empty() {
                p.follow.push(Change::UseSpare);
            }
            if s.resync_pending() {
                // Resumed after a crash (or its resync was cut short): the
                // rows below the checkpoint were not rewritten this time
                // and may be torn. The resync thaws the bitmap once it has
                // covered its regions.
                p.follow.push(Change::Scrub(true, set.bitmap.clone(), 0));
            } else if set.bitmap.is_some() {
                // Every row was rewritten from the others: the regions a
                // crash left marked are consistent now.
                p.after.push(After::ThawBitmap);
            }
        }
        Change::RebuildFailed(slot, run, _) => {
            let Some(m) = set.members.get(slot) else {
                return Ok(Plan::default());
            };
            // (The worker that says so has stopped, or is stopping.) Not
            // a newer run's slot.
            if m.state != MemberState::Rebuilding || !run.rebuilds(set, slot) {
                return Ok(Plan::default());
            }
            // Nothing can rebuild it: the slot is failed again, and its
            // device (partly rebuilt) with it.
            p.roles_after
                .push((m.dev.info().name.clone(), Some(Role::Failed)));
            p.next = Some(cur.with_member_failed(slot).map_err(bdev_err)?);
            p.record = true;
        }
        Change::ReplaceStart(old, dev) => {
            let Some(slot) = slot_of(cur.as_ref(), &old) else {
                return Err(OpError::NotFound(old));
            };
            if set.members[slot].recorded_state() != MemberState::InSync {
                return precondition(format!(
                    "{old} is not in sync; a failed member is replaced by adding a spare"
                ));
            }
            let new = dev.info().name.clone();
            if let Some(role) = bound(s, &new) {
                return Err(OpError::AlreadyExists(format!(
                    "{new} ({} this volume)",
                    role.name()
                )));
            }
            if busy(s) {
                return precondition("a rebuild, scrub or replacement is already running");
            }
            // md rebuilds first: a copy on a degraded volume made a spare
            // wait for it (hours at the rate limit) with no redundancy.
            if failed_slot(cur.as_ref()).is_some()
                || set.rebuilding.is_some()
                || failing_unrecorded(set)
            {
                return precondition(
                    "the volume is degraded: rebuild it first (add a spare), then replace members",
                );
            }
            check_capable(cur.as_ref(), dev.as_ref())?;
            let rows = cur.rows();
            let next_set = set
                .with_replacement(&name, slot, dev.clone(), rows.offset + rows.total)
                .map_err(bdev_err)?;
            p.claims.push((dev.clone(), Role::Replacement, None));
            p.erase.push(dev.clone());
            p.start = Some((
                Job::Replace {
                    dev: device_id(&dev),
                },
                None,
            ));
            p.next = Some(cur.with_member_set(next_set));
        }
        Change::ReplaceDone(run) => {
            // Given up meanwhile, or a newer replacement runs.
            let Some(r) = run.replacement(set).cloned() else {
                return Ok(Plan::default());
            };
            // Only a copy that reached the end, of a device that missed no
            // write (a late event may be about an earlier replacement, or a
            // write may have failed on the new device meanwhile: its
            // abort follows).
            if r.cursor.load(Ordering::SeqCst) < cur.rows().count || r.failed.load(Ordering::SeqCst)
            {
                return Ok(Plan::default());
            }
            let old = set.members[r.slot].dev.info().name.clone();
            // What the copy wrote must be durable before the superblocks
            // name it.
            p.flush_first.push(r.dev.clone());
            p.next = Some(cur.with_member_set(set.replacement_over(true)));
            p.new_uuid = Some(r.slot);
            p.record = true;
            p.roles_after.push((old, None));
            p.roles_after
                .push((r.dev.info().name.clone(), Some(Role::Member)));
            // A failed slot waiting for the copy to end takes a spare now.
            if !s.spares.is_empty() {
                p.follow.push(Change::UseSpare);
            }
        }
        Change::ReplaceAborted(run, why) => {
            // A second report of the same abort may find a newer
            // replacement, which it must leave alone.
            let Some(r) = run.replacement(set).cloned() else {
                return Ok(Plan::default());
            };
            // A copy that had reached its end said "finished" with no
            // error, its new device given up after (audit).
            p.after.push(After::GiveUp(run.clone(), why.clone()));
            p.next = Some(cur.with_member_set(set.replacement_over(false)));
            p.roles_after.push((r.dev.info().name.clone(), None));
            if !s.spares.is_empty() {
                p.follow.push(Change::UseSpare);
            }
        }
        Change::AddSpare(dev) => {
            let dname = dev.info().name.clone();
            let readd = match bound(s, &dname) {
                None => false,
                // md's re-add: a failed member's device comes back as a
                // spare (and is rebuilt, from the start).
                Some(Role::Failed) => true,
                Some(role) => {
                    return Err(OpError::AlreadyExists(format!(
                        "{dname} ({} this volume)",
                        role.name()
                    )))
                }
            };
            check_capable(cur.as_ref(), dev.as_ref())?;
            // md's re-add with a bitmap (a mirror's member back, e.g. a
            // remote one after a network outage): the device goes back
            // into its own slot and only what the bitmap marks is copied.
            // Only for a member that failed while in sync with this
            // bitmap (`Member::readd`): the bits were held since (the
            // volume was degraded since: it still holds the device as
            // failed).
            let slot = slot_of(cur.as_ref(), &dname)
                .filter(|&slot| set.members.get(slot).is_some_and(|m| m.readd));
            if readd
                && slot.is_some()
                && set.replacing.is_some()
                && set.bitmap.is_some()
                && cur.parity_geometry().is_none()
            {
                // Taken as a spare, it would lose the bitmap's fast way
                // back (its superblock erased: a full rebuild later).
                return precondition("a replacement runs; re-add the member once it has ended");
            }
            if let (true, Some(b), None, None, true, Some(slot)) = (
                readd,
                set.bitmap.clone(),
                &set.rebuilding,
                &set.replacing,
                cur.parity_geometry().is_none(),
                slot,
            ) {
                if let Ok(next) = cur.with_member_replaced(slot, dev.clone(), 0) {
                    p.claims
                        .push((dev.clone(), Role::Member, Some(Role::Failed)));
                    p.start = Some((
                        Job::Rebuild {
                            slot,
                            dev: device_id(&dev),
                        },
                        Some(b),
                    ));
                    p.next = Some(next);
                    p.record = true;
                    p.template = Some(Box::new(|t| t.rebuild_checkpoint = 0));
                    return Ok(p);
                }
            }
            let mut spares = s.spares.clone();
            spares.push(dev.clone());
            p.spares = Some(spares);
            p.erase.push(dev.clone());
            if readd {
                let slot = slot_of(cur.as_ref(), &dname).unwrap_or(0);
                let mut ms = (*set.members).clone();
                ms[slot].dev = MissingDevice::like(dev.as_ref());
                let next_set = super::members::MemberSet {
                    members: Arc::new(ms),
                    ..set.clone()
                };
                p.next = Some(cur.with_member_set(next_set));
                p.claims
                    .push((dev.clone(), Role::Spare, Some(Role::Failed)));
            } else {
                p.claims.push((dev.clone(), Role::Spare, None));
            }
            if failed_slot(cur.as_ref()).is_some() {
                p.follow.push(Change::UseSpare);
            }
        }
        Change::RemoveSpare(dname) => {
            let Some(i) = s.spares.iter().position(|d| d.info().name == dname) else {
                return Err(OpError::NotFound(dname));
            };
            let mut spares = s.spares.clone();
            spares.remove(i);
            p.spares = Some(spares);
            p.roles_after.push((dname, None));
        }
        Change::RemoveFailed(dname) => {
            let Some(slot) = slot_of(cur.as_ref(), &dname) else {
                return Err(OpError::NotFound(dname));
            };
            if set.members[slot].state != MemberState::Failed {
                return precondition(format!("{dname} is not failed; fail it first"));
            }
            let mut ms = (*set.members).clone();
            ms[slot].dev = MissingDevice::like(ms[slot].dev.as_ref());
            let next_set = super::members::MemberSet {
                members: Arc::new(ms),
                ..set.clone()
            };
            p.next = Some(cur.with_member_set(next_set));
            p.roles_after.push((dname, None));
        }
        Change::SetJournal(Some(j)) => {
            if cur.journal().is_some() {
                return precondition("the volume already has a journal");
            }
            if set.bitmap.is_some() {
                return precondition(
                    "the volume keeps a write-intent bitmap; remove it before adding a journal (the journal makes it redundant)",
                );
            }
            let next = cur.with_journal(j.clone()).ok_or_else(|| {
                OpError::FailedPrecondition("only a RAID5 volume has a journal".into())
            })?;
            p.claims
                .push((j.device().clone(), Role::Journal, Some(Role::Journal)));
            p.next = Some(next);
            p.after.push(After::StartCheckpointer(j));
        }
        Change::SetJournal(None) => {
            let Some(j) = cur.journal() else {
                return precondition("the volume has no journal");
            };
            // Checked again once suspended (`transaction::revalidate`).
            if j.mode() == JournalMode::WriteBack && !j.has_failed() {
                return precondition("switch the journal to write-through first");
            }
            let next = cur.without_journal().ok_or_else(|| {
                OpError::FailedPrecondition("only a RAID5 volume has a journal".into())
            })?;
            p.next = Some(next);
            // The members' caches first: the drain's last reclaim writes
            // went out beside the flush that carried them, and once the
            // journal is gone (its device erased) nothing else holds them.
            p.flush_first.extend(set.live_devices());
            p.roles_after.push((j.device().info().name.clone(), None));
            p.after.push(After::StopCheckpointer);
        }
        Change::JournalMode(mode) => {
            let Some(j) = cur.journal() else {
                return precondition("the volume has no journal");
            };
            if j.has_failed() {
                return precondition("the journal device has failed");
            }
            let wb = mode == JournalMode::WriteBack;
            // To write-back, the superblock says so first; to
            // write-through, only once the cache has drained (the caller
            // drains after this), so a restart in between comes back in
            // write-back, which is safe.
            if wb {
                p.journal_super = Some((j.clone(), mode));
            }
            p.settings.push(Setting::WriteBack(j, wb));
        }
        Change::SetBitmap(chunk) => {
            let has = set.bitmap.is_some();
            let Some(template) = template.cloned() else {
                return precondition("the volume keeps no superblocks to record a bitmap in");
            };
            match chunk {
                Some(_) if has => {
                    return precondition("the volume already keeps a write-intent bitmap")
                }
                Some(_) if cur.journal().is_some() => {
                    return precondition(
                        "the volume has a journal, which already closes the write hole; remove it first",
                    )
                }
                Some(_) if failing_unrecorded(set) => {
                    return precondition(FAILING_UNRECORDED)
                }
                // A resync owed (an unclean start's, cut short, or one a
                // resumed rebuild left) covers every row; once a bitmap is
                // there it covers only the regions marked since, which do
                // not mark what the crash tore (and an unclean start with
                // a bitmap marking nothing resyncs nothing). md adds no
                // bitmap while it syncs either.
                Some(_) if busy(s) || s.resync_pending() => {
                    return precondition(
                        "a resync or rebuild is running or still owed; add the bitmap once it has finished",
                    )
                }
                Some(chunk) => {
                    let b = super::assembly::bitmap_in_memory(cur.as_ref(), &template, chunk)
                        .map_err(|e| OpError::FailedPrecondition(e.to_string()))?;
                    p.new_bitmap = Some(b.clone());
                    let rpb = b.rows_per_bit();
                    let next = cur.with_member_set(set.with_bitmap(Some(b.clone())));
                    // Writes from before the bitmap may still sit in the
                    // members' caches; they must be durable before the
                    // superblocks say only marked regions can differ: the
                    // bitmap's own write flushes each member after it.
                    p.next = Some(next);
                    p.template = Some(Box::new(move |t| t.bitmap_rows_per_bit = rpb));
                    p.after.push(After::StartBitmap(b));
                }
                None if !has => return Ok(Plan::default()),
                None if set.behind.limit() > 0 => {
                    return precondition("write-behind needs the bitmap; turn write-behind off first")
                }
                None => {
                    p.next = Some(cur.with_member_set(set.with_bitmap(None)));
                    p.template = Some(Box::new(|t| t.bitmap_rows_per_bit = 0));
                    p.after.push(After::StopBitmap);
                }
            }
            p.record = true;
        }
        Change::Takeover(to, chunk_bytes) => {
            p.next = Some(takeover(s, template, to, chunk_bytes)?);
            p.record = true;
            let layout = super::geometry::Layout::LeftSymmetric;
            p.template = Some(Box::new(move |t| {
                t.level = to;
                t.layout = layout;
                t.chunk_bytes = chunk_bytes;
            }));
        }
        Change::WriteBehind(limit) => {
            if cur.parity_geometry().is_some() {
                return precondition("write-behind applies to the write-mostly members of a RAID1");
            }
            // Checked here, not only by the API: a state file's value
            // reached the volume unchecked at a restart, and each
            // background write holds a copy of its data (audit).
            if limit > u64::from(super::md::bitmap::MAX_WRITE_BEHIND) {
                return precondition(format!(
                    "a write-behind limit of {limit} is past md's {}",
                    super::md::bitmap::MAX_WRITE_BEHIND
                ));
            }
            if limit > 0 && set.bitmap.is_none() {
                return precondition(
                    "write-behind needs a write-intent bitmap (a crash must leave the regions of background writes marked); add one first",
                );
            }
            p.settings.push(Setting::Behind(set.behind.clone(), limit));
        }
        Change::Serialize(on) => {
            if cur.parity_geometry().is_some() {
                return precondition(
                    "serialize_policy applies to RAID1; RAID5 writes are serialised per stripe already",
                );
            }
            p.settings
                .push(Setting::Serialize(set.serialize.clone(), on));
        }
        Change::WriteMostly(dname, on) => {
            if cur.parity_geometry().is_some() {
                return precondition(
                    "write-mostly applies to RAID1 mirrors; a RAID5 reads every member",
                );
            }
            let Some(slot) = slot_of(cur.as_ref(), &dname) else {
                return Err(OpError::NotFound(dname));
            };
            if set.members[slot].write_mostly == on {
                return Ok(Plan::default());
            }
            let next_set = set
                .with_write_mostly(&name, slot, on)
                .map_err(|e| OpError::Internal(e.to_string()))?;
            p.next = Some(cur.with_member_set(next_set));
            p.record = true;
        }
        Change::Scrub(repair, dirty, from) => {
            cur.scrub_members().map_err(OpError::FailedPrecondition)?;
            if busy(s) {
                return precondition("a rebuild or scrub is already running");
            }
            // Between the end of a replacement's copy and its taking the
            // slot, a repair would rewrite the old member alone: the new
            // device would come in with what the repair fixed.
            if set.replacing.is_some() {
                return precondition(
                    "a member is being replaced: scrub once it has taken its slot",
                );
            }
            p.start = Some((Job::Scrub { repair, from }, dirty));
        }
        Change::ResumeRebuild => {
            let Some((slot, _)) = set.rebuilding.clone() else {
                return Ok(Plan::default());
            };
            if busy(s) {
                return Ok(Plan::default());
            }
            p.start = Some((
                Job::Rebuild {
                    slot,
                    dev: device_id(&set.members[slot].dev),
                },
                None,
            ));
        }
    }
    Ok(p)
}

/// The device of a takeover to `to`, checked.
fn takeover(
    s: &MonitorState,
    template: Option<&Superblock>,
    to: Level,
    chunk_bytes: u32,
) -> Result<Arc<dyn RaidDevice>, OpError> {
    let cur = &s.current;
    let name = cur.info().name.clone();
    let now = if cur.parity_geometry().is_some() {
        Level::Raid5
    } else {
        Level::Raid1
    };
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
    if set
        .members
        .iter()
        .any(|m| m.recorded_state() != MemberState::InSync)
    {
        return precondition(format!("{name}: takeover needs both members in sync"));
    }
    if busy(s) {
        return precondition(format!("{name}: a rebuild or scrub is running"));
    }
    // A resync owed (an unclean start's, cut short) or a repair's reads
    // pinned to the first member: the new level would read that member's
    // blocks as another layout (a RAID5 of two keeps parity on it every
    // other stripe), and the resync's cursor counts the old level's rows.
    // As for a bitmap, md does not change level while it syncs either.
    if s.resync_pending() || set.scrubbing.load(Ordering::SeqCst) {
        return precondition(format!(
            "{name}: a resync is still owed; let it finish (start a repair) before the takeover"
        ));
    }
    // A copy finished, its taking the slot still to come: that step
    // counts the copy in the old level's rows (it never came).
    if set.replacing.is_some() {
        return precondition(format!(
            "{name}: a member is being replaced; take over once it has taken its slot"
        ));
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
    if set.serialize.load(Ordering::SeqCst) {
        return precondition(format!(
            "{name}: turn the serialize policy off first (a RAID1 setting)"
        ));
    }
    if set.behind.limit() > 0 {
        return precondition(format!(
            "{name}: turn write-behind off first (a RAID1 setting)"
        ));
    }
    let Some(template) = template else {
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
            .map_err(bdev_err)?,
        ),
        Level::Raid1 => Arc::new(
            super::raid1::Raid1Device::over(&name, set.clone(), template.data_offset)
                .map_err(bdev_err)?,
        ),
    };
    if next.info().num_blocks != cur.info().num_blocks {
        return precondition(format!(
            "{name}: as {to:?} it would hold {} blocks instead of {}; the member data size must be a multiple of the chunk",
            next.info().num_blocks,
            cur.info().num_blocks
        ));
    }
    Ok(next)
}
