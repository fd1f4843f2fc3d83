//! What a volume looks like from outside: its view (members, background
//! work, journal, exports), for the API and for listing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{lock, state_name, Level, Manager, MgmtError, ProgressView, Vol, VolumeView};
use crate::raid::members::MemberState;

impl Manager {
    /// A volume as described.
    pub(super) fn view(&self, v: &Vol) -> VolumeView {
        let name = v.volume.name().to_string();
        let info = v.volume.info();
        // Those kept unmade too: they hold the volume (its delete is
        // refused while one names it).
        let exports = {
            let inv = self.inv();
            inv.exports
                .values()
                .map(|e| &e.decl)
                .chain(inv.unserved.exports.values().map(|(e, _)| e))
                .filter(|e| e.volume == name)
                .map(|e| e.name.clone())
                .collect()
        };
        let decl = lock(&v.decl).clone();
        let level = Level::parse(&decl.level).unwrap_or(Level::Single);
        // One consistent look at the members and background work.
        let snap = v.monitor.as_ref().map(|m| m.snapshot());
        let write_mostly: Vec<String> = snap.as_ref().map_or(vec![], |snap| {
            snap.members
                .iter()
                .zip(&snap.write_mostly)
                .filter(|x| *x.1)
                .map(|x| x.0.clone())
                .collect()
        });
        let bitmap = snap
            .as_ref()
            .and_then(|snap| snap.bitmap.as_ref())
            .map(|b| (b.region_bytes(), b.bits(), b.dirty_regions()));
        let journal = snap.as_ref().and_then(|s| s.journal.clone());
        let consistency_policy = if v.monitor.is_none() {
            "none"
        } else if journal.is_some() {
            "journal"
        } else if bitmap.is_some() {
            "bitmap"
        } else {
            "resync"
        };
        let pending_changes = snap.as_ref().map_or(0, |s| s.pending);
        let serialize = snap.as_ref().is_some_and(|snap| snap.serialize);
        let write_behind = snap.as_ref().map_or((0, 0), |snap| snap.write_behind);
        let member_errors = snap.as_ref().map_or(vec![0], |snap| snap.errors.clone());
        let (members, spares, state, progress) = match snap {
            Some(snap) => {
                let down = snap
                    .states
                    .iter()
                    .filter(|&&x| x != MemberState::InSync)
                    .count();
                let state = if down == 0 {
                    "optimal"
                } else if down > snap.max_failures {
                    "failed"
                } else {
                    "degraded"
                };
                let settled = snap.settled();
                let slots = snap.states.len();
                let progress = snap.rebuild.clone().map(|p| ProgressView {
                    kind: if p.slot == usize::MAX {
                        "scrub"
                    } else if p.slot == slots {
                        "replace"
                    } else {
                        "rebuild"
                    },
                    fraction: p.fraction(),
                    eta_seconds: if settled {
                        0.0
                    } else {
                        p.eta().map_or(-1.0, |d| d.as_secs_f64())
                    },
                    finished: settled,
                    error: p.error().unwrap_or_default(),
                    mismatches: p.mismatches.load(Ordering::Relaxed),
                    bytes: p.bytes.load(Ordering::Relaxed),
                    min_bytes_per_sec: p.min_bytes_per_sec.load(Ordering::Relaxed),
                    max_bytes_per_sec: p.max_bytes_per_sec.load(Ordering::Relaxed),
                });
                let members = snap
                    .members
                    .iter()
                    .zip(&snap.states)
                    .map(|(d, &st)| {
                        if d.is_empty() {
                            (String::new(), "removed")
                        } else {
                            (d.clone(), state_name(st))
                        }
                    })
                    .collect();
                (members, snap.spares, state, progress)
            }
            None => (
                vec![(decl.members[0].clone(), "in_sync")],
                vec![],
                "optimal",
                None,
            ),
        };
        VolumeView {
            name: name.clone(),
            level,
            state,
            size_bytes: info.size_bytes(),
            block_size: info.block_size,
            chunk_kib: if level == Level::Raid5 {
                decl.chunk_kib
            } else {
                0
            },
            layout: if level == Level::Raid5 {
                decl.layout.clone()
            } else {
                String::new()
            },
            members,
            member_errors,
            write_mostly,
            spares,
            progress,
            generation: v.volume.quiesce().config().0,
            exports,
            quiesce: v.volume.quiesce().stats(),
            journal: journal.as_ref().map(|j| j.device().info().name.clone()),
            consistency_policy,
            bitmap,
            serialize,
            write_behind,
            suspended: v.volume.suspended_range().get().map(|(lo, hi)| {
                let bs = info.block_size as u64;
                (lo * bs, hi * bs)
            }),
            journal_state: journal.as_ref().map(|j| {
                // Held first: a block counts in held before it is cached
                // and after it leaves, so while nothing is being cached
                // (no write in flight) the pair read shows held >= cached
                // even as reclaim drains the cache between the two loads.
                let held_blocks = j.cache().held();
                super::JournalState {
                    mode: j.mode(),
                    fill: j.usage(),
                    cached_blocks: j.cache().len(),
                    held_blocks,
                    failed: j.has_failed(),
                    given_up: j.given_up_recorded(),
                }
            }),
            journal_counts: journal.as_ref().map(|j| j.counts()),
            suspended_whole: lock(&v.held).is_some(),
            quiescing: v.volume.quiesce().is_suspended(),
            pending_changes,
            qos: decl.qos,
        }
    }

    /// Describe a volume.
    pub fn get_volume(&self, name: &str) -> Result<VolumeView, MgmtError> {
        let v = self.inv().volume(name)?;
        Ok(self.view(&v))
    }

    /// Describe every volume.
    pub fn list_volumes(&self) -> Vec<VolumeView> {
        let vols: Vec<Arc<Vol>> = self.inv().volumes.values().cloned().collect();
        vols.iter().map(|v| self.view(v)).collect()
    }
}
