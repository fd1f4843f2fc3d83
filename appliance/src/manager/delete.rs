//! Deleting a volume (md's --stop): its IO stops, what a journal's cache
//! holds reaches the members, its superblocks are recorded clean and kept,
//! its devices go free.

use std::sync::atomic::Ordering;

use super::{from_op, lock, Manager, MgmtError, Vol};
use crate::raid::journal::JournalMode;

impl Manager {
    /// Stop a volume that no export uses. Its superblocks are recorded
    /// clean and kept (like md's --stop): creating a volume on its devices
    /// again needs `force`, so data is never lost by a slip.
    pub fn delete_volume(&self, name: &str) -> Result<(), MgmtError> {
        self.check_open()?;
        // One that did not start: nothing runs; its devices go free and
        // the state file names it (and its exports) no more.
        if let Some(u) = self.take_unavailable(name)? {
            tracing::info!(
                volume = name,
                exports = u.exports.len() + u.nvmf.len(),
                "a volume that did not start is deleted, with its exports"
            );
            return self.save();
        }
        let v = {
            let inv = self.inv();
            let v = inv.volume(name)?;
            let users: Vec<String> = inv
                .exports
                .values()
                .filter(|e| e.decl.volume == name)
                .map(|e| e.decl.name.clone())
                .chain(
                    inv.exports_creating
                        .iter()
                        .filter(|(_, (v, _))| v == name)
                        .map(|(e, _)| e.clone()),
                )
                .chain(
                    inv.exports_deleting
                        .iter()
                        .filter(|(_, v)| *v == name)
                        .map(|(e, _)| format!("{e} (being deleted)")),
                )
                .chain(
                    inv.nvmf
                        .values()
                        .filter(|e| e.decl.volume == name)
                        .map(|e| e.decl.nqn.clone()),
                )
                // Kept for a reload to make (see `unserved`).
                .chain(
                    inv.unserved
                        .exports
                        .values()
                        .filter(|(e, _)| e.volume == name)
                        .map(|(e, _)| e.name.clone()),
                )
                .chain(
                    inv.unserved
                        .nvmf
                        .values()
                        .filter(|(e, _)| e.volume == name)
                        .map(|(e, _)| e.nqn.clone()),
                )
                .collect();
            if !users.is_empty() {
                return Err(MgmtError::FailedPrecondition(format!(
                    "volume {name} is exported by {}; delete the export first",
                    users.join(", ")
                )));
            }
            if v.deleting.swap(true, Ordering::SeqCst) {
                return Err(MgmtError::FailedPrecondition(format!(
                    "volume {name} is being deleted"
                )));
            }
            v
        };
        let _busy = lock(&v.busy);
        let switched = match drain_before_delete(name, &v, self.shared.timeout()) {
            Ok(switched) => switched,
            Err(e) => {
                v.deleting.store(false, Ordering::SeqCst);
                return Err(e);
            }
        };
        // No IO can reach it after this; only then is it recorded clean.
        let removed = v.volume.quiesce().remove(self.shared.timeout());
        lock(&v.held).take();
        if let Err(e) = removed {
            v.deleting.store(false, Ordering::SeqCst);
            let e = super::from_quiesce(name, e);
            // (Its kind kept: clients retry on it.)
            return Err(
                match switched.then(|| write_back_again(name, &v)).flatten() {
                    Some(left) => e.also(&left),
                    None => e,
                },
            );
        }
        if let Some(m) = &v.monitor {
            if let Err(e) = m.close_deleted() {
                tracing::error!(volume = name, error = %e, "recording a clean stop");
            }
        }
        {
            // Under one lock: a create of the same name in between claimed
            // its devices under that name, and the release then freed them
            // (a device in use, free to detach or to give another role).
            let mut inv = self.inv();
            inv.volumes.remove(name);
            self.shared.roles.release_volume(name);
        }
        self.save()
    }
}

/// A write-back journal's cache goes to the members before its volume
/// is deleted. The member superblocks do not name the journal, so members
/// taken up again without it (`volume import`, md) said clean without the
/// acknowledged writes only the log held (audit); a restart from the
/// state file replays the log, a deletion forgets it. A failed journal's
/// cache (it drains on its own, through writes and the checkpointer the
/// deletion stops) is waited for too (review). Refused, write-back again
/// as it was, if the members do not take the cache within `timeout`.
/// True if it switched the journal to write-through.
fn drain_before_delete(
    name: &str,
    v: &Vol,
    timeout: std::time::Duration,
) -> Result<bool, MgmtError> {
    let Some(m) = &v.monitor else {
        return Ok(false);
    };
    let Some(j) = m.journal() else {
        return Ok(false);
    };
    if j.cache().is_empty() {
        return Ok(false);
    }
    let switched = !j.has_failed() && j.mode() == JournalMode::WriteBack;
    if j.has_failed() {
        if let Err(e) = j.drain(&v.volume, timeout) {
            tracing::warn!(volume = name, error = %e, "draining a failed journal's cache before a delete");
        }
    } else {
        m.set_journal_mode(JournalMode::WriteThrough)
            .map_err(|e| from_op(name, e))?;
    }
    if j.cache().is_empty() {
        return Ok(switched);
    }
    let left = switched.then(|| write_back_again(name, v)).flatten();
    Err(MgmtError::FailedPrecondition(format!(
        "volume {name}: {} acknowledged blocks are only in its journal's cache and did not reach the members in time; not deleted (the members would say clean without them){}",
        j.cache().len(),
        left.map_or(String::new(), |l| format!("; {l}"))
    )))
}

/// A delete that drained the write-back cache was refused: the journal is
/// write-back again, as the operator left it. What the caller must say if
/// it could not be.
fn write_back_again(name: &str, v: &Vol) -> Option<String> {
    let m = v.monitor.as_ref()?;
    let e = m.set_journal_mode(JournalMode::WriteBack).err()?;
    tracing::warn!(volume = name, error = %e, "switching the journal back to write-back after a refused delete");
    Some(format!(
        "its journal was left write-through (switching it back failed: {e}; set it again with journal-mode)"
    ))
}
