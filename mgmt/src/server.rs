//! Serving an implementation of the API: on a unix socket that only its
//! owner can use, and optionally on TCP with TLS and a bearer token.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Identity, ServerTlsConfig};

use crate::pb::appliance_server::{Appliance, ApplianceServer};

mod tcp;
pub use tcp::{AUTH_DEADLINE, MAX_CONNECTIONS, PER_PEER};

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
    // Bind under a umask that leaves no window with a wider mode, and
    // under a temporary name: bind() creates the file before listen(), so
    // a client that waits for the path could otherwise connect in between
    // and be refused. The rename shows the path only once it listens.
    let mut tmp = path.with_file_name(format!(".{}-api.sock", std::process::id()));
    if tmp.as_os_str().len() > 107 {
        // Too long for a socket name: no temporary name then.
        tmp = path.to_path_buf();
    }
    let _ = std::fs::remove_file(&tmp);
    // SAFETY: umask is process-wide but has no memory-safety preconditions.
    let old = unsafe { libc::umask(0o177) };
    let res = std::os::unix::net::UnixListener::bind(&tmp);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = res?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    if tmp != path {
        std::fs::rename(&tmp, path)?;
    }
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

/// Largest request a call may send: the largest real one (an NVMe/TCP
/// export naming 256 hosts) is under 64 KiB. tonic's default, 4 MiB, let
/// each of a connection's calls at once hold that much of the daemon's
/// memory while it decoded (audit).
pub const MAX_REQUEST: usize = 64 << 10;

/// How long calls in progress may finish after shutdown is asked for.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Run `server` (which stops accepting when its own shutdown future, fed
/// by `stopping`, resolves) until `shutdown`; then give calls in progress
/// [`GRACE`]. Idle client connections do not hold the daemon up (a
/// graceful shutdown alone would wait for them forever).
async fn with_grace(
    server: impl std::future::Future<Output = Result<(), tonic::transport::Error>>,
    stopping: std::sync::Arc<tokio::sync::Notify>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
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

pub use tonic_health::server::HealthReporter;
pub use tonic_health::ServingStatus;

/// The standard gRPC health service (grpc.health.v1), its statuses kept
/// by `health`.
fn health_service(
    health: &HealthReporter,
) -> tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService> {
    tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health.clone()),
    )
    .max_decoding_message_size(MAX_REQUEST)
}

/// Server reflection (v1) for the appliance's API and the health service,
/// which grpcurl and other generic clients use. The descriptors are
/// compiled in; if they did not load, the API is served without it.
fn reflection_service() -> Option<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| eprintln!("appliance API: no server reflection: {e}"))
        .ok()
        .map(|r| r.max_decoding_message_size(MAX_REQUEST))
}

/// Serve `svc` on `listener` until `shutdown` resolves, with the health
/// service (statuses kept by `health`) and reflection beside it.
pub async fn serve<S: Appliance>(
    svc: S,
    listener: tokio::net::UnixListener,
    health: &HealthReporter,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
    let notified = stopping.clone();
    let server = tonic::transport::Server::builder()
        // As many calls at once as on TCP, a connection's (the socket is
        // the daemon's user's only, but a stuck client of its own held
        // the daemon's memory too).
        .max_concurrent_streams(Some(32))
        .add_service(ApplianceServer::new(svc).max_decoding_message_size(MAX_REQUEST))
        .add_service(health_service(health))
        .add_optional_service(reflection_service())
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            notified.notified().await
        });
    with_grace(server, stopping, shutdown).await
}

/// What a TCP listener needs: TLS and a bearer token are not optional.
pub struct TcpAccess {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Server certificate chain (PEM).
    pub cert_pem: Vec<u8>,
    /// Its private key (PEM).
    pub key_pem: Vec<u8>,
    /// The token clients must send as `authorization: Bearer TOKEN`.
    pub token: String,
}

/// Compare without an early exit, so the time taken does not tell how
/// much of a guessed token was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A TCP listener bound, with its TLS identity checked: made before the
/// daemon says it is ready, so that an address in use or a certificate
/// or key that cannot be used fails the start (the listener was bound
/// when the server first ran, after READY, and its error came at the stop).
pub struct TcpListening {
    listener: tokio::net::TcpListener,
    tls: ServerTlsConfig,
    token: String,
}

impl TcpListening {
    /// Bind `access.addr` and check its TLS identity (inside a runtime).
    pub fn bind(access: TcpAccess) -> Result<TcpListening, String> {
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(access.cert_pem, access.key_pem))
            // A peer that opens a connection and never finishes the TLS
            // handshake lets its place go after this.
            .timeout(std::time::Duration::from_secs(10));
        tonic::transport::Server::builder()
            .tls_config(tls.clone())
            .map_err(|e| format!("the TLS certificate or key: {e}"))?;
        let listener = std::net::TcpListener::bind(access.addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|e| format!("binding {}: {e}", access.addr))?;
        Ok(TcpListening {
            listener,
            tls,
            token: access.token,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }
}

/// Serve `svc` over TLS on TCP until `shutdown`; calls without the token
/// get UNAUTHENTICATED. At most [`MAX_CONNECTIONS`] connections, one
/// peer's at most [`PER_PEER`]; each at most 32 calls at once.
pub async fn serve_tcp<S: Appliance>(
    svc: S,
    listening: TcpListening,
    health: &HealthReporter,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let want = format!("Bearer {}", listening.token).into_bytes();
    let check = move |req: tonic::Request<()>| match req.metadata().get("authorization") {
        Some(v) if same(v.as_bytes(), &want) => {
            // The connection may stay past its first-call deadline.
            if let Some(info) = req
                .extensions()
                .get::<tonic::transport::server::TlsConnectInfo<tcp::LimitedInfo>>()
            {
                info.get_ref().authenticated();
            }
            Ok(req)
        }
        _ => Err(tonic::Status::unauthenticated(
            "a bearer token is required on TCP",
        )),
    };
    let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
    let notified = stopping.clone();
    // Health and reflection need the token too: on TCP nothing answers
    // without it.
    use tonic::service::interceptor::InterceptedService;
    let server = tonic::transport::Server::builder()
        .tls_config(listening.tls)?
        .max_concurrent_streams(Some(32))
        // A peer gone without a word is found out.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(InterceptedService::new(
            ApplianceServer::new(svc).max_decoding_message_size(MAX_REQUEST),
            check.clone(),
        ))
        .add_service(InterceptedService::new(
            health_service(health),
            check.clone(),
        ))
        .add_optional_service(reflection_service().map(|r| InterceptedService::new(r, check)))
        .serve_with_incoming_shutdown(tcp::Incoming::new(listening.listener), async move {
            notified.notified().await
        });
    with_grace(server, stopping, shutdown).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_comparison() {
        assert!(super::same(b"Bearer abc", b"Bearer abc"));
        assert!(!super::same(b"Bearer abd", b"Bearer abc"));
        assert!(!super::same(b"Bearer ab", b"Bearer abc"));
    }
}
