//! Opening the RAID5 volume of `appliance serve --raid5`: assembled from its members'
//! superblocks, or created on blank devices, and nothing written when the
//! devices are anything else.

use std::sync::Arc;

use bdev::BlockDevice;

use super::assembly::{assemble, create, read_superblock, VolumeMeta, VolumeSpec};
use super::geometry::Layout;
use super::level::RaidDevice;
use super::members::{FailureSink, MemberState};
use super::superblock::{Level, SuperblockError};

/// A volume ready to serve: found on its members or created on blank ones.
pub struct Opened {
    /// The device.
    pub device: Arc<dyn RaidDevice>,
    /// Its identity, for the monitor to record changes.
    pub meta: VolumeMeta,
    /// Whether the last shutdown was clean (true for a new volume).
    pub was_clean: bool,
    /// What happened, for the operator.
    pub summary: String,
}

/// Open the RAID5 volume on `devices`: assemble it if they carry its
/// superblocks, create it if they are all blank (`zeroed`: they hold only
/// zeros, see [`VolumeSpec::zeroed`]). Anything else (members of several
/// volumes, corrupt superblocks, too few members) is an error that names
/// the devices, and nothing is written.
pub fn open_or_create(
    name: &str,
    devices: &[Arc<dyn BlockDevice>],
    zeroed: bool,
    failures: FailureSink,
) -> Result<Opened, String> {
    let mut blank = 0;
    for d in devices {
        match read_superblock(d.as_ref()) {
            Ok(Err(SuperblockError::Foreign)) => blank += 1,
            Ok(_) => {}
            Err(e) => return Err(format!("{}: {e}", d.info().name)),
        }
    }
    if blank == devices.len() {
        let bs = devices.first().map_or(4096, |d| d.info().block_size) as u64;
        let spec = VolumeSpec {
            name: name.to_string(),
            level: Level::Raid5,
            layout: Layout::LeftSymmetric,
            chunk_bytes: 64 << 10,
            data_offset: (1 << 20) / bs,
            members: devices.to_vec(),
            bitmap_chunk_bytes: 0,
            zeroed,
        };
        let (device, meta) = create(&spec, failures, false).map_err(|e| e.to_string())?;
        return Ok(Opened {
            device,
            meta,
            was_clean: zeroed,
            summary: format!(
                "created RAID5 {name:?} on {} blank members{}",
                devices.len(),
                if zeroed {
                    ""
                } else {
                    " (not known to hold only zeros: parity is synchronised in the background)"
                }
            ),
        });
    }
    let sink = failures.clone();
    let mut report = assemble(devices, move |_| sink.clone());
    if !report.problems.is_empty() {
        let list: Vec<String> = report
            .problems
            .iter()
            .map(|(d, why)| format!("{d}: {why}"))
            .collect();
        return Err(format!("refusing to start: {}", list.join("; ")));
    }
    if report.volumes.len() != 1 {
        return Err(format!(
            "the devices hold {} volumes; give the members of one volume",
            report.volumes.len()
        ));
    }
    let v = report.volumes.remove(0);
    if blank > 0 {
        return Err(format!(
            "{blank} of the devices are blank: not members of {:?}",
            v.meta.template.name
        ));
    }
    let states = v.device.member_states();
    let summary = format!(
        "assembled {:?} ({} members{}{}), last shutdown {}",
        v.meta.template.name,
        states.len(),
        if states.iter().any(|s| *s != MemberState::InSync) {
            ", degraded"
        } else {
            ""
        },
        if v.stale.is_empty() {
            String::new()
        } else {
            format!(", stale: {}", v.stale.join(" "))
        },
        if v.was_clean { "clean" } else { "UNCLEAN" }
    );
    Ok(Opened {
        device: v.device,
        meta: v.meta,
        was_clean: v.was_clean,
        summary,
    })
}
