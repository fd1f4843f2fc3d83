//! The conformance suite every block device passes: random IO checked
//! against a model, flush and power-cut semantics, and every kind of bad
//! request. Other device crates run it from their tests (feature
//! `test-utils`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::device::{BlockDevice, Completion, IoChannel, IoOp, IoRequest, IoVec, SgList};
use crate::error::IoError;

/// Submit one request and wait for its completion.
pub fn run_one(ch: &mut dyn IoChannel, req: IoRequest) -> Result<(), IoError> {
    let tag = req.tag;
    let mut req = req;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    loop {
        match ch.submit(req) {
            Ok(()) => break,
            Err(crate::SubmitError::Busy(r)) => {
                req = r;
                ch.poll(&mut out);
                assert!(Instant::now() < deadline, "channel stayed busy");
            }
        }
    }
    loop {
        ch.poll(&mut out);
        if let Some(pos) = out.iter().position(|c| c.tag == tag) {
            return out.swap_remove(pos).result;
        }
        assert!(Instant::now() < deadline, "request {tag} never completed");
        std::thread::yield_now();
    }
}

/// A read or write of `buf` at `lba`.
pub fn rw(op: IoOp, lba: u64, blocks: u64, buf: &mut [u8], tag: u64) -> IoRequest {
    let mut sg = SgList::new();
    // SAFETY: the callers here wait for the completion before touching buf.
    sg.push(unsafe { IoVec::new(buf.as_mut_ptr(), buf.len()) });
    IoRequest {
        op,
        offset_blocks: lba,
        num_blocks: blocks,
        sg,
        tag,
    }
}

/// A buffer aligned to 4 KiB (so O_DIRECT paths are exercised).
pub struct Aligned {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    /// `len` zeroed bytes at a 4 KiB-aligned address.
    pub fn new(len: usize) -> Aligned {
        let v = vec![0u8; len + 4096];
        let off = v.as_ptr().align_offset(4096);
        Aligned { v, off, len }
    }
    /// The bytes.
    pub fn buf(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

/// One request of a batch and the buffer it uses.
struct Planned {
    op: IoOp,
    tag: u64,
    at: u64,
    n: u64,
    aligned: Option<Aligned>,
    plain: Option<Vec<u8>>,
}

/// Random reads, writes, discards, write-zeroes and flushes at queue depth
/// up to 16, every read checked against a model of the device contents.
/// Works on blocks `first..first + count` only, so several channels can run
/// it at once on disjoint ranges.
pub fn random_io_against_model(
    ch: &mut dyn IoChannel,
    dev: &dyn BlockDevice,
    first: u64,
    count: u64,
    ops: usize,
    seed: u64,
) {
    let info = dev.info().clone();
    let bs = info.block_size as usize;
    let mut model = vec![0u8; count as usize * bs];
    // Start from a known state.
    let zero_step = (info.max_transfer as usize / bs).max(1) as u64;
    let mut lba = 0;
    while lba < count {
        let n = zero_step.min(count - lba);
        let mut z = Aligned::new(n as usize * bs);
        run_one(ch, rw(IoOp::Write, first + lba, n, z.buf(), 1)).expect("initial zero fill");
        lba += n;
    }
    let mut rng = SmallRng::seed_from_u64(seed);
    let max_blocks = (info.max_transfer as usize / bs).clamp(1, 64) as u64;
    let mut done_ops = 0;
    let mut tag = 100u64;
    while done_ops < ops {
        // A batch of requests on non-overlapping ranges, all in flight at once.
        let depth = rng.gen_range(1..=16usize);
        let mut batch: Vec<(IoRequest, Planned)> = Vec::new();
        let mut taken: Vec<(u64, u64)> = Vec::new();
        for _ in 0..depth {
            let n = rng.gen_range(1..=max_blocks.min(count));
            let at = rng.gen_range(0..=count - n);
            if taken.iter().any(|&(a, b)| at < b && a < at + n) {
                continue;
            }
            taken.push((at, at + n));
            tag += 1;
            let choice = rng.gen_range(0..100);
            let (op, buf) = match choice {
                0..=39 => (IoOp::Write, true),
                40..=84 => (IoOp::Read, true),
                85..=91 => (IoOp::Discard, false),
                _ => (IoOp::WriteZeroes, false),
            };
            let op = match op {
                IoOp::Discard if !info.discard => IoOp::Read,
                IoOp::WriteZeroes if !info.write_zeroes => IoOp::Read,
                o => o,
            };
            // A device without discard gets reads instead, with a buffer.
            let buf = buf || op == IoOp::Read;
            if buf {
                // Half the buffers are deliberately unaligned.
                let len = n as usize * bs;
                if rng.gen_bool(0.5) {
                    let mut a = Aligned::new(len);
                    if op == IoOp::Write {
                        rng.fill(a.buf());
                    }
                    let req = rw(op, first + at, n, a.buf(), tag);
                    batch.push((
                        req,
                        Planned {
                            op,
                            tag,
                            at,
                            n,
                            aligned: Some(a),
                            plain: None,
                        },
                    ));
                } else {
                    let mut v = vec![0u8; len + 1];
                    if op == IoOp::Write {
                        rng.fill(&mut v[1..]);
                    }
                    let req = rw(op, first + at, n, &mut v[1..], tag);
                    batch.push((
                        req,
                        Planned {
                            op,
                            tag,
                            at,
                            n,
                            aligned: None,
                            plain: Some(v),
                        },
                    ));
                }
            } else {
                batch.push((
                    IoRequest::range(op, first + at, n, tag),
                    Planned {
                        op,
                        tag,
                        at,
                        n,
                        aligned: None,
                        plain: None,
                    },
                ));
            }
        }
        let mut expect: Vec<u64> = Vec::new();
        let mut pending: Vec<Planned> = Vec::new();
        let mut out: Vec<Completion> = Vec::new();
        for (req, planned) in batch {
            let mut r = req;
            loop {
                match ch.submit(r) {
                    Ok(()) => break,
                    Err(crate::SubmitError::Busy(back)) => {
                        r = back;
                        ch.poll(&mut out);
                    }
                }
            }
            expect.push(planned.tag);
            pending.push(planned);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < expect.len() {
            ch.poll(&mut out);
            assert!(Instant::now() < deadline, "batch did not complete");
        }
        for Planned {
            op,
            tag: t,
            at,
            n,
            aligned: mut a,
            plain: v,
        } in pending
        {
            let c = out
                .iter()
                .find(|c| c.tag == t)
                .expect("completion for every tag");
            assert_eq!(c.result, Ok(()), "{op:?} of {n} blocks at {at} failed");
            let range = at as usize * bs..(at + n) as usize * bs;
            let data: &[u8] = match (&mut a, &v) {
                (Some(a), _) => a.buf(),
                (None, Some(v)) => &v[1..],
                _ => &[],
            };
            match op {
                IoOp::Write => model[range].copy_from_slice(data),
                IoOp::Read => assert!(
                    data == &model[range.clone()],
                    "read of {n} blocks at {at} differs from what was written"
                ),
                IoOp::Discard | IoOp::WriteZeroes => model[range].fill(0),
                IoOp::Flush => {}
            }
            done_ops += 1;
        }
        if rng.gen_ratio(1, 8) {
            run_one(ch, IoRequest::flush(1)).expect("flush");
        }
    }
    // Everything reads back at the end.
    let mut all = Aligned::new(bs);
    for b in 0..count {
        run_one(ch, rw(IoOp::Read, first + b, 1, all.buf(), 2)).expect("final read");
        let off = b as usize * bs;
        assert!(
            all.buf() == &model[off..off + bs],
            "block {b} differs at the end"
        );
    }
}

/// Every kind of bad request completes with its own error, and the channel
/// keeps working afterwards.
pub fn bad_requests(ch: &mut dyn IoChannel, dev: &dyn BlockDevice) {
    bad_requests_shape_only(ch, dev);
    let bs = dev.info().block_size as usize;
    let mut buf = Aligned::new(bs);
    buf.buf().fill(0x5a);
    run_one(ch, rw(IoOp::Write, 0, 1, buf.buf(), 8)).expect("write after bad requests");
    buf.buf().fill(0);
    run_one(ch, rw(IoOp::Read, 0, 1, buf.buf(), 9)).expect("read after bad requests");
    assert!(buf.buf().iter().all(|&b| b == 0x5a));
}

/// The errors of [`bad_requests`] without checking data afterwards (for
/// devices that store none).
pub fn bad_requests_shape_only(ch: &mut dyn IoChannel, dev: &dyn BlockDevice) {
    let info = dev.info().clone();
    let bs = info.block_size as u64;
    let mut buf = Aligned::new(bs as usize * 2);
    let r = run_one(ch, rw(IoOp::Read, 0, 0, &mut buf.buf()[..0], 1));
    assert_eq!(r, Err(IoError::ZeroLength(IoOp::Read)));
    let r = run_one(ch, IoRequest::range(IoOp::WriteZeroes, 0, 0, 1));
    assert!(matches!(
        r,
        Err(IoError::ZeroLength(_)) | Err(IoError::Unsupported(_))
    ));
    let r = run_one(
        ch,
        rw(
            IoOp::Write,
            info.num_blocks,
            1,
            &mut buf.buf()[..bs as usize],
            2,
        ),
    );
    assert!(matches!(r, Err(IoError::OutOfRange { .. })), "{r:?}");
    let r = run_one(ch, rw(IoOp::Read, info.num_blocks - 1, 2, buf.buf(), 3));
    assert!(matches!(r, Err(IoError::OutOfRange { .. })), "{r:?}");
    let r = run_one(
        ch,
        rw(IoOp::Read, u64::MAX, 1, &mut buf.buf()[..bs as usize], 4),
    );
    assert!(
        matches!(r, Err(IoError::OutOfRange { .. })),
        "overflowing offset: {r:?}"
    );
    let r = run_one(ch, IoRequest::range(IoOp::Discard, u64::MAX - 1, 4, 5));
    assert!(
        matches!(
            r,
            Err(IoError::OutOfRange { .. }) | Err(IoError::Unsupported(_))
        ),
        "{r:?}"
    );
    // A list shorter than the block range.
    let r = run_one(ch, rw(IoOp::Write, 0, 2, &mut buf.buf()[..bs as usize], 6));
    assert!(matches!(r, Err(IoError::LengthMismatch { .. })), "{r:?}");
    // Too large for one request.
    let blocks = info.max_transfer as u64 / bs + 1;
    if blocks <= info.num_blocks {
        let mut big = vec![0u8; (blocks * bs) as usize];
        let r = run_one(ch, rw(IoOp::Read, 0, blocks, &mut big, 7));
        assert!(matches!(r, Err(IoError::TooLarge { .. })), "{r:?}");
    }
    // And the channel still takes requests.
    run_one(ch, rw(IoOp::Read, 0, 1, &mut buf.buf()[..bs as usize], 8))
        .expect("read after bad requests");
}

/// Writes flushed before a power cut survive it; writes after the last
/// flush are gone, block by block. `power_on` brings the device back.
pub fn power_cut_semantics(dev: &dyn BlockDevice, power_on: &dyn Fn()) {
    let bs = dev.info().block_size as usize;
    let mut ch = dev.open_channel().expect("channel");
    let ch = ch.as_mut();
    let mut a = vec![0xaa; 4 * bs];
    let mut b = vec![0xbb; 4 * bs];
    let mut zero = vec![0u8; 14 * bs];
    run_one(ch, rw(IoOp::Write, 0, 14, &mut zero, 1)).unwrap();
    run_one(ch, rw(IoOp::Write, 0, 4, &mut a, 1)).unwrap();
    run_one(ch, IoRequest::flush(2)).unwrap();
    run_one(ch, rw(IoOp::Write, 2, 4, &mut b, 3)).unwrap();
    run_one(ch, rw(IoOp::Write, 10, 4, &mut b, 4)).unwrap();
    dev.power_cut().expect("power cut");
    power_on();
    let mut ch = dev.open_channel().expect("channel after power on");
    let ch = ch.as_mut();
    let mut got = vec![0u8; 14 * bs];
    run_one(ch, rw(IoOp::Read, 0, 14, &mut got, 5)).unwrap();
    assert!(
        got[..4 * bs].iter().all(|&x| x == 0xaa),
        "flushed writes survive the power cut"
    );
    assert!(
        got[4 * bs..].iter().all(|&x| x == 0),
        "unflushed writes are gone"
    );
    // A flush after writes makes them durable across the next cut.
    run_one(ch, rw(IoOp::Write, 10, 4, &mut b, 6)).unwrap();
    run_one(ch, IoRequest::flush(7)).unwrap();
    dev.power_cut().expect("power cut");
    power_on();
    let mut ch = dev.open_channel().expect("channel");
    let ch = ch.as_mut();
    run_one(ch, rw(IoOp::Read, 0, 14, &mut got, 8)).unwrap();
    assert!(got[10 * bs..14 * bs].iter().all(|&x| x == 0xbb));
}

/// The whole suite: bad requests, then random IO from `threads` channels at
/// once on disjoint ranges (each on its own thread, as on reactors).
pub fn run_all(dev: Arc<dyn BlockDevice>, threads: usize, ops: usize) {
    {
        let mut ch = dev.open_channel().expect("channel");
        bad_requests(ch.as_mut(), dev.as_ref());
    }
    let per = dev.info().num_blocks / threads as u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let mut ch = dev.open_channel().expect("channel");
                random_io_against_model(
                    ch.as_mut(),
                    dev.as_ref(),
                    t as u64 * per,
                    per,
                    ops,
                    t as u64 + 1,
                );
            })
        })
        .collect();
    for h in handles {
        h.join().expect("conformance thread");
    }
}
