//! A file or block device driven through io_uring, one ring per channel.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use smallvec::SmallVec;

use crate::device::{
    validate, BlockDevice, Completion, DeviceInfo, IoChannel, IoOp, IoRequest, SubmitError,
};
use crate::error::{BdevError, IoError};

/// Requests in flight per channel.
const RING_DEPTH: u32 = 128;
/// io_uring takes any size; this keeps one request within reason and above
/// what an export advertises (seg_max x size_max).
const MAX_TRANSFER: u32 = 128 << 20;
/// O_DIRECT is used only for buffers, lengths and offsets aligned to this.
const DIRECT_ALIGN: usize = 4096;

struct Inner {
    info: DeviceInfo,
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    is_block_device: bool,
    /// A regular file on tmpfs or ramfs, where the kernel hands every
    /// request to its io-wq workers, O_DIRECT or not (see
    /// `FileChannel::poll`).
    in_memory: bool,
    /// Requests that completed with an error, on any channel (shared with
    /// a resized copy: the same storage).
    io_errors: Arc<std::sync::atomic::AtomicU64>,
}

/// Whether `f` lives on tmpfs or ramfs.
fn in_memory_fs(f: &File) -> bool {
    // SAFETY: statfs is plain data; fstatfs fills it from an open fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) };
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    rc == 0 && matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}

/// A device on a regular file or a block device node.
pub struct FileDevice {
    inner: Arc<Inner>,
}

impl FileDevice {
    /// Create a new regular file of `size_bytes` and open it. It must not
    /// exist yet, not even as a symlink (O_CREAT | O_EXCL | O_NOFOLLOW): a
    /// name that was planted where the file would go is never followed,
    /// and nothing is ever truncated.
    pub fn create(path: &Path, block_size: u32, size_bytes: u64) -> Result<FileDevice, BdevError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(path)
            .map_err(|source| BdevError::Os {
                what: format!("creating {}", path.display()),
                source,
            })?;
        let sized = f.set_len(size_bytes).map_err(|source| BdevError::Os {
            what: format!("sizing {} to {size_bytes} bytes", path.display()),
            source,
        });
        drop(f);
        let opened = sized.and_then(|()| Self::open(path, block_size));
        if opened.is_err() {
            // The file is ours (O_EXCL) and of no use: left behind, an
            // empty file would refuse every retry with a sane size.
            let _ = std::fs::remove_file(path);
        }
        opened
    }

    /// The same device under another name (the operator's name for it).
    pub fn named(mut self, name: &str) -> FileDevice {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.info.name = name.to_string();
        }
        self
    }

    /// Open an existing file or block device; its size is the device size.
    /// A block device is claimed exclusively (O_EXCL): one that is mounted,
    /// part of an md, dm or LVM device, or claimed by another program is
    /// refused with [`BdevError::Busy`], and nobody else can claim it while
    /// this device (or a resized copy of it) lives.
    pub fn open(path: &Path, block_size: u32) -> Result<FileDevice, BdevError> {
        if block_size != 512 && block_size != 4096 {
            return Err(BdevError::InvalidArgument(format!(
                "{}: block size must be 512 or 4096, got {block_size}",
                path.display()
            )));
        }
        let os = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |source| BdevError::Os { what, source }
        };
        // Only regular files and block devices are opened at all: opening
        // some character devices acts (a watchdog arms). The type is
        // checked again on the open descriptor below.
        let named = std::fs::metadata(path).map_err(os("reading metadata of"))?;
        if !named.file_type().is_file() && !named.file_type().is_block_device() {
            return Err(BdevError::InvalidArgument(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        }
        // O_EXCL without O_CREAT claims a block device and means nothing
        // for a regular file (Linux, open(2)). The second open below is not
        // exclusive: the claim belongs to this first file description.
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_EXCL | libc::O_NOCTTY)
            .open(path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EBUSY) => BdevError::Busy(format!(
                    "{} is in use (mounted, part of an md, dm or LVM device, or claimed by another program){}",
                    path.display(),
                    holders(path)
                )),
                _ => os("opening")(source),
            })?;
        let meta = buffered.metadata().map_err(os("reading metadata of"))?;
        let is_block_device = meta.file_type().is_block_device();
        let size = if is_block_device {
            let mut size = 0u64;
            // SAFETY: BLKGETSIZE64 writes one u64 to the given pointer.
            let rc = unsafe { libc::ioctl(buffered.as_raw_fd(), BLKGETSIZE64, &mut size) };
            if rc != 0 {
                return Err(os("reading the size of")(std::io::Error::last_os_error()));
            }
            size
        } else if meta.file_type().is_file() {
            meta.len()
        } else {
            return Err(BdevError::InvalidArgument(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        };
        if size == 0 || size % block_size as u64 != 0 {
            return Err(BdevError::InvalidArgument(format!(
                "{}: size {size} is not a positive multiple of the block size {block_size}",
                path.display()
            )));
        }
        // Through the descriptor already open, not the name again: a name
        // that now points elsewhere (a by-id link after a hot-plug) cannot
        // give the two descriptors different files.
        let same = PathBuf::from(format!("/proc/self/fd/{}", buffered.as_raw_fd()));
        let direct = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_NOCTTY)
            .open(&same)
        {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::info!(path = %path.display(), error = %e, "O_DIRECT unavailable; using buffered IO with fdatasync on flush");
                None
            }
        };
        // fstatfs on a device node describes /dev (devtmpfs), not the disk.
        let in_memory = !is_block_device && in_memory_fs(&buffered);
        Ok(FileDevice {
            inner: Arc::new(Inner {
                info: DeviceInfo {
                    name: path.display().to_string(),
                    block_size,
                    num_blocks: size / block_size as u64,
                    max_transfer: MAX_TRANSFER,
                    optimal_io_boundary: 0,
                    min_io_blocks: 1,
                    flush: true,
                    discard: true,
                    write_zeroes: true,
                },
                path: path.to_path_buf(),
                buffered,
                direct,
                io_errors: Default::default(),
                is_block_device,
                in_memory,
            }),
        })
    }

    /// Whether aligned IO bypasses the page cache.
    pub fn uses_direct_io(&self) -> bool {
        self.inner.direct.is_some()
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

/// ", held by NAME, ..." when sysfs names what holds the block device at
/// `path` (md and dm list themselves there; a mount does not), else "".
fn holders(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return String::new();
    };
    let rdev = meta.rdev();
    let dir = format!(
        "/sys/dev/block/{}:{}/holders",
        libc::major(rdev),
        libc::minor(rdev)
    );
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if names.is_empty() {
        String::new()
    } else {
        format!(", held by {}", names.join(", "))
    }
}

/// `_IOR(0x12, 114, size_t)`
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl BlockDevice for FileDevice {
    fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    fn error_counts(&self) -> crate::ErrorCounts {
        crate::ErrorCounts {
            io_errors: self
                .inner
                .io_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            ..Default::default()
        }
    }

    /// A regular file is truncated or extended (the new tail reads as
    /// zeroes); a block device node's size belongs to the kernel.
    fn resized(&self, num_blocks: u64) -> Result<Arc<dyn BlockDevice>, BdevError> {
        let inner = &*self.inner;
        let path = inner.path.display();
        if inner.is_block_device {
            return Err(BdevError::Unsupported(format!(
                "{path} is a block device; its size is not ours to change"
            )));
        }
        let len = num_blocks
            .checked_mul(inner.info.block_size as u64)
            .filter(|&l| l > 0)
            .ok_or_else(|| {
                BdevError::InvalidArgument(format!(
                    "{path}: {num_blocks} blocks is not a usable size"
                ))
            })?;
        let os = |what: String| move |source| BdevError::Os { what, source };
        inner
            .buffered
            .set_len(len)
            .map_err(os(format!("sizing {path} to {len} bytes")))?;
        let buffered = inner
            .buffered
            .try_clone()
            .map_err(os(format!("duplicating the handle of {path}")))?;
        let direct = match &inner.direct {
            Some(f) => Some(
                f.try_clone()
                    .map_err(os(format!("duplicating the handle of {path}")))?,
            ),
            None => None,
        };
        Ok(Arc::new(FileDevice {
            inner: Arc::new(Inner {
                info: DeviceInfo {
                    num_blocks,
                    ..inner.info.clone()
                },
                path: inner.path.clone(),
                buffered,
                direct,
                io_errors: inner.io_errors.clone(),
                is_block_device: false,
                in_memory: inner.in_memory,
            }),
        }))
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        // The kernel hands completions over as task work, which runs when
        // the submitting thread enters the kernel; by default it interrupts
        // a thread that is running in user space to make it do so. A
        // reactor spins there, and may make no system call for a long
        // while (all its queues waiting on the device). With these flags
        // the kernel instead says in the ring that work waits, and `poll`
        // enters exactly then (liburing's peek does the same): no
        // interrupts, and no reliance on them. Kernels before 5.19 lack the
        // flags: that ring is entered every few hundred quiet polls while
        // requests are in flight.
        let coop = IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(RING_DEPTH);
        let taskrun_flag = coop.is_ok();
        let ring = coop
            .or_else(|_| IoUring::new(RING_DEPTH))
            .map_err(|source| {
                BdevError::os(
                    format!(
                        "{}: setting up an io_uring of {RING_DEPTH} entries",
                        self.inner.info.name
                    ),
                    source,
                )
            })?;
        let slots = (0..RING_DEPTH).map(|_| Slot::default()).collect();
        Ok(Box::new(FileChannel {
            inner: self.inner.clone(),
            ring,
            slots,
            free: (0..RING_DEPTH).rev().collect(),
            unsubmitted: 0,
            inflight: 0,
            done: Vec::new(),
            taskrun_flag,
            quiet_polls: 0,
        }))
    }
}

#[derive(Default)]
struct Slot {
    tag: u64,
    expected: u64,
    iovecs: SmallVec<[libc::iovec; 4]>,
}

struct FileChannel {
    inner: Arc<Inner>,
    ring: IoUring,
    /// Fixed: an in-flight slot's iovec array must not move.
    slots: Box<[Slot]>,
    free: Vec<u32>,
    unsubmitted: u32,
    inflight: usize,
    /// Requests that failed validation: completed on the next poll.
    done: Vec<Completion>,
    /// The kernel flags pending completions (IORING_SQ_TASKRUN).
    taskrun_flag: bool,
    /// Polls without a completion while requests are in flight (rings
    /// without the flag are entered every `ENTER_EVERY` of them).
    quiet_polls: u32,
}

/// Without IORING_SQ_TASKRUN: polls between entries into the kernel while
/// requests are in flight.
const ENTER_EVERY: u32 = 256;

impl FileChannel {
    fn use_direct(&self, req: &IoRequest) -> bool {
        self.inner.direct.is_some()
            && (req.offset_blocks * self.inner.info.block_size as u64)
                .is_multiple_of(DIRECT_ALIGN as u64)
            && req.sg.iter().all(|v| {
                (v.ptr() as usize).is_multiple_of(DIRECT_ALIGN) && v.len() % DIRECT_ALIGN == 0
            })
    }
}

impl IoChannel for FileChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if let Err(e) = validate(&self.inner.info, &req) {
            self.done.push(Completion {
                tag: req.tag,
                result: Err(e),
            });
            self.inflight += 1;
            return Ok(());
        }
        let Some(&index) = self.free.last() else {
            return Err(SubmitError::Busy(req));
        };
        let bs = self.inner.info.block_size as u64;
        let offset = req.offset_blocks * bs;
        let len = req.num_blocks * bs;
        let fd = if matches!(req.op, IoOp::Read | IoOp::Write) && self.use_direct(&req) {
            self.inner.direct.as_ref().map_or(-1, |f| f.as_raw_fd())
        } else {
            self.inner.buffered.as_raw_fd()
        };
        let slot = &mut self.slots[index as usize];
        slot.tag = req.tag;
        slot.expected = if matches!(req.op, IoOp::Read | IoOp::Write) {
            len
        } else {
            0
        };
        slot.iovecs.clear();
        slot.iovecs.extend(req.sg.iter().map(|v| libc::iovec {
            iov_base: v.ptr().cast(),
            iov_len: v.len(),
        }));
        let fd = types::Fd(fd);
        let iov = slot.iovecs.as_ptr();
        let n = slot.iovecs.len() as u32;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let single = req.sg.len() == 1;
        let entry = match req.op {
            // One buffer: the plain opcodes skip importing an iovec array.
            IoOp::Read if single => opcode::Read::new(fd, req.sg[0].ptr(), len as u32)
                .offset(offset)
                .build(),
            IoOp::Write if single => opcode::Write::new(fd, req.sg[0].ptr(), len as u32)
                .offset(offset)
                .build(),
            IoOp::Read => opcode::Readv::new(fd, iov, n).offset(offset).build(),
            IoOp::Write => opcode::Writev::new(fd, iov, n).offset(offset).build(),
            IoOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            // A punched hole reads back as zeroes in a regular file; a block
            // device zeroes the range in place.
            IoOp::Discard => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(punch)
                .build(),
            IoOp::WriteZeroes => {
                let mode = if self.inner.is_block_device {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    punch
                };
                opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(mode)
                    .build()
            }
        }
        .user_data(index as u64);
        // SAFETY: the iovec array lives in a slot that is not reused or
        // moved until this entry's completion; the buffers are valid per
        // the IoVec contract.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            return Err(SubmitError::Busy(req));
        }
        self.free.pop();
        self.unsubmitted += 1;
        self.inflight += 1;
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        self.inflight -= self.done.len();
        out.append(&mut self.done);
        let waiting = self.inflight > self.unsubmitted as usize && {
            let sq = self.ring.submission();
            if self.taskrun_flag {
                sq.taskrun() || sq.cq_overflow()
            } else {
                self.quiet_polls % ENTER_EVERY == ENTER_EVERY - 1
            }
        };
        if self.unsubmitted > 0 || waiting {
            // One syscall per batch (it also runs completions the kernel
            // holds as task work). On error the entries stay queued and are
            // retried on the next poll; so do the ones after an entry the
            // kernel refused outright (it stops there and says how many it
            // took), or nothing would ever submit them.
            if let Ok(taken) = self.ring.submit() {
                self.unsubmitted = self.unsubmitted.saturating_sub(taken as u32);
            }
        }
        let reaped = out.len();
        for cqe in self.ring.completion() {
            let index = cqe.user_data() as u32;
            let Some(slot) = self.slots.get(index as usize) else {
                continue;
            };
            let res = cqe.result();
            let result = if res < 0 {
                Err(IoError::Os(-res))
            } else if (res as u64) < slot.expected {
                Err(IoError::Short {
                    done: res as u64,
                    expected: slot.expected,
                })
            } else {
                Ok(())
            };
            if result.is_err() {
                (self.inner.io_errors).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            out.push(Completion {
                tag: slot.tag,
                result,
            });
            self.free.push(index);
            self.inflight -= 1;
        }
        if out.len() == reaped && self.inflight > 0 {
            self.quiet_polls = self.quiet_polls.wrapping_add(1);
            if self.inner.in_memory {
                // On tmpfs the kernel hands every request to an io-wq
                // worker thread, which runs where the reactor may: on the
                // reactor's own core, kept busy polling, so each request
                // waited for the scheduler to take the core away. Yield it
                // (one system call when nothing else wants it): 4 KiB
                // random reads of a tmpfs file export went from 263 K to
                // 485 K IOPS, writes from 240 K to 431 K. Moving the
                // workers to other cores (IORING_REGISTER_IOWQ_AFF) halved
                // them instead on 2 cores, where the other one is busy too.
                // Elsewhere (a disk, O_DIRECT) requests start in the
                // submitting call, and a flush blocks its worker on the
                // disk, not on the core: no yield.
                std::thread::yield_now();
            }
        } else {
            self.quiet_polls = 0;
        }
        out.len() - before
    }

    fn inflight(&self) -> usize {
        self.inflight
    }
}
