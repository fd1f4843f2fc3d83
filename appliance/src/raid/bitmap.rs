//! Write-intent bitmap (md's internal bitmap): one bit per region of member
//! rows, set on every member before a write to the region reaches them and
//! cleared once the region has been quiet for a while and the members were
//! flushed. After an unclean shutdown only the regions whose bit is set
//! need a resync.
//!
//! The IO path touches three atomics per write: `begin` counts the write
//! in its region, `ready` checks the region's bit is on disk (and if not,
//! asks the daemon and makes the write wait, like a stripe lock), `end`
//! marks the region touched and uncounts the write. A daemon thread per
//! volume does the bitmap IO: setting bits at once when asked, clearing
//! quiet regions every `clear_every`.
//!
//! Why clearing is safe (the Dekker pattern, all SeqCst): a writer counts
//! itself (`active += 1`) and then reads the bit; the daemon clears the bit
//! and then reads the count. Either the daemon sees the writer (and puts
//! the bit back) or the writer sees the bit clear (and waits for the daemon
//! to set it on disk again).
//!
//! On disk it is md's internal bitmap: one 4 KiB block at byte 8192 of
//! every member (8 sectors after md's superblock), md's 256-byte bitmap
//! superblock (version 4) and then the bits, so md resynchronises only
//! what the bits mark when it assembles the members after a crash. The
//! bitmap's events follow the superblock's (md takes a bitmap older than
//! its array for stale and resyncs everything). md's bitmap has no
//! checksum; one that does not decode (or belongs to another array) is
//! not used, and with none usable the whole volume is resynchronised, as
//! without a bitmap. The appliance's first format (its own block at byte
//! 4096, with a CRC) is still read once, when such a volume is converted.

use crate::raid::RaidError;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bdev::{BlockDevice, IoOp};

use super::journal::{u32_at, u64_at};
use super::md::bitmap::MdBitmap;
use super::rebuild::Rows;

mod daemon;
pub use daemon::BitmapDaemon;

/// "APPLBMAP", the first format's magic.
pub const LEGACY_MAGIC: [u8; 8] = *b"APPLBMAP";
/// Byte offset of the first format's bitmap.
pub const LEGACY_BYTE_OFFSET: u64 = 4096;
const LEGACY_HEADER: usize = 64;
/// Byte offset of the bitmap on every member (md's place for it).
pub const BYTE_OFFSET: u64 = crate::raid::md::convert::BITMAP_BYTE;
/// Bytes the bitmap occupies on every member.
pub const BYTES: usize = 4096;
const HEADER: usize = crate::raid::md::bitmap::HEADER;
/// Most regions one bitmap block describes.
pub const MAX_BITS: u64 = ((BYTES - HEADER) * 8) as u64;
const LEGACY_VERSION: u32 = 1;
/// md's default daemon_sleep: a region quiet this long is cleared.
pub const DEFAULT_CLEAR_EVERY: Duration = Duration::from_secs(5);
/// Default region size in member bytes (md picks 64 MiB for large arrays).
pub const DEFAULT_CHUNK_BYTES: u64 = 64 << 20;

/// The largest region a bit may cover (md's bitmap chunk is a 32-bit
/// byte count).
pub const MAX_REGION_BYTES: u64 = 1 << 31;

/// Rows per bit for a bitmap of about `chunk_bytes` regions over `rows`:
/// a power of two (md's bitmap chunk is one) of at least one row, doubled
/// until the bits fit in one block.
pub fn rows_per_bit(rows: &Rows, chunk_bytes: u64) -> u64 {
    let row_bytes = (rows.blocks * rows.block_size as u64).max(1);
    let chunk_bytes = chunk_bytes.min(MAX_REGION_BYTES);
    let mut rpb = 1u64 << (chunk_bytes / row_bytes).max(1).ilog2();
    while rows.count.div_ceil(rpb) > MAX_BITS {
        rpb *= 2;
    }
    rpb
}

/// Whether a volume whose data starts `data_offset` blocks of
/// `block_size` bytes into each member has room for the bitmap.
pub fn fits(data_offset: u64, block_size: u32) -> bool {
    data_offset * block_size as u64 >= BYTE_OFFSET + BYTES as u64
}

fn words(bits: u64) -> usize {
    bits.div_ceil(64) as usize
}

/// A volume's write-intent bitmap: shared by every generation and every
/// reactor's channel.
pub struct Bitmap {
    rows_per_bit: u64,
    bits: u64,
    block_size: u32,
    row_bytes: u64,
    volume_uuid: [u8; 16],
    /// Writes begun and not ended, per region.
    active: Box<[AtomicU32]>,
    /// Bits set on disk (as far as writers may rely on).
    ondisk: Box<[AtomicU64]>,
    /// Bits writers wait for.
    wanted: Box<[AtomicU64]>,
    /// Regions written since the daemon last looked.
    touched: Box<[AtomicU64]>,
    /// The members the bitmap is written to (every one not failed).
    members: Mutex<Vec<Arc<dyn BlockDevice>>>,
    /// See [`Bitmap::set_missed_first`].
    missed_first: Mutex<Vec<std::sync::Weak<dyn BlockDevice>>>,
    /// Held by each batch of bitmap writes and by a change of members: a
    /// member taken out of the set gets no write once `set_members`
    /// returns.
    batch: Mutex<()>,
    wake: Mutex<bool>,
    cond: Condvar,
    /// No bit is cleared while set: a resync of the dirty regions runs,
    /// or stopped before it finished.
    frozen: AtomicBool,
    /// No bit is cleared while a member is failed, missing or being
    /// rebuilt (md keeps a degraded array's bits): a member that comes
    /// back is resynchronised from the bits alone (md's re-add).
    hold: AtomicBool,
    /// The slots and where their failures go: a member reported failed
    /// (before the change that records it: its `gone` flag) holds the
    /// bits too, and a member that cannot take a bitmap update (or the
    /// flush before a clearing) is failed, as md fails it, never left in
    /// sync with a bitmap that says less than it should.
    slots: Mutex<Option<(Vec<super::members::Member>, super::members::FailureSink)>>,
    clear_every_ms: AtomicU64,
    /// The array's events, written in md's bitmap superblock.
    events: AtomicU64,
    /// md's write-behind limit, kept in its bitmap superblock.
    write_behind: AtomicU64,
    /// Member sectors the bits cover (md's sync_size).
    sync_sectors: u64,
    /// The bits last written, for a rewrite of the header alone.
    last: Mutex<Option<Vec<u64>>>,
    /// Bitmap blocks written (for metrics and tests).
    pub writes: AtomicU64,
}

impl Bitmap {
    /// An empty bitmap of `rows_per_bit` rows per bit over `rows`.
    pub fn new(rows: &Rows, rows_per_bit: u64, volume_uuid: [u8; 16]) -> Result<Bitmap, RaidError> {
        let bits = rows.count.div_ceil(rows_per_bit.max(1));
        let region = rows_per_bit
            .saturating_mul(rows.blocks)
            .saturating_mul(rows.block_size as u64);
        if !region.is_power_of_two() || region > MAX_REGION_BYTES {
            return Err(RaidError::Invalid(format!(
                "a bitmap region of {rows_per_bit} rows ({region} bytes) is not a power of two up to 2 GiB, as md's bitmap chunk must be"
            )));
        }
        if rows_per_bit == 0 || bits > MAX_BITS {
            return Err(RaidError::Invalid(format!(
                "a bitmap of {rows_per_bit} rows per bit over {} rows does not fit in {BYTES} bytes",
                rows.count
            )));
        }
        let n = words(bits);
        let zeros = |k: usize| (0..k).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>();
        Ok(Bitmap {
            rows_per_bit,
            bits,
            block_size: rows.block_size as u32,
            row_bytes: rows.blocks * rows.block_size as u64,
            volume_uuid,
            active: (0..bits).map(|_| AtomicU32::new(0)).collect(),
            ondisk: zeros(n),
            wanted: zeros(n),
            touched: zeros(n),
            members: Mutex::new(Vec::new()),
            missed_first: Mutex::new(Vec::new()),
            batch: Mutex::new(()),
            wake: Mutex::new(false),
            cond: Condvar::new(),
            frozen: AtomicBool::new(false),
            hold: AtomicBool::new(false),
            slots: Mutex::new(None),
            clear_every_ms: AtomicU64::new(DEFAULT_CLEAR_EVERY.as_millis() as u64),
            events: AtomicU64::new(0),
            write_behind: AtomicU64::new(0),
            sync_sectors: rows.total * rows.block_size as u64 / crate::raid::md::SECTOR,
            last: Mutex::new(None),
            writes: AtomicU64::new(0),
        })
    }

    /// Rows per bit (recorded in the superblock).
    pub fn rows_per_bit(&self) -> u64 {
        self.rows_per_bit
    }

    /// Bytes of each member one bit covers.
    pub fn region_bytes(&self) -> u64 {
        self.rows_per_bit * self.row_bytes
    }

    /// Number of regions.
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// The region of row `row`.
    pub fn region(&self, row: u64) -> u64 {
        (row / self.rows_per_bit).min(self.bits.saturating_sub(1))
    }

    /// Regions whose bit is set now.
    pub fn dirty_regions(&self) -> u64 {
        self.ondisk
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// The set bits, as words.
    pub fn snapshot(&self) -> Vec<u64> {
        self.ondisk
            .iter()
            .map(|w| w.load(Ordering::SeqCst))
            .collect()
    }

    /// Mark `regions` dirty in memory (what assembly found on disk; every
    /// region when nothing readable was found).
    pub fn load(&self, regions: &[u64]) {
        for (w, &v) in self.ondisk.iter().zip(regions) {
            w.store(v, Ordering::SeqCst);
        }
        if let Some(last) = self.ondisk.last() {
            // Bits past the end stay clear.
            let tail = self.bits % 64;
            if tail != 0 {
                last.fetch_and((1u64 << tail) - 1, Ordering::SeqCst);
            }
        }
    }

    /// Every region dirty.
    pub fn all_dirty(&self) -> Vec<u64> {
        let mut v = vec![u64::MAX; words(self.bits)];
        let tail = self.bits % 64;
        if let (Some(last), true) = (v.last_mut(), tail != 0) {
            *last = (1u64 << tail) - 1;
        }
        v
    }

    /// Keep every bit set until [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Bits may be cleared again.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Keep the bits while `members` are not all in sync (see `hold`);
    /// a member's failure to take the bitmap goes to `failures`.
    pub fn hold_for(
        &self,
        members: &[super::members::Member],
        failures: &super::members::FailureSink,
    ) {
        let degraded = members
            .iter()
            .any(|m| m.state != super::members::MemberState::InSync);
        *self.slots.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((members.to_vec(), failures.clone()));
        self.hold.store(degraded, Ordering::SeqCst);
    }

    /// Fail the member whose device is `dev` (it did not take a bitmap
    /// write or a flush).
    fn fail(&self, dev: &Arc<dyn BlockDevice>, e: bdev::IoError) {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((members, sink)) = slots.as_ref() {
            if let Some((i, m)) = members
                .iter()
                .enumerate()
                .find(|(_, m)| Arc::ptr_eq(&m.dev, dev))
            {
                sink.report(i, m, e);
            }
        }
    }

    /// Whether `dev` is a member reported gone. Its failure is being
    /// recorded, which takes it out of the bitmap's members, so what it
    /// holds no longer counts; and a device failing by hanging would hold
    /// each batch, and every writer waiting for its bits, for the metadata
    /// IO's bound (30 s) until that change publishes (audit).
    fn is_gone(&self, dev: &Arc<dyn BlockDevice>) -> bool {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|(members, _)| {
                members
                    .iter()
                    .any(|m| Arc::ptr_eq(&m.dev, dev) && m.is_gone())
            })
    }

    /// Whether row `row` may differ on a member that missed writes since
    /// the bits were held: its region's bit is set, or a write to it has
    /// begun (a writer counts itself before its bit is set).
    pub fn row_dirty(&self, row: u64) -> bool {
        let r = self.region(row);
        let (w, bit) = ((r / 64) as usize, 1u64 << (r % 64));
        self.active
            .get(r as usize)
            .is_some_and(|a| a.load(Ordering::SeqCst) > 0)
            || self
                .ondisk
                .get(w)
                .is_some_and(|d| d.load(Ordering::SeqCst) & bit != 0)
    }

    /// The flag [`freeze`](Self::freeze) sets, for a resync to clear
    /// when it finishes.
    pub fn frozen_flag(&self) -> &AtomicBool {
        &self.frozen
    }

    /// How long a region must be quiet before its bit is cleared.
    pub fn set_clear_every(&self, d: Duration) {
        self.clear_every_ms
            .store(d.as_millis().max(1) as u64, Ordering::SeqCst);
    }

    /// Devices that did not take the bitmap's first write: none of them
    /// may be re-added from it. (Kept for the bitmap's life: such a device
    /// rebuilt in full and failed again is rebuilt in full again, which
    /// loses nothing. Held weakly, which keeps their addresses from being
    /// reused by another device: review.)
    pub fn set_missed_first(&self, devs: Vec<std::sync::Weak<dyn BlockDevice>>) {
        *self.missed_first.lock().unwrap_or_else(|e| e.into_inner()) = devs;
    }

    /// Whether device `id` (`members::device_id`) did not take the
    /// bitmap's first write.
    pub fn missed_first(&self, id: usize) -> bool {
        self.missed_first
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|w| w.as_ptr() as *const () as usize == id)
    }

    /// The members the bitmap is written to.
    pub fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Write the bitmap to these members from now on: once this returns,
    /// no write of a batch begun before goes to a member left out.
    pub fn set_members(&self, members: Vec<Arc<dyn BlockDevice>>) {
        let _batch = self.batch.lock().unwrap_or_else(|e| e.into_inner());
        *self.members.lock().unwrap_or_else(|e| e.into_inner()) = members;
    }

    /// A write to regions `r0..=r1` begins (before [`ready`](Self::ready)).
    pub fn begin(&self, r0: u64, r1: u64) {
        for r in r0..=r1.min(self.bits.saturating_sub(1)) {
            self.active[r as usize].fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Whether the bits of `r0..=r1` are on disk, so the write may reach
    /// the members. If not, the daemon is asked to set them.
    pub fn ready(&self, r0: u64, r1: u64) -> bool {
        let mut ready = true;
        let mut ask = false;
        for r in r0..=r1.min(self.bits.saturating_sub(1)) {
            let (w, bit) = ((r / 64) as usize, 1u64 << (r % 64));
            if self.ondisk[w].load(Ordering::SeqCst) & bit != 0 {
                continue;
            }
            ready = false;
            if self.wanted[w].load(Ordering::Relaxed) & bit == 0 {
                ask |= self.wanted[w].fetch_or(bit, Ordering::SeqCst) & bit == 0;
            }
        }
        if ask {
            self.kick();
        }
        ready
    }

    /// The write to `r0..=r1` is over (completed or failed).
    pub fn end(&self, r0: u64, r1: u64) {
        for r in r0..=r1.min(self.bits.saturating_sub(1)) {
            let (w, bit) = ((r / 64) as usize, 1u64 << (r % 64));
            if self.touched[w].load(Ordering::Relaxed) & bit == 0 {
                self.touched[w].fetch_or(bit, Ordering::SeqCst);
            }
            self.active[r as usize].fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn kick(&self) {
        *self.wake.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cond.notify_one();
    }

    /// The array's events, as the superblocks now say (md's bitmap must
    /// not be older than its array).
    pub fn set_events(&self, events: u64) {
        self.events.store(events, Ordering::SeqCst);
    }

    /// The volume's write-behind limit, for md's bitmap superblock.
    pub fn set_write_behind(&self, limit: u64) {
        self.write_behind.store(
            limit.min(u64::from(crate::raid::md::bitmap::MAX_WRITE_BEHIND)),
            Ordering::SeqCst,
        );
    }

    /// md's bitmap superblock for this bitmap now.
    pub fn header(&self) -> MdBitmap {
        let secs = self.clear_every_ms.load(Ordering::Relaxed).div_ceil(1000);
        MdBitmap {
            version: crate::raid::md::bitmap::VERSION_LE,
            uuid: self.volume_uuid,
            events: self.events.load(Ordering::SeqCst),
            // md re-adds a device whose events are at least this with a
            // resync of the set bits alone. The appliance's own re-add
            // decides by `Member::readd`; for md, a device that missed
            // events is always older than this, so md recovers it in full
            // (conservative, never a missed row).
            events_cleared: self.events.load(Ordering::SeqCst),
            sync_size: self.sync_sectors,
            state: 0,
            chunksize: self.region_bytes() as u32,
            daemon_sleep: secs.clamp(1, u32::MAX as u64) as u32,
            write_behind: self.write_behind.load(Ordering::SeqCst) as u32,
            sectors_reserved: (BYTES as u64 / crate::raid::md::SECTOR) as u32,
            nodes: 0,
            cluster_name: [0; 64],
        }
    }

    /// The on-disk block for bit words `bits`: md's bitmap superblock,
    /// then the bits (bit i is bit i % 8 of byte i / 8).
    pub fn encode(&self, bits: &[u64]) -> Vec<u8> {
        let mut b = vec![0u8; BYTES];
        b[..HEADER].copy_from_slice(&self.header().encode());
        // The bits fit the block by construction (`MAX_BITS`).
        let n = self.bits.div_ceil(8) as usize;
        for (i, w) in bits.iter().take(words(self.bits)).enumerate() {
            for (k, byte) in w.to_le_bytes().into_iter().enumerate() {
                if i * 8 + k < n {
                    b[HEADER + i * 8 + k] = byte;
                }
            }
        }
        b
    }

    /// The bit words of an on-disk block, if it is this volume's md
    /// bitmap. A bitmap of another chunk size (md's own, on an imported
    /// array) is folded onto this one's regions: a region is dirty if any
    /// md chunk it overlaps is.
    pub fn decode(&self, b: &[u8]) -> Result<Vec<u64>, RaidError> {
        let md = MdBitmap::decode(b, u64::MAX)
            .map_err(|e| RaidError::Invalid(format!("bitmap: {e}")))?;
        if md.bytes() > b.len() as u64 {
            // md's own bitmap of a large array: more than the block read.
            return Err(RaidError::Invalid(format!(
                "md bitmap of {} bits is larger than {BYTES} bytes",
                md.bits()
            )));
        }
        if md.uuid != self.volume_uuid {
            return Err(RaidError::Invalid("bitmap of another volume".into()));
        }
        if !matches!(
            md.version,
            crate::raid::md::bitmap::VERSION_HOSTENDIAN | crate::raid::md::bitmap::VERSION_LE
        ) {
            return Err(RaidError::Invalid(format!(
                "md bitmap version {} is not one bit per chunk",
                md.version
            )));
        }
        let bad_state =
            crate::raid::md::bitmap::STATE_STALE | crate::raid::md::bitmap::STATE_WRITE_ERROR;
        if md.state & bad_state != 0 {
            return Err(RaidError::Invalid("md marked the bitmap stale".into()));
        }
        // md's rule: a bitmap older than its array is out of date.
        if md.events < self.events.load(Ordering::SeqCst) {
            return Err(RaidError::Invalid(format!(
                "bitmap events {} older than the array's {}",
                md.events,
                self.events.load(Ordering::SeqCst)
            )));
        }
        let mut out = vec![0u64; words(self.bits)];
        let theirs = md.bits();
        let region = self.region_bytes();
        for j in 0..theirs {
            if !MdBitmap::is_set(b, j) {
                continue;
            }
            let first = j * u64::from(md.chunksize) / region;
            let last = ((j + 1) * u64::from(md.chunksize)).div_ceil(region);
            for r in first..last.min(self.bits) {
                out[(r / 64) as usize] |= 1 << (r % 64);
            }
        }
        // md's bitmap has no checksum: a header covering less than the
        // volume (a sync_size of 0 covered nothing, and every region read
        // as clean after a crash) says nothing about the rest, which is
        // dirty then. A volume grown since the block was written, too.
        if md.sync_size < self.sync_sectors {
            let covered = md.sync_size.saturating_mul(crate::raid::md::SECTOR);
            for r in covered / region..self.bits {
                out[(r / 64) as usize] |= 1 << (r % 64);
            }
        }
        Ok(out)
    }

    /// A block in the first format for bit words `bits` (what older
    /// appliances wrote; tests make old members with it).
    pub fn encode_legacy(&self, bits: &[u64]) -> Vec<u8> {
        let mut b = vec![0u8; BYTES];
        b[0..8].copy_from_slice(&LEGACY_MAGIC);
        b[8..12].copy_from_slice(&LEGACY_VERSION.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_uuid);
        b[32..40].copy_from_slice(&self.rows_per_bit.to_le_bytes());
        b[40..48].copy_from_slice(&self.bits.to_le_bytes());
        for (i, w) in bits.iter().take(words(self.bits)).enumerate() {
            let at = LEGACY_HEADER + i * 8;
            b[at..at + 8].copy_from_slice(&w.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The bit words of a block in the first format, if it is this
    /// bitmap's and intact.
    pub fn decode_legacy(&self, b: &[u8]) -> Result<Vec<u64>, RaidError> {
        if b.len() < BYTES || b[0..8] != LEGACY_MAGIC {
            return Err(RaidError::Invalid("no bitmap".into()));
        }
        let mut copy = b[..BYTES].to_vec();
        let stored = u32_at(b, 12);
        copy[12..16].fill(0);
        if crc32c::crc32c(&copy) != stored || u32_at(b, 8) != LEGACY_VERSION {
            return Err(RaidError::Invalid(
                "bitmap checksum mismatch (torn or corrupt)".into(),
            ));
        }
        let u64_at = |o: usize| u64_at(b, o);
        if b[16..32] != self.volume_uuid {
            return Err(RaidError::Invalid("bitmap of another volume".into()));
        }
        if u64_at(32) != self.rows_per_bit || u64_at(40) != self.bits {
            return Err(RaidError::Invalid(format!(
                "bitmap geometry {} rows per bit x {} bits, expected {} x {}",
                u64_at(32),
                u64_at(40),
                self.rows_per_bit,
                self.bits
            )));
        }
        Ok((0..words(self.bits))
            .map(|i| u64_at(LEGACY_HEADER + i * 8))
            .collect())
    }

    fn first_block(&self) -> u64 {
        BYTE_OFFSET / self.block_size as u64
    }

    /// Write bit words `bits` to `members` (each flushed), skipping those
    /// reported gone. Returns how many took it, and the errors of the
    /// others.
    pub fn write_to(&self, members: &[Arc<dyn BlockDevice>], bits: &[u64]) -> (usize, Vec<String>) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(bits.to_vec());
        let block = self.encode(bits);
        let mut ok = 0;
        let mut errors = Vec::new();
        for dev in members {
            if self.is_gone(dev) {
                continue;
            }
            let mut buf = block.clone();
            let res = super::metaio::sync(dev.as_ref(), IoOp::Write, self.first_block(), &mut buf)
                .and_then(|_| super::metaio::sync(dev.as_ref(), IoOp::Flush, 0, &mut []));
            match res {
                Ok(()) => ok += 1,
                Err(e) => {
                    errors.push(e.to_string());
                    self.fail(dev, bdev::IoError::DeviceFailed);
                }
            }
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        (ok, errors)
    }

    /// Write the bitmap again as last written, with the header's events
    /// brought up to date (after a superblock update). Under the batch
    /// lock: the bits are exactly what is on disk, never fewer.
    pub fn rewrite(&self) -> (usize, Vec<String>) {
        let _batch = self.batch.lock().unwrap_or_else(|e| e.into_inner());
        let bits = self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| self.snapshot());
        let members = self.members();
        self.write_to(&members, &bits)
    }

    /// Read the bitmap of every device in `members` and return the union
    /// of those that are intact; every region when none is. `legacy`
    /// reads the first format's place and block instead of md's.
    pub fn read_union(
        &self,
        members: &[Arc<dyn BlockDevice>],
        legacy: bool,
    ) -> (Vec<u64>, Vec<String>) {
        let mut union: Option<Vec<u64>> = None;
        let mut problems = Vec::new();
        for dev in members {
            let mut buf = vec![0u8; BYTES];
            let at = if legacy {
                LEGACY_BYTE_OFFSET
            } else {
                BYTE_OFFSET
            } / self.block_size as u64;
            let res = super::metaio::sync(dev.as_ref(), IoOp::Read, at, &mut buf).and_then(|_| {
                if legacy {
                    self.decode_legacy(&buf)
                } else {
                    self.decode(&buf)
                }
            });
            match res {
                Ok(bits) => {
                    let u = union.get_or_insert_with(|| vec![0; bits.len()]);
                    for (a, b) in u.iter_mut().zip(bits) {
                        *a |= b;
                    }
                }
                Err(e) => problems.push(format!("{}: {e}", dev.info().name)),
            }
        }
        (union.unwrap_or_else(|| self.all_dirty()), problems)
    }

    /// Set the wanted bits on disk. Writers waiting for them go on even if
    /// no member took the write: their data IO fails on those members too,
    /// and a stalled write would be worse.
    fn set_wanted(&self) {
        let mut want = vec![0u64; self.wanted.len()];
        let mut new = false;
        for (i, w) in self.wanted.iter().enumerate() {
            want[i] = w.swap(0, Ordering::SeqCst);
            new |= want[i] & !self.ondisk[i].load(Ordering::SeqCst) != 0;
        }
        if new {
            let image: Vec<u64> = self
                .ondisk
                .iter()
                .zip(&want)
                .map(|(d, w)| d.load(Ordering::SeqCst) | w)
                .collect();
            let _batch = self.batch.lock().unwrap_or_else(|e| e.into_inner());
            let members = self.members();
            let (ok, errors) = self.write_to(&members, &image);
            if ok == 0 {
                tracing::error!(errors = ?errors, "write-intent bitmap: no member took the update");
            } else if !errors.is_empty() {
                tracing::warn!(errors = ?errors, "write-intent bitmap: some members did not take the update");
            }
        }
        for (d, w) in self.ondisk.iter().zip(&want) {
            d.fetch_or(*w, Ordering::SeqCst);
        }
    }

    /// Whether a member the bitmap is held for has gone (its bits must
    /// stay for its re-add).
    fn any_gone(&self) -> bool {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|(members, _)| members.iter().any(|m| m.is_gone()))
    }

    /// Clear the bits of regions with no write active and none since the
    /// last pass; flush the members, then write the bitmap.
    fn clear_quiet(&self) {
        if self.frozen.load(Ordering::SeqCst) || self.hold.load(Ordering::SeqCst) {
            return;
        }
        if self.any_gone() {
            return;
        }
        let mut cleared = vec![0u64; self.ondisk.len()];
        for (i, d) in self.ondisk.iter().enumerate() {
            let recent = self.touched[i].swap(0, Ordering::SeqCst);
            let candidates = d.load(Ordering::SeqCst) & !recent;
            let mut m = candidates;
            while m != 0 {
                let b = m.trailing_zeros() as u64;
                m &= m - 1;
                let bit = 1u64 << b;
                let r = i as u64 * 64 + b;
                d.fetch_and(!bit, Ordering::SeqCst);
                if self.active[r as usize].load(Ordering::SeqCst) > 0 {
                    d.fetch_or(bit, Ordering::SeqCst);
                } else {
                    cleared[i] |= bit;
                }
            }
        }
        if cleared.iter().all(|&w| w == 0) {
            return;
        }
        // Again after the active counts were read: a write that failed on
        // a member marks it gone before its count drops, so a member that
        // went meanwhile is seen here (checked only before, its region was
        // cleared and its re-add, copying dirty regions only, skipped the
        // write it missed).
        if self.any_gone() {
            for (d, w) in self.ondisk.iter().zip(&cleared) {
                d.fetch_or(*w, Ordering::SeqCst);
            }
            return;
        }
        let _batch = self.batch.lock().unwrap_or_else(|e| e.into_inner());
        let members = self.members();
        // The quiet regions' writes must be durable before their bits go.
        for dev in &members {
            if let Err(e) = super::metaio::sync(dev.as_ref(), IoOp::Flush, 0, &mut []) {
                tracing::warn!(error = %e, "write-intent bitmap: member flush failed; bits kept, the member failed");
                // What it cached may be lost: failed, so its regions stay
                // dirty for its re-add (left in sync, the next pass whose
                // flush worked cleared them).
                self.fail(dev, bdev::IoError::DeviceFailed);
                for (d, w) in self.ondisk.iter().zip(&cleared) {
                    d.fetch_or(*w, Ordering::SeqCst);
                }
                return;
            }
        }
        let image = self.snapshot();
        let (ok, errors) = self.write_to(&members, &image);
        if ok == 0 && !members.is_empty() {
            tracing::warn!(errors = ?errors, "write-intent bitmap: clearing not written");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdev::RamDevice;
    use std::time::Instant;

    fn rows(count: u64) -> Rows {
        Rows {
            count,
            blocks: 16,
            offset: 256,
            total: count * 16,
            block_size: 4096,
        }
    }

    #[test]
    fn region_size_grows_until_the_bits_fit_one_block() {
        // 64 KiB rows: 1024 per 64 MiB.
        assert_eq!(rows_per_bit(&rows(10_000), 64 << 20), 1024);
        assert_eq!(rows_per_bit(&rows(10_000), 1), 1);
        // md's chunk is a power of two: 3 MiB regions become 2 MiB.
        assert_eq!(rows_per_bit(&rows(10_000), 3 << 20), 32);
        let huge = rows(MAX_BITS * 1024 * 3);
        let rpb = rows_per_bit(&huge, 64 << 20);
        assert!(huge.count.div_ceil(rpb) <= MAX_BITS);
        assert_eq!(rpb, 4096);
        // md's superblock at 4 KiB, the bitmap's 4 KiB after it.
        assert!(fits(3, 4096) && !fits(2, 4096) && fits(24, 512) && !fits(16, 512));
        assert!(
            Bitmap::new(&rows(5000), 7, [0; 16]).is_err(),
            "not a power of two"
        );
    }

    #[test]
    fn blocks_round_trip_in_mds_format() {
        let b = Bitmap::new(&rows(5000), 8, [3; 16]).unwrap();
        b.set_events(41);
        let mut bits = vec![0u64; words(b.bits())];
        bits[0] = 0b1011;
        bits[9] = 1 << 40;
        let block = b.encode(&bits);
        assert_eq!(b.decode(&block).unwrap(), bits);
        // md reads the same block: its superblock, then the bits.
        let md = MdBitmap::decode(&block, 8).unwrap();
        assert_eq!((md.events, md.chunksize, md.bits()), (41, 8 << 16, 625));
        b.set_write_behind(256);
        assert_eq!(b.header().write_behind, 256, "md's write-behind limit");
        assert_eq!(md.dirty(&block), 4);
        assert!(MdBitmap::is_set(&block, 9 * 64 + 40));
        let mut bad = block.clone();
        bad[0] ^= 0x40;
        assert!(b.decode(&bad).is_err(), "no magic");
        // md's lockless bitmap is not one bit per chunk.
        let mut v6 = block.clone();
        v6[4] = 6;
        assert!(b.decode(&v6).is_err(), "version 6");
        // Older than the array: out of date, as md says.
        b.set_events(42);
        assert!(b.decode(&block).unwrap_err().to_string().contains("older"));
        b.set_events(41);
        let other = Bitmap::new(&rows(5000), 8, [4; 16]).unwrap();
        assert!(other
            .decode(&block)
            .unwrap_err()
            .to_string()
            .contains("another volume"));
        // Another chunk size is folded onto this bitmap's regions.
        let coarse = Bitmap::new(&rows(5000), 16, [3; 16]).unwrap();
        let folded = coarse.decode(&block).unwrap();
        assert_eq!(
            folded[0], 0b11,
            "bits 0, 1, 3 of 8 rows are bits 0, 1 of 16"
        );
        assert_eq!(folded[4], 1 << 52, "bit 616 of 8 rows is bit 308 of 16");
        let fine = Bitmap::new(&rows(5000), 4, [3; 16]).unwrap();
        assert_eq!(fine.decode(&block).unwrap()[0], 0b11_00_11_11);
        // A header covering less than the volume (md's bitmap has no
        // checksum): what it does not cover is dirty, not clean.
        let mut short = block.clone();
        short[40..48].fill(0);
        let none = b.decode(&short).unwrap();
        assert!(
            (0..b.bits()).all(|r| none[(r / 64) as usize] & 1 << (r % 64) != 0),
            "sync_size 0 covers nothing"
        );
        let half = b.sync_sectors / 2;
        short[40..48].copy_from_slice(&half.to_le_bytes());
        let part = b.decode(&short).unwrap();
        let first_open = half * crate::raid::md::SECTOR / b.region_bytes();
        assert_eq!(part[0], bits[0], "the covered half keeps its bits");
        assert!((first_open..b.bits()).all(|r| part[(r / 64) as usize] & 1 << (r % 64) != 0));
        assert!(first_open > 64 && first_open < b.bits());
        // The first format still reads (a volume being converted).
        let legacy = b.encode_legacy(&bits);
        assert_eq!(b.decode_legacy(&legacy).unwrap(), bits);
        for at in [0usize, 13, 20, 33, 64, 100, 4095] {
            let mut bad = legacy.clone();
            bad[at] ^= 0x40;
            assert!(b.decode_legacy(&bad).is_err(), "flip at {at} not caught");
        }
        assert!(Bitmap::new(&rows(MAX_BITS + 1), 1, [0; 16]).is_err());
    }

    #[test]
    fn a_write_waits_for_its_bit_and_a_busy_region_is_never_cleared() {
        let dev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("m", 4096, 64).unwrap());
        let b = Arc::new(Bitmap::new(&rows(640), 64, [1; 16]).unwrap());
        b.set_members(vec![dev.clone()]);
        // No daemon: the bit is wanted, not set.
        b.begin(3, 3);
        assert!(!b.ready(3, 3));
        b.set_wanted();
        assert!(b.ready(3, 3));
        assert_eq!(b.dirty_regions(), 1);
        let (on_disk, problems) = b.read_union(std::slice::from_ref(&dev), false);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(on_disk[0], 1 << 3, "set on the member before the write");
        // In flight: never cleared, however quiet.
        b.clear_quiet();
        b.clear_quiet();
        assert_eq!(b.dirty_regions(), 1);
        b.end(3, 3);
        // Touched in this pass: kept once more.
        b.clear_quiet();
        assert_eq!(b.dirty_regions(), 1);
        b.clear_quiet();
        assert_eq!(b.dirty_regions(), 0);
        assert_eq!(
            b.read_union(std::slice::from_ref(&dev), false).0[0],
            0,
            "cleared on disk"
        );
        // Frozen (a resync has not covered it): kept.
        b.load(&[1 << 5]);
        b.freeze();
        b.clear_quiet();
        b.clear_quiet();
        assert_eq!(b.dirty_regions(), 1);
        b.thaw();
        b.clear_quiet();
        assert_eq!(b.dirty_regions(), 0);
        // Nothing readable on a member: everything is dirty.
        let blank: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("b", 4096, 64).unwrap());
        let (all, problems) = b.read_union(&[blank], false);
        assert_eq!(problems.len(), 1);
        assert_eq!(all, b.all_dirty());
        assert_eq!(all.iter().map(|w| w.count_ones()).sum::<u32>(), 10);
    }

    #[test]
    fn the_daemon_lets_waiting_writers_through() {
        let dev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("m", 4096, 64).unwrap());
        let b = Arc::new(Bitmap::new(&rows(640), 64, [1; 16]).unwrap());
        b.set_members(vec![dev]);
        b.set_clear_every(Duration::from_millis(20));
        let d = BitmapDaemon::start("t", b.clone()).unwrap();
        b.begin(0, 9);
        let t = Instant::now();
        while !b.ready(0, 9) {
            assert!(t.elapsed() < Duration::from_secs(10), "bits never set");
            std::thread::yield_now();
        }
        assert_eq!(b.dirty_regions(), 10);
        b.end(0, 9);
        while b.dirty_regions() > 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "bits never cleared");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(d);
    }
}
