//! The commands the software controller carries out: admin commands,
//! reads, writes and the rest, and their data moved through its IOMMU by
//! the command's PRPs or SGLs. (The register file, the queues and the
//! faults are the parent's.)

use super::*;

impl Device {
    pub(super) fn admin(&mut self, sqe: &Sqe) -> (Status, u32) {
        let max_q = self.config.max_io_queues;
        match sqe.opcode() {
            admin::IDENTIFY => {
                let mut page = [0u8; 4096];
                match sqe.cdw[0] & 0xff {
                    admin::CNS_CONTROLLER => IdentifyController {
                        vid: 0x1b36,
                        serial: self.config.serial.clone(),
                        model: "appliance soft NVMe".into(),
                        firmware: "1.0".into(),
                        mdts: self.config.mdts,
                        nn: self.config.namespaces.len() as u32,
                        oncs: 0xc,
                        vwc: self.config.vwc,
                        sgls: self.config.sgl as u32,
                    }
                    .write(&mut page),
                    admin::CNS_NAMESPACE
                        if lock(&self.shared.faults)
                            .refuse_identify
                            .contains(&sqe.nsid) =>
                    {
                        return (Status::INVALID_FIELD, 0);
                    }
                    admin::CNS_ACTIVE_NS if lock(&self.shared.faults).no_active_list => {
                        return (Status::INVALID_FIELD, 0);
                    }
                    admin::CNS_NAMESPACE => {
                        let Some(&(bs, n)) = self.namespace(sqe.nsid) else {
                            return (Status::INVALID_NAMESPACE, 0);
                        };
                        IdentifyNamespace {
                            nsze: n,
                            lbads: bs.trailing_zeros() as u8,
                            ms: 0,
                            format: 0,
                            nlbaf: 0,
                            nguid: [0; 16],
                            eui64: [0; 8],
                        }
                        .write(&mut page)
                    }
                    admin::CNS_ACTIVE_NS => {
                        let ids =
                            (1..=self.config.namespaces.len() as u32).filter(|&i| i > sqe.nsid);
                        for (k, id) in ids.take(1024).enumerate() {
                            page[k * 4..k * 4 + 4].copy_from_slice(&id.to_le_bytes());
                        }
                    }
                    _ => return (Status::INVALID_FIELD, 0),
                }
                match self.transfer(sqe, PAGE, |dst| dst.copy_from_slice(&page)) {
                    true => (Status::SUCCESS, 0),
                    false => (Status::DATA_TRANSFER, 0),
                }
            }
            // As QEMU does: the queue count is fixed once IO queues exist.
            admin::SET_FEATURES
                if sqe.cdw[0] & 0xff == admin::FEAT_NUM_QUEUES && self.cqs.len() > 1 =>
            {
                (Status::COMMAND_SEQUENCE, 0)
            }
            admin::SET_FEATURES if sqe.cdw[0] & 0xff == admin::FEAT_NUM_QUEUES => {
                let n = (max_q as u32 - 1).min(sqe.cdw[1] & 0xffff);
                (Status::SUCCESS, n | n << 16)
            }
            admin::CREATE_CQ | admin::CREATE_SQ => {
                let qid = sqe.cdw[0] as u16;
                let size = (sqe.cdw[0] >> 16) + 1;
                if qid == 0 || qid > max_q {
                    return (Status::INVALID_QID, 0);
                }
                let mqes = (self.bar.read64(spec::REG_CAP) & 0xffff) as u32 + 1;
                if size < 2 || size > mqes {
                    return (Status::INVALID_QSIZE, 0);
                }
                if sqe.opcode() == admin::CREATE_CQ {
                    if self.cqs.contains_key(&qid) || sqe.cdw[1] & 1 == 0 {
                        return (Status::INVALID_QID, 0);
                    }
                    // A new queue's head starts at 0, whatever a queue
                    // with this id left in the register.
                    self.bar.write32(spec::cq_doorbell(qid, STRIDE), 0);
                    self.cqs.insert(
                        qid,
                        Cq {
                            iova: sqe.prp1,
                            size,
                            tail: 0,
                            phase: true,
                        },
                    );
                } else {
                    let cqid = (sqe.cdw[1] >> 16) as u16;
                    if self.sqs.contains_key(&qid) || !self.cqs.contains_key(&cqid) {
                        return (Status::INVALID_QID, 0);
                    }
                    self.sqs.insert(
                        qid,
                        Sq {
                            iova: sqe.prp1,
                            size,
                            head: 0,
                            cqid,
                        },
                    );
                    // A new queue starts at tail 0.
                    self.bar.write32(spec::sq_doorbell(qid, STRIDE), 0);
                }
                (Status::SUCCESS, 0)
            }
            admin::DELETE_SQ => {
                let qid = sqe.cdw[0] as u16;
                if qid == 0 || self.sqs.remove(&qid).is_none() {
                    return (Status::INVALID_QID, 0);
                }
                self.pending.retain(|p| p.sqid != qid);
                self.lost.retain(|l| l.0 != qid);
                self.late.retain(|l| l.sqid != qid);
                (Status::SUCCESS, 0)
            }
            admin::DELETE_CQ => {
                let qid = sqe.cdw[0] as u16;
                if qid == 0
                    || self.sqs.values().any(|s| s.cqid == qid)
                    || self.cqs.remove(&qid).is_none()
                {
                    return (Status::INVALID_QID, 0);
                }
                (Status::SUCCESS, 0)
            }
            admin::ABORT => {
                let (sqid, cid) = (sqe.cdw[0] as u16, (sqe.cdw[0] >> 16) as u16);
                if let Some(i) = self
                    .pending
                    .iter()
                    .position(|p| p.sqid == sqid && p.cid == cid)
                {
                    if let Some(mut p) = self.pending.remove(i) {
                        p.status = Status::ABORT_REQUESTED;
                        self.post(p.sqid, p.cqid, p.cid, p.status, 0);
                        lock(&self.shared.stats).aborted += 1;
                        return (Status::SUCCESS, 0);
                    }
                }
                if let Some(i) = self
                    .late
                    .iter()
                    .position(|l| l.sqid == sqid && l.cid == cid)
                {
                    // It completes before the abort's answer.
                    let l = self.late.remove(i);
                    self.post(l.sqid, l.cqid, l.cid, l.status, l.result);
                }
                (Status::SUCCESS, 1)
            }
            _ => (Status::INVALID_OPCODE, 0),
        }
    }

    /// Whether an IO command touches a block made to hang.
    pub(super) fn hung(&self, sqe: &Sqe) -> bool {
        let f = lock(&self.shared.faults);
        if f.hung_blocks.is_empty() || !matches!(sqe.opcode(), io::READ | io::WRITE) {
            return false;
        }
        let slba = u64::from(sqe.cdw[0]) | u64::from(sqe.cdw[1]) << 32;
        let n = u64::from(sqe.cdw[2] & 0xffff) + 1;
        (slba..slba.saturating_add(n)).any(|b| f.hung_blocks.contains(&(sqe.nsid, b)))
    }

    fn namespace(&self, nsid: u32) -> Option<&(u32, u64)> {
        nsid.checked_sub(1)
            .and_then(|i| self.config.namespaces.get(i as usize))
    }

    pub(super) fn io(&mut self, sqe: &Sqe) -> (Status, u32) {
        lock(&self.shared.stats).io_commands += 1;
        let Some(&(bs, blocks)) = self.namespace(sqe.nsid) else {
            return (Status::INVALID_NAMESPACE, 0);
        };
        {
            let mut f = lock(&self.shared.faults);
            if let Some(seen) = &mut f.cids {
                seen.push(sqe.cid());
            }
            if f.not_ready > 0 {
                f.not_ready -= 1;
                return (Status::NAMESPACE_NOT_READY, 0);
            }
        }
        let ns = sqe.nsid - 1;
        let bs = bs as usize;
        let in_range = |slba: u64, n: u64| slba.checked_add(n).is_some_and(|e| e <= blocks);
        match sqe.opcode() {
            io::FLUSH => (Status::SUCCESS, 0),
            io::READ | io::WRITE => {
                let (slba, n) = (sqe.slba(), sqe.nlb() as u64);
                if !in_range(slba, n) {
                    return (Status::LBA_OUT_OF_RANGE, 0);
                }
                let bytes = n as usize * bs;
                if self.config.mdts != 0 && bytes > PAGE << self.config.mdts {
                    return (Status::INVALID_FIELD, 0);
                }
                let write = sqe.opcode() == io::WRITE;
                let bad = {
                    let f = lock(&self.shared.faults);
                    (slba..slba + n).any(|b| f.bad_blocks.contains(&(sqe.nsid, b)))
                };
                if bad {
                    return (
                        if write {
                            Status::WRITE_FAULT
                        } else {
                            Status::UNRECOVERED_READ
                        },
                        0,
                    );
                }
                {
                    let mut st = lock(&self.shared.stats);
                    st.largest_transfer = st.largest_transfer.max(bytes as u64);
                }
                if self.config.null_data {
                    let Some(iommu) = self.shared.dma() else {
                        return (Status::DATA_TRANSFER, 0);
                    };
                    return match self.prp_segments(&iommu, sqe, bytes) {
                        Some(_) => (Status::SUCCESS, 0),
                        None => (Status::DATA_TRANSFER, 0),
                    };
                }
                let mut data = std::mem::take(&mut self.data[ns as usize]);
                let range = slba as usize * bs..(slba as usize * bs + bytes);
                let ok = if write {
                    self.transfer_from(sqe, &mut data[range])
                } else {
                    let src = &data[range];
                    self.transfer(sqe, bytes, |dst| dst.copy_from_slice(src))
                };
                self.data[ns as usize] = data;
                if ok {
                    (Status::SUCCESS, 0)
                } else {
                    (Status::DATA_TRANSFER, 0)
                }
            }
            io::WRITE_ZEROES => {
                let (slba, n) = (sqe.slba(), sqe.nlb() as u64);
                if !in_range(slba, n) {
                    return (Status::LBA_OUT_OF_RANGE, 0);
                }
                if self.config.null_data {
                    return (Status::SUCCESS, 0);
                }
                self.data[ns as usize][slba as usize * bs..(slba + n) as usize * bs].fill(0);
                (Status::SUCCESS, 0)
            }
            io::DSM => {
                let nr = (sqe.cdw[0] & 0xff) as usize + 1;
                let mut raw = vec![0u8; nr * 16];
                if !self.transfer_from(sqe, &mut raw) {
                    return (Status::DATA_TRANSFER, 0);
                }
                if sqe.cdw[1] & io::DSM_AD != 0 && !self.config.null_data {
                    for r in raw.chunks_exact(16) {
                        let len = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as u64;
                        let slba = u64::from_le_bytes([
                            r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15],
                        ]);
                        if !in_range(slba, len) {
                            return (Status::LBA_OUT_OF_RANGE, 0);
                        }
                        self.data[ns as usize][slba as usize * bs..(slba + len) as usize * bs]
                            .fill(0);
                    }
                }
                (Status::SUCCESS, 0)
            }
            _ => (Status::INVALID_OPCODE, 0),
        }
    }

    /// The memory an SGL describes (a data block, or a last segment of data
    /// blocks), translated; it must add up to `bytes`.
    fn sgl_segments(
        &self,
        iommu: &BTreeMap<u64, (usize, usize)>,
        sqe: &Sqe,
        bytes: usize,
    ) -> Option<Vec<(usize, usize)>> {
        if !self.config.sgl {
            return None;
        }
        let descriptors: Vec<(u64, u64)> = match (sqe.prp2 >> 56) as u8 {
            spec::SGL_DATA_BLOCK => vec![(sqe.prp1, sqe.prp2)],
            spec::SGL_LAST_SEGMENT => {
                let len = sqe.prp2 as u32 as usize;
                if len == 0 || !len.is_multiple_of(16) || len > PAGE {
                    return None;
                }
                let p = lookup(iommu, sqe.prp1, len)? as *const u64;
                // SAFETY: mapped for `len` bytes.
                (0..len / 16)
                    .map(|i| unsafe {
                        (
                            p.add(2 * i).read_unaligned(),
                            p.add(2 * i + 1).read_unaligned(),
                        )
                    })
                    .collect()
            }
            _ => return None,
        };
        let mut segs = Vec::with_capacity(descriptors.len());
        let mut total = 0;
        for (addr, hi) in descriptors {
            let len = hi as u32 as usize;
            if (hi >> 56) as u8 != spec::SGL_DATA_BLOCK || len == 0 {
                return None;
            }
            segs.push((lookup(iommu, addr, len)?, len));
            total += len;
        }
        (total == bytes).then_some(segs)
    }

    /// The memory a command's PRPs (or SGL) describe for `bytes` bytes,
    /// translated.
    fn prp_segments(
        &self,
        iommu: &BTreeMap<u64, (usize, usize)>,
        sqe: &Sqe,
        bytes: usize,
    ) -> Option<Vec<(usize, usize)>> {
        match (sqe.cdw0 >> 14) & 3 {
            0 => {}
            1 => return self.sgl_segments(iommu, sqe, bytes),
            _ => return None,
        }
        let mut segs = Vec::new();
        let first = (PAGE - (sqe.prp1 as usize % PAGE)).min(bytes);
        segs.push((lookup(iommu, sqe.prp1, first)?, first));
        let mut left = bytes - first;
        if left == 0 {
            return Some(segs);
        }
        if left <= PAGE {
            if !(sqe.prp2 as usize).is_multiple_of(PAGE) {
                return None;
            }
            segs.push((lookup(iommu, sqe.prp2, left)?, left));
            return Some(segs);
        }
        let mut list = sqe.prp2;
        if !list.is_multiple_of(8) {
            return None;
        }
        while left > 0 {
            let entry: u64 = {
                let p = lookup(iommu, list, 8)?;
                // SAFETY: mapped for 8 bytes.
                unsafe { (p as *const u64).read_unaligned() }
            };
            let last_in_page = (list as usize % PAGE) == PAGE - 8;
            if last_in_page && left > PAGE {
                list = entry; // chained list
                continue;
            }
            if !(entry as usize).is_multiple_of(PAGE) {
                return None;
            }
            let n = left.min(PAGE);
            segs.push((lookup(iommu, entry, n)?, n));
            left -= n;
            list += 8;
        }
        Some(segs)
    }

    /// Fill the command's memory (device to host).
    fn transfer(&self, sqe: &Sqe, bytes: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        let Some(iommu) = self.shared.dma() else {
            return false;
        };
        let Some(segs) = self.prp_segments(&iommu, sqe, bytes) else {
            lock(&self.shared.stats).iommu_faults += 1;
            return false;
        };
        let mut tmp = vec![0u8; bytes];
        fill(&mut tmp);
        let mut at = 0;
        for (p, n) in segs {
            // SAFETY: translated through the IOMMU map, which keeps the
            // driver from unmapping while the read lock is held.
            unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr().add(at), p as *mut u8, n) };
            at += n;
        }
        true
    }

    /// Read the command's memory (host to device).
    fn transfer_from(&self, sqe: &Sqe, dst: &mut [u8]) -> bool {
        let Some(iommu) = self.shared.dma() else {
            return false;
        };
        let Some(segs) = self.prp_segments(&iommu, sqe, dst.len()) else {
            lock(&self.shared.stats).iommu_faults += 1;
            return false;
        };
        let mut at = 0;
        for (p, n) in segs {
            // SAFETY: as in transfer.
            unsafe { std::ptr::copy_nonoverlapping(p as *const u8, dst.as_mut_ptr().add(at), n) };
            at += n;
        }
        true
    }
}
