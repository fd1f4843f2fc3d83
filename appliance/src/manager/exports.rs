//! Exporting volumes over vhost-user-blk.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{
    check_name, check_storable, from_export, invalid, Exp, ExportView, Manager, MgmtError,
};
use crate::config::ExportDecl;
use crate::export::{Export, ExportOptions};

impl Manager {
    /// Saved queues moved to a reactor this run does not have (it runs
    /// fewer): on one it has, said in the log. Refused, the export was
    /// left unmade and the guest without its disk until the operator
    /// edited the state (audit).
    pub(super) fn queues_on_reactors_there_are(&self, decl: &mut ExportDecl) {
        let reactors = self.shared.set.len().max(1);
        if decl.queue_cores.iter().any(|&c| c >= reactors) {
            let wrapped: Vec<usize> = decl.queue_cores.iter().map(|c| c % reactors).collect();
            tracing::warn!(export = decl.name, was = ?decl.queue_cores, now = ?wrapped, reactors, "the export's queues were on reactors this run does not have: moved");
            decl.queue_cores = wrapped;
        }
    }

    /// Check a declaration as [`create_export`](Self::create_export)
    /// does before it looks at what runs (reload checks a replacement
    /// before it takes the running export away); the defaults filled in.
    pub(super) fn check_export(
        &self,
        decl: &mut ExportDecl,
    ) -> Result<crate::export::SocketAccess, MgmtError> {
        check_name("name", &decl.name)?;
        if !decl.socket.is_absolute() {
            return Err(invalid("socket", "must be an absolute path"));
        }
        check_storable("memory_limit_mib", decl.memory_limit_mib)?;
        if decl.num_queues == 0 {
            decl.num_queues = 1;
        }
        // The volume's name by default, as over NVMe/TCP: a migration's
        // destination is another export of the same volume, and with the
        // export's name the guest's disk changed serial under it
        // (/dev/disk/by-id, LVM filters and fstab entries that name it)
        // (audit). Kept in the state file as made, so exports made before
        // keep theirs.
        if decl.serial.is_empty() {
            decl.serial = self.serial_for(&decl.volume);
        }
        let reactors = self.shared.set.len();
        if let Some(&c) = decl.queue_cores.iter().find(|&&c| c >= reactors) {
            return Err(invalid(
                "queue_cores",
                format!("reactor {c} does not exist (reactors 0..{reactors})"),
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
        crate::export::SocketAccess::parse(
            decl.socket_mode.as_deref(),
            decl.socket_owner.as_deref(),
            decl.socket_group.as_deref(),
        )
        .map_err(from_export)
    }

    /// The serial an export of `volume` gets when none is given: that of
    /// an export of it already made (of either kind; an NVMe/TCP one made
    /// before long names were hashed kept their first 20 bytes: review),
    /// else `default_serial`.
    pub(super) fn serial_for(&self, volume: &str) -> String {
        let inv = self.inv();
        inv.exports
            .values()
            .map(|e| &e.decl)
            .filter(|d| d.volume == volume)
            .map(|d| d.serial.clone())
            .chain(
                inv.nvmf
                    .values()
                    .map(|e| &e.decl)
                    .filter(|d| d.volume == volume)
                    .map(|d| d.serial.clone()),
            )
            .next()
            .unwrap_or_else(|| super::default_serial(volume))
    }

    /// Export a volume over vhost-user-blk.
    pub fn create_export(&self, mut decl: ExportDecl) -> Result<ExportView, MgmtError> {
        self.check_open()?;
        // Made under the name of one kept unmade, for the same volume: the
        // serial it had, if the call names none (its guest knows its disk
        // by it).
        if decl.serial.is_empty() {
            if let Some((kept, _)) = self
                .inv()
                .unserved
                .exports
                .get(&decl.name)
                .filter(|(k, _)| k.volume == decl.volume)
            {
                decl.serial = kept.serial.clone();
            }
        }
        let access = self.check_export(&mut decl)?;
        self.shared
            .check_room(super::inventory::Kind::Export, &decl.name, &decl)?;
        // Under the inventory's lock: the name, the socket and the volume
        // (not being deleted) are checked and reserved in one step. The
        // export is made outside it: it quiesces the volume, which takes
        // until the deadline when the volume's IO is stuck, and every
        // other call (another volume's transaction saving the state file
        // too) would wait that long.
        // Resolved before the lock: a socket directory on a mount that
        // hangs must not hold every other call up.
        let key = socket_key(&decl.socket);
        let mut inv = self.inv();
        // A kept export of a volume that did not start is in the state
        // file: its name and socket stay its own.
        if let Some((e, v)) = inv.unavailable.values().find_map(|u| {
            u.exports
                .iter()
                .find(|e| e.name == decl.name || e.socket == decl.socket || e.socket == key)
                .map(|e| (e.name.clone(), u.decl.name.clone()))
        }) {
            return Err(MgmtError::AlreadyExists(format!(
                "export {e} of volume {v} (which did not start) has that name or socket; delete it first"
            )));
        }
        // One not made at the start keeps its socket; under its own name
        // this is the one made again, and takes its place.
        if let Some((e, _)) = inv
            .unserved
            .exports
            .values()
            .find(|(e, _)| e.name != decl.name && (e.socket == decl.socket || e.socket == key))
        {
            return Err(MgmtError::AlreadyExists(format!(
                "export {} (not made at the start) has that socket; delete it first",
                e.name
            )));
        }
        if inv.exports.contains_key(&decl.name) || inv.exports_creating.contains_key(&decl.name) {
            return Err(MgmtError::AlreadyExists(format!(
                "export {} already exists",
                decl.name
            )));
        }
        // One name, one teardown at a time: a second under the name took
        // the first's place in the list, and its end let the first's
        // volume be deleted under it (review).
        if inv.exports_deleting.contains_key(&decl.name) {
            return Err(MgmtError::AlreadyExists(format!(
                "export {} is still being deleted",
                decl.name
            )));
        }
        let vol = inv.volume(&decl.volume)?;
        if vol.deleting.load(Ordering::SeqCst) {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {} is being deleted",
                decl.volume
            )));
        }
        // One file however the path is spelled (`..`, a symlinked
        // directory): the bind refuses a taken path too, this only says
        // which export has it.
        if let Some(e) = inv.exports.values().find(|e| e.socket_key == key) {
            return Err(MgmtError::AlreadyExists(format!(
                "export {} already serves {}",
                e.decl.name,
                decl.socket.display()
            )));
        }
        if let Some((name, _)) = inv
            .exports_creating
            .iter()
            .find(|(_, (_, socket))| *socket == key)
        {
            return Err(MgmtError::AlreadyExists(format!(
                "export {name} is being created on {}",
                decl.socket.display()
            )));
        }
        inv.exports_creating
            .insert(decl.name.clone(), (decl.volume.clone(), key.clone()));
        drop(inv);
        // Let go of the reservation however the creation ends, a panic
        // included (the API thread survives it; the name must not stay
        // taken until a restart).
        let reserved = Reserved(self, &decl.name);
        let created = Export::create(
            &self.shared.set,
            &vol.volume,
            ExportOptions {
                socket: decl.socket.clone(),
                num_queues: decl.num_queues,
                read_only: decl.read_only,
                serial: decl.serial.clone(),
                queue_cores: decl.queue_cores.clone(),
                memory_limit: decl.memory_limit_mib.saturating_mul(1 << 20),
                access,
                live_migration: decl.live_migration,
                drain_timeout: None,
            },
        );
        // Again, now that its directory exists (the export made it): the
        // key the next export's path is compared with.
        let key = socket_key(&decl.socket);
        let mut inv = self.inv();
        inv.exports_creating.remove(&decl.name);
        std::mem::forget(reserved);
        let export = created.map_err(from_export)?;
        // Shut down meanwhile: the export is not served.
        if let Err(e) = self.check_open() {
            drop(inv);
            let _ = export.delete(true);
            return Err(e);
        }
        let view = ExportView {
            decl: decl.clone(),
            connected: false,
            connections: 0,
            dirty_log: None,
        };
        inv.unserved.exports.remove(&decl.name);
        inv.exports.insert(
            decl.name.clone(),
            Arc::new(Exp {
                decl,
                export,
                socket_key: key,
            }),
        );
        drop(inv);
        self.save()?;
        Ok(view)
    }

    /// Move queue `queue` of an export to reactor `core` at runtime (its
    /// requests in flight drain, it goes on from where it stopped); kept
    /// in the state file.
    pub fn move_queue(&self, name: &str, queue: u16, core: usize) -> Result<ExportView, MgmtError> {
        check_name("name", name)?;
        self.check_open()?;
        let e = self
            .inv()
            .exports
            .get(name)
            .cloned()
            .ok_or_else(|| MgmtError::NotFound(format!("export {name} does not exist")))?;
        let reactors = self.shared.set.len();
        e.export
            .move_queue(queue, core, reactors)
            .map_err(from_export)?;
        // A delete that took the export away meanwhile: the move was made
        // on an export going down, and is no change to report (audit).
        if !self
            .inv()
            .exports
            .get(name)
            .is_some_and(|now| Arc::ptr_eq(now, &e))
        {
            return Err(MgmtError::NotFound(format!(
                "export {name} was deleted while its queue moved"
            )));
        }
        let view = ExportView {
            decl: e.decl(),
            connected: e.export.is_connected(),
            connections: e.export.connections(),
            dirty_log: e.export.dirty_log(),
        };
        self.save()?;
        Ok(view)
    }

    /// Every export.
    pub fn list_exports(&self) -> Vec<ExportView> {
        export_views(&self.inv())
    }

    /// Every export's name, volume and IO counters.
    pub fn export_stats(&self) -> Vec<(String, String, crate::export::stats::IoSnapshot)> {
        self.inv()
            .exports
            .values()
            .map(|e| (e.decl.name.clone(), e.decl.volume.clone(), e.export.stats()))
            .collect()
    }

    /// Delete an export; refused while a frontend is connected unless
    /// `force`. The export leaves the inventory first, so its shutdown
    /// (waiting for its connection to end) holds up no other call.
    pub fn delete_export(&self, name: &str, force: bool) -> Result<(), MgmtError> {
        self.take_export(name, force, &mut false)
    }

    /// [`delete_export`](Self::delete_export); `removed` is set once this
    /// call took the running export out of the inventory (a reload makes
    /// again only what it took away, not what an operator deleted
    /// meanwhile: review).
    pub(super) fn take_export(
        &self,
        name: &str,
        force: bool,
        removed: &mut bool,
    ) -> Result<(), MgmtError> {
        check_name("name", name)?;
        self.check_open()?;
        let (e, _down) = {
            let mut inv = self.inv();
            // One kept for a volume that did not start: the state file
            // names it no more.
            let kept = inv.unavailable.values_mut().find_map(|u| {
                let at = u.exports.iter().position(|e| e.name == name)?;
                Some(u.exports.remove(at))
            });
            if kept.is_some() || inv.unserved.exports.remove(name).is_some() {
                drop(inv);
                return self.save();
            }
            let e = inv
                .exports
                .get(name)
                .cloned()
                .ok_or_else(|| MgmtError::NotFound(format!("export {name} does not exist")))?;
            if !force {
                e.export.refuse_connections().map_err(from_export)?;
            }
            inv.exports.remove(name);
            *removed = true;
            let down = TakingDown::new(self, &mut inv, name, &e.decl.volume);
            (e, down)
        };
        // Gone from the inventory, it goes whatever the save does (kept
        // running, it served on unlisted, refusing every new frontend).
        let saved = self.save();
        e.export.delete(true).map_err(from_export)?;
        saved
    }
}

/// An export out of the lists and still being taken down: its volume's
/// delete is refused meanwhile (audit: it went through, and the volume
/// was removed under connections still serving). Let go when dropped.
pub(super) struct TakingDown<'a>(&'a Manager, String);

impl<'a> TakingDown<'a> {
    /// Under the inventory's lock `inv`, as the export leaves its list.
    pub(super) fn new(
        m: &'a Manager,
        inv: &mut super::inventory::Inventory,
        name: &str,
        volume: &str,
    ) -> TakingDown<'a> {
        inv.exports_deleting
            .insert(name.to_string(), volume.to_string());
        TakingDown(m, name.to_string())
    }
}

impl Drop for TakingDown<'_> {
    fn drop(&mut self) {
        self.0.inv().exports_deleting.remove(&self.1);
    }
}

/// An export name and socket reserved while the export is being created:
/// dropped without [`std::mem::forget`], it lets them go.
struct Reserved<'a>(&'a Manager, &'a str);

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.0.inv().exports_creating.remove(self.1);
    }
}

/// A socket path with its directory resolved (as it is when it exists),
/// to compare two spellings of one file.
fn socket_key(path: &std::path::Path) -> std::path::PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                dir
            };
            std::fs::canonicalize(dir).map_or_else(|_| path.to_path_buf(), |d| d.join(name))
        }
        _ => path.to_path_buf(),
    }
}

/// The running exports of `inv`.
pub(super) fn export_views(inv: &super::inventory::Inventory) -> Vec<ExportView> {
    inv.exports
        .values()
        .map(|e| ExportView {
            decl: e.decl(),
            connected: e.export.is_connected(),
            connections: e.export.connections(),
            dirty_log: e.export.dirty_log(),
        })
        .collect()
}
