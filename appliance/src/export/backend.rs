//! The vhost-user protocol for one connection: features, guest memory,
//! vring set-up and hand-over of each ready vring to its reactor. Runs on
//! the export's control thread, never on a reactor.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use poller::ReactorSet;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState, VHOST_USER_CONFIG_OFFSET,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::dirtylog::{DirtyLog, LogSwitch};
use super::eventfd::{Hostility, Signaller};
use super::inflight::InflightRegion;
use super::memory::{Declared, GuestMemory, MAX_REGIONS};
use super::queue::{self, QueueShared};
use super::ExportShared;

mod vring;

/// Largest virtqueue we accept.
pub const MAX_QUEUE_SIZE: u32 = 1024;
/// How long a queue's start waits for its reactor.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a dirty log switch waits for each reactor to finish the poll
/// it is in (reactors never block: this is far more than one takes).
const LOG_SWITCH_WAIT: Duration = Duration::from_secs(10);

/// Virtio features offered for an export.
pub fn offered_features(shared: &ExportShared) -> u64 {
    let bit = |b: u32| 1u64 << b;
    let l = &shared.limits;
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_MQ)
        | bit(VIRTIO_BLK_F_FLUSH);
    if l.discard {
        f |= bit(VIRTIO_BLK_F_DISCARD);
    }
    if l.write_zeroes {
        f |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    if l.read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    }
    if shared.options.live_migration {
        f |= VhostUserVirtioFeatures::LOG_ALL.bits();
    }
    f
}

/// Features offered as the volume's devices do them. A frontend that
/// reconnects after the daemon restarts sets again the features its guest
/// took (QEMU sends the guest's own), and the guest cannot take them back
/// without a reset. The volume may have come up without them meanwhile: a
/// RAID1 assembled with a member missing does neither, as it cannot know
/// what the missing one does. Refusing the frontend took the guest's disk;
/// it is taken, and such requests are answered "unsupported" (as to a
/// guest that never took them); its reads and writes go on.
const VOLUME_DECIDES: u64 = 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;

/// Protocol features offered.
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// Why a queue did not move.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// It holds writes to a suspended range.
    #[error("it holds writes to a suspended range; resume the range first")]
    Parked,
    /// Stopping or starting it failed.
    #[error("{0}")]
    Vu(VuError),
}

/// The largest configuration space a frontend reads (QEMU's and SPDK's
/// VHOST_USER_MAX_CONFIG_SIZE).
const CONFIG_SPACE_MAX: usize = 256;

impl From<VuError> for MoveError {
    fn from(e: VuError) -> MoveError {
        MoveError::Vu(e)
    }
}

struct Running {
    core: usize,
    shared: Arc<QueueShared>,
    /// A second handle of the kick eventfd the runner owns, to start the
    /// queue again elsewhere (`move_queue`).
    kick: Option<File>,
}

#[derive(Default)]
struct Vring {
    size: u16,
    addrs: Option<(u64, u64, u64)>,
    base: u16,
    kick: Option<File>,
    call: Option<Arc<Signaller>>,
    enabled: bool,
    running: Option<Running>,
    /// Its runner was told to stop and did not within the drain time-out
    /// (its device holds requests): the ring's index is the one it stops
    /// at, and the ring does not start again until it has stopped.
    lingering: Option<Arc<queue::QueueShared>>,
}

/// The protocol state of one connection.
pub struct Handler {
    set: ReactorSet,
    export: Arc<ExportShared>,
    features: u64,
    protocol: u64,
    memory: GuestMemory,
    /// `memory`'s share of what the daemon's connections hold.
    share: super::budget::TableShare,
    vrings: Vec<Vring>,
    inflight: Option<Arc<InflightRegion>>,
    /// The dirty log SET_LOG_BASE gave (used while VHOST_F_LOG_ALL is on).
    log: Option<Arc<DirtyLog>>,
    /// What the queues mark in: `log` while VHOST_F_LOG_ALL is on.
    switch: Arc<LogSwitch>,
    /// The message being handled asked for a reply (NEED_REPLY).
    asks_reply: bool,
    /// Its frontend went away: nothing starts a ring on it any more.
    gone: bool,
    /// Its frontend made one of our eventfd writes block (see
    /// `eventfd::Signaller`): none of its eventfds is written again, new
    /// ones included.
    hostile: Arc<Hostility>,
}

/// A kick or call descriptor must be an eventfd: the reactor reads and
/// writes it on the IO path, and anything else (a pipe whose buffer fills,
/// a socket, a file) could block that reactor and every queue on it. Both
/// are made non-blocking here, though the frontend shares the flag and can
/// clear it: the reactor drains the kick without waiting whatever the
/// flag says (RWF_NOWAIT), and writes a call only when it has room, with
/// a watchdog that frees a write the frontend still made block
/// (`eventfd::Signaller`).
fn check_eventfd(fd: &Option<File>, what: &str, index: u8) -> VuResult<()> {
    use std::os::fd::AsRawFd;
    let Some(f) = fd else {
        return Ok(());
    };
    let link = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .map_err(|e| invalid(format!("vring {index} {what} fd: {e}")))?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(invalid(format!(
            "vring {index} {what} fd is {}, not an eventfd",
            link.display()
        )));
    }
    // A kick eventfd in semaphore mode gives back one count per read, so
    // after the runner's one read it stays readable and its reactor never
    // sleeps (every queue on that core pays). The kernel says so in
    // fdinfo (since 6.3; older kernels do not, and it is let through).
    if what == "kick" {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.as_raw_fd()))
            .unwrap_or_default();
        let semaphore = info.lines().any(|l| {
            l.strip_prefix("eventfd-semaphore:")
                .is_some_and(|v| v.trim() == "1")
        });
        if semaphore {
            return Err(invalid(format!(
                "vring {index} kick fd is an eventfd in semaphore mode"
            )));
        }
    }
    // SAFETY: fcntl on a descriptor we own.
    let ok = unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(invalid(format!(
            "vring {index} {what} fd: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn invalid(what: impl std::fmt::Display) -> VuError {
    tracing::warn!("vhost-user: {what}");
    VuError::InvalidParam
}

impl Handler {
    /// A fresh connection's state.
    pub fn new(set: ReactorSet, export: Arc<ExportShared>) -> Handler {
        let n = export.options.num_queues as usize;
        let hostile = Hostility::of(export.cooldown.clone());
        Handler {
            set,
            export,
            features: 0,
            protocol: 0,
            memory: GuestMemory::default(),
            share: Default::default(),
            log: None,
            switch: Arc::default(),
            asks_reply: false,
            vrings: (0..n).map(|_| Vring::default()).collect(),
            inflight: None,
            gone: false,
            hostile,
        }
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| invalid(format!("vring {index} does not exist")))
    }

    /// Whether the message about to be handled asks for a reply.
    pub fn set_asks_reply(&mut self, on: bool) {
        self.asks_reply = on;
    }

    /// The frontend agreed to answer messages that ask for it.
    pub fn reply_ack(&self) -> bool {
        self.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// The frontend agreed to a backend request channel.
    pub fn backend_req(&self) -> bool {
        self.protocol & VhostUserProtocolFeatures::BACKEND_REQ.bits() != 0
    }

    /// Whether the frontend has dirty logging on (a ring starts only once
    /// it gave a log too).
    fn logging(&self) -> bool {
        self.features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
    }

    /// Start the rings that waited for the dirty log (each one's failure
    /// said, the others started all the same).
    fn start_waiting(&mut self, why: &str) {
        for i in 0..self.vrings.len() as u32 {
            if let Err(e) = self.try_start(i) {
                tracing::warn!(vring = i, error = %e, why, "a vring that waited for the dirty log did not start");
            }
        }
    }

    /// Logging went on or off, or the log changed: the queues mark in the
    /// log SET_LOG_BASE gave while logging is on, else in none. They pick
    /// it up at their next poll, requests in flight included (no drain:
    /// see `LogSwitch`); this returns once every reactor has finished the
    /// polls that began before, so a write the frontend is told about
    /// after it is marked. Refused, nothing switched, if the log does not
    /// cover guest memory.
    fn switch_log(&mut self) -> VuResult<()> {
        let log = self.log.clone().filter(|_| self.logging());
        if let Some(l) = &log {
            let covered = l.pages().saturating_mul(super::dirtylog::LOG_PAGE);
            if covered < self.memory.end() {
                return Err(invalid(format!(
                    "guest memory up to {:#x} while the dirty log covers {covered:#x}",
                    self.memory.end()
                )));
            }
        }
        self.switch.set(log);
        for core in 0..self.set.len() {
            self.set
                .call(core, LOG_SWITCH_WAIT, |_| ())
                .map_err(|e| invalid(format!("switching the dirty log: {e}")))?;
        }
        Ok(())
    }

    fn protocol_features_acked(&self) -> bool {
        self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Run `change`, a new memory table of `backing`, with the connection's
    /// share of the daemon's guest memory taken first (before anything is
    /// mapped and perhaps pinned), and given back if the change fails.
    fn with_share(
        &mut self,
        backing: super::budget::Files,
        change: impl FnOnce(&mut Self) -> VuResult<()>,
    ) -> VuResult<()> {
        let before = self.share.resize(backing, true).map_err(invalid)?;
        let r = change(self);
        if r.is_err() {
            let _ = self.share.resize(before, false);
        }
        r
    }

    /// Publish a new guest memory map: the export's queues drain and pick
    /// it up on resume (the quiesce epoch of the export's memory object).
    fn publish_memory(&mut self, memory: GuestMemory) -> VuResult<()> {
        let _own = super::watchdog::own_work(&self.export);
        // While logging, memory past the log's end would be written
        // unlogged (only counted): refused, as SET_LOG_BASE refuses a log
        // too small for the memory (QEMU grows the log first).
        if let Some(log) = self.log.as_ref().filter(|_| self.logging()) {
            let covered = log.pages().saturating_mul(super::dirtylog::LOG_PAGE);
            if covered < memory.end() {
                return Err(invalid(format!(
                    "guest memory up to {:#x} while the dirty log covers {covered:#x}",
                    memory.end()
                )));
            }
        }
        let mut snapshot = memory.snapshot().map_err(invalid)?;
        snapshot.log = self.switch.clone();
        self.export
            .memory
            .reconfigure(self.drain_timeout(), |_| Ok::<_, String>((snapshot, ())))
            .map_err(|e| invalid(format!("switching guest memory: {e}")))?;
        // The connection's share of the daemon's guest memory follows the
        // table it now has (a table that grows took its share first:
        // `with_share`; one that shrinks gives it back here).
        let _ = self.share.resize(memory.files(), false);
        self.memory = memory;
        Ok(())
    }

    /// Bytes of guest memory this export may map.
    fn memory_limit(&self) -> u64 {
        match self.export.options.memory_limit {
            // The host's memory: more can never be a real guest's.
            0 => crate::host::memory_total().unwrap_or(u64::MAX),
            n => n,
        }
    }

    /// The volume's size now in sectors, not at export creation: it may
    /// have grown.
    fn capacity(&self) -> u64 {
        self.export.volume.info().size_bytes() / super::request::SECTOR
    }

    /// The virtio-blk configuration space we fill (up to
    /// write_zeroes_may_unmap and its padding).
    fn config_space(&self) -> Vec<u8> {
        let l = &self.export.limits;
        let info = self.export.volume.info();
        let mut c = vec![0u8; 60];
        let bs = l.block_size;
        c[0..8].copy_from_slice(&self.capacity().to_le_bytes());
        c[8..12].copy_from_slice(&l.size_max.to_le_bytes());
        c[12..16].copy_from_slice(&l.seg_max.to_le_bytes());
        c[20..24].copy_from_slice(&bs.to_le_bytes());
        // Topology: minimum IO (a RAID5 chunk) and optimal IO (its stripe).
        c[26..28]
            .copy_from_slice(&(info.min_io_blocks.clamp(1, u16::MAX as u32) as u16).to_le_bytes());
        c[28..32].copy_from_slice(&info.optimal_io_boundary.to_le_bytes());
        c[34..36].copy_from_slice(&self.export.options.num_queues.to_le_bytes());
        let sectors_per_block = bs / 512;
        c[36..40].copy_from_slice(&l.max_discard_sectors.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&sectors_per_block.to_le_bytes());
        c[48..52].copy_from_slice(&l.max_discard_sectors.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.stop_all();
        // Stopped, not disabled: each ring waits for a new kick fd.
        for v in &mut self.vrings {
            v.kick = None;
        }
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.stop_all();
        for v in &mut self.vrings {
            *v = Vring::default();
        }
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(offered_features(&self.export))
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        tracing::debug!(
            features = format_args!("{features:#x}"),
            "vhost-user SET_FEATURES"
        );
        let offered = offered_features(&self.export);
        let not_offered = features & !offered;
        if not_offered & !VOLUME_DECIDES != 0 {
            return Err(invalid(format!(
                "features {not_offered:#x} were not offered"
            )));
        }
        if not_offered != 0 {
            tracing::warn!(
                export = %self.export.options.socket.display(),
                features = format_args!("{not_offered:#x}"),
                "vhost-user: the frontend keeps discard or write zeroes, which its guest took before and the volume no longer does: such requests are answered \"unsupported\""
            );
        }
        let log_changed = (self.features ^ features) & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        let log_on = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        let running = self
            .vrings
            .iter()
            .any(|v| v.running.is_some() || v.lingering.is_some());
        if log_changed && log_on && self.log.is_none() && running {
            // Running rings would write guest memory with nothing to log
            // it in (QEMU gives the log first; a ring not running yet
            // waits for it). A frontend that cannot hear the refusal would
            // migrate believing writes logged: its connection ends.
            if !(self.reply_ack() && self.asks_reply) {
                tracing::error!("dirty logging asked for on running rings before SET_LOG_BASE: the frontend's connection is dropped");
                self.export.fault().raise();
            }
            return Err(invalid(
                "dirty logging on running rings before SET_LOG_BASE",
            ));
        }
        let before = std::mem::replace(&mut self.features, features);
        if log_changed {
            let on = self.logging();
            tracing::info!(on, "vhost-user dirty logging");
            if !on {
                // QEMU frees its log when logging stops and sends a new
                // SET_LOG_BASE when it starts again (after SET_FEATURES,
                // at a device start during a migration): one kept would
                // be checked against memory grown since.
                self.log = None;
            }
            if let Err(e) = self.switch_log() {
                if !on {
                    // Marks may go on into a log the frontend let go of:
                    // harmless (QEMU does not wait for this answer).
                    tracing::warn!(error = %e, "dirty logging could not be switched off everywhere yet");
                    self.start_waiting("dirty logging is off");
                    return Ok(());
                }
                // Not logging, as before: the features say so too. A
                // frontend that cannot hear the failure (no REPLY_ACK, or
                // this message did not ask for a reply) would migrate
                // believing writes logged that are not: its connection
                // ends.
                self.features = before;
                self.switch.set(None);
                if !(self.reply_ack() && self.asks_reply) {
                    tracing::error!(error = %e, "dirty logging could not be switched on: the frontend's connection is dropped");
                    self.export.fault().raise();
                }
                return Err(e);
            }
            if !on {
                self.start_waiting("dirty logging is off");
            }
        }
        if !self.protocol_features_acked() {
            // Without protocol features a vring runs as soon as it is kicked.
            for i in 0..self.vrings.len() as u32 {
                self.vrings[i as usize].enabled = true;
                self.try_start(i)?;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let _own = super::watchdog::own_work(&self.export);
        tracing::debug!(regions = ctx.len(), "vhost-user SET_MEM_TABLE");
        if ctx.len() != files.len() || ctx.len() > MAX_REGIONS {
            return Err(invalid(
                "memory table and file count differ or are too many",
            ));
        }
        let declared: Vec<Declared> = ctx
            .iter()
            .map(|r| Declared {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                user_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
            })
            .collect();
        // The whole table is checked before any region is mapped (and
        // perhaps pinned for DMA).
        GuestMemory::default()
            .check_table(&declared, self.memory_limit())
            .map_err(invalid)?;
        let mut backing = super::budget::Files::new();
        for (d, f) in declared.iter().zip(&files) {
            let of = super::budget::file_of(f).map_err(invalid)?;
            super::budget::count(&mut backing, of, d.size);
        }
        self.with_share(backing, |h| {
            let mut memory = GuestMemory::default();
            for (d, f) in declared.into_iter().zip(&files) {
                memory.add(GuestMemory::map_region(d, f, &h.export.fault()).map_err(invalid)?);
            }
            h.publish_memory(memory)
        })?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        tracing::debug!(index, num, "vhost-user SET_VRING_NUM");
        if num == 0 || num > MAX_QUEUE_SIZE || !num.is_power_of_two() {
            return Err(invalid(format!(
                "vring size {num} must be a power of two up to {MAX_QUEUE_SIZE}"
            )));
        }
        let v = self.vring(index)?;
        if v.running.is_some() {
            return Err(invalid("vring size changed while running"));
        }
        v.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        tracing::debug!(index, "vhost-user SET_VRING_ADDR");
        let t = |va: u64| self.memory.va_to_gpa(va);
        let (Some(d), Some(u), Some(a)) = (t(descriptor), t(used), t(available)) else {
            return Err(invalid(format!(
                "vring {index} addresses are outside guest memory"
            )));
        };
        // virtio's alignments (split ring): a misaligned part was replaced
        // by address 0 when the ring started, and the ring ran there
        // (audit).
        if d % 16 != 0 || a % 2 != 0 || u % 4 != 0 {
            return Err(invalid(format!(
                "vring {index} addresses {d:#x}/{a:#x}/{u:#x} are misaligned (descriptors on 16 bytes, available ring on 2, used ring on 4)"
            )));
        }
        let v = self.vring(index)?;
        if v.running.is_some() {
            // A frontend turning dirty logging on or off for a running
            // ring sends its addresses again with the log flag: the same
            // addresses are fine (the used ring is logged at its guest
            // address either way); moving a running ring is not.
            if v.addrs == Some((d, a, u)) {
                return Ok(());
            }
            return Err(invalid("vring addresses changed while running"));
        }
        v.addrs = Some((d, a, u));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        tracing::debug!(index, base, "vhost-user SET_VRING_BASE");
        let v = self.vring(index)?;
        if v.running.is_some() {
            return Err(invalid("vring base changed while running"));
        }
        v.base = base as u16;
        // The frontend's base is where the ring starts, even set while the
        // last runner lingers: that runner's stop no longer replaces it.
        // The ring still waits for that runner (the export's list).
        v.lingering = None;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        tracing::debug!(index, "vhost-user GET_VRING_BASE");
        self.stop_for_frontend(index)?;
        // Never an index a runner still answers past.
        if self.settle_lingering(index)? {
            return Err(invalid(format!(
                "vring {index}: its last runner still waits for its device to answer requests; no index to give yet"
            )));
        }
        let v = self.vring(index)?;
        tracing::debug!(index, base = v.base, "vhost-user GET_VRING_BASE answered");
        v.kick = None;
        if self.protocol_features_acked() {
            self.vrings[index as usize].enabled = false;
        }
        Ok(VhostUserVringState::new(
            index,
            self.vrings[index as usize].base as u32,
        ))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        tracing::debug!(index, fd = fd.is_some(), "vhost-user SET_VRING_KICK");
        // The invalid-FD flag asks for polling without kicks, which the
        // queues do not do: refused, so the frontend hears it, rather than
        // taken and the ring never started (audit).
        if fd.is_none() {
            return Err(invalid(format!(
                "vring {index}: polling without a kick fd is not supported"
            )));
        }
        check_eventfd(&fd, "kick", index)?;
        super::eventfd::start_watchdog();
        let acked = self.protocol_features_acked();
        if self.vring(index as u32)?.running.is_some() {
            // A new kick fd for a running ring (libvhost-user takes it
            // too): the runner waits on the old one, so it stops (its
            // requests in flight drain) and starts again on this one; or,
            // let go with its device holding requests, once it has
            // stopped.
            if let Err(e) = self.stop_for_frontend(index as u32) {
                if self.vring(index as u32)?.running.is_some() {
                    return Err(e);
                }
            }
        }
        let v = self.vring(index as u32)?;
        v.kick = fd;
        if !acked {
            v.enabled = true;
        }
        self.try_start(index as u32)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        tracing::debug!(index, fd = fd.is_some(), "vhost-user SET_VRING_CALL");
        check_eventfd(&fd, "call", index)?;
        let hostile = self.hostile.clone();
        let v = self.vring(index as u32)?;
        v.call = fd.map(|f| Signaller::new(f, hostile.clone()));
        if let Some(r) = &v.running {
            r.shared.set_call(v.call.clone());
            // Wake the queue's reactor if it sleeps, so the runner takes
            // the new fd (and tells it once) now rather than at the next
            // kick: the guest may be waiting for an interrupt that went to
            // the old fd. A kick is the wake-up the runner already has.
            // (A full counter takes nothing: the reactor is awake then
            // anyway. Watched, like every write to a frontend's eventfd.)
            if let Some(kick) = r.kick.as_ref().and_then(|k| k.try_clone().ok()) {
                Signaller::new(kick, hostile).signal();
            }
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(index as u32).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(offered_protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        tracing::debug!(
            features = format_args!("{features:#x}"),
            "vhost-user SET_PROTOCOL_FEATURES"
        );
        let offered = offered_protocol_features().bits();
        if features & !offered != 0 {
            return Err(invalid(format!(
                "protocol features {:#x} were not offered",
                features & !offered
            )));
        }
        self.protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        tracing::debug!(index, enable, "vhost-user SET_VRING_ENABLE");
        if !self.protocol_features_acked() {
            return Err(invalid("SET_VRING_ENABLE without protocol features"));
        }
        self.vring(index)?.enabled = enable;
        if enable {
            self.try_start(index)
        } else {
            self.stop_for_frontend(index)
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let mut c = self.config_space();
        // The rust-vmm frontends (cloud-hypervisor, Firecracker, dragonball)
        // ask at VHOST_USER_CONFIG_OFFSET (0x100) for the device's byte 0;
        // QEMU and SPDK ask at 0. No frontend reads our space past 0xff
        // from 0, so the two cannot be confused. (Refused before: such a
        // VM never got its disk: audit.)
        let offset = offset
            .checked_sub(VHOST_USER_CONFIG_OFFSET)
            .unwrap_or(offset);
        let (start, end) = (offset as usize, offset as usize + size as usize);
        if end > CONFIG_SPACE_MAX {
            return Err(invalid(format!(
                "config read {start}..{end} is outside the {CONFIG_SPACE_MAX} byte config space"
            )));
        }
        // Fields past ours (newer virtio-blk ones: secure erase, zoned) read
        // as zero, as the spec asks of unused ones: SPDK's initiator reads
        // 256 bytes at once, and a frontend may size its read to a newer
        // struct than ours. An error here would be a zero-size reply, which
        // such a frontend takes for a failed device.
        c.resize(CONFIG_SPACE_MAX, 0);
        if start == 0 && end >= 8 {
            self.export.read_capacity(u64::from_le_bytes([
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
            ]));
        }
        Ok(c[start..end].to_vec())
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "the virtio-blk config space is read-only here",
        ))
    }

    // The export keeps its own handle on this channel
    // (`super::frontend`); the crate's is not needed.
    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation(
            "shared objects are not supported",
        ))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let _own = super::watchdog::own_work(&self.export);
        if inflight.num_queues as usize > self.vrings.len() {
            return Err(invalid(format!(
                "inflight area for {} queues; the export has {}",
                inflight.num_queues,
                self.vrings.len()
            )));
        }
        let (region, size, file) =
            InflightRegion::create(inflight.num_queues, inflight.queue_size).map_err(invalid)?;
        self.inflight = Some(Arc::new(region));
        Ok((
            VhostUserInflight::new(size, 0, inflight.num_queues, inflight.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let _own = super::watchdog::own_work(&self.export);
        tracing::debug!(
            queues = inflight.num_queues,
            size = inflight.queue_size,
            "vhost-user SET_INFLIGHT_FD"
        );
        if inflight.num_queues as usize > self.vrings.len() {
            return Err(invalid(format!(
                "inflight area for {} queues; the export has {}",
                inflight.num_queues,
                self.vrings.len()
            )));
        }
        let region = InflightRegion::open(
            &file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(invalid)?;
        let mut region = region;
        region.protect(&self.export.fault()).map_err(invalid)?;
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_REGIONS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        let _own = super::watchdog::own_work(&self.export);
        let d = Declared {
            gpa: region.guest_phys_addr,
            size: region.memory_size,
            user_addr: region.user_addr,
            mmap_offset: region.mmap_offset,
        };
        self.memory
            .check_table(&[d], self.memory_limit())
            .map_err(invalid)?;
        let mut backing = self.memory.files();
        let of = super::budget::file_of(&fd).map_err(invalid)?;
        super::budget::count(&mut backing, of, d.size);
        self.with_share(backing, |h| {
            let r = GuestMemory::map_region(d, &fd, &h.export.fault()).map_err(invalid)?;
            let mut memory = h.memory.clone();
            memory.add(r);
            h.publish_memory(memory)
        })?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let mut memory = self.memory.clone();
        memory
            .remove(region.guest_phys_addr, region.memory_size)
            .map_err(invalid)?;
        self.publish_memory(memory)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        tracing::debug!(
            size = log.mmap_size,
            offset = log.mmap_offset,
            "vhost-user SET_LOG_BASE"
        );
        // A log the backend cannot use fails the migration, not silently
        // the copy: the connection closes (the frontend waits for this
        // message's reply, so an error without one would hang it).
        let refuse = |why: String| {
            tracing::warn!(error = %why, "vhost-user SET_LOG_BASE refused: the connection closes");
            VuError::ReqHandlerError(std::io::Error::new(std::io::ErrorKind::InvalidInput, why))
        };
        let map = DirtyLog::map(&file, log.mmap_size, log.mmap_offset, &self.export.fault())
            .map_err(refuse)?;
        let end = self.memory.end();
        if map.pages().saturating_mul(super::dirtylog::LOG_PAGE) < end {
            return Err(refuse(format!(
                "a dirty log of {} pages does not cover guest memory up to {end:#x}",
                map.pages()
            )));
        }
        self.log = Some(Arc::new(map));
        if self.logging() {
            self.switch_log()?;
            self.start_waiting("the dirty log came");
        }
        Ok(())
    }
}
