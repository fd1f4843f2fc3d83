//! Synchronous IO of metadata (superblocks, the journal's superblock and
//! replay, bitmaps) from control threads, never the data path.

use std::time::{Duration, Instant};

use bdev::{BlockDevice, IoChannel, IoOp, IoRequest, IoVec, SgList, SubmitError};

use super::RaidError;

/// How long a metadata IO may take before the caller gets an error.
const TIMEOUT: Duration = Duration::from_secs(30);

/// How long a metadata IO waits for a channel the device has no room
/// for now (its queue pairs all in use: not a failure, one let go makes
/// room). Refused at once, a superblock write failed a healthy member.
const CHANNEL_WAIT: Duration = Duration::from_secs(5);

fn open(dev: &dyn BlockDevice) -> Result<Box<dyn IoChannel>, bdev::BdevError> {
    let t = Instant::now();
    loop {
        match dev.open_channel() {
            Err(bdev::BdevError::Exhausted(_)) if t.elapsed() < CHANNEL_WAIT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// Synchronous IO on a fresh channel: `buf` is written from (or read
/// into) at `block`; a flush takes an empty `buf`. The request works on a
/// buffer of its own: one that has not finished by the deadline is left to
/// be (see `abandon`), so a device that answers late never writes into
/// memory that was given back.
pub(crate) fn sync(
    dev: &dyn BlockDevice,
    op: IoOp,
    block: u64,
    buf: &mut [u8],
) -> Result<(), RaidError> {
    let name = dev.info().name.clone();
    let io = |reason: String| RaidError::Io {
        device: name.clone(),
        what: format!("{op:?}"),
        reason,
    };
    let bs = dev.info().block_size as usize;
    let mut ch = open(dev).map_err(|e| RaidError::Io {
        device: name.clone(),
        what: format!("opening a channel for {op:?}"),
        reason: e.to_string(),
    })?;
    let mut own = buf.to_vec();
    // In requests the device takes (a replay's record, a bitmap may be
    // larger than one NVMe command), all on this one channel.
    let most = (dev.info().max_transfer as usize / bs).max(1) * bs;
    let mut reqs = Vec::new();
    if op == IoOp::Flush {
        reqs.push(IoRequest::flush(0));
    } else {
        for (k, at) in (0..own.len()).step_by(most).enumerate() {
            let len = most.min(own.len() - at);
            let mut sg = SgList::new();
            // SAFETY: `own` lives until the requests complete, or for good
            // if they do not in time (`abandon`).
            sg.push(unsafe { IoVec::new(own.as_mut_ptr().add(at), len) });
            reqs.push(IoRequest {
                op,
                offset_blocks: block + (at / bs) as u64,
                num_blocks: (len / bs) as u64,
                sg,
                tag: k as u64,
            });
        }
    }
    let deadline = Instant::now() + TIMEOUT;
    let timeout = |ch, own| {
        abandon(ch, own);
        Err(RaidError::Timeout {
            device: name.clone(),
            what: format!("{op:?}"),
            after: TIMEOUT,
        })
    };
    let want = reqs.len();
    let mut out = Vec::new();
    let mut pending: std::collections::VecDeque<IoRequest> = reqs.into();
    while let Some(r) = pending.pop_front() {
        if let Err(SubmitError::Busy(r)) = ch.submit(r) {
            pending.push_front(r);
            ch.poll(&mut out);
            if Instant::now() > deadline {
                return timeout(ch, own);
            }
        }
    }
    while out.len() < want {
        ch.poll(&mut out);
        if Instant::now() > deadline {
            return timeout(ch, own);
        }
        std::thread::yield_now();
    }
    for c in &out {
        c.result.map_err(|e| io(e.to_string()))?;
    }
    if op == IoOp::Read {
        buf.copy_from_slice(&own);
    }
    Ok(())
}

/// `len` bytes of `dev` from byte `at`, read in whole blocks; bytes past
/// the end of the device read as zero.
pub(crate) fn read_bytes(dev: &dyn BlockDevice, at: u64, len: u64) -> Result<Vec<u8>, RaidError> {
    let info = dev.info();
    let bs = u64::from(info.block_size);
    let size = info.num_blocks * bs;
    let end = (at + len).min(size);
    if at >= end {
        return Ok(vec![0; len as usize]);
    }
    let first = at / bs;
    let last = end.div_ceil(bs);
    let mut buf = vec![0u8; ((last - first) * bs) as usize];
    sync(dev, IoOp::Read, first, &mut buf)?;
    let skip = (at - first * bs) as usize;
    let mut out = buf[skip..skip + (end - at) as usize].to_vec();
    out.resize(len as usize, 0);
    Ok(out)
}

/// Keep `ch` and the buffer its request uses for good: the device may
/// still write into it. A channel belongs to the thread that opened it, so
/// nothing else can wait for it; one buffer and one channel per timed-out
/// request (a device that stopped answering) is the price of never
/// handing memory back under it.
fn abandon(ch: Box<dyn IoChannel>, own: Vec<u8>) {
    tracing::error!(
        "a metadata IO did not finish in time; its buffer and channel are kept for good"
    );
    std::mem::forget(ch);
    std::mem::forget(own);
}
