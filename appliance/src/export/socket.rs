//! The export's listening socket: where it may be created, and with which
//! owner, group and mode, so that a QEMU that does not run as root can be
//! given access to it and nobody else.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
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
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
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
    // Owner, group and mode are right before the socket appears.
    if let Err(e) = access
        .apply(&tmp)
        .and_then(|()| std::fs::rename(&tmp, path))
    {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(l)
}
