//! Replay after a start: every durable record since the last checkpoint
//! goes to the members again, write-through records first, then the
//! write-back data still newer than them (with parity brought along).

use crate::raid::RaidError;
use std::sync::Arc;

use bdev::{BlockDevice, IoOp};

use super::codec::{
    block_size_ok, decode_super, encode_super, record_ok, seal, u32_at, u64_at, write_header,
    Entry, MAX_ENTRIES, REC_MAGIC, VOLUME_RECORD,
};
use super::{Journal, Super};
use crate::raid::geometry::Raid5Geometry;
use crate::raid::metaio::sync;
use crate::raid::parity::xor_into;

/// What replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// Records written again to the members.
    pub records: u64,
    /// Blocks written.
    pub blocks: u64,
}

impl Journal {
    /// Open the journal on `dev` after a start: write every record since
    /// the last checkpoint to `members` (by slot; `None` for a missing
    /// member, whose blocks are skipped: it is rebuilt later), flush them,
    /// and checkpoint. Write-back records need the volume's geometry, to
    /// update parity. Returns the journal, ready for service.
    pub fn replay(
        dev: Arc<dyn BlockDevice>,
        members: &[Option<Arc<dyn BlockDevice>>],
        geo: Option<&Raid5Geometry>,
    ) -> Result<(Arc<Journal>, ReplayReport), RaidError> {
        let bs = dev.info().block_size as usize;
        block_size_ok(dev.as_ref())?;
        let mut b = vec![0u8; bs];
        sync(dev.as_ref(), IoOp::Read, 0, &mut b)?;
        let s = decode_super(&b)
            .map_err(|e| RaidError::Invalid(format!("{}: {e}", dev.info().name)))?;
        if s.log_blocks + 1 > dev.info().num_blocks {
            return Err(RaidError::Invalid(format!(
                "{}: journal superblock claims a log larger than the device",
                dev.info().name
            )));
        }
        // Read the whole log, in pieces the device takes at once.
        let step = (dev.info().max_transfer as usize / bs).clamp(1, 1024);
        let mut log = vec![0u8; s.log_blocks as usize * bs];
        let mut at = 0;
        while at < s.log_blocks as usize {
            let n = step.min(s.log_blocks as usize - at);
            sync(
                dev.as_ref(),
                IoOp::Read,
                1 + at as u64,
                &mut log[at * bs..(at + n) * bs],
            )?;
            at += n;
        }
        // Find the valid records.
        let mut found: Vec<(u64, usize, usize)> = Vec::new();
        let mut i = 0usize;
        let total = s.log_blocks as usize;
        while i < total {
            let h = &log[i * bs..(i + 1) * bs];
            let ok = u64_at(h, 0) == REC_MAGIC && u64_at(h, 8) == s.nonce;
            let seq = u64_at(h, 16);
            let blocks = u32_at(h, 24) as usize;
            let entries = (u32_at(h, 28) & !VOLUME_RECORD) as usize;
            if ok
                && seq > s.checkpoint_seq
                && blocks >= 1
                && i + blocks <= total
                && entries <= MAX_ENTRIES
                && record_ok(&log[i * bs..(i + blocks) * bs], bs)
            {
                found.push((seq, i, blocks));
                i += blocks;
                continue;
            }
            i += 1;
        }
        found.sort_unstable();
        let mut report = ReplayReport::default();
        let mut max_seq = s.checkpoint_seq;
        // Pass 1: write-through records (data and parity, as they went to
        // the members), in order; remember the newest record of each block.
        // Pass 2: write-back data still newer than that, in order, with
        // parity brought along (members never saw it before a reclaim).
        let mut newest: std::collections::HashMap<(usize, u64), u64> = Default::default();
        // A degraded volume's write-back data needs read-modify-write,
        // which a second replay after a crash in this one would apply to
        // half-written rows. So its results are computed in memory first,
        // logged as write-through records (which a second replay applies
        // instead), and only then written to the members.
        let degraded = members.iter().any(|m| m.is_none());
        let mut overlay = Overlay {
            bs,
            blocks: Default::default(),
            direct: !degraded,
        };
        for pass in [false, true] {
            for &(seq, i, blocks) in &found {
                let h = &log[i * bs..(i + 1) * bs];
                let volume = u32_at(h, 28) & VOLUME_RECORD != 0;
                if volume != pass {
                    continue;
                }
                let entries = (u32_at(h, 28) & !VOLUME_RECORD) as usize;
                let mut data = (i + 1) * bs;
                let end = (i + blocks) * bs;
                for k in 0..entries {
                    let e = 32 + k * 16;
                    let (member, count, block) = (
                        u32_at(h, e) as usize,
                        u32_at(h, e + 4) as usize,
                        u64_at(h, e + 8),
                    );
                    let len = count * bs;
                    if data + len > end {
                        return Err(RaidError::Invalid(format!(
                            "journal record {seq} is inconsistent"
                        )));
                    }
                    let run = &log[data..data + len];
                    data += len;
                    if !volume {
                        for b in block..block + count as u64 {
                            newest.insert((member, b), seq);
                        }
                        if let Some(Some(m)) = members.get(member) {
                            sync(m.as_ref(), IoOp::Write, block, &mut run.to_vec())?;
                            report.blocks += count as u64;
                        }
                        continue;
                    }
                    let geo = geo.ok_or_else(|| {
                        RaidError::Invalid(format!("journal record {seq} holds write-back data, which needs a RAID5 volume's geometry"))
                    })?;
                    // Sub-runs of blocks no later write-through record wrote.
                    let mut k0 = 0;
                    while k0 < count {
                        let fresh = |k: usize| {
                            newest
                                .get(&(member, block + k as u64))
                                .is_none_or(|&w| w < seq)
                        };
                        if !fresh(k0) {
                            k0 += 1;
                            continue;
                        }
                        let mut k1 = k0 + 1;
                        while k1 < count && fresh(k1) {
                            k1 += 1;
                        }
                        replay_volume_run(
                            geo,
                            members,
                            &mut overlay,
                            member,
                            block + k0 as u64,
                            &run[k0 * bs..k1 * bs],
                        )?;
                        report.blocks += (k1 - k0) as u64;
                        k0 = k1;
                    }
                }
                report.records += 1;
                max_seq = max_seq.max(seq);
            }
        }
        if !overlay.blocks.is_empty() {
            max_seq = log_overlay(&dev, &s, &found, &overlay, max_seq)?;
            for (&(m, b), data) in &overlay.blocks {
                if let Some(Some(d)) = members.get(m) {
                    sync(d.as_ref(), IoOp::Write, b, &mut data.clone())?;
                }
            }
        }
        for m in members.iter().flatten() {
            sync(m.as_ref(), IoOp::Flush, 0, &mut [])?;
        }
        let s = Super {
            checkpoint_seq: max_seq,
            ..s
        };
        let mut b = encode_super(&s, bs);
        sync(dev.as_ref(), IoOp::Write, 0, &mut b)?;
        sync(dev.as_ref(), IoOp::Flush, 0, &mut [])?;
        Ok((Self::with(dev, &s), report))
    }
}

/// Put write-back data `new` for `member` at member block `block` (one
/// chunk's run, so one stripe row range) and make the rows' parity match:
/// from all the data, or read-modify-write when another data member is
/// missing (which needs the rows consistent before: a crash during the
/// replay of a degraded write-back volume can leave such rows wrong).
fn replay_volume_run(
    geo: &Raid5Geometry,
    members: &[Option<Arc<dyn BlockDevice>>],
    io: &mut Overlay,
    member: usize,
    block: u64,
    new: &[u8],
) -> Result<(), RaidError> {
    if block < geo.data_offset() || member >= geo.members() as usize {
        return Err(RaidError::Invalid(format!(
            "write-back record names member {member} block {block}, outside the volume"
        )));
    }
    let stripe = (block - geo.data_offset()) / geo.chunk_blocks();
    let parity = geo.parity_member(stripe) as usize;
    if parity == member {
        return Err(RaidError::Invalid(format!(
            "write-back record puts data on the parity member of stripe {stripe}"
        )));
    }
    let dev = |m: usize| members.get(m).and_then(|d| d.as_ref());
    let len = new.len();
    let read = |io: &Overlay, m: usize| io.read(members, m, block, len);
    if dev(parity).is_none() {
        // No parity to keep: the data alone.
        if dev(member).is_some() {
            io.write(members, member, block, new)?;
        }
        return Ok(());
    };
    let others: Vec<usize> = (0..geo.members() as usize)
        .filter(|&m| m != member && m != parity)
        .collect();
    let par = match dev(member) {
        // Another data member is missing: only a read-modify-write can
        // keep its blocks recoverable (in memory first, see `Overlay`).
        Some(_) if others.iter().any(|&o| dev(o).is_none()) => {
            let mut par = read(io, parity)?;
            xor_into(&mut par, &[&read(io, member)?, new]);
            par
        }
        // Otherwise parity from all the data (reconstruct-write): right
        // whatever the row held, so replaying twice is harmless.
        _ => {
            let mut par = new.to_vec();
            for &o in &others {
                if dev(o).is_none() {
                    return Err(RaidError::Invalid(format!(
                        "stripe {stripe} misses two members; its write-back data cannot be placed"
                    )));
                }
                xor_into(&mut par, &[&read(io, o)?]);
            }
            par
        }
    };
    if dev(member).is_some() {
        io.write(members, member, block, new)?;
    }
    io.write(members, parity, block, &par)
}

/// Where replay's read-modify-writes go: straight to the members, or
/// (`direct` false) into memory, block by block, with reads seeing what
/// was put there.
struct Overlay {
    bs: usize,
    blocks: std::collections::BTreeMap<(usize, u64), Vec<u8>>,
    direct: bool,
}

impl Overlay {
    fn read(
        &self,
        members: &[Option<Arc<dyn BlockDevice>>],
        m: usize,
        block: u64,
        len: usize,
    ) -> Result<Vec<u8>, RaidError> {
        let dev = members
            .get(m)
            .and_then(|d| d.as_ref())
            .ok_or_else(|| RaidError::Invalid(format!("replay read of missing member {m}")))?;
        let mut b = vec![0u8; len];
        sync(dev.as_ref(), IoOp::Read, block, &mut b)?;
        for (i, chunk) in b.chunks_exact_mut(self.bs).enumerate() {
            if let Some(o) = self.blocks.get(&(m, block + i as u64)) {
                chunk.copy_from_slice(o);
            }
        }
        Ok(b)
    }

    fn write(
        &mut self,
        members: &[Option<Arc<dyn BlockDevice>>],
        m: usize,
        block: u64,
        data: &[u8],
    ) -> Result<(), RaidError> {
        if self.direct {
            let dev = members
                .get(m)
                .and_then(|d| d.as_ref())
                .ok_or_else(|| RaidError::Invalid(format!("replay write to missing member {m}")))?;
            return sync(dev.as_ref(), IoOp::Write, block, &mut data.to_vec());
        }
        for (i, chunk) in data.chunks_exact(self.bs).enumerate() {
            self.blocks.insert((m, block + i as u64), chunk.to_vec());
        }
        Ok(())
    }
}

/// Write `overlay`'s blocks into the log as write-through records with
/// sequence numbers after `max_seq`, in the free space after the newest
/// live record (`found`: sequence, position, blocks), and flush: a crash
/// after this replays them instead of the read-modify-writes. Returns the
/// last sequence used.
fn log_overlay(
    dev: &Arc<dyn BlockDevice>,
    s: &Super,
    found: &[(u64, usize, usize)],
    overlay: &Overlay,
    max_seq: u64,
) -> Result<u64, RaidError> {
    let bs = overlay.bs;
    let total = s.log_blocks as usize;
    // Runs of consecutive blocks per member, then records of at most
    // MAX_ENTRIES runs and 256 blocks.
    let mut runs: Vec<(usize, u64, Vec<&[u8]>)> = Vec::new();
    for (&(m, b), data) in &overlay.blocks {
        match runs.last_mut() {
            Some((rm, rb, v)) if *rm == m && *rb + v.len() as u64 == b && v.len() < 256 => {
                v.push(data)
            }
            _ => runs.push((m, b, vec![data])),
        }
    }
    let mut records: Vec<Vec<u8>> = Vec::new();
    let mut batch: Vec<&(usize, u64, Vec<&[u8]>)> = Vec::new();
    let flush_batch = |batch: &mut Vec<&(usize, u64, Vec<&[u8]>)>, records: &mut Vec<Vec<u8>>| {
        if batch.is_empty() {
            return;
        }
        let blocks: usize = batch.iter().map(|r| r.2.len()).sum();
        let entries: Vec<Entry> = batch
            .iter()
            .map(|(m, b, data)| Entry {
                member: *m as u32,
                count: data.len() as u32,
                block: *b,
            })
            .collect();
        let mut r = Vec::new();
        write_header(&mut r, bs, s.nonce, &entries, blocks, false);
        for (k, d) in batch.iter().flat_map(|run| run.2.iter()).enumerate() {
            r[(1 + k) * bs..(2 + k) * bs].copy_from_slice(d);
        }
        records.push(r);
        batch.clear();
    };
    let mut in_batch = 0;
    for run in &runs {
        if batch.len() == MAX_ENTRIES || in_batch + run.2.len() > 256 {
            flush_batch(&mut batch, &mut records);
            in_batch = 0;
        }
        in_batch += run.2.len();
        batch.push(run);
    }
    flush_batch(&mut batch, &mut records);
    // The free space runs from the end of the newest live record to the
    // start of the oldest, around the ring; a record never wraps.
    let newest = found.iter().max_by_key(|r| r.0);
    let oldest = found.iter().min_by_key(|r| r.0);
    let (mut pos, limit) = match (newest, oldest) {
        (Some(n), Some(o)) => {
            let head = n.1 + n.2;
            let tail = if o.1 >= head { o.1 } else { o.1 + total };
            (head, tail)
        }
        _ => (0, total),
    };
    let mut seq = max_seq;
    for r in &mut records {
        let blocks = r.len() / bs;
        if pos % total + blocks > total {
            pos += total - pos % total;
        }
        if pos + blocks > limit {
            return Err(RaidError::Invalid(format!(
                "the journal has no free room to log the replay of a degraded volume ({} blocks needed)",
                blocks
            )));
        }
        seq += 1;
        seal(r, bs, seq);
        sync(dev.as_ref(), IoOp::Write, 1 + (pos % total) as u64, r)?;
        pos += blocks;
    }
    sync(dev.as_ref(), IoOp::Flush, 0, &mut [])?;
    Ok(seq)
}
