//! Assembling a RAID volume at a restart: its members' superblocks decide
//! what it is (members, states, rebuild checkpoint, bitmap, takeover), the
//! register says what each device is now, and the journal is replayed to
//! the members before any IO.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bdev::BlockDevice;

use super::volumes::Started;
use super::{invalid, Devices, Level, Manager, MgmtError};
use crate::config::VolumeDecl;
use crate::raid::assembly;
use crate::raid::journal::Journal;
use crate::raid::members::{FailureSink, MemberState, MissingDevice};
use crate::raid::monitor::Role;
use crate::raid::superblock::{Level as SbLevel, SuperblockError};
use crate::raid::RaidError;

impl Manager {
    /// Assemble a RAID volume from its claimed devices' superblocks; `None`
    /// if they are all blank and may be created on.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn assemble_volume(
        &self,
        decl: &VolumeDecl,
        level: Level,
        members: Devices,
        spares: Devices,
        jdev: Option<Arc<dyn BlockDevice>>,
        volatile: bool,
        initial: bool,
    ) -> Result<(VolumeDecl, Option<Started>), MgmtError> {
        let declared_spares: Vec<String> = spares.iter().map(|d| d.info().name.clone()).collect();
        let all: Vec<Arc<dyn BlockDevice>> = members.iter().chain(&spares).cloned().collect();
        let mut blank = Vec::new();
        let mut readable = Vec::new();
        // Declared spares with md's spare mark: of this array, or another's.
        let mut md_spares: Vec<Arc<dyn BlockDevice>> = Vec::new();
        // What is wrong with declared spares: said with the reason if the
        // volume does not start (review: hidden behind "no superblock").
        let mut of_spares: Vec<String> = Vec::new();
        for d in &all {
            let spare = declared_spares.contains(&d.info().name);
            match assembly::read_superblock(d.as_ref()) {
                Ok(Err(SuperblockError::Foreign)) => {
                    blank.push(d.clone());
                    readable.push(d.clone());
                }
                // md's spare (of an imported array) is a spare here too:
                // spares carry no superblock of their own. Its mark must
                // name this array, though (see the spares below).
                Ok(Err(SuperblockError::MdSpare { .. })) if spare => {
                    blank.push(d.clone());
                    readable.push(d.clone());
                    md_spares.push(d.clone());
                }
                // A spare is not needed to start: one whose metadata
                // cannot be used (damaged, md's of another version, not
                // fitting its device) is left out, untouched, instead of
                // refusing the volume (and with it the daemon's start).
                Ok(Err(e)) if spare => {
                    tracing::warn!(volume = decl.name, device = %d.info().name, error = %e, "a declared spare's superblock cannot be used; left out");
                    of_spares.push(format!("{}: {e}", d.info().name));
                }
                Ok(Ok(sb)) if spare && assembly::fits_device(d.as_ref(), &sb).is_err() => {
                    tracing::warn!(volume = decl.name, device = %d.info().name, "a declared spare's superblock does not fit its device; left out");
                    of_spares.push(format!(
                        "{}: its superblock does not fit the device",
                        d.info().name
                    ));
                }
                Ok(_) => readable.push(d.clone()),
                // A dead device is a missing member: assembly decides
                // whether the volume can start without it.
                Err(e) => {
                    tracing::warn!(volume = decl.name, device = %d.info().name, error = %e, "device unreadable; left out")
                }
            }
        }
        let all = readable;
        // Only RAM-like devices come back blank on their own; a blank file
        // or disk may be a wrong path or a replaced disk: never create a
        // volume over it unasked.
        if !all.is_empty() && blank.len() == all.len() && !volatile && !initial {
            return Err(MgmtError::FailedPrecondition(format!(
                "no superblock of volume {} on its devices; refusing to create it over them (create it again by hand, with force, if that is intended){}",
                decl.name,
                if of_spares.is_empty() {
                    String::new()
                } else {
                    format!("; declared spares: {}", of_spares.join("; "))
                }
            )));
        }
        if !all.is_empty() && blank.len() == all.len() {
            // The caller creates it. Its devices stay claimed by its name
            // meanwhile (the creation claims them again in the same roles):
            // let go, another call could take them first.
            return Ok((decl.clone(), None));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = FailureSink::new(tx);
        let ours: Vec<Arc<dyn BlockDevice>> = all
            .iter()
            .filter(|d| !blank.iter().any(|b| Arc::ptr_eq(b, d)))
            .cloned()
            .collect();
        let mut report = assembly::assemble(&ours, move |_| sink.clone());
        // A declared device that holds another volume's superblock (a
        // spare whose erase a crash interrupted) is left out, not a
        // reason to refuse this one.
        // (A problem names a device, or a volume as a whole.)
        let devices: Vec<String> = ours.iter().map(|d| d.info().name.clone()).collect();
        report.problems.retain(|(what, why)| {
            // A volume's own problem is named as its superblocks name it
            // (md's array name, for one imported under another name).
            let other =
                *what != decl.name && *what != decl.array_name() && !devices.contains(what);
            if other {
                tracing::warn!(volume = decl.name, other = %what, reason = %why, "a device of another volume left out");
            }
            // A declared spare holds nothing the volume needs: one named
            // here is only said (it is not taken as a spare unless its
            // superblock is this volume's, see below).
            let spare = declared_spares.contains(what);
            if spare {
                tracing::warn!(volume = decl.name, spare = %what, reason = %why, "a declared spare's superblock says something is wrong");
                of_spares.push(format!("{what}: {why}"));
            }
            !other && !spare
        });
        let list: Vec<String> = report
            .problems
            .iter()
            .map(|(d, why)| format!("{d}: {why}"))
            .collect();
        // A problem of one of its devices refuses the volume even when the
        // others would start it: a member whose superblock cannot be used
        // (a checksum that fails, a data area past its device) may be the
        // one with the newest state, which the others' superblocks cannot
        // tell (review: started without it, a stale member's data was
        // served), and members that each ran without the other hold
        // different writes. The operator chooses, as with md's --run.
        let mine: Vec<&String> = report
            .problems
            .iter()
            .filter(|(what, _)| devices.contains(what))
            .map(|(what, _)| what)
            .collect();
        if !mine.is_empty() {
            let names: Vec<&str> = mine.iter().map(|s| s.as_str()).collect();
            return Err(MgmtError::FailedPrecondition(format!(
                "refusing to assemble: {} (to start without {}, name only the other devices in the volume's declaration and reload)",
                list.join("; "),
                names.join(", ")
            )));
        }
        // The state file's UUID pins the volume: another of the same name
        // among the devices (disks moved in, an md array) is never it.
        let Some(i) = report.volumes.iter().position(|v| {
            if decl.uuid.is_empty() {
                v.meta.template.name == decl.array_name()
            } else {
                super::hex(&v.meta.template.volume_uuid).eq_ignore_ascii_case(&decl.uuid)
            }
        }) else {
            let why = if !list.is_empty() {
                format!("refusing to assemble: {}", list.join("; "))
            } else if decl.uuid.is_empty() {
                format!(
                    "no superblock of volume {} (array {:?}) on its devices",
                    decl.name,
                    decl.array_name()
                )
            } else {
                format!(
                    "no superblock of volume {} (UUID {}) on its devices",
                    decl.name, decl.uuid
                )
            };
            return Err(MgmtError::FailedPrecondition(if of_spares.is_empty() {
                why
            } else {
                format!("{why}; declared spares: {}", of_spares.join("; "))
            }));
        };
        // What is left is another group's of the same name (disks moved
        // in): not this volume's, whose UUID the state file pins (it
        // refused this one with a misleading reason). Without a UUID (an
        // older state file, a first `--config`) the name chose the group,
        // and a problem of that name may be this volume's own: refused.
        if !list.is_empty() && decl.uuid.is_empty() {
            return Err(MgmtError::FailedPrecondition(format!(
                "refusing to assemble: {}",
                list.join("; ")
            )));
        }
        if !list.is_empty() {
            tracing::warn!(volume = decl.name, problems = %list.join("; "), "another volume of this name on its devices: left out");
        }
        let mut v = report.volumes.remove(i);
        // The superblocks say what the volume is: a takeover or bitmap
        // change recorded there just before a crash may not have reached
        // the state file.
        let sb = &v.meta.template;
        let sb_level = if sb.level == SbLevel::Raid5 {
            Level::Raid5
        } else {
            Level::Raid1
        };
        if sb_level != level {
            tracing::warn!(
                volume = decl.name,
                state_file = level.name(),
                superblocks = sb_level.name(),
                "the superblocks' level wins"
            );
        }
        let mut fixed = decl.clone();
        fixed.level = sb_level.name().to_string();
        if sb_level == Level::Raid5 {
            fixed.chunk_kib = sb.chunk_bytes / 1024;
            fixed.layout = sb.layout.name().to_string();
        }
        fixed.bitmap = sb.bitmap_rows_per_bit > 0;
        if !v.stale.is_empty() {
            tracing::warn!(volume = decl.name, stale = ?v.stale, "stale members left out");
        }
        let in_volume: Vec<String> = v
            .device
            .member_devices()
            .iter()
            .filter(|d| !MissingDevice::is(d.as_ref()))
            .map(|d| d.info().name.clone())
            .collect();
        // Blank devices are spares again; so are declared spares the
        // volume does not use that carry this volume's old superblock (a
        // member that failed and was added back as a spare keeps its
        // stale one until it is rebuilt). One that carries another
        // volume's, or md's metadata of another array (the disk was used
        // elsewhere while the daemon was down), is left out: as a spare it
        // would be written over at the next clean stop, and rebuilt over.
        let uuid = v.meta.template.volume_uuid;
        let spares: Vec<Arc<dyn BlockDevice>> = all
            .iter()
            .filter(|d| !in_volume.contains(&d.info().name))
            .filter(|d| {
                let marked = md_spares.iter().any(|b| Arc::ptr_eq(b, d));
                (blank.iter().any(|b| Arc::ptr_eq(b, d)) && !marked)
                    || (declared_spares.contains(&d.info().name)
                        && match assembly::foreign_holder(d.as_ref(), Some(uuid)) {
                            None => true,
                            Some(what) => {
                                tracing::warn!(volume = decl.name, device = %d.info().name, holds = what, "a declared spare holds what is not this volume's: left out");
                                false
                            }
                        })
            })
            .cloned()
            .collect();
        // The register says what each device is now.
        for d in &all {
            let name = d.info().name.clone();
            if in_volume.contains(&name) {
                self.shared.roles.set(&name, &decl.name, Some(Role::Member));
            } else if spares.iter().any(|s| Arc::ptr_eq(s, d)) {
                self.shared.roles.set(&name, &decl.name, Some(Role::Spare));
            } else {
                self.shared.roles.set(&name, &decl.name, None);
            }
        }
        // Before any IO: the journal's durable records go to the members,
        // so no stripe is left half written.
        let device = match jdev {
            Some(jdev) => {
                // The journal the state file pins: another volume's (a
                // device renamed or renumbered under this name) would be
                // replayed over these members, and its own volume would
                // lose what only it holds.
                // (One that cannot be read is the replay's to refuse,
                // naming the way out.)
                let pinned = (!decl.journal_id.is_empty())
                    .then(|| crate::raid::journal::journal_id(jdev.as_ref()).ok())
                    .flatten();
                if let Some(id) = pinned {
                    if !id.eq_ignore_ascii_case(&decl.journal_id) {
                        return Err(MgmtError::FailedPrecondition(format!(
                            "volume {}: journal device {} holds journal {id}, not this volume's ({}): refusing to replay another volume's journal (name the right device in the state file, or start with --drop-journal {} to go on without it)",
                            decl.name,
                            jdev.info().name,
                            decl.journal_id,
                            decl.name
                        )));
                    }
                }

                // The superblocks' level wins over the declaration's: a
                // volume they call a mirror has no parity geometry to keep
                // the log's records inside its data area, and none of them
                // may be replayed over its superblocks or bitmap.
                let Some(geo) = v.device.parity_geometry() else {
                    return Err(MgmtError::FailedPrecondition(format!(
                        "volume {}: its members' superblocks say {:?}, and only a RAID5 volume has a journal; refusing to replay {} over it",
                        decl.name,
                        v.meta.template.level,
                        jdev.info().name
                    )));
                };
                // Only members in sync take part: a member being rebuilt
                // holds stale data past its cursor, and a replay that read
                // it for parity, or wrote data only to it, would leave the
                // rebuild to reconstruct an older write over the replayed
                // one (found by the chaos run: a restart during a rebuild
                // of a write-back volume). It is replayed around as a
                // missing member, and its rebuild starts over.
                let set = v.device.member_set();
                // The rebuild's start over is on disk before the replay's
                // checkpoint: a crash in between must not resume the
                // rebuild past rows the replay did not write.
                if let Some((_, cursor)) = &set.rebuilding {
                    if v.meta.template.rebuild_checkpoint > 0 || cursor.load(Ordering::SeqCst) > 0 {
                        v.meta.template.rebuild_checkpoint = 0;
                        v.meta.record(v.device.as_ref(), false).map_err(|e| {
                            MgmtError::Internal(format!(
                                "volume {}: recording the rebuild's start over: {e}",
                                decl.name
                            ))
                        })?;
                        cursor.store(0, Ordering::SeqCst);
                        tracing::info!(
                            volume = decl.name,
                            "the journal is replayed around the member being rebuilt: its rebuild starts over"
                        );
                    }
                }
                let slots: Vec<Option<Arc<dyn BlockDevice>>> = set
                    .members
                    .iter()
                    .map(|m| (m.state == MemberState::InSync).then(|| m.dev.clone()))
                    .collect();
                // A member that fails the replay is failed on disk first,
                // then replayed around; the monitor fails it in the running
                // volume when it starts.
                let meta = &mut v.meta;
                let device = v.device.as_ref();
                let (j, rep, _) = Journal::replay_around(jdev, &slots, &geo, |k| {
                    let mut codes: Vec<u8> = set.members.iter().map(|m| m.code()).collect();
                    codes[k] = MemberState::Failed.code();
                    meta.record_codes(device, codes, false).map_err(|e| {
                        RaidError::Invalid(format!("recording member {k} failed: {e}"))
                    })?;
                    set.failures
                        .report(k, &set.members[k], bdev::IoError::DeviceFailed);
                    // A member whose superblock could not take the record
                    // is gone too: two are more than the volume can lose
                    // (review).
                    if let Some((_, m)) = set
                        .members
                        .iter()
                        .enumerate()
                        .find(|(i, m)| *i != k && m.is_gone())
                    {
                        return Err(RaidError::Invalid(format!(
                            "member {} failed too, recording member {k} failed",
                            m.dev.info().name
                        )));
                    }
                    Ok(())
                })
                .map_err(|e| {
                    MgmtError::FailedPrecondition(format!(
                        "journal of volume {0}: {e}; refusing to start the volume without it (`appliance daemon --drop-journal {0}` starts it without the journal, losing write-back data only the journal held)",
                        decl.name
                    ))
                })?;
                tracing::info!(
                    volume = decl.name,
                    records = rep.records,
                    blocks = rep.blocks,
                    "journal replayed"
                );
                v.device
                    .with_journal(j)
                    .ok_or_else(|| invalid("journal", "only a RAID5 volume has a journal"))?
            }
            None => v.device,
        };
        let started = self.start_raid(&fixed, (device, v.meta, v.was_clean), spares, rx)?;
        Ok((fixed, Some(started)))
    }
}
