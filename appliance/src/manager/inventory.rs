//! What the manager holds, under one lock: devices, volumes, exports,
//! and what is being made or is missing; and the state file it makes.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{check_name, lock, nvmf, Dev, Exp, MgmtError, Vol};
use crate::config::{Config, DeviceDecl, VolumeDecl};

#[derive(Default)]
pub(super) struct Inventory {
    pub(super) devices: BTreeMap<String, Dev>,
    pub(super) volumes: BTreeMap<String, Arc<Vol>>,
    /// Names of volumes being created (their devices are claimed).
    pub(super) creating: std::collections::BTreeSet<String>,
    /// Devices being opened outside the lock (a RAM device is allocated
    /// and touched, which takes seconds for a large one): name -> (spec,
    /// its storage keys).
    pub(super) attaching: BTreeMap<String, (String, Vec<String>)>,
    /// Devices being resized: name -> the new size of a RAM device (0 for
    /// others), held while the resize runs: one at a time per device, and
    /// a RAM device's copy (the old and the new memory are both there)
    /// counted in the memory check, so that two cannot both pass it.
    pub(super) resizing: BTreeMap<String, u64>,
    pub(super) exports: BTreeMap<String, Arc<Exp>>,
    /// Exports being created outside the lock (the volume is quiesced
    /// meanwhile, which may take until its deadline): name -> (volume,
    /// socket key).
    pub(super) exports_creating: BTreeMap<String, (String, std::path::PathBuf)>,
    /// Exports (by name or NQN) out of the lists and still being taken
    /// down (their connections finishing): name -> volume. Their volume
    /// is still in use until they are gone.
    pub(super) exports_deleting: BTreeMap<String, String>,
    /// NVMe/TCP exports by NQN.
    pub(super) nvmf: BTreeMap<String, nvmf::NvmfExp>,
    /// Devices the saved state names that could not be opened at the start
    /// (a dead disk, a remote target down): kept in the state file (the
    /// next start, a reload or an attach under the name tries again), and
    /// their volumes started without them where the level allows.
    pub(super) missing: BTreeMap<String, DeviceDecl>,
    /// Why a device of the saved state was left out at the start though
    /// it could be opened (its storage is another device's too), for the
    /// health.
    pub(super) left_out: BTreeMap<String, String>,
    /// Volumes the saved state names that did not start, by name.
    pub(super) unavailable: BTreeMap<String, super::unavailable::Unavailable>,
    /// Exports the saved state names that could not be made at the start.
    pub(super) unserved: super::unserved::Unserved,
}

/// Most of each kind a daemon holds (devices, volumes, vhost-user
/// exports, NVMe/TCP exports): each costs threads, descriptors or
/// listeners, and no caller's loop may run the daemon out of them
/// (audit). Far more than a two-core appliance serves.
pub(super) const MAX_OF_A_KIND: usize = 1024;

/// What the daemon holds at most [`MAX_OF_A_KIND`] of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Device,
    Volume,
    Export,
    NvmfExport,
}

impl Kind {
    /// Its name in requests and errors.
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Device => "device",
            Kind::Volume => "volume",
            Kind::Export => "export",
            Kind::NvmfExport => "nvmf_export",
        }
    }
}

impl Inventory {
    /// How many of `kind` the daemon holds: being made, kept unmade or
    /// still being taken down included.
    pub(super) fn count(&self, kind: Kind) -> usize {
        let kept = |f: fn(&super::unavailable::Unavailable) -> usize| {
            self.unavailable.values().map(f).sum::<usize>()
        };
        // Being taken down, by name or NQN: a name holds no ':' (see
        // `check_name`), an NQN does.
        let deleting = |nqn: bool| {
            self.exports_deleting
                .keys()
                .filter(|k| k.contains(':') == nqn)
                .count()
        };
        match kind {
            Kind::Device => self.devices.len() + self.attaching.len() + self.missing.len(),
            Kind::Volume => self.volumes.len() + self.creating.len() + self.unavailable.len(),
            Kind::Export => {
                self.exports.len()
                    + self.exports_creating.len()
                    + self.unserved.exports.len()
                    + deleting(false)
                    + kept(|u| u.exports.len())
            }
            Kind::NvmfExport => {
                self.nvmf.len() + self.unserved.nvmf.len() + deleting(true) + kept(|u| u.nvmf.len())
            }
        }
    }

    /// Whether `name` of `kind` runs, is being made or is being taken
    /// down: a call making it is refused as existing.
    pub(super) fn exists(&self, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Device => self.devices.contains_key(name) || self.attaching.contains_key(name),
            Kind::Volume => {
                self.volumes.contains_key(name)
                    || self.creating.contains(name)
                    || self.unavailable.contains_key(name)
            }
            Kind::Export => {
                self.exports.contains_key(name)
                    || self.exports_creating.contains_key(name)
                    || self.exports_deleting.contains_key(name)
            }
            Kind::NvmfExport => {
                self.nvmf.contains_key(name) || self.exports_deleting.contains_key(name)
            }
        }
    }

    /// Whether the state file holds `name` of `kind` unmade (a device
    /// missing at the start, an export kept unmade or kept for a volume
    /// that did not start): a call making it makes it in place of that,
    /// not one more of its kind.
    pub(super) fn kept(&self, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Device => self.missing.contains_key(name),
            // (One that did not start is one that exists.)
            Kind::Volume => false,
            Kind::Export => {
                self.unserved.exports.contains_key(name)
                    || self
                        .unavailable
                        .values()
                        .any(|u| u.exports.iter().any(|e| e.name == name))
            }
            Kind::NvmfExport => {
                self.unserved.nvmf.contains_key(name)
                    || self
                        .unavailable
                        .values()
                        .any(|u| u.nvmf.iter().any(|e| e.nqn == name))
            }
        }
    }

    pub(super) fn device(&self, field: &'static str, name: &str) -> Result<&Dev, MgmtError> {
        check_name(field, name)?;
        self.devices
            .get(name)
            .ok_or_else(|| MgmtError::NotFound(format!("device {name} is not attached")))
    }

    pub(super) fn volume(&self, name: &str) -> Result<Arc<Vol>, MgmtError> {
        check_name("volume", name)?;
        if let Some(u) = self.unavailable.get(name) {
            return Err(u.error());
        }
        self.volumes
            .get(name)
            .cloned()
            .ok_or_else(|| MgmtError::NotFound(format!("volume {name} does not exist")))
    }

    pub(super) fn config(&self) -> Config {
        Config {
            devices: {
                let mut all: Vec<DeviceDecl> = self
                    .devices
                    .values()
                    .map(|d| d.decl.clone())
                    .chain(self.missing.values().cloned())
                    .collect();
                all.sort_by(|a, b| a.name.cmp(&b.name));
                all
            },
            // Those that did not start stay, with their exports, for the
            // start or reload that mends them.
            volumes: {
                let mut all: Vec<VolumeDecl> = self
                    .volumes
                    .values()
                    .map(|v| lock(&v.decl).clone())
                    .chain(self.unavailable.values().map(|u| u.decl.clone()))
                    .collect();
                all.sort_by(|a, b| a.name.cmp(&b.name));
                all
            },
            exports: self
                .exports
                .values()
                .map(|e| e.decl())
                .chain(self.unavailable.values().flat_map(|u| u.exports.clone()))
                .chain(self.unserved.exports.values().map(|(e, _)| e.clone()))
                .collect(),
            nvmf_exports: self
                .nvmf
                .values()
                .map(|e| e.decl.clone())
                .chain(self.unavailable.values().flat_map(|u| u.nvmf.clone()))
                .chain(self.unserved.nvmf.values().map(|(e, _)| e.clone()))
                .collect(),
        }
    }
}
