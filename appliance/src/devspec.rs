//! Device specifications on the command line: `ram:256M`, `null:1G`,
//! `file:/path` (an existing file or block device) or
//! `file:/path:64M` (created with that size), `nvme:0000:01:00.0` (namespace
//! 1 of a controller bound to vfio-pci) or `nvme:0000:01:00.0/2`
//! (namespace 2). Namespaces of one controller share one driver instance.
//! `nvmf-tcp://HOST:PORT/NQN[/NSID][?loss-timeout=SECS]` is a namespace of
//! another appliance (or any NVMe/TCP target).

use std::path::Path;
use std::sync::Arc;

use bdev::{BlockDevice, FileDevice, NullDevice, RamDevice};

mod bringup;

/// Why a specification names no device.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// It is malformed or out of range (size, kind, address, namespace).
    #[error("{0}")]
    Invalid(String),
    /// Something else holds it (mounted, md/dm, another exclusive open).
    #[error("device {spec:?}: {reason}")]
    Busy {
        /// The specification.
        spec: String,
        /// What the driver said.
        reason: String,
    },
    /// What it names could not be opened or created.
    #[error("device {spec:?}: {source}")]
    Open {
        /// The specification.
        spec: String,
        /// What the driver said.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Whether `e` says a remote target could not be reached (nothing
/// listens, no route, timed out, connection reset): not the
/// specification's fault, and worth another try. A target that answers
/// and refuses (wrong NQN, host not allowed, no such namespace) is not.
pub fn unreachable(e: &SpecError) -> bool {
    use std::io::ErrorKind as K;
    match e {
        SpecError::Open { spec, source } if spec.starts_with("nvmf-tcp:") => {
            match source.downcast_ref::<bdev::BdevError>() {
                Some(bdev::BdevError::Os { source, .. }) => matches!(
                    source.kind(),
                    K::ConnectionRefused
                        | K::ConnectionReset
                        | K::ConnectionAborted
                        | K::TimedOut
                        | K::HostUnreachable
                        | K::NetworkUnreachable
                        | K::NotConnected
                ),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Whether `e` says the machine has no room for the device now (a RAM
/// device larger than the memory available).
pub fn no_room(e: &SpecError) -> bool {
    matches!(e, SpecError::Open { source, .. }
        if matches!(source.downcast_ref::<bdev::BdevError>(), Some(bdev::BdevError::Exhausted(_))))
}

fn opening(spec: &str) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> SpecError + '_ {
    move |source| SpecError::Open {
        spec: spec.to_string(),
        source,
    }
}

/// Controllers already brought up, by PCI address: a second namespace of
/// the same controller must not reset it under the first.
static CONTROLLERS: bringup::Shared<nvme::Controller> = bringup::Shared::new();

/// What a specification's storage is, for telling whether two name the
/// same one however they are spelled: a file by its device and inode (a
/// hard link, a bind mount or a `..` in the path is the same file), a
/// block device by its device number, a file not created yet by its
/// canonical directory and name, an NVMe namespace by PCI address and
/// namespace, a remote one by host, NQN and namespace (as written: no
/// name lookup). `None` for storage of its own (ram, null).
pub fn identity(spec: &str) -> Option<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let (kind, rest) = spec.split_once(':')?;
    match kind {
        "file" => {
            let path = Path::new(file_path(rest).0);
            match std::fs::metadata(path) {
                Ok(m) if m.file_type().is_block_device() => Some(format!("block:{}", m.rdev())),
                Ok(m) => Some(format!("inode:{}:{}", m.dev(), m.ino())),
                Err(_) => place(path),
            }
        }
        "nvme" => nvme_address(rest)
            .ok()
            .map(|(bdf, ns)| format!("nvme:{bdf}/{ns}")),
        "nvmf-tcp" => {
            let (host, nqn, nsid) = nvmf::device::Remote::split(remote_target(rest)).ok()?;
            Some(format!("nvmf:{}/{nqn}/{nsid}", host.to_ascii_lowercase()))
        }
        _ => None,
    }
}

/// What a device specification is compared by: its [`identity`] and, for
/// a file, the place it names too (an attached file unlinked or renamed
/// since and made again there is another inode, but the state file would
/// name that place twice).
pub fn storage_keys(spec: &str) -> Vec<String> {
    let mut keys: Vec<String> = identity(spec).into_iter().collect();
    if let Some(key) = spec
        .strip_prefix("file:")
        .and_then(|rest| place(Path::new(file_path(rest).0)))
    {
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

/// A file's place: its canonical directory and its name.
fn place(path: &Path) -> Option<String> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = std::fs::canonicalize(dir.unwrap_or(Path::new(".")))
        .unwrap_or_else(|_| dir.unwrap_or(Path::new(".")).to_path_buf());
    Some(format!("path:{}", dir.join(path.file_name()?).display()))
}

/// [`identity`], with a remote namespace's host looked up: one target
/// named two ways (by name and by address, two names) is one. A name
/// lookup may take a while: never under a lock.
pub fn resolved_identity(spec: &str) -> Option<String> {
    if let Some(rest) = spec.strip_prefix("nvmf-tcp:") {
        if let Ok(r) = nvmf::device::Remote::parse(remote_target(rest)) {
            return Some(format!("nvmf:{}/{}/{}", r.addr, r.nqn, r.nsid));
        }
    }
    identity(spec)
}

/// The `HOST:PORT` and subsystem an `nvmf-tcp:` specification names, as
/// written (nothing looked up).
pub fn remote_subsystem(spec: &str) -> Option<(&str, &str)> {
    let rest = spec.strip_prefix("nvmf-tcp:")?;
    let (host, nqn, _) = nvmf::device::Remote::split(remote_target(rest)).ok()?;
    Some((host, nqn))
}

/// An nvmf-tcp specification's target, without its `?options`.
fn remote_target(rest: &str) -> &str {
    rest.split_once('?').map_or(rest, |(t, _)| t)
}

/// The PCI address and namespace `BDF[/NSID]` names.
fn nvme_address(rest: &str) -> Result<(String, u32), SpecError> {
    let (bdf, nsid) = match rest.split_once('/') {
        Some((bdf, ns)) => (
            bdf,
            ns.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| {
                SpecError::Invalid(format!(
                    "device nvme:{rest}: namespace {ns:?} is not a number >= 1"
                ))
            })?,
        ),
        None => (rest, 1),
    };
    let bdf = nvme::vfio::parse_bdf(bdf)
        .map_err(|e| SpecError::Invalid(format!("device nvme:{rest}: {e}")))?;
    Ok((bdf, nsid))
}

fn nvme_namespace(
    name: &str,
    rest: &str,
    block_size: u32,
) -> Result<Arc<dyn BlockDevice>, SpecError> {
    let spec = format!("nvme:{rest}");
    let (bdf, nsid) = nvme_address(rest)?;
    let ctrl = CONTROLLERS.get_or_bring_up(&bdf, || {
        let transport =
            nvme::vfio::VfioTransport::open(&bdf).map_err(|e| opening(&spec)(e.into()))?;
        nvme::Controller::new(transport, nvme::Options::default())
            .map_err(|e| opening(&spec)(e.into()))
    })?;
    let ns = nvme::Namespace::new(&ctrl, nsid, name).map_err(|e| opening(&spec)(e.into()))?;
    if ns.info().block_size != block_size {
        return Err(SpecError::Invalid(format!(
            "device nvme:{rest}: namespace {nsid} has {}-byte blocks, not {block_size} (set block_size to match)",
            ns.info().block_size
        )));
    }
    Ok(Arc::new(ns))
}

/// The path and the size (if one is given) of a `file:PATH[:SIZE]`
/// specification, `rest` being what follows `file:`.
pub fn file_path(rest: &str) -> (&str, Option<u64>) {
    match rest.rsplit_once(':') {
        Some((path, size)) => match parse_size(size) {
            Ok(n) => (path, Some(n)),
            Err(_) => (rest, None),
        },
        None => (rest, None),
    }
}

/// This machine's ID (/etc/machine-id, 32 hex digits), if it has one.
pub fn machine_id() -> Option<String> {
    let id = std::fs::read_to_string("/etc/machine-id").ok()?;
    let id: String = id
        .trim()
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect();
    (id.len() == 32).then_some(id)
}

/// This host's NQN: the one Linux's NVMe tools use (/etc/nvme/hostnqn), or
/// one made from the machine ID, so a target's allowed-hosts list can name
/// the appliance.
pub fn host_nqn() -> String {
    if let Ok(s) = std::fs::read_to_string("/etc/nvme/hostnqn") {
        let s = s.trim();
        if nvmf::capsule::valid_nqn(s) {
            return s.to_string();
        }
    }
    if let Some(id) = machine_id() {
        format!(
            "nqn.2014-08.org.nvmexpress:uuid:{}-{}-{}-{}-{}",
            &id[..8],
            &id[8..12],
            &id[12..16],
            &id[16..20],
            &id[20..]
        )
    } else {
        "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000000".into()
    }
}

/// `//HOST:PORT/NQN[/NSID][?loss-timeout=SECS]`: connected now (an
/// unreachable target is an error at once), kept connected afterwards.
fn remote_namespace(
    name: &str,
    spec: &str,
    rest: &str,
    block_size: u32,
) -> Result<Arc<dyn BlockDevice>, SpecError> {
    let invalid = |why: String| SpecError::Invalid(format!("device {spec:?}: {why}"));
    let target = remote_target(rest);
    let query = rest.split_once('?').map_or("", |(_, q)| q);
    let remote = nvmf::device::Remote::parse(target).map_err(invalid)?;
    let mut opts = nvmf::device::DeviceOptions::default();
    opts.host.hostnqn = host_nqn();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some(("loss-timeout", v)) => {
                let secs: u64 = v.parse().ok().filter(|&s| s > 0).ok_or_else(|| {
                    invalid(format!("loss-timeout {v:?} is not a number of seconds"))
                })?;
                opts.loss_timeout = std::time::Duration::from_secs(secs);
            }
            _ => {
                return Err(invalid(format!(
                    "unknown option {kv:?} (loss-timeout=SECS)"
                )))
            }
        }
    }
    let dev = nvmf::device::NvmfDevice::connect(name, remote, opts)
        .map_err(|e| opening(spec)(e.into()))?;
    if dev.info().block_size != block_size {
        return Err(invalid(format!(
            "the namespace has {}-byte blocks, not {block_size} (set block_size to match)",
            dev.info().block_size
        )));
    }
    Ok(Arc::new(dev))
}

/// The file `spec` would make (`file:PATH:SIZE` whose PATH is not there).
pub fn file_to_make(spec: &str) -> Option<&Path> {
    let (path, size) = file_path(spec.strip_prefix("file:")?);
    let path = Path::new(path);
    (size.is_some() && !path.as_os_str().is_empty() && path.symlink_metadata().is_err())
        .then_some(path)
}

/// Whether `spec` names something that is not there (a file or its
/// directory, a PCI device): the manager answers NotFound for those rather
/// than InvalidArgument.
pub fn names_missing(spec: &str) -> bool {
    match spec.split_once(':') {
        Some(("file", rest)) => {
            let (path, size) = file_path(rest);
            let sized = size.is_some();
            let path = Path::new(path);
            !path.as_os_str().is_empty()
                && if sized {
                    path.parent()
                        .is_some_and(|d| !d.as_os_str().is_empty() && !d.exists())
                } else {
                    !path.exists()
                }
        }
        Some(("nvme", rest)) => nvme_address(rest)
            .is_ok_and(|(bdf, _)| !Path::new("/sys/bus/pci/devices").join(bdf).exists()),
        _ => false,
    }
}

/// Parse a size such as `4096`, `64K`, `256M`, `2G`.
pub fn parse_size(s: &str) -> Result<u64, SpecError> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| {
        SpecError::Invalid(format!(
            "{s:?} is not a size (examples: 4096, 64K, 256M, 2G)"
        ))
    })?;
    n.checked_mul(mult)
        .ok_or_else(|| SpecError::Invalid(format!("{s:?} is too large")))
}

/// Build the device a specification names; it is called by the
/// specification.
pub fn open(spec: &str, block_size: u32) -> Result<Arc<dyn BlockDevice>, SpecError> {
    open_named(spec, spec, block_size)
}

/// Build the device `spec` names and call it `name`. `file:PATH:SIZE`
/// creates the file when it does not exist; an existing file is opened as it
/// is (never truncated: it may hold a volume), and must have that size.
pub fn open_named(
    name: &str,
    spec: &str,
    block_size: u32,
) -> Result<Arc<dyn BlockDevice>, SpecError> {
    open_zeroed(name, spec, block_size).map(|(dev, _)| dev)
}

/// [`open_named`], and whether the device is known to hold only zeros: a
/// RAM or null device, or a file this open created (a new volume on such
/// members needs no initial resync; on any other, old data makes parity
/// and mirrors disagree).
pub fn open_zeroed(
    name: &str,
    spec: &str,
    block_size: u32,
) -> Result<(Arc<dyn BlockDevice>, bool), SpecError> {
    let mut zeroed = false;
    let (kind, rest) = spec.split_once(':').ok_or_else(|| {
        SpecError::Invalid(format!("device {spec:?}: expected ram:SIZE, null:SIZE, file:PATH[:SIZE], nvme:PCI-ADDRESS[/NSID] or nvmf-tcp://HOST:PORT/NQN[/NSID]"))
    })?;
    let blocks = |size: u64| -> Result<u64, SpecError> {
        if size == 0 || !size.is_multiple_of(block_size as u64) {
            return Err(SpecError::Invalid(format!(
                "device {spec:?}: size must be a positive multiple of {block_size}"
            )));
        }
        Ok(size / block_size as u64)
    };
    let dev: Arc<dyn BlockDevice> = match kind {
        "ram" => {
            zeroed = true;
            Arc::new(
                RamDevice::new(name, block_size, blocks(parse_size(rest)?)?)
                    .map_err(|e| opening(spec)(e.into()))?,
            )
        }
        "null" => {
            zeroed = true;
            Arc::new(
                NullDevice::new(name, block_size, blocks(parse_size(rest)?)?)
                    .map_err(|e| opening(spec)(e.into()))?,
            )
        }
        "file" => {
            let (path, size) = file_path(rest);
            if path.is_empty() {
                return Err(SpecError::Invalid(format!("device {spec:?}: empty path")));
            }
            let path = Path::new(path);
            let dev = match size {
                Some(size) if !path.exists() => {
                    blocks(size)?;
                    // Made here (O_EXCL), sparse: it reads as zeros.
                    zeroed = true;
                    FileDevice::create(path, block_size, size)
                }
                _ => FileDevice::open(path, block_size),
            }
            .map_err(|e| match e {
                bdev::BdevError::Busy(reason) => SpecError::Busy {
                    spec: spec.to_string(),
                    reason,
                },
                e => opening(spec)(e.into()),
            })?;
            let have = dev.info().size_bytes();
            if let Some(size) = size.filter(|&s| s > have) {
                return Err(SpecError::Invalid(format!(
                    "device {spec:?}: {} exists with {have} bytes, not {size}; refusing to resize it",
                    path.display()
                )));
            }
            if size.is_some_and(|s| s < have) {
                // Grown by a resize whose new size did not reach the state
                // file (a crash in between): its data is all there.
                tracing::warn!(
                    spec,
                    bytes = have,
                    "the file is larger than its specification says; using all of it"
                );
            }
            Arc::new(dev.named(name))
        }
        "nvme" => nvme_namespace(name, rest, block_size)?,
        "nvmf-tcp" => remote_namespace(name, spec, rest, block_size)?,
        other => {
            return Err(SpecError::Invalid(format!(
                "device {spec:?}: unknown kind {other:?} (ram, null, file, nvme or nvmf-tcp)"
            )))
        }
    };
    Ok((dev, zeroed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From review: a hard link, a `..` in the path, or the same remote
    /// namespace spelled twice attached one storage as two devices (two
    /// halves of a mirror on one file).
    #[test]
    fn one_storage_has_one_identity_however_it_is_spelled() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        std::fs::hard_link(dir.path().join("f"), dir.path().join("g")).unwrap();
        let id = |s: String| identity(&s);
        assert_eq!(id(format!("file:{d}/f")), id(format!("file:{d}/g:1M")));
        assert_eq!(id(format!("file:{d}/f")), id(format!("file:{d}/sub/../f")));
        // Not created yet: the same directory and name.
        assert_eq!(
            id(format!("file:{d}/new:1M")),
            id(format!("file:{d}/sub/../new:2M"))
        );
        assert_ne!(id(format!("file:{d}/new:1M")), id(format!("file:{d}/f")));
        assert_eq!(
            identity("nvmf-tcp://Host:4420/nqn.2026-12.io.x:v/1"),
            identity("nvmf-tcp://host:4420/nqn.2026-12.io.x:v?loss-timeout=5")
        );
        assert_ne!(
            identity("nvmf-tcp://host:4420/nqn.2026-12.io.x:v/2"),
            identity("nvmf-tcp://host:4420/nqn.2026-12.io.x:v")
        );
        assert_eq!(identity("nvme:00:04.0"), identity("nvme:0000:00:04.0/1"));
        assert_eq!(identity("ram:1M"), None);
    }

    #[test]
    fn sizes_and_specs() {
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("64K").ok(), Some(65536));
        assert_eq!(parse_size("2G").ok(), Some(2 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(open("ram:1M", 4096).unwrap().info().num_blocks, 256);
        assert_eq!(open("null:1G", 512).unwrap().info().num_blocks, 2 << 20);
        assert!(open("ram:1000", 4096)
            .err()
            .unwrap()
            .to_string()
            .contains("multiple"));
        assert!(open("disk:1M", 4096)
            .err()
            .unwrap()
            .to_string()
            .contains("unknown kind"));
        assert!(open("ram", 4096).is_err());
        // NVMe: the PCI address and namespace are checked before anything
        // is opened; a device that is not there is a clear error.
        assert!(open("nvme:00:04", 4096)
            .err()
            .unwrap()
            .to_string()
            .contains("not a PCI address"));
        assert!(open("nvme:0000:00:04.0/0", 4096)
            .err()
            .unwrap()
            .to_string()
            .contains("namespace"));
        assert!(open("nvme:0000:ff:1f.7", 4096)
            .err()
            .unwrap()
            .to_string()
            .contains("no PCI device"));
        assert!(names_missing("file:/nonexistent/x"));
        assert!(names_missing("file:/nonexistent/x:1M"));
        assert!(!names_missing("file:/tmp/new-file:1M"));
        assert!(names_missing("nvme:0000:ff:1f.7"));
        assert!(!names_missing("nvme:bad"));
        assert!(!names_missing("ram:1M"));
        assert_eq!(identity("nvme:00:04.0"), identity("nvme:0000:00:04.0/1"));
        assert_ne!(
            identity("nvme:0000:00:04.0/2"),
            identity("nvme:0000:00:04.0")
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let spec = format!("file:{}:1M", p.display());
        assert_eq!(open(&spec, 4096).unwrap().info().num_blocks, 256);
        let spec = format!("file:{}", p.display());
        assert_eq!(open(&spec, 4096).unwrap().info().num_blocks, 256);
        // An existing file is never truncated nor resized.
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        let spec = format!("file:{}:8K", p.display());
        let d = open_named("d0", &spec, 4096).unwrap();
        assert_eq!((d.info().name.as_str(), d.info().num_blocks), ("d0", 2));
        assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 8192]);
        let spec = format!("file:{}:1M", p.display());
        assert!(open(&spec, 4096)
            .err()
            .unwrap()
            .to_string()
            .contains("refusing to resize"));
        // Larger than it says (a resize that did not reach the state file
        // before a crash): opened whole, never truncated.
        let spec = format!("file:{}:4K", p.display());
        assert_eq!(open(&spec, 4096).unwrap().info().num_blocks, 2);
        assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 8192]);
    }
}
