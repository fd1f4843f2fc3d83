//! md's write-behind on a mirror: a write's copies to the write-mostly
//! members finish in the background after the write is acknowledged;
//! a channel dropped with copies still out waits for them, then fails
//! the members that never took them.

use std::sync::atomic::Ordering;

use bdev::{Completion, IoError, IoOp, IoRequest, SgList};

use super::{Raid1Channel, Resend, BEHIND, MEMBER_BITS};

/// A write's copies to the write-mostly members, finishing in the
/// background after the write was acknowledged (md's write-behind).
pub(super) struct BehindIo {
    pub(super) op: IoOp,
    /// Member block and count.
    pub(super) offset: u64,
    pub(super) blocks: u64,
    /// A copy of a write's data: the guest's buffer is given back when the
    /// write is acknowledged. Read by the member requests in flight.
    pub(super) data: Option<Box<[u8]>>,
    /// Member requests in flight or waiting to be resent.
    pub(super) pending: u32,
    /// Write-intent bitmap regions it is counted in: they stay dirty until
    /// the write-mostly members have it.
    pub(super) in_bitmap: Option<(u64, u64)>,
    /// The write's block keys (`WriteBehind::lock_blocks`), held until the
    /// write-mostly members have it.
    pub(super) keys: Option<(u64, u64)>,
    /// Members that took it (bit per slot).
    pub(super) took: u64,
    /// The write it belongs to, until that write is answered.
    pub(super) parent: Option<usize>,
}

/// How long dropping a channel waits for its background writes.
const BEHIND_DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

impl Raid1Channel {
    /// Whether write `pi` goes to the write-mostly members in the
    /// background, and if so the record it takes (data copied, bitmap
    /// regions counted again, block keys handed over). Only with a
    /// write-intent bitmap (md's rule: a crash must leave the region marked
    /// for the resync), with another member to acknowledge it, and not
    /// while a rebuild, scrub or replacement copies regions.
    pub(super) fn go_behind(&mut self, pi: usize, targets: &[usize]) -> Option<usize> {
        let p = self.parents[pi].as_ref()?;
        let b = self.bitmap.as_ref()?;
        if self.rebuild_target.is_some()
            || self.replace.is_some()
            || self.scrubbing.load(Ordering::Relaxed)
            || p.keys.is_none()
            || !targets.iter().any(|&m| self.write_mostly[m])
            || targets.iter().all(|&m| self.write_mostly[m])
            || !self.behind.try_take()
        {
            return None;
        }
        let data = (p.op == IoOp::Write).then(|| {
            let mut d = vec![0u8; p.sg.iter().map(|v| v.len()).sum()].into_boxed_slice();
            // SAFETY: the parent's list is valid until it completes.
            unsafe { crate::raid::sg::copy_out(&p.sg, 0, &mut d) };
            d
        });
        let in_bitmap = p.in_bitmap.inspect(|&(r0, r1)| b.begin(r0, r1));
        let io = BehindIo {
            op: p.op,
            offset: p.offset + self.data_offset,
            blocks: p.blocks,
            data,
            pending: 0,
            in_bitmap,
            keys: None,
            took: 0,
            parent: Some(pi),
        };
        let bi = match self.behind_free.pop() {
            Some(i) => {
                self.behind_ios[i] = Some(io);
                i
            }
            None => {
                self.behind_ios.push(Some(io));
                self.behind_ios.len() - 1
            }
        };
        // The keys stay until the write-mostly members have the write.
        if let (Some(p), Some(io)) = (self.parents[pi].as_mut(), self.behind_ios[bi].as_mut()) {
            io.keys = p.keys.take();
        }
        self.behind_count += 1;
        Some(bi)
    }

    /// Submit background write `bi` to member `m`; true if taken.
    pub(super) fn submit_behind(&mut self, bi: usize, m: usize) -> bool {
        let Some(Some(io)) = self.behind_ios.get_mut(bi) else {
            return false;
        };
        let sg = match io.data.as_mut() {
            Some(d) => crate::raid::sg::of(d, 0, d.len()),
            None => SgList::new(),
        };
        let req = IoRequest {
            op: io.op,
            offset_blocks: io.offset,
            num_blocks: io.blocks,
            sg,
            tag: Self::behind_tag(bi, m),
        };
        let taken = self.submit_to(m, req);
        if taken {
            self.behind_out[m] += 1;
        }
        taken
    }

    /// A background write to member `m` came back.
    pub(super) fn on_behind(&mut self, c: Completion) {
        let bi = ((c.tag & !BEHIND) >> MEMBER_BITS) as usize;
        let m = (c.tag & ((1 << MEMBER_BITS) - 1)) as usize;
        if m < self.outstanding.len() {
            self.outstanding[m] = self.outstanding[m].saturating_sub(1);
            self.behind_out[m] = self.behind_out[m].saturating_sub(1);
        }
        let discard = matches!(self.behind_ios.get(bi), Some(Some(io)) if io.op == IoOp::Discard);
        let result = match c.result {
            // A discard the member cannot take fails no member, as in the
            // foreground (`on_child`): fstrim failed a healthy mirror
            // (audit).
            Err(e) if discard && super::unsupported(e) => Ok(()),
            r => r,
        };
        if let Err(e) = result {
            // The write was acknowledged (the other members have it) or
            // waits for this outcome: a member without it is failed, the
            // last one in sync too (it would serve the old data).
            self.fail_member_unless_last(m, e, false);
        }
        let Some(Some(io)) = self.behind_ios.get_mut(bi) else {
            return;
        };
        if result.is_ok() {
            io.took |= 1 << m;
        }
        io.pending = io.pending.saturating_sub(1);
        if io.pending == 0 {
            self.end_behind(bi);
        }
    }

    /// Background write `bi` is over.
    pub(super) fn end_behind(&mut self, bi: usize) {
        if let Some(io) = self.behind_ios.get_mut(bi).and_then(Option::take) {
            if let (Some((r0, r1)), Some(b)) = (io.in_bitmap, &self.bitmap) {
                b.end(r0, r1);
            }
            if let Some((first, n)) = io.keys {
                self.behind.unlock_blocks(first, n);
            }
            self.behind_free.push(bi);
            self.behind_count -= 1;
            self.behind.give_back();
            // Its write not answered yet: a write-mostly member has it
            // now, and one waiting for this outcome is answered.
            if let Some(pi) = io.parent {
                let Some(p) = self.parents.get_mut(pi).and_then(|p| p.as_mut()) else {
                    return;
                };
                p.behind = None;
                p.took |= io.took;
                if p.pending == 0 {
                    self.finish(pi);
                }
            }
        }
    }
}

impl Drop for Raid1Channel {
    /// Background writes read buffers this channel owns: wait for them
    /// (a volume's reconfiguration drained them already; this covers a
    /// consumer that drops its channel right after its own requests).
    fn drop(&mut self) {
        // A write dropped while it waited must not keep every later one
        // out of the background.
        for p in self.parents.iter_mut().flatten() {
            if std::mem::take(&mut p.barrier) {
                self.behind.lower_barrier();
            }
        }
        let t = std::time::Instant::now();
        let mut scratch = Vec::new();
        while self.behind_count > 0 && t.elapsed() < BEHIND_DRAIN {
            self.pump_resend();
            crate::raid::members::poll_members(&mut self.members, &mut scratch);
            for c in scratch.drain(..) {
                if c.tag & BEHIND != 0 {
                    self.on_behind(c);
                }
            }
            std::hint::spin_loop();
        }
        if self.behind_count > 0 {
            tracing::error!(volume = %self.info.name, writes = self.behind_count, "write-mostly members never completed background writes: they are failed, and the buffers leaked");
            // Their copies are not the volume's: failed, nothing reads
            // them and a re-add copies their regions (they stayed in sync
            // without acknowledged writes, and a later failure of the
            // others served old data). First, so the bitmap keeps the
            // regions dirty as for any failed member.
            // Only those with a copy still out or waiting to be sent: a
            // healthy second write-mostly member, or the last good copies,
            // stay.
            let stuck: Vec<usize> = (0..self.members.len())
                .filter(|&m| {
                    self.write_mostly[m]
                        && (self.behind_out[m] > 0
                            || self
                                .resend
                                .iter()
                                .any(|r| matches!(r, Resend::Behind(_, x) if *x == m)))
                })
                .collect();
            for m in stuck {
                self.fail_member(m, IoError::TimedOut);
            }
            for bi in 0..self.behind_ios.len() {
                let Some(io) = self.behind_ios[bi].take() else {
                    continue;
                };
                if let (Some((r0, r1)), Some(b)) = (io.in_bitmap, &self.bitmap) {
                    b.end(r0, r1);
                }
                // The blocks' keys go back: later writes to them waited
                // for good.
                if let Some((first, n)) = io.keys {
                    self.behind.unlock_blocks(first, n);
                }
                // A member may still read it.
                std::mem::forget(io.data);
                self.behind.give_back();
            }
        }
    }
}
