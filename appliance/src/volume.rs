//! A volume: a named block device whose configuration changes only through
//! the quiesce epoch. The RAID levels plug in here as devices; exports and
//! other consumers run their IO through the volume's gate on each core.

use std::sync::Arc;
use std::time::Duration;

use bdev::{BlockDevice, DeviceInfo, IoChannel, IoRequest};
use poller::{Ctx, PollState, QuiesceError, QuiesceObject, ReactorSet, SuspendGuard};

/// What the IO path of a volume reads.
pub struct VolumeConfig {
    /// The device that serves the volume's IO.
    pub device: Arc<dyn BlockDevice>,
}

/// A volume handle; cheap to clone.
#[derive(Clone)]
pub struct Volume {
    name: String,
    quiesce: QuiesceObject<VolumeConfig>,
    set: ReactorSet,
}

impl Volume {
    /// A volume on `device`, served by the reactors of `set`.
    pub fn new(set: &ReactorSet, name: &str, device: Arc<dyn BlockDevice>) -> Volume {
        Volume {
            name: name.to_string(),
            quiesce: QuiesceObject::new(set, name, VolumeConfig { device }),
            set: set.clone(),
        }
    }

    /// Flush the volume from a reactor, through its quiesce gate as guest
    /// IO goes: for control-thread work that must not bypass the epoch (a
    /// write-back journal's drain rides on such flushes).
    pub fn flush_on_reactor(&self, timeout: Duration) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let q = self.quiesce.clone();
        let name = self.name.clone();
        let msg = move |ctx: &mut Ctx| {
            let gate = match q.local(ctx) {
                Ok(g) => g,
                Err(e) => {
                    let _ = tx.send(Err(format!("volume {name}: {e}")));
                    return;
                }
            };
            let mut ch: Option<Box<dyn IoChannel>> = None;
            let mut out = Vec::new();
            ctx.add_poller(move |_| {
                let Some(c) = ch.as_mut() else {
                    // Suspended: wait, like guest IO, until it resumes.
                    if !gate.try_begin() {
                        return PollState::Busy;
                    }
                    let submitted = gate
                        .config()
                        .1
                        .device
                        .open_channel()
                        .map_err(|e| e.to_string())
                        .and_then(|mut c| {
                            c.submit(IoRequest::flush(1))
                                .map_err(|_| "the volume's queue is full".to_string())?;
                            Ok(c)
                        });
                    match submitted {
                        Ok(c) => ch = Some(c),
                        Err(e) => {
                            gate.end();
                            let _ = tx.send(Err(format!("volume {name}: flush: {e}")));
                            return PollState::Done;
                        }
                    }
                    return PollState::Busy;
                };
                c.poll(&mut out);
                let Some(done) = out.pop() else {
                    return PollState::Busy;
                };
                gate.end();
                let _ = tx.send(
                    done.result
                        .map_err(|e| format!("volume {name}: flush: {e}")),
                );
                PollState::Done
            });
        };
        self.set
            .send(0, Box::new(msg))
            .map_err(|_| format!("volume {}: the reactors are stopped", self.name))?;
        rx.recv_timeout(timeout)
            .map_err(|_| format!("volume {}: flush did not finish in {timeout:?}", self.name))?
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's description (of the current generation).
    pub fn info(&self) -> DeviceInfo {
        self.quiesce.config().1.device.info().clone()
    }

    /// The device of the current generation.
    pub fn info_device(&self) -> Arc<dyn BlockDevice> {
        self.quiesce.config().1.device.clone()
    }

    /// The quiesce object the IO path goes through.
    pub fn quiesce(&self) -> &QuiesceObject<VolumeConfig> {
        &self.quiesce
    }

    /// Suspend the volume's IO everywhere (see [`QuiesceObject::suspend`]).
    pub fn suspend(&self, timeout: Duration) -> Result<SuspendGuard, QuiesceError> {
        self.quiesce.suspend(timeout)
    }
}
