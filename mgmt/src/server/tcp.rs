//! The TCP listener's connections: bound before the daemon says it is
//! ready, and held to a limit with a per-peer share.
//!
//! A peer that completes TLS and then sends nothing holds its connection:
//! h2 waits for the client's preface without a time limit, and the token
//! is only looked at per request. Without a limit, thousands of such
//! connections took every descriptor the daemon had (state saves, export
//! and NVMe/TCP reconnects failed), and an accept that failed for want of
//! descriptors was retried at once, spinning the API thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tonic::transport::server::Connected;

use crate::peers::{PeerCounts, PeerSlot};

/// Connections the TCP listener keeps open at most; one peer (an IPv4
/// address, or an IPv6 /64) holds three quarters of them at most
/// ([`crate::peers`]), so the others still get in.
pub const MAX_CONNECTIONS: usize = 64;
/// One peer's share of [`MAX_CONNECTIONS`].
pub const PER_PEER: usize = crate::peers::share(MAX_CONNECTIONS);
/// How long the listener waits after a failed accept (no descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a connection may take to make its first call with the token:
/// one that does not is closed (h2 waits for a client's preface without
/// a limit, and the token is only looked at per call, so 64 idle
/// connections without credentials held every place for good).
pub const AUTH_DEADLINE: Duration = Duration::from_secs(10);

/// A place taken in the listener's count (a permit, as the metrics
/// listener's) and its peer's share, given back when dropped.
struct Slot {
    _open: tokio::sync::OwnedSemaphorePermit,
    _peer: PeerSlot,
}

impl Slot {
    fn take(open: &Arc<Semaphore>, peers: &Arc<PeerCounts>, ip: std::net::IpAddr) -> Option<Slot> {
        let peer = peers.take(ip, MAX_CONNECTIONS)?;
        let open = open.clone().try_acquire_owned().ok()?;
        Some(Slot {
            _open: open,
            _peer: peer,
        })
    }
}

/// A connection holding its place, closed if it makes no call with the
/// token within [`AUTH_DEADLINE`].
pub struct Limited {
    stream: TcpStream,
    _slot: Slot,
    authenticated: Arc<AtomicBool>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

/// What a call learns of its connection: a way to say the connection
/// has made a call with the token.
#[derive(Clone)]
pub struct LimitedInfo {
    authenticated: Arc<AtomicBool>,
}

impl LimitedInfo {
    /// The connection made a call with the token: it stays open.
    pub fn authenticated(&self) {
        self.authenticated.store(true, Ordering::Relaxed);
    }
}

impl Connected for Limited {
    type ConnectInfo = LimitedInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        LimitedInfo {
            authenticated: self.authenticated.clone(),
        }
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // (The deadline's timer wakes a read that waits past it.)
        if !self.authenticated.load(Ordering::Relaxed) && self.deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no call with the token in time",
            )));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The accepted connections that fit the limits; the rest are closed as
/// they come.
pub struct Incoming {
    listener: TcpListener,
    open: Arc<Semaphore>,
    peers: Arc<PeerCounts>,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    auth_deadline: Duration,
}

impl Incoming {
    /// Accept on `listener` (bound already).
    pub fn new(listener: TcpListener) -> Incoming {
        Incoming {
            listener,
            open: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            peers: Arc::default(),
            backoff: None,
            auth_deadline: AUTH_DEADLINE,
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<Limited>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(b) = &mut self.backoff {
                if b.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.backoff = None;
            }
            match self.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    eprintln!("appliance API: accepting a TCP connection: {e}");
                    self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
                Poll::Ready(Ok((stream, peer))) => {
                    let Some(slot) = Slot::take(&self.open, &self.peers, peer.ip()) else {
                        drop(stream); // over the limit or this peer's share
                        continue;
                    };
                    if stream.set_nodelay(true).is_err() {
                        continue;
                    }
                    let deadline = Box::pin(tokio::time::sleep(self.auth_deadline));
                    return Poll::Ready(Some(Ok(Limited {
                        stream,
                        _slot: slot,
                        authenticated: Arc::default(),
                        deadline,
                    })));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    /// A connection that makes no call with the token is closed at the
    /// deadline; one that did stays.
    #[test]
    fn a_connection_without_a_call_with_the_token_is_closed() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let mut incoming = Incoming::new(l);
            incoming.auth_deadline = Duration::from_millis(200);
            let _silent = TcpStream::connect(addr).await.unwrap();
            let mut idle = incoming.next().await.unwrap().unwrap();
            let mut b = [0u8; 1];
            let e = idle.read(&mut b).await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
            let mut client = TcpStream::connect(addr).await.unwrap();
            let mut known = incoming.next().await.unwrap().unwrap();
            known.connect_info().authenticated();
            tokio::time::sleep(Duration::from_millis(300)).await;
            client.write_all(b"x").await.unwrap();
            assert_eq!(
                known.read(&mut b).await.unwrap(),
                1,
                "still open past the deadline"
            );
        });
    }

    #[test]
    fn one_peer_holds_its_share_and_others_still_get_in() {
        let (open, peers) = (Arc::new(Semaphore::new(MAX_CONNECTIONS)), Arc::default());
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<Slot> = (0..PER_PEER)
            .map(|_| Slot::take(&open, &peers, a).unwrap())
            .collect();
        assert!(Slot::take(&open, &peers, a).is_none(), "over a's share");
        let others: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map_while(|i| Slot::take(&open, &peers, format!("10.0.1.{i}").parse().unwrap()))
            .collect();
        assert_eq!(
            others.len(),
            MAX_CONNECTIONS - PER_PEER,
            "to the listener's limit"
        );
        drop(held);
        assert!(Slot::take(&open, &peers, a).is_some(), "places come back");
    }
}
