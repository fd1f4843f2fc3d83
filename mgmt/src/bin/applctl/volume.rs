//! `applctl volume ...`: the volume subcommands and what each calls.

use clap::{Args, Subcommand};
use mgmt::pb;

use super::show::{self, describe, volumes};
use super::{out, qos, values, wait, Client, Failure};

#[derive(Args)]
pub struct MemberArgs {
    /// The volume.
    volume: String,
    /// The device.
    device: String,
}

#[derive(Subcommand)]
pub enum VolumeCmd {
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
    /// Add a hot spare. A device that holds another volume's superblock,
    /// md's metadata or a journal is refused unless --force.
    AddSpare {
        #[command(flatten)]
        member: MemberArgs,
        /// Overwrite what the device holds.
        #[arg(long)]
        force: bool,
    },
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
        /// Overwrite another volume's superblock, md's metadata or a
        /// journal on the replacement.
        #[arg(long)]
        force: bool,
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
        /// Overwrite a device that holds a volume's superblock or a
        /// journal (perhaps of a stopped volume).
        #[arg(long)]
        force: bool,
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

pub async fn volume(c: &mut Client, json: bool, cmd: VolumeCmd) -> Result<(), Failure> {
    let member = |m: MemberArgs| pb::MemberRequest {
        volume: m.volume,
        device: m.device,
        force: false,
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
        VolumeCmd::AddSpare { member: m, force } => {
            c.add_spare(pb::MemberRequest { force, ..member(m) })
                .await?
        }
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
            force,
        } => {
            c.replace_member(pb::ReplaceMemberRequest {
                volume: name,
                device,
                replacement,
                force,
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
        VolumeCmd::AddJournal {
            name,
            device,
            mode,
            force,
        } => {
            c.add_journal(pb::AddJournalRequest {
                volume: name,
                device,
                mode: mode.map_or(0, |m| m.pb() as i32),
                force,
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
