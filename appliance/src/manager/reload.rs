//! Reload: bring the running setup to what a configuration file says, by
//! the same calls an operator would make (so each change is its own
//! transaction, refused or made whole), in an order that never takes
//! something away that another part still uses: exports go first, then
//! volumes, then devices; new devices come first, then volumes, settings
//! and exports. What cannot be changed in place (a volume's members or
//! level, an export's socket while a frontend is connected) is reported,
//! not forced.

use crate::config::{Config, DeviceDecl, ExportDecl, NvmfExportDecl, VolumeDecl};
use crate::raid::geometry::Layout;
use crate::raid::journal::JournalMode;

use super::statefile::OwnRead;
use super::{lock, Manager, MgmtError};

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Changes made, in order, as an operator reads them.
    pub applied: Vec<String>,
    /// Changes the file asks for that were refused or cannot be made in
    /// place, with the reason.
    pub refused: Vec<String>,
}

impl ReloadReport {
    pub(super) fn did(&mut self, what: String, r: Result<(), MgmtError>) {
        match r {
            Ok(()) => self.applied.push(what),
            Err(e) => self.refused.push(format!("{what}: {e}")),
        }
    }

    /// [`did`](Self::did) for the making of an export that was taken away
    /// to be made again as the file says: if that failed, `again` makes
    /// the one that ran, not left gone.
    fn made_or_again(
        &mut self,
        what: String,
        r: Result<(), MgmtError>,
        again: Option<impl FnOnce() -> Result<(), MgmtError>>,
    ) {
        match (r, again) {
            (Err(e), Some(again)) => self.refused.push(format!(
                "{what}: {e}; the one that ran is made again: {}",
                again().map_or_else(|e| format!("failed: {e}"), |()| "done".into())
            )),
            (r, _) => self.did(what, r),
        }
    }
}

/// What a reload applies of its file. Of the daemon's own state file, only
/// the operator's edit: what differs between the file and the daemon's
/// last record of it (`base`). What runs and is in neither was made since
/// (a create whose save waited for the reload's read of the file, or came
/// after it); what both name alike and no longer runs was deleted since.
/// Compared with what runs instead, the reload undid such changes, which
/// their callers had been told were made, and saved that (audit). Of an
/// operator's configuration file (no base), everything.
struct Edit<'a> {
    file: &'a Config,
    base: Option<&'a Config>,
}

impl Edit<'_> {
    /// Whether the edit touches the declaration `find` picks out of a
    /// configuration (the file's against the base's).
    fn touches<T: PartialEq>(&self, find: impl Fn(&Config) -> Option<&T>) -> bool {
        self.base.is_none_or(|b| find(b) != find(self.file))
    }

    fn device(&self, name: &str) -> bool {
        self.touches(|c| c.devices.iter().find(|d| d.name == name))
    }

    fn volume(&self, name: &str) -> bool {
        self.touches(|c| c.volumes.iter().find(|v| v.name == name))
    }

    fn export(&self, name: &str) -> bool {
        self.touches(|c| c.exports.iter().find(|e| e.name == name))
    }

    fn nvmf(&self, nqn: &str) -> bool {
        self.touches(|c| c.nvmf_exports.iter().find(|e| e.nqn == nqn))
    }

    /// Whether a part of the edit was refused: something it adds or takes
    /// away is not so in `now` (the daemon's record after the reload), or
    /// one of `refused` names something it touches (a change to a
    /// declaration kept: the declarations are not compared, the daemon
    /// fills in fields the file leaves out). A refusal that names nothing
    /// the edit touches (a volume that still does not start) is not its.
    fn left_out(&self, now: &Config, refused: &[String]) -> bool {
        fn names(c: &Config) -> [Vec<&str>; 4] {
            [
                c.devices.iter().map(|d| d.name.as_str()).collect(),
                c.volumes.iter().map(|v| v.name.as_str()).collect(),
                c.exports.iter().map(|e| e.name.as_str()).collect(),
                c.nvmf_exports.iter().map(|e| e.nqn.as_str()).collect(),
            ]
        }
        let (file, now) = (names(self.file), names(now));
        let base = self.base.map(names).unwrap_or_default();
        let touched = |kind: usize, name: &str| match kind {
            0 => self.device(name),
            1 => self.volume(name),
            2 => self.export(name),
            _ => self.nvmf(name),
        };
        let named = |n: &str| {
            refused.iter().any(|r| {
                r.split(|c: char| c.is_whitespace() || matches!(c, ',' | '(' | ')'))
                    .any(|w| w.trim_end_matches(':') == n)
            })
        };
        (0..4).any(|k| {
            file[k]
                .iter()
                .chain(&base[k])
                .filter(|n| touched(k, n))
                .any(|n| file[k].contains(n) != now[k].contains(n) || named(n))
        })
    }
}

/// Whether two export declarations serve the same thing the same way
/// (the queues' reactors may differ: those move in place). Anything else
/// that differs (the socket's owner and mode too) makes the export again,
/// or is refused while a VM is connected: never left silently as it was.
fn same_export(a: &ExportDecl, b: &ExportDecl) -> bool {
    a.volume == b.volume
        && a.socket == b.socket
        && a.num_queues.max(1) == b.num_queues.max(1)
        && a.read_only == b.read_only
        && (b.serial.is_empty() || a.serial == b.serial)
        && a.memory_limit_mib == b.memory_limit_mib
        && a.live_migration == b.live_migration
        && a.socket_mode == b.socket_mode
        && a.socket_owner == b.socket_owner
        && a.socket_group == b.socket_group
}

/// Whether a running NVMe/TCP export is what `w` declares (an empty
/// serial or NGUID in the file means "whatever it was made with").
fn same_nvmf(a: &NvmfExportDecl, w: &NvmfExportDecl) -> bool {
    a.volume == w.volume
        && same_listen(&a.listen, &w.listen)
        && same_hosts(&a.hosts, &w.hosts)
        && a.allow_any_host == w.allow_any_host
        && a.read_only == w.read_only
        && (w.serial.is_empty() || a.serial == w.serial)
        && (w.nguid.is_empty() || a.nguid.eq_ignore_ascii_case(&w.nguid))
}

/// Whether two lists name the same hosts, in any order and however often
/// (in order, a file listing them otherwise made the export again, and
/// every connected host lost its controller).
fn same_hosts(a: &[String], b: &[String]) -> bool {
    use std::collections::BTreeSet;
    a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>()
}

/// Whether an export bound at `running` is what the file's `listen`
/// says: port 0 there means "any port", which the running one keeps (it
/// would be made again on a new port at every reload).
fn same_listen(running: &str, file: &str) -> bool {
    use std::net::SocketAddr;
    match (running.parse::<SocketAddr>(), file.parse::<SocketAddr>()) {
        (Ok(r), Ok(f)) if f.port() == 0 => r.ip() == f.ip(),
        _ => running == file,
    }
}

impl Manager {
    /// Reload the file the daemon was configured from (see
    /// [`set_config_file`](Self::set_config_file)).
    pub fn reload_configured(&self) -> Result<ReloadReport, MgmtError> {
        let path = lock(&self.shared.config_file).clone().ok_or_else(|| {
            MgmtError::FailedPrecondition(
                "the daemon has no configuration file to reload (start it with --config or --state)"
                    .into(),
            )
        })?;
        self.reload_file(&path)
    }

    /// The file [`reload_configured`](Self::reload_configured) reads.
    pub fn set_config_file(&self, path: Option<std::path::PathBuf>) {
        *lock(&self.shared.config_file) = path;
    }

    /// Read `path` and [`reload`](Self::reload) it.
    pub fn reload_file(&self, path: &std::path::Path) -> Result<ReloadReport, MgmtError> {
        // The daemon's own file, not an argument of the call: broken or
        // missing, the call cannot be served as things are.
        // One reload at a time: each compares against what runs, and two
        // at once undid each other's steps. The file is read once this
        // one's turn has come: read before, a wait behind another (each
        // step may wait a volume's drain deadline) made it undo every API
        // change saved meanwhile.
        let _one = lock(&self.shared.reloading);
        // The daemon's own record: a volume it names is assembled from its
        // superblocks, never created over blank devices (a wrong path), as
        // at a start from it.
        let from_state = self.shared.state_file.as_deref() == Some(path);
        let read = if from_state {
            self.shared.read_own(path)?
        } else {
            let config = Config::load(path).map_err(|e| {
                MgmtError::FailedPrecondition(format!("configuration file {}: {e}", path.display()))
            })?;
            OwnRead {
                config,
                base: None,
                bytes: None,
            }
        };
        let edit = Edit {
            file: &read.config,
            base: read.base.as_ref(),
        };
        let mut rep = self.reload_as(&edit, !from_state);
        // What it refused of the daemon's own file would be lost at the
        // next save, which writes what runs: kept aside, and said. Only
        // what the edit asked for counts (review: a volume that still
        // does not start is refused at every reload).
        // (No edit: nothing to say of one kept before.)
        if from_state && read.base.as_ref() != Some(&read.config) {
            if let Some(bytes) = &read.bytes {
                let now = self.inv().config();
                let left = edit.left_out(&now, &rep.refused);
                if let Err(e) = self.shared.keep_refused_edit(path, bytes, left) {
                    rep.refused.push(e);
                }
            }
        }
        Ok(rep)
    }

    /// Apply the difference between the running setup and `config`, an
    /// operator's setup: a RAID volume it adds over blank devices is made.
    pub fn reload(&self, config: &Config) -> ReloadReport {
        let _one = lock(&self.shared.reloading);
        let edit = Edit {
            file: config,
            base: None,
        };
        self.reload_as(&edit, true)
    }

    /// Apply the difference between the running setup and the file of
    /// `edit`, in what the edit touches (the caller holds the reload
    /// lock); with `initial` (see [`restore`](Self::restore)) a volume
    /// added over blank devices is created.
    fn reload_as(&self, edit: &Edit<'_>, initial: bool) -> ReloadReport {
        let _file = super::ApplyingFile::begin();
        let config = edit.file;
        let mut rep = ReloadReport::default();
        let (devices, volumes, exports) = {
            let inv = self.inv();
            (
                inv.devices
                    .values()
                    .map(|d| d.decl.clone())
                    .collect::<Vec<_>>(),
                inv.volumes
                    .values()
                    .map(|v| lock(&v.decl).clone())
                    .collect::<Vec<_>>(),
                inv.exports
                    .values()
                    .map(|e| (e.decl.clone(), e.export.queue_cores()))
                    .collect::<Vec<_>>(),
            )
        };
        // Exports kept (for a volume that did not start, or unmade) now:
        // one gone from those lists by the time the reload would make it
        // was deleted meanwhile (review).
        let kept_at_start = self.kept_export_names();
        let nvmf: Vec<NvmfExportDecl> = self
            .list_nvmf_exports()
            .into_iter()
            .map(|v| v.decl)
            .collect();
        // NVMe/TCP exports that go, or must be made again (their hosts
        // reconnect).
        // One that is to be made again is taken away only if the file's
        // declaration would be made: a typo must not leave it deleted.
        // A declaration's volume must run or come with the same file.
        let volume_known = |name: &str| {
            if config.volumes.iter().any(|v| v.name == name)
                || volumes.iter().any(|v| v.name == name)
            {
                Ok(())
            } else {
                Err(MgmtError::NotFound(format!(
                    "volume {name} is neither running nor in the file"
                )))
            }
        };
        let mut kept_nvmf = Vec::new();
        // Taken away to be made again as the file says: if that fails
        // (an address that cannot be bound, a volume that did not come),
        // the running one is made again, not left gone.
        let mut remade_nvmf: Vec<NvmfExportDecl> = Vec::new();
        let mut remade: Vec<ExportDecl> = Vec::new();
        for e in &nvmf {
            let wanted = config.nvmf_exports.iter().find(|w| w.nqn == e.nqn);
            if wanted.is_some_and(|w| same_nvmf(e, w)) || !edit.nvmf(&e.nqn) {
                continue;
            }
            // As an export a VM is connected to (`delete_export` without
            // force): a file cut short or emptied by mistake took every
            // host's controller away, then the volume behind it. (One the
            // file changes is made again as it says: its hosts reconnect;
            // it cannot change in place.)
            let hosts = self.nvmf_hosts(&e.nqn);
            if hosts > 0 && wanted.is_none() {
                rep.refused.push(format!(
                    "nvme/tcp export {}: {hosts} host(s) connected; the running one is kept (delete it with `applctl nvmf delete` to take them away)",
                    e.nqn
                ));
                kept_nvmf.push(e.nqn.clone());
                continue;
            }
            let check = wanted.map_or(Ok(()), |w| {
                super::nvmf::check_nvmf(w).and_then(|_| volume_known(&w.volume))
            });
            if let Err(err) = check {
                rep.refused.push(format!(
                    "nvme/tcp export {}: {err}; the running one is kept",
                    e.nqn
                ));
                kept_nvmf.push(e.nqn.clone());
                continue;
            }
            // Taken away by this call (even when the save after it failed:
            // review), it is made again as the one that ran if the file's
            // cannot be; one an operator deleted meanwhile stays deleted.
            let mut removed = false;
            let r = self.take_nvmf_export(&e.nqn, &mut removed);
            if removed && wanted.is_some() {
                remade_nvmf.push(e.clone());
            }
            rep.did(format!("delete nvme/tcp export {}", e.nqn), r);
        }
        let wanted_export = |name: &str| config.exports.iter().find(|e| e.name == name);
        // Exports that go, or must be made again.
        let mut kept = Vec::new();
        for (e, _) in &exports {
            let wanted = wanted_export(&e.name);
            if wanted.is_some_and(|w| same_export(e, w)) || !edit.export(&e.name) {
                continue;
            }
            let check = wanted.map_or(Ok(()), |w| {
                // Checked as it will be made (the state file's queues on
                // the reactors there are: review).
                let mut w = w.clone();
                if !initial {
                    self.queues_on_reactors_there_are(&mut w);
                }
                self.check_export(&mut w)
                    .and_then(|_| volume_known(&w.volume))
            });
            if let Err(err) = check {
                rep.refused
                    .push(format!("export {}: {err}; the running one is kept", e.name));
                kept.push(e.name.clone());
                continue;
            }
            // As above.
            let mut removed = false;
            let r = self.take_export(&e.name, false, &mut removed);
            if removed && wanted.is_some() {
                remade.push(e.clone());
            }
            rep.did(format!("delete export {}", e.name), r);
        }
        // Kept exports the file names no more, or for another volume: let
        // go (their volume's delete below would refuse while one of them
        // names it: review). What the reload itself lets go is no
        // operator's delete meanwhile.
        let mut dropped = self.drop_kept_not_in(config, &mut rep);
        // Volumes that go (those that did not start too).
        let unavailable: Vec<String> = self.inv().unavailable.keys().cloned().collect();
        for v in volumes.iter().map(|v| &v.name).chain(&unavailable) {
            if !config.volumes.iter().any(|w| &w.name == v) && edit.volume(v) {
                let r = self.delete_volume(v);
                rep.did(format!("delete volume {v}"), r);
            }
        }
        // Devices that go, and devices that come.
        for d in devices.iter().filter(|d| edit.device(&d.name)) {
            match config.devices.iter().find(|w| w.name == d.name) {
                None => {
                    let r = self.detach_device(&d.name);
                    rep.did(format!("detach device {}", d.name), r);
                }
                Some(w) if w.spec != d.spec || w.block_size.max(512) != d.block_size.max(512) => {
                    rep.refused.push(format!(
                        "device {}: attached as {}, the file says {}: detach and attach it to change that",
                        d.name, d.spec, w.spec
                    ));
                }
                Some(_) => {}
            }
        }
        // Devices missing since the start: one the file no longer names is
        // let go of (the next save would have written it back); one it
        // still names is tried again, and still missing is no refusal (the
        // daemon's own state file names it: every reload, and every
        // `systemctl reload`, failed while a disk was dead).
        let missing: Vec<DeviceDecl> = self.inv().missing.values().cloned().collect();
        for d in &missing {
            if !config.devices.iter().any(|w| w.name == d.name) && edit.device(&d.name) {
                let r = self.detach_device(&d.name);
                rep.did(format!("let go of missing device {}", d.name), r);
            }
        }
        for w in &config.devices {
            if !devices.iter().any(|d| d.name == w.name) {
                let was_missing = missing.iter().any(|d| d.name == w.name && d.spec == w.spec);
                if !was_missing && !edit.device(&w.name) {
                    // Detached since the record the file still matches.
                    continue;
                }
                let r = if was_missing {
                    self.attach_saved(w.clone())
                } else {
                    self.attach_device(w.clone())
                }
                .map(|_| ());
                // (Left out for sharing another device's storage, and
                // still sharing it: missing as before, not a refusal at
                // every reload; review.)
                let shares = matches!(r, Err(MgmtError::AlreadyExists(_)))
                    && self.inv().left_out.contains_key(&w.name);
                let still_missing = was_missing
                    && (shares
                        || matches!(r, Err(MgmtError::NotFound(_) | MgmtError::Unavailable(_))));
                if still_missing {
                    tracing::info!(device = w.name, "reload: the device is still missing");
                    continue;
                }
                rep.did(format!("attach device {}", w.name), r);
            }
        }
        // Volumes that come, and settings of those that stay.
        for w in &config.volumes {
            match volumes.iter().find(|v| v.name == w.name) {
                // One that did not start is tried again, keeping its
                // devices and name meanwhile; its exports in the file are
                // kept with it while it still does not.
                None if self.inv().unavailable.contains_key(&w.name) => {
                    let r = self.restore_volume(w, initial);
                    if let Err(e) = &r {
                        self.still_unavailable(w, e.to_string());
                    }
                    rep.did(format!("start volume {}", w.name), r);
                }
                // Deleted, or changed, since the record the file still
                // matches.
                _ if !edit.volume(&w.name) => {}
                None => {
                    let r = self.restore_volume(w, initial);
                    rep.did(format!("create volume {}", w.name), r);
                }
                Some(v) => self.reload_volume(v, w, &mut rep),
            }
        }
        // Again for those a volume this reload started left waiting.
        dropped.extend(self.drop_kept_not_in(config, &mut rep));
        let unserved = self.kept_export_names();
        // Exports that come back or are new; queues that move.
        for w in &config.exports {
            // The state file's queues on the reactors there are, before it
            // is made or kept (see `queues_on_reactors_there_are`).
            let mut wrapped = w.clone();
            if !initial {
                self.queues_on_reactors_there_are(&mut wrapped);
            }
            let w = &wrapped;
            let running = self
                .inv()
                .exports
                .get(&w.name)
                .map(|e| (e.decl.clone(), e.export.queue_cores()));
            // Running when the reload began and gone now, not by its doing:
            // an operator deleted it meanwhile (from a file read before
            // that delete, a SIGHUP of the state file made it again: audit).
            let unmade = kept_at_start.0.contains(&w.name) || unserved.0.contains(&w.name);
            let deleted_meanwhile = (exports.iter().any(|(e, _)| e.name == w.name)
                && !remade.iter().any(|e| e.name == w.name))
                || (unmade
                    && !dropped.contains(&w.name)
                    && !self.kept_export_names().0.contains(&w.name));
            match running {
                None if kept.contains(&w.name) => {}
                // Deleted, or its queues moved, since the record the file
                // still matches.
                None if !unmade && !edit.export(&w.name) => {}
                Some(_) if !edit.export(&w.name) => {}
                // Before it is kept again for a volume that did not start.
                None if deleted_meanwhile => rep.refused.push(format!(
                    "export {}: deleted while the reload ran; not made again",
                    w.name
                )),
                None if self.keep_export_of_unavailable(w) => {}
                None => {
                    let old = remade.iter().find(|e| e.name == w.name).cloned();
                    let mut made = w.clone();
                    // No serial in the file is "whatever it was made with":
                    // an export made again for another reason keeps the one
                    // its guest saw (the default is not what it was).
                    if let Some(o) = old
                        .as_ref()
                        .filter(|o| made.serial.is_empty() && o.volume == made.volume)
                    {
                        made.serial = o.serial.clone();
                    }
                    let r = self.create_export(made).map(|_| ());
                    if let Err(e) = &r {
                        self.still_unserved(&w.name, e);
                    }
                    let again = old.map(|old| || self.create_export(old).map(|_| ()));
                    rep.made_or_again(format!("create export {}", w.name), r, again);
                }
                Some((_, cores)) => {
                    let wanted = crate::export::ExportOptions {
                        queue_cores: w.queue_cores.clone(),
                        ..crate::export::ExportOptions::new(w.socket.clone(), w.num_queues.max(1))
                    }
                    .placement(self.shared.set.len());
                    for (q, &core) in wanted.iter().enumerate() {
                        if q < cores.len() && cores[q] != core {
                            let r = self.move_queue(&w.name, q as u16, core).map(|_| ());
                            rep.did(
                                format!("move queue {q} of export {} to reactor {core}", w.name),
                                r,
                            );
                        }
                    }
                }
            }
        }
        for w in &config.nvmf_exports {
            let unmade = kept_at_start.1.contains(&w.nqn) || unserved.1.contains(&w.nqn);
            let deleted_meanwhile = (nvmf.iter().any(|e| e.nqn == w.nqn)
                && !remade_nvmf.iter().any(|e| e.nqn == w.nqn))
                || (unmade
                    && !dropped.contains(&w.nqn)
                    && !self.kept_export_names().1.contains(&w.nqn));
            if !kept_nvmf.contains(&w.nqn)
                && !self.inv().nvmf.contains_key(&w.nqn)
                && deleted_meanwhile
            {
                rep.refused.push(format!(
                    "nvme/tcp export {}: deleted while the reload ran; not made again",
                    w.nqn
                ));
                continue;
            }
            // Deleted, or running as it says, since the record the file
            // still matches.
            if !unmade && !edit.nvmf(&w.nqn) {
                continue;
            }
            if !kept_nvmf.contains(&w.nqn)
                && !self.inv().nvmf.contains_key(&w.nqn)
                && !self.keep_nvmf_of_unavailable(w)
            {
                let old = remade_nvmf.iter().find(|e| e.nqn == w.nqn).cloned();
                let mut made = w.clone();
                // As for vhost-user exports: what the file leaves empty is
                // what the namespace was made with.
                if let Some(o) = old.as_ref().filter(|o| o.volume == made.volume) {
                    if made.serial.is_empty() {
                        made.serial = o.serial.clone();
                    }
                    if made.nguid.is_empty() {
                        made.nguid = o.nguid.clone();
                    }
                }
                let r = self.create_nvmf_export(made).map(|_| ());
                if let Err(e) = &r {
                    self.still_unserved_nvmf(&w.nqn, e);
                }
                let again = old.map(|old| || self.create_nvmf_export(old).map(|_| ()));
                rep.made_or_again(format!("create nvme/tcp export {}", w.nqn), r, again);
            }
        }
        if !rep.applied.is_empty() {
            tracing::info!(applied = ?rep.applied, refused = ?rep.refused, "reloaded the configuration");
            // A volume assembled by the reload is in the inventory but not
            // yet in the state file (only creations and changes save).
            if let Err(e) = self.save() {
                rep.refused.push(format!("saving the state: {e}"));
            }
        }
        rep
    }

    /// The settings of a running volume `v` that `w` changes.
    fn reload_volume(&self, v: &VolumeDecl, w: &VolumeDecl, rep: &mut ReloadReport) {
        let name = &v.name;
        if w.level != v.level || w.members != v.members {
            rep.refused.push(format!(
                "volume {name}: its level or members differ from the file ({} {:?} running); those change by fail, replace and takeover",
                v.level, v.members
            ));
        }
        if v.level == "raid5"
            && w.level == "raid5"
            && (w.chunk_kib != v.chunk_kib
                || Layout::parse(&w.layout).ok() != Layout::parse(&v.layout).ok())
        {
            rep.refused.push(format!(
                "volume {name}: chunk {} KiB, layout {} running, the file says {} KiB, {}: a RAID5's geometry does not change in place",
                v.chunk_kib, v.layout, w.chunk_kib, w.layout
            ));
        }
        if v.bitmap && w.bitmap && w.bitmap_chunk_kib != v.bitmap_chunk_kib {
            rep.refused.push(format!(
                "volume {name}: bitmap regions of {} KiB running, the file says {}: remove the bitmap and add it again to change them",
                v.bitmap_chunk_kib, w.bitmap_chunk_kib
            ));
        }
        if w.qos != v.qos {
            let r = self.set_volume_qos(name, w.qos).map(|_| ());
            rep.did(format!("IO limits of {name}"), r);
        }
        if v.level == "single" {
            return;
        }
        for s in &w.spares {
            if !v.spares.contains(s) {
                let r = self.add_spare(name, s, false).map(|_| ());
                rep.did(format!("add spare {s} to {name}"), r);
            }
        }
        for s in &v.spares {
            if !w.spares.contains(s) {
                let r = self.remove_spare(name, s).map(|_| ());
                rep.did(format!("remove spare {s} from {name}"), r);
            }
        }
        let mode = |m: &str| JournalMode::parse(m).unwrap_or(JournalMode::WriteThrough);
        match (&v.journal, &w.journal) {
            (Some(_), None) => {
                let r = self.remove_journal(name).map(|_| ());
                rep.did(format!("remove the journal of {name}"), r);
            }
            (None, Some(j)) => {
                let r = self
                    .add_journal(name, j, &w.journal_mode, false)
                    .map(|_| ());
                rep.did(format!("add journal {j} to {name}"), r);
            }
            (Some(a), Some(b)) if a != b => rep.refused.push(format!(
                "volume {name}: journal {a} running, {b} in the file: remove the journal first"
            )),
            (Some(_), Some(_)) if mode(&v.journal_mode) != mode(&w.journal_mode) => {
                let r = self
                    .set_journal_mode(name, mode(&w.journal_mode).name())
                    .map(|_| ());
                rep.did(format!("journal mode of {name}"), r);
            }
            _ => {}
        }
        if w.bitmap != v.bitmap {
            let r = self
                .set_bitmap(name, w.bitmap, w.bitmap_chunk_kib)
                .map(|_| ());
            rep.did(format!("bitmap of {name}"), r);
        }
        if w.serialize != v.serialize {
            let r = self.set_serialize(name, w.serialize).map(|_| ());
            rep.did(format!("serialize policy of {name}"), r);
        }
        if w.write_behind != v.write_behind {
            let r = self.set_write_behind(name, w.write_behind).map(|_| ());
            rep.did(format!("write-behind of {name}"), r);
        }
        if (w.min_rebuild_bytes_per_sec, w.max_rebuild_bytes_per_sec)
            != (v.min_rebuild_bytes_per_sec, v.max_rebuild_bytes_per_sec)
        {
            let r = self
                .set_rebuild_rate(
                    name,
                    w.min_rebuild_bytes_per_sec,
                    w.max_rebuild_bytes_per_sec,
                )
                .map(|_| ());
            rep.did(format!("rebuild rate of {name}"), r);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::{lock, Edit, Manager};
    use crate::config::{DeviceDecl, VolumeDecl};

    /// A manager that saves to `state.toml` in the directory returned.
    pub(in crate::manager) fn with_state_file() -> (poller::Reactors, tempfile::TempDir, Manager) {
        let reactors = poller::Reactors::start(poller::ReactorConfig {
            count: 1,
            ..Default::default()
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mgr = Manager::new(reactors.set(), Some(dir.path().join("state.toml")));
        (reactors, dir, mgr)
    }

    pub(in crate::manager) fn stop(reactors: poller::Reactors, mgr: Manager) {
        mgr.shutdown();
        drop(mgr);
        let _ = reactors.shutdown();
    }

    fn ram(name: &str) -> DeviceDecl {
        DeviceDecl {
            name: name.into(),
            spec: "ram:4M".into(),
            block_size: 4096,
        }
    }

    /// From an audit: a reload of the state file undid every change that
    /// ran but was not in the file when it read it (a create whose save
    /// waited for that read, or came just after it): the device detached,
    /// the volume deleted, each caller told it was made, and the file then
    /// agreed. Only the operator's edit is applied: what differs between
    /// the file and the daemon's last record of it.
    #[test]
    fn a_reload_of_the_state_file_keeps_changes_made_since_it_read_the_file() {
        let (reactors, dir, mgr) = with_state_file();
        let state = dir.path().join("state.toml");
        mgr.attach_device(ram("a")).unwrap();
        mgr.attach_device(ram("gone")).unwrap();
        // An operator's edit: "gone" taken out of the file.
        let mut edited = crate::config::Config::load(&state).unwrap();
        edited.devices.retain(|d| d.name != "gone");
        edited.save(&state).unwrap();
        let rep = {
            let _one = lock(&mgr.shared.reloading);
            let read = mgr.shared.read_own(&state).unwrap();
            // Changes made (and saved) after the reload read the file.
            mgr.attach_device(ram("b")).unwrap();
            mgr.create_volume(VolumeDecl::new("v", "single", &["a"]), true)
                .unwrap();
            let edit = Edit {
                file: &read.config,
                base: read.base.as_ref(),
            };
            mgr.reload_as(&edit, false)
        };
        let devices: Vec<String> = mgr
            .list_devices()
            .into_iter()
            .map(|d| d.decl.name)
            .collect();
        assert!(devices.contains(&"b".to_string()), "{devices:?} {rep:?}");
        assert!(
            !devices.contains(&"gone".to_string()),
            "the edit applied: {rep:?}"
        );
        assert_eq!(mgr.list_volumes().len(), 1, "{rep:?}");
        assert_eq!(rep.applied, vec!["detach device gone".to_string()]);
        stop(reactors, mgr);
    }

    /// From review: what a reload could not apply (a device whose
    /// directory is not there yet) is still the operator's edit at the
    /// next reload, which tries it again.
    #[test]
    fn what_a_reload_could_not_apply_is_tried_again_at_the_next() {
        let (reactors, dir, mgr) = with_state_file();
        let state = dir.path().join("state.toml");
        mgr.attach_device(ram("a")).unwrap();
        let image = dir.path().join("later").join("d.img");
        let mut edited = crate::config::Config::load(&state).unwrap();
        edited.devices.push(DeviceDecl {
            name: "d".into(),
            spec: format!("file:{}:4M", image.display()),
            block_size: 4096,
        });
        edited.save(&state).unwrap();
        let rep = mgr.reload_file(&state).unwrap();
        assert_eq!(rep.refused.len(), 1, "{rep:?}");
        std::fs::create_dir(dir.path().join("later")).unwrap();
        let rep = mgr.reload_file(&state).unwrap();
        assert_eq!(rep.applied, vec!["attach device d".to_string()], "{rep:?}");
        // Applied whole: the copy kept of it is said no more.
        assert!(mgr.health().problems.is_empty(), "{:?}", mgr.health());
        stop(reactors, mgr);
    }

    /// From the last closing note: what a reload refused of the state
    /// file's edit was lost unseen at the next save (the reload's own
    /// saves included, when it applied another part), which writes what
    /// runs. The file as edited is kept beside it, and the health says
    /// where.
    #[test]
    fn what_a_reload_refused_is_kept_when_a_save_rewrites_the_file() {
        let (reactors, dir, mgr) = with_state_file();
        let state = dir.path().join("state.toml");
        mgr.attach_device(ram("a")).unwrap();
        let image = dir.path().join("later").join("d.img");
        let mut edited = crate::config::Config::load(&state).unwrap();
        edited.devices.push(ram("b"));
        edited.devices.push(DeviceDecl {
            name: "d".into(),
            spec: format!("file:{}:4M", image.display()),
            block_size: 4096,
        });
        edited.save(&state).unwrap();
        let edited_text = std::fs::read_to_string(&state).unwrap();
        let rep = mgr.reload_file(&state).unwrap();
        assert_eq!(rep.applied, vec!["attach device b".to_string()], "{rep:?}");
        assert_eq!(rep.refused.len(), 1, "{rep:?}");
        // The reload's save wrote what runs: "d" is not in the file.
        let now = crate::config::Config::load(&state).unwrap();
        assert!(now.devices.iter().all(|d| d.name != "d"), "{now:?}");
        let health = mgr.health();
        let kept: Vec<&String> = health
            .problems
            .iter()
            .filter(|p| p.contains("could not apply all of the state file's edit"))
            .collect();
        assert_eq!(kept.len(), 1, "{health:?}");
        let kept_copies = || -> Vec<std::path::PathBuf> {
            std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.to_string_lossy().contains("state.toml.edited-"))
                .collect()
        };
        let copies = kept_copies();
        assert_eq!(copies.len(), 1, "{copies:?}");
        let aside = copies[0].clone();
        assert!(kept[0].contains(&*aside.to_string_lossy()), "{kept:?}");
        assert_eq!(std::fs::read_to_string(&aside).unwrap(), edited_text);
        // A reload with no edit since keeps saying where it is, and makes
        // no other copy.
        let rep = mgr.reload_file(&state).unwrap();
        assert!(rep.applied.is_empty() && rep.refused.is_empty(), "{rep:?}");
        let problems = mgr.health().problems;
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&*aside.to_string_lossy())),
            "{problems:?}"
        );
        assert_eq!(kept_copies(), [aside]);
        stop(reactors, mgr);
    }

    /// From review: a refused change to a declaration that stays (here a
    /// volume's level) left no copy of the edit, and the next save wrote
    /// what runs over it.
    #[test]
    fn a_refused_change_to_a_declaration_kept_is_kept_aside() {
        let (reactors, dir, mgr) = with_state_file();
        let state = dir.path().join("state.toml");
        mgr.attach_device(ram("a")).unwrap();
        mgr.attach_device(ram("b")).unwrap();
        mgr.create_volume(VolumeDecl::new("v", "single", &["a"]), true)
            .unwrap();
        let mut edited = crate::config::Config::load(&state).unwrap();
        edited.volumes[0].level = "raid1".into();
        edited.volumes[0].members = vec!["a".into(), "b".into()];
        edited.save(&state).unwrap();
        let rep = mgr.reload_file(&state).unwrap();
        assert!(
            rep.refused.iter().any(|r| r.starts_with("volume v:")),
            "{rep:?}"
        );
        let problems = mgr.health().problems;
        assert!(
            problems
                .iter()
                .any(|p| p.contains("could not apply all of the state file's edit")),
            "{problems:?}"
        );
        stop(reactors, mgr);
    }
}
