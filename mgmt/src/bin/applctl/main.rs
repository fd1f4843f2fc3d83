//! `applctl`: the operator's command line over the appliance's gRPC API.
//!
//! Exit codes: 0 done; 1 internal error or failed background work;
//! 2 bad arguments; 3 not found; 4 already exists; 5 refused in this state
//! (failed precondition); 6 deadline exceeded; 7 daemon unreachable;
//! 8 not authorised; 9 not enough of a resource (memory for a RAM device).

mod qos;
mod show;
mod stats;
mod values;
mod wait;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use mgmt::pb;
use show::{describe, devices, exports, table, volumes};
use tonic::{Code, Status};

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
7 daemon unreachable, 8 not authorised, 9 resource exhausted.

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

#[derive(Args)]
struct MemberArgs {
    /// The volume.
    volume: String,
    /// The device.
    device: String,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume.
    ///
    /// Example: applctl volume create vol0 --level raid5 --members d0,d1,d2 --spares d3
    Create {
        /// Its name.
        name: String,
        /// The RAID level.
        #[arg(long, value_enum)]
        level: values::Level,
        /// Member devices in slot order.
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<String>,
        /// Hot spares.
        #[arg(long, value_delimiter = ',')]
        spares: Vec<String>,
        /// RAID5 chunk in KiB.
        #[arg(long, default_value_t = 64)]
        chunk_kib: u32,
        /// RAID5 layout (md's).
        #[arg(long, value_enum, default_value_t = values::Layout::LeftSymmetric)]
        layout: values::Layout,
        /// Overwrite devices that carry another volume's superblock.
        #[arg(long)]
        force: bool,
        /// RAID5 write journal device (closes the write hole).
        #[arg(long, default_value = "")]
        journal: String,
        /// Journal mode: write-through (the default), or write-back
        /// (acknowledged once durable in the journal; much faster small
        /// writes).
        #[arg(long, value_enum)]
        journal_mode: Option<values::JournalMode>,
        /// Keep a write-intent bitmap (RAID1, RAID5 without a journal):
        /// after a crash only recently written regions are resynchronised.
        #[arg(long)]
        bitmap: bool,
        /// Bitmap region per member in KiB (default 65536, i.e. 64 MiB).
        #[arg(long, default_value_t = 0)]
        bitmap_chunk_kib: u32,
        #[command(flatten)]
        qos: qos::QosArgs,
    },
    /// List volumes.
    List,
    /// Take over an md array (md 1.2 superblocks, RAID1 or RAID5): its
    /// devices, members and spares in any order. md can assemble them
    /// again after `volume delete`.
    ///
    /// Example: applctl volume import data --devices sda,sdb,sdc
    Import {
        /// The volume's name.
        name: String,
        /// The array's attached devices.
        #[arg(long, value_delimiter = ',', required = true)]
        devices: Vec<String>,
    },
    /// What a device's RAID metadata says, like mdadm --examine: md's
    /// superblock and bitmap, or the appliance's own.
    ///
    /// Example: applctl volume examine d0
    Examine {
        /// The device (attached, in use or not).
        device: String,
    },
    /// Describe a volume: members, spares, rebuild or scrub progress.
    Show {
        /// The volume.
        name: String,
    },
    /// Stop a volume (its superblocks are kept).
    Delete {
        /// The volume.
        name: String,
    },
    /// Mark a member failed; a spare takes its place.
    Fail(MemberArgs),
    /// Add a hot spare.
    AddSpare(MemberArgs),
    /// Remove an unused hot spare.
    RemoveSpare(MemberArgs),
    /// Take a device out of a volume (md's --fail --remove): a spare is
    /// removed, a member failed (refused if data would be lost) and its
    /// device freed.
    ///
    /// Example: applctl volume remove vol0 d1 && applctl device detach d1
    Remove(MemberArgs),
    /// Check parity or mirrors (with --repair, fix them).
    Scrub {
        /// The volume.
        name: String,
        /// Rewrite mismatches.
        #[arg(long)]
        repair: bool,
    },
    /// Stop a running scrub.
    StopScrub {
        /// The volume.
        name: String,
    },
    /// Set a volume's IO limits online (SPDK's bdev_set_qos_limit, cgroup
    /// io.max): IOPS and MiB/s for reads, writes and both; the flags not
    /// given are unlimited.
    ///
    /// Example: applctl volume qos vol0 --max-iops 5000 --max-write-mibps 200   (--none to clear)
    Qos {
        /// The volume.
        name: String,
        #[command(flatten)]
        limits: qos::QosArgs,
        /// Take every limit away.
        #[arg(long, conflicts_with_all = ["max_iops", "max_read_iops", "max_write_iops", "max_mibps", "max_read_mibps", "max_write_mibps"])]
        none: bool,
    },
    /// Limit rebuilds and scrubs, the running one included, in MiB/s (0:
    /// no limit); with --min, they slow down to that while guest IO runs
    /// (md's sync_speed_max and sync_speed_min).
    ///
    /// Example: applctl volume rate vol0 200 --min 10
    Rate {
        /// The volume.
        name: String,
        /// MiB per second at most.
        mib_per_sec: u64,
        /// MiB per second while the volume serves guest IO (0: no yielding).
        #[arg(long, default_value_t = 0)]
        min: u64,
    },
    /// Mark a RAID1 member write-mostly: it gets every write but is read
    /// only when no other in-sync member can serve (a slow or remote mirror).
    ///
    /// Example: applctl volume write-mostly mirror0 slowdisk      (--off to clear)
    WriteMostly {
        /// The volume.
        name: String,
        /// The member device.
        device: String,
        /// Clear the mark instead.
        #[arg(long)]
        off: bool,
    },
    /// Replace an in-sync member without going degraded (md's --replace):
    /// the new device is written along and the member copied to it, then
    /// it takes the slot. `volume wait --progress` follows the copy.
    ///
    /// Example: applctl volume replace vol0 d1 d9
    Replace {
        /// The volume.
        name: String,
        /// The member to replace.
        device: String,
        /// The device that takes its place.
        replacement: String,
    },
    /// md's write-behind for a RAID1 (--off to clear): writes are
    /// acknowledged before the write-mostly members have them, at most
    /// MAX_WRITES at once in the background. Needs the bitmap.
    ///
    /// Example: applctl volume write-behind mirror0 256
    WriteBehind {
        /// The volume.
        name: String,
        /// Most writes in the background at once (1..=16383).
        #[arg(default_value_t = 256)]
        max_writes: u32,
        /// Turn it off (waits for the writes in the background).
        #[arg(long)]
        off: bool,
    },
    /// md's serialize_policy for a RAID1 (--off to clear): overlapping
    /// writes reach the mirrors one after the other, so they never differ.
    ///
    /// Example: applctl volume serialize mirror0
    Serialize {
        /// The volume.
        name: String,
        /// Turn it off.
        #[arg(long)]
        off: bool,
    },
    /// Hold writes to a byte range (md's suspend_lo/hi): when it returns,
    /// none is in flight and new ones wait until resume-range. Reads go on.
    ///
    /// Example: applctl volume suspend-range vol0 --lo 1048576 --hi 2097152
    SuspendRange {
        /// The volume.
        name: String,
        /// First byte held (block-aligned).
        #[arg(long)]
        lo: u64,
        /// The byte after the last one held (block-aligned).
        #[arg(long)]
        hi: u64,
    },
    /// Let the writes held by suspend-range go.
    ResumeRange {
        /// The volume.
        name: String,
    },
    /// Suspend a volume as a whole (dm's suspend): when it returns, no IO
    /// of it is in flight and new IO waits until resume.
    ///
    /// Example: applctl volume suspend vol0 && snapshot-the-disks && applctl volume resume vol0
    Suspend {
        /// The volume.
        name: String,
    },
    /// Resume a volume suspend held.
    Resume {
        /// The volume.
        name: String,
    },
    /// Change a two-member volume's level online (md's takeover): a RAID1
    /// of two becomes a RAID5 of two, or back; nothing on the members moves.
    ///
    /// Example: applctl volume takeover mirror0 --level raid5 --chunk-kib 64
    Takeover {
        /// The volume.
        name: String,
        /// The level to take it over to.
        #[arg(long, value_enum)]
        level: values::TakeoverLevel,
        /// RAID5 chunk in KiB.
        #[arg(long, default_value_t = 64)]
        chunk_kib: u32,
    },
    /// Add a write-intent bitmap online (md's --grow --bitmap=internal), or
    /// remove it with --off: after a crash only the regions it marks are
    /// resynchronised instead of the whole volume.
    ///
    /// Example: applctl volume bitmap vol0 --chunk-kib 131072      (--off to remove)
    Bitmap {
        /// The volume.
        name: String,
        /// Remove the bitmap instead.
        #[arg(long)]
        off: bool,
        /// Region per member in KiB (default 65536, i.e. 64 MiB).
        #[arg(long, default_value_t = 0)]
        chunk_kib: u32,
    },
    /// Give a RAID5 volume a write journal online (the device is formatted).
    ///
    /// Example: applctl volume add-journal vol0 nvlog --mode write-back
    AddJournal {
        /// The volume.
        name: String,
        /// The journal device.
        device: String,
        /// The journal's mode (write-through by default).
        #[arg(long, value_enum)]
        mode: Option<values::JournalMode>,
    },
    /// Take a RAID5 volume's journal away online (a write-back cache drains
    /// to the members first).
    RemoveJournal {
        /// The volume.
        name: String,
    },
    /// Switch the journal between write-through and write-back, online
    /// (to write-through, the cache drains to the members first).
    JournalMode {
        /// The volume.
        name: String,
        /// The new mode.
        #[arg(value_enum)]
        mode: values::JournalMode,
    },
    /// Wait until the volume's rebuild or scrub ends.
    ///
    /// Example: applctl volume wait vol0 --progress
    Wait {
        /// The volume.
        name: String,
        /// Show a progress bar.
        #[arg(long)]
        progress: bool,
        /// Give up after this many seconds (exit 6).
        #[arg(long)]
        timeout: Option<f64>,
    },
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
        /// Serial the guest sees (default: the export's name).
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
        /// (experimental).
        #[arg(long)]
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
            Code::DeadlineExceeded => 6,
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
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}

type Client = mgmt::client::Client;

async fn connect(cli: &Cli) -> Result<Client, Failure> {
    let unreachable = |e: mgmt::client::ConnectError| Failure(7, e.to_string());
    if !cli.api.starts_with("https://") {
        if cli.api.starts_with("http://") {
            return Err(Failure(2, "--api: TCP needs TLS: use https://".into()));
        }
        return mgmt::client::connect(std::path::Path::new(&cli.api))
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
    mgmt::client::connect_tls(&cli.api, &ca, &cli.tls_domain, token.as_deref())
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
            })
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

async fn volume(c: &mut Client, json: bool, cmd: VolumeCmd) -> Result<(), Failure> {
    let member = |m: MemberArgs| pb::MemberRequest {
        volume: m.volume,
        device: m.device,
    };
    let v = match cmd {
        VolumeCmd::Create {
            name,
            level,
            members,
            spares,
            chunk_kib,
            layout,
            force,
            journal,
            journal_mode,
            bitmap,
            bitmap_chunk_kib,
            qos,
        } => {
            c.create_volume(pb::CreateVolumeRequest {
                qos: qos.any().then(|| qos.to_pb()),
                name,
                level: level.pb() as i32,
                members,
                spares,
                chunk_kib,
                layout: layout.pb() as i32,
                force,
                journal,
                journal_mode: journal_mode.map_or(0, |m| m.pb() as i32),
                bitmap,
                bitmap_chunk_kib,
            })
            .await?
        }
        VolumeCmd::List => {
            let l = c
                .list_volumes(pb::ListVolumesRequest {})
                .await?
                .into_inner();
            return out(json, &l, || volumes(&l.volumes));
        }
        VolumeCmd::Import { name, devices } => {
            c.import_volume(pb::ImportVolumeRequest { name, devices })
                .await?
        }
        VolumeCmd::Examine { device } => {
            let e = c
                .examine_device(pb::ExamineDeviceRequest {
                    name: device.clone(),
                })
                .await?
                .into_inner();
            return out(json, &e, || show::examined(&device, &e));
        }
        VolumeCmd::Show { name } => c.get_volume(pb::GetVolumeRequest { name }).await?,
        VolumeCmd::Delete { name } => {
            c.delete_volume(pb::DeleteVolumeRequest { name: name.clone() })
                .await?;
            return out(json, &serde_json::json!({"deleted": name}), || {
                format!("deleted {name}\n")
            });
        }
        VolumeCmd::Fail(m) => c.fail_member(member(m)).await?,
        VolumeCmd::AddSpare(m) => c.add_spare(member(m)).await?,
        VolumeCmd::RemoveSpare(m) => c.remove_spare(member(m)).await?,
        VolumeCmd::Remove(m) => c.remove_member(member(m)).await?,
        VolumeCmd::Scrub { name, repair } => {
            c.start_scrub(pb::StartScrubRequest {
                volume: name,
                repair,
            })
            .await?
        }
        VolumeCmd::StopScrub { name } => {
            c.stop_background_work(pb::GetVolumeRequest { name })
                .await?
        }
        VolumeCmd::Qos { name, limits, none } => {
            if !none && !limits.any() {
                return Err(Failure(
                    2,
                    "give at least one --max-* limit, or --none to take them all away".into(),
                ));
            }
            c.set_volume_qos(pb::SetVolumeQosRequest {
                volume: name,
                limits: Some(limits.to_pb()),
            })
            .await?
        }
        VolumeCmd::Rate {
            name,
            mib_per_sec,
            min,
        } => {
            c.set_rebuild_rate(pb::SetRebuildRateRequest {
                volume: name,
                max_bytes_per_sec: mib_per_sec.saturating_mul(1 << 20),
                min_bytes_per_sec: min.saturating_mul(1 << 20),
            })
            .await?
        }
        VolumeCmd::WriteMostly { name, device, off } => {
            c.set_write_mostly(pb::SetWriteMostlyRequest {
                volume: name,
                device,
                enabled: !off,
            })
            .await?
        }
        VolumeCmd::Replace {
            name,
            device,
            replacement,
        } => {
            c.replace_member(pb::ReplaceMemberRequest {
                volume: name,
                device,
                replacement,
            })
            .await?
        }
        VolumeCmd::WriteBehind {
            name,
            max_writes,
            off,
        } => {
            c.set_write_behind(pb::SetWriteBehindRequest {
                volume: name,
                max_writes: if off { 0 } else { max_writes },
            })
            .await?
        }
        VolumeCmd::Serialize { name, off } => {
            c.set_serialize_policy(pb::SetSerializePolicyRequest {
                volume: name,
                enabled: !off,
            })
            .await?
        }
        VolumeCmd::SuspendRange { name, lo, hi } => {
            c.suspend_range(pb::SuspendRangeRequest {
                volume: name,
                lo_bytes: lo,
                hi_bytes: hi,
            })
            .await?
        }
        VolumeCmd::ResumeRange { name } => {
            c.resume_range(pb::ResumeRangeRequest { volume: name })
                .await?
        }
        VolumeCmd::Suspend { name } => c.suspend_volume(pb::GetVolumeRequest { name }).await?,
        VolumeCmd::Resume { name } => c.resume_volume(pb::GetVolumeRequest { name }).await?,
        VolumeCmd::Takeover {
            name,
            level,
            chunk_kib,
        } => {
            c.takeover(pb::TakeoverRequest {
                volume: name,
                level: level.pb() as i32,
                chunk_kib,
            })
            .await?
        }
        VolumeCmd::Bitmap {
            name,
            off,
            chunk_kib,
        } => {
            c.set_bitmap(pb::SetBitmapRequest {
                volume: name,
                enabled: !off,
                chunk_kib,
            })
            .await?
        }
        VolumeCmd::AddJournal { name, device, mode } => {
            c.add_journal(pb::AddJournalRequest {
                volume: name,
                device,
                mode: mode.map_or(0, |m| m.pb() as i32),
            })
            .await?
        }
        VolumeCmd::RemoveJournal { name } => {
            c.remove_journal(pb::RemoveJournalRequest { volume: name })
                .await?
        }
        VolumeCmd::JournalMode { name, mode } => {
            c.set_journal_mode(pb::SetJournalModeRequest {
                volume: name,
                mode: mode.pb() as i32,
            })
            .await?
        }
        VolumeCmd::Wait {
            name,
            progress,
            timeout,
        } => return wait::wait(c, json, name, progress, timeout).await,
    };
    let v = v.into_inner();
    out(json, &v, || describe(&v))
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
                    live_migration,
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
    if json {
        let s = serde_json::to_string_pretty(v).map_err(|e| Failure(1, e.to_string()))?;
        println!("{s}");
    } else {
        print!("{}", text());
    }
    Ok(())
}
