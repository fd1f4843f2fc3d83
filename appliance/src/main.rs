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
    /// Start on an embedded default (RAM devices), run a verified workload
    /// on every reactor while reconfiguring under it, and print the result.
    ///
    /// Example: appliance demo --reactors 2 --seconds 3
    Demo {
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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Demo {
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
            demo(&opts, keep)
        }
    }
}

fn demo(opts: &SelfCheckOptions, keep: bool) -> ExitCode {
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
        let stop = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
                eprintln!("error: installing the signal handler: {e}");
                return ExitCode::FAILURE;
            }
        }
        println!("running idle; Ctrl-C to stop");
        let (cpu0, t0) = (process_cpu_time(), Instant::now());
        while !stop.load(Ordering::SeqCst) && !reactors.set().is_stopped() {
            reactors.set().wait_stopped(Duration::from_millis(200));
        }
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
