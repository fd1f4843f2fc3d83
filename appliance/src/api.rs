//! The gRPC service: requests are checked and turned into [`Manager`]
//! calls, run on a blocking thread (a change may wait for a volume's IO to
//! drain), and answers are turned back into messages.

mod nvmf_pb;

use std::sync::Arc;
use std::time::Duration;

use mgmt::pb;
use tonic::{Request, Response, Status};

use crate::config::{DeviceDecl, ExportDecl, VolumeDecl};
use crate::manager::{
    DeviceView, ExportView, Level, Manager, MgmtError, UnavailableView, VolumeView,
};

/// The service over a manager.
#[derive(Clone)]
pub struct Service {
    mgr: Arc<Manager>,
    /// Calls of this service that may run at once (the rest wait their
    /// turn without a thread); none: as many as the runtime has threads.
    calls: Option<Arc<tokio::sync::Semaphore>>,
}

impl Service {
    /// Serve `mgr`.
    pub fn new(mgr: Arc<Manager>) -> Service {
        Service { mgr, calls: None }
    }

    /// The same, running at most `calls` calls at once: the API on TCP
    /// leaves the rest of the runtime's threads to the unix socket (the
    /// operator) and the health probe. Before, callers on TCP holding
    /// calls that wait (a change on a volume that cannot quiesce, an
    /// attach of a silent remote device) took every thread, and the
    /// operator's calls queued behind them (audit).
    pub fn limited(&self, calls: usize) -> Service {
        Service {
            mgr: self.mgr.clone(),
            calls: Some(Arc::new(tokio::sync::Semaphore::new(calls))),
        }
    }

    /// Run `f` on a blocking thread, once this service may run one more.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Manager) -> T + Send + 'static,
    ) -> Result<T, Status> {
        // Held until the thread is done (a caller that goes away does not
        // end the call).
        let turn = match &self.calls {
            Some(c) => Some(
                c.clone()
                    .acquire_owned()
                    .await
                    // (Never closed: the error cannot come.)
                    .map_err(|_| Status::unavailable("the API takes no more calls"))?,
            ),
            None => None,
        };
        let mgr = self.mgr.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            f(&mgr)
        })
        .await
        .map_err(|e| {
            // A panic's message is the daemon's, for its log: a caller
            // (on TCP, perhaps another host) gets no look inside (audit).
            tracing::error!(error = %e, "an API call ended in a panic");
            Status::internal("the call failed inside the daemon (its log says why)")
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Manager) -> Result<T, MgmtError> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        self.blocking(f).await?.map(Response::new).map_err(status)
    }
}

fn status(e: MgmtError) -> Status {
    let b = bounded;
    match e {
        MgmtError::InvalidArgument { .. } => Status::invalid_argument(b(e.to_string())),
        MgmtError::NotFound(m) => Status::not_found(b(m)),
        MgmtError::AlreadyExists(m) => Status::already_exists(b(m)),
        MgmtError::FailedPrecondition(m) => Status::failed_precondition(b(m)),
        MgmtError::DeadlineExceeded(m) => Status::deadline_exceeded(b(m)),
        MgmtError::ResourceExhausted(m) => Status::resource_exhausted(b(m)),
        MgmtError::Unavailable(m) => Status::unavailable(b(m)),
        MgmtError::PermissionDenied(m) => Status::permission_denied(b(m)),
        MgmtError::Internal(m) => Status::internal(b(m)),
    }
}

/// A status message of at most 1 KiB: messages quote what the caller
/// sent, and the message travels in a header (a client takes 16 KiB of
/// them; more and the call failed as a transport error, not as the
/// status it was).
fn bounded(m: String) -> String {
    const MAX: usize = 1024;
    if m.len() <= MAX {
        return m;
    }
    let mut end = MAX;
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &m[..end], m.len())
}

fn level_to_pb(l: Level) -> pb::Level {
    match l {
        Level::Single => pb::Level::Single,
        Level::Raid1 => pb::Level::Raid1,
        Level::Raid5 => pb::Level::Raid5,
    }
}

/// A volume that did not start, as its declaration says.
fn unavailable_to_pb(u: UnavailableView) -> pb::Volume {
    let d = u.decl;
    pb::Volume {
        state: pb::VolumeState::Unavailable as i32,
        unavailable_reason: u.reason,
        level: Level::parse(&d.level).map_or(pb::Level::Unspecified, level_to_pb) as i32,
        chunk_kib: d.chunk_kib,
        members: (d.members.into_iter().enumerate())
            .map(|(slot, device)| pb::Member {
                slot: slot as u32,
                device,
                state: pb::MemberState::Unspecified as i32,
                write_mostly: false,
            })
            .collect(),
        spares: d.spares,
        exports: u.exports,
        journal: d.journal.unwrap_or_default(),
        name: d.name,
        ..Default::default()
    }
}

fn device_to_pb(d: DeviceView) -> pb::Device {
    pb::Device {
        name: d.decl.name,
        spec: d.decl.spec,
        block_size: d.decl.block_size,
        num_blocks: d.num_blocks,
        used_by: d.used_by,
        health: pb::DeviceHealth::from_label(d.health).unwrap_or_default() as i32,
    }
}

/// An enum field of a request as the name the manager takes ("" when
/// unspecified); a number the API does not know is refused.
fn enum_label<E: TryFrom<i32>>(
    field: &'static str,
    v: i32,
    label: impl Fn(E) -> &'static str,
) -> Result<&'static str, Status> {
    E::try_from(v)
        .map(label)
        .map_err(|_| bad(field, format!("unknown value {v}")))
}

fn qos_to_pb(q: crate::qos::QosLimits) -> pb::QosLimits {
    pb::QosLimits {
        read_iops: q.read_iops,
        write_iops: q.write_iops,
        total_iops: q.total_iops,
        read_bytes_per_sec: q.read_bytes,
        write_bytes_per_sec: q.write_bytes,
        total_bytes_per_sec: q.total_bytes,
    }
}

fn qos_from_pb(q: Option<pb::QosLimits>) -> crate::qos::QosLimits {
    let q = q.unwrap_or_default();
    crate::qos::QosLimits {
        read_iops: q.read_iops,
        write_iops: q.write_iops,
        total_iops: q.total_iops,
        read_bytes: q.read_bytes_per_sec,
        write_bytes: q.write_bytes_per_sec,
        total_bytes: q.total_bytes_per_sec,
    }
}

fn volume_to_pb(v: VolumeView) -> pb::Volume {
    pb::Volume {
        unavailable_reason: String::new(),
        qos: (!v.qos.is_none()).then(|| qos_to_pb(v.qos)),
        name: v.name,
        level: level_to_pb(v.level) as i32,
        state: pb::VolumeState::from_label(v.state).unwrap_or_default() as i32,
        size_bytes: v.size_bytes,
        block_size: v.block_size,
        chunk_kib: v.chunk_kib,
        // By its canonical name: a state file may say "ls".
        layout: crate::raid::geometry::Layout::parse(&v.layout)
            .ok()
            .and_then(|l| pb::Layout::from_label(l.name()))
            .unwrap_or_default() as i32,
        members: v
            .members
            .into_iter()
            .enumerate()
            .map(|(slot, (device, state))| pb::Member {
                slot: slot as u32,
                write_mostly: v.write_mostly.contains(&device),
                device,
                state: pb::MemberState::from_label(state).unwrap_or_default() as i32,
            })
            .collect(),
        spares: v.spares,
        progress: v.progress.map(|p| pb::Progress {
            kind: pb::WorkKind::from_label(p.kind).unwrap_or_default() as i32,
            fraction: p.fraction,
            eta_seconds: p.eta_seconds,
            finished: p.finished,
            error: p.error,
            mismatches: p.mismatches,
            bytes: p.bytes,
            max_bytes_per_sec: p.max_bytes_per_sec,
            min_bytes_per_sec: p.min_bytes_per_sec,
        }),
        generation: v.generation,
        exports: v.exports,
        journal: v.journal.unwrap_or_default(),
        journal_mode: v
            .journal_state
            .and_then(|j| pb::JournalMode::from_label(j.mode.name()))
            .unwrap_or_default() as i32,
        journal_fill: v.journal_state.map_or(0.0, |j| j.fill),
        journal_cached_blocks: v.journal_state.map_or(0, |j| j.cached_blocks),
        journal_cache_held_blocks: v.journal_state.map_or(0, |j| j.held_blocks),
        journal_failed: v.journal_state.is_some_and(|j| j.failed),
        consistency_policy: pb::ConsistencyPolicy::from_label(v.consistency_policy)
            .unwrap_or_default() as i32,
        serialize_policy: v.serialize,
        write_behind: v.write_behind.0 as u32,
        writes_behind: v.write_behind.1,
        suspended: v.suspended_whole,
        pending_changes: v.pending_changes as u32,
        suspended_lo_bytes: v.suspended.map_or(0, |r| r.0),
        suspended_hi_bytes: v.suspended.map_or(0, |r| r.1),
        bitmap: v
            .bitmap
            .map(|(region_bytes, regions, dirty_regions)| pb::Bitmap {
                region_bytes,
                regions,
                dirty_regions,
            }),
    }
}

fn export_to_pb(e: ExportView) -> pb::Export {
    pb::Export {
        name: e.decl.name,
        volume: e.decl.volume,
        socket: e.decl.socket.display().to_string(),
        num_queues: e.decl.num_queues as u32,
        read_only: e.decl.read_only,
        serial: e.decl.serial,
        connected: e.connected,
        connections: e.connections,
        queue_cores: e.decl.queue_cores.iter().map(|&c| c as u32).collect(),
        memory_limit_mib: e.decl.memory_limit_mib,
        socket_mode: e.decl.socket_mode.unwrap_or_default(),
        socket_owner: e.decl.socket_owner.unwrap_or_default(),
        socket_group: e.decl.socket_group.unwrap_or_default(),
        live_migration: e.decl.live_migration,
        dirty_logging: e.dirty_log.is_some(),
        dirty_pages_logged: e.dirty_log.unwrap_or(0),
        volume_unavailable: false,
        not_served: String::new(),
    }
}

/// InvalidArgument naming `field` when it is empty.
fn require(field: &'static str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(bad(field, "is empty"));
    }
    Ok(())
}

fn bad(field: &'static str, reason: impl Into<String>) -> Status {
    status(MgmtError::InvalidArgument {
        field,
        reason: reason.into(),
    })
}

#[tonic::async_trait]
impl pb::appliance_server::Appliance for Service {
    type WatchVolumeStream = tokio_stream::wrappers::ReceiverStream<Result<pb::Volume, Status>>;

    /// A task per watcher looks at the volume every interval and sends it
    /// while background work runs; a watcher that goes away ends its task
    /// at the next send.
    async fn watch_volume(
        &self,
        req: Request<pb::WatchVolumeRequest>,
    ) -> Result<Response<Self::WatchVolumeStream>, Status> {
        let r = req.into_inner();
        let every = Duration::from_millis(match r.interval_ms {
            0 => 1000,
            n => n.clamp(50, 60_000) as u64,
        });
        let name = r.volume.clone();
        let first = self.run(move |m| m.get_volume(&name)).await?.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let svc = self.clone();
        tokio::spawn(async move {
            let mut v = first;
            loop {
                let running = v.progress.as_ref().is_some_and(|p| !p.finished);
                if tx.send(Ok(volume_to_pb(v))).await.is_err() || !running {
                    return;
                }
                // A watcher that goes away ends the task now, not at the
                // next send.
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = tx.closed() => return,
                }
                let name = r.volume.clone();
                // (Its turn may wait: a watcher gone meanwhile ends it.)
                let next = tokio::select! {
                    next = svc.blocking(move |m| m.get_volume(&name)) => next,
                    _ = tx.closed() => return,
                };
                v = match next {
                    Ok(Ok(v)) => v,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn get_version(
        &self,
        _: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::GetVersionResponse>, Status> {
        Ok(Response::new(pb::GetVersionResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            api: mgmt::API_VERSION,
        }))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.run(|m| {
            let h = m.health();
            Ok(pb::HealthResponse {
                status: pb::HealthStatus::from_label(h.status).unwrap_or_default() as i32,
                problems: h.problems,
                reactors: m.reactors().len() as u32,
            })
        })
        .await
    }

    async fn reactor_stats(
        &self,
        _: Request<pb::ReactorStatsRequest>,
    ) -> Result<Response<pb::ReactorStatsResponse>, Status> {
        self.run(|m| {
            let set = m.reactors();
            Ok(pb::ReactorStatsResponse {
                reactors: (0..set.len())
                    .filter_map(|c| set.stats(c).map(|s| (c, s)))
                    .map(|(c, s)| pb::ReactorStat {
                        core: c as u32,
                        busy_ns: s.busy_ns,
                        loops: s.loops,
                        sleeps: s.sleeps,
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn export_stats(
        &self,
        _: Request<pb::ExportStatsRequest>,
    ) -> Result<Response<pb::ExportStatsResponse>, Status> {
        self.run(|m| {
            Ok(pb::ExportStatsResponse {
                exports: m
                    .export_stats()
                    .into_iter()
                    .map(|(export, volume, s)| pb::ExportStat {
                        export,
                        volume,
                        reads: s.reads,
                        writes: s.writes,
                        read_bytes: s.read_bytes,
                        write_bytes: s.write_bytes,
                        others: s.others,
                        errors: s.errors,
                        inflight: s.inflight,
                        frontend_faults: s.frontend_faults,
                        read_latency_buckets: s.latency[0].to_vec(),
                        write_latency_buckets: s.latency[1].to_vec(),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn attach_device(
        &self,
        req: Request<pb::AttachDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let r = req.into_inner();
        require("spec", &r.spec)?;
        let decl = DeviceDecl {
            name: r.name,
            spec: r.spec,
            block_size: r.block_size,
        };
        self.run(move |m| m.attach_device(decl).map(device_to_pb))
            .await
    }

    async fn list_devices(
        &self,
        _: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        self.run(|m| {
            Ok(pb::ListDevicesResponse {
                devices: m.list_devices().into_iter().map(device_to_pb).collect(),
            })
        })
        .await
    }

    async fn detach_device(
        &self,
        req: Request<pb::DetachDeviceRequest>,
    ) -> Result<Response<pb::DetachDeviceResponse>, Status> {
        let name = req.into_inner().name;
        self.run(move |m| m.detach_device(&name).map(|_| pb::DetachDeviceResponse {}))
            .await
    }

    async fn resize_device(
        &self,
        req: Request<pb::ResizeDeviceRequest>,
    ) -> Result<Response<pb::ResizeDeviceResponse>, Status> {
        let r = req.into_inner();
        self.run(move |m| {
            m.resize_device(&r.name, r.size_bytes)
                .map(|(d, notified)| pb::ResizeDeviceResponse {
                    device: Some(device_to_pb(d)),
                    notified_exports: notified,
                })
        })
        .await
    }

    async fn examine_device(
        &self,
        req: Request<pb::ExamineDeviceRequest>,
    ) -> Result<Response<pb::ExamineDeviceResponse>, Status> {
        let r = req.into_inner();
        self.run(move |m| {
            m.examine_device(&r.name)
                .map(|e| pb::ExamineDeviceResponse {
                    format: e.format,
                    lines: e
                        .lines
                        .into_iter()
                        .map(|(label, value)| pb::ExamineLine { label, value })
                        .collect(),
                })
        })
        .await
    }

    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let level = match enum_label("level", r.level, pb::Level::label)? {
            "" => return Err(bad("level", "is required")),
            l => l,
        };
        let decl = VolumeDecl {
            qos: qos_from_pb(r.qos),
            name: r.name,
            level: level.into(),
            members: r.members,
            spares: r.spares,
            chunk_kib: if r.chunk_kib == 0 { 64 } else { r.chunk_kib },
            layout: match enum_label("layout", r.layout, pb::Layout::label)? {
                "" => "left-symmetric".into(),
                l => l.into(),
            },
            max_rebuild_bytes_per_sec: 0,
            min_rebuild_bytes_per_sec: 0,
            journal: (!r.journal.is_empty()).then_some(r.journal),
            journal_mode: enum_label("journal_mode", r.journal_mode, pb::JournalMode::label)?
                .into(),
            bitmap: r.bitmap,
            bitmap_chunk_kib: r.bitmap_chunk_kib,
            serialize: false,
            write_behind: 0,
            array: String::new(),
            uuid: String::new(),
            journal_id: String::new(),
            device_id: String::new(),
        };
        let force = r.force;
        self.run(move |m| m.create_volume(decl, force).map(volume_to_pb))
            .await
    }

    async fn import_volume(
        &self,
        req: Request<pb::ImportVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        self.run(move |m| m.import_volume(&r.name, &r.devices).map(volume_to_pb))
            .await
    }

    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        self.run(|m| {
            let (running, unavailable) = m.volume_listing();
            Ok(pb::ListVolumesResponse {
                volumes: running
                    .into_iter()
                    .map(volume_to_pb)
                    .chain(unavailable.into_iter().map(unavailable_to_pb))
                    .collect(),
            })
        })
        .await
    }

    async fn get_volume(
        &self,
        req: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let name = req.into_inner().name;
        self.run(move |m| m.get_volume(&name).map(volume_to_pb))
            .await
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let name = req.into_inner().name;
        self.run(move |m| m.delete_volume(&name).map(|_| pb::DeleteVolumeResponse {}))
            .await
    }

    async fn fail_member(
        &self,
        req: Request<pb::MemberRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        self.run(move |m| m.fail_member(&r.volume, &r.device).map(volume_to_pb))
            .await
    }

    async fn add_spare(
        &self,
        req: Request<pb::MemberRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        self.run(move |m| m.add_spare(&r.volume, &r.device, r.force).map(volume_to_pb))
            .await
    }

    async fn remove_spare(
        &self,
        req: Request<pb::MemberRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        self.run(move |m| m.remove_spare(&r.volume, &r.device).map(volume_to_pb))
            .await
    }

    async fn remove_member(
        &self,
        req: Request<pb::MemberRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        self.run(move |m| m.remove_member(&r.volume, &r.device).map(volume_to_pb))
            .await
    }

    async fn start_scrub(
        &self,
        req: Request<pb::StartScrubRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        self.run(move |m| m.start_scrub(&r.volume, r.repair).map(volume_to_pb))
            .await
    }

    async fn stop_background_work(
        &self,
        req: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let name = req.into_inner().name;
        self.run(move |m| m.stop_background(&name).map(volume_to_pb))
            .await
    }

    async fn set_rebuild_rate(
        &self,
        req: Request<pb::SetRebuildRateRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        self.run(move |m| {
            m.set_rebuild_rate(&r.volume, r.min_bytes_per_sec, r.max_bytes_per_sec)
                .map(volume_to_pb)
        })
        .await
    }

    async fn add_journal(
        &self,
        req: Request<pb::AddJournalRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let mode = enum_label("mode", r.mode, pb::JournalMode::label)?;
        self.run(move |m| {
            m.add_journal(&r.volume, &r.device, mode, r.force)
                .map(volume_to_pb)
        })
        .await
    }

    async fn remove_journal(
        &self,
        req: Request<pb::RemoveJournalRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        self.run(move |m| m.remove_journal(&r.volume).map(volume_to_pb))
            .await
    }

    async fn set_write_mostly(
        &self,
        req: Request<pb::SetWriteMostlyRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        require("volume", &r.volume)?;
        require("device", &r.device)?;
        self.run(move |m| {
            m.set_write_mostly(&r.volume, &r.device, r.enabled)
                .map(volume_to_pb)
        })
        .await
    }

    async fn replace_member(
        &self,
        req: Request<pb::ReplaceMemberRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        require("volume", &r.volume)?;
        require("device", &r.device)?;
        require("replacement", &r.replacement)?;
        self.run(move |m| {
            m.replace_member(&r.volume, &r.device, &r.replacement, r.force)
                .map(volume_to_pb)
        })
        .await
    }

    async fn set_serialize_policy(
        &self,
        req: Request<pb::SetSerializePolicyRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        require("volume", &r.volume)?;
        self.run(move |m| m.set_serialize(&r.volume, r.enabled).map(volume_to_pb))
            .await
    }

    async fn set_write_behind(
        &self,
        req: Request<pb::SetWriteBehindRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        require("volume", &r.volume)?;
        self.run(move |m| {
            m.set_write_behind(&r.volume, r.max_writes)
                .map(volume_to_pb)
        })
        .await
    }

    async fn suspend_range(
        &self,
        req: Request<pb::SuspendRangeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        require("volume", &r.volume)?;
        self.run(move |m| {
            m.suspend_range(&r.volume, r.lo_bytes, r.hi_bytes)
                .map(volume_to_pb)
        })
        .await
    }

    async fn resume_range(
        &self,
        req: Request<pb::ResumeRangeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        require("volume", &r.volume)?;
        self.run(move |m| m.resume_range(&r.volume).map(volume_to_pb))
            .await
    }

    async fn suspend_volume(
        &self,
        req: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        require("name", &r.name)?;
        self.run(move |m| m.suspend_volume(&r.name).map(volume_to_pb))
            .await
    }

    async fn resume_volume(
        &self,
        req: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        require("name", &r.name)?;
        self.run(move |m| m.resume_volume(&r.name).map(volume_to_pb))
            .await
    }

    async fn move_queue(
        &self,
        req: Request<pb::MoveQueueRequest>,
    ) -> Result<Response<pb::Export>, Status> {
        let r = req.into_inner();
        require("export", &r.export)?;
        let queue = u16::try_from(r.queue).map_err(|_| bad("queue", "is out of range"))?;
        self.run(move |m| {
            m.move_queue(&r.export, queue, r.core as usize)
                .map(export_to_pb)
        })
        .await
    }

    async fn reload(
        &self,
        _req: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        self.run(move |m| {
            m.reload_configured().map(|r| pb::ReloadResponse {
                applied: r.applied,
                refused: r.refused,
            })
        })
        .await
    }

    async fn takeover(
        &self,
        req: Request<pb::TakeoverRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        require("volume", &r.volume)?;
        let level = match pb::Level::try_from(r.level) {
            Ok(pb::Level::Raid1) => "raid1",
            Ok(pb::Level::Raid5) => "raid5",
            Ok(pb::Level::Unspecified) => return Err(bad("level", "is required")),
            Ok(pb::Level::Single) => return Err(bad("level", "must be raid1 or raid5")),
            Err(_) => return Err(bad("level", format!("unknown value {}", r.level))),
        };
        self.run(move |m| m.takeover(&r.volume, level, r.chunk_kib).map(volume_to_pb))
            .await
    }

    async fn set_bitmap(
        &self,
        req: Request<pb::SetBitmapRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        require("volume", &r.volume)?;
        if !r.enabled && r.chunk_kib != 0 {
            return Err(bad("chunk_kib", "only applies when enabling the bitmap"));
        }
        self.run(move |m| {
            m.set_bitmap(&r.volume, r.enabled, r.chunk_kib)
                .map(volume_to_pb)
        })
        .await
    }

    async fn set_volume_qos(
        &self,
        req: Request<pb::SetVolumeQosRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        // Required: all zero takes every limit away, a missing field must
        // not (an older client, or one that forgot it).
        if r.limits.is_none() {
            return Err(bad(
                "limits",
                "required (give every limit as 0 to take them all away)",
            ));
        }
        let limits = qos_from_pb(r.limits);
        self.run(move |m| m.set_volume_qos(&r.volume, limits).map(volume_to_pb))
            .await
    }

    async fn set_journal_mode(
        &self,
        req: Request<pb::SetJournalModeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let mode = enum_label("mode", r.mode, pb::JournalMode::label)?;
        self.run(move |m| m.set_journal_mode(&r.volume, mode).map(volume_to_pb))
            .await
    }

    async fn create_export(
        &self,
        req: Request<pb::CreateExportRequest>,
    ) -> Result<Response<pb::Export>, Status> {
        let r = req.into_inner();
        let num_queues = u16::try_from(r.num_queues)
            .map_err(|_| bad("num_queues", format!("{} is out of range", r.num_queues)))?;
        require("socket", &r.socket)?;
        let decl = ExportDecl {
            name: r.name,
            volume: r.volume,
            socket: r.socket.into(),
            num_queues,
            read_only: r.read_only,
            serial: r.serial,
            queue_cores: r.queue_cores.iter().map(|&c| c as usize).collect(),
            memory_limit_mib: r.memory_limit_mib,
            socket_mode: Some(r.socket_mode).filter(|s| !s.is_empty()),
            socket_owner: Some(r.socket_owner).filter(|s| !s.is_empty()),
            socket_group: Some(r.socket_group).filter(|s| !s.is_empty()),
            live_migration: r.live_migration.unwrap_or(true),
        };
        self.run(move |m| m.create_export(decl).map(export_to_pb))
            .await
    }

    async fn list_exports(
        &self,
        _: Request<pb::ListExportsRequest>,
    ) -> Result<Response<pb::ListExportsResponse>, Status> {
        self.run(|m| {
            let (running, kept, unserved) = m.export_listing();
            Ok(pb::ListExportsResponse {
                exports: running
                    .into_iter()
                    .map(export_to_pb)
                    .chain(kept.into_iter().map(|e| pb::Export {
                        volume_unavailable: true,
                        ..export_to_pb(e)
                    }))
                    .chain(unserved.into_iter().map(|(e, why)| pb::Export {
                        not_served: why,
                        ..export_to_pb(e)
                    }))
                    .collect(),
            })
        })
        .await
    }

    async fn delete_export(
        &self,
        req: Request<pb::DeleteExportRequest>,
    ) -> Result<Response<pb::DeleteExportResponse>, Status> {
        let r = req.into_inner();
        self.run(move |m| {
            m.delete_export(&r.name, r.force)
                .map(|_| pb::DeleteExportResponse {})
        })
        .await
    }

    async fn create_nvmf_export(
        &self,
        req: Request<pb::CreateNvmfExportRequest>,
    ) -> Result<Response<pb::NvmfExport>, Status> {
        let decl = nvmf_pb::decl(req.into_inner());
        require("listen", &decl.listen)?;
        self.run(move |m| m.create_nvmf_export(decl).map(nvmf_pb::to_pb))
            .await
    }

    async fn list_nvmf_exports(
        &self,
        _: Request<pb::ListNvmfExportsRequest>,
    ) -> Result<Response<pb::ListNvmfExportsResponse>, Status> {
        self.run(|m| {
            let (running, kept, unserved) = m.nvmf_listing();
            Ok(pb::ListNvmfExportsResponse {
                exports: running
                    .into_iter()
                    .map(nvmf_pb::to_pb)
                    .chain(kept.into_iter().map(|e| pb::NvmfExport {
                        volume_unavailable: true,
                        ..nvmf_pb::to_pb(e)
                    }))
                    .chain(unserved.into_iter().map(|(e, why)| pb::NvmfExport {
                        not_served: why,
                        ..nvmf_pb::to_pb(e)
                    }))
                    .collect(),
            })
        })
        .await
    }

    async fn delete_nvmf_export(
        &self,
        req: Request<pb::DeleteNvmfExportRequest>,
    ) -> Result<Response<pb::DeleteNvmfExportResponse>, Status> {
        let r = req.into_inner();
        self.run(move |m| {
            m.delete_nvmf_export(&r.nqn)
                .map(|_| pb::DeleteNvmfExportResponse {})
        })
        .await
    }
}
