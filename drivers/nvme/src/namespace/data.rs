//! Where a command's data is: PRPs or an SGL straight to the caller's
//! memory when it is registered for DMA, else the channel's bounce pages
//! (copied in for a write now, out for a read at completion).

use smallvec::SmallVec;

use super::{Bounce, Channel, PRP_PER_PAGE};
use crate::controller::translate;
use crate::spec::{self, Sqe, PAGE};
use bdev::IoOp;
use std::sync::atomic::Ordering;

impl Channel {
    /// PRPs straight to the caller's memory, when it is registered and
    /// PRP-shaped (only the first segment may start inside a page, only the
    /// last may end inside one).
    pub(super) fn direct_prps(
        &self,
        segs: &[(usize, usize)],
        list: &mut [u64],
        list_iova: u64,
        sqe: &mut Sqe,
    ) -> bool {
        let last = segs.len().wrapping_sub(1);
        let mut n = 0usize;
        for (i, &(ptr, len)) in segs.iter().enumerate() {
            let Some(iova) = translate(&self.regions, ptr, len) else {
                return false;
            };
            let end = iova + len as u64;
            let page = PAGE as u64;
            if (i == 0 && iova % 4 != 0)
                || (i > 0 && iova % page != 0)
                || (i != last && !end.is_multiple_of(page))
            {
                return false;
            }
            let mut p = iova;
            while p < end {
                if n == 0 {
                    sqe.prp1 = p;
                } else if n <= PRP_PER_PAGE {
                    list[n - 1] = p;
                } else {
                    return false;
                }
                n += 1;
                p = (p & !(page - 1)) + page;
            }
        }
        match n {
            0 => return false,
            1 => sqe.prp2 = 0,
            2 => sqe.prp2 = list[0],
            _ => sqe.prp2 = list_iova,
        }
        true
    }

    /// An SGL straight to the caller's memory, when the controller takes
    /// SGLs and every segment is registered: any shape PRPs cannot express
    /// (segments ending or starting inside pages) still avoids the copy.
    pub(super) fn direct_sgl(
        &self,
        segs: &[(usize, usize)],
        list: &mut [u64],
        list_iova: u64,
        sqe: &mut Sqe,
    ) -> bool {
        let Some(dword) = self.sgl else { return false };
        if segs.is_empty() || segs.len() > PAGE / 16 {
            return false;
        }
        for (i, &(ptr, len)) in segs.iter().enumerate() {
            let Some(iova) = translate(&self.regions, ptr, len) else {
                return false;
            };
            if dword && (iova % 4 != 0 || len % 4 != 0) {
                return false;
            }
            let [a, b] = spec::sgl_descriptor(iova, len as u32, spec::SGL_DATA_BLOCK);
            list[2 * i] = a;
            list[2 * i + 1] = b;
        }
        let [a, b] = if segs.len() == 1 {
            [list[0], list[1]]
        } else {
            spec::sgl_descriptor(list_iova, (segs.len() * 16) as u32, spec::SGL_LAST_SEGMENT)
        };
        sqe.prp1 = a;
        sqe.prp2 = b;
        sqe.cdw0 |= spec::PSDT_SGL;
        true
    }

    /// PRPs to bounce pages; a write's data is copied in now, a read's is
    /// copied out at completion. None when not enough pages are free.
    pub(super) fn bounce_prps(
        &mut self,
        segs: &[(usize, usize)],
        bytes: usize,
        op: IoOp,
        list: &mut [u64],
        list_iova: u64,
        sqe: &mut Sqe,
    ) -> Option<Bounce> {
        let need = bytes.div_ceil(PAGE);
        if self.free_bounce.len() < need {
            return None;
        }
        self.ctrl.bounced.fetch_add(1, Ordering::Relaxed);
        let at = self.free_bounce.len() - need;
        let pages: SmallVec<[u16; 8]> = self.free_bounce.drain(at..).collect();
        for (k, &pg) in pages.iter().enumerate() {
            let iova = self.bounce.iova() + pg as u64 * PAGE as u64;
            if k == 0 {
                sqe.prp1 = iova;
            } else {
                list[k - 1] = iova;
            }
        }
        sqe.prp2 = match need {
            1 => 0,
            2 => list[0],
            _ => list_iova,
        };
        if op == IoOp::Write {
            self.copy_bounce(&pages, segs, true);
        }
        Some(Bounce {
            pages,
            to: (op == IoOp::Read).then(|| segs.iter().copied().collect()),
        })
    }

    /// Copy between the caller's segments and bounce pages.
    pub(super) fn copy_bounce(&self, pages: &[u16], segs: &[(usize, usize)], into_pages: bool) {
        let mut pos = 0usize;
        for &(ptr, len) in segs {
            let mut done = 0;
            while done < len {
                let page = pages[pos / PAGE] as usize;
                let in_page = pos % PAGE;
                let n = (PAGE - in_page).min(len - done);
                // SAFETY: the page belongs to this command; the caller's
                // memory is valid for the request's life (IoVec contract).
                unsafe {
                    let b = self.bounce.ptr().add(page * PAGE + in_page);
                    let u = (ptr + done) as *mut u8;
                    if into_pages {
                        std::ptr::copy_nonoverlapping(u, b, n);
                    } else {
                        std::ptr::copy_nonoverlapping(b, u, n);
                    }
                }
                done += n;
                pos += n;
            }
        }
    }

    /// Keep the bounce pages of the command in `slot`, if it has any,
    /// until it completes.
    #[inline(always)]
    pub(super) fn keep_bounce(&mut self, slot: u16, bounce: Option<Bounce>) {
        if bounce.is_some() {
            self.slots[slot as usize].bounced = true;
            self.bounced[slot as usize] = bounce;
        }
    }
}
