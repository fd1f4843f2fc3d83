//! Changes to a volume: each a call of its monitor's one transaction (or,
//! for what the monitor does not hold, of the volume's own quiesce).

use super::{
    bitmap_chunk_bytes, check_bitmap_chunk, check_name, check_storable, check_write_behind,
    from_op, from_quiesce, invalid, lock, Level, Manager, MgmtError, Vol, VolumeView,
};
use crate::raid::journal::{Journal, JournalMode};
use crate::raid::members::MemberState;
use crate::raid::monitor::{Monitor, OpError, Role};
use crate::raid::superblock::Level as SbLevel;

fn monitor(v: &Vol) -> Result<&Monitor, MgmtError> {
    v.monitor.as_ref().ok_or_else(|| {
        MgmtError::FailedPrecondition(format!(
            "volume {} is a single device: it has no members to change",
            v.volume.name()
        ))
    })
}

impl Manager {
    /// A RAID volume and its view after `f` changed it.
    fn change(
        &self,
        volume: &str,
        f: impl FnOnce(&Monitor) -> Result<(), OpError>,
    ) -> Result<VolumeView, MgmtError> {
        let view = self.apply(volume, f)?;
        // The change saved the state inside its transaction, where a
        // failure is only logged (the change is made: superblocks written,
        // published). The caller hears it: a setting kept only in the
        // state file (a rate, write-behind, a spare) would be gone at the
        // next start while the call said OK.
        self.save()?;
        Ok(view)
    }

    /// [`change`](Self::change) without the save after it, for a call
    /// with steps of its own after the change (it saves at its end).
    fn apply(
        &self,
        volume: &str,
        f: impl FnOnce(&Monitor) -> Result<(), OpError>,
    ) -> Result<VolumeView, MgmtError> {
        self.check_open()?;
        let v = self.raid(volume)?;
        f(monitor(&v)?).map_err(|e| from_op(volume, e))?;
        Ok(self.view(&v))
    }

    /// Fail a member (md's --fail); failing the device a replacement
    /// copies to gives the replacement up.
    pub fn fail_member(&self, volume: &str, device: &str) -> Result<VolumeView, MgmtError> {
        self.device("device", device)?;
        self.change(volume, |m| m.fail_member(device))
    }

    /// Replace in-sync member `device` by `with` without going degraded
    /// (md's --replace): `with` is written along and the member copied to
    /// it in the background; then it takes the slot and `device` is free.
    /// A `with` that holds another volume's superblock, md's metadata or a
    /// journal is refused unless `force` (as md's --add wants --force for
    /// a device of another array).
    pub fn replace_member(
        &self,
        volume: &str,
        device: &str,
        with: &str,
        force: bool,
    ) -> Result<VolumeView, MgmtError> {
        self.device("device", device)?;
        let dev = self.device("replacement", with)?;
        if device == with {
            return Err(invalid("replacement", "is the member itself"));
        }
        // The claim inside the change decides; this says it plainly first.
        if let Some((v, role)) = self.shared.roles.holder(with) {
            return Err(MgmtError::FailedPrecondition(format!(
                "device {with} is in use ({} {v})",
                role.name()
            )));
        }
        let v = self.raid(volume)?;
        // Forced, the change's own erase makes it blank: nothing is
        // written before the transaction.
        if !force {
            Self::check_blank(&dev, monitor(&v)?.volume_uuid(), false)?;
        }
        self.change(volume, |m| m.replace_member(device, dev).map(|_| ()))
    }

    /// Add a hot spare (used at once if a member has failed). A failed
    /// member's own device may come back this way (md's re-add); one that
    /// holds another volume's superblock, md's metadata or a journal is
    /// refused unless `force`.
    pub fn add_spare(
        &self,
        volume: &str,
        device: &str,
        force: bool,
    ) -> Result<VolumeView, MgmtError> {
        let dev = self.device("device", device)?;
        let v = self.raid(volume)?;
        let m = monitor(&v)?;
        let snap = m.snapshot();
        let need = snap
            .members
            .iter()
            .filter_map(|n| self.inv().devices.get(n).map(|d| d.dev.clone()))
            .filter(|d| d.info().name != device)
            .map(|d| (d.info().num_blocks, d.info().block_size))
            .min();
        if let Some((blocks, bs)) = need {
            if dev.info().block_size != bs || dev.info().num_blocks < blocks {
                return Err(MgmtError::FailedPrecondition(format!(
                    "device {device} ({} blocks of {} bytes) cannot stand in for a member ({blocks} blocks of {bs} bytes)",
                    dev.info().num_blocks,
                    dev.info().block_size,
                )));
            }
        }
        // A device in use here is refused by the claim inside the change
        // whatever it holds; this is for what the appliance does not know.
        // Forced, the change's own erase makes it blank.
        if !force {
            Self::check_blank(&dev, m.volume_uuid(), false)?;
        }
        self.change(volume, |m| m.add_spare(dev))
    }

    /// Remove an unused hot spare.
    pub fn remove_spare(&self, volume: &str, device: &str) -> Result<VolumeView, MgmtError> {
        self.device("device", device)?;
        self.change(volume, |m| m.remove_spare(device))
            .map_err(|e| match e {
                MgmtError::FailedPrecondition(m) if m.contains("not a member or spare") => {
                    MgmtError::FailedPrecondition(format!(
                        "device {device} is not a spare of volume {volume}"
                    ))
                }
                e => e,
            })
    }

    /// Take a device out of a volume (md's --fail --remove): a spare is
    /// removed; an in-sync or rebuilding member is failed (refused if that
    /// would lose data) and taken out of its slot (a spare takes its
    /// place); a failed member's device is taken out of its slot. The
    /// device is free afterwards.
    pub fn remove_member(&self, volume: &str, device: &str) -> Result<VolumeView, MgmtError> {
        self.device("device", device)?;
        self.raid(volume)?;
        self.change(volume, |m| {
            let snap = m.snapshot();
            let as_spare = snap.spares.iter().any(|d| d == device);
            let slot = snap.members.iter().position(|d| d == device);
            match (as_spare, slot) {
                (true, _) => m.remove_spare(device),
                (false, Some(slot)) => {
                    let failed_now = snap.states[slot] != MemberState::Failed;
                    if failed_now {
                        if let Err(e) = m.fail_member(device) {
                            // It may have failed in the IO path since the
                            // look above: then it is only taken out.
                            let now = m.snapshot();
                            let failed = match now.members.get(slot) {
                                Some(d) if d == device => now.states[slot] == MemberState::Failed,
                                // A spare took its slot: held as failed.
                                _ => true,
                            };
                            if !failed {
                                return Err(e);
                            }
                        }
                    }
                    // A spare may have taken the slot already.
                    match m.remove_failed(device) {
                        Err(OpError::NotFound(_)) => Ok(()),
                        // Two transactions, as md's --fail --remove: the
                        // first is done, and the caller must not read
                        // "nothing changed" from the second's deadline.
                        Err(OpError::DeadlineExceeded(e)) if failed_now => {
                            Err(OpError::DeadlineExceeded(format!(
                                "device {device} was failed (the volume is degraded) but is still in its slot: {e}; remove it again"
                            )))
                        }
                        r => r,
                    }
                }
                (false, None) => Err(OpError::NotFound(device.to_string())),
            }
        })
    }

    /// Start a scrub (check, or repair).
    pub fn start_scrub(&self, volume: &str, repair: bool) -> Result<VolumeView, MgmtError> {
        // Nothing of a scrub is in the state file.
        self.apply(volume, |m| m.scrub(repair).map(|_| ()))
    }

    /// Stop a running scrub. A rebuild is not stopped: that would leave
    /// the volume degraded for nothing.
    pub fn stop_background(&self, volume: &str) -> Result<VolumeView, MgmtError> {
        self.check_open()?;
        let v = self.raid(volume)?;
        let snap = monitor(&v)?.snapshot();
        match snap.rebuild.filter(|p| !p.is_finished()) {
            None => Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} has no scrub running"
            ))),
            Some(p) if p.slot != usize::MAX => Err(MgmtError::FailedPrecondition(
                match &snap.replacing {
                    Some((_, with)) => format!(
                        "volume {volume} is copying a member to {with}; fail {with} to give the replacement up"
                    ),
                    None => format!(
                        "volume {volume} is rebuilding; a rebuild is not stopped (it would leave the volume degraded)"
                    ),
                },
            )),
            Some(p) => {
                p.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                crate::raid::worker::wake(&self.shared.set);
                Ok(self.view(&v))
            }
        }
    }

    /// Limit every rebuild and scrub of the volume, the running one
    /// included, to `max` bytes per second (0: none), and to `min` while
    /// the volume serves guest IO (0: no yielding), as md's
    /// sync_speed_max/min; kept in the state file.
    pub fn set_rebuild_rate(
        &self,
        volume: &str,
        min: u64,
        max: u64,
    ) -> Result<VolumeView, MgmtError> {
        check_storable("min_bytes_per_sec", min)?;
        check_storable("max_bytes_per_sec", max)?;
        if max > 0 && min > max {
            return Err(invalid(
                "min_bytes_per_sec",
                format!("{min} is above the maximum {max}"),
            ));
        }
        self.change(volume, |m| m.set_rate(min, max))
    }

    /// Mark a RAID1 member write-mostly (md's write-mostly: read only when
    /// no other in-sync member can serve), or clear the mark.
    pub fn set_write_mostly(
        &self,
        volume: &str,
        device: &str,
        on: bool,
    ) -> Result<VolumeView, MgmtError> {
        self.device("device", device)?;
        self.change(volume, |m| m.set_write_mostly(device, on))
    }

    /// md's write-behind for a RAID1 (`limit` writes to write-mostly
    /// members in the background at once; 0 turns it off and waits for
    /// the ones in flight); kept in the state file. Needs the bitmap.
    pub fn set_write_behind(&self, volume: &str, limit: u32) -> Result<VolumeView, MgmtError> {
        if limit > 0 {
            check_write_behind(limit)?;
        }
        self.change(volume, |m| m.set_write_behind(limit as u64))
    }

    /// Turn md's serialize_policy on or off for a RAID1 volume; kept in the
    /// state file.
    pub fn set_serialize(&self, volume: &str, on: bool) -> Result<VolumeView, MgmtError> {
        self.change(volume, |m| m.set_serialize(on))
    }

    /// Hold writes to bytes `lo..hi` of a volume (md's suspend_lo and
    /// suspend_hi): once this returns none is in flight and new ones wait
    /// until [`resume_range`](Self::resume_range); reads go on. Not kept
    /// across a restart (md does not either).
    pub fn suspend_range(&self, volume: &str, lo: u64, hi: u64) -> Result<VolumeView, MgmtError> {
        self.check_open()?;
        let v = self.inv().volume(volume)?;
        let info = v.volume.info();
        let bs = info.block_size as u64;
        if !lo.is_multiple_of(bs) || !hi.is_multiple_of(bs) {
            return Err(invalid(
                "lo_bytes",
                format!("lo and hi must be multiples of the block size {bs}"),
            ));
        }
        if hi <= lo || hi > info.size_bytes() {
            return Err(invalid(
                "hi_bytes",
                format!(
                    "the range {lo}..{hi} must be non-empty and end within the volume ({} bytes)",
                    info.size_bytes()
                ),
            ));
        }
        let _busy = lock(&v.busy);
        if let Some((a, b)) = v.volume.suspended_range().get() {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} already holds writes to {}..{}; resume it first",
                a * bs,
                b * bs
            )));
        }
        v.volume
            .suspend_range(lo / bs, hi / bs, self.shared.timeout())
            .map_err(|e| from_quiesce("volume", e))?;
        Ok(self.view(&v))
    }

    /// Let a volume's held writes go.
    pub fn resume_range(&self, volume: &str) -> Result<VolumeView, MgmtError> {
        self.check_open()?;
        let v = self.inv().volume(volume)?;
        let _busy = lock(&v.busy);
        if v.volume.suspended_range().get().is_none() {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} holds no writes"
            )));
        }
        v.volume.resume_range();
        Ok(self.view(&v))
    }

    /// Set a volume's IO limits online, through its epoch: suspended,
    /// recorded in the state file, published, resumed. A state file that
    /// cannot be written or a volume that does not drain in time changes
    /// nothing.
    pub fn set_volume_qos(
        &self,
        volume: &str,
        limits: crate::qos::QosLimits,
    ) -> Result<VolumeView, MgmtError> {
        limits.check().map_err(|(field, why)| invalid(field, why))?;
        self.check_open()?;
        let v = self.inv().volume(volume)?;
        let _busy = lock(&v.busy);
        let before = lock(&v.decl).qos;
        if before == limits {
            // Nothing to change: no suspend, and the schedule (and its
            // burst allowance) goes on as it was.
            return Ok(self.view(&v));
        }
        let r = v.volume.set_qos(limits, self.shared.timeout(), || {
            lock(&v.decl).qos = limits;
            self.save().inspect_err(|_| lock(&v.decl).qos = before)
        });
        match r {
            Ok(()) => {}
            Err(poller::ReconfigureError::Rejected(e)) => return Err(e),
            Err(poller::ReconfigureError::Quiesce(e)) => return Err(from_quiesce(volume, e)),
        }
        tracing::info!(volume, limits = %limits.describe(), "IO limits set");
        Ok(self.view(&v))
    }

    /// Suspend a volume as a whole (dm's suspend, e.g. around a snapshot
    /// of its devices taken outside): once this returns no IO of it is in
    /// flight, its background work stands still at a row boundary, and
    /// new IO waits (it is not failed) until
    /// [`resume_volume`](Self::resume_volume). Changes of the volume still
    /// go through meanwhile. Not kept across a restart.
    pub fn suspend_volume(&self, volume: &str) -> Result<VolumeView, MgmtError> {
        self.check_open()?;
        let v = self.inv().volume(volume)?;
        let _busy = lock(&v.busy);
        if lock(&v.held).is_some() {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} is already suspended"
            )));
        }
        let guard = v
            .volume
            .suspend(self.shared.timeout())
            .map_err(|e| from_quiesce(volume, e))?;
        *lock(&v.held) = Some(guard);
        tracing::info!(volume, "volume suspended by the operator");
        Ok(self.view(&v))
    }

    /// Resume a volume [`suspend_volume`](Self::suspend_volume) held.
    pub fn resume_volume(&self, volume: &str) -> Result<VolumeView, MgmtError> {
        self.check_open()?;
        let v = self.inv().volume(volume)?;
        let _busy = lock(&v.busy);
        let Some(guard) = lock(&v.held).take() else {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} is not suspended"
            )));
        };
        drop(guard);
        tracing::info!(volume, "volume resumed by the operator");
        Ok(self.view(&v))
    }

    /// Change a two-member volume's level online (md's takeover): RAID1 to
    /// RAID5 with `chunk_kib` chunks (0: 64), or RAID5 to RAID1.
    pub fn takeover(
        &self,
        volume: &str,
        level: &str,
        chunk_kib: u32,
    ) -> Result<VolumeView, MgmtError> {
        let to = match Level::parse(level) {
            Some(Level::Raid1) => SbLevel::Raid1,
            Some(Level::Raid5) => SbLevel::Raid5,
            _ => return Err(invalid("level", format!("{level:?} is not raid1 or raid5"))),
        };
        let chunk_kib = if chunk_kib == 0 { 64 } else { chunk_kib };
        if !(4..=1024).contains(&chunk_kib) || !chunk_kib.is_power_of_two() {
            return Err(invalid(
                "chunk_kib",
                format!("{chunk_kib} is not a power of two in 4..=1024"),
            ));
        }
        self.change(volume, |m| m.takeover(to, chunk_kib * 1024))
    }

    /// Give a RAID volume a write-intent bitmap (`chunk_kib` per region,
    /// 0 for the default), or take it away (md's `--grow --bitmap`).
    pub fn set_bitmap(
        &self,
        volume: &str,
        enabled: bool,
        chunk_kib: u32,
    ) -> Result<VolumeView, MgmtError> {
        check_bitmap_chunk(chunk_kib)?;
        let v = self.raid(volume)?;
        let _one = lock(&v.bitmap_calls);
        // The region size asked for is what the state file keeps (written
        // by the transaction's own record, so set before it; nothing else
        // changes it, see `persist`).
        let before = lock(&v.decl).bitmap_chunk_kib;
        if enabled {
            lock(&v.decl).bitmap_chunk_kib = chunk_kib;
        }
        let r = self.apply(volume, |m| {
            m.set_bitmap(enabled.then(|| bitmap_chunk_bytes(chunk_kib)))
        });
        // Put back only if the volume refused it: a change made whose
        // save failed keeps what it asked for (the bitmap is there).
        match &r {
            Err(_) => lock(&v.decl).bitmap_chunk_kib = before,
            Ok(_) if !enabled => lock(&v.decl).bitmap_chunk_kib = 0,
            Ok(_) => {}
        }
        let view = r?;
        self.save()?;
        Ok(view)
    }

    /// Give a RAID5 volume a journal online: `device` is formatted as its
    /// log and every write from then on goes through it (`mode`:
    /// write-through by default, or write-back). A device that holds a
    /// volume's superblock or a journal is refused unless `force`.
    pub fn add_journal(
        &self,
        volume: &str,
        device: &str,
        mode: &str,
        force: bool,
    ) -> Result<VolumeView, MgmtError> {
        check_name("device", device)?;
        let mode = if mode.is_empty() {
            JournalMode::WriteThrough
        } else {
            JournalMode::parse(mode).map_err(|e| invalid("mode", e.to_string()))?
        };
        self.check_open()?;
        let v = self.raid(volume)?;
        // Held to the end: the device is claimed and formatted before the
        // volume's transaction takes it, and a deletion meanwhile would
        // free the claim (`release_volume`) under the format; another
        // volume could take the device and have its journal overwritten
        // or erased by this call. set_bitmap's lock first (it holds that
        // one, not `busy`, while its transaction waits): a bitmap set while
        // this call erased and formatted its device made the volume refuse
        // the journal, the device's old journal lost for nothing (audit);
        // the check below now sees it.
        let _bitmap = lock(&v.bitmap_calls);
        let _busy = lock(&v.busy);
        self.not_deleting(&v, volume)?;
        if let Some(j) = monitor(&v)?.journal() {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} already has a journal ({})",
                j.device().info().name
            )));
        }
        let jdev = {
            let inv = self.inv();
            let mut decl = lock(&v.decl).clone();
            decl.journal = Some(device.to_string());
            Self::check_journal(&inv, &decl, v.level())?
                .ok_or_else(|| invalid("device", "is empty"))?
        };
        // Every slot counts, a failed one too: a degraded stripe's record
        // logs the missing member's rows.
        let snap = monitor(&v)?.snapshot();
        // What the volume's change would refuse, before the device is
        // touched: a forced call erases what the device held, and a
        // refusal after that would have lost it for nothing. (The
        // transaction checks again: a bitmap set meanwhile.)
        if snap.bitmap.is_some() {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} keeps a write-intent bitmap; remove it before adding a journal (the journal makes it redundant)"
            )));
        }
        Self::check_journal_room(
            jdev.as_ref(),
            snap.members.len() as u64,
            snap.chunk_bytes / 1024,
        )?;
        // The device is the journal's before it is formatted: nothing else
        // can take it meanwhile.
        self.shared
            .roles
            .claim(&jdev, volume, Role::Journal, None)
            .map_err(|e| from_op(volume, e))?;
        // What a forced erase and the format overwrite, put back if the
        // volume refuses the journal (its change ran out of time, say).
        let before = crate::raid::assembly::MetadataPlaces::read(jdev.as_ref()).map_err(|e| {
            self.shared.roles.set(device, volume, None);
            MgmtError::Internal(format!(
                "volume {volume}: reading journal device {device}: {e}"
            ))
        })?;
        if let Err(e) = Self::check_blank(&jdev, None, force) {
            self.shared.roles.set(device, volume, None);
            return Err(e);
        }
        // Write-through until the state file names it: a write-back
        // journal acknowledges writes from its log, which a start from a
        // state file without it would never replay.
        let result = Journal::format_with(jdev.clone(), JournalMode::WriteThrough)
            .map_err(|e| {
                MgmtError::Internal(format!("volume {volume}: formatting journal {device}: {e}"))
            })
            .and_then(|j| {
                monitor(&v)?
                    .set_journal(Some(j))
                    .map_err(|e| from_op(volume, e))
            });
        if let Err(e) = result {
            // The volume refused it (a bitmap set meanwhile, its change
            // out of time) after the format: the device goes back as it
            // was (blank, or what a forced call overwrote) before it is let
            // go. If that cannot be written, it is erased at least: a
            // journal of no volume must not be taken for one.
            if let Err(x) = before.restore(jdev.as_ref()) {
                tracing::warn!(volume, device, error = %x, "putting back what a journal the volume refused overwrote; erasing it");
                if let Err(x) = crate::raid::journal::erase(jdev.as_ref()) {
                    tracing::warn!(volume, device, error = %x, "erasing a journal the volume refused");
                }
            }
            self.shared.roles.set(device, volume, None);
            return Err(e);
        }
        // The journal is named only by the state file (not by the
        // members' superblocks): a start without it there would never
        // replay what write-back acknowledged from it. Saved before it
        // goes write-back; a failed save leaves it write-through.
        self.save()?;
        if mode == JournalMode::WriteBack {
            let switched = monitor(&v)?
                .set_journal_mode(mode)
                .map_err(|e| from_op(volume, e))
                .and_then(|_| self.save());
            switched.map_err(|e| {
                e.after(&format!(
                    "journal {device} was added write-through; switching it to write-back failed"
                ))
            })?;
        }
        Ok(self.view(&v))
    }

    /// Take a RAID5 volume's journal away online. A write-back cache drains
    /// to the members first; the journal's device is free afterwards.
    pub fn remove_journal(&self, volume: &str) -> Result<VolumeView, MgmtError> {
        let v = self.raid(volume)?;
        // Held to the end, as in add_journal: the device is claimed again
        // and erased after the transaction.
        let _busy = lock(&v.busy);
        self.not_deleting(&v, volume)?;
        let Some(journal) = monitor(&v)?.journal() else {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} has no journal"
            )));
        };
        // Saved at the end: the erase below runs whatever the save does
        // (a state file still naming the journal, with its log left on
        // the device, would have it replayed over later writes).
        let view = self.apply(volume, |m| {
            // The journal looked at is the one removed (another call may
            // have replaced it meanwhile: its device is not erased here).
            if !m
                .journal()
                .is_some_and(|j| std::sync::Arc::ptr_eq(&j, &journal))
            {
                return Err(OpError::FailedPrecondition(
                    "the volume's journal changed meanwhile; look again".into(),
                ));
            }
            m.set_journal(None)
        })?;
        // Drained and out of the volume: blank again (a journal left on it
        // would be refused as another's). Held while it is erased, unless
        // another call took the device first: then it is that call's.
        let dev = journal.device();
        let name = dev.info().name.clone();
        if self
            .shared
            .roles
            .claim(dev, volume, Role::Journal, None)
            .is_ok()
        {
            if let Err(e) = crate::raid::journal::erase(dev.as_ref()) {
                tracing::warn!(volume, device = %name, error = %e, "erasing a removed journal");
            }
            self.shared.roles.set(&name, volume, None);
        }
        self.save().map_err(|e| {
            MgmtError::Internal(format!(
                "{e}; the state file still names the journal, whose device is erased: the next start refuses the volume until it is started with --drop-journal {volume}"
            ))
        })?;
        Ok(view)
    }

    /// Switch a volume's journal mode online.
    pub fn set_journal_mode(&self, volume: &str, mode: &str) -> Result<VolumeView, MgmtError> {
        if mode.is_empty() {
            return Err(invalid("mode", "write-through or write-back"));
        }
        let mode = JournalMode::parse(mode).map_err(|e| invalid("mode", e.to_string()))?;
        let v = self.raid(volume)?;
        if monitor(&v)?.journal().is_none() {
            return Err(MgmtError::FailedPrecondition(format!(
                "volume {volume} has no journal"
            )));
        }
        let r = self.apply(volume, |m| m.set_journal_mode(mode));
        // The mode in force is the journal's, whatever became of a drain:
        // the state file says it.
        if let Some(j) = monitor(&v)?.journal() {
            lock(&v.decl).journal_mode = j.mode().name().to_string();
        }
        let saved = self.save();
        let view = r?;
        saved?;
        Ok(view)
    }
}

impl Manager {
    /// Refuse a change to a volume being deleted (checked with its busy
    /// lock held: a deletion that set the flag waits for that lock). Gone
    /// once the delete took it out of the inventory, as the monitor's
    /// changes are told; until then the delete may still fail (its
    /// deadline), and the volume stay (review).
    fn not_deleting(&self, v: &std::sync::Arc<Vol>, volume: &str) -> Result<(), MgmtError> {
        if !v.deleting.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let listed = self
            .inv()
            .volumes
            .get(volume)
            .is_some_and(|x| std::sync::Arc::ptr_eq(x, v));
        Err(if listed {
            MgmtError::FailedPrecondition(format!("volume {volume} is being deleted"))
        } else {
            MgmtError::NotFound(format!("volume {volume} was deleted"))
        })
    }
}
