//! The VFIO transport: a PCI NVMe controller bound to vfio-pci, named by
//! its PCI address. BAR0 is mapped from the device fd; DMA goes through
//! the IOMMU (type1), with IO addresses handed out from 4 GiB up so they
//! never meet the low reserved ranges (the x86 MSI window).
//!
//! Without an IOMMU, where the kernel offers VFIO's no-IOMMU mode (vfio
//! loaded with enable_unsafe_noiommu_mode=1: the group is
//! /dev/vfio/noiommu-N), the controller gets physical addresses, read from
//! /proc/self/pagemap. vfio-ioctls drives only type1 containers, so this
//! mode's few ioctls are made here. Only hugepage memory is handed to the
//! controller then: it is physically contiguous per page and the kernel
//! does not move it (locked 4 KiB pages may still be migrated). Anything
//! else goes through the driver's bounce buffers, which are hugepages too.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_group_status, vfio_region_info, VFIO_API_VERSION, VFIO_BASE, VFIO_GROUP_FLAGS_VIABLE,
    VFIO_NOIOMMU_IOMMU, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

use crate::error::NvmeError;
use crate::iova::IovaSpace;
use crate::spec::PAGE;
use crate::transport::{check_page_aligned, Bar, Transport, HUGEPAGE};

const BAR0: u32 = 0;
const CONFIG_REGION: u32 = 7; // VFIO_PCI_CONFIG_REGION_INDEX
const REGION_FLAG_MMAP: u32 = 1 << 2; // VFIO_REGION_INFO_FLAG_MMAP
const PCI_COMMAND: u64 = 4;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const IOVA_BASE: u64 = 1 << 32;
/// Where they end: 48 bits (4-level IOMMU tables). A narrower IOMMU
/// refuses a map past its aperture, which freed ranges being reused keeps
/// from happening while what is mapped fits.
const IOVA_END: u64 = 1 << 48;

/// A controller reached through VFIO.
pub struct VfioTransport {
    name: String,
    // Dropped before the device (field order).
    bar: memmap2::MmapMut,
    access: Access,
    /// IO addresses of the IOMMU mappings (unused with physical access).
    iova: IovaSpace,
    /// The device did not stop when told to: no address is used again.
    retired: std::sync::atomic::AtomicBool,
}

/// How the controller's DMA reaches memory.
enum Access {
    /// Through the IOMMU: IO virtual addresses mapped per range.
    Iommu {
        container: Arc<VfioContainer>,
        device: VfioDevice,
    },
    /// No IOMMU: physical addresses.
    Physical {
        pagemap: File,
        /// Where the PCI configuration space is in the device fd.
        config: u64,
        // Closed in this order: device, group, container.
        device: File,
        _group: File,
        _container: File,
    },
}

/// `_IO(VFIO_TYPE, VFIO_BASE + nr)`: VFIO's ioctls carry no size.
const fn vfio_io(nr: u32) -> libc::c_ulong {
    ((VFIO_TYPE as u32) << 8 | (VFIO_BASE + nr)) as libc::c_ulong
}
const VFIO_GET_API_VERSION: libc::c_ulong = vfio_io(0);
const VFIO_CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
const VFIO_SET_IOMMU: libc::c_ulong = vfio_io(2);
const VFIO_GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);

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
            let noiommu = Path::new("/dev/vfio").join(format!("noiommu-{group}"));
            if noiommu.exists() {
                return Self::open_physical(bdf, &noiommu);
            }
            return Err(NvmeError::Vfio(format!(
                "{bdf}: neither /dev/vfio/{group} nor {} exists: enable the IOMMU (intel_iommu=on) and \
                 load vfio_iommu_type1, or, without an IOMMU and at the cost of all DMA protection, load \
                 vfio with enable_unsafe_noiommu_mode=1 (a kernel built with CONFIG_VFIO_NOIOMMU; \
                 Debian's is not)",
                noiommu.display()
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
            bar,
            access: Access::Iommu { container, device },
            iova: IovaSpace::new(IOVA_BASE, IOVA_END),
            retired: Default::default(),
        }))
    }

    /// Open `bdf` through its no-IOMMU group `group_path`.
    fn open_physical(bdf: String, group_path: &Path) -> Result<Arc<dyn Transport>, NvmeError> {
        let vfio = |what: &str| {
            let e = std::io::Error::last_os_error();
            NvmeError::Vfio(format!("{bdf}: {what}: {e}"))
        };
        let rw = |path: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| NvmeError::Os(format!("{bdf}: opening {}", path.display()), e))
        };
        let container = rw(Path::new("/dev/vfio/vfio"))?;
        let c = container.as_raw_fd();
        // SAFETY: VFIO ioctls with integer arguments on our own fds.
        if unsafe { libc::ioctl(c, VFIO_GET_API_VERSION) } != VFIO_API_VERSION as i32 {
            return Err(vfio("unknown VFIO API version"));
        }
        // SAFETY: as above.
        if unsafe { libc::ioctl(c, VFIO_CHECK_EXTENSION, VFIO_NOIOMMU_IOMMU as libc::c_ulong) } != 1
        {
            return Err(NvmeError::Vfio(format!(
                "{bdf}: the VFIO container does not offer no-IOMMU mode"
            )));
        }
        let group = rw(group_path)?;
        let g = group.as_raw_fd();
        let mut status = vfio_group_status {
            argsz: std::mem::size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: the kernel fills the status struct we pass.
        if unsafe { libc::ioctl(g, VFIO_GROUP_GET_STATUS, &mut status) } != 0 {
            return Err(vfio("reading the VFIO group status"));
        }
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(NvmeError::Vfio(format!(
                "{bdf}: VFIO group {} is not viable: bind every device of the group to vfio-pci",
                group_path.display()
            )));
        }
        // SAFETY: the argument points to the container's fd.
        if unsafe { libc::ioctl(g, VFIO_GROUP_SET_CONTAINER, &c) } != 0 {
            return Err(vfio("adding the group to the container (is it in use?)"));
        }
        // SAFETY: integer argument.
        if unsafe { libc::ioctl(c, VFIO_SET_IOMMU, VFIO_NOIOMMU_IOMMU as libc::c_ulong) } != 0 {
            return Err(vfio("selecting no-IOMMU mode (needs CAP_SYS_RAWIO)"));
        }
        let cname = std::ffi::CString::new(bdf.clone())
            .map_err(|_| NvmeError::InvalidArgument(format!("{bdf}: not a device name")))?;
        // SAFETY: the argument is a NUL-terminated device name.
        let fd = unsafe { libc::ioctl(g, VFIO_GROUP_GET_DEVICE_FD, cname.as_ptr()) };
        if fd < 0 {
            return Err(vfio("getting the VFIO device"));
        }
        // SAFETY: a new fd the kernel gave us.
        let device = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let region = |index: u32| -> Result<vfio_region_info, NvmeError> {
            let mut info = vfio_region_info {
                argsz: std::mem::size_of::<vfio_region_info>() as u32,
                index,
                ..Default::default()
            };
            // SAFETY: the kernel fills the region info we pass.
            if unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_GET_REGION_INFO, &mut info) }
                != 0
            {
                return Err(vfio(&format!("reading VFIO region {index}")));
            }
            Ok(info)
        };
        let bar0 = region(BAR0)?;
        if bar0.flags & REGION_FLAG_MMAP == 0 || bar0.size < 0x2000 {
            return Err(NvmeError::Vfio(format!(
                "{bdf}: BAR0 ({} bytes, flags {:#x}) cannot be mapped",
                bar0.size, bar0.flags
            )));
        }
        // SAFETY: a shared mapping of the device's BAR0 region; the kernel
        // keeps it valid while the device fd is open (it outlives the map).
        let bar = unsafe {
            memmap2::MmapOptions::new()
                .offset(bar0.offset)
                .len(bar0.size as usize)
                .map_mut(device.as_raw_fd())
        }
        .map_err(|e| NvmeError::Os(format!("{bdf}: mapping BAR0 ({} bytes)", bar0.size), e))?;
        let config = region(CONFIG_REGION)?;
        let mut cmd = [0u8; 2];
        device
            .read_exact_at(&mut cmd, config.offset + PCI_COMMAND)
            .map_err(|e| NvmeError::Os(format!("{bdf}: reading the PCI command register"), e))?;
        let v = u16::from_le_bytes(cmd) | COMMAND_MEMORY | COMMAND_BUS_MASTER;
        device
            .write_all_at(&v.to_le_bytes(), config.offset + PCI_COMMAND)
            .map_err(|e| NvmeError::Os(format!("{bdf}: enabling bus mastering"), e))?;
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|e| NvmeError::Os(format!("{bdf}: opening /proc/self/pagemap"), e))?;
        tracing::warn!(device = %bdf, group = %group_path.display(), "NVMe controller opened through VFIO without an IOMMU: DMA by physical address, no isolation");
        Ok(Arc::new(VfioTransport {
            name: bdf,
            bar,
            access: Access::Physical {
                pagemap,
                config: config.offset,
                device,
                _group: group,
                _container: container,
            },
            iova: IovaSpace::new(IOVA_BASE, IOVA_END),
            retired: Default::default(),
        }))
    }
}

/// The physically contiguous runs of `len` bytes at `vaddr`, which must be
/// hugepage memory: `(offset, length, physical address)`. `name` is the
/// controller's, for errors.
fn physical_pieces(
    pagemap: &File,
    name: &str,
    vaddr: usize,
    len: usize,
) -> Result<Vec<(usize, usize, u64)>, NvmeError> {
    let end = vaddr + len;
    if !hugepages_only(vaddr, end) {
        return Err(NvmeError::InvalidArgument(format!(
            "{name}: {len} bytes at {vaddr:#x} are not hugepage memory, the only memory handed \
             to a controller without an IOMMU"
        )));
    }
    // Fault every page in and keep it (hugepages are never swapped, but
    // an untouched one has no physical address yet).
    // SAFETY: locking our own mapped range.
    if unsafe { libc::mlock(vaddr as *const libc::c_void, len) } != 0 {
        return Err(NvmeError::Os(
            format!("{name}: locking {len} bytes of DMA memory"),
            std::io::Error::last_os_error(),
        ));
    }
    let mut pieces: Vec<(usize, usize, u64)> = Vec::new();
    let mut at = vaddr;
    while at < end {
        let mut entry = [0u8; 8];
        pagemap
            .read_exact_at(&mut entry, (at / PAGE) as u64 * 8)
            .map_err(|e| NvmeError::Os(format!("{name}: reading /proc/self/pagemap"), e))?;
        let entry = u64::from_le_bytes(entry);
        let pfn = entry & ((1 << 55) - 1);
        if entry >> 63 == 0 || pfn == 0 {
            return Err(NvmeError::Vfio(format!(
                "{name}: no physical address for {at:#x} (reading them needs CAP_SYS_ADMIN)"
            )));
        }
        let phys = pfn * PAGE as u64 + (at % PAGE) as u64;
        // A hugepage is contiguous to its end.
        let run = ((at / HUGEPAGE + 1) * HUGEPAGE).min(end) - at;
        match pieces.last_mut() {
            Some(last) if last.2 + last.1 as u64 == phys => last.1 += run,
            _ => pieces.push((at - vaddr, run, phys)),
        }
        at += run;
    }
    Ok(pieces)
}

/// Whether `start..end` lies in hugepage mappings only (/proc/self/smaps:
/// each mapping's KernelPageSize).
fn hugepages_only(start: usize, end: usize) -> bool {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return false;
    };
    let mut covered = start;
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = head.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                current = Some((a, b));
                continue;
            }
        }
        if let (Some(kib), Some((a, b))) = (line.strip_prefix("KernelPageSize:"), current) {
            let huge = kib
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .is_ok_and(|k| k * 1024 >= HUGEPAGE);
            if a <= covered && covered < b {
                if !huge {
                    return false;
                }
                covered = b;
                if covered >= end {
                    return true;
                }
            }
        }
    }
    false
}

impl VfioTransport {
    /// The PCI command register; all ones when it cannot be read (a
    /// device gone from the bus reads so too).
    fn command(&self) -> u16 {
        let mut cmd = [0xffu8; 2];
        match &self.access {
            Access::Iommu { device, .. } => {
                device.region_read(CONFIG_REGION, &mut cmd, PCI_COMMAND)
            }
            Access::Physical { device, config, .. } => {
                if device
                    .read_exact_at(&mut cmd, config + PCI_COMMAND)
                    .is_err()
                {
                    cmd = [0xff; 2];
                }
            }
        }
        u16::from_le_bytes(cmd)
    }

    fn set_command(&self, v: u16) {
        match &self.access {
            Access::Iommu { device, .. } => {
                device.region_write(CONFIG_REGION, &v.to_le_bytes(), PCI_COMMAND)
            }
            Access::Physical { device, config, .. } => {
                let _ = device.write_all_at(&v.to_le_bytes(), config + PCI_COMMAND);
            }
        }
    }

    /// Clear Bus Master Enable: a device that obeys it reaches no memory
    /// any more, which without an IOMMU is the only guard of memory freed
    /// and used again (its addresses are physical). Whether a read back
    /// confirms it.
    fn clear_bus_master(&self) -> bool {
        let cmd = self.command();
        if cmd == u16::MAX {
            return false;
        }
        self.set_command(cmd & !COMMAND_BUS_MASTER);
        let now = self.command();
        now != u16::MAX && now & COMMAND_BUS_MASTER == 0
    }

    /// Take an IOMMU mapping away; whether it is gone (its addresses may
    /// be used again). A failed unmap leaves them out of the free space:
    /// the IOMMU may still map them.
    fn unmap_only(&self, iova: u64, len: usize) -> bool {
        // Physical addresses need no unmapping: the memory stays locked
        // until its owner frees it.
        let Access::Iommu { container, .. } = &self.access else {
            return false;
        };
        match container.vfio_dma_unmap(iova, len) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(device = %self.name, iova, len, error = %e, "IOMMU unmap failed");
                false
            }
        }
    }
}

impl Transport for VfioTransport {
    fn bar(&self) -> Bar {
        // SAFETY: the mapping lives as long as this transport, which every
        // controller using the Bar holds.
        unsafe { Bar::new(self.bar.as_ptr() as *mut u8, self.bar.len()) }
    }

    unsafe fn map(&self, vaddr: *mut u8, len: usize) -> Result<u64, NvmeError> {
        check_page_aligned(vaddr, len)?;
        let container = match &self.access {
            Access::Iommu { container, .. } => container,
            Access::Physical { pagemap, .. } => {
                return match physical_pieces(pagemap, &self.name, vaddr as usize, len)?[..] {
                    [(_, _, phys)] => Ok(phys),
                    _ => Err(NvmeError::InvalidArgument(format!(
                        "{}: {len} bytes at {vaddr:p} are not physically contiguous",
                        self.name
                    ))),
                };
            }
        };
        let iova = self.iova.alloc(len as u64).ok_or_else(|| {
            NvmeError::NoRoom(format!(
                "{}: no IO address range of {len} bytes is free",
                self.name
            ))
        })?;
        // SAFETY: forwarded from the caller: the memory stays mapped until
        // unmap; it is touched by the device only by DMA.
        unsafe { container.vfio_dma_map(iova, len, vaddr) }.map_err(|e| {
            self.iova.free(iova, len as u64);
            let what = format!("{}: IOMMU map of {len} bytes at {vaddr:p}: {e}", self.name);
            // Past the locked-memory limit (ENOMEM) or the IOMMU's
            // mapping limit (ENOSPC): the host has no room, the
            // controller is fine.
            match e {
                vfio_ioctls::VfioError::IommuDmaMap(ref s)
                    if matches!(s.errno(), libc::ENOMEM | libc::ENOSPC) =>
                {
                    NvmeError::NoRoom(what)
                }
                _ => NvmeError::Vfio(what),
            }
        })?;
        Ok(iova)
    }

    fn unmap(&self, iova: u64, len: usize) {
        let retired = self.retired.load(std::sync::atomic::Ordering::Acquire);
        if self.unmap_only(iova, len) && !retired {
            self.iova.free(iova, len as u64);
        }
    }

    fn unmap_retired(&self, iova: u64, len: usize) {
        self.unmap_only(iova, len);
    }

    fn retire_all(&self) {
        let before = self.retired.swap(true, std::sync::atomic::Ordering::AcqRel);
        if before {
            return;
        }
        if self.clear_bus_master() {
            tracing::warn!(device = %self.name, "bus mastering turned off: the device reaches no memory until it is opened again");
        } else {
            tracing::error!(device = %self.name, physical = self.physical(), "bus mastering could not be turned off (the device does not answer): without an IOMMU, memory freed from now on may still be written by it");
        }
    }

    unsafe fn map_pieces(
        &self,
        vaddr: *mut u8,
        len: usize,
    ) -> Result<Vec<(usize, usize, u64)>, NvmeError> {
        match &self.access {
            Access::Physical { pagemap, .. } => {
                check_page_aligned(vaddr, len)?;
                physical_pieces(pagemap, &self.name, vaddr as usize, len)
            }
            // SAFETY: forwarded from the caller.
            Access::Iommu { .. } => Ok(vec![(0, len, unsafe { self.map(vaddr, len)? })]),
        }
    }

    fn physical(&self) -> bool {
        matches!(self.access, Access::Physical { .. })
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

    /// Physical addresses as the no-IOMMU mode hands them out: only for
    /// hugepage memory, one piece per contiguous run (root reads PFNs).
    #[test]
    fn physical_pieces_cover_hugepages_and_refuse_other_memory() {
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let mut plain = memmap2::MmapOptions::new()
            .len(4 * PAGE)
            .populate()
            .map_anon()
            .unwrap();
        let err = physical_pieces(&pagemap, "t", plain.as_mut_ptr() as usize, 4 * PAGE)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not hugepage memory"), "{err}");
        let Ok(mut huge) = memmap2::MmapOptions::new()
            .len(2 * HUGEPAGE)
            .huge(Some(21))
            .map_anon()
        else {
            // No hugepages reserved here: nothing more to check (the VM
            // test reserves them).
            return;
        };
        let base = huge.as_mut_ptr() as usize;
        let pieces = physical_pieces(&pagemap, "t", base, 2 * HUGEPAGE).unwrap();
        assert_eq!(pieces.iter().map(|p| p.1).sum::<usize>(), 2 * HUGEPAGE);
        assert_eq!(pieces[0].0, 0);
        for p in &pieces {
            assert_eq!(
                p.2 % HUGEPAGE as u64,
                0,
                "hugepages are aligned: {pieces:?}"
            );
            assert_ne!(p.2, 0);
        }
        // A range inside one hugepage is one piece at the matching offset.
        let inner = physical_pieces(&pagemap, "t", base + HUGEPAGE + 8 * PAGE, 4 * PAGE).unwrap();
        let second = pieces
            .iter()
            .find(|p| p.0 <= HUGEPAGE && HUGEPAGE < p.0 + p.1)
            .unwrap();
        assert_eq!(
            inner,
            vec![(
                0,
                4 * PAGE,
                second.2 + (HUGEPAGE - second.0) as u64 + 8 * PAGE as u64
            )]
        );
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
