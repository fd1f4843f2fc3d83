//! `applctl volume wait`: follow a volume's rebuild, replacement or
//! scrub to its end through the WatchVolume stream, with an optional
//! progress bar.

use std::time::Duration;

use mgmt::pb;

use crate::show::describe;
use crate::{out, Client, Failure};

/// Follow the volume's background work (the WatchVolume stream) until it
/// ends; exit 1 if it failed, 6 at the time-out.
pub async fn wait(
    c: &mut Client,
    json: bool,
    name: String,
    progress: bool,
    timeout: Option<f64>,
) -> Result<(), Failure> {
    let deadline = match timeout {
        Some(t) if t.is_finite() && (0.0..=1e9).contains(&t) => {
            Some(tokio::time::Instant::now() + Duration::from_secs_f64(t))
        }
        Some(t) => {
            return Err(Failure(
                2,
                format!("--timeout {t}: must be a number of seconds"),
            ))
        }
        None => None,
    };
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(1000);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {percent:>3}%")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    });
    let mut stream = c
        .watch_volume(pb::WatchVolumeRequest {
            volume: name.clone(),
            interval_ms: if progress { 200 } else { 500 },
        })
        .await?
        .into_inner();
    let mut last: Option<pb::Volume> = None;
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, stream.message()).await {
                Ok(m) => m?,
                Err(_) => {
                    let (kind, done) = last
                        .as_ref()
                        .and_then(|v| v.progress.as_ref())
                        .map_or(("work", 0.0), |p| (p.kind().label(), p.fraction));
                    return Err(Failure(
                        6,
                        format!("{name} {kind} still running at {:.1} %", done * 100.0),
                    ));
                }
            },
            None => stream.message().await?,
        };
        let Some(v) = next else { break };
        if let (Some(b), Some(p)) = (&bar, &v.progress) {
            let eta = if !p.finished && p.eta_seconds >= 0.0 {
                format!(", eta {:.0} s", p.eta_seconds)
            } else {
                String::new()
            };
            b.set_message(format!("{} {}{eta}", v.name, p.kind().label()));
            b.set_position((p.fraction * 1000.0) as u64);
        }
        last = Some(v);
    }
    // The stream ends after the message that shows the work ended.
    let v = last.ok_or_else(|| Failure(1, format!("{name}: the daemon sent nothing")))?;
    if let Some(b) = &bar {
        b.finish();
    }
    out(json, &v, || describe(&v))?;
    match &v.progress {
        Some(p) if !p.error.is_empty() => Err(Failure(
            1,
            format!("{} {} failed: {}", v.name, p.kind().label(), p.error),
        )),
        _ => Ok(()),
    }
}
