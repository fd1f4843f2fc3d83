//! The write-back cache of a RAID5 journal (like md's r5c stripe cache in
//! write-back mode): blocks whose write is durable in the journal but not
//! yet on the members. Reads lay these blocks over what the members hold;
//! reclaim writes them to the members (through the write-through path, so
//! the write hole stays closed) and drops them.
//!
//! Every change to one stripe's blocks happens under that stripe's lock
//! (the RAID5 stripe lock table); the shard mutex only guards the map
//! itself, for a few hundred nanoseconds at a time. Shards go by stripe, so
//! a stripe's blocks live in one ordered map and a read finds them with one
//! range lookup.
//!
//! A cached block is not a copy: the cache keeps the data buffer of the
//! write-back record that logged it, shared by that record's blocks, and
//! the buffer goes back to a pool when the last of them leaves. What that
//! costs is bounded by counting the cache's limit in the blocks of the
//! records it holds, not in its live blocks: a record partly overwritten
//! still counts whole until its last block is rewritten or reclaimed, so
//! the cache's memory never passes its limit (writes go write-through past
//! it), and a checkpoint, which reclaims every block of the epoch it
//! closes, frees what is left. (A record counts its buffer's capacity, and
//! reuses only a buffer of its own size; buffers given back are pooled up
//! to a few MiB, outside the limit.)

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

const SHARDS: usize = 64;

/// Bytes of record buffers kept for reuse (a fresh buffer would cost page
/// faults and zeroing on the reactor), outside the cache's limit.
const POOL_MAX_BYTES: usize = 8 << 20;

struct Cached {
    /// The write-back record's data blocks; this block is at `at`.
    rec: Arc<Record>,
    at: usize,
    /// Checkpoint epoch of the journal record that holds this version.
    epoch: u64,
    /// Unique per insert, so a reclaim drops only the version it wrote.
    version: u64,
}

impl Cached {
    fn data(&self) -> &[u8] {
        &self.rec.data[self.at..self.at + self.rec.bs]
    }
}

/// The data buffer of one write-back record, shared by its cached blocks.
struct Record {
    data: Vec<u8>,
    bs: usize,
    /// What it counts against the limit: its buffer's whole capacity, in
    /// blocks.
    held: u64,
    home: Arc<Buffers>,
}

/// What the cache's records hold, and the buffers they gave back.
#[derive(Default)]
struct Buffers {
    /// Blocks of the records held (the limit counts these).
    held: AtomicU64,
    free: Mutex<Pool>,
}

/// Given-back buffers, oldest first.
#[derive(Default)]
struct Pool {
    bufs: VecDeque<Vec<u8>>,
    bytes: usize,
}

impl Buffers {
    /// Keep `data` for a later record. A full pool lets go of its oldest
    /// buffers, not of the newest: after a change of record size (64 KiB
    /// sequential records, then 4 KiB random ones) the pool turns over to
    /// the new size instead of staying full of buffers nothing takes.
    fn give_back(&self, data: Vec<u8>) {
        let cap = data.capacity();
        if cap == 0 || cap > POOL_MAX_BYTES {
            return;
        }
        let old = {
            let mut pool = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let mut old = Vec::new();
            while pool.bytes + cap > POOL_MAX_BYTES {
                let Some(v) = pool.bufs.pop_front() else {
                    break;
                };
                pool.bytes -= v.capacity();
                old.push(v);
            }
            pool.bytes += cap;
            pool.bufs.push_back(data);
            old
        };
        // Freed with the pool's lock let go.
        drop(old);
    }

    /// A buffer of exactly `len` bytes' capacity, so a record holds no
    /// more than the room it was admitted for.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut pool = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let fits = |v: &&Vec<u8>| v.capacity() == len;
        // Only the most recent few are looked at (records are mostly of one
        // size; a scan of the whole pool would be long on the reactor).
        let n = pool.bufs.len();
        match pool.bufs.iter().rev().take(8).position(|v| fits(&v)) {
            Some(back) => {
                let i = n - 1 - back;
                let Some(v) = pool.bufs.swap_remove_back(i) else {
                    return Vec::with_capacity(len);
                };
                pool.bytes -= v.capacity();
                v
            }
            None => Vec::with_capacity(len),
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.home.held.fetch_sub(self.held, Ordering::SeqCst);
        self.home.give_back(std::mem::take(&mut self.data));
    }
}

#[derive(Default)]
struct Shard {
    /// By volume block.
    blocks: BTreeMap<u64, Cached>,
    /// Cached blocks per stripe.
    stripes: HashMap<u64, u32>,
}

/// Blocks acknowledged from the journal and not yet on the members.
pub struct WriteCache {
    shards: Box<[Mutex<Shard>]>,
    blocks: AtomicU64,
    /// Cached blocks by epoch parity (two epochs are live at most: the one
    /// a checkpoint is closing and the current one).
    per_epoch: [AtomicU64; 2],
    /// Stripes with cached blocks, oldest first (may hold stale entries).
    dirty: Mutex<VecDeque<u64>>,
    next_version: AtomicU64,
    /// Blocks of write-back records in flight, admitted but not inserted.
    pending: AtomicU64,
    /// Above this many blocks, writes bypass the cache (write-through).
    limit: u64,
    /// Recently written blocks, for admission (see [`admit_once`](Self::admit_once)):
    /// a table indexed by a hash of the block, holding block + 1. Updates
    /// race and collisions evict; it is a hint, never a correctness matter.
    recent: Box<[AtomicU64]>,
    burst: Mutex<Burst>,
    /// Blocks cached lately, and of those the ones that paid: a newer
    /// write replaced or overwrote them before reclaim, or they extended a
    /// cached run (see [`rewrites_pay`](Self::rewrites_pay)). Both halve
    /// every `PAY_WINDOW` blocks; a hint like `recent`.
    blocks_seen: AtomicU64,
    blocks_paid: AtomicU64,
    records: Arc<Buffers>,
}

/// Writes of blocks not written recently may take this share of the
/// cache (1/BURST_SHARE) at once, and as much again each second: a burst
/// is acknowledged from the journal, and under sustained uniform writes
/// they stay a small share.
const BURST_SHARE: u64 = 4;

/// Cached blocks over which [`WriteCache::rewrites_pay`] judges (it trusts
/// the recency table until it has seen a sixteenth of them).
const PAY_WINDOW: u64 = 1024;

/// What one-time blocks may still take (see [`WriteCache::admit_once`]).
struct Burst {
    credit: f64,
    at: Instant,
}

impl WriteCache {
    /// A cache of at most `limit` blocks.
    pub fn new(limit: u64) -> WriteCache {
        WriteCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            blocks: AtomicU64::new(0),
            per_epoch: Default::default(),
            dirty: Mutex::new(VecDeque::new()),
            next_version: AtomicU64::new(1),
            pending: AtomicU64::new(0),
            limit,
            // Twice the cache: a block rewritten within about a cache's
            // worth of writes is found.
            recent: (0..(2 * limit).next_power_of_two().max(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            burst: Mutex::new(Burst {
                credit: (limit / BURST_SHARE) as f64,
                at: Instant::now(),
            }),
            records: Arc::default(),
            blocks_seen: AtomicU64::new(0),
            blocks_paid: AtomicU64::new(0),
        }
    }

    fn shard(&self, stripe: u64) -> std::sync::MutexGuard<'_, Shard> {
        let i = (stripe.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks of the records the cache holds: at least [`len`](Self::len),
    /// more while a record is partly overwritten.
    pub fn held(&self) -> u64 {
        self.records.held.load(Ordering::SeqCst)
    }

    /// A buffer for a write-back record's `len` bytes of data (one given
    /// back, if one of that size is). What it holds is stale: the caller
    /// writes every byte.
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        let mut v = self.records.take(len);
        v.resize(len, 0);
        v
    }

    /// Keep a record buffer that did not reach the cache for the next one.
    pub fn give_back(&self, data: Vec<u8>) {
        self.records.give_back(data)
    }

    /// Blocks cached.
    pub fn len(&self) -> u64 {
        self.blocks.load(Ordering::Relaxed)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Make room for a write-back record of `blocks`, unless that would
    /// pass the limit (the write then goes write-through: that is the
    /// back-pressure). [`release`](Self::release) it once inserted or
    /// abandoned.
    pub fn try_admit(&self, blocks: u64) -> bool {
        let pending = self.pending.fetch_add(blocks, Ordering::SeqCst) + blocks;
        if self.held() + pending > self.limit {
            self.pending.fetch_sub(blocks, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Whether a write of volume blocks `[b0, b1)` should go write-back,
    /// taking room for it as [`try_admit`](Self::try_admit) does. A write
    /// may ask more than once (a piece planned again after waiting for room
    /// in the log): the first answer is kept in `asked`, since asking again
    /// would find the write's own mark and take it for a rewrite (under
    /// uniform random writes a sixth of them went write-back that way, at
    /// 0.75x the write-through rate); a write admitted once takes room
    /// anew. The rule (`admit_at`): caching
    /// pays only when a block is written again before it is reclaimed (one
    /// reclaim for many writes) or its neighbours join it (a row reclaimed
    /// without reads); a block written once costs its write-back record on
    /// top of the write-through write its reclaim is. So blocks that were
    /// (or whose predecessor was) written recently are admitted, and other
    /// blocks only within a burst's credit (a quarter of the cache, refilled
    /// at that much a second); the rest go write-through, as they would
    /// once the cache is full. Sustained uniform random writes over a large
    /// volume then cost about what write-through costs, and a hot set, a
    /// sequential stream and a burst are still cached.
    pub fn admit_once(&self, asked: &mut Option<bool>, b0: u64, b1: u64) -> bool {
        self.admit_once_at(asked, b0, b1, Instant::now())
    }

    fn admit_once_at(&self, asked: &mut Option<bool>, b0: u64, b1: u64, now: Instant) -> bool {
        match *asked {
            Some(first) => first && self.try_admit(b1 - b0),
            None => {
                let admitted = self.admit_at(b0, b1, now);
                *asked = Some(admitted);
                admitted
            }
        }
    }

    fn admit_at(&self, b0: u64, b1: u64, now: Instant) -> bool {
        let mask = self.recent.len() - 1;
        let slot =
            |b: u64| &self.recent[(b.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) as usize & mask];
        let mut again = b0 > 0 && slot(b0 - 1).load(Ordering::Relaxed) == b0;
        for b in b0..b1 {
            again |= slot(b).swap(b + 1, Ordering::Relaxed) == b + 1;
        }
        let n = b1 - b0;
        if again && self.rewrites_pay() {
            return self.try_admit(n);
        }
        let share = (self.limit / BURST_SHARE) as f64;
        let mut b = self.burst.lock().unwrap_or_else(|e| e.into_inner());
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        b.credit = (b.credit + dt * share).min(share);
        b.at = b.at.max(now);
        if b.credit < n as f64 || !self.try_admit(n) {
            return false;
        }
        b.credit -= n as f64;
        true
    }

    /// Whether writes the recency table calls rewrites are worth caching:
    /// at least a quarter of the blocks cached lately paid (a newer write
    /// came before reclaim, cached or written through, or the block
    /// extended a cached run). The table holds about twice the cache's
    /// blocks, so on a volume not much larger, uniform random writes find
    /// their block or its predecessor there by chance (one in six on a 768
    /// MiB volume with an 8,192-block cache, which ran at 0.75x
    /// write-through), and such blocks seldom pay. While they do not, those
    /// writes go by the burst credit like any other; a write that goes
    /// through over a cached block still counts it as paid, so the blocks
    /// the credit admits keep measuring and a hot set opens it again.
    fn rewrites_pay(&self) -> bool {
        let seen = self.blocks_seen.load(Ordering::Relaxed);
        seen < PAY_WINDOW / 16 || 4 * self.blocks_paid.load(Ordering::Relaxed) >= seen
    }

    /// Count `n` blocks cached, and `paid` blocks paying (never more than
    /// were seen: writes going through while nothing is cached, as in
    /// write-through mode, must not leave the gate open for later).
    fn judge(&self, n: u64, paid: u64) {
        let seen = self.blocks_seen.fetch_add(n, Ordering::Relaxed) + n;
        if paid > 0 {
            let _ = self
                .blocks_paid
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                    Some((p + paid).min(seen))
                });
        }
        // One thread halves both (the exchange fails for the others).
        if seen >= PAY_WINDOW
            && self
                .blocks_seen
                .compare_exchange(seen, seen / 2, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let _ = self
                .blocks_paid
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| Some(p / 2));
        }
    }

    /// Blocks admitted and not yet inserted.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::SeqCst)
    }

    /// Give back what [`try_admit`](Self::try_admit) took.
    pub fn release(&self, blocks: u64) {
        self.pending.fetch_sub(blocks, Ordering::SeqCst);
    }

    /// Blocks cached from records of `epoch` (and of epochs two apart).
    pub fn in_epoch(&self, epoch: u64) -> u64 {
        self.per_epoch[(epoch % 2) as usize].load(Ordering::SeqCst)
    }

    /// Cache a durable write-back record of `epoch` for `stripe`: `data`
    /// holds its blocks of `bs` bytes, the newest versions of volume
    /// `blocks` (in that order). The cache keeps `data` itself. Caller
    /// holds the stripe lock.
    pub fn insert_record(&self, stripe: u64, blocks: &[u64], data: Vec<u8>, bs: usize, epoch: u64) {
        // The caller lays the data out from the same rows as the blocks: a
        // mismatch is a bug of ours, and blocks left out would be
        // acknowledged without being cached.
        let agree = blocks.len().saturating_mul(bs) == data.len();
        debug_assert!(agree, "record data and blocks disagree");
        if !agree {
            tracing::error!(
                blocks = blocks.len(),
                bytes = data.len(),
                "write-back record data and blocks disagree; caching what both cover"
            );
        }
        let n = blocks.len().min(data.len() / bs.max(1));
        if n == 0 || bs == 0 {
            self.records.give_back(data);
            return;
        }
        let held = data.capacity().div_ceil(bs) as u64;
        self.records.held.fetch_add(held, Ordering::SeqCst);
        let rec = Arc::new(Record {
            data,
            bs,
            held,
            home: self.records.clone(),
        });
        // Versions this record replaces: let go once the shard is, so a
        // record freed with its last block takes the pool's lock outside
        // the shard's.
        let mut replaced_versions: smallvec::SmallVec<[Cached; 16]> = smallvec::SmallVec::new();
        let mut s = self.shard(stripe);
        let b0 = blocks[0];
        let mut follows = b0 > 0 && s.blocks.contains_key(&(b0 - 1));
        let mut replaced = 0;
        let mut added = 0;
        for (i, &block) in blocks[..n].iter().enumerate() {
            let version = self.next_version.fetch_add(1, Ordering::Relaxed);
            self.per_epoch[(epoch % 2) as usize].fetch_add(1, Ordering::SeqCst);
            let new = Cached {
                rec: rec.clone(),
                at: i * bs,
                epoch,
                version,
            };
            match s.blocks.insert(block, new) {
                // A rewrite: the older version's record loses a block
                // (and goes back to the pool with its last).
                Some(old) => {
                    replaced += 1;
                    self.per_epoch[(old.epoch % 2) as usize].fetch_sub(1, Ordering::SeqCst);
                    replaced_versions.push(old);
                }
                None => {
                    added += 1;
                    self.blocks.fetch_add(1, Ordering::SeqCst);
                    *s.stripes.entry(stripe).or_insert(0) += 1;
                }
            }
        }
        let first = added > 0 && s.stripes.get(&stripe) == Some(&added);
        drop(s);
        drop(replaced_versions);
        // The block before a stripe's first is in the previous stripe
        // (another shard; looked up with this one released), needed only
        // when not every block replaced a cached one.
        let n = n as u64;
        if !follows && replaced < n && b0 > 0 && stripe > 0 {
            follows = self.shard(stripe - 1).blocks.contains_key(&(b0 - 1));
        }
        self.judge(n, if follows { n } else { replaced });
        if first {
            self.requeue(stripe);
        }
    }

    /// Cache one block (a one-block record holding a copy of `data`).
    #[cfg(test)]
    pub fn insert(&self, stripe: u64, block: u64, data: &[u8], epoch: u64) {
        self.insert_record(stripe, &[block], data.to_vec(), data.len(), epoch);
    }

    /// Whether some stripe with cached blocks is one `f` picks (a scan of
    /// every cached stripe: for rare states, not the IO path).
    pub fn any_stripe(&self, mut f: impl FnMut(u64) -> bool) -> bool {
        !self.is_empty()
            && self.shards.iter().any(|s| {
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .stripes
                    .keys()
                    .any(|&stripe| f(stripe))
            })
    }

    /// Whether `stripe` has cached blocks.
    pub fn has_stripe(&self, stripe: u64) -> bool {
        !self.is_empty() && self.shard(stripe).stripes.contains_key(&stripe)
    }

    /// Call `f(block, data)` for each cached block in `[b0, b1)` of `stripe`.
    pub fn each_in(&self, stripe: u64, b0: u64, b1: u64, mut f: impl FnMut(u64, &[u8])) {
        let s = self.shard(stripe);
        for (&b, c) in s.blocks.range(b0..b1) {
            f(b, c.data());
        }
    }

    /// The cached blocks of `stripe` (volume blocks `[b0, b1)`) in order,
    /// with their versions (for [`remove_if`](Self::remove_if)).
    pub fn versions(&self, stripe: u64, b0: u64, b1: u64) -> Vec<(u64, u64)> {
        let s = self.shard(stripe);
        s.blocks
            .range(b0..b1)
            .map(|(&block, c)| (block, c.version))
            .collect()
    }

    /// Put the data of volume blocks `[b0, b1)` of `stripe` in `out` (in
    /// place of what it held) and return their versions, if every one of
    /// them is cached; `None` otherwise.
    pub fn copy_run(
        &self,
        stripe: u64,
        b0: u64,
        b1: u64,
        out: &mut Vec<u8>,
    ) -> Option<Vec<(u64, u64)>> {
        let s = self.shard(stripe);
        if s.blocks.range(b0..b1).count() as u64 != b1 - b0 {
            return None;
        }
        out.clear();
        let mut versions = Vec::with_capacity((b1 - b0) as usize);
        for (&block, c) in s.blocks.range(b0..b1) {
            out.extend_from_slice(c.data());
            versions.push((block, c.version));
        }
        Some(versions)
    }

    /// Drop `block` if it is still at `version` (it reached the members);
    /// `None` drops any version (a newer write went to the members).
    pub fn remove_if(&self, stripe: u64, block: u64, version: Option<u64>) {
        let mut s = self.shard(stripe);
        let Some(c) = s.blocks.get(&block) else {
            return;
        };
        if version.is_some_and(|v| v != c.version) {
            return;
        }
        let removed = s.blocks.remove(&block);
        if let Some(c) = &removed {
            self.per_epoch[(c.epoch % 2) as usize].fetch_sub(1, Ordering::SeqCst);
            self.blocks.fetch_sub(1, Ordering::SeqCst);
        }
        if version.is_none() {
            // Written through before reclaim: caching it paid (or would
            // have, had the newer write been admitted).
            self.judge(0, 1);
        }
        if let Some(n) = s.stripes.get_mut(&stripe) {
            *n -= 1;
            if *n == 0 {
                s.stripes.remove(&stripe);
            }
        }
        // Its record, if this was its last block, goes back to the pool
        // with the shard let go.
        drop(s);
        drop(removed);
    }

    /// Put `stripe` at the back of the reclaim queue.
    pub fn requeue(&self, stripe: u64) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(stripe);
    }

    /// The oldest stripe that still has cached blocks.
    pub fn next_dirty(&self) -> Option<u64> {
        loop {
            let s = self
                .dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()?;
            if self.has_stripe(s) {
                return Some(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_epochs_and_the_reclaim_queue() {
        let c = WriteCache::new(4);
        assert!(c.is_empty() && !c.has_stripe(7));
        c.insert(7, 70, &[1; 8], 0);
        c.insert(7, 72, &[2; 8], 0);
        c.insert(9, 90, &[3; 8], 1);
        assert_eq!((c.len(), c.in_epoch(0), c.in_epoch(1)), (3, 2, 1));
        assert!(c.try_admit(1) && !c.try_admit(1), "a limit of 4");
        c.release(1);
        // A newer version moves its block to the newer epoch.
        c.insert(7, 70, &[4; 8], 1);
        assert_eq!((c.len(), c.in_epoch(0), c.in_epoch(1)), (3, 1, 2));
        let mut seen = Vec::new();
        c.each_in(7, 0, 100, |b, d| seen.push((b, d[0])));
        assert_eq!(seen, vec![(70, 4), (72, 2)]);
        let snap = c.versions(7, 0, 100);
        let mut run = Vec::new();
        assert_eq!(c.copy_run(7, 70, 71, &mut run).map(|v| v.len()), Some(1));
        assert_eq!(run, vec![4; 8]);
        assert!(
            c.copy_run(7, 70, 72, &mut run).is_none(),
            "71 is not cached"
        );
        // A reclaim of an older version leaves the newer one.
        c.insert(7, 72, &[5; 8], 1);
        for &(block, version) in &snap {
            c.remove_if(7, block, Some(version));
        }
        let mut seen = Vec::new();
        c.each_in(7, 0, 100, |b, d| seen.push((b, d[0])));
        assert_eq!(seen, vec![(72, 5)]);
        assert_eq!(c.next_dirty(), Some(7));
        assert_eq!(c.next_dirty(), Some(9));
        assert_eq!(c.next_dirty(), None);
        c.remove_if(7, 72, None);
        c.remove_if(9, 90, None);
        assert!(c.is_empty() && !c.has_stripe(7));
        assert_eq!((c.in_epoch(0), c.in_epoch(1)), (0, 0));
    }

    #[test]
    fn past_a_burst_only_rewrites_and_sequential_writes_are_admitted() {
        let c = WriteCache::new(64);
        let t0 = c.burst.lock().unwrap().at;
        // A burst: a quarter of the cache takes anything.
        for b in 0..16 {
            assert!(c.admit_at(b * 1000, b * 1000 + 1, t0), "burst write {b}");
            c.insert(b, b * 1000, &[0; 8], 0);
            c.release(1);
        }
        // Past it, a block written once is refused...
        assert!(!c.admit_at(777_777, 777_778, t0));
        // ...but the same block written again is cached, and so is the
        // block after a recent one (a sequential stream).
        assert!(c.admit_at(777_777, 777_778, t0));
        c.release(1);
        assert!(c.admit_at(777_778, 777_780, t0));
        c.release(2);
        // A rewrite of a cached block.
        assert!(c.admit_at(3000, 3001, t0));
        c.release(1);
        // The credit comes back with time: 16 a second.
        let later = t0 + std::time::Duration::from_millis(250);
        for b in 0..4 {
            assert!(c.admit_at(900_000 + 10 * b, 900_001 + 10 * b, later));
            c.release(1);
        }
        assert!(!c.admit_at(900_100, 900_101, later));
        // The limit still holds for rewrites (in a cache whose gate is
        // open: a few blocks, all trusted).
        let c = WriteCache::new(4);
        let t0 = c.burst.lock().unwrap().at;
        for b in 0..4 {
            assert!(c.admit_at(b, b + 1, t0), "block {b}");
            c.release(1);
            c.insert(0, b, &[0; 8], 0);
        }
        assert!(c.rewrites_pay());
        assert!(!c.admit_at(2, 3, t0), "a rewrite, but the cache is full");
        c.remove_if(0, 3, None);
        assert!(c.admit_at(2, 3, t0), "a rewrite, with room");
        c.release(1);
    }

    #[test]
    fn a_write_asking_again_gets_its_first_answer() {
        let c = WriteCache::new(64);
        let t0 = c.burst.lock().unwrap().at;
        // Spend the burst.
        for b in 0..16 {
            assert!(c.admit_at(b * 1000, b * 1000 + 1, t0));
            c.release(1);
        }
        // A write refused once stays refused when planned again; asking
        // `admit` again would take its own mark for a rewrite.
        let mut asked = None;
        assert!(!c.admit_once_at(&mut asked, 555_555, 555_556, t0));
        assert!(!c.admit_once_at(&mut asked, 555_555, 555_556, t0));
        let mut fresh = None;
        assert!(
            c.admit_once_at(&mut fresh, 555_555, 555_556, t0),
            "a rewrite"
        );
        c.release(1);
        // A write admitted once takes room again, if there is room.
        assert!(c.admit_once_at(&mut fresh, 555_555, 555_556, t0));
        c.release(1);
        assert!(c.try_admit(64));
        assert!(
            !c.admit_once_at(&mut fresh, 555_555, 555_556, t0),
            "no room"
        );
        c.release(64);
    }

    #[test]
    fn a_record_is_kept_not_copied_and_counts_whole_until_its_last_block_goes() {
        let c = WriteCache::new(8);
        let data: Vec<u8> = (0..4u8).flat_map(|b| [b; 8]).collect();
        let at = data.as_ptr() as usize;
        c.insert_record(1, &[10, 11, 12, 13], data, 8, 0);
        assert_eq!((c.len(), c.held()), (4, 4));
        // Reads see the record's own buffer.
        let mut seen = Vec::new();
        c.each_in(1, 0, 100, |b, d| {
            seen.push((b, d[0], d.as_ptr() as usize - at))
        });
        assert_eq!(seen, vec![(10, 0, 0), (11, 1, 8), (12, 2, 16), (13, 3, 24)]);
        // Three blocks rewritten: the first record still counts whole.
        for b in 10..13 {
            c.insert(1, b, &[9; 8], 1);
        }
        assert_eq!((c.len(), c.held()), (4, 7));
        assert!(
            c.try_admit(1) && !c.try_admit(1),
            "8 blocks held or admitted"
        );
        c.release(1);
        // Its last block goes: the record is freed and its buffer pooled.
        c.insert(1, 13, &[9; 8], 1);
        assert_eq!((c.len(), c.held()), (4, 4));
        let again = c.buffer(32);
        assert_eq!(again.as_ptr() as usize, at, "the first record's buffer");
        // A small record never takes a large record's buffer, and a record
        // counts its buffer's whole capacity.
        c.give_back(again);
        let small = c.buffer(8);
        assert_ne!(small.as_ptr() as usize, at);
        let mut big = Vec::with_capacity(64);
        big.resize(8, 7);
        c.insert_record(2, &[20], big, 8, 1);
        assert_eq!((c.len(), c.held()), (5, 12));
        c.remove_if(2, 20, None);
        for b in 10..14 {
            c.remove_if(1, b, None);
        }
        assert_eq!((c.len(), c.held(), c.in_epoch(1)), (0, 0, 0));
    }

    #[test]
    fn a_full_pool_turns_over_to_the_size_given_back_now() {
        let c = WriteCache::new(8);
        let big = 64 << 10;
        for _ in 0..POOL_MAX_BYTES / big + 1 {
            c.give_back(vec![0u8; big]);
        }
        c.give_back(vec![1u8; 4096]);
        {
            let pool = c.records.free.lock().unwrap();
            assert!(
                pool.bufs.back().is_some_and(|v| v.capacity() == 4096),
                "the newest buffer is kept, an old one let go"
            );
            let sum: usize = pool.bufs.iter().map(|v| v.capacity()).sum();
            assert_eq!(pool.bytes, sum);
            assert!(pool.bytes <= POOL_MAX_BYTES);
        }
        assert_eq!(c.buffer(4096)[0], 1, "a 4 KiB record reuses it");
    }

    #[test]
    fn rewrites_are_trusted_only_while_cached_blocks_pay() {
        let c = WriteCache::new(4096);
        let t0 = c.burst.lock().unwrap().at;
        // Blocks that neither replace a cached block nor extend a run.
        for b in 0..PAY_WINDOW / 8 {
            c.insert(b, b * 100, &[0; 8], 0);
        }
        // Spend the burst credit.
        let mut b = 1_000_000;
        while c.admit_at(b, b + 1, t0) {
            c.release(1);
            b += 100;
        }
        // Written again, a block would have been taken for a rewrite; now
        // it is refused like any other one-time write.
        assert!(!c.admit_at(5_000_000, 5_000_001, t0));
        assert!(!c.admit_at(5_000_000, 5_000_001, t0), "no payoff seen");
        // Newer writes of the cached blocks, gone through to the members
        // (the gate closed), show that caching them would have paid.
        for b in 0..PAY_WINDOW / 8 {
            c.remove_if(b, b * 100, None);
        }
        assert!(c.admit_at(5_000_000, 5_000_001, t0), "rewrites pay");
        c.release(1);
        // So do rewrites within the cache, and a sequential stream, also
        // across stripes (16 blocks each here).
        let c = WriteCache::new(4096);
        for b in 0..PAY_WINDOW / 8 {
            c.insert(b, b * 100, &[0; 8], 0);
        }
        assert!(!c.rewrites_pay());
        for b in 0..PAY_WINDOW / 8 {
            c.insert(b, b * 100, &[1; 8], 0);
        }
        assert!(c.rewrites_pay());
        let c = WriteCache::new(4096);
        for b in 0..PAY_WINDOW / 8 {
            c.insert(b / 16, b, &[0; 8], 0);
        }
        assert_eq!(c.blocks_paid.load(Ordering::Relaxed), PAY_WINDOW / 8 - 1);
    }
}
