//! A queue runner made from what the control thread set up: its gates,
//! ring and channel opened on this reactor, and requests a restart left
//! in flight taken up again first.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use poller::Ctx;
use virtio_queue::QueueT;

use super::super::chain::RegionCache;
use super::super::ring::Ring;
use super::super::QueueError;
use super::{sized_limits, QueueSetup, Runner};
use crate::qos::QueueQos;

/// Start serving a queue on this reactor.
pub fn start(ctx: &mut Ctx, setup: QueueSetup) -> Result<(), QueueError> {
    let mem_gate = setup.memory.local(ctx)?;
    let vol_gate = setup.volume.quiesce().local(ctx)?;
    let (mem_gen, mem) = mem_gate.config();
    let (vol_gen, vol) = vol_gate.config();
    let ring = Ring::new(&setup.queue, &mem).map_err(|source| QueueError::Ring {
        queue: setup.index,
        source,
    })?;
    // No room for a channel yet (an NVMe queue pair of a channel just
    // dropped, the queue's own on the core a move left, is given back
    // once the device deleted it): unless the caller would rather know,
    // the queue starts stale, taking nothing from its ring, and asks
    // again at its first poll, as after a change.
    let (ch, vol_gen, vol_retry) = match vol.device.open_channel() {
        Ok(ch) => (ch, vol_gen, None),
        Err(bdev::BdevError::Exhausted(e)) if setup.wait_for_room => {
            tracing::warn!(queue = setup.index, error = %e, "no room for the volume's channel yet; trying again every 20 ms");
            let none: Box<dyn bdev::IoChannel> = Box::new(bdev::FailingChannel::default());
            (none, vol_gen.wrapping_sub(1), Some(ctx.now()))
        }
        Err(source) => {
            return Err(QueueError::Device {
                volume: setup.volume.name().to_string(),
                source,
            })
        }
    };
    // Non-blocking already: the handler checked it is an eventfd and set it so.
    let fd = setup.kick.as_raw_fd();
    let size = setup.queue.size() as usize;
    let call = setup
        .shared
        .call
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let call_gen = setup.shared.call_gen.load(Ordering::SeqCst);
    let mut runner = Runner {
        index: setup.index,
        queue: setup.queue,
        ring,
        kick: setup.kick,
        call,
        call_gen,
        shared: setup.shared,
        mem_gate,
        mem_gen,
        log: None,
        log_version: u64::MAX,
        logged: (0..size).map(|_| (0, Vec::new())).collect(),
        mem,
        vol_gate,
        vol_gen,
        vol_retry,
        vol_retry_said: None,
        ch,
        limits: sized_limits(&setup.limits, &vol),
        slots: (0..size).map(|_| None).collect(),
        free: (0..size as u32).rev().collect(),
        comps: Vec::with_capacity(size),
        descs: Vec::with_capacity(16),
        idle_polls: 0,
        notify_enabled: false,
        signal_pending: false,
        owe_signal: false,
        broken: false,
        ring_lost: false,
        fault: setup.fault,
        write_through: setup.write_through,
        owed: VecDeque::new(),
        inflight: setup.inflight,
        resubmit: VecDeque::new(),
        suspended: setup.volume.suspended_range().clone(),
        parked: Vec::new(),
        parked_version: 0,
        stats: setup.stats,
        qos: setup.volume.qos().map(QueueQos::new),
        qos_wait: None,
        qos_timer: None,
        volume: setup.volume,
        now: ctx.now(),
        now_ns: 0,
        epoch: ctx.now(),
        regions: RegionCache::default(),
    };
    // Requests taken before a restart: the avail ring has moved past them,
    // so continue after them and submit them again, oldest first. (A new
    // area, a migration's destination: the frontend's base stands.)
    if let Some(heads) = runner
        .inflight
        .as_mut()
        .and_then(|i| i.recover(runner.ring.next_used()))
    {
        let used = runner.ring.next_used();
        runner
            .ring
            .set_next_avail(used.wrapping_add(heads.len() as u16));
        if !heads.is_empty() {
            tracing::info!(
                queue = runner.index,
                requests = heads.len(),
                "resubmitting requests in flight before the restart"
            );
        }
        runner.resubmit = heads.into();
        // A completion put in the used ring just before the daemon died
        // may never have been signalled, and a guest waiting for it (with
        // EVENT_IDX, for that one) would wait for good. It is told once; a
        // spurious interrupt costs it a look at the ring (audit).
        runner.signal_now();
    }
    // Its first writes to the ring are logged as any (a start during a
    // migration).
    runner.adopt_log();
    // Requests may already be waiting from before a reconnect.
    runner.ring.disable_notification();
    ctx.watch_fd(fd);
    ctx.add_poller(move |ctx| runner.poll(ctx));
    Ok(())
}
