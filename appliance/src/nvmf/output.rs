//! What a connection sends: PDU headers in one buffer, with data buffers
//! spliced in where they belong, so a read's data goes from the buffer the
//! volume filled to the socket without another copy (one `writev`).

use std::collections::VecDeque;
use std::io::{IoSlice, Write};

/// Slices handed to one `writev` at most.
const IOV_MAX: usize = 64;
/// Data buffers kept for reuse at most (their bytes: see
/// [`Output::set_spare_limit`]).
const SPARE_MAX: usize = 64;
/// Bytes of header space an emptied output keeps.
const KEEP: usize = 64 << 10;

/// Bytes and data buffers waiting for the socket, in order.
pub struct Output {
    bytes: Vec<u8>,
    /// Data to send before `bytes[position..]`, in order.
    inserts: VecDeque<(usize, Vec<u8>)>,
    /// Bytes of `bytes` sent.
    pos: usize,
    /// Bytes of the front insert sent.
    skip: usize,
    /// Bytes of `inserts` not sent: kept, not summed, as `pending` is asked
    /// once per PDU received (a host that queued thousands of reads and
    /// streamed tiny PDUs made each a scan of them all: audit).
    inserted: usize,
    /// Data buffers sent, to be used again.
    spare: Vec<Vec<u8>>,
    /// Their capacity in bytes.
    spare_bytes: usize,
    /// What they may hold at most.
    spare_limit: usize,
}

impl Default for Output {
    fn default() -> Output {
        Output {
            bytes: Vec::new(),
            inserts: VecDeque::new(),
            pos: 0,
            skip: 0,
            inserted: 0,
            spare: Vec::new(),
            spare_bytes: 0,
            spare_limit: super::SHARE_MAX,
        }
    }
}

impl Output {
    /// Where encoders append.
    pub fn bytes(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Send `data` after everything appended so far.
    pub fn data(&mut self, data: Vec<u8>) {
        if !data.is_empty() {
            self.inserted += data.len();
            self.inserts.push_back((self.bytes.len(), data));
        }
    }

    /// Bytes not sent yet.
    pub fn pending(&self) -> usize {
        self.bytes.len() - self.pos + self.inserted
    }

    /// A data buffer that was sent, for reuse.
    pub fn take_spare(&mut self) -> Option<Vec<u8>> {
        let b = self.spare.pop()?;
        self.spare_bytes -= b.capacity();
        Some(b)
    }

    /// Keep at most `bytes` of buffers for reuse (the connection's share
    /// of the target's): those beyond are freed now.
    pub fn set_spare_limit(&mut self, bytes: usize) {
        self.spare_limit = bytes;
        while self.spare_bytes > bytes {
            let Some(b) = self.spare.pop() else {
                break;
            };
            self.spare_bytes -= b.capacity();
        }
    }

    /// Keep `buf` for reuse if the pool has room (else it is freed).
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() > 0
            && self.spare.len() < SPARE_MAX
            && self.spare_bytes + buf.capacity() <= self.spare_limit
        {
            buf.clear();
            self.spare_bytes += buf.capacity();
            self.spare.push(buf);
        }
    }

    /// Drop everything (the peer is gone).
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.inserts.clear();
        self.pos = 0;
        self.skip = 0;
        self.inserted = 0;
    }

    /// One `writev` of what is pending; the bytes it took.
    pub fn send(&mut self, sock: &mut impl Write) -> std::io::Result<usize> {
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(IOV_MAX);
        let mut at = self.pos;
        let mut whole = true;
        for (k, (ipos, d)) in self.inserts.iter().enumerate() {
            if iov.len() + 2 > IOV_MAX {
                whole = false;
                break;
            }
            if *ipos > at {
                iov.push(IoSlice::new(&self.bytes[at..*ipos]));
                at = *ipos;
            }
            let skip = if k == 0 { self.skip } else { 0 };
            iov.push(IoSlice::new(&d[skip..]));
        }
        if whole && at < self.bytes.len() {
            iov.push(IoSlice::new(&self.bytes[at..]));
        }
        if iov.is_empty() {
            return Ok(0);
        }
        let n = sock.write_vectored(&iov)?;
        drop(iov);
        self.advance(n);
        Ok(n)
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            match self.inserts.front() {
                Some((p, d)) if *p == self.pos => {
                    let left = d.len() - self.skip;
                    if n < left {
                        self.skip += n;
                        self.inserted -= n;
                        return;
                    }
                    n -= left;
                    self.inserted -= left;
                    self.skip = 0;
                    if let Some((_, d)) = self.inserts.pop_front() {
                        self.recycle(d);
                    }
                }
                Some((p, _)) => {
                    let m = (p - self.pos).min(n);
                    self.pos += m;
                    n -= m;
                }
                None => {
                    let m = (self.bytes.len() - self.pos).min(n);
                    self.pos += m;
                    n -= m;
                    if m == 0 {
                        return;
                    }
                }
            }
        }
        if self.inserts.is_empty() && self.pos == self.bytes.len() {
            self.bytes.clear();
            // Not kept at its peak: a connection's output is bounded by
            // what it has pending (see `memory::Account::may_hold`), and a
            // thousand that once held 4 MiB each kept it all.
            self.bytes.shrink_to(KEEP);
            self.pos = 0;
        } else if self.pos > 1 << 20 {
            self.bytes.drain(..self.pos);
            for (p, _) in self.inserts.iter_mut() {
                *p -= self.pos;
            }
            self.pos = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `Output::pending` counts, summed over the inserts.
    fn recount(o: &Output) -> usize {
        o.bytes.len() - o.pos + o.inserts.iter().map(|(_, d)| d.len()).sum::<usize>() - o.skip
    }

    /// A writer that takes at most `cap` bytes per call.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = b.len().min(self.cap);
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_and_data_come_out_in_order_however_the_socket_takes_them() {
        for cap in [1, 3, 7, 100, 5000, 1 << 20] {
            let mut o = Output::default();
            let mut want = Vec::new();
            for i in 0..200u32 {
                let head = vec![i as u8; (i % 5) as usize + 1];
                o.bytes().extend_from_slice(&head);
                want.extend_from_slice(&head);
                if i % 3 == 0 {
                    let data = vec![(i + 100) as u8; (i % 7) as usize * 13 + 1];
                    want.extend_from_slice(&data);
                    o.data(data);
                }
            }
            let mut w = Trickle {
                got: Vec::new(),
                cap,
            };
            while o.pending() > 0 {
                o.send(&mut w).unwrap();
                assert_eq!(o.pending(), recount(&o), "cap {cap}");
            }
            assert_eq!(w.got, want, "cap {cap}");
            assert!(o.take_spare().is_some());
        }
    }

    /// The kept count of unsent insert bytes against a recount, with
    /// appends, partial sends and a clear interleaved.
    #[test]
    fn the_pending_count_follows_appends_sends_and_clears() {
        let mut o = Output::default();
        let mut seed = 0x9e37_79b9_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut w = Trickle {
            got: Vec::new(),
            cap: 1,
        };
        for step in 0..5_000 {
            match next() % 8 {
                0..=2 => o
                    .bytes()
                    .extend_from_slice(&[1; 24][..(next() % 24) as usize]),
                3..=4 => o.data(vec![2; (next() % 5000) as usize]),
                5..=6 => {
                    w.cap = (next() % 9000) as usize + 1;
                    o.send(&mut w).unwrap();
                }
                _ if step % 1000 == 7 => o.clear(),
                _ => {}
            }
            assert_eq!(o.pending(), recount(&o), "step {step}");
        }
    }
}
