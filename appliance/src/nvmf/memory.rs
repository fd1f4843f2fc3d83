//! The memory a connection's peer decides the size of (answers it does
//! not read, data buffers of its commands), bounded three ways: per
//! connection, per peer (host) and for the whole target. A connection
//! that holds nothing may always take one command, so none waits for
//! ever; beyond that it asks its `Account`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What a connection holds that its peer decides the size of.
#[derive(Clone, Copy)]
pub(crate) enum Held {
    /// Output waiting for the peer to read it.
    Output = 0,
    /// Data buffers of commands in progress.
    Data = 1,
}

/// What the target's connections may hold of each kind (output, data
/// buffers, buffers kept for reuse) all together ...
pub(crate) const MEMORY: usize = 256 << 20;
/// ... and those of one peer: three quarters, as with connections
/// (`crate::peers`). With the whole target's bound alone, one host whose
/// connections held all they might left every other host's connections
/// one command at a time (review).
const PEER_MEMORY: usize = crate::peers::share(MEMORY);
/// ... and one connection at most ...
pub(crate) const SHARE_MAX: usize = 4 << 20;
/// A connection tells the target what it holds when it moved by this
/// much (atomics shared by every reactor, not touched per command).
const REPORT_STEP: usize = 64 << 10;

/// What the target's connections hold, all together and per peer, as
/// they last said (each within `REPORT_STEP`).
#[derive(Default)]
pub(crate) struct Memory {
    held: Tally,
    /// Peers with a connection open.
    peers: Mutex<HashMap<IpAddr, Arc<Tally>>>,
}

/// Bytes held of each kind (by `Held`).
#[derive(Default)]
struct Tally([AtomicUsize; 2]);

impl Tally {
    fn get(&self, kind: Held) -> usize {
        self.0[kind as usize].load(Ordering::Relaxed)
    }

    fn change(&self, kind: Held, from: usize, to: usize) {
        let n = &self.0[kind as usize];
        if to > from {
            n.fetch_add(to - from, Ordering::Relaxed);
        } else {
            n.fetch_sub(from - to, Ordering::Relaxed);
        }
    }
}

impl Memory {
    /// What the connections hold of `kind` together, as they last said.
    #[cfg(test)]
    fn held(&self, kind: Held) -> usize {
        self.held.get(kind)
    }

    /// The account of a connection from `peer` (`None`: the address
    /// was not known; only the target's bound applies).
    pub(crate) fn account(self: &Arc<Self>, peer: Option<IpAddr>) -> Account {
        let peer = peer.map(|ip| {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            // Peers whose connections are all gone (only the map holds
            // their tally) leave; connections come rarely.
            peers.retain(|_, t| Arc::strong_count(t) > 1);
            peers.entry(crate::peers::peer_key(ip)).or_default().clone()
        });
        Account {
            memory: self.clone(),
            peer,
            reported: [0; 2],
        }
    }
}

/// What one connection told the target it holds; given back when
/// dropped.
pub(crate) struct Account {
    memory: Arc<Memory>,
    peer: Option<Arc<Tally>>,
    reported: [usize; 2],
}

impl Account {
    /// The connection holds `now` of `kind`: told when it moved by
    /// `REPORT_STEP` or went to zero.
    pub(crate) fn report(&mut self, kind: Held, now: usize) {
        let was = self.reported[kind as usize];
        if now.abs_diff(was) < REPORT_STEP && (now != 0 || was == 0) {
            return;
        }
        self.memory.held.change(kind, was, now);
        if let Some(p) = &self.peer {
            p.change(kind, was, now);
        }
        self.reported[kind as usize] = now;
    }

    /// Whether the connection, holding `own` bytes of `kind`, may take
    /// `more`: always while it holds nothing, else up to `SHARE_MAX`
    /// while its peer's connections hold less than `PEER_MEMORY` and the
    /// target's less than `MEMORY`. Each connection could hold 4 MiB of
    /// output and 4 MiB of data whatever their number, so one allowed
    /// host with a thousand connections could make the daemon hold
    /// gigabytes and be killed for it (audit).
    pub(crate) fn may_hold(&mut self, kind: Held, own: usize, more: usize) -> bool {
        self.report(kind, own);
        own == 0
            || (own + more <= SHARE_MAX
                && self.memory.held.get(kind) + more <= MEMORY
                && self
                    .peer
                    .as_ref()
                    .is_none_or(|p| p.get(kind) + more <= PEER_MEMORY))
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        // What it held is the target's again.
        self.report(Held::Output, 0);
        self.report(Held::Data, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// `n` connections of `peer`, each holding 4 MiB of data.
    fn filled(memory: &Arc<Memory>, peer: &str, n: usize) -> Vec<Account> {
        (0..n)
            .map(|_| {
                let mut a = memory.account(Some(peer.parse().unwrap()));
                a.report(Held::Data, SHARE_MAX);
                a
            })
            .collect()
    }

    #[test]
    fn one_peer_that_holds_its_share_leaves_room_for_the_others() {
        let memory = Arc::new(Memory::default());
        let hog = filled(&memory, "192.0.2.1", PEER_MEMORY / SHARE_MAX);
        assert_eq!(memory.held(Held::Data), PEER_MEMORY);
        // The hog's connections get nothing more, not even a fresh one
        // past its first command ...
        let mut more = memory.account(Some("192.0.2.1".parse().unwrap()));
        assert!(more.may_hold(Held::Data, 0, MIB), "one command always");
        assert!(!more.may_hold(Held::Data, MIB, MIB));
        // ... its output is another kind ...
        assert!(more.may_hold(Held::Output, MIB, MIB));
        // ... and another host still takes several commands at once.
        let mut other = memory.account(Some("192.0.2.2".parse().unwrap()));
        assert!(other.may_hold(Held::Data, MIB, MIB));
        // Hosts together stay within the target's bound.
        let rest = filled(&memory, "192.0.2.3", (MEMORY - PEER_MEMORY) / SHARE_MAX);
        assert!(!other.may_hold(Held::Data, MIB, MIB));
        drop(hog);
        assert!(other.may_hold(Held::Data, MIB, MIB));
        drop((rest, more, other));
        assert_eq!(memory.held(Held::Data), 0);
        assert_eq!(memory.held(Held::Output), 0);
    }

    #[test]
    fn a_peer_is_counted_by_its_address_or_its_ipv6_64_and_leaves_with_its_connections() {
        let memory = Arc::new(Memory::default());
        // Two addresses of one /64 are one peer.
        let _a = filled(&memory, "2001:db8::1", PEER_MEMORY / SHARE_MAX / 2);
        let _b = filled(&memory, "2001:db8::2", PEER_MEMORY / SHARE_MAX / 2);
        let mut c = memory.account(Some("2001:db8::3".parse().unwrap()));
        assert!(!c.may_hold(Held::Data, MIB, MIB));
        drop((_a, _b, c));
        let _d = memory.account(Some("192.0.2.9".parse().unwrap()));
        assert_eq!(memory.peers.lock().unwrap().len(), 1, "gone peers leave");
    }
}
