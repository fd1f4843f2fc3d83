//! Which files and block devices the API may name. Whoever can call the API
//! can have the daemon (root) open, create and write the paths in `file:`
//! specifications; without a limit that is every file on the host. The
//! operator lists the directories devices may live in (`--allow-path`); by
//! default the state file's directory and /dev/disk/by-id, whose names udev
//! keeps stable. Anything else is refused before it is opened.

use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

/// Where udev keeps stable names for block devices.
pub const BY_ID: &str = "/dev/disk/by-id";

/// The directories `file:` devices may live in.
#[derive(Debug, Clone)]
pub struct AllowedPaths {
    /// Each directory as given and as resolved (symlinks followed), so a
    /// path is compared with both spellings.
    dirs: Vec<(PathBuf, Option<PathBuf>)>,
}

impl AllowedPaths {
    /// These directories (relative ones are taken from the current
    /// directory); `/` allows everything.
    pub fn new(dirs: impl IntoIterator<Item = PathBuf>) -> AllowedPaths {
        let dirs = dirs
            .into_iter()
            .map(|d| {
                let d = std::path::absolute(&d).unwrap_or(d);
                let real = std::fs::canonicalize(&d).ok();
                (d, real)
            })
            .collect();
        AllowedPaths { dirs }
    }

    /// The daemon's default: the state file's directory (if there is a
    /// state file) and /dev/disk/by-id, plus what the operator added.
    pub fn daemon_default(state_file: Option<&Path>, extra: &[PathBuf]) -> AllowedPaths {
        let state_dir = state_file
            .map(|s| match s.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .filter(|d| {
                // A state file in / (or a relative one from a service's
                // working directory /) must not allow every path.
                let root = std::fs::canonicalize(d).is_ok_and(|r| r == Path::new("/"));
                if root {
                    tracing::warn!(
                        directory = %d.display(),
                        "the state file's directory is /; it is not allowed for devices (use --allow-path)"
                    );
                }
                !root
            });
        AllowedPaths::new(
            state_dir
                .into_iter()
                .chain([PathBuf::from(BY_ID)])
                .chain(extra.iter().cloned()),
        )
    }

    /// The directories, for messages.
    pub fn describe(&self) -> String {
        let v: Vec<String> = self
            .dirs
            .iter()
            .map(|(d, _)| d.display().to_string())
            .collect();
        v.join(", ")
    }

    fn under_lexical(&self, p: &Path) -> bool {
        self.dirs
            .iter()
            .any(|(d, real)| p.starts_with(d) || real.as_ref().is_some_and(|r| p.starts_with(r)))
    }

    fn under_resolved(&self, p: &Path) -> bool {
        self.dirs
            .iter()
            .any(|(_, real)| real.as_ref().is_some_and(|r| p.starts_with(r)))
    }

    /// Whether the daemon may open (or create) `path`: it must be absolute,
    /// without `..`, inside an allowed directory as written, and, once
    /// symlinks are resolved, a regular file (or the directory a new file
    /// goes into) must still be inside one. Block devices are taken by the
    /// name the operator allowed: /dev/disk/by-id's entries are symlinks
    /// into /dev by design.
    pub fn check(&self, path: &Path) -> Result<(), String> {
        let refuse = |why: &str| {
            Err(format!(
                "{} {why}; devices are allowed only in {} (the daemon's --allow-path adds more)",
                path.display(),
                self.describe()
            ))
        };
        if !path.is_absolute() {
            return refuse("is not an absolute path");
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return refuse("contains ..");
        }
        if !self.under_lexical(path) {
            return refuse("is outside the allowed directories");
        }
        match std::fs::metadata(path) {
            Ok(meta) if meta.file_type().is_file() => {
                let real = std::fs::canonicalize(path)
                    .map_err(|e| format!("{}: resolving its real path: {e}", path.display()))?;
                if !self.under_resolved(&real) {
                    return refuse(&format!(
                        "is a symlink to {}, outside the allowed directories",
                        real.display()
                    ));
                }
                Ok(())
            }
            Ok(meta) if meta.file_type().is_block_device() => Ok(()),
            // Opening some character devices acts (a watchdog arms, a tty
            // becomes the daemon's terminal): refused before any open.
            Ok(_) => refuse("is neither a regular file nor a block device"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // To be created: the directory it goes into, resolved.
                let Some(parent) = path.parent() else {
                    return refuse("has no directory");
                };
                match std::fs::canonicalize(parent) {
                    Ok(real) if !self.under_resolved(&real) => refuse(&format!(
                        "would be created in {}, outside the allowed directories",
                        real.display()
                    )),
                    // A missing directory is reported when the file is
                    // created (NotFound).
                    _ => Ok(()),
                }
            }
            // Permission and similar errors are reported by the open.
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inside_and_outside() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let allowed = AllowedPaths::new([dir.path().to_path_buf()]);
        let inside = dir.path().join("m0.img");
        assert!(allowed.check(&inside).is_ok(), "a new file inside");
        std::fs::write(&inside, b"x").unwrap();
        assert!(allowed.check(&inside).is_ok(), "an existing file inside");
        let outside = other.path().join("m1.img");
        let e = allowed.check(&outside).unwrap_err();
        assert!(e.contains("outside the allowed directories"), "{e}");
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
        assert!(allowed
            .check(Path::new("rel/m.img"))
            .unwrap_err()
            .contains("absolute"));
        let dotdot = dir.path().join("../etc/passwd");
        assert!(allowed.check(&dotdot).unwrap_err().contains(".."));
        // A symlink inside to a file outside is refused; so is a new file
        // under a symlinked directory that leads outside.
        let target = other.path().join("secret");
        std::fs::write(&target, b"s").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = allowed.check(&link).unwrap_err();
        assert!(e.contains("symlink"), "{e}");
        let dlink = dir.path().join("dlink");
        std::os::unix::fs::symlink(other.path(), &dlink).unwrap();
        let e = allowed.check(&dlink.join("new.img")).unwrap_err();
        assert!(e.contains("would be created in"), "{e}");
        // `/` allows everything, but only when asked for: a state file in /
        // does not.
        assert!(AllowedPaths::new([PathBuf::from("/")])
            .check(&target)
            .is_ok());
        let from_root = AllowedPaths::daemon_default(Some(Path::new("/state.toml")), &[]);
        assert!(from_root.check(&target).is_err());
        // Character devices are refused before they are opened.
        let dev = AllowedPaths::new([PathBuf::from("/dev")]);
        let e = dev.check(Path::new("/dev/null")).unwrap_err();
        assert!(
            e.contains("neither a regular file nor a block device"),
            "{e}"
        );
    }
}
