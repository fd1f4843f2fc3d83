//! Taking over an md array (`volume import`): its members' md superblocks
//! say what the volume is, and the volume keeps md's identity (UUID, name,
//! device roles, bitmap) so md can assemble the members again afterwards.
//! Nothing is written unless the array can start; from then on it is a
//! volume like any other (its superblocks were md's format already).

use super::{check_name, Manager, MgmtError, VolumeView};
use crate::config::VolumeDecl;
use crate::raid::assembly;
use crate::raid::superblock::{Level, Superblock, SuperblockError};

impl Manager {
    /// Import the md array whose members (and spares) are `devices`, in
    /// any order, as volume `name`.
    pub fn import_volume(&self, name: &str, devices: &[String]) -> Result<VolumeView, MgmtError> {
        self.check_open()?;
        check_name("name", name)?;
        // The name of a volume that did not start is its own (an import
        // restores under it, which would take that volume's place).
        if let Some(u) = self.inv().unavailable.get(name) {
            return Err(MgmtError::AlreadyExists(format!(
                "volume {name} exists (it did not start: {})",
                u.reason
            )));
        }
        if devices.is_empty() {
            return Err(super::invalid("devices", "name the array's devices"));
        }
        // Every name attached and named once before any device is read: a
        // list naming one device thousands of times read its superblock
        // each time (audit), and a device named twice would be two slots.
        let mut seen = std::collections::BTreeSet::new();
        for d in devices {
            self.device("devices", d)?;
            if !seen.insert(d.as_str()) {
                return Err(super::invalid(
                    "devices",
                    format!("device {d} is named twice"),
                ));
            }
        }
        let mut members: Vec<(u32, String)> = Vec::new();
        let mut spares: Vec<([u8; 16], String)> = Vec::new();
        let mut newest: Option<Superblock> = None;
        for d in devices {
            let dev = self.device("devices", d)?;
            let sb = match assembly::read_superblock(dev.as_ref()) {
                Err(e) => return Err(MgmtError::Internal(format!("reading {d}: {e}"))),
                Ok(Ok(sb)) => sb,
                Ok(Err(SuperblockError::MdSpare { array, .. })) => {
                    spares.push((array, d.clone()));
                    continue;
                }
                Ok(Err(SuperblockError::Foreign)) => {
                    return Err(MgmtError::FailedPrecondition(format!(
                        "{d} carries no RAID superblock: nothing to import"
                    )))
                }
                Ok(Err(e)) => return Err(MgmtError::FailedPrecondition(format!("{d}: {e}"))),
            };
            if let Some(n) = &newest {
                if n.volume_uuid != sb.volume_uuid {
                    return Err(MgmtError::FailedPrecondition(format!(
                        "{d} belongs to array {:?}, not {:?}",
                        sb.name, n.name
                    )));
                }
            }
            members.push((sb.slot, d.clone()));
            if newest.as_ref().is_none_or(|n| sb.events > n.events) {
                newest = Some(sb);
            }
        }
        let Some(sb) = newest else {
            return Err(MgmtError::FailedPrecondition(
                "none of the devices holds a slot of an array (spares only)".into(),
            ));
        };
        if let Some((_, d)) = spares.iter().find(|(u, _)| *u != sb.volume_uuid) {
            return Err(MgmtError::FailedPrecondition(format!(
                "{d} is a spare of another md array than {:?}",
                sb.name
            )));
        }
        // Like mdadm --assemble without --run: an array that was whole
        // does not start degraded because a device was left out.
        for (slot, code) in sb.slot_states.iter().enumerate() {
            let held = code & 0x7f != crate::raid::members::MemberState::Failed.code();
            if held && !members.iter().any(|(s, _)| *s as usize == slot) {
                return Err(MgmtError::FailedPrecondition(format!(
                    "slot {slot} of array {:?} is in use but none of the devices holds it: name every member",
                    sb.name
                )));
            }
        }
        members.sort();
        let raid5 = sb.level == Level::Raid5;
        let decl = VolumeDecl {
            members: members.into_iter().map(|(_, d)| d).collect(),
            spares: spares.into_iter().map(|(_, d)| d).collect(),
            chunk_kib: if raid5 { sb.chunk_bytes / 1024 } else { 64 },
            layout: sb.layout.name().into(),
            bitmap: sb.bitmap_rows_per_bit > 0,
            // md's write-behind (a mirror's, with its bitmap) carries on.
            write_behind: if raid5 { 0 } else { sb.write_behind },
            array: if sb.name == name {
                String::new()
            } else {
                sb.name.clone()
            },
            // This array, not another of its name among the devices.
            uuid: super::hex(&sb.volume_uuid),
            ..VolumeDecl::new(name, if raid5 { "raid5" } else { "raid1" }, &[])
        };
        self.shared
            .check_room(super::inventory::Kind::Volume, name, &decl)?;
        self.restore_volume(&decl, false)?;
        self.save()?;
        tracing::info!(volume = name, array = sb.name, "md array imported");
        self.get_volume(name)
    }
}
