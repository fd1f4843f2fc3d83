//! A controller: what the admin queue and the IO queues of one host's
//! association share. Only connects and admin commands take its lock; the
//! IO path reads two atomics (`enabled`, `dead`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::{Port, Subsystem};

/// IO queues a controller grants at most (Number of Queues feature).
pub const MAX_IO_QUEUES: u16 = 64;
/// CC.EN.
pub const CC_EN: u32 = 1;
/// CC.SHN (shutdown notification) mask.
pub const CC_SHN: u32 = 3 << 14;
/// CSTS.RDY.
pub const CSTS_RDY: u32 = 1;
/// CSTS.SHST: shutdown processing complete.
pub const CSTS_SHST_DONE: u32 = 2 << 2;
/// Controller Fatal Status: the shutdown's flush failed.
pub const CSTS_CFS: u32 = 1 << 1;
/// Asynchronous event configuration: namespace attribute notices.
pub const AEC_NS_ATTR: u32 = 1 << 8;

/// The mutable part of a controller.
#[derive(Debug)]
pub struct State {
    /// Controller configuration.
    pub cc: u32,
    /// Controller status.
    pub csts: u32,
    /// Keep-alive timeout in ms (0: none).
    pub kato_ms: u32,
    /// When the host last showed it is alive (Keep Alive or Connect).
    pub last_keep_alive: Instant,
    /// IO queues granted (1-based count).
    pub io_queues: u16,
    /// IO queues connected now.
    pub connected: BTreeSet<u16>,
    /// Asynchronous event configuration (Set Features 0x0b).
    pub aec: u32,
    /// A namespace-attribute-changed event not yet sent to the host.
    pub ns_event: bool,
    /// The changed namespace list has an entry not yet read.
    pub ns_changed: bool,
    /// Events of this type are masked until the host reads the log.
    pub ns_masked: bool,
}

/// A controller of a subsystem (or of the discovery service).
pub struct Controller {
    /// Its ID.
    pub cntlid: u16,
    /// The host that connected it.
    pub hostnqn: String,
    /// The host's identifier from Connect.
    pub host_id: [u8; 16],
    /// The subsystem; `None` for a discovery controller.
    pub subsystem: Option<Arc<Subsystem>>,
    pub(super) port: Arc<Port>,
    /// The address the host reached (what the discovery log names: a
    /// listener on 0.0.0.0 is reached on one of the host's addresses).
    pub local: std::net::SocketAddr,
    state: Mutex<State>,
    enabled: AtomicBool,
    dead: AtomicBool,
    /// A shutdown notification came that no flush has started on yet.
    flush_wanted: AtomicBool,
    /// A shutdown flush thread runs: at most one per controller, however
    /// often a host toggles CC.SHN (each toggle spawned a thread and a
    /// flush, thousands per read of a hostile host's pipelined PDUs).
    flushing: AtomicBool,
}

/// The longest keep-alive a discovery controller is held to: open to any
/// host, one that asked for days (KATO is the host's to set, up to 49
/// days) and went quiet held its connection slot that long, and a few
/// hundred of them every slot of the port. Linux sends a persistent
/// discovery controller's keep-alive every few seconds.
const DISCOVERY_KATO_MAX_MS: u32 = 120_000;

impl Controller {
    pub(super) fn new(
        cntlid: u16,
        hostnqn: String,
        host_id: [u8; 16],
        subsystem: Option<Arc<Subsystem>>,
        port: Arc<Port>,
        local: std::net::SocketAddr,
        kato_ms: u32,
    ) -> Controller {
        // What Get Features then says: a host that reads the time-out back
        // learns the one it is held to (it said what was asked for).
        let kato_ms = match subsystem {
            None => kato_ms.min(DISCOVERY_KATO_MAX_MS),
            Some(_) => kato_ms,
        };
        Controller {
            cntlid,
            hostnqn,
            host_id,
            subsystem,
            port,
            local,
            state: Mutex::new(State {
                cc: 0,
                csts: 0,
                kato_ms,
                last_keep_alive: Instant::now(),
                io_queues: 0,
                connected: BTreeSet::new(),
                aec: 0,
                ns_event: false,
                ns_changed: false,
                ns_masked: false,
            }),
            enabled: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            flush_wanted: AtomicBool::new(false),
            flushing: AtomicBool::new(false),
        }
    }

    /// The mutable state (admin path only).
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// CC.EN is set and the controller ready.
    #[inline]
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Whether the association is over (keep-alive expired, the admin
    /// queue closed, the export deleted): its queues close.
    #[inline]
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// End the association.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.enabled.store(false, Ordering::Release);
    }

    /// Whether this is a discovery controller.
    pub fn is_discovery(&self) -> bool {
        self.subsystem.is_none()
    }

    /// Write CC: enabling makes the controller ready at once; clearing EN
    /// resets it. A shutdown notification flushes the volume (off the
    /// reactor) and reports "shutdown complete" once a flush that started
    /// after it is done: the controller says it has a volatile write
    /// cache. Notifications that come while a flush runs are served by one
    /// more flush on the same thread.
    pub fn set_cc(self: &Arc<Self>, cc: u32) {
        let shutdown = cc & CC_SHN != 0 && self.state().cc & CC_SHN == 0;
        if shutdown {
            // Before CC shows it: a flush ending now that sees SHN set
            // also sees that another flush is wanted.
            self.flush_wanted.store(true, Ordering::SeqCst);
        }
        self.write_cc(cc);
        if !shutdown {
            return;
        }
        let Some(sub) = self.subsystem.clone() else {
            self.flush_wanted.store(false, Ordering::SeqCst);
            self.state().csts |= CSTS_SHST_DONE;
            return;
        };
        if self.flushing.swap(true, Ordering::SeqCst) {
            return; // the running thread flushes again for this one
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nvmf-shutdown".into())
            .spawn(move || me.shutdown_flushes(&sub));
        if spawned.is_err() {
            self.flushing.store(false, Ordering::SeqCst);
            self.flush_wanted.store(false, Ordering::SeqCst);
            self.state().csts |= CSTS_SHST_DONE;
        }
    }

    /// Flush until no shutdown notification waits for one, then let the
    /// next notification start a thread again.
    fn shutdown_flushes(&self, sub: &Subsystem) {
        loop {
            while self.flush_wanted.swap(false, Ordering::SeqCst) {
                let flushed = sub
                    .volume
                    .flush_on_reactor(std::time::Duration::from_secs(30));
                let mut st = self.state();
                if let Err(e) = flushed {
                    // Not "shutdown complete": the host would power off
                    // believing what it wrote durable. Fatal instead, as a
                    // drive whose cache could not be written says.
                    tracing::error!(error = %e, nqn = %sub.opts.nqn, "nvme/tcp: flushing at the host's shutdown failed");
                    st.csts |= CSTS_CFS;
                } else if st.cc & CC_SHN != 0 && !self.flush_wanted.load(Ordering::SeqCst) {
                    st.csts |= CSTS_SHST_DONE;
                }
            }
            self.flushing.store(false, Ordering::SeqCst);
            // A notification between the last swap and the store above saw
            // `flushing` set and left it to this thread.
            if !self.flush_wanted.load(Ordering::SeqCst)
                || self.flushing.swap(true, Ordering::SeqCst)
            {
                return;
            }
        }
    }

    fn write_cc(&self, cc: u32) {
        let mut s = self.state();
        let was = s.cc;
        s.cc = cc;
        if cc & CC_EN != 0 && was & CC_EN == 0 {
            s.csts |= CSTS_RDY;
            s.csts &= !(CSTS_SHST_DONE | CSTS_CFS);
        } else if cc & CC_EN == 0 && was & CC_EN != 0 {
            s.csts &= !CSTS_RDY;
        }
        if cc & CC_SHN == 0 && was & CC_SHN != 0 {
            s.csts &= !CSTS_SHST_DONE;
        }
        self.enabled.store(
            s.csts & CSTS_RDY != 0 && cc & CC_SHN == 0,
            Ordering::Release,
        );
    }

    /// The host is alive.
    pub fn touch(&self) {
        self.state().last_keep_alive = Instant::now();
    }
}
