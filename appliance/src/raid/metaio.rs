//! Synchronous IO of metadata (superblocks, the journal's superblock and
//! replay, bitmaps) from control threads, never the data path.

use std::time::{Duration, Instant};

use bdev::{BlockDevice, IoOp, IoRequest, IoVec, SgList, SubmitError};

/// Synchronous IO on a fresh channel (control threads only: journal and
/// superblock IO, never the data path).
pub(crate) fn sync(
    dev: &dyn BlockDevice,
    op: IoOp,
    block: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    let bs = dev.info().block_size as usize;
    let mut ch = dev.open_channel().map_err(|e| e.to_string())?;
    let req = if op == IoOp::Flush {
        IoRequest::flush(1)
    } else {
        let mut sg = SgList::new();
        // SAFETY: `buf` outlives the request: we wait for its completion.
        sg.push(unsafe { IoVec::new(buf.as_mut_ptr(), buf.len()) });
        IoRequest {
            op,
            offset_blocks: block,
            num_blocks: (buf.len() / bs) as u64,
            sg,
            tag: 1,
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending = Some(req);
    let mut out = Vec::new();
    while let Some(r) = pending.take() {
        if let Err(SubmitError::Busy(r)) = ch.submit(r) {
            pending = Some(r);
            ch.poll(&mut out);
        }
    }
    while out.is_empty() {
        ch.poll(&mut out);
        if Instant::now() > deadline {
            return Err(format!("{}: {op:?} timed out", dev.info().name));
        }
        std::thread::yield_now();
    }
    out[0]
        .result
        .map_err(|e| format!("{}: {op:?}: {e}", dev.info().name))
}
