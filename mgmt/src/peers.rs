//! Connections per peer on a listener, so that one peer (a host, a
//! scraper gone wild) that opens them all cannot keep every other peer
//! out: each may hold at most three quarters of the listener's limit.
//! Peers are hosts outside the process; a peer is its IPv4 address (also
//! IPv6-mapped, from a listener on `::`) or its IPv6 /64, which one host
//! may fill with addresses of its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Connections open per peer on one listener.
#[derive(Default)]
pub struct PeerCounts(Mutex<HashMap<IpAddr, usize>>);

/// One connection's place in its peer's share, given back when dropped.
pub struct PeerSlot {
    counts: Arc<PeerCounts>,
    peer: IpAddr,
}

/// Whom a connection from `ip` counts against.
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// One peer's share of a listener that keeps at most `max` open.
pub const fn share(max: usize) -> usize {
    max - max / 4
}

impl PeerCounts {
    /// A place for a connection from `ip` on a listener that keeps at most
    /// `max` open, unless its peer holds its share already.
    pub fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let peer = peer_key(ip);
        let share = share(max);
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(peer).or_insert(0);
        if *n >= share {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: self.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_its_ipv4_address_or_its_ipv6_64() {
        let key = |s: &str| peer_key(s.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:3::1"), "2001:db8:1:3::");
    }

    #[test]
    fn a_peer_holds_three_quarters_and_gets_places_back() {
        let counts = Arc::new(PeerCounts::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<PeerSlot> = (0..6).filter_map(|_| counts.take(a, 8)).collect();
        assert_eq!(held.len(), 6);
        assert!(counts.take(a, 8).is_none(), "past its share");
        assert!(counts.take(b, 8).is_some(), "another peer");
        drop(held);
        assert!(counts.take(a, 8).is_some(), "given back");
        // Small limits: the share is the whole limit, never nothing.
        assert!(counts.take("192.0.2.3".parse().unwrap(), 1).is_some());
    }
}
