//! The VFIO transport: a PCI NVMe controller bound to vfio-pci, named by
//! its PCI address. BAR0 is mapped from the device fd; DMA goes through
//! the IOMMU (type1), with IO addresses handed out from 4 GiB up so they
//! never meet the low reserved ranges (the x86 MSI window).
//!
//! No-IOMMU mode is refused: vfio-ioctls drives only type1 containers, and
//! DMA by physical address would need every buffer pinned and looked up in
//! /proc/self/pagemap. Use a (virtual) IOMMU.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

use crate::error::NvmeError;
use crate::spec::PAGE;
use crate::transport::{Bar, Transport};

const BAR0: u32 = 0;
const CONFIG_REGION: u32 = 7; // VFIO_PCI_CONFIG_REGION_INDEX
const REGION_FLAG_MMAP: u32 = 1 << 2; // VFIO_REGION_INFO_FLAG_MMAP
const PCI_COMMAND: u64 = 4;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const IOVA_BASE: u64 = 1 << 32;

/// A controller reached through VFIO.
pub struct VfioTransport {
    name: String,
    container: Arc<VfioContainer>,
    // Dropped after the BAR is unmapped (field order).
    bar: memmap2::MmapMut,
    _device: VfioDevice,
    next_iova: AtomicU64,
}

/// Check that `bdf` looks like `0000:01:00.0`.
pub fn parse_bdf(bdf: &str) -> Result<String, NvmeError> {
    let bad = || {
        NvmeError::InvalidArgument(format!(
            "'{bdf}' is not a PCI address; expected domain:bus:device.function like 0000:01:00.0"
        ))
    };
    let (dbd, func) = bdf.rsplit_once('.').ok_or_else(bad)?;
    let parts: Vec<&str> = dbd.split(':').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
    let ok = match parts.as_slice() {
        [d, b, dev] => hex(d, 4) && hex(b, 2) && hex(dev, 2),
        [b, dev] => hex(b, 2) && hex(dev, 2),
        _ => false,
    } && func.len() == 1
        && func.chars().all(|c| ('0'..='7').contains(&c));
    if !ok {
        return Err(bad());
    }
    Ok(if parts.len() == 2 {
        format!("0000:{}", bdf.to_ascii_lowercase())
    } else {
        bdf.to_ascii_lowercase()
    })
}

fn sysfs(bdf: &str) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(bdf)
}

impl VfioTransport {
    /// Open the controller at `bdf`, which must be bound to vfio-pci.
    pub fn open(bdf: &str) -> Result<Arc<dyn Transport>, NvmeError> {
        let bdf = parse_bdf(bdf)?;
        let path = sysfs(&bdf);
        if !path.exists() {
            return Err(NvmeError::InvalidArgument(format!(
                "no PCI device {bdf} ({} is missing)",
                path.display()
            )));
        }
        let driver = std::fs::read_link(path.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        if driver.as_deref() != Some("vfio-pci") {
            return Err(NvmeError::InvalidArgument(format!(
                "{bdf} is bound to {}, not vfio-pci; bind it first (deploy/host-setup.sh bind {bdf})",
                driver.as_deref().unwrap_or("no driver")
            )));
        }
        let group = std::fs::read_link(path.join("iommu_group")).map_err(|e| {
            NvmeError::Os(
                format!("{bdf}: reading its IOMMU group (is an IOMMU enabled?)"),
                e,
            )
        })?;
        let group = group
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !Path::new("/dev/vfio").join(&group).exists() {
            return Err(NvmeError::Vfio(format!(
                "{bdf}: /dev/vfio/{group} does not exist; no-IOMMU mode is not supported, enable the IOMMU \
                 (intel_iommu=on) and load vfio_iommu_type1"
            )));
        }
        let container = Arc::new(
            VfioContainer::new(None)
                .map_err(|e| NvmeError::Vfio(format!("{bdf}: opening /dev/vfio/vfio: {e}")))?,
        );
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(&path, ops, false).map_err(|e| {
            NvmeError::Vfio(format!(
                "{bdf}: opening the VFIO device (group {group}; is vfio_iommu_type1 loaded and the group \
                 not in use?): {e}"
            ))
        })?;
        let flags = device.get_region_flags(BAR0);
        let size = device.get_region_size(BAR0);
        if flags & REGION_FLAG_MMAP == 0 || size < 0x2000 {
            return Err(NvmeError::Vfio(format!(
                "{bdf}: BAR0 ({size} bytes, flags {flags:#x}) cannot be mapped"
            )));
        }
        let offset = device.get_region_offset(BAR0);
        use std::os::fd::AsRawFd;
        // SAFETY: a shared mapping of the device's BAR0 region; the kernel
        // keeps it valid while the device fd is open (it outlives the map).
        let bar = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(size as usize)
                .map_mut(device.as_raw_fd())
        }
        .map_err(|e| NvmeError::Os(format!("{bdf}: mapping BAR0 ({size} bytes)"), e))?;
        let mut cmd = [0u8; 2];
        device.region_read(CONFIG_REGION, &mut cmd, PCI_COMMAND);
        let v = u16::from_le_bytes(cmd) | COMMAND_MEMORY | COMMAND_BUS_MASTER;
        device.region_write(CONFIG_REGION, &v.to_le_bytes(), PCI_COMMAND);
        tracing::info!(device = %bdf, group = %group, bar_bytes = size, "NVMe controller opened through VFIO");
        Ok(Arc::new(VfioTransport {
            name: bdf,
            container,
            bar,
            _device: device,
            next_iova: AtomicU64::new(IOVA_BASE),
        }))
    }
}

impl Transport for VfioTransport {
    fn bar(&self) -> Bar {
        // SAFETY: the mapping lives as long as this transport, which every
        // controller using the Bar holds.
        unsafe { Bar::new(self.bar.as_ptr() as *mut u8, self.bar.len()) }
    }

    unsafe fn map(&self, vaddr: *mut u8, len: usize) -> Result<u64, NvmeError> {
        if !(vaddr as usize).is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || len == 0 {
            return Err(NvmeError::InvalidArgument(format!(
                "DMA map of {len} bytes at {vaddr:p} is not page aligned"
            )));
        }
        let iova = self.next_iova.fetch_add(len as u64, Ordering::Relaxed);
        // SAFETY: forwarded from the caller: the memory stays mapped until
        // unmap; it is touched by the device only by DMA.
        unsafe { self.container.vfio_dma_map(iova, len, vaddr) }.map_err(|e| {
            NvmeError::Vfio(format!(
                "{}: IOMMU map of {len} bytes at {vaddr:p}: {e}",
                self.name
            ))
        })?;
        Ok(iova)
    }

    fn unmap(&self, iova: u64, len: usize) {
        if let Err(e) = self.container.vfio_dma_unmap(iova, len) {
            tracing::warn!(device = %self.name, iova, len, error = %e, "IOMMU unmap failed");
        }
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_checked() {
        assert_eq!(parse_bdf("0000:00:04.0").unwrap(), "0000:00:04.0");
        assert_eq!(parse_bdf("00:1F.7").unwrap(), "0000:00:1f.7");
        for bad in [
            "",
            "0000:00:04",
            "0:0:4.0",
            "0000:00:04.8",
            "zz:00.0",
            "../../etc.0",
            "0000:00:04.0/x",
        ] {
            assert!(parse_bdf(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_missing_device_is_a_clear_error() {
        let err = VfioTransport::open("0000:ff:1f.7")
            .err()
            .expect("no such device");
        assert!(
            err.to_string().contains("no PCI device 0000:ff:1f.7"),
            "{err}"
        );
    }
}
