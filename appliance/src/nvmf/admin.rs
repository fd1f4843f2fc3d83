//! Admin commands of a controller whose admin queue is connected:
//! properties, Identify, Get Log Page, features, Keep Alive, Abort.
//! Asynchronous Event Requests are held by the connection (`conn`), which
//! answers them when an event comes.

use nvme::spec::{Sqe, Status};
use nvmf::capsule::{self, admin, fctype, prop, status, Property};

use super::controller::{Controller, AEC_NS_ATTR, MAX_IO_QUEUES};
use super::identify;

/// What a command's answer is.
pub struct Answer {
    /// Its status.
    pub status: Status,
    /// Result dwords 0 and 1.
    pub result: u64,
    /// Data for the host (a read's).
    pub data: Vec<u8>,
}

impl Answer {
    /// Success with result `result`.
    pub fn ok(result: u64) -> Answer {
        Answer {
            status: Status::SUCCESS,
            result,
            data: Vec::new(),
        }
    }

    /// Success with data.
    pub fn data(data: Vec<u8>) -> Answer {
        Answer {
            status: Status::SUCCESS,
            result: 0,
            data,
        }
    }

    /// An error.
    pub fn err(status: Status) -> Answer {
        Answer {
            status,
            result: 0,
            data: Vec::new(),
        }
    }
}

/// Most bytes one Get Log Page returns (255 discovery entries).
pub const MAX_LOG_TRANSFER: usize = 256 << 10;

/// Feature identifiers served.
mod fid {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER: u8 = 0x02;
    pub const TEMPERATURE: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const WRITE_CACHE: u8 = 0x06;
    pub const NUM_QUEUES: u8 = 0x07;
    pub const COALESCING: u8 = 0x08;
    pub const ASYNC_EVENT: u8 = 0x0b;
    pub const KEEP_ALIVE: u8 = 0x0f;
}

/// Serve a fabrics Property Get or Set.
pub fn property(c: &std::sync::Arc<Controller>, s: &Sqe) -> Answer {
    let p = Property::from_sqe(s);
    let set = capsule::fabrics_type(s) == fctype::PROPERTY_SET;
    let wide_ok = matches!(p.offset, prop::CAP);
    if p.wide && !wide_ok {
        return Answer::err(Status::INVALID_FIELD);
    }
    if set {
        return match p.offset {
            prop::CC => {
                c.set_cc(p.value as u32);
                Answer::ok(0)
            }
            // A subsystem reset is not offered (CAP.NSSRS is 0).
            _ => Answer::err(Status::INVALID_FIELD),
        };
    }
    let v = match p.offset {
        prop::CAP => identify::cap(),
        prop::VS => identify::VERSION as u64,
        prop::CC => c.state().cc as u64,
        prop::CSTS => c.state().csts as u64,
        prop::NSSR => 0,
        _ => return Answer::err(Status::INVALID_FIELD),
    };
    Answer::ok(v)
}

/// The bytes a Get Log Page or Identify asks for, from its data pointer.
fn transfer_len(s: &Sqe) -> Option<usize> {
    match capsule::data_pointer(s) {
        capsule::DataPointer::Transport { len } => Some(len as usize),
        _ => None,
    }
}

/// Serve an admin command other than Connect, Property Get/Set,
/// Disconnect and Asynchronous Event Request.
pub fn command(c: &Controller, s: &Sqe) -> Answer {
    let disc = c.is_discovery();
    if disc {
        // A discovery controller's host is alive while it asks things
        // (its idle limit when it set no keep-alive: DISCOVERY_IDLE).
        c.touch();
    }
    match s.opcode() {
        admin::IDENTIFY => identify(c, s),
        admin::GET_LOG_PAGE => log_page(c, s),
        admin::SET_FEATURES if !disc || s.cdw[0] as u8 == fid::ASYNC_EVENT => set_features(c, s),
        admin::GET_FEATURES => get_features(c, s),
        admin::KEEP_ALIVE => {
            c.touch();
            Answer::ok(0)
        }
        // Commands complete too fast to be aborted: bit 0 says "not
        // aborted".
        admin::ABORT if !disc => Answer::ok(1),
        _ => Answer::err(Status::INVALID_OPCODE),
    }
}

fn sized(s: &Sqe, data: Vec<u8>) -> Answer {
    match transfer_len(s) {
        Some(n) if n == data.len() => Answer::data(data),
        // A shorter buffer gets the start; a longer one is an error the
        // host made.
        Some(n) if n < data.len() => Answer::data(data[..n].to_vec()),
        _ => Answer::err(status::SGL_LENGTH),
    }
}

fn identify(c: &Controller, s: &Sqe) -> Answer {
    let cns = s.cdw[0] as u8;
    let nsid = s.nsid;
    let data = match (cns, &c.subsystem) {
        (0x01, _) => identify::controller(c),
        (0x00, Some(sub)) if nsid == 1 => identify::namespace(sub),
        (0x03, Some(sub)) if nsid == 1 => identify::descriptors(sub),
        (0x00 | 0x03, Some(_)) => return Answer::err(Status::INVALID_NAMESPACE),
        (0x02, Some(_)) if nsid < 0xffff_fffe => identify::active_namespaces(nsid),
        // The base specification's answer for these two NSIDs.
        (0x02, Some(_)) => return Answer::err(Status::INVALID_NAMESPACE),
        _ => return Answer::err(Status::INVALID_FIELD),
    };
    sized(s, data)
}

fn log_page(c: &Controller, s: &Sqe) -> Answer {
    let lid = s.cdw[0] as u8;
    let rae = s.cdw[0] & (1 << 15) != 0;
    let numd = ((s.cdw[0] >> 16) | (s.cdw[1] & 0xffff) << 16) as u64 + 1;
    let len = (numd * 4) as usize;
    let offset = s.cdw[2] as u64 | (s.cdw[3] as u64) << 32;
    if !offset.is_multiple_of(4) || transfer_len(s) != Some(len) {
        return Answer::err(Status::INVALID_FIELD);
    }
    // The host picks the length: a larger read of a log is done in parts
    // (with offsets), as libnvme does, never as one huge buffer here.
    if len > MAX_LOG_TRANSFER {
        return Answer::err(status::SGL_LENGTH);
    }
    let page = match (lid, &c.subsystem) {
        (identify::LOG_DISCOVERY, None) => {
            let subs = c
                .port
                .subsystems
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let generation = c.port.generation.load(std::sync::atomic::Ordering::SeqCst);
            identify::discovery(&subs, &c.hostnqn, c.local, generation)
        }
        (identify::LOG_ERROR, _) => vec![0u8; 64],
        (identify::LOG_SMART, sub) => identify::smart(sub.as_deref()),
        (identify::LOG_FIRMWARE, Some(_)) => identify::firmware(),
        (identify::LOG_CHANGED_NS, Some(_)) => {
            let mut st = c.state();
            let page = identify::changed_namespaces(st.ns_changed);
            if !rae {
                // Read: the list starts over and events are unmasked.
                st.ns_changed = false;
                st.ns_masked = false;
            }
            page
        }
        _ => return Answer::err(status::INVALID_LOG),
    };
    // Bytes past the page read as zero, as a controller's do.
    let mut out = vec![0u8; len];
    if let Some(src) = page.get(offset.min(page.len() as u64) as usize..) {
        let n = src.len().min(len);
        out[..n].copy_from_slice(&src[..n]);
    }
    Answer::data(out)
}

fn set_features(c: &Controller, s: &Sqe) -> Answer {
    let id = s.cdw[0] as u8;
    if s.cdw[0] & (1 << 31) != 0 {
        return Answer::err(status::NOT_SAVEABLE);
    }
    let v = s.cdw[1];
    let mut st = c.state();
    match id {
        fid::NUM_QUEUES => {
            let (nsq, ncq) = ((v & 0xffff) as u16, (v >> 16) as u16);
            if nsq == 0xffff || ncq == 0xffff {
                return Answer::err(Status::INVALID_FIELD);
            }
            // Granted once per association (the spec allows setting it
            // only before IO queues exist); asked again, it answers the same.
            if st.io_queues == 0 {
                st.io_queues = (nsq.min(ncq) + 1).min(MAX_IO_QUEUES);
            }
            let n = (st.io_queues - 1) as u64;
            Answer::ok(n | n << 16)
        }
        fid::ASYNC_EVENT => {
            st.aec = v;
            Answer::ok(0)
        }
        fid::KEEP_ALIVE => {
            st.kato_ms = v;
            st.last_keep_alive = std::time::Instant::now();
            Answer::ok(0)
        }
        // Accepted and without effect here.
        fid::ARBITRATION
        | fid::POWER
        | fid::ERROR_RECOVERY
        | fid::COALESCING
        | fid::TEMPERATURE => Answer::ok(0),
        _ => Answer::err(Status::INVALID_FIELD),
    }
}

fn get_features(c: &Controller, s: &Sqe) -> Answer {
    let id = s.cdw[0] as u8;
    let st = c.state();
    let v = match id {
        fid::NUM_QUEUES => {
            let n = st.io_queues.max(1) as u64 - 1;
            n | n << 16
        }
        fid::ASYNC_EVENT => (st.aec & AEC_NS_ATTR) as u64,
        fid::KEEP_ALIVE => st.kato_ms as u64,
        fid::WRITE_CACHE => c.subsystem.as_ref().is_some_and(|s| s.volume.info().flush) as u64,
        // Over temperature threshold: 0x157 K (70 C), never reached.
        fid::TEMPERATURE => 0x157,
        fid::ARBITRATION | fid::POWER | fid::ERROR_RECOVERY | fid::COALESCING => 0,
        _ => return Answer::err(Status::INVALID_FIELD),
    };
    Answer::ok(v)
}
