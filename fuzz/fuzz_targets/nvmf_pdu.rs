//! The NVMe/TCP PDU parser on bytes from a hostile peer: never a panic,
//! and what it accepts stays inside the buffer and the data limit; a
//! command capsule it accepts re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvmf::pdu::{self, Digests, Pdu, Receiver};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let r = Receiver {
        controller: mode & 1 != 0,
        digests: Digests {
            header: mode & 2 != 0,
            data: mode & 4 != 0,
        },
        max_data: 8192,
    };
    let mut at = 0;
    while let Ok(Some((p, n))) = pdu::parse(&bytes[at..], &r) {
        assert!(n > 0 && at + n <= bytes.len());
        if let Pdu::Command { sqe, data } = &p {
            assert!(data.len() <= 8192);
            let mut again = Vec::new();
            pdu::encode_command(sqe, data, r.digests, 0, &mut again);
            let back = pdu::parse(&again, &r).ok().flatten().map(|(p, _)| p);
            assert_eq!(back.as_ref(), Some(&p));
        }
        at += n;
    }
});
