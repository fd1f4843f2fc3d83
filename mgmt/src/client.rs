//! Connecting to the daemon's API socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::pb::appliance_client::ApplianceClient;

/// Where the daemon listens by default.
pub const DEFAULT_SOCKET: &str = "/run/appliance/api.sock";

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
#[error("connecting to {path}: {source}")]
pub struct ConnectError {
    path: String,
    #[source]
    source: tonic::transport::Error,
}

/// A client of the daemon listening on the unix socket `path`.
pub async fn connect(path: &Path) -> Result<ApplianceClient<Channel>, ConnectError> {
    let p: PathBuf = path.to_path_buf();
    // The URI is required by the API but unused: every connection goes to
    // the socket.
    let channel = Endpoint::from_static("http://appliance.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .map_err(|source| ConnectError {
            path: path.display().to_string(),
            source,
        })?;
    Ok(ApplianceClient::new(channel))
}
