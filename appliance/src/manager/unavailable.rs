//! Volumes the saved state names that could not start (metadata that
//! cannot be trusted, more members gone than the level survives, a
//! journal that cannot be replayed): one such volume refused the whole
//! start, and every other volume and VM stayed down with it. It is left
//! out instead, as mdadm leaves an array it cannot assemble: said in the
//! health and metrics with why, kept in the state file with its exports,
//! its devices held, until a reload or a restart starts it or the operator
//! deletes it.

use crate::config::{ExportDecl, NvmfExportDecl, VolumeDecl};
use crate::raid::monitor::Role;

use super::inventory::Inventory;
use super::{ExportView, Manager, MgmtError, NvmfExportView};

/// A volume that could not start, and what the state file says of it.
#[derive(Debug, Clone)]
pub(super) struct Unavailable {
    pub(super) decl: VolumeDecl,
    /// Why it did not start.
    pub(super) reason: String,
    /// Its exports, kept for when it starts.
    pub(super) exports: Vec<ExportDecl>,
    pub(super) nvmf: Vec<NvmfExportDecl>,
}

/// A volume that did not start, as listed.
#[derive(Debug, Clone)]
pub struct UnavailableView {
    /// What the state file declares.
    pub decl: VolumeDecl,
    /// Why it did not start.
    pub reason: String,
    /// Its kept vhost-user exports.
    pub exports: Vec<String>,
}

impl Unavailable {
    /// The error for a call on it.
    pub(super) fn error(&self) -> MgmtError {
        MgmtError::FailedPrecondition(format!(
            "volume {} did not start: {} (mend it and reload or restart, or delete it)",
            self.decl.name, self.reason
        ))
    }
}

/// The devices `decl` names, each in its role.
fn declared(decl: &VolumeDecl) -> impl Iterator<Item = (&String, Role)> {
    decl.members
        .iter()
        .map(|d| (d, Role::Member))
        .chain(decl.spares.iter().map(|d| (d, Role::Spare)))
        .chain(decl.journal.iter().map(|d| (d, Role::Journal)))
}

/// The volume that did not start and declares `device`, and its role.
pub(super) fn declared_role(inv: &Inventory, device: &str) -> Option<(String, Role)> {
    inv.unavailable.values().find_map(|u| {
        declared(&u.decl)
            .find(|(d, _)| *d == device)
            .map(|(_, r)| (u.decl.name.clone(), r))
    })
}

impl Manager {
    /// Leave `decl` out of the start because of `reason` (or say why it
    /// still does not start): its devices stay held in their declared
    /// roles (no other volume takes them while the operator looks), its
    /// name taken, its kept exports kept.
    pub(super) fn set_unavailable(&self, decl: &VolumeDecl, reason: String) {
        self.mark_unavailable(decl, reason, true)
    }

    /// A reload's retry of `decl` did not start it: it stays unavailable,
    /// unless it was deleted meanwhile (then it is not put back).
    pub(super) fn still_unavailable(&self, decl: &VolumeDecl, reason: String) {
        self.mark_unavailable(decl, reason, false)
    }

    fn mark_unavailable(&self, decl: &VolumeDecl, reason: String, new: bool) {
        let mut inv = self.inv();
        if !new && !inv.unavailable.contains_key(&decl.name) {
            tracing::info!(
                volume = decl.name,
                "a volume deleted while a reload tried it again stays deleted"
            );
            return;
        }
        if inv.volumes.contains_key(&decl.name) || inv.creating.contains(&decl.name) {
            // A failure after it started (or a second declaration of the
            // name): it runs, and holds what it holds.
            tracing::error!(
                volume = decl.name,
                reason,
                "a volume of this name runs; the failure is only logged"
            );
            return;
        }
        tracing::error!(
            volume = decl.name,
            reason,
            "volume left out: it did not start"
        );
        // Under the inventory's lock, as claims are made, and in one step
        // of the register: what it declares is held, what it held before
        // (an older declaration) and declares no more goes.
        let held: Vec<(String, Role)> = declared(decl).map(|(d, r)| (d.clone(), r)).collect();
        self.shared.roles.reconcile(&decl.name, &held);
        for (d, _) in &held {
            if let Some((other, _)) = self.shared.roles.holder(d).filter(|(v, _)| *v != decl.name) {
                tracing::warn!(
                    volume = decl.name,
                    device = d,
                    holder = other,
                    "a device of a volume that did not start is held by another"
                );
            }
        }
        let u = inv
            .unavailable
            .entry(decl.name.clone())
            .or_insert_with(|| Unavailable {
                decl: decl.clone(),
                reason: String::new(),
                exports: Vec::new(),
                nvmf: Vec::new(),
            });
        u.decl = decl.clone();
        u.reason = reason;
    }

    /// Whether `volume` did not start; then `export` is kept with it.
    pub(super) fn keep_export_of_unavailable(&self, export: &ExportDecl) -> bool {
        let mut inv = self.inv();
        let Some(u) = inv.unavailable.get_mut(&export.volume) else {
            return false;
        };
        tracing::warn!(
            export = export.name,
            volume = export.volume,
            "export of a volume that did not start: kept for when it does"
        );
        u.exports.retain(|e| e.name != export.name);
        u.exports.push(export.clone());
        // Kept here now, not twice in the state file.
        inv.unserved.exports.remove(&export.name);
        true
    }

    /// As [`keep_export_of_unavailable`](Self::keep_export_of_unavailable)
    /// for an NVMe/TCP export.
    pub(super) fn keep_nvmf_of_unavailable(&self, export: &NvmfExportDecl) -> bool {
        let mut inv = self.inv();
        let Some(u) = inv.unavailable.get_mut(&export.volume) else {
            return false;
        };
        tracing::warn!(
            nqn = export.nqn,
            volume = export.volume,
            "nvme/tcp export of a volume that did not start: kept for when it does"
        );
        u.nvmf.retain(|e| e.nqn != export.nqn);
        u.nvmf.push(export.clone());
        inv.unserved.nvmf.remove(&export.nqn);
        true
    }

    /// Forget that `name` did not start, giving its devices back; what
    /// was kept of it, if it was. Refused while a reload tries it again
    /// (its devices are claimed for that, and it may start).
    pub(super) fn take_unavailable(&self, name: &str) -> Result<Option<Unavailable>, MgmtError> {
        let mut inv = self.inv();
        if !inv.unavailable.contains_key(name) {
            return Ok(None);
        }
        if inv.creating.contains(name) {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {name} is being started again (a reload); delete it after"
            )));
        }
        let u = inv.unavailable.remove(name);
        self.shared.roles.release_volume(name);
        Ok(u)
    }

    /// Every volume as described, and those that did not start, from
    /// one look at the inventory: from two, a volume a reload started in
    /// between was in neither list.
    pub fn volume_listing(&self) -> (Vec<super::VolumeView>, Vec<UnavailableView>) {
        let (running, unavailable) = {
            let inv = self.inv();
            let running: Vec<_> = inv.volumes.values().cloned().collect();
            let unavailable = inv
                .unavailable
                .values()
                .map(|u| UnavailableView {
                    decl: u.decl.clone(),
                    reason: u.reason.clone(),
                    exports: u.exports.iter().map(|e| e.name.clone()).collect(),
                })
                .collect();
            (running, unavailable)
        };
        (running.iter().map(|v| self.view(v)).collect(), unavailable)
    }

    /// The running exports, those kept for volumes that did not start,
    /// and those kept unmade with why (vhost-user), from one look at the
    /// inventory.
    pub fn export_listing(&self) -> (Vec<ExportView>, Vec<ExportView>, Vec<(ExportView, String)>) {
        let inv = self.inv();
        let unserved = inv
            .unserved
            .exports
            .values()
            .map(|(decl, why)| (kept_view(decl), why.clone()))
            .collect();
        (super::exports::export_views(&inv), kept(&inv).0, unserved)
    }

    /// As [`export_listing`](Self::export_listing), for NVMe/TCP.
    pub fn nvmf_listing(
        &self,
    ) -> (
        Vec<NvmfExportView>,
        Vec<NvmfExportView>,
        Vec<(NvmfExportView, String)>,
    ) {
        let inv = self.inv();
        let unserved = inv
            .unserved
            .nvmf
            .values()
            .map(|(decl, why)| (kept_nvmf_view(decl), why.clone()))
            .collect();
        (super::nvmf::nvmf_views(&inv), kept(&inv).1, unserved)
    }

    /// Volumes that did not start, with why.
    pub fn unavailable_volumes(&self) -> Vec<(String, String)> {
        self.inv()
            .unavailable
            .values()
            .map(|u| (u.decl.name.clone(), u.reason.clone()))
            .collect()
    }
}

/// The exports `inv` keeps for volumes that did not start (vhost-user,
/// NVMe/TCP), as declared: they serve nothing until their volume starts,
/// but their names, sockets and NQNs are taken, and an operator looking
/// for them in the export list found nothing.
fn kept(inv: &Inventory) -> (Vec<ExportView>, Vec<NvmfExportView>) {
    let vhost = inv.unavailable.values().flat_map(|u| &u.exports);
    let nvmf = inv.unavailable.values().flat_map(|u| &u.nvmf);
    (
        vhost.map(kept_view).collect(),
        nvmf.map(kept_nvmf_view).collect(),
    )
}

/// An export that serves nothing, as declared.
fn kept_view(decl: &ExportDecl) -> ExportView {
    ExportView {
        decl: decl.clone(),
        connected: false,
        connections: 0,
        dirty_log: None,
    }
}

/// As [`kept_view`], for NVMe/TCP.
fn kept_nvmf_view(decl: &NvmfExportDecl) -> NvmfExportView {
    NvmfExportView {
        decl: decl.clone(),
        connections: 0,
        controllers: Vec::new(),
        commands: [0; 2],
        bytes: [0; 2],
        errors: 0,
    }
}
