//! Frontend IO with a deadline. The vhost crate reads and writes the
//! control socket blocking, and retries EAGAIN itself, so socket timeouts
//! would only turn a stuck read or write into an endless loop of them. So
//! the control thread marks when it waits on the frontend (from the start
//! of a message to the end of its answer, minus the export's own work in
//! between, which has deadlines of its own), and one watchdog thread for
//! all exports shuts down the socket of a connection that has been
//! waiting longer than [`FRONTEND_IO_TIMEOUT`]: the blocked read or write
//! fails at once and the connection ends. Shutdown, not close: the
//! descriptor stays the crate's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::ExportShared;

/// How long the rest of a started message, or room for its answer, may
/// take. A frontend that sends half a message or never reads its answers
/// loses its connection after this.
pub const FRONTEND_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// When the control thread started waiting on its frontend: milliseconds
/// since [`epoch`] plus one, or 0 while it is not; and which connection
/// and thread that was.
#[derive(Default)]
pub struct IoClock {
    since: AtomicU64,
    connection: AtomicU64,
    thread: Mutex<Option<std::thread::ThreadId>>,
    /// Other threads holding the connection's handler for the export's
    /// own work (a queue move, a ring's restart): a message arriving then
    /// waits for them, not for its frontend.
    elsewhere: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

impl IoClock {
    /// The control thread waits on connection `connection`'s frontend
    /// from now.
    pub fn start(&self, connection: u64) {
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current().id());
        self.connection.store(connection, Ordering::SeqCst);
        self.since.store(now_ms(), Ordering::SeqCst);
    }

    /// It no longer does.
    pub fn stop(&self) {
        self.since.store(0, Ordering::SeqCst);
    }

    /// The connection waited on for too long, if one is.
    fn overdue(&self) -> Option<u64> {
        if self.elsewhere.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = self.since.load(Ordering::SeqCst);
        let late =
            since != 0 && now_ms().saturating_sub(since) > FRONTEND_IO_TIMEOUT.as_millis() as u64;
        late.then(|| self.connection.load(Ordering::SeqCst))
    }

    fn on_control_thread(&self) -> bool {
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) == Some(std::thread::current().id())
    }
}

/// The export's own work, between receiving a message and answering it:
/// the clock stops until the guard drops, then starts again for the
/// answer. Only on the control thread: the same work called from the API
/// (a queue move) leaves the clock alone.
pub fn own_work(shared: &Arc<ExportShared>) -> OwnWork {
    let clock = &shared.io_clock;
    let waiting = clock.on_control_thread() && clock.since.swap(0, Ordering::SeqCst) != 0;
    OwnWork {
        shared: shared.clone(),
        waiting,
    }
}

/// See [`own_work`].
pub struct OwnWork {
    shared: Arc<ExportShared>,
    waiting: bool,
}

impl Drop for OwnWork {
    fn drop(&mut self) {
        if self.waiting {
            let clock = &self.shared.io_clock;
            clock.since.store(now_ms(), Ordering::SeqCst);
        }
    }
}

/// Another thread than the control thread holds the connection's
/// handler for the export's own work, which may take as long as a drain
/// (30 s by default): until the guard drops, a message the control thread
/// has read waits for that work, so the clock does not count against the
/// frontend; it starts afresh afterwards. Take it once the handler is
/// locked (a wait for the lock while the control thread reads a message
/// is the frontend's time).
pub fn held_elsewhere(shared: &Arc<ExportShared>) -> HeldElsewhere {
    shared.io_clock.elsewhere.fetch_add(1, Ordering::SeqCst);
    HeldElsewhere {
        shared: shared.clone(),
    }
}

/// See [`held_elsewhere`].
pub struct HeldElsewhere {
    shared: Arc<ExportShared>,
}

impl Drop for HeldElsewhere {
    fn drop(&mut self) {
        let clock = &self.shared.io_clock;
        if clock.elsewhere.fetch_sub(1, Ordering::SeqCst) == 1 {
            // A message waiting meanwhile gets the whole time-out for the
            // rest of its exchange.
            let since = clock.since.load(Ordering::SeqCst);
            if since != 0 {
                let _ = clock.since.compare_exchange(
                    since,
                    now_ms(),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
        }
    }
}

/// Watch `shared`'s connections for as long as the export lives.
pub fn watch(shared: &Arc<ExportShared>) {
    static WATCHED: OnceLock<Mutex<Vec<Weak<ExportShared>>>> = OnceLock::new();
    let mut started = false;
    let list = WATCHED.get_or_init(|| {
        started = true;
        Mutex::new(Vec::new())
    });
    list.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Arc::downgrade(shared));
    if !started {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("vhost-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let live: Vec<Arc<ExportShared>> = {
                let mut l = list.lock().unwrap_or_else(|e| e.into_inner());
                l.retain(|w| w.strong_count() > 0);
                l.iter().filter_map(Weak::upgrade).collect()
            };
            for s in live {
                let Some(connection) = s.io_clock.overdue() else {
                    continue;
                };
                // Under the connection's lock, which a new connection
                // takes before it is counted: only the stalled one goes.
                let conn = s.conn.lock().unwrap_or_else(|e| e.into_inner());
                if s.connections.load(Ordering::SeqCst) != connection
                    || s.io_clock.overdue() != Some(connection)
                {
                    continue;
                }
                tracing::warn!(socket = %s.options.socket.display(), timeout = ?FRONTEND_IO_TIMEOUT, "the vhost-user frontend stalled a message or its answer: dropping it");
                s.fault().raise();
                if let Some(c) = &*conn {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "starting the vhost-user watchdog; stalled frontends are not dropped");
    }
}
