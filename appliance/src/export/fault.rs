//! How a frontend's fault ends its own connection and nothing else: a
//! reactor that finds a queue broken (a runaway avail index), or the
//! SIGBUS handler that finds guest memory gone under a mapping, raises the
//! export's fault signal; the export's control thread, which polls it
//! beside the connection's socket, drops that connection. The frontend
//! (QEMU with reconnect) then connects again and resets the device, as it
//! does with qemu-storage-daemon, which disconnects on such faults too.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::ExportError;

/// One connection's fault signal: an eventfd, and the export's count of
/// faults. Each connection has its own: a runner of an earlier one still
/// finishing its device's requests (into memory its frontend truncated
/// when it went) raised the export's single signal and dropped the next,
/// innocent, connection.
pub struct FaultSignal {
    fd: OwnedFd,
    count: Arc<AtomicU64>,
}

impl FaultSignal {
    /// A fresh signal.
    pub fn new() -> Result<FaultSignal, ExportError> {
        Ok(FaultSignal {
            fd: super::eventfd()?,
            count: Arc::default(),
        })
    }

    /// A fresh signal for the next connection, counting with this one.
    pub fn next(&self) -> Result<FaultSignal, ExportError> {
        Ok(FaultSignal {
            fd: super::eventfd()?,
            count: self.count.clone(),
        })
    }

    /// Report a fault of the current connection. Async-signal-safe (an
    /// atomic add and a write), so the SIGBUS handler may call it.
    pub fn raise(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let one = 1u64;
        // SAFETY: 8-byte write to our own non-blocking eventfd; a full
        // counter only means the fault is already pending.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Consume pending reports: true if there were any.
    pub fn take(&self) -> bool {
        let mut v = 0u64;
        // SAFETY: 8-byte non-blocking read from our own eventfd.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        n == 8 && v > 0
    }

    /// Faults reported so far (all connections).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The eventfd, to poll.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
