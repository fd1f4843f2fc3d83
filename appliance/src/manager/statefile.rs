//! Writing the state file: one save at a time, each of the whole
//! inventory; a save that fails is said by the health until one works; an
//! operator's edit that no reload applied is set aside, not overwritten.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::config::Config;

use super::{lock, MgmtError, Shared};

/// What the state file's saves keep between them.
#[derive(Debug, Default)]
pub(super) struct Saves {
    /// Why the last save failed: the file is behind what runs.
    failed: Option<String>,
    /// The file as the daemon last wrote or read it: anything else found
    /// there at a save is an operator's edit that no reload applied.
    known: Option<Vec<u8>>,
    /// The file as the daemon last wrote it (or started from): the record
    /// of what runs, against which a reload finds the operator's edit. Not
    /// moved on by a reload's read: what a reload could not apply (a
    /// device not there yet) stays an edit, tried again at the next one
    /// (review).
    written: Option<Vec<u8>>,
    /// Where the last such edit was set aside, and whether a reload had
    /// refused part of it (else no reload read it).
    edit_kept: Option<(PathBuf, bool)>,
    /// The length of what the last save failed to write: the file is
    /// behind, and what is declared since counts against its room.
    unsaved_len: Option<usize>,
}

/// The state file opened, if it is a regular file (opened without
/// blocking: a FIFO put there held every save for good, inside a volume's
/// suspend: audit), and its length.
fn open_state(path: &Path) -> Option<(std::fs::File, u64)> {
    crate::config::open_regular(path).ok()
}

/// The state file's bytes, if it is a regular file no larger than a
/// configuration may be.
fn read_state(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let (f, len) = open_state(path)?;
    if len > crate::config::MAX_FILE {
        return None;
    }
    let mut bytes = Vec::new();
    f.take(crate::config::MAX_FILE)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(bytes)
}

/// Copy `from` to a new file beside `path`, named for now: where an edit of
/// the state file that would be lost is kept. Its name is returned, with
/// why if the copy failed. At most a configuration's largest size is
/// copied: no larger file is one, and the copy runs inside a volume's
/// suspend (a sparse 500 GB file put there held the volume's IO for the
/// whole copy and filled the disk: audit).
fn set_aside(path: &Path, from: impl std::io::Read) -> Result<PathBuf, (PathBuf, String)> {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".edited-{}.{:09}", at.as_secs(), at.subsec_nanos()));
    let aside = PathBuf::from(aside);
    // New, and as private as the state file.
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&aside)
        .and_then(|mut f| {
            // A copy begun is not left half written (each later save
            // tries again under a new name).
            std::io::copy(&mut from.take(crate::config::MAX_FILE), &mut f)
                .and_then(|_| f.flush())
                .and_then(|()| f.sync_all())
                .inspect_err(|_| drop(std::fs::remove_file(&aside)))
        })
        .map(|()| aside.clone())
        .map_err(|e| (aside, e.to_string()))
}

impl Saves {
    /// `path` was read as the daemon's own record (a reload of it): what
    /// it holds is applied, and an edit set aside before is dealt with.
    fn read(&mut self, path: &Path) {
        self.known = read_state(path);
        // An edit a reload refused part of stays named until a reload
        // applies all it asks (`keep_refused_edit`): the file no longer
        // holds that part after the next save (review).
        if self.edit_kept.as_ref().is_some_and(|(_, refused)| !refused) {
            self.edit_kept = None;
        }
    }

    /// What the health says.
    pub(super) fn problems(&self) -> impl Iterator<Item = String> + '_ {
        let failed = self.failed.iter().map(|why| {
            format!("the state file could not be written ({why}): it is behind what runs until a save works (a reload writes it first, and is refused while it cannot)")
        });
        let edit = self.edit_kept.iter().map(|(p, refused)| {
            if *refused {
                format!(
                    "a reload could not apply all of the state file's edit (its report says what it refused): the file as edited is kept in {}, and the state file says what runs from the next change on (edit it again, then `systemctl reload appliance`)",
                    p.display()
                )
            } else {
                format!(
                    "the state file was edited by hand and no reload applied it: the edit is kept in {} (edit, then `systemctl reload appliance`)",
                    p.display()
                )
            }
        });
        failed.chain(edit)
    }

    /// Before writing `path`: an edit found there that the daemon neither
    /// wrote nor read is copied aside (a copy: `path` may be a link).
    /// Refused, saying why, if it cannot be: the edit is not overwritten.
    fn keep_edit(&mut self, path: &Path) -> Result<(), String> {
        use std::io::{Read, Seek};
        let (Some(known), Some((mut now, len))) = (&self.known, open_state(path)) else {
            return Ok(());
        };
        // Read only when it may be what we know: a file of another size
        // is an edit, copied aside as a stream whatever its size (review:
        // a large one was read whole, inside a volume's suspend).
        if len == known.len() as u64 {
            let mut bytes = Vec::new();
            let same = (&mut now)
                .take(len)
                .read_to_end(&mut bytes)
                .is_ok_and(|_| bytes == *known);
            if same {
                return Ok(());
            }
            now.rewind().map_err(|e| {
                format!("holds an edit by hand that no reload applied, which could not be read again to set it aside ({e}), so it is not overwritten")
            })?;
        }
        match set_aside(path, &mut now) {
            Ok(aside) => {
                tracing::error!(file = %path.display(), kept = %aside.display(), "the state file was edited by hand and not reloaded; the edit is set aside and the file rewritten from what runs");
                self.edit_kept = Some((aside, false));
                Ok(())
            }
            // Not overwritten unseen (a disk full fails the save anyway):
            // the save fails, and the health says why.
            Err((aside, e)) => {
                Err(format!(
                    "holds an edit by hand that no reload applied, and setting the edit aside in {} failed ({e}), so it is not overwritten",
                    aside.display()
                ))
            }
        }
    }

    /// A restore from `path` applies `config`: what the file holds is the
    /// daemon's record if it still says that (an edit made while the
    /// restore runs is then set aside at its save: review). If it does not
    /// (an edit before the restore read it, or the daemon's own changes
    /// to what it read, such as `--drop-journal`), nothing is known.
    pub(super) fn restoring(&mut self, path: &Path, config: &Config) {
        self.edit_kept = None;
        self.known = read_state(path).filter(|bytes| {
            std::str::from_utf8(bytes)
                .ok()
                .and_then(|text| Config::parse(path, text).ok())
                .is_some_and(|c| c == *config)
        });
        self.written = self.known.clone();
    }
}

/// Most one declaration takes in the state file: no real one comes near
/// (a device path is at most 4 KiB, an NVMe/TCP export's hosts are NQNs
/// of at most 223 bytes).
pub(super) const MAX_DECL: usize = 64 << 10;

/// The largest state file a new declaration may make: 5 MiB under the
/// largest read back ([`MAX_FILE`](crate::config::MAX_FILE)), room for
/// declarations checked at the same time, each without the others (at
/// most `API_THREADS` = 64 calls at once, each at most `MAX_DECL`).
pub(super) const STATE_LIMIT: usize = crate::config::MAX_FILE as usize - (5 << 20);

impl Shared {
    /// Refuse a new declaration `decl` (of `kind`) past the most of its
    /// kind the daemon takes, or that the state file could not hold: a
    /// state file past the largest the daemon reads back kept it from
    /// starting again (audit). Checked before anything
    /// changes; one declaration's size also without a state file, not
    /// in a restore.
    pub(super) fn check_room(
        &self,
        kind: super::inventory::Kind,
        name: &str,
        decl: &impl serde::Serialize,
    ) -> Result<(), MgmtError> {
        // A restore or a reload makes what a file read holds (at most
        // `MAX_FILE`; one an earlier version wrote included): nothing of
        // it is refused for room. A reload that takes an export down to
        // make it anew, and puts it back if that fails, must not find
        // the cap in its way (review).
        if self.quiet.load(Ordering::SeqCst) || super::applying_file() {
            return Ok(());
        }
        // One that exists is refused as existing, by the call. One the
        // state file holds unmade (a device missing at the start, an
        // export kept unmade) is made in its place, not one more of its
        // kind; its size is checked still (a new declaration replaces the
        // old one: review).
        let (kept, held) = {
            let inv = lock(&self.inv);
            if inv.exists(kind, name) {
                return Ok(());
            }
            (inv.kept(kind, name), inv.count(kind))
        };
        let what = kind.name();
        let most = super::inventory::MAX_OF_A_KIND;
        if !kept && held >= most {
            return Err(MgmtError::ResourceExhausted(format!(
                "the daemon holds {held} {what}s, the most it takes: delete one first"
            )));
        }
        let size = |t: Result<String, toml::ser::Error>| {
            t.map(|t| t.len()).map_err(|e| MgmtError::InvalidArgument {
                field: what,
                reason: format!("cannot be kept in the state file: {e}"),
            })
        };
        // As the state file writes it, with its table's header.
        let one = size(toml::to_string_pretty(decl))? + 32;
        if one > MAX_DECL {
            return Err(MgmtError::InvalidArgument {
                field: what,
                reason: format!(
                    "{one} bytes in the state file; one declaration takes at most {MAX_DECL}"
                ),
            });
        }
        if self.state_file.is_none() {
            return Ok(());
        }
        // The file as last written, not the inventory serialised again
        // at each call (the margin covers a save that failed since).
        let all = {
            let saves = lock(&self.saving);
            let written = saves.written.as_ref().map_or(0, Vec::len);
            written.max(saves.unsaved_len.unwrap_or(0))
        };
        let most = self.state_limit.load(Ordering::Relaxed);
        if all + one > most {
            return Err(MgmtError::ResourceExhausted(format!(
                "the state file would take {} bytes, past the {most} the daemon keeps (it reads back at most {}): delete something first",
                all + one,
                crate::config::MAX_FILE
            )));
        }
        Ok(())
    }

    /// The state file's problems, for the health, without waiting for a
    /// save under way (a disk or mount that stopped answering holds it,
    /// and every health call and metrics scrape with it: audit): what
    /// was seen last is said then.
    pub(super) fn save_problems(&self) -> Vec<String> {
        let mut seen = lock(&self.save_problems);
        match self.saving.try_lock() {
            Ok(s) => *seen = s.problems().collect(),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                *seen = p.into_inner().problems().collect()
            }
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        seen.clone()
    }

    pub(super) fn save_unless(&self, now: bool) -> Result<(), MgmtError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let mut saves = lock(&self.saving);
        if self.quiet.load(Ordering::SeqCst) {
            if now {
                return Err(MgmtError::Unavailable(
                    "the daemon is starting or stopping: the state is saved at the end of that"
                        .into(),
                ));
            }
            return Ok(());
        }
        self.write(path, &mut saves)
    }

    /// Write the inventory to `path` (the caller holds the saves' lock).
    fn write(&self, path: &Path, saves: &mut Saves) -> Result<(), MgmtError> {
        let config = lock(&self.inv).config();
        if let Err(why) = saves.keep_edit(path) {
            tracing::error!(file = %path.display(), "saving the daemon state: the state file {why}");
            saves.failed = Some(format!("the file {why}"));
            saves.unsaved_len = config.saved_len().ok();
            return Err(MgmtError::Internal(format!(
                "the change was made but saving the state failed: the state file {why}"
            )));
        }
        match config.save(path) {
            Ok(text) => {
                saves.known = Some(text.into_bytes());
                saves.written = saves.known.clone();
                saves.failed = None;
                saves.unsaved_len = None;
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "saving the daemon state");
                saves.failed = Some(e.to_string());
                // What the file would hold: creates go on meanwhile, and
                // the file as last written no longer measures them
                // (review). Only when a save fails.
                saves.unsaved_len = config.saved_len().ok();
                // Whatever is there now is ours: the new text if the save
                // failed after the rename (syncing the directory), else the
                // old one, or an edit `keep_edit` has just set aside.
                saves.known = read_state(path);
                Err(MgmtError::Internal(format!(
                    "the change was made but saving the state failed: {e}"
                )))
            }
        }
    }

    /// Read the state file `path` for a reload. Behind what runs (a save
    /// failed: a disk full, read-only), read as it is it would undo every
    /// change since: written first, and the reload refused while it still
    /// cannot be. Under the saves' lock, so no save fails in between
    /// (review). What it holds is the daemon's record from then on.
    /// Returned with the file as the daemon last wrote it (if it knows):
    /// what differs between the two is the operator's edit.
    pub(super) fn read_own(&self, path: &Path) -> Result<OwnRead, MgmtError> {
        let mut saves = lock(&self.saving);
        if self.quiet.load(Ordering::SeqCst) {
            return Err(MgmtError::Unavailable(
                "the daemon is starting or stopping".into(),
            ));
        }
        // An edit the write below sets aside is not applied: the health
        // keeps saying where it is.
        let aside_before = saves.edit_kept.clone();
        if saves.failed.is_some() {
            self.write(path, &mut saves).map_err(|e| {
                MgmtError::FailedPrecondition(format!(
                    "the state file is behind what runs and still cannot be written ({e}); reloading it would undo the changes since"
                ))
            })?;
            tracing::info!("the state file was behind what runs; written before the reload");
        }
        let config = Config::load(path).map_err(|e| {
            MgmtError::FailedPrecondition(format!("configuration file {}: {e}", path.display()))
        })?;
        let base = saves
            .written
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|text| Config::parse(path, text).ok());
        let aside_now = saves.edit_kept.clone();
        saves.read(path);
        if aside_now != aside_before {
            saves.edit_kept = aside_now;
        }
        Ok(OwnRead {
            config,
            base,
            bytes: saves.known.clone(),
        })
    }

    /// A reload of the state file `path` refused part of the operator's
    /// edit, whose file was `edited`. Every save rewrites the file from
    /// what runs, so that part would be lost unseen at the next change
    /// (the reload's own saves included): the file as edited is kept
    /// beside it, and the health says where.
    /// `left` says whether any of it was refused: if not, an edit kept
    /// from an earlier reload is dealt with. The same edit refused again
    /// (a reload that applied nothing leaves the file as it was) keeps its
    /// copy (review: a new one at every reload). Returns why the copy
    /// failed, for the reload's report.
    pub(super) fn keep_refused_edit(
        &self,
        path: &Path,
        edited: &[u8],
        left: bool,
    ) -> Result<(), String> {
        let kept = lock(&self.saving).edit_kept.clone();
        let refused_before = kept.filter(|(_, refused)| *refused).map(|(p, _)| p);
        if !left {
            if refused_before.is_some() {
                lock(&self.saving).edit_kept = None;
            }
            return Ok(());
        }
        if refused_before.as_ref().is_some_and(|p| holds(p, edited)) {
            return Ok(());
        }
        // The copy without the saves' lock: saves run inside volumes'
        // suspends, and the health takes it too.
        match set_aside(path, edited) {
            Ok(aside) => {
                tracing::warn!(file = %path.display(), kept = %aside.display(), "a reload could not apply all of the state file's edit; the file as edited is kept");
                lock(&self.saving).edit_kept = Some((aside, true));
                Ok(())
            }
            Err((aside, e)) => {
                tracing::error!(file = %path.display(), kept = %aside.display(), error = %e, "a reload could not apply all of the state file's edit, and keeping the file as edited failed");
                Err(format!(
                    "keeping the state file as edited in {} failed ({e}): what this reload refused of it is in no file now",
                    aside.display()
                ))
            }
        }
    }
}

/// Whether the file at `path` holds `bytes` (opened without blocking, a
/// regular file only, read no further than their length: review).
fn holds(path: &Path, bytes: &[u8]) -> bool {
    use std::io::Read;
    let Ok((f, len)) = crate::config::open_regular(path) else {
        return false;
    };
    let mut now = Vec::new();
    len == bytes.len() as u64 && f.take(len).read_to_end(&mut now).is_ok() && now == bytes
}

/// The state file read for a reload.
pub(super) struct OwnRead {
    /// What it declares.
    pub config: Config,
    /// What the daemon last wrote there, if it knows: what differs between
    /// the two is the operator's edit.
    pub base: Option<Config>,
    /// Its bytes.
    pub bytes: Option<Vec<u8>>,
}
