//! The daemon's start and stop: everything the state file (or the initial
//! configuration) declares brought up in order, the health the daemon
//! reports, and the stop that records volumes clean.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;

use super::{lock, Health, Manager, MgmtError, RestoreError};

/// How long a stop waits for failed journals to drain (see
/// `Manager::settle_failed_journals`).
const JOURNAL_DRAIN_AT_STOP: Duration = Duration::from_secs(30);

impl Manager {
    /// Bring up everything `config` declares, in order; the first error
    /// stops it (the caller should refuse to start).
    ///
    /// `initial` says the configuration is the operator's initial setup
    /// (`--config`, no state yet): RAID volumes on blank devices are then
    /// created. Restoring saved state, a volume is only ever assembled from
    /// its superblocks (except on RAM devices, which start blank).
    pub fn restore(&self, config: &Config, initial: bool) -> Result<(), RestoreError> {
        // From the state file: what it holds is the daemon's record (an
        // edit made while the restore runs is set aside at its save, not
        // overwritten: review).
        if let (false, Some(path)) = (initial, &self.shared.state_file) {
            lock(&self.shared.saving).restoring(path, config);
        }
        self.shared.quiet.store(true, Ordering::SeqCst);
        let r = self.restore_all(config, initial);
        self.shared.quiet.store(false, Ordering::SeqCst);
        r?;
        match self.save() {
            // From saved state, everything runs as the file says: a disk
            // full or read-only now must not keep every VM down (the
            // health says the file is behind until a save works).
            Err(e) if !initial => {
                tracing::error!(error = %e, "the state file could not be written after the start; serving anyway");
                Ok(())
            }
            r => r.map_err(|source| RestoreError {
                part: "state file".into(),
                source,
            }),
        }
    }

    fn restore_all(&self, config: &Config, initial: bool) -> Result<(), RestoreError> {
        let _file = super::ApplyingFile::begin();
        let failed = |part: String| move |source| RestoreError { part, source };
        // A name declared twice in saved state (a block copied by hand):
        // the first is the one, and the second goes with the restore's own
        // save (see `first_of_each`). An operator's first configuration is
        // refused whole instead, as for any error.
        for d in first_of_each(&config.devices, |d| &d.name, "a device", initial) {
            let attached = if initial {
                self.attach_device(d.clone())
            } else {
                self.attach_saved(d.clone())
            };
            match attached {
                Ok(_) => {}
                // Saved state: a device that cannot be opened now is
                // missing, as md starts an array with a member gone; one
                // missing device must not keep every volume (and VM) down.
                // An operator's first setup is refused whole instead.
                Err(e) if !initial && !matches!(e, MgmtError::AlreadyExists(_)) => {
                    tracing::error!(device = d.name, spec = d.spec, error = %e, "device missing at the start: its volumes start without it where they can");
                    self.inv().missing.insert(d.name.clone(), d.clone());
                }
                Err(e) => return Err(failed(format!("device {}", d.name))(e)),
            }
        }
        for v in first_of_each(&config.volumes, |v| &v.name, "a volume", initial) {
            match self.restore_volume(v, initial) {
                Ok(()) => {}
                // Saved state: a volume that cannot start is left out, not
                // a reason to keep every other one (and VM) down. An
                // operator's first setup is refused whole instead.
                Err(e) if !initial => self.set_unavailable(v, e.to_string()),
                Err(e) => return Err(failed(format!("volume {}", v.name))(e)),
            }
        }
        // Saved state: an export that cannot be made now is kept (see
        // `unserved`), not a reason to keep every volume (and VM) down. An
        // operator's first setup is refused whole instead.
        for e in first_of_each(&config.exports, |e| &e.name, "an export", initial) {
            let mut e = e.clone();
            if !initial {
                self.queues_on_reactors_there_are(&mut e);
            }
            if !self.keep_export_of_unavailable(&e) {
                match self.create_export(e.clone()) {
                    Ok(_) => {}
                    Err(err) if !initial => self.keep_unserved_export(&e, err.to_string()),
                    Err(err) => return Err(failed(format!("export {}", e.name))(err)),
                }
            }
        }
        for e in first_of_each(
            &config.nvmf_exports,
            |e| &e.nqn,
            "an NVMe/TCP export",
            initial,
        ) {
            if !self.keep_nvmf_of_unavailable(e) {
                match self.create_nvmf_export(e.clone()) {
                    Ok(_) => {}
                    Err(err) if !initial => self.keep_unserved_nvmf(e, err.to_string()),
                    Err(err) => return Err(failed(format!("nvme/tcp export {}", e.nqn))(err)),
                }
            }
        }
        Ok(())
    }

    /// Health of every volume.
    pub fn health(&self) -> Health {
        let mut problems = Vec::new();
        if self.shared.set.is_stopped() {
            problems.push("the reactors have stopped".to_string());
        }
        {
            let inv = self.inv();
            for d in inv.missing.keys() {
                if !inv.left_out.contains_key(d) {
                    problems.push(format!("device {d} could not be opened at the start"));
                }
            }
            for (d, why) in &inv.left_out {
                problems.push(format!("device {d} was left out at the start: {why}"));
            }
        }
        for (v, why) in self.unavailable_volumes() {
            problems.push(format!("volume {v} did not start: {why}"));
        }
        problems.extend(self.inv().unserved.problems());
        problems.extend(self.shared.save_problems());
        for v in self.list_volumes() {
            if v.state != "optimal" {
                problems.push(format!("volume {} is {}", v.name, v.state));
            }
            match v.journal_state {
                Some(j) if j.failed && j.given_up => problems.push(format!(
                    "volume {}: its journal device failed; writes go on without write-hole protection",
                    v.name
                )),
                Some(j) if j.failed => problems.push(format!(
                    "volume {}: its journal device failed and is not given up yet ({} cached blocks to drain, or the state file cannot be written): writes made since wait",
                    v.name, j.cached_blocks
                )),
                _ => {}
            }
            if v.pending_changes > 0 {
                problems.push(format!(
                    "volume {}: {} change(s) waiting for its IO to drain",
                    v.name, v.pending_changes
                ));
            }
        }
        Health {
            status: if problems.is_empty() {
                "ok"
            } else {
                "degraded"
            },
            problems,
        }
    }

    /// Stop serving: a failed journal still draining gets up to 30 s to
    /// finish first, exports disconnect (in-flight IO drains), volumes are
    /// recorded clean. The state file keeps them for the next start.
    pub fn shutdown(&self) {
        if !self.shared.closed.load(Ordering::SeqCst) {
            self.settle_failed_journals(JOURNAL_DRAIN_AT_STOP);
            let _ = self.save();
        }
        self.shutdown_without_saving();
    }

    /// A journal that failed and still drains its write-back cache gets up
    /// to `limit` to finish and be given up before the daemon stops: the
    /// blocks it holds exist nowhere else but in its failed log, which the
    /// next start may not be able to read (and the writes made without it
    /// since are answered only once it is given up).
    fn settle_failed_journals(&self, limit: Duration) {
        let journals: Vec<(String, Arc<crate::raid::journal::Journal>)> = self
            .inv()
            .volumes
            .iter()
            .filter_map(|(name, v)| {
                let j = v.monitor.as_ref()?.journal()?;
                (j.has_failed() && !j.given_up_recorded()).then(|| (name.clone(), j))
            })
            .collect();
        let deadline = Instant::now() + limit;
        for (name, j) in journals {
            while !j.given_up_recorded() {
                if Instant::now() >= deadline {
                    tracing::warn!(volume = name, cached = j.cache().len(), "stopping with a failed journal not yet drained; its log is replayed at the next start if it can be read");
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Stop everything, leaving the state file as it is (after a failed
    /// restore, so the file still says what should run).
    pub fn shutdown_without_saving(&self) {
        self.shared.quiet.store(true, Ordering::SeqCst);
        self.shared.closed.store(true, Ordering::SeqCst);
        let (exports, volumes) = {
            let mut inv = self.inv();
            inv.nvmf.clear();
            (
                std::mem::take(&mut inv.exports),
                std::mem::take(&mut inv.volumes),
            )
        };
        // Hosts' connections finish their commands and close.
        self.shared.target.shutdown();
        for (name, e) in exports {
            if let Err(err) = e.export.delete(true) {
                tracing::error!(export = name, error = %err, "deleting the export at shutdown");
            }
        }
        for (name, v) in volumes {
            // An operator's suspend ends with the daemon.
            lock(&v.held).take();
            if let Some(m) = &v.monitor {
                if let Err(err) = m.close() {
                    tracing::error!(volume = name, error = %err, "recording a clean shutdown");
                }
            }
        }
    }
}

/// Of saved declarations, the first of each name (all of them for an
/// operator's `initial` configuration, which is refused whole on a second).
/// A second declaration made the restore fail (a device: systemd restarted
/// the daemon for good with no VM served) or was kept unserved for good (an
/// export) (audit, review); it is dropped by the restore's own save, and
/// logged whole, so that an edit made in the copy leaves a trace.
fn first_of_each<'a, T: std::fmt::Debug>(
    items: &'a [T],
    name: impl Fn(&T) -> &String,
    kind: &str,
    initial: bool,
) -> Vec<&'a T> {
    let mut seen = std::collections::BTreeSet::new();
    items
        .iter()
        .filter(|item| {
            let first = seen.insert(name(item).as_str()) || initial;
            if !first {
                tracing::error!(name = name(item), dropped = ?item, "{kind} declared twice in the state file: the second is left out, and the file written again without it");
            }
            first
        })
        .collect()
}
