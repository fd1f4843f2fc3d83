//! A volume: a named block device whose configuration changes only through
//! the quiesce epoch. The RAID levels plug in here as devices; exports and
//! other consumers run their IO through the volume's gate on each core.

use std::sync::Arc;
use std::time::Duration;

use bdev::{BlockDevice, DeviceInfo};
use poller::{QuiesceError, QuiesceObject, ReactorSet, SuspendGuard};

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
}

impl Volume {
    /// A volume on `device`, served by the reactors of `set`.
    pub fn new(set: &ReactorSet, name: &str, device: Arc<dyn BlockDevice>) -> Volume {
        Volume {
            name: name.to_string(),
            quiesce: QuiesceObject::new(set, name, VolumeConfig { device }),
        }
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
