//! One submission/completion queue pair in memory the controller reaches by
//! DMA: the ring indices, the phase bit and the doorbells. Used by the
//! admin queue and by every IO channel.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::error::NvmeError;
use crate::spec::{cq_doorbell, sq_doorbell, Cqe, Sqe};
use crate::transport::{Bar, DmaMem, Transport};

/// What the controller is told of a queue pair when it is made (Create
/// I/O Completion and Submission Queue): plain values, so a control thread
/// can make it while the pair's owner goes on polling.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueShape {
    pub qid: u16,
    pub depth: u16,
    pub sq_iova: u64,
    pub cq_iova: u64,
}

pub(crate) struct QueuePair {
    pub qid: u16,
    pub depth: u16,
    sq: DmaMem,
    cq: DmaMem,
    tail: u16,
    head: u16,
    phase: bool,
    bar: Bar,
    sq_db: usize,
    cq_db: usize,
}

impl QueuePair {
    pub fn new(
        transport: &Arc<dyn Transport>,
        qid: u16,
        depth: u16,
        stride: usize,
    ) -> Result<QueuePair, NvmeError> {
        Ok(QueuePair {
            qid,
            depth,
            sq: DmaMem::new(transport, depth as usize * 64)?,
            cq: DmaMem::new(transport, depth as usize * 16)?,
            tail: 0,
            head: 0,
            phase: true,
            bar: transport.bar(),
            sq_db: sq_doorbell(qid, stride),
            cq_db: cq_doorbell(qid, stride),
        })
    }

    pub fn sq_iova(&self) -> u64 {
        self.sq.iova()
    }

    pub fn shape(&self) -> QueueShape {
        QueueShape {
            qid: self.qid,
            depth: self.depth,
            sq_iova: self.sq.iova(),
            cq_iova: self.cq.iova(),
        }
    }

    pub fn cq_iova(&self) -> u64 {
        self.cq.iova()
    }

    /// Place an entry at the tail. The caller guarantees a free entry (it
    /// never has more than depth - 1 commands outstanding).
    #[inline]
    pub fn push(&mut self, sqe: &Sqe) {
        // SAFETY: tail < depth, and the ring holds depth entries of 64 bytes;
        // the controller reads this entry only after the doorbell.
        unsafe {
            (self.sq.ptr() as *mut Sqe)
                .add(self.tail as usize)
                .write_volatile(*sqe)
        };
        self.tail = if self.tail + 1 == self.depth {
            0
        } else {
            self.tail + 1
        };
    }

    /// Tell the controller about everything pushed so far.
    #[inline]
    pub fn ring(&self) {
        self.bar.write32(self.sq_db, self.tail as u32);
    }

    /// The next completion, if the controller has posted one.
    #[inline]
    pub fn pop(&mut self) -> Option<Cqe> {
        // SAFETY: head < depth; the ring holds depth entries of 16 bytes.
        let entry = unsafe { (self.cq.ptr() as *mut Cqe).add(self.head as usize) };
        // The status dword carries the phase: read it first, with acquire,
        // so the rest of the entry is the controller's finished write.
        // SAFETY: aligned u32 inside the entry.
        let dw3 = unsafe { AtomicU32::from_ptr(&raw mut (*entry).status) }.load(Ordering::Acquire);
        if ((dw3 >> 16) & 1 == 1) != self.phase {
            return None;
        }
        // SAFETY: the controller has finished writing this entry (phase).
        let mut cqe = unsafe { entry.read_volatile() };
        cqe.status = dw3;
        self.head += 1;
        if self.head == self.depth {
            self.head = 0;
            self.phase = !self.phase;
        }
        Some(cqe)
    }

    /// Tell the controller which completions have been consumed.
    #[inline]
    pub fn ack(&self) {
        self.bar.write32(self.cq_db, self.head as u32);
    }

    /// Start over after a controller reset: empty rings, phase 1.
    pub fn reset(&mut self) {
        // SAFETY: the controller is disabled or the queue deleted, so nothing
        // else writes these rings.
        unsafe {
            std::ptr::write_bytes(self.cq.ptr(), 0, self.cq.len());
            std::ptr::write_bytes(self.sq.ptr(), 0, self.sq.len());
        }
        self.tail = 0;
        self.head = 0;
        self.phase = true;
    }
}
