//! The metrics HTTP listener: GET /metrics on a thread of its own, with
//! the limits that keep scrapers, which are outside the process, from
//! holding what the exports need.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;

use super::{registry, CONTENT_TYPE};
use crate::manager::Manager;

/// The metrics address, bound and not served yet: the daemon binds it
/// before its restore, so a port in use stops it before it touches a
/// device, and serves it once the restore is done.
pub struct Bound {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl Bound {
    /// Bind `addr`; port 0 takes a free one, which the log names (and
    /// `addr` returns), so that nothing has to guess a free port first.
    pub fn bind(addr: SocketAddr) -> Result<Bound, String> {
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
        tracing::info!(%addr, "metrics: listening");
        Ok(Bound { listener, addr })
    }

    /// The address bound (the port chosen, when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Serve GET /metrics on `bound` on a thread of its own; it stops when
/// `stop` is set.
pub fn start(
    bound: Bound,
    mgr: Arc<Manager>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    let listener = bound.listener;
    let registry = Arc::new(registry(mgr));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "metrics: no runtime; not serving");
                    return;
                }
            };
            rt.block_on(serve(listener, registry, stop));
        })
        .map_err(|e| format!("spawning the metrics listener: {e}"))
}

async fn serve(listener: std::net::TcpListener, registry: Arc<Registry>, stop: Arc<AtomicBool>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "metrics: listener not usable; not serving");
            return;
        }
    };
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (
                        axum::http::StatusCode::OK,
                        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                        body,
                    ),
                    Err(_) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(axum::http::header::CONTENT_TYPE, "text/plain")],
                        "encoding the metrics failed\n".to_string(),
                    ),
                }
            }
        }),
    );
    let stopped = async move {
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::pin!(stopped);
    // Scrapers are outside the process: each connection has a time to
    // send its request's headers and a lifetime, and there is a cap on
    // how many are open (the rest are closed at once), so idle or slow
    // ones can neither hold descriptors the exports need nor keep the
    // daemon's stop waiting.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // One peer holds at most three quarters of them: a scraper gone wild
    // (or a host that opens them all) leaves room for Prometheus.
    let peers: Arc<crate::peers::PeerCounts> = Arc::default();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = &mut stopped => break,
            accepted = listener.accept() => {
                let (sock, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors, say: not a busy loop.
                        tracing::warn!(error = %e, "metrics: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(share) = peers.take(peer.ip(), MAX_CONNECTIONS) else {
                    continue;
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                conns.spawn(async move {
                    let _slot = (slot, share);
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc);
                    let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
                });
            }
        }
        while conns.try_join_next().is_some() {}
    }
    // Scrapes under way may finish; the rest go with the runtime.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "metrics: a scrape was still open at the stop; dropped");
    }
}

/// Scrape connections open at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// How long a connection has to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection lives (Prometheus opens another).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// How long the stop waits for scrapes under way.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
