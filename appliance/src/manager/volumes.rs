//! Creating volumes (a restart's claimed devices go to `assemble`) and
//! deleting them, and the hooks that keep a RAID volume's roles and
//! declaration current. How they look from outside is `views`.

use std::sync::{Arc, Mutex, Weak};

use bdev::BlockDevice;

use super::{
    bitmap_chunk_bytes, check_bitmap_chunk, check_name, check_write_behind, from_op, invalid, lock,
    Devices, Inventory, Level, Manager, MgmtError, Shared, Vol, VolumeView,
};
use crate::config::VolumeDecl;
use crate::raid::assembly::{self, AssemblyError, VolumeSpec};
use crate::raid::geometry::Layout;
use crate::raid::journal::{Journal, JournalMode};
use crate::raid::members::{FailureSink, MemberState};
use crate::raid::monitor::{Monitor, OpError, RaidDevice, Role, Snapshot, VolumeHooks};
use crate::raid::superblock::Level as SbLevel;
use crate::volume::Volume;

/// A RAID volume's link to the inventory: its transactions claim roles in
/// the register and write the state file through here.
struct Hooks {
    volume: String,
    shared: Weak<Shared>,
    decl: Arc<Mutex<VolumeDecl>>,
}

impl VolumeHooks for Hooks {
    fn claim(
        &self,
        device: &Arc<dyn BlockDevice>,
        role: Role,
        from: Option<Role>,
    ) -> Result<(), OpError> {
        let Some(shared) = self.shared.upgrade() else {
            return Err(OpError::FailedPrecondition("the daemon is stopping".into()));
        };
        shared.roles.claim(device, &self.volume, role, from)
    }

    fn set_role(&self, device: &str, role: Option<Role>) {
        if let Some(shared) = self.shared.upgrade() {
            shared.roles.set(device, &self.volume, role);
        }
    }

    fn persist(&self, view: &Snapshot) -> Result<(), String> {
        {
            let mut d = lock(&self.decl);
            *d = decl_from(view, &d);
        }
        match self.shared.upgrade() {
            Some(shared) => shared.save().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    fn persist_now(&self, view: &Snapshot) -> Result<(), String> {
        // Only the given-up journal leaves the declaration: the recorder's
        // view may be older than a change that saved itself but is not
        // published yet (even one that put another journal in), whose
        // declaration must stay.
        {
            let mut d = lock(&self.decl);
            if let Some(j) = view.journal.as_ref().filter(|j| j.given_up()) {
                if d.journal.as_deref() == Some(j.device().info().name.as_str()) {
                    d.journal = None;
                    d.journal_mode = String::new();
                    d.journal_id = String::new();
                }
            }
        }
        match self.shared.upgrade() {
            Some(shared) => shared.save_now().map_err(|e| e.to_string()),
            None => Err("the daemon is stopping".into()),
        }
    }
}

/// A RAID volume's declaration as `view` says it is now: its live members
/// (a failed slot's device is not recorded; a replacement's new device
/// is, and comes back blank, as a spare), spares and settings.
fn decl_from(view: &Snapshot, old: &VolumeDecl) -> VolumeDecl {
    let mut members: Vec<String> = Vec::new();
    for (d, st) in view.members.iter().zip(&view.states) {
        if *st != MemberState::Failed && !d.is_empty() && !members.contains(d) {
            members.push(d.clone());
        }
    }
    if let Some((_, d)) = &view.replacing {
        members.push(d.clone());
    }
    let raid5 = view.level == SbLevel::Raid5;
    VolumeDecl {
        qos: old.qos,
        array: old.array.clone(),
        name: old.name.clone(),
        level: if raid5 { "raid5" } else { "raid1" }.to_string(),
        members,
        spares: view.spares.clone(),
        chunk_kib: if raid5 {
            view.chunk_bytes / 1024
        } else {
            old.chunk_kib
        },
        layout: if raid5 {
            view.layout.clone()
        } else {
            old.layout.clone()
        },
        min_rebuild_bytes_per_sec: view.rates.0,
        max_rebuild_bytes_per_sec: view.rates.1,
        // A failed journal given up is not named: its log must never be
        // replayed over what the volume wrote without it.
        journal: view
            .journal
            .as_ref()
            .filter(|j| !j.given_up())
            .map(|j| j.device().info().name.clone()),
        journal_mode: view
            .journal
            .as_ref()
            .filter(|j| !j.given_up())
            .map_or(String::new(), |j| j.mode().name().to_string()),
        bitmap: view.bitmap.is_some(),
        // As `set_bitmap` wrote it (asked for before its transaction):
        // another transaction of the volume that ran in between, seeing no
        // bitmap yet, reset it to 0, and the state file said the default
        // size while the bitmap used the one asked for (audit).
        bitmap_chunk_kib: old.bitmap_chunk_kib,
        serialize: view.serialize,
        write_behind: view.write_behind.0 as u32,
        uuid: old.uuid.clone(),
        journal_id: view
            .journal
            .as_ref()
            .filter(|j| !j.given_up())
            .map_or(String::new(), |j| j.id()),
        device_id: String::new(),
    }
}

/// A single-device volume's declaration with its disk's identity
/// recorded ([`VolumeDecl::device_id`]); refused when it recorded another
/// disk. Its device is claimed, and nothing has read it yet: a disk
/// swapped in at the same address (a drive replaced in the same slot, a
/// remote target serving another namespace under the same name) would
/// have given its data to the guest, and taken the guest's writes over
/// it.
fn single_on(decl: &VolumeDecl, dev: &Arc<dyn BlockDevice>) -> Result<VolumeDecl, MgmtError> {
    let now = dev.identity().unwrap_or_default();
    if !decl.device_id.is_empty() && !decl.device_id.eq_ignore_ascii_case(&now) {
        let is = if now.is_empty() {
            "has no name of its own".to_string()
        } else {
            format!("is {now}")
        };
        return Err(MgmtError::FailedPrecondition(format!(
            "volume {}: device {} {is}, not the disk the volume is on ({}): refusing to give its guest another disk (name the right device in the state file; to take this disk for the volume, set its device_id to \"{now}\" and reload)",
            decl.name,
            dev.info().name,
            decl.device_id
        )));
    }
    Ok(VolumeDecl {
        device_id: now,
        ..decl.clone()
    })
}

/// A volume as started: its IO object and, for RAID, its monitor.
pub(super) type Started = (Volume, Option<Monitor>);

/// What a volume's name and devices are claimed for
/// ([`Manager::with_claims`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Claim {
    /// A new volume.
    Create,
    /// A volume started from its superblocks. A reload's retry of one that
    /// did not start keeps its entry (name, devices, exports) until it runs.
    Restore,
    /// A new volume where a restore found every device blank, under the
    /// name the restore reserved (its caller gives the name back if this
    /// fails). One that did not start keeps its entry and devices until
    /// this one runs, as for `Restore`: taken out first, a save by any
    /// other call in between left it out of the state file (audit).
    Recreate,
}

impl Manager {
    /// Check a volume declaration against the inventory: the level, member
    /// and spare counts, that every device is attached and distinct, and
    /// the geometry. Returns the level, members and spares. Whether the
    /// devices are free is the claim's to say.
    fn check_volume(
        s: &Inventory,
        decl: &VolumeDecl,
        claim: Claim,
    ) -> Result<(Level, Devices, Devices), MgmtError> {
        let restoring = claim == Claim::Restore;
        check_name("name", &decl.name)?;
        decl.qos
            .check()
            .map_err(|(field, why)| invalid(field, why))?;
        // A restore may be the retry of one that did not start (see
        // `Claim`).
        if s.volumes.contains_key(&decl.name)
            || (s.creating.contains(&decl.name) && claim != Claim::Recreate)
            || (claim == Claim::Create && s.unavailable.contains_key(&decl.name))
        {
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
        // The volume's bytes (a RAID5's data members times the smallest)
        // must fit in 63 bits, as every size and offset made of it does.
        let data_members = match level {
            Level::Raid5 => members.len() as u64 - 1,
            _ => 1,
        };
        if smallest
            .checked_mul(bs as u64)
            .and_then(|b| b.checked_mul(data_members))
            .is_none_or(|b| b > i64::MAX as u64)
        {
            return Err(invalid(
                "members",
                format!(
                    "too large: the volume would hold {data_members} x {smallest} blocks of {bs} bytes, beyond 2^63 bytes"
                ),
            ));
        }
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

    /// Every device a declaration names, with the role it takes.
    fn roles_of(
        members: &Devices,
        spares: &Devices,
        journal: &Option<Arc<dyn BlockDevice>>,
    ) -> Vec<(Arc<dyn BlockDevice>, Role)> {
        members
            .iter()
            .map(|d| (d.clone(), Role::Member))
            .chain(spares.iter().map(|d| (d.clone(), Role::Spare)))
            .chain(journal.iter().map(|d| (d.clone(), Role::Journal)))
            .collect()
    }

    /// Start the monitor of a RAID volume whose device is `device`.
    pub(super) fn start_raid(
        &self,
        decl: &VolumeDecl,
        opened: (Arc<dyn RaidDevice>, assembly::VolumeMeta, bool),
        spares: Vec<Arc<dyn BlockDevice>>,
        rx: std::sync::mpsc::Receiver<crate::raid::members::Event>,
    ) -> Result<Started, MgmtError> {
        let (device, meta, was_clean) = opened;
        let volume = Volume::new_raid(&self.shared.set, &decl.name, device.clone());
        let monitor =
            Monitor::start_awaiting_hooks(&self.shared.set, volume.clone(), device, rx, spares);
        monitor.set_timeout(self.shared.timeout());
        monitor.set_meta(meta);
        let setup = || -> Result<(), OpError> {
            monitor.set_rate(
                decl.min_rebuild_bytes_per_sec,
                decl.max_rebuild_bytes_per_sec,
            )?;
            if decl.serialize {
                monitor.set_serialize(true)?;
            }
            if decl.write_behind > 0 {
                // The superblocks decide whether a bitmap came back;
                // without one write-behind stays off rather than the
                // volume. A file's value past md's limit is brought to it
                // (the volume refuses it, and the next save wrote 0 over
                // the operator's setting: review).
                let most = crate::raid::md::bitmap::MAX_WRITE_BEHIND;
                if decl.write_behind > most {
                    tracing::warn!(volume = %decl.name, asked = decl.write_behind, most, "write-behind past md's limit: brought to it");
                }
                let limit = decl.write_behind.min(most);
                if let Err(e) = monitor.set_write_behind(u64::from(limit)) {
                    tracing::warn!(volume = %decl.name, error = %e, "write-behind not restored");
                }
            }
            monitor.open(was_clean)?;
            Ok(())
        };
        setup().map_err(|e| from_op(&decl.name, e))?;
        Ok((volume, Some(monitor)))
    }

    /// What `dev` holds that is not volume `own`'s: another volume's
    /// superblock, md's metadata, a journal.
    fn holder(dev: &Arc<dyn BlockDevice>, own: Option<[u8; 16]>) -> Option<String> {
        assembly::foreign_holder(dev.as_ref(), own).or_else(|| {
            crate::raid::journal::holds_journal(dev.as_ref()).then(|| {
                "holds a write journal (of a stopped volume, its writes may not be on the members yet)"
                    .to_string()
            })
        })
    }

    /// A device that takes a new role (a spare, a replacement, a journal)
    /// must not hold what belongs to something else: a RAID superblock
    /// (but volume `own`'s: a former member coming back), md's or other
    /// RAID metadata, a damaged superblock, a journal (perhaps with writes
    /// not yet on its volume's members). Refused, unless `erase` (the
    /// caller's force) has what it holds erased first.
    pub(super) fn check_blank(
        dev: &Arc<dyn BlockDevice>,
        own: Option<[u8; 16]>,
        erase: bool,
    ) -> Result<(), MgmtError> {
        let name = &dev.info().name;
        let Some(held) = Self::holder(dev, own) else {
            return Ok(());
        };
        if !erase {
            return Err(MgmtError::FailedPrecondition(format!(
                "{name} {held}; refusing to overwrite it without force (set force to overwrite)"
            )));
        }
        tracing::warn!(device = %name, "{held}: overwritten for its new role (forced)");
        // (A journal's superblocks go with it.)
        assembly::erase_superblock(dev.as_ref())
            .map_err(|e| MgmtError::Internal(format!("erasing {name}: {e}")))
    }

    /// The journal device a declaration names, checked: RAID5 only,
    /// attached, not a member or spare, same block size.
    pub(super) fn check_journal(
        s: &Inventory,
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
        crate::raid::journal::block_size_ok(d.dev.as_ref())
            .map_err(|e| MgmtError::FailedPrecondition(e.to_string()))?;
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

    /// Whether journal device `j` can log a whole stripe of a RAID5 of
    /// `slots` members with chunks of `chunk_kib` (see
    /// [`holds_records`](crate::raid::journal::holds_records)).
    pub(super) fn check_journal_room(
        j: &dyn BlockDevice,
        slots: u64,
        chunk_kib: u32,
    ) -> Result<(), MgmtError> {
        let info = j.info();
        let chunk_blocks = u64::from(chunk_kib) * 1024 / u64::from(info.block_size.max(1));
        crate::raid::journal::holds_records(info.num_blocks, slots, chunk_blocks).map_err(|e| {
            MgmtError::FailedPrecondition(format!("journal {} is too small: {e}", info.name))
        })
    }

    /// Check `decl`, reserve its name and claim its devices; `f` then
    /// builds the volume with them, outside the inventory's lock (it does
    /// device IO). Whatever `f` refuses gives the name and devices back;
    /// what it builds keeps the name reserved until
    /// [`insert_volume`](Self::insert_volume) puts the volume under it (or
    /// [`unreserve`](Self::unreserve) gives it back): between the two
    /// (`attach_hooks` may wait for a transaction) a second create of the
    /// same name went through, and one volume's reconcile freed the other's
    /// devices.
    fn with_claims<T>(
        &self,
        decl: &VolumeDecl,
        claim: Claim,
        f: impl FnOnce(
            Level,
            Devices,
            Devices,
            Option<Arc<dyn BlockDevice>>,
            bool,
        ) -> Result<T, MgmtError>,
    ) -> Result<T, MgmtError> {
        self.check_open()?;
        let (level, members, spares, jdev, roles, zeroed) = {
            let mut inv = self.inv();
            let (level, members, spares) = Self::check_volume(&inv, decl, claim)?;
            let jdev = Self::check_journal(&inv, decl, level)?;
            // A new volume's slots are its members. (A restored one is not
            // refused here: its journal was taken under older rules, and a
            // record too large for it gives it up at run time.)
            if let (Some(j), false) = (&jdev, claim == Claim::Restore) {
                Self::check_journal_room(j.as_ref(), decl.members.len() as u64, decl.chunk_kib)?;
            }
            let roles = Self::roles_of(&members, &spares, &jdev);
            let zeroed = self
                .shared
                .roles
                .claim_all(&roles, &decl.name)
                .map_err(|e| from_op(&decl.name, e))?;
            inv.creating.insert(decl.name.clone());
            (level, members, spares, jdev, roles, zeroed)
        };
        let r = f(level, members, spares, jdev, zeroed);
        if r.is_ok() {
            // Built: from now on it writes them.
            let names = roles.iter().map(|(d, _)| d.info().name.as_str());
            self.shared.roles.written(names);
        } else {
            let mut inv = self.inv();
            // A recreation's caller gives the name back (see `Claim`).
            if claim != Claim::Recreate {
                inv.creating.remove(&decl.name);
            }
            // One that did not start keeps its devices while it is tried.
            if !inv.unavailable.contains_key(&decl.name) {
                self.shared.roles.release_volume(&decl.name);
            }
        }
        r
    }

    /// Put a started volume into the inventory; its monitor reports to it
    /// from now on.
    fn insert_volume(&self, mut decl: VolumeDecl, started: Started) -> Result<(), MgmtError> {
        let (volume, monitor) = started;
        // What the state file pins the volume and its journal by.
        if let Some(m) = &monitor {
            if let Some(u) = m.volume_uuid() {
                decl.uuid = super::hex(&u);
            }
            decl.journal_id = m.journal().map_or(String::new(), |j| j.id());
        }
        // Before any export can reach it.
        volume.init_qos(decl.qos);
        let decl = Arc::new(Mutex::new(decl));
        if let Some(m) = &monitor {
            let hooks = Arc::new(Hooks {
                volume: volume.name().to_string(),
                shared: Arc::downgrade(&self.shared),
                decl: decl.clone(),
            });
            // What the monitor holds when the hooks attach is what the
            // state file keeps, and what the register says each device is
            // (changes its start made before the hooks, devices its
            // assembly left out).
            m.attach_hooks(hooks, |snap| {
                let mut held: Vec<(String, Role)> = snap
                    .members
                    .iter()
                    .zip(&snap.states)
                    .filter(|(d, _)| !d.is_empty())
                    .map(|(d, st)| {
                        let role = if *st == MemberState::Failed {
                            Role::Failed
                        } else {
                            Role::Member
                        };
                        (d.clone(), role)
                    })
                    .collect();
                held.extend(snap.spares.iter().map(|d| (d.clone(), Role::Spare)));
                held.extend(
                    snap.replacing
                        .iter()
                        .map(|(_, d)| (d.clone(), Role::Replacement)),
                );
                held.extend(
                    snap.journal
                        .iter()
                        .map(|j| (j.device().info().name.clone(), Role::Journal)),
                );
                self.shared.roles.reconcile(volume.name(), &held);
                let mut d = lock(&decl);
                *d = decl_from(snap, &d);
            });
        }
        let name = volume.name().to_string();
        let mut inv = self.inv();
        // Reserved until now (`with_claims`): no other volume has it.
        inv.creating.remove(&name);
        if self.shared.closed.load(std::sync::atomic::Ordering::SeqCst) {
            // The stop took the volumes already (a call that outlived the
            // API's wait at the stop): never put in, so closed here, or
            // its superblocks stayed dirty and the state file never knew.
            drop(inv);
            if let Some(m) = &monitor {
                if let Err(e) = m.close() {
                    tracing::error!(volume = %name, error = %e, "recording a volume made during the stop clean");
                }
            }
            let _ = volume.quiesce().remove(self.shared.timeout());
            self.shared.roles.release_volume(&name);
            return Err(MgmtError::FailedPrecondition(format!(
                "the daemon is stopping: volume {name} is on its devices but not in the state file; import it after the start"
            )));
        }
        // One that did not start before (a reload's retry) is running now.
        // Its kept exports wait, still in the state file, for the reload
        // to make them (in no list meanwhile, a save by another call left
        // them out, and one the reload then failed to make was gone: review).
        if let Some(u) = inv.unavailable.remove(&name) {
            let why = || format!("its volume {name} started; the reload makes it");
            for e in u.exports {
                inv.unserved.exports.insert(e.name.clone(), (e, why()));
            }
            for e in u.nvmf {
                inv.unserved.nvmf.insert(e.nqn.clone(), (e, why()));
            }
        }
        inv.volumes.insert(
            name,
            Arc::new(Vol {
                volume,
                monitor,
                decl,
                busy: Mutex::new(()),
                held: Mutex::new(None),
                deleting: Default::default(),
                bitmap_calls: Mutex::new(()),
            }),
        );
        Ok(())
    }

    /// Create a volume; RAID members get fresh superblocks (`force` to
    /// overwrite another volume's).
    pub fn create_volume(&self, decl: VolumeDecl, force: bool) -> Result<VolumeView, MgmtError> {
        self.create_volume_on(decl, force, Claim::Create, false)
    }

    /// [`create_volume`](Self::create_volume), for `claim` (`Create` or
    /// `Recreate`); `zeroed`: its members are known to hold only zeros even
    /// if the register no longer says so (a restore found them blank).
    fn create_volume_on(
        &self,
        decl: VolumeDecl,
        force: bool,
        claim: Claim,
        zeroed: bool,
    ) -> Result<VolumeView, MgmtError> {
        let mode = JournalMode::parse(&decl.journal_mode)
            .map_err(|e| invalid("journal_mode", e.to_string()))?;
        // (A volume made again, its name held already, adds nothing.)
        if claim == Claim::Create {
            self.shared
                .check_room(super::inventory::Kind::Volume, &decl.name, &decl)?;
        }
        let mut recorded = None;
        let started = self.with_claims(&decl, claim, |level, members, spares, jdev, z| {
            if jdev.is_none() && !decl.journal_mode.is_empty() {
                return Err(invalid(
                    "journal_mode",
                    "a journal mode needs a journal device",
                ));
            }
            if level == Level::Single {
                recorded = Some(single_on(&decl, &members[0])?);
            }
            // Write-back only once the state file names the journal (see
            // `add_journal`).
            self.build_volume(&decl, (level, members, spares, jdev), force, zeroed || z)
        })?;
        let decl = recorded.unwrap_or(decl);
        self.insert_volume(decl.clone(), started)?;
        self.save()?;
        if mode == JournalMode::WriteBack {
            return self.set_journal_mode(&decl.name, mode.name()).map_err(|e| {
                e.after(&format!(
                    "volume {} was created with its journal write-through; switching it to write-back failed",
                    decl.name
                ))
            });
        }
        self.get_volume(&decl.name)
    }

    /// A new volume on its claimed devices.
    fn build_volume(
        &self,
        decl: &VolumeDecl,
        (level, members, spares, jdev): (Level, Devices, Devices, Option<Arc<dyn BlockDevice>>),
        force: bool,
        zeroed: bool,
    ) -> Result<Started, MgmtError> {
        if level == Level::Single {
            // A device holding a volume's superblock or a journal (a
            // stopped volume's member, say) is refused unless forced, as
            // a RAID member is: its guest's first writes would destroy
            // it (audit). Forced, it is passed through as it is (a guest
            // may assemble it with md), never erased.
            if let Some(held) = Self::holder(&members[0], None).filter(|_| !force) {
                return Err(MgmtError::FailedPrecondition(format!(
                    "{} {held}; a single-device volume's guest would write over it: refused without force (forced, the device is given as it is)",
                    members[0].info().name
                )));
            }
            return Ok((
                Volume::new(&self.shared.set, &decl.name, members[0].clone()),
                None,
            ));
        }
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
            zeroed,
        };
        if !zeroed {
            tracing::info!(
                volume = decl.name,
                "members not known to hold only zeros: initial resync (as mdadm --create)"
            );
        }
        if let Some(j) = &jdev {
            Self::check_blank(j, None, force)?;
        }
        // Spares are blank until they take a slot: one that carries a
        // superblock of ours is refused, like a member, unless forced.
        for d in &spares {
            Self::check_blank(d, None, force)?;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (device, meta) =
            assembly::create(&spec, FailureSink::new(tx), force).map_err(|e| match e {
                AssemblyError::Invalid(m) => invalid("members", m),
                AssemblyError::InUse { .. } | AssemblyError::Holds { .. } => {
                    MgmtError::FailedPrecondition(format!("{e} (set force to overwrite)"))
                }
                AssemblyError::Io { .. } => MgmtError::Internal(e.to_string()),
            })?;
        let device = match jdev {
            Some(jdev) => {
                let j = Journal::format_with(jdev, JournalMode::WriteThrough)
                    .map_err(|e| MgmtError::Internal(format!("journal: {e}")))?;
                device
                    .with_journal(j)
                    .ok_or_else(|| invalid("journal", "only a RAID5 volume has a journal"))?
            }
            None => device,
        };
        // Not clean until its initial resync has run (see
        // `VolumeSpec::zeroed`).
        self.start_raid(decl, (device, meta, zeroed), spares, rx)
    }

    /// Bring back a volume the state file declares: assembled from its
    /// members' superblocks; created anew only if every device is blank
    /// (RAM devices start blank on every start).
    pub(super) fn restore_volume(&self, decl: &VolumeDecl, initial: bool) -> Result<(), MgmtError> {
        // A device named twice (a state file of an older version) counts once.
        let mut decl = decl.clone();
        // A state file of an older version may say 4 GiB regions, which
        // were used as 2 GiB (md's limit): what they were.
        if decl.bitmap_chunk_kib == 4 << 20 {
            decl.bitmap_chunk_kib = 2 << 20;
        }
        let mut seen: Vec<String> = Vec::new();
        decl.members.retain(|m| {
            let first = !seen.contains(m);
            seen.push(m.clone());
            first
        });
        decl.spares.retain(|m| !seen.contains(m));
        // Devices missing at the start: a RAID volume starts without them
        // (degraded, as md runs an array with a member gone) if its level
        // allows; a single device's volume cannot.
        if decl.level != "single" {
            let inv = self.inv();
            let gone: Vec<String> = decl
                .members
                .iter()
                .chain(&decl.spares)
                .filter(|d| inv.missing.contains_key(*d))
                .cloned()
                .collect();
            drop(inv);
            let left = decl.members.iter().filter(|m| !gone.contains(m)).count();
            if !gone.is_empty() && left > 0 {
                tracing::warn!(volume = decl.name, missing = ?gone, "starting without devices missing at the start");
                decl.members.retain(|m| !gone.contains(m));
                decl.spares.retain(|m| !gone.contains(m));
            }
        }
        let volatile = {
            let inv = self.inv();
            decl.members.iter().chain(&decl.spares).all(|d| {
                inv.devices.get(d).is_some_and(|x| {
                    x.decl.spec.starts_with("ram:") || x.decl.spec.starts_with("null:")
                })
            })
        };
        let decl_ref = &decl;
        let (fixed, started, zeroed) = self.with_claims(
            decl_ref,
            Claim::Restore,
            |level, members, spares, jdev, zeroed| {
                if level == Level::Single {
                    return Ok((
                        single_on(decl_ref, &members[0])?,
                        Some((
                            Volume::new(&self.shared.set, &decl_ref.name, members[0].clone()),
                            None,
                        )),
                        zeroed,
                    ));
                }
                self.assemble_volume(decl_ref, level, members, spares, jdev, volatile, initial)
                    .map(|(fixed, started)| (fixed, started, zeroed))
            },
        )?;
        match started {
            Some(started) => self.insert_volume(fixed, started),
            // Every member blank: a new volume.
            None => {
                // A creation, under the name `with_claims` reserved and with
                // the devices it claimed (in the roles the creation claims
                // again). One that did not start keeps its entry meanwhile.
                tracing::info!(
                    volume = decl.name,
                    "every member is blank: creating the volume"
                );
                let created = self.create_volume_on(decl.clone(), false, Claim::Recreate, zeroed);
                if created.is_err() {
                    let mut inv = self.inv();
                    inv.creating.remove(&decl.name);
                    // Held still by one that did not start; else let go.
                    if !inv.unavailable.contains_key(&decl.name)
                        && !inv.volumes.contains_key(&decl.name)
                    {
                        self.shared.roles.release_volume(&decl.name);
                    }
                }
                created.map(|_| ())
            }
        }
    }

    /// The volume `name`, as a RAID volume.
    pub(super) fn raid(&self, name: &str) -> Result<Arc<Vol>, MgmtError> {
        let v = self.inv().volume(name)?;
        if v.monitor.is_none() {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {name} is a single device: it has no members to change"
            )));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeviceDecl;

    /// From review: the name was given back when the volume was built,
    /// before it was in the inventory; a second create of the same name in
    /// between went through.
    #[test]
    fn a_built_volume_keeps_its_name_until_it_is_inserted() {
        let reactors = poller::Reactors::start(poller::ReactorConfig {
            count: 1,
            ..Default::default()
        })
        .unwrap();
        let mgr = Manager::new(reactors.set(), None);
        for d in ["d0", "d1"] {
            mgr.attach_device(DeviceDecl {
                name: d.into(),
                spec: "ram:4M".into(),
                block_size: 4096,
            })
            .unwrap();
        }
        let first = VolumeDecl::new("x", "single", &["d0"]);
        // Built, not yet inserted (where `attach_hooks` may wait).
        mgr.with_claims(&first, Claim::Create, |_, _, _, _, _| Ok(()))
            .unwrap();
        let second = mgr.create_volume(VolumeDecl::new("x", "single", &["d1"]), false);
        assert!(
            matches!(second, Err(MgmtError::AlreadyExists(_))),
            "{second:?}"
        );
        mgr.inv().creating.remove("x");
        mgr.shared.roles.release_volume("x");
        mgr.create_volume(VolumeDecl::new("x", "single", &["d1"]), false)
            .unwrap();
        mgr.shutdown();
        drop(mgr);
        let _ = reactors.shutdown();
    }
}
