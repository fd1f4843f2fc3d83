//! The channel from the export to its frontend (vhost-user's backend
//! request channel): how a frontend learns that the device's configuration
//! space changed (a resize) without polling for it.
//!
//! The vhost crate (0.18) receives the channel's socket in
//! SET_BACKEND_REQ_FD but offers no way to send CONFIG_CHANGE_MSG over it,
//! nor to reach the socket. So the control thread peeks at each message
//! before the crate reads it: when it is SET_BACKEND_REQ_FD, a peek with
//! room for ancillary data gives us our own duplicate of the socket (the
//! kernel duplicates passed descriptors on MSG_PEEK), while the crate
//! goes on to receive the message as usual. Only we ever write to it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::FrontendError;

/// vhost-user FrontendReq::SET_BACKEND_REQ_FD.
const SET_BACKEND_REQ_FD: u32 = 21;
/// vhost-user BackendReq::CONFIG_CHANGE_MSG.
const CONFIG_CHANGE_MSG: u32 = 2;
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// How long a frontend may take to take the message and to acknowledge it
/// (QEMU reads the new configuration space from us, GET_CONFIG, before it
/// answers): one deadline for the whole exchange, so a frontend that
/// trickles its answer cannot hold the caller longer.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket of a connection's backend request channel.
pub struct FrontendChannel {
    sock: UnixStream,
    /// REPLY_ACK was negotiated: ask for, and wait for, an answer.
    reply_ack: bool,
}

impl FrontendChannel {
    /// Tell the frontend that the configuration space changed; with
    /// REPLY_ACK, wait until it has read the new one.
    pub fn config_changed(&mut self) -> Result<(), FrontendError> {
        let deadline = std::time::Instant::now() + ACK_TIMEOUT;
        let left = || {
            deadline
                .checked_duration_since(std::time::Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or(FrontendError::NoAnswer {
                    what: "CONFIG_CHANGE_MSG",
                    after: ACK_TIMEOUT,
                })
        };
        let flags = VERSION | if self.reply_ack { NEED_REPLY } else { 0 };
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&flags.to_le_bytes());
        // The frontend may hold a descriptor of this very socket and change
        // its flags and time-outs: each call here asks not to wait, and
        // the waiting is poll's, bounded by our deadline alone.
        let fd = self.sock.as_raw_fd();
        let mut at = 0;
        while at < msg.len() {
            wait(fd, libc::POLLOUT, left()?)?;
            // SAFETY: sending from a buffer we own, of its length.
            let n = unsafe {
                libc::send(
                    fd,
                    msg[at..].as_ptr().cast(),
                    msg.len() - at,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            at += done(n, "sending CONFIG_CHANGE_MSG")?;
        }
        if !self.reply_ack {
            return Ok(());
        }
        let mut reply = [0u8; 20];
        let mut at = 0;
        while at < reply.len() {
            wait(fd, libc::POLLIN, left()?)?;
            // SAFETY: receiving into a buffer we own, of its length.
            let n = unsafe {
                libc::recv(
                    fd,
                    reply[at..].as_mut_ptr().cast(),
                    reply.len() - at,
                    libc::MSG_DONTWAIT,
                )
            };
            match done(n, "waiting for the frontend's answer to CONFIG_CHANGE_MSG")? {
                0 if n == 0 => return Err(FrontendError::Closed),
                k => at += k,
            }
        }
        let word =
            |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
        let value = u64::from_le_bytes([
            reply[12], reply[13], reply[14], reply[15], reply[16], reply[17], reply[18], reply[19],
        ]);
        if word(0) != CONFIG_CHANGE_MSG || word(4) & REPLY == 0 || word(8) != 8 {
            return Err(FrontendError::Invalid(format!(
                "the frontend answered CONFIG_CHANGE_MSG with request {} flags {:#x} size {}",
                word(0),
                word(4),
                word(8)
            )));
        }
        if value != 0 {
            return Err(FrontendError::Invalid(format!(
                "the frontend failed to apply the configuration change (status {value})"
            )));
        }
        Ok(())
    }
}

/// Wait until `fd` is ready for `events`, at most `left` (a frontend's
/// signal interrupting poll just polls again).
fn wait(fd: RawFd, events: libc::c_short, left: Duration) -> Result<(), FrontendError> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one pollfd of our own.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(());
        }
        return Err(FrontendError::os("waiting on the frontend's channel", e));
    }
    // Not ready yet: the caller's deadline decides. Readiness or an error
    // or hang-up: the send or receive tells which.
    Ok(())
}

/// Bytes a non-blocking send or receive moved: 0 when it would have
/// waited (or was interrupted), an error otherwise.
fn done(n: isize, what: &'static str) -> Result<usize, FrontendError> {
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = std::io::Error::last_os_error();
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(0),
        _ => Err(FrontendError::os(what, e)),
    }
}

/// Requests the backend answers whether or not REPLY_ACK was agreed
/// (GET_FEATURES, SET_LOG_BASE, GET_VRING_BASE, GET_PROTOCOL_FEATURES,
/// GET_QUEUE_NUM, GET_CONFIG, POSTCOPY_ADVISE, GET_INFLIGHT_FD,
/// GET_MAX_MEM_SLOTS, GET_SHARED_OBJECT, SET_DEVICE_STATE_FD,
/// CHECK_DEVICE_STATE, GET_SHMEM_CONFIG): the frontend waits for the reply,
/// and the crate sends none when the request fails.
const ALWAYS_ANSWERED: [u32; 13] = [1, 6, 11, 15, 17, 24, 28, 31, 36, 41, 42, 43, 44];

/// Whether the next message on the connection `fd` asks for a reply
/// (its header's NEED_REPLY flag: with REPLY_ACK agreed, the frontend
/// hears a failure only then).
pub fn next_asks_reply(fd: RawFd) -> bool {
    const NEED_REPLY: u32 = 0x8;
    let mut head = [0u8; 8];
    peek(fd, &mut head)
        && u32::from_le_bytes([head[4], head[5], head[6], head[7]]) & NEED_REPLY != 0
}

/// Whether the next message on the connection `fd` is one the frontend
/// waits for an answer to whatever was agreed (peeked, left queued).
pub fn next_needs_answer(fd: RawFd) -> bool {
    let mut code = [0u8; 4];
    peek(fd, &mut code) && ALWAYS_ANSWERED.contains(&u32::from_le_bytes(code))
}

/// Fill `buf` from the start of the next message on `fd`, leaving it
/// queued (no ancillary data: descriptors of the message, such as the
/// memory table's, are not duplicated); false if fewer bytes are there.
fn peek(fd: RawFd, buf: &mut [u8]) -> bool {
    // SAFETY: recv into a buffer we own, of its length.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == buf.len() as isize
}

/// If the next message on the connection `fd` is SET_BACKEND_REQ_FD, our
/// own duplicate of the socket it carries; the message stays queued for
/// the protocol handler.
pub fn peek_backend_channel(fd: RawFd, reply_ack: bool) -> Option<FrontendChannel> {
    let mut hdr = [0u8; 12];
    // First the header alone, so other messages' descriptors stay put.
    let whole = peek(fd, &mut hdr);
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    // The message the crate accepts: no payload, one descriptor (below).
    if !whole || word(0) != SET_BACKEND_REQ_FD || word(8) != 0 {
        return None;
    }
    // Room for a few descriptors: a frontend that sends more than one is
    // wrong, and every one we receive must be closed.
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    };
    // SAFETY: zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: msg describes buffers we own.
    let n = unsafe {
        libc::recvmsg(
            fd,
            &mut msg,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n <= 0 {
        return None;
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with its macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if fds.len() != 1 {
        // The crate refuses it; every descriptor closes as `fds` drops.
        return None;
    }
    let fd = fds.into_iter().next()?;
    if !is_unix_stream(&fd) {
        // The crate refuses the message too; we must never write into
        // whatever else a frontend passed.
        return None;
    }
    Some(FrontendChannel {
        sock: UnixStream::from(fd),
        reply_ack,
    })
}

fn is_unix_stream(fd: &OwnedFd) -> bool {
    let opt = |name: libc::c_int| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one c_int into `v`.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(fd),
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(v)
    };
    opt(libc::SO_DOMAIN) == Some(libc::AF_UNIX) && opt(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}
