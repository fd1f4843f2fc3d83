//! Exporting volumes over NVMe/TCP.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{invalid, Manager, MgmtError};
use crate::config::NvmfExportDecl;
use crate::nvmf::{NvmfError, Subsystem, SubsystemOptions};

/// An NVMe/TCP export in the inventory.
pub(super) struct NvmfExp {
    pub decl: NvmfExportDecl,
    pub sub: Arc<Subsystem>,
}

/// An NVMe/TCP export as the API shows it.
#[derive(Debug, Clone)]
pub struct NvmfExportView {
    /// What it is (the listen address as bound).
    pub decl: NvmfExportDecl,
    /// Connections open now (admin and IO queues).
    pub connections: u64,
    /// Controllers live now: (controller ID, host NQN).
    pub controllers: Vec<(u16, String)>,
    /// Read and write commands completed.
    pub commands: [u64; 2],
    /// Bytes read and written.
    pub bytes: [u64; 2],
    /// IO commands that failed.
    pub errors: u64,
}

fn from_nvmf(e: NvmfError) -> MgmtError {
    match e {
        NvmfError::Invalid { field, reason } => MgmtError::InvalidArgument { field, reason },
        NvmfError::Exists(m) => {
            MgmtError::AlreadyExists(format!("nvme/tcp export {m} already exists"))
        }
        NvmfError::NotFound(m) => {
            MgmtError::NotFound(format!("nvme/tcp export {m} does not exist"))
        }
        e @ NvmfError::Listen { .. } => MgmtError::FailedPrecondition(e.to_string()),
    }
}

fn parse_nguid(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut g = [0u8; 16];
    for (i, b) in g.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(g)
}

fn view(e: &NvmfExp) -> NvmfExportView {
    let mut controllers: Vec<(u16, String)> = e
        .sub
        .controllers()
        .iter()
        .map(|c| (c.cntlid, c.hostnqn.clone()))
        .collect();
    controllers.sort();
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    NvmfExportView {
        decl: e.decl.clone(),
        connections: e.sub.connections() as u64,
        controllers,
        commands: [n(&e.sub.reads), n(&e.sub.writes)],
        bytes: [n(&e.sub.read_bytes), n(&e.sub.write_bytes)],
        errors: n(&e.sub.errors),
    }
}

/// Check a declaration as [`Manager::create_nvmf_export`] does before it
/// looks at what runs (reload checks a replacement before it takes the
/// running export away): the address to listen on and the NGUID asked
/// for, if one is.
pub(super) fn check_nvmf(
    decl: &NvmfExportDecl,
) -> Result<(SocketAddr, Option<[u8; 16]>), MgmtError> {
    let listen: SocketAddr = decl
        .listen
        .parse()
        .map_err(|_| invalid("listen", format!("{:?} is not IP:PORT", decl.listen)))?;
    if decl.hosts.is_empty() && !decl.allow_any_host {
        return Err(invalid(
            "hosts",
            "no host may connect: name the allowed host NQNs, or allow any host",
        ));
    }
    let nguid = if decl.nguid.is_empty() {
        None
    } else {
        Some(
            parse_nguid(&decl.nguid.to_ascii_lowercase())
                .ok_or_else(|| invalid("nguid", "32 hexadecimal digits"))?,
        )
    };
    Ok((listen, nguid))
}

impl Manager {
    /// The volume behind `spec` if it names one of this daemon's own
    /// NVMe/TCP exports: its NQN, at the port the export listens on, at an
    /// address of this machine's interfaces. (Only a name this daemon
    /// serves is looked up: every remote device's attach paid a lookup.
    /// By the interfaces, not by binding: a host that may bind any
    /// address, as keepalived's do, took a peer's export for its own:
    /// review.)
    pub(super) fn own_export_behind(&self, spec: &str) -> Option<String> {
        use std::net::ToSocketAddrs;
        let (host, nqn) = crate::devspec::remote_subsystem(spec)?;
        let sub = self.shared.target.get(nqn)?;
        let port = sub.opts.listen.port();
        let local = crate::host::local_addresses();
        host.to_socket_addrs()
            .ok()?
            .any(|a| {
                // (An IPv4 address written as IPv6 is the IPv4 one.)
                let ip = a.ip().to_canonical();
                a.port() == port && (ip.is_loopback() || ip.is_unspecified() || local.contains(&ip))
            })
            .then(|| sub.volume.name().to_string())
    }

    /// Export a volume over NVMe/TCP as the subsystem `decl.nqn`.
    pub fn create_nvmf_export(
        &self,
        mut decl: NvmfExportDecl,
    ) -> Result<NvmfExportView, MgmtError> {
        self.check_open()?;
        // Made under the NQN of one kept unmade, of the same volume: what
        // the file does not say is what it was made with (its hosts know
        // the namespace by its NGUID and serial).
        if let Some((kept, _)) = self
            .inv()
            .unserved
            .nvmf
            .get(&decl.nqn)
            .filter(|(k, _)| k.volume == decl.volume)
        {
            if decl.nguid.is_empty() {
                decl.nguid = kept.nguid.clone();
            }
            if decl.serial.is_empty() {
                decl.serial = kept.serial.clone();
            }
        }
        let (listen, nguid) = check_nvmf(&decl)?;
        self.shared
            .check_room(super::inventory::Kind::NvmfExport, &decl.nqn, &decl)?;
        // Random once, then kept in the state file.
        let nguid = nguid.unwrap_or_else(|| *uuid::Uuid::new_v4().as_bytes());
        if decl.serial.is_empty() {
            decl.serial = self.serial_for(&decl.volume);
        }
        // Under the inventory's lock: the NQN and the volume (not being
        // deleted) are checked and taken in one step.
        let mut inv = self.inv();
        if let Some(v) = inv
            .unavailable
            .values()
            .find(|u| u.nvmf.iter().any(|e| e.nqn == decl.nqn))
        {
            return Err(MgmtError::AlreadyExists(format!(
                "nvme/tcp export {} of volume {} (which did not start) exists; delete it first",
                decl.nqn, v.decl.name
            )));
        }
        if inv.nvmf.contains_key(&decl.nqn) {
            return Err(MgmtError::AlreadyExists(format!(
                "nvme/tcp export {} already exists",
                decl.nqn
            )));
        }
        // As for vhost-user exports (see `exports_deleting`).
        if inv.exports_deleting.contains_key(&decl.nqn) {
            return Err(MgmtError::AlreadyExists(format!(
                "nvme/tcp export {} is still being deleted",
                decl.nqn
            )));
        }
        let vol = inv.volume(&decl.volume)?;
        if vol.deleting.load(Ordering::SeqCst) {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {} is being deleted",
                decl.volume
            )));
        }
        let sub = self
            .shared
            .target
            .add(
                &vol.volume,
                SubsystemOptions {
                    nqn: decl.nqn.clone(),
                    listen,
                    hosts: decl.hosts.clone(),
                    allow_any_host: decl.allow_any_host,
                    serial: decl.serial.clone(),
                    nguid,
                    read_only: decl.read_only,
                },
            )
            .map_err(from_nvmf)?;
        decl.nguid = super::hex(&nguid);
        // The address as bound (port 0 picks one); kept as asked otherwise.
        if listen.port() == 0 {
            decl.listen = sub.opts.listen.to_string();
        }
        let e = NvmfExp { decl, sub };
        let v = view(&e);
        // One not made at the start: this is it, made now.
        inv.unserved.nvmf.remove(&e.decl.nqn);
        inv.nvmf.insert(e.decl.nqn.clone(), e);
        drop(inv);
        self.save()?;
        Ok(v)
    }

    /// Every NVMe/TCP export.
    pub fn list_nvmf_exports(&self) -> Vec<NvmfExportView> {
        nvmf_views(&self.inv())
    }

    /// Controllers live on export `nqn` now (0 if there is no such
    /// export).
    pub(super) fn nvmf_hosts(&self, nqn: &str) -> usize {
        self.inv()
            .nvmf
            .get(nqn)
            .map_or(0, |e| e.sub.controllers().len())
    }

    /// Stop exporting `nqn`: hosts' connections finish the commands they
    /// started and close (hosts see the controller go away and reconnect
    /// until their loss timeout).
    pub fn delete_nvmf_export(&self, nqn: &str) -> Result<(), MgmtError> {
        self.take_nvmf_export(nqn, &mut false)
    }

    /// [`delete_nvmf_export`](Self::delete_nvmf_export); `removed` as for
    /// `take_export`.
    pub(super) fn take_nvmf_export(&self, nqn: &str, removed: &mut bool) -> Result<(), MgmtError> {
        self.check_open()?;
        // One kept for a volume that did not start: the state file names
        // it no more.
        let kept = {
            let mut inv = self.inv();
            let kept = inv.unavailable.values_mut().find_map(|u| {
                let at = u.nvmf.iter().position(|e| e.nqn == nqn)?;
                Some(u.nvmf.remove(at))
            });
            kept.is_some() || inv.unserved.nvmf.remove(nqn).is_some()
        };
        if kept {
            return self.save();
        }
        let (e, _down) = {
            let mut inv = self.inv();
            let e = inv.nvmf.remove(nqn).ok_or_else(|| {
                MgmtError::NotFound(format!("nvme/tcp export {nqn} does not exist"))
            })?;
            let down = super::exports::TakingDown::new(self, &mut inv, nqn, &e.decl.volume);
            (e, down)
        };
        *removed = true;
        // Stopped first: a save that fails returns early, and the
        // subsystem (held by the target's port, not by `e`) went on
        // serving hosts while the API said it was gone.
        let removed = self.shared.target.remove(&e.decl.nqn).map_err(from_nvmf);
        self.save()?;
        removed
    }
}

/// The running NVMe/TCP exports of `inv`.
pub(super) fn nvmf_views(inv: &super::inventory::Inventory) -> Vec<NvmfExportView> {
    inv.nvmf.values().map(view).collect()
}
