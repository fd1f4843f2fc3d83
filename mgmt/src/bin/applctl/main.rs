//! `applctl`: the operator's command line over the appliance's gRPC API.
//!
//! Exit codes: 0 done; 1 internal error or failed background work;
//! 2 bad arguments; 3 not found; 4 already exists; 5 refused in this state
//! (failed precondition); 6 deadline exceeded (the daemon's, or
//! --deadline's); 7 daemon unreachable;
//! 8 not authorised; 9 not enough of a resource (memory for a RAM device);
//! 10 `health` found the daemon degraded (as `mdadm --detail --test`
//! says a degraded array in its exit code).

mod nvmf;
mod qos;
mod show;
mod stats;
mod values;
mod volume;
mod wait;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use mgmt::pb;
use show::{devices, exports, table};
use tonic::{Code, Status};
use volume::{volume, VolumeCmd};

#[derive(Parser)]
#[command(
    name = "applctl",
    version,
    about = "Manage the storage appliance",
    after_help = "Examples:
  applctl device attach d0 file:/var/lib/appliance/d0.img:10G
  applctl device attach d1 ram:1G
  applctl volume create vol0 --level raid5 --members d0,d1,d2 --spares d3
  applctl export create vm1 --volume vol0 --socket /run/appliance/vm1.sock --num-queues 2
  applctl volume fail vol0 d1
  applctl volume wait vol0 --progress
  applctl --json volume show vol0

Exit codes: 0 done, 1 internal error, 2 bad arguments, 3 not found,
4 already exists, 5 refused in this state, 6 deadline exceeded,
7 daemon unreachable, 8 not authorised, 9 resource exhausted,
10 health: degraded (a volume, device or journal has a problem).

Over TCP: --api https://HOST:PORT --ca ca.pem --token-file token."
)]
struct Cli {
    /// The daemon's API: its unix socket, or https://HOST:PORT (then
    /// with --ca and a token).
    #[arg(long, global = true, env = "APPLCTL_API", default_value = mgmt::client::DEFAULT_SOCKET)]
    api: String,
    /// CA certificate (PEM) that signed the daemon's TLS certificate.
    #[arg(long, global = true, env = "APPLCTL_CA")]
    ca: Option<PathBuf>,
    /// Name the daemon's certificate carries.
    #[arg(long, global = true, default_value = "localhost")]
    tls_domain: String,
    /// File holding the bearer token for TCP (or APPLCTL_TOKEN).
    #[arg(long, global = true, env = "APPLCTL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Give up on a call after this many seconds without an answer (exit
    /// 6); by default a call waits as long as the daemon takes (a change
    /// may wait for a volume's IO to drain). A change given up on may
    /// still be made: look before trying again. Streams (`volume wait`,
    /// `--watch`) run on once answered.
    #[arg(long, global = true, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    deadline: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Daemon and API version.
    Version,
    /// Print the shell completion script (bash, zsh, fish, elvish,
    /// powershell); no daemon is needed.
    ///
    /// Example: applctl completions bash > /etc/bash_completion.d/applctl
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (applctl.1, applctl-volume-create.1, ...) into
    /// DIR; no daemon is needed.
    ///
    /// Example: applctl man /usr/local/share/man/man1
    Man {
        /// Where the pages go.
        dir: std::path::PathBuf,
    },
    /// Daemon health: ok, or what is degraded.
    Health,
    /// Reactor busy time, loops and sleeps, and each export's IO since it
    /// was created; with --watch, each export's IOPS, bandwidth and
    /// latency percentiles every SECS seconds.
    ///
    /// Example: applctl stats --watch 1
    Stats {
        /// Print per-export rates every SECS seconds (until Ctrl-C or
        /// --count tables).
        #[arg(long, value_name = "SECS")]
        watch: Option<f64>,
        /// With --watch: stop after this many tables.
        #[arg(long, requires = "watch")]
        count: Option<u32>,
    },
    /// Attach, list and detach devices.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Create, inspect and change volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// vhost-user-blk exports.
    #[command(subcommand)]
    Export(ExportCmd),
    /// NVMe/TCP exports (subsystems other hosts connect to).
    #[command(subcommand)]
    Nvmf(nvmf::NvmfCmd),
    /// Bring the daemon to what its configuration file says (as SIGHUP
    /// does), and list what changed and what could not.
    Reload,
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Attach a device: ram:SIZE, null:SIZE, file:PATH, file:PATH:SIZE, or
    /// nvme:PCI-ADDRESS[/NSID] (a controller bound to vfio-pci).
    ///
    /// Example: applctl device attach d0 file:/var/lib/appliance/d0.img:10G
    Attach {
        /// Its name.
        name: String,
        /// What it is.
        spec: String,
        /// 512 or 4096.
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
    },
    /// List devices with their user and health.
    List,
    /// Detach a device that no volume uses.
    Detach {
        /// Its name.
        name: String,
    },
    /// Grow a ram, null or file device; a single volume over it grows
    /// too, and its exports tell their VMs the new capacity.
    ///
    /// Example: applctl device resize d0 20G
    Resize {
        /// Its name.
        name: String,
        /// The new size: bytes, or with K, M, G or T.
        #[arg(value_parser = parse_bytes)]
        size: u64,
    },
}

/// `4096`, `64K`, `256M`, `2G`, `1T`.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        Some('T' | 't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is not a size (examples: 4096, 64K, 256M, 2G)"))
}

#[derive(Subcommand)]
enum ExportCmd {
    /// Export a volume over vhost-user-blk.
    ///
    /// Example: applctl export create vm1 --volume vol0 --socket /run/appliance/vm1.sock
    Create {
        /// Its name.
        name: String,
        /// The volume.
        #[arg(long)]
        volume: String,
        /// The vhost-user unix socket (absolute).
        #[arg(long)]
        socket: String,
        /// Virtqueues.
        #[arg(long, default_value_t = 1)]
        num_queues: u32,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Serial the guest sees (default: the volume's name).
        #[arg(long, default_value = "")]
        serial: String,
        /// The reactor that polls each queue, comma-separated, repeated
        /// cyclically (default: queue i on reactor i).
        #[arg(long, value_delimiter = ',')]
        queue_cores: Vec<u32>,
        /// Guest memory the VM may map (and pin for DMA), in MiB (default:
        /// the host's physical memory).
        #[arg(long, default_value_t = 0)]
        memory_limit_mib: u64,
        /// The socket's mode, octal (e.g. 0660; default: from the umask).
        #[arg(long, default_value = "")]
        socket_mode: String,
        /// The socket's owner, a user name or uid (default: the daemon's).
        #[arg(long, default_value = "")]
        socket_owner: String,
        /// The socket's group, a group name or gid (default: the daemon's).
        #[arg(long, default_value = "")]
        socket_group: String,
        /// Offer dirty logging so QEMU can live-migrate the VM
        /// (`--live-migration=false` refuses migrations).
        #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
        live_migration: bool,
    },
    /// List exports.
    List,
    /// Delete an export (refused while a VM is connected, unless --force).
    Delete {
        /// The export.
        name: String,
        /// Disconnect a connected VM.
        #[arg(long)]
        force: bool,
    },
    /// Move a queue to another reactor at runtime (its requests in flight
    /// drain; it goes on where it stopped).
    ///
    /// Example: applctl export move-queue vm1 --queue 1 --core 0
    MoveQueue {
        /// The export.
        name: String,
        /// The queue.
        #[arg(long)]
        queue: u32,
        /// The reactor.
        #[arg(long)]
        core: u32,
    },
}

/// A failure and the exit code it maps to.
struct Failure(u8, String);

impl From<Status> for Failure {
    fn from(s: Status) -> Failure {
        let code = match s.code() {
            Code::InvalidArgument => 2,
            Code::NotFound => 3,
            Code::AlreadyExists => 4,
            Code::FailedPrecondition => 5,
            // (Cancelled: --deadline gave up on the call.)
            Code::DeadlineExceeded | Code::Cancelled => 6,
            Code::Unavailable => 7,
            Code::Unauthenticated | Code::PermissionDenied => 8,
            Code::ResourceExhausted => 9,
            _ => 1,
        };
        Failure(code, format!("{:?}: {}", s.code(), s.message()))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let deadline = cli.deadline;
    let done = rt.block_on(run(cli)).map_err(|Failure(code, msg)| {
        // Cancelled is --deadline giving up on a call; without one, it is
        // nothing of ours to name.
        match (code, msg.starts_with("Cancelled"), deadline) {
            (6, true, Some(secs)) => {
                Failure(6, format!("{msg} (no answer within {secs} s: --deadline)"))
            }
            (6, true, None) => Failure(1, msg),
            _ => Failure(code, msg),
        }
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}

type Client = mgmt::client::Client;

async fn connect(cli: &Cli) -> Result<Client, Failure> {
    // Not allowed on the socket is not authorised, not unreachable.
    let deadline = cli.deadline.map(std::time::Duration::from_secs);
    let unreachable = |e: mgmt::client::ConnectError| match e.io_kind() {
        Some(std::io::ErrorKind::PermissionDenied) => Failure(8, e.to_string()),
        _ => Failure(7, e.to_string()),
    };
    if !cli.api.starts_with("https://") {
        if cli.api.starts_with("http://") {
            return Err(Failure(2, "--api: TCP needs TLS: use https://".into()));
        }
        return mgmt::client::connect_within(std::path::Path::new(&cli.api), deadline)
            .await
            .map_err(unreachable);
    }
    let ca_path = cli
        .ca
        .as_ref()
        .ok_or_else(|| Failure(2, "--ca is required with an https:// API".into()))?;
    let ca = std::fs::read(ca_path)
        .map_err(|e| Failure(2, format!("--ca {}: {e}", ca_path.display())))?;
    let token = match (&cli.token_file, std::env::var("APPLCTL_TOKEN")) {
        (Some(f), _) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| Failure(2, format!("--token-file {}: {e}", f.display())))?
                .trim()
                .to_string(),
        ),
        (None, Ok(t)) => Some(t),
        (None, Err(_)) => None,
    };
    mgmt::client::connect_tls_within(&cli.api, &ca, &cli.tls_domain, token.as_deref(), deadline)
        .await
        .map_err(unreachable)
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // What needs no daemon.
    match &cli.command {
        Command::Completions { shell } => {
            use std::io::Write;
            let script = values::completions(&mut Cli::command(), *shell);
            // A closed pipe (`| head`) is not an error worth a message.
            let _ = std::io::stdout().write_all(&script);
            return Ok(());
        }
        Command::Man { dir } => {
            return clap_mangen::generate_to(Cli::command(), dir)
                .map_err(|e| Failure(1, format!("writing man pages to {}: {e}", dir.display())));
        }
        _ => {}
    }
    let mut c = connect(&cli).await?;
    let json = cli.json;
    match cli.command {
        Command::Version => {
            let v = c.get_version(pb::GetVersionRequest {}).await?.into_inner();
            out(json, &v, || {
                format!("appliance {} (API {})\n", v.version, v.api)
            })
        }
        Command::Health => {
            let h = c.health(pb::HealthRequest {}).await?.into_inner();
            out(json, &h, || {
                let mut s = format!("{} ({} reactors)\n", h.status().label(), h.reactors);
                for p in &h.problems {
                    s += &format!("  {p}\n");
                }
                s
            })?;
            // `applctl health || alert` must fire on a degraded daemon.
            if h.status() != pb::HealthStatus::Degraded {
                Ok(())
            } else {
                Err(Failure(10, format!("{} problem(s)", h.problems.len())))
            }
        }
        Command::Stats {
            watch: Some(secs),
            count,
        } => stats::watch(&mut c, json, secs, count).await,
        Command::Stats { watch: None, .. } => stats::totals(&mut c, json).await,
        // Handled above, before connecting.
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
        Command::Device(cmd) => device(&mut c, json, cmd).await,
        Command::Volume(cmd) => volume(&mut c, json, cmd).await,
        Command::Export(cmd) => export(&mut c, json, cmd).await,
        Command::Nvmf(cmd) => nvmf::nvmf(&mut c, json, cmd).await,
        Command::Reload => {
            let r = c.reload(pb::ReloadRequest {}).await?.into_inner();
            out(json, &r, || {
                let mut s = String::new();
                for a in &r.applied {
                    s += &format!("applied: {a}\n");
                }
                for a in &r.refused {
                    s += &format!("refused: {a}\n");
                }
                if s.is_empty() {
                    s = "nothing to change\n".into();
                }
                s
            })?;
            if r.refused.is_empty() {
                Ok(())
            } else {
                Err(Failure(5, format!("{} change(s) refused", r.refused.len())))
            }
        }
    }
}

async fn device(c: &mut Client, json: bool, cmd: DeviceCmd) -> Result<(), Failure> {
    match cmd {
        DeviceCmd::Attach {
            name,
            spec,
            block_size,
        } => {
            let d = c
                .attach_device(pb::AttachDeviceRequest {
                    name,
                    spec,
                    block_size,
                })
                .await?
                .into_inner();
            out(json, &d, || devices(std::slice::from_ref(&d)))
        }
        DeviceCmd::List => {
            let l = c
                .list_devices(pb::ListDevicesRequest {})
                .await?
                .into_inner();
            out(json, &l, || devices(&l.devices))
        }
        DeviceCmd::Resize { name, size } => {
            let r = c
                .resize_device(pb::ResizeDeviceRequest {
                    name,
                    size_bytes: size,
                })
                .await?
                .into_inner();
            let d = r.device.clone().unwrap_or_default();
            out(json, &r, || {
                let told = if r.notified_exports.is_empty() {
                    "no connected VM was told".to_string()
                } else {
                    format!("told the VMs of {}", r.notified_exports.join(", "))
                };
                format!("{}{told}\n", devices(std::slice::from_ref(&d)))
            })
        }
        DeviceCmd::Detach { name } => {
            c.detach_device(pb::DetachDeviceRequest { name: name.clone() })
                .await?;
            out(json, &serde_json::json!({"detached": name}), || {
                format!("detached {name}\n")
            })
        }
    }
}

async fn export(c: &mut Client, json: bool, cmd: ExportCmd) -> Result<(), Failure> {
    match cmd {
        ExportCmd::Create {
            name,
            volume,
            socket,
            num_queues,
            read_only,
            serial,
            queue_cores,
            memory_limit_mib,
            socket_mode,
            socket_owner,
            socket_group,
            live_migration,
        } => {
            let e = c
                .create_export(pb::CreateExportRequest {
                    name,
                    volume,
                    socket,
                    num_queues,
                    read_only,
                    serial,
                    queue_cores,
                    memory_limit_mib,
                    socket_mode,
                    socket_owner,
                    socket_group,
                    live_migration: Some(live_migration),
                })
                .await?
                .into_inner();
            out(json, &e, || exports(std::slice::from_ref(&e)))
        }
        ExportCmd::List => {
            let l = c
                .list_exports(pb::ListExportsRequest {})
                .await?
                .into_inner();
            out(json, &l, || exports(&l.exports))
        }
        ExportCmd::MoveQueue { name, queue, core } => {
            let e = c
                .move_queue(pb::MoveQueueRequest {
                    export: name,
                    queue,
                    core,
                })
                .await?
                .into_inner();
            out(json, &e, || exports(std::slice::from_ref(&e)))
        }
        ExportCmd::Delete { name, force } => {
            c.delete_export(pb::DeleteExportRequest {
                name: name.clone(),
                force,
            })
            .await?;
            out(json, &serde_json::json!({"deleted": name}), || {
                format!("deleted {name}\n")
            })
        }
    }
}

fn out<T: serde::Serialize>(
    json: bool,
    v: &T,
    text: impl FnOnce() -> String,
) -> Result<(), Failure> {
    let text = if json {
        serde_json::to_string_pretty(v).map_err(|e| Failure(1, e.to_string()))? + "\n"
    } else {
        text()
    };
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        // The reader went away (`applctl ... | head -1`): what it read
        // is what it wanted; print! panicked here (exit 101).
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure(1, format!("writing the output: {e}"))),
        Ok(()) => Ok(()),
    }
}
