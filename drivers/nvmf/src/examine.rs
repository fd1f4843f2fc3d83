//! What a remote namespace's device takes from Identify Controller and
//! Identify Namespace, read once at attach and again at each reconnect
//! (a later association must find the same namespace, taking as much).

/// The most write data a command capsule carries, whatever the target's
/// IOCCSZ allows: capsules are put in the send buffer without waiting for
/// room (unlike data a target asks for), so a target saying it takes
/// 1 MiB capsules while reading nothing had 127 MiB a queue piled up.
/// Writes of a few blocks still ride in the capsule.
const IN_CAPSULE_MAX: usize = 16 << 10;

/// What the device uses of Identify Controller and Identify Namespace.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Examined {
    /// Size in blocks, block size shift, NGUID (all zeros: none).
    pub nsze: u64,
    pub lbads: u8,
    pub nguid: [u8; 16],
    /// Largest command (the target's MDTS).
    pub max_command: u32,
    /// Write data a command capsule may carry on an IO queue.
    pub in_capsule: usize,
    /// Discard offered (ONCS, with room for its range in a capsule).
    pub discard: bool,
    /// The controller has a volatile write cache (VWC).
    pub volatile: bool,
}

impl Examined {
    /// `id` and `ns` (each 4 KiB, as a successful Identify brings them),
    /// or why the namespace is not usable.
    pub fn of(id: &[u8], ns: &[u8]) -> Result<Examined, String> {
        let ns: &[u8; 4096] = ns
            .try_into()
            .map_err(|_| "short Identify data".to_string())?;
        if id.len() < 4096 {
            return Err("short Identify data".into());
        }
        // FLBAS bits 6:5 included: a format past the 16th was taken for
        // another (audit).
        let f = nvme::spec::IdentifyNamespace::parse(ns);
        let (nsze, lbads) = (f.nsze, f.lbads);
        // A size in bytes beyond 2^63 is no real namespace, and would
        // overflow every byte count made of it.
        let too_big = nsze
            .checked_shl(lbads as u32)
            .is_none_or(|b| b >> lbads != nsze || b > i64::MAX as u64);
        // A format past the table (NLBAF) has whatever the target left in
        // its entry.
        if nsze == 0 || f.ms != 0 || !(9..=12).contains(&lbads) || too_big || f.format > f.nlbaf {
            return Err(format!(
                "size {nsze}, block 2^{lbads}, metadata {}, format {} of {}",
                f.ms,
                f.format,
                f.nlbaf as u32 + 1
            ));
        }
        let mut nguid = [0u8; 16];
        nguid.copy_from_slice(&ns[104..120]);
        let mdts = id[77];
        let max_command = if mdts == 0 {
            1 << 20
        } else {
            (4096u32 << mdts.min(8)).min(1 << 20)
        };
        let oncs = u16::from_le_bytes([id[520], id[521]]);
        let ioccsz = u32::from_le_bytes([id[1792], id[1793], id[1794], id[1795]]) as usize;
        let in_capsule = (ioccsz * 16).saturating_sub(64).min(IN_CAPSULE_MAX);
        Ok(Examined {
            nsze,
            lbads,
            nguid,
            max_command,
            in_capsule,
            // Its 16-byte range rides in the command capsule: a target
            // that takes no in-capsule data on IO queues (IOCCSZ 4; SPDK
            // with -c 0, Linux with inline_data_size 0) would fail every
            // discard, and a mirror its member. Not offered there.
            discard: oncs & (1 << 2) != 0 && in_capsule >= 16,
            volatile: id[525] & 1 != 0,
        })
    }

    /// Whether `now` (a new association) is the namespace attached, and
    /// takes what the device was told it takes.
    pub fn still(&self, now: &Examined) -> Result<(), String> {
        // Grown is the same namespace (a target may grow a volume online,
        // as this appliance's does) when its NGUID says so; the device
        // keeps the size it was opened with. Refused, a namespace grown
        // while the connection was down failed the device at the loss
        // timeout (audit). Without an NGUID the size is all that tells
        // another disk apart: it must match.
        let grown_ok = self.nguid != [0u8; 16] && now.nsze > self.nsze;
        if (now.nsze != self.nsze && !grown_ok)
            || (now.lbads, now.nguid) != (self.lbads, self.nguid)
        {
            return Err(format!(
                "not the one it was (size {} blocks, was {}; NGUID {:02x?})",
                now.nsze, self.nsze, now.nguid
            ));
        }
        // The device said no cache when attached, so nothing above
        // flushes it: writes it acknowledged into a cache now would be
        // lost with the target's power (audit).
        if now.volatile && !self.volatile {
            return Err("the controller says a volatile write cache now, which it did not when the device was attached: its writes would never be flushed".into());
        }
        // Commands sized for what it took then fail on a target that takes
        // less now, and a mirror fails a healthy leg over them (review).
        if now.max_command < self.max_command
            || now.in_capsule < self.in_capsule
            || (self.discard && !now.discard)
        {
            return Err(format!(
                "the controller takes less now (commands of {} bytes, was {}; {} bytes in a capsule, was {}; discard {}, was {})",
                now.max_command, self.max_command, now.in_capsule, self.in_capsule, now.discard, self.discard
            ));
        }
        Ok(())
    }
}
