//! Connecting to the daemon's API: its unix socket (the default), or a TCP
//! address with TLS and a bearer token.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::pb::appliance_client::ApplianceClient;

/// Where the daemon listens by default.
pub const DEFAULT_SOCKET: &str = "/run/appliance/api.sock";

/// A client of the API.
pub type Client = ApplianceClient<InterceptedService<Channel, Token>>;

/// Adds `authorization: Bearer TOKEN` to every call, if there is a token.
#[derive(Clone, Default)]
pub struct Token(Option<AsciiMetadataValue>);

impl Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The transport failed (said with every cause under it: tonic's own
    /// text is only "transport error", whatever the socket said).
    #[error("connecting to {target}: {}", causes(source))]
    Transport {
        /// Socket path or URL.
        target: String,
        /// What failed.
        #[source]
        source: tonic::transport::Error,
    },
    /// The token cannot be sent as a header.
    #[error("the token must be printable ASCII")]
    BadToken,
}

/// `e` and the errors under it, joined.
fn causes(e: &tonic::transport::Error) -> String {
    let mut text = e.to_string();
    let mut last = text.clone();
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        // (tonic's connection error shows its cause and names it too.)
        let said = cause.to_string();
        if !last.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        last = said;
        next = cause.source();
    }
    text
}

impl ConnectError {
    /// What the socket said, if it was the operating system's error (not
    /// allowed, not there, nobody listening).
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        let ConnectError::Transport { source, .. } = self else {
            return None;
        };
        let mut next = std::error::Error::source(source);
        while let Some(cause) = next {
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                return Some(io.kind());
            }
            next = cause.source();
        }
        None
    }
}

/// A client of the daemon listening on the unix socket `path`.
pub async fn connect(path: &Path) -> Result<Client, ConnectError> {
    connect_within(path, None).await
}

/// [`connect`], each call (and the connection) given up after `deadline`
/// without an answer (the call fails with `Cancelled`). A stream's answer
/// is its first message: what follows may take as long as it takes.
pub async fn connect_within(
    path: &Path,
    deadline: Option<std::time::Duration>,
) -> Result<Client, ConnectError> {
    let channel = channel_within(path, deadline).await?;
    Ok(ApplianceClient::with_interceptor(channel, Token::default()))
}

/// A channel to the daemon's unix socket `path`, for the other services it
/// serves (grpc.health.v1, reflection).
pub async fn channel(path: &Path) -> Result<Channel, ConnectError> {
    channel_within(path, None).await
}

/// `endpoint` with `deadline` on its connection and on each call.
fn within(endpoint: Endpoint, deadline: Option<std::time::Duration>) -> Endpoint {
    match deadline {
        Some(d) => endpoint.timeout(d).connect_timeout(d),
        None => endpoint,
    }
}

async fn channel_within(
    path: &Path,
    deadline: Option<std::time::Duration>,
) -> Result<Channel, ConnectError> {
    let p: PathBuf = path.to_path_buf();
    // The URI is required by the API but unused: every connection goes to
    // the socket.
    let channel = within(Endpoint::from_static("http://appliance.local"), deadline)
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .map_err(|source| ConnectError::Transport {
            target: path.display().to_string(),
            source,
        })?;
    Ok(channel)
}

/// A client of the daemon at `url` (`https://HOST:PORT`), trusting the CA
/// certificate `ca_pem` (PEM), sending `token`; `domain` is the name the
/// server certificate must carry.
pub async fn connect_tls(
    url: &str,
    ca_pem: &[u8],
    domain: &str,
    token: Option<&str>,
) -> Result<Client, ConnectError> {
    connect_tls_within(url, ca_pem, domain, token, None).await
}

/// [`connect_tls`] with a deadline, as [`connect_within`].
pub async fn connect_tls_within(
    url: &str,
    ca_pem: &[u8],
    domain: &str,
    token: Option<&str>,
    deadline: Option<std::time::Duration>,
) -> Result<Client, ConnectError> {
    let transport = |source| ConnectError::Transport {
        target: url.to_string(),
        source,
    };
    let token = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<AsciiMetadataValue>()
                .map_err(|_| ConnectError::BadToken)?,
        ),
        None => None,
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(domain);
    // The handshake too (the connect time-out ends at TCP's).
    if let Some(d) = deadline {
        tls = tls.timeout(d);
    }
    let channel = within(
        Endpoint::from_shared(url.to_string()).map_err(transport)?,
        deadline,
    )
    .tls_config(tls)
    .map_err(transport)?
    .connect()
    .await
    .map_err(transport)?;
    Ok(ApplianceClient::with_interceptor(channel, Token(token)))
}
