//! The volume's monitor: turns member failures reported by channels into a
//! new configuration generation, through the quiesce epoch.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bdev::{BdevError, BlockDevice};

use super::members::{MemberFailure, MemberState};
use crate::volume::{Volume, VolumeConfig};

/// A RAID device that can describe the next generation.
pub trait RaidDevice: BlockDevice {
    /// The same device with `slot` failed.
    fn with_member_failed(&self, slot: usize) -> Result<Arc<dyn RaidDevice>, BdevError>;
    /// Member states in slot order.
    fn member_states(&self) -> Vec<MemberState>;
}

/// Applies member failures to a volume; stops when every sender is gone.
pub struct Monitor {
    current: Arc<Mutex<Arc<dyn RaidDevice>>>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Watch `rx` for failures of `volume`, whose device is `device`.
    pub fn start(
        volume: Volume,
        device: Arc<dyn RaidDevice>,
        rx: Receiver<MemberFailure>,
    ) -> Monitor {
        let current = Arc::new(Mutex::new(device));
        let cur = current.clone();
        let thread = std::thread::Builder::new()
            .name(format!("monitor-{}", volume.name()))
            .spawn(move || {
                while let Ok(f) = rx.recv() {
                    let mut cur = cur.lock().unwrap_or_else(|e| e.into_inner());
                    if cur.member_states().get(f.member) != Some(&MemberState::InSync) {
                        continue; // already failed (several channels saw it)
                    }
                    let next = match cur.with_member_failed(f.member) {
                        Ok(n) => n,
                        Err(e) => {
                            tracing::error!(volume = volume.name(), error = %e, "cannot fail member");
                            continue;
                        }
                    };
                    let dev: Arc<dyn BlockDevice> = next.clone();
                    let res = volume.quiesce().reconfigure(Duration::from_secs(30), |_| {
                        Ok::<_, String>((VolumeConfig { device: dev }, ()))
                    });
                    match res {
                        Ok(()) => {
                            tracing::warn!(volume = volume.name(), member = f.member, error = %f.error, "member marked failed");
                            *cur = next;
                        }
                        Err(e) => tracing::error!(volume = volume.name(), error = %e, "failing a member"),
                    }
                }
            })
            .ok();
        Monitor { current, thread }
    }

    /// Member states of the current generation.
    pub fn member_states(&self) -> Vec<MemberState> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .member_states()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        // The thread ends when the volume's channels (the senders) are gone;
        // do not wait for that here.
        drop(self.thread.take());
    }
}
