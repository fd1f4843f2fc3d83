//! The contract every RAID level implements: how its generations are
//! built from a member set, and how a rebuild or scrub walks it. The
//! member lifecycle itself (fail, replace, back in sync) is shared
//! (`MemberSet`), and the defaults here serve every level.

use std::sync::Arc;

use bdev::{BdevError, BlockDevice};

use super::geometry::Raid5Geometry;
use super::members::{device_id, MemberSet, MemberState};

use super::rebuild::Rows;

/// A RAID device that can describe the next generation. A level says
/// how its generations are built and how a rebuild or scrub walks it; the
/// member lifecycle itself is shared (`MemberSet`) and the defaults here
/// serve every level.
pub trait RaidDevice: BlockDevice {
    /// Members, rebuild state and what generations share.
    fn member_set(&self) -> &MemberSet;
    /// The same device over another member set (the next generation).
    fn with_member_set(&self, set: MemberSet) -> Arc<dyn RaidDevice>;
    /// The rows a rebuild or scrub walks.
    fn rows(&self) -> Rows;
    /// The members a rebuild of `slot` reads (and XORs).
    fn rebuild_sources(&self, slot: usize) -> Vec<usize>;
    /// RAID5 geometry, for a scrub that checks parity; `None` for mirrors.
    fn parity_geometry(&self) -> Option<Raid5Geometry>;
    /// How many members can be missing with no data lost.
    fn max_failures(&self) -> usize;
    /// The same device journalling its writes in `journal`, if the level
    /// has a journal (RAID5).
    fn with_journal(&self, _journal: Arc<super::journal::Journal>) -> Option<Arc<dyn RaidDevice>> {
        None
    }
    /// Its journal.
    fn journal(&self) -> Option<Arc<super::journal::Journal>> {
        None
    }
    /// The same device without its journal, if the level has one.
    fn without_journal(&self) -> Option<Arc<dyn RaidDevice>> {
        None
    }

    /// Member states in slot order.
    fn member_states(&self) -> Vec<MemberState> {
        self.member_set().states()
    }

    /// Identity of the device in each slot (see `members::device_id`).
    fn member_ids(&self) -> Vec<usize> {
        self.member_set()
            .members
            .iter()
            .map(|m| device_id(&m.dev))
            .collect()
    }

    /// The device in each slot.
    fn member_devices(&self) -> Vec<Arc<dyn BlockDevice>> {
        self.member_set()
            .members
            .iter()
            .map(|m| m.dev.clone())
            .collect()
    }

    /// The same device with `slot` failed.
    fn with_member_failed(&self, slot: usize) -> Result<Arc<dyn RaidDevice>, BdevError> {
        Ok(self.with_member_set(self.member_set().failed(&self.info().name, slot)?))
    }

    /// The same device with failed `slot` taken by `dev`, to be rebuilt
    /// from row `cursor` on (0 for a new member; a superblock checkpoint
    /// when resuming after a restart).
    fn with_member_replaced(
        &self,
        slot: usize,
        dev: Arc<dyn BlockDevice>,
        cursor: u64,
    ) -> Result<Arc<dyn RaidDevice>, BdevError> {
        let rows = self.rows();
        let info = self.info();
        let set = self.member_set().replaced(
            &info.name,
            slot,
            dev,
            cursor,
            rows.offset + rows.total,
            info.block_size,
        )?;
        Ok(self.with_member_set(set))
    }

    /// The same device with rebuilt `slot` in sync.
    fn with_member_in_sync(&self, slot: usize) -> Result<Arc<dyn RaidDevice>, BdevError> {
        Ok(self.with_member_set(self.member_set().in_sync(
            &self.info().name,
            slot,
            self.rows().count,
        )?))
    }

    /// The slots a scrub reads: every member, or for a degraded mirror
    /// the in-sync ones when two or more are left (a three-way mirror that
    /// lost one can still differ between the other two, and md resyncs
    /// it). A degraded RAID5 has nothing left to check against.
    fn scrub_members(&self) -> Result<Vec<usize>, String> {
        let set = self.member_set();
        let mut in_sync: Vec<usize> = (0..set.members.len())
            .filter(|&i| set.members[i].recorded_state() == MemberState::InSync)
            .collect();
        // The first is a mirror repair's reference: the one pinned while
        // a scrub runs, else not a write-mostly one if another is in sync
        // (with write-behind it may lag).
        in_sync.sort_by_key(|&i| set.members[i].write_mostly);
        if let Some(at) = set
            .reference(|m| in_sync.contains(&m))
            .and_then(|r| in_sync.iter().position(|&m| m == r))
        {
            let r = in_sync.remove(at);
            in_sync.insert(0, r);
        }
        let mirror = self.parity_geometry().is_none();
        let rebuilding = set
            .members
            .iter()
            .any(|m| m.state == MemberState::Rebuilding);
        if in_sync.len() == set.members.len() || (mirror && !rebuilding && in_sync.len() >= 2) {
            Ok(in_sync)
        } else if mirror {
            Err("a scrub needs two mirrors in sync and no rebuild running".into())
        } else {
            Err("a scrub needs every member in sync".into())
        }
    }
}
