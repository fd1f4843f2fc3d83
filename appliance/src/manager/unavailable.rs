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

use super::{Manager, MgmtError};

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

impl Unavailable {
    /// The error for a call on it.
    pub(super) fn error(&self) -> MgmtError {
        MgmtError::FailedPrecondition(format!(
            "volume {} did not start: {} (mend it and reload or restart, or delete it)",
            self.decl.name, self.reason
        ))
    }
}

impl Manager {
    /// Leave `decl` out of the start because of `reason`: its devices stay
    /// held in their declared roles (no other volume takes them while the
    /// operator looks), its name taken.
    pub(super) fn set_unavailable(&self, decl: &VolumeDecl, reason: String) {
        tracing::error!(
            volume = decl.name,
            reason,
            "volume left out: it did not start"
        );
        let roles = decl
            .members
            .iter()
            .map(|d| (d, Role::Member))
            .chain(decl.spares.iter().map(|d| (d, Role::Spare)))
            .chain(decl.journal.iter().map(|d| (d, Role::Journal)));
        for (d, role) in roles {
            self.shared.roles.set(d, &decl.name, Some(role));
        }
        self.inv()
            .unavailable
            .entry(decl.name.clone())
            .and_modify(|u| u.reason.clone_from(&reason))
            .or_insert_with(|| Unavailable {
                decl: decl.clone(),
                reason,
                exports: Vec::new(),
                nvmf: Vec::new(),
            });
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
        u.exports.push(export.clone());
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
        u.nvmf.push(export.clone());
        true
    }

    /// Forget that `name` did not start, giving its devices back; what
    /// was kept of it, if it was.
    pub(super) fn take_unavailable(&self, name: &str) -> Option<Unavailable> {
        let u = self.inv().unavailable.remove(name)?;
        self.shared.roles.release_volume(name);
        Some(u)
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
