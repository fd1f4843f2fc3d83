//! A guest request larger than the volume's device takes at once, sent to
//! it in pieces. virtio-blk has no request size limit besides seg_max x
//! size_max, which a guest with large pages exceeds whatever size_max
//! says; sizing seg_max from the device gave NVMe-backed volumes one page
//! per request. The pieces are made one at a time, as the channel takes
//! them (a device that takes 4 KiB at once would otherwise queue thousands
//! per request).

use bdev::{IoRequest, SgList};

/// A device request's tag: the queue slot, and in its upper half the
/// piece (each request in flight has its own tag, as devices track them;
/// an NVMe/TCP device splits its requests by tag itself).
pub(super) fn tag(slot: u32, piece: u64) -> u64 {
    u64::from(slot) | (piece << 32)
}

/// The queue slot a device completion's tag names.
pub(super) fn slot_of(tag: u64) -> usize {
    (tag & 0xffff_ffff) as usize
}

/// The pieces of one request, and how many went out.
pub(super) struct Pieces {
    io: IoRequest,
    /// Bytes a piece (whole blocks), of the request, and a block.
    part: u64,
    bytes: u64,
    block: u64,
    next: u64,
}

impl Pieces {
    /// `io` in pieces of at most `part_max` bytes of whole `block_size`
    /// blocks.
    pub(super) fn new(io: IoRequest, block_size: u32, part_max: u32) -> Pieces {
        let block = u64::from(block_size).max(1);
        Pieces {
            part: (u64::from(part_max) / block).max(1) * block,
            bytes: io.num_blocks * block,
            io,
            block,
            next: 0,
        }
    }

    /// How many pieces it takes.
    pub(super) fn count(&self) -> u64 {
        self.bytes.div_ceil(self.part)
    }

    /// The next piece to send (for queue slot `slot`), if any is left.
    pub(super) fn peek(&self, slot: u32) -> Option<IoRequest> {
        let off = self.next * self.part;
        if off >= self.bytes {
            return None;
        }
        let len = self.part.min(self.bytes - off);
        Some(IoRequest {
            op: self.io.op,
            offset_blocks: self.io.offset_blocks + off / self.block,
            num_blocks: len / self.block,
            sg: bdev::sg::slice(&self.io.sg, off as usize, len as usize),
            tag: tag(slot, self.next),
        })
    }

    /// The piece [`peek`](Self::peek) gave went out; whether any is left.
    pub(super) fn sent(&mut self) -> bool {
        self.next += 1;
        self.next * self.part < self.bytes
    }
}

/// What a taken request still owes its device, sent as the channel has
/// room, in order.
#[derive(Clone, Copy)]
pub(super) enum Owed {
    /// The rest of a slot's pieces.
    Pieces(u32),
    /// A slot's flush after its write (a driver without
    /// VIRTIO_BLK_F_FLUSH).
    Flush(u32),
}

/// A flush for queue slot `slot`.
pub(super) fn flush(slot: u32) -> IoRequest {
    IoRequest {
        op: bdev::IoOp::Flush,
        offset_blocks: 0,
        num_blocks: 0,
        sg: SgList::new(),
        tag: tag(slot, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_request_in_order_with_their_own_tags() {
        let mut buf = vec![0u8; 10 * 4096];
        let len = buf.len();
        let io = IoRequest {
            op: bdev::IoOp::Read,
            offset_blocks: 100,
            num_blocks: 10,
            sg: bdev::sg::of(&mut buf, 0, len),
            tag: 7,
        };
        // 3 blocks a piece (a limit that is not a whole number of blocks
        // rounds down).
        let mut p = Pieces::new(io, 4096, 3 * 4096 + 100);
        assert_eq!(p.count(), 4);
        let mut seen = Vec::new();
        loop {
            let io = p.peek(7).unwrap();
            assert_eq!(slot_of(io.tag), 7);
            seen.push((io.offset_blocks, io.num_blocks, io.tag >> 32, io.sg_bytes()));
            if !p.sent() {
                break;
            }
        }
        assert!(p.peek(7).is_none());
        assert_eq!(
            seen,
            vec![
                (100, 3, 0, 3 * 4096),
                (103, 3, 1, 3 * 4096),
                (106, 3, 2, 3 * 4096),
                (109, 1, 3, 4096)
            ]
        );
    }
}
