//! The export's listening socket: where it may be created, and with which
//! owner, group and mode, so that a QEMU that does not run as root can be
//! given access to it and nobody else.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::ExportError;

/// Who may connect to an export's socket. Unset fields keep what bind()
/// gives: the daemon's user and group, and the mode its umask leaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits (e.g. 0o660).
    pub mode: Option<u32>,
    /// Owner uid.
    pub uid: Option<u32>,
    /// Group gid.
    pub gid: Option<u32>,
}

impl SocketAccess {
    /// From the declaration's strings: an octal mode ("0660"), and a user
    /// and group each by name or number.
    pub fn parse(
        mode: Option<&str>,
        owner: Option<&str>,
        group: Option<&str>,
    ) -> Result<SocketAccess, ExportError> {
        let invalid =
            |field: &'static str, reason: String| ExportError::InvalidArgument { field, reason };
        let mode = mode
            .map(|m| {
                u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| {
                        invalid(
                            "socket_mode",
                            format!("{m:?} is not an octal mode such as 0660"),
                        )
                    })
            })
            .transpose()?;
        let uid = owner
            .map(|o| user_id(o).ok_or_else(|| invalid("socket_owner", format!("no user {o:?}"))))
            .transpose()?;
        let gid = group
            .map(|g| group_id(g).ok_or_else(|| invalid("socket_group", format!("no group {g:?}"))))
            .transpose()?;
        Ok(SocketAccess { mode, uid, gid })
    }

    fn apply(&self, path: &Path) -> std::io::Result<()> {
        if self.uid.is_some() || self.gid.is_some() {
            std::os::unix::fs::lchown(path, self.uid, self.gid)?;
        }
        if let Some(mode) = self.mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
}

fn user_id(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    let c = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: zeroed passwd is valid; getpwnam_r fills it from `buf`.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc =
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    (rc == 0 && !out.is_null()).then_some(pw.pw_uid)
}

fn group_id(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    let c = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: zeroed group is valid; getgrnam_r fills it from `buf`.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut out = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
    (rc == 0 && !out.is_null()).then_some(gr.gr_gid)
}

pub fn check_socket_path(path: &Path) -> Result<(), ExportError> {
    let invalid = |reason: String| ExportError::InvalidArgument {
        field: "socket",
        reason,
    };
    if path.as_os_str().is_empty() || path.as_os_str().len() > 107 {
        return Err(invalid("must be 1..=107 bytes long".into()));
    }
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(invalid("may not hold a NUL byte".into()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if someone_listens(path) {
                return Err(ExportError::AlreadyExists(path.to_path_buf()));
            }
            // A stale socket from a previous run.
            std::fs::remove_file(path).map_err(|source| ExportError::Os {
                what: format!("removing the stale socket {}", path.display()),
                source,
            })
        }
        Ok(_) => Err(invalid(format!(
            "{} exists and is not a socket",
            path.display()
        ))),
        Err(_) => Ok(()),
    }
}

/// Whether a process listens on the unix socket at `path`. Asked without
/// blocking: a connect(2) to a listener whose backlog is full waits until
/// it accepts, for good if it never does, and this runs for an API call.
fn someone_listens(path: &Path) -> bool {
    let Some(addr) = sockaddr(path) else {
        return false;
    };
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        // Cannot tell: say yes, so nothing is removed.
        return true;
    }
    // SAFETY: `fd` is ours and closed when this drops.
    let _owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un of the given length.
    let r = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), ADDR_LEN) };
    if r == 0 {
        return true;
    }
    // A full backlog (EAGAIN) is a listener too; refused or gone is not.
    !matches!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ECONNREFUSED | libc::ENOENT)
    )
}

/// The unix socket address of `path`, if it fits (with its NUL).
fn sockaddr(path: &Path) -> Option<libc::sockaddr_un> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return None;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Some(addr)
}

/// The length connect(2) and bind(2) are given for a [`sockaddr`].
const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;

/// Bind `path` so that it appears only once it accepts connections:
/// bind() creates the file before listen(), and a frontend that waits for
/// the path (QEMU without reconnect, a script) would be refused in
/// between. So the socket is bound under a temporary name next to it and
/// renamed; a path too long for that is bound directly.
pub fn bind_listening(path: &Path, access: &SocketAccess) -> std::io::Result<UnixListener> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_file_name(format!(
        ".{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    if tmp.as_os_str().len() > 107 {
        let l = UnixListener::bind(path)?;
        if let Err(e) = access.apply(path) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        return Ok(l);
    }
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    // Owner, group and mode are right before the socket appears. Linked,
    // not renamed: a rename replaces a socket someone else bound at
    // `path` since it was checked (another export, its path spelled
    // another way), and that one's VM would reach this volume.
    let linked = access
        .apply(&tmp)
        .and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    linked?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// From review: the socket was renamed into place, which replaced a
    /// socket another export had bound there since the path was checked.
    #[test]
    fn binding_never_replaces_a_socket_bound_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let first = bind_listening(&path, &SocketAccess::default()).unwrap();
        let second = bind_listening(&path, &SocketAccess::default());
        assert_eq!(
            second.err().map(|e| e.kind()),
            Some(std::io::ErrorKind::AlreadyExists)
        );
        first.set_nonblocking(true).unwrap();
        let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(
            first.accept().is_ok(),
            "the first listener still has the path"
        );
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary socket left behind");
    }

    /// A unix socket listening on `path` with a backlog of 0 (the kernel
    /// queues one connection), which never accepts.
    fn listener_never_accepting(path: &Path) -> OwnedFd {
        let addr = sockaddr(path).expect("a short path");
        // SAFETY: plain socket(2), bind(2), listen(2) on a descriptor
        // owned at once.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            assert!(fd >= 0);
            let owned = OwnedFd::from_raw_fd(fd);
            assert_eq!(
                libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), ADDR_LEN),
                0
            );
            assert_eq!(libc::listen(fd, 0), 0);
            owned
        }
    }

    /// A non-blocking unix stream socket, connected (or pending) to `path`,
    /// or `None` once the listener's backlog is full.
    fn pending_connection(path: &Path) -> Option<OwnedFd> {
        let addr = sockaddr(path).expect("a short path");
        // SAFETY: plain socket(2) and connect(2); the descriptor is owned
        // at once.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
            assert!(fd >= 0);
            let owned = OwnedFd::from_raw_fd(fd);
            let r = libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), ADDR_LEN);
            (r == 0).then_some(owned)
        }
    }

    /// From review: the check connected to an existing socket with a
    /// blocking connect(2), which waits for good on a listener whose
    /// backlog is full (one that never accepts): the API call creating
    /// the export hung, holding its volume. A listener is found without
    /// waiting; a stale socket is still cleared.
    #[test]
    fn a_listener_with_a_full_backlog_is_found_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sock");
        let listener = listener_never_accepting(&path);
        let mut held = Vec::new();
        while let Some(c) = pending_connection(&path) {
            held.push(c);
            assert!(held.len() < 64, "the backlog never filled");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(check_socket_path(&p));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the check blocked on the full listener");
        assert!(matches!(r, Err(ExportError::AlreadyExists(_))), "{r:?}");
        drop(held);
        drop(listener);
        // Nobody listens now: the stale file is removed.
        check_socket_path(&path).unwrap();
        assert!(!path.exists());
    }
}
