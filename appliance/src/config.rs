//! The daemon's declared state: devices, volumes and exports, as a TOML
//! file. The same format serves the operator's initial setup and the state
//! the daemon persists after every change, so an operator can read and
//! edit one and start from the other.
//!
//! Saving is atomic (temporary file, fsync, rename, fsync of the
//! directory): a crash leaves the old file or the new one, never a mix.
//! Loading is strict (unknown keys are errors) and errors name the line,
//! because a daemon that guesses at a hand-broken file can lose volumes.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A device to attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceDecl {
    /// The operator's name for it.
    pub name: String,
    /// `ram:SIZE`, `null:SIZE`, `file:PATH`, `file:PATH:SIZE` or
    /// `nvme:PCI-ADDRESS[/NSID]`.
    pub spec: String,
    /// 512 or 4096.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
}

fn default_block_size() -> u32 {
    4096
}

/// A volume over attached devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeDecl {
    /// Name (at most 32 bytes: it is recorded in the superblocks).
    pub name: String,
    /// `single`, `raid1` or `raid5`.
    pub level: String,
    /// Device names in slot order.
    pub members: Vec<String>,
    /// Hot spares.
    #[serde(default)]
    pub spares: Vec<String>,
    /// RAID5 chunk in KiB.
    #[serde(default = "default_chunk_kib")]
    pub chunk_kib: u32,
    /// RAID5 layout (mdadm's names).
    #[serde(default = "default_layout")]
    pub layout: String,
    /// Rebuild and scrub rate limit in bytes per second (0: none).
    #[serde(default)]
    pub max_rebuild_bytes_per_sec: u64,
    /// The rate a rebuild or scrub yields to while the volume serves guest
    /// IO (md's sync_speed_min; 0: it does not yield).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub min_rebuild_bytes_per_sec: u64,
    /// RAID5 write journal device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<String>,
    /// "write-through" (the default, also when empty) or "write-back".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub journal_mode: String,
    /// Keep a write-intent bitmap (RAID1 and RAID5, not with a journal):
    /// after an unclean shutdown only regions written shortly before it
    /// are resynchronised. Recorded in the superblocks, which decide at
    /// restart; this says what was asked for.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bitmap: bool,
    /// Bitmap region in KiB of each member (0: 65536, md's 64 MiB).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bitmap_chunk_kib: u32,
    /// RAID1: md's serialize_policy (overlapping writes reach the mirrors
    /// one after the other).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub serialize: bool,
    /// RAID1: md's write-behind, the most writes to write-mostly members
    /// in the background at once (0: off). Needs the bitmap.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub write_behind: u32,
    /// IO limits (SPDK's bdev_set_qos_limit); all 0: none.
    #[serde(default, skip_serializing_if = "crate::qos::QosLimits::is_none")]
    pub qos: crate::qos::QosLimits,
    /// The array's name in its members' superblocks when it is not the
    /// volume's: an md array imported under another name keeps md's (so
    /// md assembles it as before). Empty: the volume's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub array: String,
    /// The volume's UUID as its superblocks have it (32 hex digits), kept
    /// by the daemon: a restart assembles that volume, never another of
    /// the same name (disks moved in from elsewhere, an md array) among
    /// the declared devices. Empty: found by name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    /// Its journal's identity (16 hex digits), kept by the daemon: a
    /// restart replays only that journal, never another volume's that a
    /// renamed or renumbered device put under this name. Empty: not
    /// checked.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub journal_id: String,
    /// A single-device volume's disk as the disk names itself (an NVMe
    /// namespace's NGUID or EUI-64; a local drive's without them, its
    /// controller's vendor, serial and model with the namespace ID), kept
    /// by the daemon: a restart
    /// gives the guest that disk, never another that took its PCI address
    /// or its target's address. Empty: not checked (a file or RAM device
    /// has no such name), and taken from the device at the next start.
    /// Only a daemon that keeps a state file keeps it: with `--config`
    /// alone, each start takes the disk it finds (or the one named here).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device_id: String,
}

impl VolumeDecl {
    /// The name the members' superblocks give the array.
    pub fn array_name(&self) -> &str {
        if self.array.is_empty() {
            &self.name
        } else {
            &self.array
        }
    }

    /// A volume of `level` over `members` with every other field at its
    /// default, as a configuration file that names only these would.
    pub fn new(name: &str, level: &str, members: &[&str]) -> VolumeDecl {
        VolumeDecl {
            name: name.into(),
            level: level.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            spares: vec![],
            chunk_kib: default_chunk_kib(),
            layout: default_layout(),
            max_rebuild_bytes_per_sec: 0,
            min_rebuild_bytes_per_sec: 0,
            journal: None,
            journal_mode: String::new(),
            bitmap: false,
            bitmap_chunk_kib: 0,
            serialize: false,
            write_behind: 0,
            qos: Default::default(),
            array: String::new(),
            uuid: String::new(),
            journal_id: String::new(),
            device_id: String::new(),
        }
    }
}

fn is_zero(x: &u32) -> bool {
    *x == 0
}

fn yes() -> bool {
    true
}

fn is_true(x: &bool) -> bool {
    *x
}

fn is_zero_u64(x: &u64) -> bool {
    *x == 0
}

fn default_chunk_kib() -> u32 {
    64
}

fn default_layout() -> String {
    "left-symmetric".into()
}

/// A vhost-user-blk export of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportDecl {
    /// Name.
    pub name: String,
    /// The volume exported.
    pub volume: String,
    /// The vhost-user unix socket.
    pub socket: PathBuf,
    /// Virtqueues.
    #[serde(default = "default_queues")]
    pub num_queues: u16,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// What the guest reads as the disk's serial.
    #[serde(default)]
    pub serial: String,
    /// The reactor of each queue (cyclically); empty: queue i on reactor i.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queue_cores: Vec<usize>,
    /// Guest memory the frontend may map (and pin for DMA), in MiB; 0:
    /// the host's physical memory.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub memory_limit_mib: u64,
    /// Offer dirty logging so QEMU can live-migrate the VM (on by
    /// default; a state file keeps only `false`).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub live_migration: bool,
    /// Mode of the socket file, octal ("0660"); unset: what the umask leaves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<String>,
    /// Owner of the socket file (user name or uid); unset: the daemon's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_owner: Option<String>,
    /// Group of the socket file (group name or gid); unset: the daemon's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
}

impl Default for ExportDecl {
    /// What a configuration file leaves unsaid (one queue, migratable).
    fn default() -> ExportDecl {
        ExportDecl {
            name: String::new(),
            volume: String::new(),
            socket: PathBuf::new(),
            num_queues: default_queues(),
            read_only: false,
            serial: String::new(),
            queue_cores: vec![],
            memory_limit_mib: 0,
            live_migration: true,
            socket_mode: None,
            socket_owner: None,
            socket_group: None,
        }
    }
}

/// A volume exported over NVMe/TCP: one subsystem, namespace 1.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmfExportDecl {
    /// The subsystem's NQN (its name for hosts and for the API).
    pub nqn: String,
    /// The volume exported.
    pub volume: String,
    /// Where it listens: "IP:PORT" (4420 is NVMe/TCP's port).
    pub listen: String,
    /// Host NQNs allowed to connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Any host may connect (the list is ignored).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_any_host: bool,
    /// The serial number hosts see; "": the volume's name.
    #[serde(default)]
    pub serial: String,
    /// The namespace's NGUID (32 hex digits), also its UUID; "": made at
    /// creation and kept, so hosts see the same identity after restarts.
    #[serde(default)]
    pub nguid: String,
    /// Refuse writes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

fn default_queues() -> u16 {
    1
}

/// Everything the daemon runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[[device]]` tables.
    #[serde(default, rename = "device", skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceDecl>,
    /// `[[volume]]` tables.
    #[serde(default, rename = "volume", skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeDecl>,
    /// `[[export]]` tables.
    #[serde(default, rename = "export", skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<ExportDecl>,
    /// `[[nvmf_export]]` tables.
    #[serde(default, rename = "nvmf_export", skip_serializing_if = "Vec::is_empty")]
    pub nvmf_exports: Vec<NvmfExportDecl>,
}

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid; the message names the line.
    #[error("{path}: line {line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// The file `path` names through symbolic links, followed by hand so the
/// file need not exist yet (a state file before its first save); as many
/// links as the kernel follows (40).
pub fn follow_links(path: &Path) -> std::io::Result<PathBuf> {
    let mut target = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&target)?;
                target = match target.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            _ => break,
        }
    }
    Ok(target)
}

/// Largest configuration or state file read (a thousand volumes with
/// their exports take well under 1 MiB).
pub const MAX_FILE: u64 = 16 << 20;

/// `path` opened for reading, if it is a regular file, and its length.
/// Opened without blocking: a FIFO put there held its reader for good.
pub(crate) fn open_regular(path: &Path) -> std::io::Result<(std::fs::File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok((file, meta.len()))
}

impl Config {
    /// Parse `text` (read from `path`, named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |r| {
                text[..r.start.min(text.len())].lines().count().max(1)
            });
            // A span at the start of a line counts the lines before it.
            let line = match e.span() {
                Some(r) if r.start < text.len() && text[..r.start].ends_with('\n') => line + 1,
                _ => line,
            };
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                message: e.message().to_string(),
            }
        })
    }

    /// Load `path`: a regular file of at most `MAX_FILE` bytes. Opened
    /// without blocking and checked before it is read: a FIFO put where
    /// the file was blocked a reload (and then the daemon's stop, which
    /// waits for it) for good, and /dev/zero grew the read until the
    /// process died.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let io = |source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        };
        let (file, len) = open_regular(path).map_err(io)?;
        if len > MAX_FILE {
            return Err(io(std::io::Error::other(format!(
                "{len} bytes; a configuration holds at most {MAX_FILE}"
            ))));
        }
        let mut text = String::new();
        // (A file growing while it is read stops at the limit too.)
        file.take(MAX_FILE + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_FILE {
            return Err(io(std::io::Error::other("grew past the limit while read")));
        }
        Config::parse(path, &text)
    }

    /// How many bytes [`save`](Self::save) would write.
    pub fn saved_len(&self) -> Result<usize, toml::ser::Error> {
        Ok(SAVED_HEADER.len() + toml::to_string_pretty(self)?.len())
    }

    /// Write to `path` atomically; the text written.
    pub fn save(&self, path: &Path) -> Result<String, ConfigError> {
        let io = |source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = toml::to_string_pretty(self).map_err(|e| io(std::io::Error::other(e)))?;
        // Never a file the daemon would not read back (a reload of a hand
        // edit near the limit grows a little as saved: review): the save
        // fails, and the old file stays.
        let len = SAVED_HEADER.len() + text.len();
        if len as u64 > MAX_FILE {
            return Err(io(std::io::Error::other(format!(
                "{len} bytes, past the {MAX_FILE} a configuration may hold: not written"
            ))));
        }
        // Through a symbolic link to the file it names (an operator's
        // state file kept elsewhere): renamed over the link, the new state
        // went beside it and the file the link names was left behind.
        // (The file need not exist yet: the link is followed by hand.)
        let target = follow_links(path).map_err(io)?;
        let path = target.as_path();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io)?;
        tmp.write_all(SAVED_HEADER.as_bytes())
            .and_then(|_| tmp.write_all(text.as_bytes()))
            .and_then(|_| tmp.as_file().sync_all())
            .map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(format!("{SAVED_HEADER}{text}"))
    }
}

/// The first line of a file the daemon writes.
const SAVED_HEADER: &str = "# Written by the appliance daemon after every change.\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// From review: the file was read whatever it was: a FIFO blocked a
    /// reload (and the stop waiting for it) for good, /dev/zero grew the
    /// read without bound.
    #[test]
    fn only_a_regular_file_of_bounded_size_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.toml");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = Config::load(&fifo).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = Config::load(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let big = dir.path().join("big.toml");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE + 1)
            .unwrap();
        let e = Config::load(&big).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
    }

    /// From review: nothing kept a save from writing a file larger than
    /// the daemon reads back (a reload of a hand edit near the limit
    /// grows a little as saved), and the next start failed on it. Such a
    /// save fails; the file before it stays.
    #[test]
    fn a_save_past_the_largest_file_read_back_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.toml");
        let mut c = Config::default();
        c.save(&path).unwrap();
        let before = std::fs::read(&path).unwrap();
        c.devices = (0..MAX_FILE / 4096 + 1)
            .map(|i| DeviceDecl {
                name: format!("d{i}"),
                spec: format!("file:/{}", "x".repeat(4096)),
                block_size: 4096,
            })
            .collect();
        let e = c.save(&path).unwrap_err().to_string();
        assert!(e.contains("not written"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    /// From review: a save renamed the new file over a state path that is
    /// a symbolic link, leaving the file it named behind.
    #[test]
    fn a_save_through_a_link_writes_the_file_it_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        let real = dir.path().join("real/state.toml");
        let link = dir.path().join("state.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let c = Config::default();
        c.save(&link).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(Config::load(&real).unwrap(), c);
        c.save(&link).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn round_trip_and_defaults() {
        let text = r#"
[[device]]
name = "d0"
spec = "ram:64M"

[[volume]]
name = "vol0"
level = "single"
members = ["d0"]

[[export]]
name = "e0"
volume = "vol0"
socket = "/tmp/e0.sock"
"#;
        let c = Config::parse(Path::new("x.toml"), text).unwrap();
        assert_eq!(c.devices[0].block_size, 4096);
        assert_eq!(c.volumes[0].chunk_kib, 64);
        assert_eq!(c.exports[0].num_queues, 1);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.toml");
        c.save(&p).unwrap();
        assert_eq!(Config::load(&p).unwrap(), c);
    }

    #[test]
    fn errors_name_the_line() {
        let text = "[[device]]\nname = \"d0\"\nspec = \"ram:1M\"\nblok_size = 512\n";
        match Config::parse(Path::new("c.toml"), text) {
            Err(ConfigError::Parse { line, message, .. }) => {
                assert_eq!(line, 4, "{message}");
                assert!(message.contains("blok_size"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let text = "[[device]]\nname = \"d0\"\nspec = ram:1M\n";
        match Config::parse(Path::new("c.toml"), text) {
            Err(ConfigError::Parse { line, .. }) => assert_eq!(line, 3),
            other => panic!("{other:?}"),
        }
        let text = "[[volume]]\nname = \"v\"\nlevel = \"raid5\"\n";
        match Config::parse(Path::new("c.toml"), text) {
            Err(ConfigError::Parse { message, .. }) => assert!(message.contains("members")),
            other => panic!("{other:?}"),
        }
    }
}
