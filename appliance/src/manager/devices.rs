//! Attaching, listing, growing and detaching devices.

use std::sync::Arc;

use bdev::BlockDevice;

use super::{check_name, invalid, lock, Dev, DeviceView, Inventory, Level, Manager, MgmtError};
use crate::config::DeviceDecl;
use crate::raid::examine::Examined;
use crate::raid::monitor::Role;
use crate::volume::VolumeConfig;

impl Inventory {
    /// Whether the machine has room for a RAM device `name` of `size`
    /// bytes (replacing `had` bytes of it), with the RAM devices attached
    /// and being attached. (The device also checks the memory available
    /// when it allocates itself.)
    fn check_ram(&self, name: &str, had: u64, size: u64) -> Result<(), MgmtError> {
        let pending = self
            .attaching
            .values()
            .filter_map(|(spec, _)| spec.strip_prefix("ram:"))
            .filter_map(|z| crate::devspec::parse_size(z).ok())
            .chain(self.resizing.values().copied())
            .fold(0u64, u64::saturating_add);
        let taken = self
            .devices
            .values()
            .filter(|d| d.decl.spec.starts_with("ram:"))
            .map(|d| d.dev.info().size_bytes())
            .fold(pending, u64::saturating_add);
        // Saturating: a size near u64::MAX wrapped past the check in
        // release builds (and panicked in debug ones).
        let others = taken.saturating_sub(had);
        let after = others.saturating_add(size);
        match crate::host::memory_total() {
            Some(total) if after > total => Err(MgmtError::ResourceExhausted(format!(
                "device {name}: {size} bytes of RAM asked, {others} already in other RAM devices, the machine has {total}"
            ))),
            _ => Ok(()),
        }
    }
}

/// A resize's hold on its device (and a RAM device's on the memory
/// check), let go when the call ends.
struct ResizeHeld<'a>(&'a Manager, &'a str);

impl Drop for ResizeHeld<'_> {
    fn drop(&mut self) {
        self.0.inv().resizing.remove(self.1);
    }
}

/// How a device's role reads in a listing.
fn used_by(volume: &str, role: Role) -> String {
    match role {
        Role::Member => format!("volume {volume}"),
        r => format!("{} {volume}", r.name()),
    }
}

impl Manager {
    /// Attach a device.
    pub fn attach_device(&self, decl: DeviceDecl) -> Result<DeviceView, MgmtError> {
        self.attach_device_wrapped(decl, |d| d)
    }

    /// Attach a device the saved state names: as
    /// [`attach_device`](Self::attach_device), but a file it names that
    /// is not there is missing, not made again. Made blank at a restart
    /// (its filesystem not mounted, a tmpfs after a reboot), a single
    /// device's volume started on it and its VM found an empty disk
    /// (audit).
    pub(super) fn attach_saved(&self, decl: DeviceDecl) -> Result<DeviceView, MgmtError> {
        if let Some(path) = crate::devspec::file_to_make(&decl.spec) {
            return Err(MgmtError::NotFound(format!(
                "device {}: {} is not there, and a device the saved state names is not made again (a filesystem not mounted?); mend it and reload, or detach the device and attach it anew",
                decl.name,
                path.display()
            )));
        }
        self.attach_device(decl)
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
        self.check_open()?;
        self.shared
            .check_room(super::inventory::Kind::Device, &decl.name, &decl)?;
        // Identities (a stat of a path, perhaps on a mount that stopped
        // answering) are worked out without the inventory's lock: under
        // it, one slow path hung every call and every metrics scrape.
        // Missing devices only ever leave the list after the start.
        let id = crate::devspec::identity(&decl.spec);
        let keys = crate::devspec::storage_keys(&decl.spec);
        // So is the allow-list's check (a stat and a resolve of the path):
        // under the lock, a path on a mount that stopped answering hung
        // the daemon's stop too, behind a metrics scrape (audit).
        // (Said after the checks below, as before.)
        let allowed = lock(&self.shared.allowed).clone();
        let allowed = match (decl.spec.strip_prefix("file:"), allowed) {
            (Some(rest), Some(allowed)) => allowed
                .check(std::path::Path::new(crate::devspec::file_path(rest).0))
                .map_err(MgmtError::PermissionDenied),
            _ => Ok(()),
        };
        // One of this daemon's own exports is its volume again: as a member
        // or spare of that volume it writes into itself (a replacement's
        // superblock waited for its own suspend, then landed on the
        // guest's first blocks: audit), and under any other role the same
        // storage holds two.
        if let Some(volume) = self.own_export_behind(&decl.spec) {
            return Err(MgmtError::FailedPrecondition(format!(
                "{} is this daemon's own NVMe/TCP export of volume {volume}: attach its volume's devices instead",
                decl.spec
            )));
        }
        let missing: Vec<(String, String)> = self
            .inv()
            .missing
            .values()
            .map(|m| (m.name.clone(), m.spec.clone()))
            .collect();
        // The state file names it still, under the other name: both would
        // be tried at the next start, and one found busy.
        // (By what the spec names, as `attached_as` compares: one file
        // spelled with and without its size is one; RAM is no storage.)
        if let Some((name, _)) = missing.iter().find(|(name, spec)| {
            *name != decl.name && id.is_some() && crate::devspec::identity(spec) == id
        }) {
            return Err(MgmtError::FailedPrecondition(format!(
                "{} is device {name}, missing since the start: attach it under that name, or detach {name} first",
                decl.spec
            )));
        }
        let mut inv = self.inv();
        if inv.devices.contains_key(&decl.name) || inv.attaching.contains_key(&decl.name) {
            return Err(MgmtError::AlreadyExists(format!(
                "device {} is already attached",
                decl.name
            )));
        }
        if let Some(by) = attached_as(&inv, &keys, true) {
            self.same_storage(&mut inv, &decl, &by)?;
        }
        allowed?;
        if let Some(size) = decl
            .spec
            .strip_prefix("ram:")
            .and_then(|z| crate::devspec::parse_size(z).ok())
        {
            inv.check_ram(&decl.name, 0, size)?;
        }
        // Opened without the lock (the name and spec are reserved): a
        // large RAM device takes seconds to allocate, and listings,
        // health and metrics go on meanwhile.
        inv.attaching
            .insert(decl.name.clone(), (decl.spec.clone(), keys));
        drop(inv);
        let opened = crate::devspec::open_zeroed(&decl.name, &decl.spec, decl.block_size);
        let zeroed = opened.as_ref().is_ok_and(|(_, z)| *z);
        let opened = opened.map(|(dev, _)| dev);
        // Still without the lock: a remote target's name is looked up, a
        // file made by the open has its inode now.
        let (identity, keys) = if opened.is_ok() {
            (
                crate::devspec::resolved_identity(&decl.spec),
                crate::devspec::storage_keys(&decl.spec),
            )
        } else {
            (None, Vec::new())
        };
        let mut inv = self.inv();
        inv.attaching.remove(&decl.name);
        // Shut down meanwhile: the device is dropped, not attached.
        self.check_open()?;
        let dev = wrap(opened.map_err(|e| {
            if let crate::devspec::SpecError::Busy { .. } = e {
                MgmtError::FailedPrecondition(e.to_string())
            } else if crate::devspec::unreachable(&e) {
                MgmtError::Unavailable(e.to_string())
            } else if crate::devspec::no_room(&e) {
                MgmtError::ResourceExhausted(e.to_string())
            } else if crate::devspec::names_missing(&decl.spec) {
                MgmtError::NotFound(e.to_string())
            } else {
                invalid("spec", e.to_string())
            }
        })?);
        // Again now that it exists (two attaches creating one new file
        // under two spellings each passed the check above), and by what
        // it resolved to (one remote namespace by name and by address).
        let same_storage = identity.as_ref().and_then(|id| {
            inv.devices
                .values()
                .find(|d| d.identity.as_ref() == Some(id))
                .map(|d| d.decl.name.clone())
        });
        if let Some(by) = attached_as(&inv, &keys, false).or(same_storage) {
            self.same_storage(&mut inv, &decl, &by)?;
        }
        let wrapper = lock(&self.shared.wrapper).clone();
        let dev = match wrapper {
            Some(w) => w(dev),
            None => dev,
        };
        let view = DeviceView {
            num_blocks: dev.info().num_blocks,
            decl: decl.clone(),
            used_by: String::new(),
            health: "ok",
            errors: dev.error_counts(),
        };
        self.shared.roles.attach(&dev, zeroed);
        // Missing at the start and named by a volume that did not start
        // (for want of it, perhaps): held for that volume, not free.
        if let Some((v, role)) = super::unavailable::declared_role(&inv, &decl.name) {
            self.shared.roles.set(&decl.name, &v, Some(role));
        }
        inv.missing.remove(&decl.name);
        inv.left_out.remove(&decl.name);
        inv.devices.insert(
            decl.name.clone(),
            Dev {
                decl,
                dev,
                identity,
                keys,
            },
        );
        drop(inv);
        self.save()?;
        Ok(view)
    }

    /// Every device with its user and health.
    pub fn list_devices(&self) -> Vec<DeviceView> {
        let (names, missing): (Vec<String>, Vec<DeviceDecl>) = {
            let inv = self.inv();
            (
                inv.devices.keys().cloned().collect(),
                inv.missing.values().cloned().collect(),
            )
        };
        let mut all: Vec<DeviceView> = names.iter().filter_map(|n| self.device_view(n)).collect();
        all.extend(missing.into_iter().map(|decl| DeviceView {
            decl,
            num_blocks: 0,
            used_by: String::new(),
            health: "missing",
            errors: Default::default(),
        }));
        all.sort_by(|a, b| a.decl.name.cmp(&b.decl.name));
        all
    }

    /// Detach a device no volume uses.
    pub fn detach_device(&self, name: &str) -> Result<(), MgmtError> {
        self.check_open()?;
        let mut inv = self.inv();
        // A missing device is let go of: the state file names it no more
        // (unless a volume that did not start names it: delete that first).
        if let Some((v, _)) = super::unavailable::declared_role(&inv, name) {
            if inv.missing.contains_key(name) {
                return Err(MgmtError::FailedPrecondition(format!(
                    "device {name} is named by volume {v}, which did not start; delete the volume first"
                )));
            }
        }
        if inv.missing.remove(name).is_some() {
            inv.left_out.remove(name);
            drop(inv);
            return self.save();
        }
        inv.device("name", name)?;
        if let Err((v, role)) = self.shared.roles.detach(name) {
            return Err(MgmtError::FailedPrecondition(format!(
                "device {name} is in use ({}){}",
                used_by(&v, role),
                if role == Role::Failed {
                    format!("; `volume remove {v} {name}` takes it out")
                } else {
                    String::new()
                }
            )));
        }
        inv.devices.remove(name);
        drop(inv);
        self.save()
    }

    /// The device attached as `name`.
    pub(super) fn device(
        &self,
        field: &'static str,
        name: &str,
    ) -> Result<Arc<dyn BlockDevice>, MgmtError> {
        Ok(self.inv().device(field, name)?.dev.clone())
    }

    /// What `name`'s RAID metadata says (`volume examine`): read-only, so
    /// it needs no transaction and works on a device in use.
    pub fn examine_device(&self, name: &str) -> Result<Examined, MgmtError> {
        let dev = self.device("name", name)?;
        crate::raid::examine::examine(dev.as_ref())
            .map_err(|e| MgmtError::Internal(format!("examining {name}: {e}")))
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
        self.check_open()?;
        let (old, decl) = {
            let inv = self.inv();
            let d = inv.device("name", name)?;
            (d.dev.clone(), d.decl.clone())
        };
        let info = old.info().clone();
        let bs = info.block_size as u64;
        if size_bytes == 0 || !size_bytes.is_multiple_of(bs) {
            return Err(invalid(
                "size_bytes",
                format!("{size_bytes} is not a positive multiple of the block size {bs}"),
            ));
        }
        if size_bytes > i64::MAX as u64 {
            return Err(invalid(
                "size_bytes",
                format!("{size_bytes} is beyond 2^63 bytes, the largest device and volume"),
            ));
        }
        let have = info.size_bytes();
        if size_bytes < have {
            return Err(invalid(
                "size_bytes",
                format!("{size_bytes} is smaller than the device ({have} bytes); shrinking would cut off data"),
            ));
        }
        let spec = resized_spec(&decl.spec, size_bytes).ok_or_else(|| {
            MgmtError::FailedPrecondition(format!(
                "device {name} ({}) cannot be resized: only ram, null and file devices can",
                decl.spec
            ))
        })?;
        let volume = match self.shared.roles.holder(name) {
            None => None,
            Some((v, Role::Member)) => {
                let vol = self.inv().volume(&v)?;
                if vol.level() != Level::Single {
                    return Err(MgmtError::FailedPrecondition(format!(
                        "device {name} is in use (volume {v}); a RAID volume does not grow with its members"
                    )));
                }
                Some(vol)
            }
            Some((v, role)) => {
                return Err(MgmtError::FailedPrecondition(format!(
                    "device {name} is in use ({}); a RAID volume does not grow with its members",
                    used_by(&v, role)
                )))
            }
        };
        if size_bytes == have {
            // The retry of a resize whose save failed: saved now, and the
            // frontends told again (a repeated CONFIG_CHANGE costs a read
            // of the configuration space).
            self.save()?;
            let view = self
                .device_view(name)
                .unwrap_or_else(|| self.bare_view(&decl, &old));
            return Ok((view, self.tell_frontends(volume.as_ref())));
        }
        // One resize of a device at a time; a RAM device's old and new
        // mappings are both there during the copy: the new size is held
        // until the end of the call (audit: two resizes at once both
        // passed the check).
        let _held = {
            let mut inv = self.inv();
            if inv.resizing.contains_key(name) {
                return Err(MgmtError::FailedPrecondition(format!(
                    "device {name} is being resized already"
                )));
            }
            let ram = decl.spec.starts_with("ram:");
            if ram {
                inv.check_ram(name, 0, size_bytes)?;
            }
            inv.resizing
                .insert(name.to_string(), if ram { size_bytes } else { 0 });
            ResizeHeld(self, name)
        };
        let blocks = size_bytes / bs;
        let resize = |dev: &Arc<dyn BlockDevice>| {
            dev.resized(blocks).map_err(|e| match e {
                bdev::BdevError::Unsupported(m) => MgmtError::FailedPrecondition(m),
                bdev::BdevError::InvalidArgument(m) => invalid("size_bytes", m),
                bdev::BdevError::Exhausted(m) => MgmtError::ResourceExhausted(m),
                // The file system says the size is too large for it, or
                // out of room: the caller's number or the disk, not a bug.
                bdev::BdevError::Os { ref source, .. }
                    if source.kind() == std::io::ErrorKind::InvalidInput
                        || source.raw_os_error() == Some(libc::EFBIG) =>
                {
                    invalid("size_bytes", format!("resizing device {name}: {e}"))
                }
                bdev::BdevError::Os { ref source, .. }
                    if source.raw_os_error() == Some(libc::ENOSPC) =>
                {
                    MgmtError::ResourceExhausted(format!("resizing device {name}: {e}"))
                }
                e => MgmtError::Internal(format!("resizing device {name}: {e}")),
            })
        };
        // Another resize, or a claim of a free device, may have come
        // between the look above and here: the device switches only if it
        // is still `old` with the same holder (two resizes that both
        // copied `old` lost the writes made between them).
        let changed = || {
            MgmtError::FailedPrecondition(format!(
                "device {name} was resized or claimed while this resize waited; nothing was changed"
            ))
        };
        let grown = match &volume {
            // The copy (RAM) or truncate (file) runs while the volume is
            // quiesced: no IO reaches either object meanwhile.
            Some(v) => {
                let _busy = lock(&v.busy);
                let timeout = self.shared.timeout();
                v.volume
                    .quiesce()
                    .reconfigure(timeout, |current| {
                        if !Arc::ptr_eq(&current.device, &old) {
                            return Err(changed());
                        }
                        let grown = resize(&old)?;
                        if !self
                            .shared
                            .roles
                            .replace(&old, &grown, Some(v.volume.name()))
                        {
                            return Err(changed());
                        }
                        Ok((VolumeConfig::plain(grown.clone()), grown))
                    })
                    .map_err(|e| match e {
                        poller::ReconfigureError::Quiesce(q) => {
                            super::from_quiesce(v.volume.name(), q)
                        }
                        poller::ReconfigureError::Rejected(m) => m,
                    })?
            }
            None => {
                let grown = resize(&old)?;
                if !self.shared.roles.replace(&old, &grown, None) {
                    // Claimed meanwhile (resizes of a device are one at a
                    // time): a file goes back to the size it had (a
                    // volume may use it now, at that size), as the call
                    // says nothing changed (audit). A RAM device's copy
                    // is only dropped.
                    if decl.spec.starts_with("file:") {
                        if let Err(e) = old.resized(have / bs) {
                            tracing::warn!(device = name, error = %e, "a resize that lost to a claim could not put the file back to its size");
                        }
                    }
                    return Err(changed());
                }
                grown
            }
        };
        {
            let mut inv = self.inv();
            if let Some(d) = inv
                .devices
                .get_mut(name)
                .filter(|d| Arc::ptr_eq(&d.dev, &old))
            {
                d.dev = grown.clone();
                d.decl.spec = spec;
            }
        }
        // The guests see the new size whatever the save does: it is
        // served already (returning first, a failed save left them on the
        // old size until they reconnected: audit).
        let saved = self.save();
        let notified = self.tell_frontends(volume.as_ref());
        tracing::info!(device = name, size_bytes, volume = ?volume.as_ref().map(|v| v.volume.name().to_string()), notified = ?notified, "device resized");
        saved?;
        let view = self
            .device_view(name)
            .unwrap_or_else(|| self.bare_view(&decl, &grown));
        Ok((view, notified))
    }

    /// Tell the frontends of `volume`'s exports that its capacity changed;
    /// the exports whose frontend heard it.
    fn tell_frontends(&self, volume: Option<&Arc<super::Vol>>) -> Vec<String> {
        let Some(v) = volume else {
            return vec![];
        };
        // The frontends answer in their own time: not under any lock.
        let notifiers: Vec<(String, crate::export::Notifier)> = self
            .inv()
            .exports
            .values()
            .filter(|e| e.decl.volume == v.volume.name())
            .map(|e| (e.decl.name.clone(), e.export.notifier()))
            .collect();
        let mut notified = Vec::new();
        for (export, n) in notifiers {
            match n.config_changed() {
                Ok(true) => notified.push(export),
                // No frontend: one that starts anew reads the new size, and
                // one that comes back is told once its ring runs.
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(export = %export, error = %err, "telling the frontend about the new capacity failed; the guest sees it once its frontend reads the configuration again (QEMU: when it starts anew, or is told at its next connection)")
                }
            }
        }
        notified
    }

    fn bare_view(&self, decl: &DeviceDecl, dev: &Arc<dyn BlockDevice>) -> DeviceView {
        DeviceView {
            decl: decl.clone(),
            num_blocks: dev.info().num_blocks,
            used_by: String::new(),
            health: "ok",
            errors: dev.error_counts(),
        }
    }

    /// A device as listed: its role and, as a member, its health.
    pub(super) fn device_view(&self, name: &str) -> Option<DeviceView> {
        let (decl, dev) = {
            let inv = self.inv();
            let d = inv.devices.get(name)?;
            (d.decl.clone(), d.dev.clone())
        };
        let (used, health) = match self.shared.roles.holder(name) {
            None => (String::new(), "ok"),
            Some((v, role)) => {
                let health = match role {
                    Role::Failed => "failed",
                    Role::Member => self
                        .inv()
                        .volumes
                        .get(&v)
                        .and_then(|vol| vol.monitor.as_ref().map(|m| m.snapshot()))
                        .and_then(|s| {
                            s.members
                                .iter()
                                .position(|d| d == name)
                                .map(|i| s.states[i])
                        })
                        .map_or("ok", |st| match st {
                            crate::raid::members::MemberState::Rebuilding => "rebuilding",
                            crate::raid::members::MemberState::Failed => "failed",
                            crate::raid::members::MemberState::InSync => "ok",
                        }),
                    _ => "ok",
                };
                (used_by(&v, role), health)
            }
        };
        Some(DeviceView {
            decl,
            num_blocks: dev.info().num_blocks,
            used_by: used,
            health,
            errors: dev.error_counts(),
        })
    }
}

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

impl Manager {
    /// `decl` names the storage device `by` is on: refused. A state file
    /// from before the check (or edited by hand) may hold such a pair,
    /// and a daemon that would not start is worse: at a restore from it
    /// the second is left out as a missing device (kept in the state
    /// file, its volumes started without it where they can), so that two
    /// volumes, and two VMs, never share one disk (audit: two single
    /// volumes on one image file each served a VM). An operator's first
    /// configuration with such a pair is refused, as any error there.
    fn same_storage(
        &self,
        inv: &mut Inventory,
        decl: &DeviceDecl,
        by: &str,
    ) -> Result<(), MgmtError> {
        if self.shared.quiet.load(std::sync::atomic::Ordering::SeqCst) {
            let why = format!(
                "its storage ({}) is device {by}'s too, and two volumes on it would share one disk; name it once",
                decl.spec
            );
            tracing::error!(device = decl.name, "{why}");
            inv.left_out.insert(decl.name.clone(), why.clone());
            return Err(MgmtError::FailedPrecondition(why));
        }
        Err(MgmtError::AlreadyExists(format!(
            "{} is already attached as device {by}",
            decl.spec
        )))
    }
}

/// The device (attached, or with `attaching` being attached) whose
/// storage a spec with `keys` names too, however spelled
/// ([`crate::devspec::storage_keys`], as found at each one's attach).
fn attached_as(inv: &Inventory, keys: &[String], attaching: bool) -> Option<String> {
    let same = |other: &[String]| other.iter().any(|k| keys.contains(k));
    inv.devices
        .values()
        .find(|d| same(&d.keys))
        .map(|d| d.decl.name.clone())
        .or_else(|| {
            inv.attaching
                .iter()
                .filter(|_| attaching)
                .find(|(_, (_, other))| same(other))
                .map(|(n, _)| n.clone())
        })
}
