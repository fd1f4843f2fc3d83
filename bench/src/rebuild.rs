//! Rebuild throughput (see `Cmd::Rebuild`): a member of a RAID1 or RAID5
//! over RAM members fails and a hot spare is rebuilt, on an idle volume and
//! under guest writes, against what one member takes alone (sequential
//! 1 MiB writes from one core). Idle rebuilds are also run over namespaces
//! of the software NVMe controller (storing nothing): the RAID's and the
//! driver's own cost, and whether rows go through bounce pages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::raid::assembly::{self, VolumeSpec};
use appliance::raid::members::{FailureSink, MemberState};
use appliance::raid::monitor::Monitor;
use appliance::raid::superblock::Level;
use appliance::volume::Volume;
use appliance::workload::{Workload, WorkloadParams};
use bdev::{BlockDevice, RamDevice};
use serde_json::json;

fn ram(name: &str, mib: u64) -> Result<Arc<RamDevice>, String> {
    RamDevice::new(name, 4096, (mib << 20) / 4096)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Bytes per second one RAM member takes: sequential 1 MiB writes.
fn member_bandwidth(mib: u64) -> Result<f64, String> {
    let d = ram("bw", mib)?;
    super::prefill(&d)?;
    let t = Instant::now();
    super::prefill(&d)?;
    Ok((mib << 20) as f64 / t.elapsed().as_secs_f64())
}

/// One failure and rebuild.
fn once(
    level: Level,
    n: usize,
    mib: u64,
    load: bool,
    nvme: bool,
) -> Result<serde_json::Value, String> {
    let reactors = super::start(2)?;
    let mut members: Vec<Arc<dyn BlockDevice>> = Vec::new();
    let mut spare: Option<Arc<dyn BlockDevice>> = None;
    // Bound together so the controller drops (and shuts down) before the
    // software device stops: tuple fields drop in order.
    let nvme_pair = if nvme {
        // Members, then the spare: namespaces 1..=n+1.
        let soft = nvme::soft::SoftController::start(
            "rebuild",
            nvme::soft::SoftConfig {
                namespaces: vec![(4096, (mib << 20) / 4096); n + 1],
                null_data: true,
                max_queue_entries: 1024,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let c = nvme::Controller::new(soft.transport(), nvme::Options::default())
            .map_err(|e| e.to_string())?;
        for i in 0..=n {
            let name = if i == n {
                "spare".to_string()
            } else {
                format!("m{i}")
            };
            let ns = nvme::Namespace::new(&c, i as u32 + 1, &name).map_err(|e| e.to_string())?;
            if i == n {
                spare = Some(Arc::new(ns));
            } else {
                members.push(Arc::new(ns));
            }
        }
        Some((c, soft))
    } else {
        for i in 0..n {
            let d = ram(&format!("m{i}"), mib)?;
            // Written once, so the rebuild reads real pages, not the zero page.
            super::prefill(&d)?;
            members.push(d);
        }
        // The spare too: a RAM device's first write to a page costs a page
        // fault and clearing it (half the rebuild's time in perf
        // otherwise), which no disk has.
        let d = ram("spare", mib)?;
        super::prefill(&d)?;
        spare = Some(d);
        None
    };
    let ctrl = nvme_pair.as_ref().map(|(c, _)| c);
    let spare = spare.ok_or("no spare")?;
    let spec = VolumeSpec::new("rb", level, members);
    let (tx, rx) = std::sync::mpsc::channel();
    let (dev, meta) =
        assembly::create(&spec, FailureSink::new(tx), true).map_err(|e| e.to_string())?;
    let volume = Volume::new(reactors.set(), "rb", dev.clone());
    let monitor = Monitor::start(reactors.set(), volume.clone(), dev, rx, vec![spare]);
    monitor.set_meta(meta);
    monitor.open(true).map_err(|e| e.to_string())?;
    let w = if load {
        Some(Workload::start_on_volume(
            reactors.set(),
            &volume,
            WorkloadParams {
                queue_depth: 8,
                io_bytes: 4096,
                read_percent: 50,
                verify: false,
                span_bytes: 0,
            },
        )?)
    } else {
        None
    };
    let bounced0 = ctrl.as_ref().map_or(0, |c| c.bounced_commands());
    let t = Instant::now();
    monitor.fail_member("m1").map_err(|e| format!("{e:?}"))?;
    loop {
        let s = monitor.snapshot();
        if s.rebuild.as_ref().is_some_and(|p| p.is_finished())
            && s.states.iter().all(|&st| st == MemberState::InSync)
        {
            break;
        }
        if let Some(e) = s.rebuild.as_ref().and_then(|p| p.error()) {
            return Err(format!("rebuild failed: {e}"));
        }
        if t.elapsed() > Duration::from_secs(600) {
            return Err("rebuild did not finish in 10 minutes".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let seconds = t.elapsed().as_secs_f64();
    let bounced = ctrl.as_ref().map_or(0, |c| c.bounced_commands()) - bounced0;
    let guest_ios = match w {
        Some(w) => w.stop(Duration::from_secs(30))?.ios,
        None => 0,
    };
    // What the new member received: its share of the volume.
    let data_members = if level == Level::Raid1 {
        1
    } else {
        n as u64 - 1
    };
    let bytes = volume.info().size_bytes() / data_members;
    drop(monitor);
    reactors.shutdown().map_err(|e| e.to_string())?;
    Ok(json!({
        "level": if level == Level::Raid1 { "raid1" } else { "raid5" },
        "members": n,
        "under_load": load,
        "members_on": if nvme { "soft-nvme" } else { "ram" },
        "bounced_cmds": bounced,
        "rebuilt_bytes": bytes,
        "seconds": seconds,
        "bytes_per_sec": bytes as f64 / seconds,
        "guest_ios_meanwhile": guest_ios,
        "guest_iops_meanwhile": guest_ios as f64 / seconds,
    }))
}

/// RAID1 of two and RAID5 of four, idle and under load.
pub fn run(member_mib: u64) -> Result<serde_json::Value, String> {
    let bw = member_bandwidth(member_mib)?;
    let mut results = Vec::new();
    for (level, n) in [(Level::Raid1, 2), (Level::Raid5, 4)] {
        for load in [false, true] {
            results.push(once(level, n, member_mib, load, false)?);
        }
        results.push(once(level, n, member_mib, false, true)?);
    }
    Ok(json!({
        "bench": "rebuild",
        "member_mib": member_mib,
        "member_write_bytes_per_sec": bw,
        "results": results,
    }))
}
