//! One daemon per state file and API socket. A second daemon on the same
//! state would write the same member disks as the first, and would unlink
//! the first one's API socket; so each takes an exclusive lock on a file
//! next to them (flock: released by the kernel when the process dies, so
//! a crash never leaves a stale lock behind) and fails at once, naming
//! the holder, when it is taken.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// A held lock; released when dropped or when the process ends.
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock file of `path` (a state file or an API socket), beside the
/// file it names: through symbolic links (the state file may be one, and
/// saves follow it), and with its directory resolved, so two spellings of
/// one file take one lock.
pub fn lock_path(path: &Path) -> PathBuf {
    // A link to a file not made yet (a state file before its first save,
    // which follows the link) locks beside its target, as once it exists.
    // (Where the saves go: `Config::save` follows it the same way.)
    let path = crate::config::follow_links(path).unwrap_or_else(|_| path.to_path_buf());
    let path = path.as_path();
    let resolved =
        std::fs::canonicalize(path).unwrap_or_else(|_| match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) => std::fs::canonicalize(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })
            .map_or_else(|_| path.to_path_buf(), |d| d.join(name)),
            _ => path.to_path_buf(),
        });
    let mut p = resolved.into_os_string();
    p.push(".lock");
    PathBuf::from(p)
}

/// Take the lock of `path`, which this daemon uses as its `what`.
pub fn lock(path: &Path, what: &str) -> Result<InstanceLock, String> {
    let lp = lock_path(path);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lp)
        .map_err(|e| format!("opening the lock file {}: {e}", lp.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::WouldBlock {
            return Err(format!("locking {}: {err}", lp.display()));
        }
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        let holder = match pid.trim() {
            "" => "another appliance daemon".to_string(),
            p => format!("another appliance daemon (pid {p})"),
        };
        return Err(format!(
            "{holder} already uses {} as its {what} (lock {}): stop it first, or give this one its own",
            path.display(),
            lp.display()
        ));
    }
    let pid = format!("{}\n", std::process::id());
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(pid.as_bytes()));
    if let Err(e) = written {
        return Err(format!("writing {}: {e}", lp.display()));
    }
    Ok(InstanceLock {
        _file: file,
        path: lp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_file_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.toml");
        let first = lock(&state, "state file").unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(first.path(), real.join("state.toml.lock"));
        let e = lock(&state, "state file").err().unwrap();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains("state file"), "{e}");
        drop(first);
        lock(&state, "state file").unwrap();
    }

    /// Two spellings of one state file (a symbolic link to it, a path
    /// through `..`) took two locks, and two daemons ran on one state.
    #[test]
    fn every_spelling_of_one_file_takes_one_lock() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let state = real.join("state.toml");
        std::fs::write(&state, "").unwrap();
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&state, &link).unwrap();
        let _held = lock(&state, "state file").unwrap();
        assert!(lock(&link, "state file").is_err());
        assert!(lock(&dir.path().join("real/../real/state.toml"), "state file").is_err());
        // Not yet there (an API socket before its bind): by its directory.
        let sock = real.join("api.sock");
        let _api = lock(&sock, "API socket").unwrap();
        assert!(lock(&dir.path().join("real/../real/api.sock"), "API socket").is_err());
        // A link to a state file not made yet: beside its target, as once
        // the first save has made it.
        let later = real.join("later.toml");
        let link = dir.path().join("later-link.toml");
        std::os::unix::fs::symlink(&later, &link).unwrap();
        let _first = lock(&link, "state file").unwrap();
        std::fs::write(&later, "").unwrap();
        assert!(lock(&link, "state file").is_err());
        assert!(lock(&later, "state file").is_err());
    }
}
