//! Exports the saved state names that could not be made at the start: a
//! listen address not up yet, a socket owner from a user directory that
//! has not started, a socket directory on a mount still to come. One such
//! export failed the whole start, and every VM on the host lost its disk
//! with it (audit). It is kept instead, as a device missing at the start
//! is: in the state file, named by the health, made by a reload or a
//! create under its name, let go by a delete.

use std::collections::BTreeMap;

use crate::config::{ExportDecl, NvmfExportDecl};

use super::{Manager, MgmtError};

/// (name or NQN, volume) pairs.
type Kept = Vec<(String, String)>;

/// Exports that could not be made at the start, with why.
#[derive(Debug, Default)]
pub(super) struct Unserved {
    /// vhost-user exports by name.
    pub(super) exports: BTreeMap<String, (ExportDecl, String)>,
    /// NVMe/TCP exports by NQN.
    pub(super) nvmf: BTreeMap<String, (NvmfExportDecl, String)>,
}

impl Unserved {
    /// What the health says of them.
    pub(super) fn problems(&self) -> impl Iterator<Item = String> + '_ {
        let vhost = self
            .exports
            .iter()
            .map(|(name, (_, why))| format!("export {name} is not served: {why}"));
        let nvmf = self
            .nvmf
            .iter()
            .map(|(nqn, (_, why))| format!("nvme/tcp export {nqn} is not served: {why}"));
        vhost.chain(nvmf)
    }
}

impl Manager {
    /// The exports kept now (for volumes that did not start, or unmade):
    /// (name, volume) of each vhost-user one, (NQN, volume) of each
    /// NVMe/TCP one.
    fn kept_exports(&self) -> (Kept, Kept) {
        let inv = self.inv();
        (
            inv.unavailable
                .values()
                .flat_map(|u| &u.exports)
                .chain(inv.unserved.exports.values().map(|(e, _)| e))
                .map(|e| (e.name.clone(), e.volume.clone()))
                .collect(),
            inv.unavailable
                .values()
                .flat_map(|u| &u.nvmf)
                .chain(inv.unserved.nvmf.values().map(|(e, _)| e))
                .map(|e| (e.nqn.clone(), e.volume.clone()))
                .collect(),
        )
    }

    /// Names of the exports kept now: (vhost-user names, NVMe/TCP NQNs).
    pub(super) fn kept_export_names(&self) -> (Vec<String>, Vec<String>) {
        let (vhost, nvmf) = self.kept_exports();
        let names = |kept: Kept| kept.into_iter().map(|(name, _)| name).collect();
        (names(vhost), names(nvmf))
    }

    /// Let go of the exports kept (unmade, or for a volume that did not
    /// start) that `config` names no more or names for another volume
    /// (each save wrote them back, and one named for another volume was
    /// refused its name); the names and NQNs let go.
    pub(super) fn drop_kept_not_in(
        &self,
        config: &crate::config::Config,
        rep: &mut super::ReloadReport,
    ) -> Vec<String> {
        let (vhost, nvmf) = self.kept_exports();
        let mut dropped = Vec::new();
        for (name, volume) in vhost {
            if !config
                .exports
                .iter()
                .any(|w| w.name == name && w.volume == volume)
            {
                let r = self.delete_export(&name, false);
                rep.did(format!("delete kept export {name}"), r);
                dropped.push(name);
            }
        }
        for (nqn, volume) in nvmf {
            if !config
                .nvmf_exports
                .iter()
                .any(|w| w.nqn == nqn && w.volume == volume)
            {
                let r = self.delete_nvmf_export(&nqn);
                rep.did(format!("delete kept nvme/tcp export {nqn}"), r);
                dropped.push(nqn);
            }
        }
        dropped
    }

    /// A reload could not make `name`, kept unmade: the health says why
    /// now (not what the start or an earlier step said).
    pub(super) fn still_unserved(&self, name: &str, e: &MgmtError) {
        if let Some((_, why)) = self.inv().unserved.exports.get_mut(name) {
            *why = format!("a reload could not make it ({e}); a reload tries again");
        }
    }

    /// As [`still_unserved`](Self::still_unserved), for NVMe/TCP.
    pub(super) fn still_unserved_nvmf(&self, nqn: &str, e: &MgmtError) {
        if let Some((_, why)) = self.inv().unserved.nvmf.get_mut(nqn) {
            *why = format!("a reload could not make it ({e}); a reload tries again");
        }
    }

    /// Keep `decl`, which the start could not make because of `why`.
    pub(super) fn keep_unserved_export(&self, decl: &ExportDecl, why: String) {
        tracing::error!(
            export = decl.name,
            volume = decl.volume,
            error = why,
            "export not made at the start: kept for a reload to make"
        );
        let why = format!("it could not be made at the start ({why}); a reload tries again");
        self.inv()
            .unserved
            .exports
            .insert(decl.name.clone(), (decl.clone(), why));
    }

    /// As [`keep_unserved_export`](Self::keep_unserved_export) for an
    /// NVMe/TCP export.
    pub(super) fn keep_unserved_nvmf(&self, decl: &NvmfExportDecl, why: String) {
        tracing::error!(
            nqn = decl.nqn,
            volume = decl.volume,
            error = why,
            "nvme/tcp export not made at the start: kept for a reload to make"
        );
        let why = format!("it could not be made at the start ({why}); a reload tries again");
        self.inv()
            .unserved
            .nvmf
            .insert(decl.nqn.clone(), (decl.clone(), why));
    }
}
