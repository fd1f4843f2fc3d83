//! `appliance`: the daemon.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::selfcheck::{render, run_on, start_reactors, SelfCheckOptions};
use appliance::stats::process_cpu_time;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "appliance", version, about = "Polled-mode storage appliance")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The embedded default: a RAM RAID5 with a hot spare, exported over
    /// vhost-user-blk and driven by a real vhost-user-blk client; a member
    /// fails mid-run, the spare is rebuilt under IO, every block is verified.
    ///
    /// Example: appliance demo            (--keep to stay up for a QEMU guest)
    Demo {
        /// Reactor threads.
        #[arg(long, default_value_t = 2)]
        reactors: usize,
        /// Size of each RAID member in MiB.
        #[arg(long, default_value_t = 64)]
        member_mib: u64,
        /// Seconds of IO before the member fails.
        #[arg(long, default_value_t = 2.0)]
        before_failure: f64,
        /// Socket of the export.
        #[arg(long, default_value = "/tmp/appliance-demo.sock")]
        socket: std::path::PathBuf,
        /// Keep serving after the demo until Ctrl-C, for applctl or a QEMU guest.
        #[arg(long)]
        keep: bool,
        /// With --keep: the gRPC API's unix socket, for applctl.
        #[arg(long, default_value = "/tmp/appliance-demo-api.sock")]
        api: std::path::PathBuf,
        /// Use these devices as members instead of RAM (comma-separated
        /// specifications, 3 or more; e.g. nvme:0000:00:03.0,...).
        #[arg(long, value_delimiter = ',')]
        members: Vec<String>,
        /// The hot spare's specification (default: RAM).
        #[arg(long)]
        spare: Option<String>,
        /// Do not pull a member: one is expected to fail on its own.
        #[arg(long)]
        no_pull: bool,
    },
    /// Run a verified workload on every reactor on a RAM device while
    /// reconfiguring it through the quiesce epoch, and print the result.
    ///
    /// Example: appliance selfcheck --reactors 2 --seconds 3
    Selfcheck {
        /// Reactor threads.
        #[arg(long, default_value_t = 2)]
        reactors: usize,
        /// Comma-separated cores to pin the reactors to.
        #[arg(long, value_delimiter = ',')]
        cores: Option<Vec<usize>>,
        /// How long the workload runs.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Size of the RAM device in MiB.
        #[arg(long, default_value_t = 256)]
        device_mib: u64,
        /// Keep running (idle) after the check until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Run the managed daemon: devices, volumes and exports are created over
    /// the gRPC API (see `applctl`), saved to the state file after every
    /// change and restored from it at the next start.
    ///
    /// Example: appliance daemon --api /run/appliance/api.sock --state /var/lib/appliance/state.toml
    Daemon {
        /// Unix socket of the gRPC API (mode 0600).
        #[arg(long, default_value = mgmt::client::DEFAULT_SOCKET)]
        api: std::path::PathBuf,
        /// State file: restored at start, rewritten atomically after every change.
        #[arg(long)]
        state: Option<std::path::PathBuf>,
        /// Initial setup (TOML: [[device]], [[volume]], [[export]]), used when
        /// the state file does not exist yet (SIGHUP then reloads the state
        /// file; without --state, this file).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Reactor threads.
        #[arg(long, default_value_t = 1)]
        reactors: usize,
        /// Comma-separated cores to pin the reactors to.
        #[arg(long, value_delimiter = ',')]
        cores: Option<Vec<usize>>,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9187;
        /// bound before the restore; port 0 takes a free one, which the log names).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// Also serve the API on TCP at ADDR; needs --tls-cert, --tls-key and --token-file.
        #[arg(long, requires_all = ["tls_cert", "tls_key", "token_file"])]
        listen: Option<std::net::SocketAddr>,
        /// TLS certificate chain (PEM) for --listen.
        #[arg(long)]
        tls_cert: Option<std::path::PathBuf>,
        /// TLS private key (PEM) for --listen.
        #[arg(long)]
        tls_key: Option<std::path::PathBuf>,
        /// File holding the bearer token TCP clients must send (16+ characters).
        #[arg(long)]
        token_file: Option<std::path::PathBuf>,
        /// Start VOLUME without its write journal, whose device died: the
        /// volume is assembled and resynchronised, and write-back data that
        /// only the journal held is lost. Repeatable.
        #[arg(long, value_name = "VOLUME")]
        drop_journal: Vec<String>,
        /// Let `file:` devices live in DIR too (repeatable). By default only
        /// the state file's directory and /dev/disk/by-id are allowed: the
        /// API's callers can make the daemon open and write any path it
        /// may name. `--allow-path /` allows everything.
        #[arg(long, value_name = "DIR")]
        allow_path: Vec<std::path::PathBuf>,
    },
    /// Export a device over vhost-user-blk until Ctrl-C (or SIGTERM).
    ///
    /// Example: appliance serve --socket /tmp/vol0.sock --device ram:1G --num-queues 2
    ///
    /// Attach a QEMU guest with shared memory:
    ///   -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
    ///   -chardev socket,id=vol0,path=/tmp/vol0.sock,reconnect=1
    ///   -device vhost-user-blk-pci,chardev=vol0,num-queues=2
    Serve {
        /// Unix socket to listen on.
        #[arg(long)]
        socket: std::path::PathBuf,
        /// ram:SIZE, null:SIZE, file:PATH or file:PATH:SIZE (created).
        #[arg(long, default_value = "ram:1G")]
        device: String,
        /// Serve a RAID5 over these devices instead (comma-separated
        /// specifications, 3 or more): assembled from their superblocks,
        /// or created if they are all blank.
        #[arg(long, value_delimiter = ',')]
        raid5: Vec<String>,
        /// Hot spares for the RAID5 (repeatable).
        #[arg(long)]
        spare: Vec<String>,
        /// Logical block size of the device (512 or 4096).
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Virtqueues offered.
        #[arg(long, default_value_t = 1)]
        num_queues: u16,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Serial number the guest reads (at most 20 bytes).
        #[arg(long, default_value = "appliance-vol0")]
        serial: String,
        /// Reactor threads.
        #[arg(long, default_value_t = 1)]
        reactors: usize,
        /// Comma-separated cores to pin the reactors to.
        #[arg(long, value_delimiter = ',')]
        cores: Option<Vec<usize>>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::env::var_os("NO_COLOR").is_none())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Demo {
            reactors,
            member_mib,
            before_failure,
            socket,
            keep,
            api,
            members,
            spare,
            no_pull,
        } => demo(
            appliance::demo::DemoOptions {
                reactors,
                member_mib,
                before_failure,
                socket,
                members,
                spare,
                pull: !no_pull,
            },
            keep.then_some(api),
        ),
        Command::Selfcheck {
            reactors,
            cores,
            seconds,
            device_mib,
            keep,
        } => {
            if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
                eprintln!("error: --seconds must be in (0, 3600], got {seconds}");
                return ExitCode::from(2);
            }
            let opts = SelfCheckOptions {
                reactors,
                cores,
                duration: Duration::from_secs_f64(seconds),
                device_mib,
                ..Default::default()
            };
            selfcheck(&opts, keep)
        }
        Command::Daemon {
            api,
            state,
            config,
            reactors,
            cores,
            metrics,
            listen,
            tls_cert,
            tls_key,
            token_file,
            drop_journal,
            allow_path,
        } => {
            let tcp = match (listen, tls_cert, tls_key, token_file) {
                (Some(addr), Some(cert), Some(key), Some(token_file)) => {
                    Some(appliance::daemon::TcpOptions {
                        addr,
                        cert,
                        key,
                        token_file,
                    })
                }
                _ => None,
            };
            let stop = match stop_flag() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = appliance::daemon::DaemonOptions {
                api_socket: api,
                state_file: state,
                config,
                reactors,
                cores,
                metrics,
                tcp,
                drop_journals: drop_journal,
                allow_paths: allow_path,
            };
            match appliance::daemon::run(&opts, stop) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    match e {
                        // EX_CONFIG: systemd does not restart on it (see the
                        // unit), where every 2 s changed nothing.
                        appliance::daemon::RunError::Config(_) => ExitCode::from(78),
                        appliance::daemon::RunError::Failed(_) => ExitCode::FAILURE,
                    }
                }
            }
        }
        Command::Serve {
            socket,
            device,
            raid5,
            spare,
            block_size,
            num_queues,
            read_only,
            serial,
            reactors,
            cores,
        } => serve(ServeArgs {
            socket,
            device,
            raid5,
            spare,
            block_size,
            num_queues,
            read_only,
            serial,
            reactors,
            cores,
        }),
    }
}

struct ServeArgs {
    socket: std::path::PathBuf,
    device: String,
    raid5: Vec<String>,
    spare: Vec<String>,
    block_size: u32,
    num_queues: u16,
    read_only: bool,
    serial: String,
    reactors: usize,
    cores: Option<Vec<usize>>,
}

/// Until SIGINT/SIGTERM set `stop`, or the reactors stop on their own.
fn wait_for_stop(stop: &AtomicBool, reactors: &poller::Reactors) {
    while !stop.load(Ordering::SeqCst) && !reactors.set().is_stopped() {
        reactors.set().wait_stopped(Duration::from_millis(200));
    }
}

fn stop_flag() -> Result<Arc<AtomicBool>, String> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| format!("installing the signal handler: {e}"))?;
    }
    Ok(stop)
}

fn serve(a: ServeArgs) -> ExitCode {
    // Each device, and whether it holds only zeros (a new RAID5 on such
    // members owes no initial sync).
    let open = |specs: &[String]| -> Result<Vec<(Arc<dyn bdev::BlockDevice>, bool)>, _> {
        specs
            .iter()
            .map(|s| appliance::devspec::open_zeroed(s, s, a.block_size))
            .collect()
    };
    let (raid_members, zeroed, spares) = match (open(&a.raid5), open(&a.spare)) {
        (Ok(m), Ok(s)) => (
            m.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
            m.iter().all(|(_, z)| *z),
            s.into_iter().map(|(d, _)| d).collect(),
        ),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let dev = if raid_members.is_empty() {
        match appliance::devspec::open(&a.device, a.block_size) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        // Replaced by the RAID5 below; a placeholder keeps the types simple.
        raid_members[0].clone()
    };
    let reactors = match poller::Reactors::start(poller::ReactorConfig {
        count: a.reactors,
        cores: a.cores,
        ..Default::default()
    }) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting reactors: {e}");
            return ExitCode::from(2);
        }
    };
    let stop = match stop_flag() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let mut monitor = None;
    let volume = if raid_members.is_empty() {
        appliance::volume::Volume::new(reactors.set(), "vol0", dev)
    } else {
        let sink = appliance::raid::members::FailureSink::new(tx);
        let opened =
            match appliance::raid::open::open_or_create("vol0", &raid_members, zeroed, sink) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
        println!("{}", opened.summary);
        let volume = appliance::volume::Volume::new(reactors.set(), "vol0", opened.device.clone());
        let m = appliance::raid::monitor::Monitor::start(
            reactors.set(),
            volume.clone(),
            opened.device,
            rx,
            spares,
        );
        m.set_meta(opened.meta);
        match m.open(opened.was_clean) {
            // A scrub's progress has no slot.
            Ok(Some(p)) if p.slot == usize::MAX => {
                println!("resynchronising parity in the background")
            }
            Ok(Some(p)) => println!("rebuilding slot {} in the background", p.slot),
            Ok(None) => {}
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
        monitor = Some(m);
        volume
    };
    let export = match appliance::export::Export::create(
        reactors.set(),
        &volume,
        appliance::export::ExportOptions {
            socket: a.socket.clone(),
            num_queues: a.num_queues,
            read_only: a.read_only,
            serial: a.serial,
            queue_cores: vec![],
            ..Default::default()
        },
    ) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let info = volume.info();
    println!(
        "serving {} ({} bytes, {} byte blocks) on {} with {} queue(s) on {} reactor(s)",
        a.device,
        info.size_bytes(),
        info.block_size,
        a.socket.display(),
        a.num_queues,
        reactors.set().len()
    );
    wait_for_stop(&stop, &reactors);
    let _ = export.delete(true);
    if let Some(m) = monitor {
        if let Err(e) = m.close() {
            eprintln!("error: recording a clean shutdown: {e}");
        }
    }
    let set = reactors.set().clone();
    let stats: Vec<String> = (0..set.len())
        .filter_map(|c| set.stats(c))
        .map(|s| {
            format!(
                "{{\"busy_ns\":{},\"loops\":{},\"sleeps\":{}}}",
                s.busy_ns, s.loops, s.sleeps
            )
        })
        .collect();
    println!("{{\"reactors\":[{}]}}", stats.join(","));
    match reactors.shutdown() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn selfcheck(opts: &SelfCheckOptions, keep: bool) -> ExitCode {
    let reactors = match start_reactors(opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting reactors: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "appliance {}: {} reactors up; self-check on a {} MiB RAM device for {:.1} s",
        env!("CARGO_PKG_VERSION"),
        reactors.set().len(),
        opts.device_mib,
        opts.duration.as_secs_f64()
    );
    let report = match run_on(&reactors, opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: self-check: {e}");
            let _ = reactors.shutdown();
            return ExitCode::FAILURE;
        }
    };
    print!("{}", render(&report));
    if keep {
        let stop = match stop_flag() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("running idle; Ctrl-C to stop");
        let (cpu0, t0) = (process_cpu_time(), Instant::now());
        wait_for_stop(&stop, &reactors);
        let idle = (process_cpu_time() - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
        println!("idle CPU while waiting: {:.2} %", idle * 100.0);
    }
    match reactors.shutdown() {
        Ok(()) => {
            println!("reactors stopped cleanly");
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(opts: appliance::demo::DemoOptions, keep: Option<std::path::PathBuf>) -> ExitCode {
    if !(opts.before_failure.is_finite()
        && opts.before_failure >= 0.0
        && opts.before_failure <= 3600.0)
    {
        eprintln!("error: --before-failure must be in [0, 3600] seconds");
        return ExitCode::from(2);
    }
    if opts.member_mib < 1 || opts.member_mib > 4096 {
        eprintln!("error: --member-mib must be 1..=4096");
        return ExitCode::from(2);
    }
    let stop = match stop_flag() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout();
    let (report, running) = match appliance::demo::run(&opts, &mut stdout) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let appliance::demo::Running { reactors, manager } = running;
    let mut served = Ok(());
    if let Some(api) = keep {
        println!("serving until Ctrl-C; drive it with applctl:");
        println!("  applctl --api {} volume show demo", api.display());
        println!("attach a QEMU guest with:");
        println!(
            "  qemu-system-x86_64 -machine q35 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n    -chardev socket,id=demo,path={},reconnect=1 -device vhost-user-blk-pci,chardev=demo,num-queues=2 ...",
            opts.socket.display()
        );
        let m = manager.clone();
        served = appliance::daemon::serve(
            manager.clone(),
            &api,
            None,
            reactors.set().clone(),
            stop,
            move || m.begin_stop(),
        );
        let _ = std::fs::remove_file(&api);
    }
    manager.shutdown();
    if let Err(e) = served {
        eprintln!("error: {e}");
    }
    match reactors.shutdown() {
        Ok(()) if report.passed() => ExitCode::SUCCESS,
        Ok(()) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
