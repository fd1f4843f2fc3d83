//! Resync after an unclean stop, with and without a write-intent bitmap
//! (see `Cmd::Resync`): what the bitmap saves a restarted volume.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::raid::assembly::{self, VolumeSpec};
use appliance::raid::members::FailureSink;
use appliance::raid::monitor::Monitor;
use appliance::raid::superblock::Level;
use appliance::volume::Volume;
use appliance::workload::{Workload, WorkloadParams};
use bdev::{BlockDevice, RamDevice};
use serde_json::json;

/// One stop and restart; the bitmap's region when `bitmap`.
fn once(member_mib: u64, span_mib: u64, bitmap: bool) -> Result<serde_json::Value, String> {
    let reactors = super::start(2)?;
    let members: Vec<Arc<dyn BlockDevice>> = (0..4)
        .map(|i| {
            RamDevice::new(&format!("m{i}"), 4096, (member_mib << 20) / 4096)
                .map(|d| Arc::new(d) as Arc<dyn BlockDevice>)
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let spec = VolumeSpec {
        bitmap_chunk_bytes: if bitmap {
            appliance::raid::bitmap::DEFAULT_CHUNK_BYTES
        } else {
            0
        },
        ..VolumeSpec::new("resync", Level::Raid5, members.clone())
    };
    let (dev, meta) =
        assembly::create(&spec, FailureSink::none(), false).map_err(|e| e.to_string())?;
    let (_tx, rx) = std::sync::mpsc::channel();
    let volume = Volume::new(reactors.set(), "resync", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev.clone(), rx, vec![]);
    monitor.set_meta(meta);
    monitor.open(true).map_err(|e| e.to_string())?;
    let w = Workload::start_on_volume(
        reactors.set(),
        &volume,
        WorkloadParams {
            queue_depth: 32,
            io_bytes: 4096,
            read_percent: 0,
            verify: false,
            span_bytes: span_mib << 20,
        },
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let totals = w.stop(Duration::from_secs(10))?;
    let dirty = dev
        .member_set()
        .bitmap
        .as_ref()
        .map_or(0, |b| b.dirty_regions());
    // The stop: no close, so the superblocks still say dirty.
    drop(monitor);
    drop(volume);
    drop(dev);
    reactors.shutdown().map_err(|e| e.to_string())?;

    let reactors = super::start(2)?;
    let mut report = assembly::assemble(&members, |_| FailureSink::none());
    if report.volumes.len() != 1 {
        return Err(format!("assembly: {:?}", report.problems));
    }
    let v = report.volumes.remove(0);
    let (_tx, rx) = std::sync::mpsc::channel();
    let volume = Volume::new(reactors.set(), "resync", v.device.clone());
    let monitor = Monitor::start(reactors.set(), volume, v.device.clone(), rx, vec![]);
    monitor.set_meta(v.meta);
    let t = Instant::now();
    let p = monitor
        .open(v.was_clean)
        .map_err(|e| e.to_string())?
        .ok_or("no resync after an unclean stop")?;
    while !p.is_finished() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let seconds = t.elapsed().as_secs_f64();
    if let Some(e) = p.error() {
        return Err(e);
    }
    monitor.close().map_err(|e| e.to_string())?;
    drop(monitor);
    reactors.shutdown().map_err(|e| e.to_string())?;
    Ok(json!({
        "writes": totals.ios,
        "dirty_regions": dirty,
        "resync_seconds": seconds,
        "resync_bytes_per_member": p.bytes.load(Ordering::SeqCst),
    }))
}

/// Both ways, same workload.
pub fn run(member_mib: u64, span_mib: u64) -> Result<serde_json::Value, String> {
    Ok(json!({
        "bench": "resync",
        "member_mib": member_mib,
        "span_mib": span_mib,
        "results": {
            "resync": once(member_mib, span_mib, false)?,
            "bitmap": once(member_mib, span_mib, true)?,
        },
    }))
}
