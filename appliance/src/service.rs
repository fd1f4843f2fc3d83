//! The systemd notification protocol (sd_notify(3)) for `Type=notify`:
//! READY=1 once the API listens and every restored export accepts
//! connections, STATUS= lines an operator sees in `systemctl status`,
//! WATCHDOG=1 only while every reactor answers, and STOPPING=1 with the
//! stop's progress. Outside systemd (no NOTIFY_SOCKET) none of it does
//! anything.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use sd_notify::NotifyState;

/// Tell the service manager `states`; a failure is logged, never fatal.
pub fn notify(states: &[NotifyState]) {
    use std::os::unix::ffi::OsStrExt;
    let r = match std::env::var_os("NOTIFY_SOCKET") {
        // An abstract socket (systemd's own way, when it runs services in
        // a container): the crate takes the name for a path.
        Some(p) if p.as_bytes().starts_with(b"@") => notify_abstract(&p.as_bytes()[1..], states),
        _ => sd_notify::notify(false, states),
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "notifying the service manager");
    }
}

/// sd_notify(3) to the abstract unix socket `name`: one datagram, one
/// assignment per line.
fn notify_abstract(name: &[u8], states: &[NotifyState]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    sock.send_to_addr(msg.as_bytes(), &addr)?;
    Ok(())
}

/// While it lives, the service manager's start time-out is pushed back
/// every few seconds (EXTEND_TIMEOUT_USEC): a restore may take longer than
/// `TimeoutStartSec` (metadata reads with their own 30 s deadlines,
/// remote members that answer late), and systemd would kill the start and
/// loop through `Restart=`. Bounded: it stops after [`EXTEND_AT_MOST`] (a
/// restore stuck for good is then killed, as it should be) and once the
/// daemon is asked to stop (systemd applies an extension to the stop's
/// time-out too). Dropped, it stops.
pub struct StartExtension {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long the start may be extended in all.
pub const EXTEND_AT_MOST: Duration = Duration::from_secs(15 * 60);

/// Start pushing the start time-out back (see [`StartExtension`]) until
/// dropped, or `stopping` is set.
pub fn extend_start(stopping: Arc<AtomicBool>) -> StartExtension {
    extend_for(stopping, EXTEND_AT_MOST)
}

/// How long the stop may be extended in all: each of its steps has a
/// deadline of its own (a failed journal's drain, each volume's rebuild
/// stop and clean record, each export's memory), so a stop past this is
/// stuck, and systemd's kill is right.
pub const EXTEND_STOP_AT_MOST: Duration = Duration::from_secs(5 * 60);

/// Push the stop time-out back while the stop makes its way through
/// volumes whose IO drains slowly (two of them at 30 s each passed the
/// unit's 60 s: killed, nothing was recorded clean and the next start
/// resynchronised every volume). Until dropped, at most
/// [`EXTEND_STOP_AT_MOST`].
pub fn extend_stop() -> StartExtension {
    extend_for(Arc::new(AtomicBool::new(false)), EXTEND_STOP_AT_MOST)
}

fn extend_for(stopping: Arc<AtomicBool>, at_most: Duration) -> StartExtension {
    const EVERY: Duration = Duration::from_secs(10);
    const BY: Duration = Duration::from_secs(30);
    let stop = Arc::new(AtomicBool::new(false));
    let extend = || notify(&[NotifyState::ExtendTimeoutUsec(BY.as_micros() as u32)]);
    let thread = std::env::var_os("NOTIFY_SOCKET").and_then(|_| {
        // The first one now: a quick restore ends before a thread runs.
        extend();
        let s = stop.clone();
        let started = Instant::now();
        std::thread::Builder::new()
            .name("start-extend".into())
            .spawn(move || {
                let done = || s.load(Ordering::SeqCst) || stopping.load(Ordering::SeqCst);
                loop {
                    let t = Instant::now();
                    while t.elapsed() < EVERY && !done() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if done() || started.elapsed() + BY > at_most {
                        return;
                    }
                    extend();
                }
            })
            .ok()
    });
    StartExtension { stop, thread }
}

impl Drop for StartExtension {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A STATUS= line (one line: the protocol separates assignments by
/// newlines, and error messages may hold some).
pub fn status(text: &str) {
    let line = text.replace('\n', " ");
    notify(&[NotifyState::Status(&line)]);
}

/// READY=1 with a STATUS= line, as [`status`] writes it.
pub fn ready(text: &str) {
    let line = text.replace('\n', " ");
    notify(&[NotifyState::Ready, NotifyState::Status(&line)]);
    READY_SENT.store(true, Ordering::SeqCst);
}

/// Whether [`ready`] was said once (the start is over).
static READY_SENT: AtomicBool = AtomicBool::new(false);

/// Whether the start is over: READY=1 was sent.
pub fn started() -> bool {
    READY_SENT.load(Ordering::SeqCst)
}

/// The watchdog interval systemd asked for (WatchdogSec=), if it did and
/// the request is for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then(|| Duration::from_micros(usec))
}

/// Whether every reactor of `set` runs a message within `within`: a
/// reactor stuck in a blocking call (or a spinning poller that never
/// yields) does not, and then the watchdog is not fed.
pub(crate) fn reactors_answer(set: &poller::ReactorSet, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    for core in 0..set.len() {
        let tx = tx.clone();
        set.send(
            core,
            Box::new(move |_ctx: &mut poller::Ctx| {
                let _ = tx.send(core);
            }),
        )
        .map_err(|_| format!("reactor {core} does not take messages"))?;
    }
    drop(tx);
    let mut answered = vec![false; set.len()];
    while answered.iter().any(|a| !a) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(core) => answered[core] = true,
            Err(_) => {
                let late: Vec<usize> = (0..answered.len()).filter(|&c| !answered[c]).collect();
                return Err(format!(
                    "reactor(s) {late:?} did not answer within {within:?}"
                ));
            }
        }
    }
    Ok(())
}

/// Feed systemd's watchdog every half interval while every reactor of
/// `set` answers, until `stop`. None when systemd asked for no watchdog.
pub fn start_watchdog(
    set: poller::ReactorSet,
    stop: Arc<AtomicBool>,
) -> Result<Option<std::thread::JoinHandle<()>>, String> {
    let Some(interval) = watchdog_interval() else {
        return Ok(None);
    };
    // Looked at every quarter interval; fed while every reactor answered
    // within the last half interval, so one slow check (a reactor waiting
    // on a controller's admin queue for a second or two) is not an abort,
    // and a reactor stuck for half the interval is.
    let every = interval / 4;
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "feeding the systemd watchdog"
    );
    std::thread::Builder::new()
        .name("sd-watchdog".into())
        .spawn(move || {
            let mut next = Instant::now();
            let mut last_ok = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                if Instant::now() >= next {
                    next = Instant::now() + every;
                    match reactors_answer(&set, every) {
                        Ok(()) => last_ok = Instant::now(),
                        Err(e) => {
                            tracing::error!(error = %e, "reactors unhealthy");
                            status(&format!("unhealthy: {e}"));
                        }
                    }
                    // Not fed otherwise: systemd acts (WatchdogSec=).
                    if last_ok.elapsed() < interval / 2 {
                        notify(&[NotifyState::Watchdog]);
                    }
                }
                std::thread::sleep(Duration::from_millis(20).min(every));
            }
        })
        .map(Some)
        .map_err(|e| format!("starting the watchdog thread: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reactor held in a message (as a blocking call would hold it) is
    /// named, and the watchdog is not fed for it; once it runs again, it
    /// answers.
    #[test]
    fn a_reactor_that_does_not_run_messages_is_named() {
        let reactors = poller::Reactors::start(poller::ReactorConfig {
            count: 2,
            ..Default::default()
        })
        .unwrap();
        let set = reactors.set().clone();
        assert_eq!(reactors_answer(&set, Duration::from_secs(10)), Ok(()));
        let (held, release) = std::sync::mpsc::channel::<()>();
        let (entered, is_in) = std::sync::mpsc::channel::<()>();
        set.send(
            1,
            Box::new(move |_ctx: &mut poller::Ctx| {
                let _ = entered.send(());
                let _ = release.recv();
            }),
        )
        .map_err(|_| "send")
        .unwrap();
        is_in.recv().unwrap();
        let e = reactors_answer(&set, Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("[1]"), "{e}");
        held.send(()).unwrap();
        assert_eq!(reactors_answer(&set, Duration::from_secs(10)), Ok(()));
        reactors.shutdown().unwrap();
    }
}
