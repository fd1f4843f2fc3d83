//! What applctl prints for people: tables of devices, volumes and
//! exports, and a volume's description (`--json` prints the messages
//! instead).

use mgmt::pb;

use crate::qos;

/// Columns left-aligned, two spaces apart, no borders (as `mdadm
/// --detail` and `ls -l` print), laid out by comfy-table.
pub fn table(head: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_header(head.to_vec())
        .add_rows(rows);
    let last = head.len().saturating_sub(1);
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((0, if i == last { 0 } else { 2 }));
    }
    let mut s = String::new();
    for line in t.trim_fmt().lines() {
        s += line.trim_end();
        s.push('\n');
    }
    s
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn level_name(l: i32) -> &'static str {
    match pb::Level::try_from(l).map(pb::Level::label) {
        Ok("") | Err(_) => "?",
        Ok(name) => name,
    }
}

pub fn devices(ds: &[pb::Device]) -> String {
    table(
        &["NAME", "SIZE", "BLOCK", "HEALTH", "USED BY", "SPEC"],
        ds.iter()
            .map(|d| {
                vec![
                    d.name.clone(),
                    size(d.num_blocks * d.block_size as u64),
                    d.block_size.to_string(),
                    d.health().label().into(),
                    d.used_by.clone(),
                    d.spec.clone(),
                ]
            })
            .collect(),
    )
}

fn progress_cell(p: &Option<pb::Progress>) -> String {
    match p {
        Some(p) if !p.finished => format!("{} {:.1} %", p.kind().label(), p.fraction * 100.0),
        _ => String::new(),
    }
}

pub fn volumes(vs: &[pb::Volume]) -> String {
    let mut s = table(
        &[
            "NAME", "LEVEL", "STATE", "SIZE", "MEMBERS", "SPARES", "EXPORTS", "WORK",
        ],
        vs.iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    level_name(v.level).into(),
                    v.state().label().into(),
                    size(v.size_bytes),
                    v.members.len().to_string(),
                    v.spares.len().to_string(),
                    v.exports.join(","),
                    progress_cell(&v.progress),
                ]
            })
            .collect(),
    );
    // Why each volume the saved state names did not start: what the
    // operator mends before a reload (mdadm shows inactive arrays too).
    for v in vs
        .iter()
        .filter(|v| v.state() == pb::VolumeState::Unavailable)
    {
        s += &format!("{} did not start: {}\n", v.name, v.unavailable_reason);
    }
    s
}

pub fn describe(v: &pb::Volume) -> String {
    let mut s = format!(
        "volume {}: {} {}, {} ({}-byte blocks), generation {}\n",
        v.name,
        level_name(v.level),
        v.state().label(),
        size(v.size_bytes),
        v.block_size,
        v.generation
    );
    if v.layout() != pb::Layout::Unspecified {
        s += &format!(
            "  layout {}, chunk {} KiB\n",
            v.layout().label(),
            v.chunk_kib
        );
    }
    s += &table(
        &["  SLOT", "DEVICE", "STATE"],
        v.members
            .iter()
            .map(|m| {
                let state = if m.write_mostly {
                    format!("{} (write-mostly)", m.state().label())
                } else {
                    m.state().label().to_string()
                };
                vec![format!("  {}", m.slot), m.device.clone(), state]
            })
            .collect(),
    );
    if !v.spares.is_empty() {
        s += &format!("  spares: {}\n", v.spares.join(", "));
    }
    if let Some(q) = v.qos.as_ref().filter(|q| !qos::describe(q).is_empty()) {
        s += &format!("  IO limits: {}\n", qos::describe(q));
    }
    if v.write_behind > 0 {
        s += &format!(
            "  write-behind: up to {} writes to write-mostly members in the background ({} now)\n",
            v.write_behind, v.writes_behind
        );
    }
    if v.serialize_policy {
        s += "  serialize policy: on (overlapping writes reach the mirrors in turn)\n";
    }
    if v.suspended {
        s += "  SUSPENDED: IO waits until `volume resume`\n";
    }
    if v.pending_changes > 0 {
        s += &format!(
            "  {} change(s) waiting for the volume's IO to drain (tried again)\n",
            v.pending_changes
        );
    }
    if v.suspended_hi_bytes > 0 {
        s += &format!(
            "  WRITES HELD to bytes {}..{} (resume-range lets them go)\n",
            v.suspended_lo_bytes, v.suspended_hi_bytes
        );
    }
    let policy = v.consistency_policy();
    if !matches!(
        policy,
        pb::ConsistencyPolicy::Unspecified | pb::ConsistencyPolicy::None
    ) {
        s += &format!("  consistency policy: {}", policy.label());
        if let Some(b) = &v.bitmap {
            s += &format!(
                " ({} regions of {}, {} dirty)",
                b.regions,
                size(b.region_bytes),
                b.dirty_regions
            );
        }
        s += "\n";
    }
    if !v.journal.is_empty() {
        s += &format!(
            "  journal: {} ({}), log {:.0} % full, {} blocks cached ({} held in memory)\n",
            v.journal,
            v.journal_mode().label(),
            v.journal_fill * 100.0,
            v.journal_cached_blocks,
            v.journal_cache_held_blocks
        );
        if v.journal_failed {
            s += "  JOURNAL FAILED: writes go on without write-hole protection\n";
        }
    }
    if let Some(p) = &v.progress {
        s += &format!(
            "  {} {}: {:.1} %{}{}{}\n",
            p.kind().label(),
            if p.finished { "finished" } else { "running" },
            p.fraction * 100.0,
            if !p.finished && p.eta_seconds >= 0.0 {
                format!(", eta {:.0} s", p.eta_seconds)
            } else {
                String::new()
            },
            if p.kind() == pb::WorkKind::Scrub {
                format!(", {} mismatches", p.mismatches)
            } else {
                String::new()
            },
            if p.error.is_empty() {
                String::new()
            } else {
                format!(", error: {}", p.error)
            }
        );
    }
    if !v.exports.is_empty() {
        s += &format!("  exported by: {}\n", v.exports.join(", "));
    }
    s
}

pub fn exports(es: &[pb::Export]) -> String {
    table(
        &[
            "NAME",
            "VOLUME",
            "QUEUES",
            "REACTORS",
            "RO",
            "CONNECTED",
            "DIRTY LOG",
            "SOCKET",
        ],
        es.iter()
            .map(|e| {
                vec![
                    e.name.clone(),
                    e.volume.clone(),
                    e.num_queues.to_string(),
                    if e.queue_cores.is_empty() {
                        "all".into()
                    } else {
                        e.queue_cores
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                    if e.read_only { "yes" } else { "no" }.into(),
                    if e.volume_unavailable {
                        "no (volume did not start)"
                    } else if !e.not_served.is_empty() {
                        "no (not made yet: see health)"
                    } else if e.connected {
                        "yes"
                    } else {
                        "no"
                    }
                    .into(),
                    if e.dirty_logging {
                        format!("on, {} pages", e.dirty_pages_logged)
                    } else {
                        "off".into()
                    },
                    e.socket.clone(),
                ]
            })
            .collect(),
    )
}

/// `volume examine`'s text: mdadm --examine's shape, labels right-aligned.
pub fn examined(device: &str, e: &pb::ExamineDeviceResponse) -> String {
    let mut s = format!("{device}:\n{:>19} : {}\n", "Metadata Format", e.format);
    for l in &e.lines {
        s.push_str(&format!("{:>19} : {}\n", l.label, l.value));
    }
    s
}
