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
#[derive(Debug, Clone)]
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
    /// The namespace's NGUID or EUI-64 ([`nvme::spec::namespace_ids`]).
    /// Not the serial-based name a drive gets without them: a target's
    /// serial may be made anew with its subsystem (Linux's nvmet), and a
    /// restart then took the same namespace for another disk (review).
    pub identity: Option<String>,
}

impl Examined {
    /// `id` and `ns` (each 4 KiB, as a successful Identify brings them),
    /// or why the namespace is not usable.
    pub fn of(id: &[u8], ns: &[u8]) -> Result<Examined, String> {
        let short = |_| "short Identify data".to_string();
        let ns: &[u8; 4096] = ns.try_into().map_err(short)?;
        let id: &[u8; 4096] = id.try_into().map_err(short)?;
        let c = nvme::spec::IdentifyController::parse(id);
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
        let nguid = f.nguid;
        let max_command = if c.mdts == 0 {
            1 << 20
        } else {
            (4096u32 << c.mdts.min(8)).min(1 << 20)
        };
        // (IOCCSZ is a fabrics field, not in the NVMe driver's parse.)
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
            discard: c.dsm() && in_capsule >= 16,
            volatile: c.vwc,
            identity: nvme::spec::namespace_ids(&f),
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

#[cfg(test)]
mod tests {
    use super::*;

    type Edit = fn(&mut [u8], &mut [u8]);

    /// What a target of 1,000 4 KiB blocks with an NGUID says (MDTS 5,
    /// discard, no cache, 8 KiB of capsule data), as `edit` changes it.
    fn examined(edit: Edit) -> Result<Examined, String> {
        let mut id = vec![0u8; 4096];
        id[77] = 5;
        id[520] = 1 << 2;
        id[1792..1796].copy_from_slice(&((8192u32 + 64) / 16).to_le_bytes());
        let mut ns = vec![0u8; 4096];
        ns[0..8].copy_from_slice(&1000u64.to_le_bytes());
        ns[104..120].fill(7);
        ns[130] = 12;
        edit(&mut id, &mut ns);
        Examined::of(&id, &ns)
    }

    fn size(ns: &mut [u8], blocks: u64) {
        ns[0..8].copy_from_slice(&blocks.to_le_bytes());
    }

    #[test]
    fn a_namespace_it_cannot_use_is_refused() {
        let n = examined(|_, _| {}).unwrap();
        assert_eq!((n.nsze, n.lbads, n.max_command), (1000, 12, 128 << 10));
        assert_eq!((n.in_capsule, n.discard, n.volatile), (8192, true, false));
        let refused: [(&str, Edit); 5] = [
            ("no blocks", |_, ns| size(ns, 0)),
            ("metadata", |_, ns| ns[128] = 8),
            ("8 KiB blocks", |_, ns| ns[130] = 13),
            ("2^64 bytes", |_, ns| size(ns, 1 << 52)),
            ("format 16 of a table of 1", |_, ns| {
                ns[26] = 0x20;
                ns[128 + 64 + 2] = 12;
            }),
        ];
        for (what, edit) in refused {
            assert!(examined(edit).is_err(), "{what}");
        }
    }

    #[test]
    fn a_reconnect_must_find_the_same_namespace_taking_as_much() {
        let at = examined(|_, _| {}).unwrap();
        let cases: [(&str, Edit, bool); 8] = [
            ("the same", |_, _| {}, true),
            ("grown, with its NGUID", |_, ns| size(ns, 2000), true),
            ("shrunk", |_, ns| size(ns, 500), false),
            ("another NGUID", |_, ns| ns[104] = 8, false),
            ("a volatile cache now", |id, _| id[525] = 1, false),
            ("smaller commands", |id, _| id[77] = 4, false),
            (
                "no capsule data",
                |id, _| id[1792..1796].copy_from_slice(&4u32.to_le_bytes()),
                false,
            ),
            ("no discard", |id, _| id[520] = 0, false),
        ];
        for (what, edit, same) in cases {
            assert_eq!(at.still(&examined(edit).unwrap()).is_ok(), same, "{what}");
        }
        // Without an NGUID, grown is another disk; a cache gone is fine
        // (flushes still go).
        let plain = examined(|_, ns| ns[104..120].fill(0)).unwrap();
        let grown = examined(|_, ns| {
            ns[104..120].fill(0);
            size(ns, 2000);
        })
        .unwrap();
        assert!(plain.still(&grown).is_err());
        let cached = examined(|id, _| id[525] = 1).unwrap();
        assert!(cached.still(&at).is_ok());
    }
}
