//! The TCP listener's connections: bound before the daemon says it is
//! ready, and held to a limit with a per-peer share.
//!
//! A peer that completes TLS and then sends nothing holds its connection:
//! h2 waits for the client's preface without a time limit, and the token
//! is only looked at per request. Without a limit, thousands of such
//! connections took every descriptor the daemon had (state saves, export
//! and NVMe/TCP reconnects failed), and an accept that failed for want of
//! descriptors was retried at once, spinning the API thread.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Connections the TCP listener keeps open at most.
pub const MAX_CONNECTIONS: usize = 64;
/// Of them, one peer's (an IPv4 address, or an IPv6 /64): the others
/// still get in while one holds its share.
pub const PER_PEER: usize = MAX_CONNECTIONS * 3 / 4;
/// How long the listener waits after a failed accept (no descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Open connections, in all and per peer.
#[derive(Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// The peer a connection counts against: an IPv6 /64 is one host's.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// A place taken in the counts, given back when dropped.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    peer: IpAddr,
}

impl Slot {
    fn take(counts: &Arc<Mutex<Counts>>, ip: IpAddr) -> Option<Slot> {
        let peer = peer_key(ip);
        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
        let mine = c.per_peer.get(&peer).copied().unwrap_or(0);
        if c.total >= MAX_CONNECTIONS || mine >= PER_PEER {
            return None;
        }
        c.total += 1;
        c.per_peer.insert(peer, mine + 1);
        Some(Slot {
            counts: counts.clone(),
            peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(n) = c.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.per_peer.remove(&self.peer);
            }
        }
    }
}

/// A connection holding its place.
pub struct Limited {
    stream: TcpStream,
    _slot: Slot,
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
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
    counts: Arc<Mutex<Counts>>,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Incoming {
    /// Accept on `listener` (bound already).
    pub fn new(listener: TcpListener) -> Incoming {
        Incoming {
            listener,
            counts: Arc::default(),
            backoff: None,
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
                    let Some(slot) = Slot::take(&self.counts, peer.ip()) else {
                        drop(stream); // over the limit or this peer's share
                        continue;
                    };
                    if stream.set_nodelay(true).is_err() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Limited {
                        stream,
                        _slot: slot,
                    })));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_holds_its_share_and_others_still_get_in() {
        let counts = Arc::new(Mutex::new(Counts::default()));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<Slot> = (0..PER_PEER)
            .map(|_| Slot::take(&counts, a).unwrap())
            .collect();
        assert!(Slot::take(&counts, a).is_none(), "over a's share");
        // The same host as IPv4-mapped IPv6, and another IPv6 address of
        // one /64, count as one peer.
        assert!(Slot::take(&counts, "::ffff:10.0.0.1".parse().unwrap()).is_none());
        let b6: Vec<Slot> = (0..PER_PEER)
            .map(|i| Slot::take(&counts, format!("2001:db8::{i:x}").parse().unwrap()))
            .map_while(|s| s)
            .collect();
        assert_eq!(
            b6.len(),
            MAX_CONNECTIONS - PER_PEER,
            "to the listener's limit"
        );
        drop(held);
        assert!(Slot::take(&counts, a).is_some(), "places come back");
    }
}
