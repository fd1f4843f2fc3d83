//! `appliance daemon`: the long-running service. Reactors serve the data
//! path; one control thread runs the gRPC API (tokio, current-thread: the
//! API is not on the IO path, and a second busy thread would compete with
//! the reactors for the cores).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::Config;
use crate::manager::Manager;

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The API's unix socket.
    pub api_socket: PathBuf,
    /// Where the state is saved after every change and restored from.
    pub state_file: Option<PathBuf>,
    /// Initial setup, used when there is no state file yet.
    pub config: Option<PathBuf>,
    /// Reactor threads.
    pub reactors: usize,
    /// Cores to pin them to.
    pub cores: Option<Vec<usize>>,
    /// Where to serve Prometheus metrics (GET /metrics), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// The API on TCP too (TLS and a bearer token are required then).
    pub tcp: Option<TcpOptions>,
    /// Volumes to start without their journal (it died): the operator's
    /// explicit consent that write-back data only in it is lost.
    pub drop_journals: Vec<String>,
    /// Directories `file:` devices may be in besides the state file's and
    /// /dev/disk/by-id (`/` allows every path).
    pub allow_paths: Vec<PathBuf>,
}

/// The API on TCP.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// Address to listen on.
    pub addr: std::net::SocketAddr,
    /// Server certificate chain (PEM file).
    pub cert: PathBuf,
    /// Its private key (PEM file).
    pub key: PathBuf,
    /// File holding the bearer token clients must send.
    pub token_file: PathBuf,
}

fn tcp_access(t: &TcpOptions) -> Result<mgmt::server::TcpAccess, String> {
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).map_err(|e| format!("{what} {}: {e}", p.display()))
    };
    let token = String::from_utf8(read(&t.token_file, "token file")?)
        .map_err(|_| format!("token file {}: not UTF-8", t.token_file.display()))?
        .trim()
        .to_string();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "token file {}: the token must be at least 16 printable ASCII characters",
            t.token_file.display()
        ));
    }
    Ok(mgmt::server::TcpAccess {
        addr: t.addr,
        cert_pem: read(&t.cert, "TLS certificate")?,
        key_pem: read(&t.key, "TLS key")?,
        token,
    })
}

/// Why the daemon did not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// What the operator gave it cannot be used (a state or configuration
    /// file that does not load, an option naming what is not there):
    /// starting again changes nothing (exit 78, EX_CONFIG; the unit does
    /// not restart on it).
    #[error("{0}")]
    Config(String),
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

impl From<String> for RunError {
    fn from(m: String) -> RunError {
        RunError::Failed(m)
    }
}

/// Run until `stop` is set (SIGINT/SIGTERM) or the reactors stop.
pub fn run(opts: &DaemonOptions, stop: Arc<AtomicBool>) -> Result<(), RunError> {
    // Read the configuration before anything starts: a broken file must
    // stop the daemon before it touches a device.
    let tcp = opts
        .tcp
        .as_ref()
        .map(tcp_access)
        .transpose()
        .map_err(RunError::Config)?;
    // SIGHUP's default action ends the process: a reload asked for during
    // a long restore is remembered, and done once the daemon serves.
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())
        .map_err(|e| format!("installing the SIGHUP handler: {e}"))?;
    // One daemon per state and API socket, before anything is touched.
    let _locks = [
        opts.state_file
            .as_deref()
            .map(|s| crate::instance::lock(s, "state file"))
            .transpose()?,
        Some(crate::instance::lock(&opts.api_socket, "API socket")?),
    ];
    // Saved state wins; the initial setup applies only before there is any.
    let state_saved = match &opts.state_file {
        Some(state) => state_exists(state).map_err(RunError::Config)?,
        None => false,
    };
    let mut initial = match (&opts.state_file, &opts.config) {
        (Some(state), _) if state_saved => Some((
            Config::load(state).map_err(|e| RunError::Config(e.to_string()))?,
            false,
        )),
        (_, Some(cfg)) => Some((
            Config::load(cfg).map_err(|e| RunError::Config(e.to_string()))?,
            true,
        )),
        _ => None,
    };
    for name in &opts.drop_journals {
        let v = initial
            .as_mut()
            .and_then(|(cfg, _)| cfg.volumes.iter_mut().find(|v| &v.name == name))
            .ok_or_else(|| {
                RunError::Config(format!(
                    "--drop-journal {name}: no such volume in the configuration"
                ))
            })?;
        let Some(j) = v.journal.take() else {
            return Err(RunError::Config(format!(
                "--drop-journal {name}: the volume has no journal"
            )));
        };
        tracing::warn!(
            volume = name,
            journal = j,
            mode = v.journal_mode,
            "starting without the journal, as asked: what only it held (write-back data) is lost; the volume is resynchronised"
        );
        v.journal_mode.clear();
        v.journal_id.clear();
    }
    let reactors = poller::Reactors::start(poller::ReactorConfig {
        count: opts.reactors,
        cores: opts.cores.clone(),
        ..Default::default()
    })
    .map_err(|e| format!("starting reactors: {e}"))?;
    let mgr = Arc::new(Manager::new(reactors.set(), opts.state_file.clone()));
    // SIGHUP and the Reload call read what a restart would start from:
    // the state file (the daemon's record, API changes included, perhaps
    // edited by hand) if it keeps one, else the operator's file. Reading
    // `--config` with a state file undid every API change made since the
    // first start (`--config` is only that start's setup).
    mgr.set_config_file(opts.state_file.clone().or_else(|| opts.config.clone()));
    let allowed = crate::devpaths::AllowedPaths::daemon_default(
        opts.state_file.as_deref(),
        &opts.allow_paths,
    );
    tracing::info!(directories = %allowed.describe(), "file: devices are allowed in");
    // Before any IO, as md does at module load: the log says which kernel
    // RAID5 parity uses and why.
    let xor = crate::raid::parity::calibrate();
    for class in crate::raid::parity::SizeClass::ALL {
        let measured: Vec<String> = xor
            .speeds
            .iter()
            .map(|s| {
                format!(
                    "{} {:.1} GB/s",
                    s.name,
                    s.bytes_per_sec[class as usize] / 1e9
                )
            })
            .collect();
        tracing::info!(
            buffers = class.label(),
            source_kib = class.calibration_len() >> 10,
            kernel = xor.chosen(class),
            measured = %measured.join(", "),
            "RAID5 parity: XOR kernel chosen"
        );
    }
    mgr.set_allowed_paths(allowed);
    // The metrics address is bound before the restore: a port in use
    // stops the daemon before it assembles (and records) anything.
    let metrics = match opts.metrics.map(crate::metrics::Bound::bind).transpose() {
        Ok(m) => m,
        Err(e) => {
            let _ = reactors.shutdown();
            return Err(RunError::Failed(e));
        }
    };
    if let Some((cfg, first)) = &initial {
        crate::service::status("restoring devices, volumes and exports");
        let _longer = crate::service::extend_start(stop.clone());
        let watch = StopDuringRestore::watch(stop.clone());
        let restored = mgr.restore(cfg, *first);
        drop(watch);
        if let Err(e) = restored {
            mgr.shutdown_without_saving();
            let _ = reactors.shutdown();
            return Err(RunError::Failed(format!(
                "restoring the configuration: {e}"
            )));
        }
        // Asked to stop meanwhile: what was assembled is recorded clean,
        // and nothing is served (it answered the API and sent READY=1
        // first).
        if stop.load(Ordering::SeqCst) {
            // Said again (a request just after the watch ended was not),
            // and the time-out pushed back through the shutdown too: it
            // may wait for a failed journal's drain (review).
            use crate::service::{notify, NotifyState};
            notify(&[
                NotifyState::Stopping,
                NotifyState::Status("stopping: recording the restored volumes clean"),
            ]);
            let _longer = crate::service::extend_stop();
            mgr.shutdown();
            let stopped = reactors.shutdown().map_err(|e| e.to_string());
            crate::service::status("stopped");
            return stopped.map_err(RunError::Failed);
        }
    }
    let sampler_stop = Arc::new(AtomicBool::new(false));
    let sampler = match metrics {
        Some(bound) => match crate::metrics::start(bound, mgr.clone(), sampler_stop.clone()) {
            Ok(t) => Some(t),
            Err(e) => {
                mgr.shutdown();
                let _ = reactors.shutdown();
                return Err(RunError::Failed(e));
            }
        },
        None => None,
    };
    let reloader = match start_reloader(mgr.clone(), hup, sampler_stop.clone()) {
        Ok(t) => t,
        Err(e) => {
            mgr.shutdown();
            let _ = reactors.shutdown();
            return Err(RunError::Failed(e));
        }
    };
    let watchdog =
        match crate::service::start_watchdog(reactors.set().clone(), sampler_stop.clone()) {
            Ok(t) => t,
            Err(e) => {
                sampler_stop.store(true, Ordering::SeqCst);
                mgr.shutdown();
                let _ = reactors.shutdown();
                return Err(RunError::Failed(e));
            }
        };
    // The stop begins when it is asked for, before the API's calls in
    // progress are waited for: a reload or a change running then makes
    // no further step (each could wait a volume's drain deadline), and
    // systemd hears STOPPING=1 and the time-out pushed back from there
    // (it heard nothing while a call held the API up, and killed the
    // daemon before any volume was recorded clean).
    let longer = Arc::new(Mutex::new(None));
    let begin = {
        let (mgr, longer) = (mgr.clone(), longer.clone());
        move || begin_stop(&mgr, &longer)
    };
    let served = serve(
        mgr.clone(),
        &opts.api_socket,
        tcp,
        reactors.set().clone(),
        stop,
        begin.clone(),
    );
    // (The API may have ended on its own, an error.)
    begin();
    use crate::service::status;
    let _ = std::fs::remove_file(&opts.api_socket);
    sampler_stop.store(true, Ordering::SeqCst);
    if let Some(t) = sampler {
        let _ = t.join();
    }
    let _ = reloader.join();
    if let Some(t) = watchdog {
        let _ = t.join();
    }
    status(&format!(
        "stopping: draining {} exports and recording {} volumes clean",
        mgr.list_exports().len(),
        mgr.list_volumes().len()
    ));
    mgr.shutdown();
    status("stopping: reactors");
    let stopped = reactors.shutdown().map_err(|e| e.to_string());
    status("stopped");
    served.and(stopped).map_err(RunError::Failed)
}

/// The stop's first steps, once: no further step for a reload or a
/// change (and no READY=1 after the STOPPING=1), the stop in `systemctl
/// status`, and its time-out pushed back until `longer` is dropped (a
/// reload's step, each volume's drain, reactors dropping channels that
/// wait for background writes; bounded).
fn begin_stop(mgr: &Manager, longer: &Mutex<Option<crate::service::StartExtension>>) {
    let mut longer = longer.lock().unwrap_or_else(|e| e.into_inner());
    if longer.is_some() {
        return;
    }
    mgr.begin_stop();
    use crate::service::{notify, NotifyState};
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: API closing"),
    ]);
    *longer = Some(crate::service::extend_stop());
}

/// A stop asked for while the restore runs: systemd hears STOPPING=1 at
/// once and the stop's time-out is pushed back until the restore ends
/// (each of its steps has a deadline; the start's extension ends with the
/// stop request). Before, systemd killed the daemon mid-restore at
/// TimeoutStopSec, and nothing assembled was recorded clean (audit).
struct StopDuringRestore {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StopDuringRestore {
    fn watch(stop: Arc<AtomicBool>) -> StopDuringRestore {
        let done = Arc::new(AtomicBool::new(false));
        let over = done.clone();
        let thread = std::thread::Builder::new()
            .name("restore-stop".into())
            .spawn(move || {
                let nap = || std::thread::sleep(Duration::from_millis(50));
                while !over.load(Ordering::SeqCst) {
                    if stop.load(Ordering::SeqCst) {
                        use crate::service::{notify, NotifyState};
                        notify(&[
                            NotifyState::Stopping,
                            NotifyState::Status("stopping: the restore ends first"),
                        ]);
                        let _longer = crate::service::extend_stop();
                        while !over.load(Ordering::SeqCst) {
                            nap();
                        }
                        return;
                    }
                    nap();
                }
            })
            .ok();
        StopDuringRestore { done, thread }
    }
}

impl Drop for StopDuringRestore {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A thread that reloads the configuration on each SIGHUP (`hup`, set by
/// its handler), until `stop`.
fn start_reloader(
    mgr: Arc<Manager>,
    hup: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name("reload".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                // A SIGHUP during the start is done once it serves: its
                // READY=1 before the API's told systemd the start was
                // over before the API socket was there (audit).
                if crate::service::started() && hup.swap(false, Ordering::SeqCst) {
                    crate::service::notify(&[crate::service::NotifyState::Reloading]);
                    let line = match mgr.reload_configured() {
                        Ok(r) => {
                            tracing::info!(applied = ?r.applied, refused = ?r.refused, "SIGHUP: configuration reloaded");
                            format!(
                                "reloaded: {} applied, {} refused",
                                r.applied.len(),
                                r.refused.len()
                            )
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "SIGHUP: reload failed");
                            format!("reload failed: {e}")
                        }
                    };
                    // After STOPPING=1, READY=1 would tell systemd the
                    // stop is over.
                    if !stop.load(Ordering::SeqCst) && !mgr.is_stopping() {
                        crate::service::ready(&line);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .map_err(|e| format!("starting the reload thread: {e}"))
}

/// How long calls in progress at a stop are waited for after the API's
/// grace: each step of a call has its own deadline (a volume's drain, 30 s
/// by default), and a stop refuses every further step.
const CALLS_AT_STOP: Duration = Duration::from_secs(35);

/// Threads the API's calls run on.
const API_THREADS: usize = 64;
/// Of those, what calls over TCP may take at once: the rest stay for the
/// unix socket (the operator) and the health probe, whatever callers on
/// TCP hold.
const TCP_CALLS: usize = 48;

/// Serve the API of `mgr` on the unix socket `socket` (and on TCP with TLS,
/// if given) until `stop` is set or the reactors stop; `on_stop` runs
/// then, before calls in progress are waited for.
pub fn serve(
    mgr: Arc<Manager>,
    socket: &std::path::Path,
    tcp: Option<mgmt::server::TcpAccess>,
    set: poller::ReactorSet,
    stop: Arc<AtomicBool>,
    on_stop: impl FnOnce() + Send + 'static,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Calls run on blocking threads: a bound, so that callers opening
        // many calls at once queue instead of making hundreds of threads.
        .max_blocking_threads(API_THREADS)
        .build()
        .map_err(|e| format!("starting the API runtime: {e}"))?;
    let served = rt.block_on(async {
        let listener =
            mgmt::server::bind(socket).map_err(|e| format!("binding {}: {e}", socket.display()))?;
        tracing::info!(socket = %socket.display(), reactors = set.len(), "API listening");
        // Bound (and its TLS identity checked) before READY: a failure
        // here fails the start.
        let tcp = tcp
            .map(mgmt::server::TcpListening::bind)
            .transpose()
            .map_err(|e| format!("API on TCP: {e}"))?;
        if let Some(t) = &tcp {
            tracing::info!(addr = ?t.local_addr(), "API listening on TCP with TLS");
        }
        // Restored exports were listening before this: everything accepts.
        let line = format!(
            "serving {} volumes in {} exports on {} reactors; API on {}",
            mgr.list_volumes().len(),
            mgr.list_exports().len(),
            set.len(),
            socket.display()
        );
        crate::service::ready(&line);
        println!(
            "appliance {} listening on {}",
            env!("CARGO_PKG_VERSION"),
            socket.display()
        );
        let (hset, health_stop) = (set.clone(), stop.clone());
        let (stopping, stopped_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) && !set.is_stopped() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            on_stop();
            let _ = stopping.send(true);
        });
        let stopped = move || {
            let mut rx = stopped_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let svc = crate::api::Service::new(mgr);
        // grpc.health.v1: SERVING while every reactor runs a message
        // within half a second, looked at every second.
        let health = mgmt::server::HealthReporter::new();
        let h = health.clone();
        tokio::spawn(async move {
            use mgmt::server::ServingStatus;
            let mut last = None;
            while !health_stop.load(Ordering::SeqCst) {
                let s = hset.clone();
                let ok = tokio::task::spawn_blocking(move || {
                    crate::service::reactors_answer(&s, Duration::from_millis(500))
                })
                .await
                .is_ok_and(|r| r.is_ok());
                if last != Some(ok) {
                    let status = if ok {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    h.set_service_status("", status).await;
                    h.set_service_status("appliance.v2.Appliance", status).await;
                    last = Some(ok);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let unix = mgmt::server::serve(svc.clone(), listener, &health, stopped());
        match tcp {
            None => unix.await.map_err(|e| format!("API server: {e}")),
            Some(listening) => {
                // A TCP server that ends with an error is said at once;
                // the unix socket (and the daemon) go on.
                let tcp = async {
                    let svc = svc.limited(TCP_CALLS);
                    if let Err(e) =
                        mgmt::server::serve_tcp(svc, listening, &health, stopped()).await
                    {
                        tracing::error!(error = %e, "the API on TCP stopped; the unix socket still serves");
                    }
                };
                let (u, ()) = tokio::join!(unix, tcp);
                u.map_err(|e| format!("API server: {e}"))
            }
        }
    });
    // Dropping the runtime would wait for every call still running, with
    // no bound.
    rt.shutdown_timeout(CALLS_AT_STOP);
    served
}

/// Whether a state file is there to start from. Only "no such file" says
/// no: `Path::exists` said no for any error too (a link to a filesystem
/// not mounted yet, a permission), and the daemon then started from the
/// initial configuration and saved over the link, losing every change made
/// through the API since.
fn state_exists(state: &std::path::Path) -> Result<bool, String> {
    let what = |e: std::io::Error| format!("state file {}: {e}", state.display());
    match std::fs::symlink_metadata(state) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(what(e)),
        Ok(_) => std::fs::metadata(state).map(|_| true).map_err(|e| {
            what(std::io::Error::new(
                e.kind(),
                format!("it links to nothing usable ({e})"),
            ))
        }),
    }
}

#[cfg(test)]
mod state_tests {
    use super::state_exists;

    #[test]
    fn a_state_file_that_cannot_be_looked_at_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.toml");
        assert_eq!(state_exists(&state), Ok(false));
        std::os::unix::fs::symlink("/nonexistent/state.toml", &state).unwrap();
        let e = state_exists(&state).unwrap_err();
        assert!(e.contains("links to nothing"), "{e}");
        std::fs::remove_file(&state).unwrap();
        std::fs::write(&state, "").unwrap();
        assert_eq!(state_exists(&state), Ok(true));
    }
}
