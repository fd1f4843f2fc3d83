//! Serving an implementation of the API on a unix socket that only its
//! owner can use.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio_stream::wrappers::UnixListenerStream;

use crate::pb::appliance_server::{Appliance, ApplianceServer};

/// Bind `path` (replacing a stale socket, creating its directory) with mode
/// 0600: the API changes storage, so only the daemon's user may call it.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // Bind under a umask that leaves no window with a wider mode.
    // SAFETY: umask is process-wide but has no memory-safety preconditions.
    let old = unsafe { libc::umask(0o177) };
    let res = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = res?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

/// How long calls in progress may finish after shutdown is asked for.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Serve `svc` on `listener` until `shutdown` resolves; calls in progress
/// then get [`GRACE`] to finish. Idle client connections do not hold the
/// daemon up (a graceful shutdown alone would wait for them forever).
pub async fn serve<S: Appliance>(
    svc: S,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
    let notified = stopping.clone();
    let server = tonic::transport::Server::builder()
        .add_service(ApplianceServer::new(svc))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            notified.notified().await
        });
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r,
        _ = shutdown => stopping.notify_one(),
    }
    match tokio::time::timeout(GRACE, server).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}
