use proptest::prelude::*;

use super::*;

fn rx(controller: bool, d: Digests) -> Receiver {
    Receiver {
        controller,
        digests: d,
        max_data: 1 << 20,
    }
}

fn digests() -> impl Strategy<Value = Digests> {
    (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data })
}

fn whole<'a>(buf: &'a [u8], r: &Receiver) -> Pdu<'a> {
    let (pdu, len) = parse(buf, r).unwrap().unwrap();
    assert_eq!(len, buf.len());
    pdu
}

#[test]
fn ic_exchange_round_trips() {
    let q = IcReq {
        pfv: 0,
        hpda: 3,
        digests: Digests {
            header: true,
            data: false,
        },
        maxr2t: 7,
    };
    let mut b = Vec::new();
    encode_ic_req(&q, &mut b);
    assert_eq!(b.len(), IC_LEN);
    assert_eq!(whole(&b, &rx(true, Digests::default())), Pdu::IcReq(q));
    // Digests negotiated later do not apply to IC PDUs.
    assert_eq!(
        whole(
            &b,
            &rx(
                true,
                Digests {
                    header: true,
                    data: true
                }
            )
        ),
        Pdu::IcReq(q)
    );
    let p = IcResp {
        pfv: 0,
        cpda: 0,
        digests: Digests::default(),
        maxh2cdata: 131072,
    };
    b.clear();
    encode_ic_resp(&p, &mut b);
    assert_eq!(whole(&b, &rx(false, Digests::default())), Pdu::IcResp(p));
    // Each end refuses what only it sends.
    assert_eq!(
        parse(&b, &rx(true, Digests::default())),
        Err(PduError::Type(kind::IC_RESP))
    );
}

#[test]
fn term_request_echoes_at_most_128_header_bytes() {
    let mut b = Vec::new();
    encode_term(false, fes::HEADER_DIGEST, 0, &[7u8; 300], &mut b);
    assert_eq!(b.len(), TERM_MAX);
    match whole(&b, &rx(false, Digests::default())) {
        Pdu::Term {
            from_host,
            fes: f,
            header,
            ..
        } => {
            assert!(!from_host);
            assert_eq!(f, fes::HEADER_DIGEST);
            assert_eq!(header, &[7u8; 128][..]);
        }
        other => panic!("{other:?}"),
    }
}

proptest! {
    #[test]
    fn commands_round_trip(
        sqe in proptest::collection::vec(any::<u8>(), 64),
        data in proptest::collection::vec(any::<u8>(), 0..600),
        d in digests(),
        pda in 0u8..4,
    ) {
        let sqe: [u8; 64] = sqe.try_into().unwrap();
        let mut b = Vec::new();
        encode_command(&sqe, &data, d, pda, &mut b);
        let r = rx(true, d);
        let f = frame(b[..8].try_into().unwrap(), &r).unwrap();
        if !data.is_empty() {
            prop_assert_eq!(f.pdo % ((pda as usize + 1) * 4), 0);
        }
        prop_assert_eq!(whole(&b, &r), Pdu::Command { sqe, data: &data });
        // Any prefix is "need more", never an error or a PDU.
        for cut in [0, 1, 7, 8, 71, b.len() - 1] {
            prop_assert_eq!(parse(&b[..cut], &r), Ok(None));
        }
    }

    #[test]
    fn data_pdus_round_trip(
        data in proptest::collection::vec(any::<u8>(), 1..600),
        d in digests(),
        last in any::<bool>(),
        cccid in any::<u16>(),
        ttag in any::<u16>(),
        offset in any::<u32>(),
    ) {
        let hdr = DataHeader { cccid, ttag, offset, length: data.len() as u32, last, success: false };
        let mut b = Vec::new();
        encode_data(true, &hdr, &data, d, 0, &mut b);
        prop_assert_eq!(whole(&b, &rx(true, d)), Pdu::H2cData(hdr, &data));
        b.clear();
        let hdr = DataHeader { success: last, ..hdr };
        encode_data(false, &hdr, &data, d, 1, &mut b);
        prop_assert_eq!(whole(&b, &rx(false, d)), Pdu::C2hData(hdr, &data));
    }

    #[test]
    fn responses_and_r2t_round_trip(cqe in proptest::collection::vec(any::<u8>(), 16), d in digests(), len in any::<u32>()) {
        let cqe: [u8; 16] = cqe.try_into().unwrap();
        let mut b = Vec::new();
        encode_response(&cqe, d, &mut b);
        let r2t = R2t { cccid: 3, ttag: 9, offset: 4096, length: len };
        encode_r2t(&r2t, d, &mut b);
        let r = rx(false, d);
        let (first, n) = parse(&b, &r).unwrap().unwrap();
        prop_assert_eq!(first, Pdu::Response(cqe));
        prop_assert_eq!(whole(&b[n..], &r), Pdu::R2t(r2t));
    }

    /// A flipped bit in a PDU with both digests is refused, or parses to
    /// exactly what the (different) bytes say; never a panic.
    #[test]
    fn a_flipped_bit_is_caught(
        data in proptest::collection::vec(any::<u8>(), 1..200),
        bit in any::<usize>(),
    ) {
        let d = Digests { header: true, data: true };
        let mut b = Vec::new();
        encode_command(&[5u8; 64], &data, d, 0, &mut b);
        let at = bit % (b.len() * 8);
        b[at / 8] ^= 1 << (at % 8);
        let r = rx(true, d);
        match parse(&b, &r) {
            Ok(Some((Pdu::Command { sqe, data: got }, _))) => {
                // Only the length may have been changed into a longer
                // (incomplete) or consistent one; the bytes covered by
                // the digests cannot differ.
                prop_assert_eq!(sqe, [5u8; 64]);
                prop_assert_eq!(got, &data[..]);
                prop_assert!(false, "flip at bit {} not caught", at);
            }
            Ok(Some(_)) => prop_assert!(false, "another PDU type"),
            Ok(None) | Err(_) => {}
        }
    }

    /// Random bytes never panic the parser, and what it accepts lies
    /// within the buffer and the limit.
    #[test]
    fn random_bytes_are_safe(
        b in proptest::collection::vec(any::<u8>(), 0..400),
        controller in any::<bool>(),
        d in digests(),
    ) {
        let r = Receiver { controller, digests: d, max_data: 256 };
        if let Ok(Some((pdu, n))) = parse(&b, &r) {
            prop_assert!(n <= b.len());
            if let Pdu::Command { data, .. } | Pdu::H2cData(_, data) | Pdu::C2hData(_, data) = pdu {
                prop_assert!(data.len() <= 256);
            }
        }
    }
}

#[test]
fn oversized_data_is_refused_from_the_common_header() {
    let r = Receiver {
        controller: true,
        digests: Digests::default(),
        max_data: 8192,
    };
    // A command capsule claiming 4 GiB: refused from its first 8 bytes.
    let mut ch = [
        kind::COMMAND,
        0,
        COMMAND_HLEN as u8,
        COMMAND_HLEN as u8,
        0,
        0,
        0,
        0,
    ];
    ch[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = parse(&ch, &r).unwrap_err();
    assert!(matches!(e, PduError::TooLong { .. }), "{e:?}");
    assert_eq!(e.fes(), fes::DATA_LIMIT);
}

#[test]
fn digest_flags_must_match_the_negotiation() {
    let mut b = Vec::new();
    encode_command(&[0u8; 64], &[1, 2, 3], Digests::default(), 0, &mut b);
    let on = rx(
        true,
        Digests {
            header: true,
            data: false,
        },
    );
    let e = parse(&b, &on).unwrap_err();
    assert_eq!((e.fes(), e.fei()), (fes::INVALID_HEADER, 1));
}

#[test]
fn a_bad_data_digest_names_the_command_and_its_length() {
    let d = Digests {
        header: false,
        data: true,
    };
    let mut sqe = [0u8; 64];
    sqe[2..4].copy_from_slice(&77u16.to_le_bytes());
    let mut b = Vec::new();
    encode_command(&sqe, &[9u8; 100], d, 0, &mut b);
    let n = b.len();
    b[n - 1] ^= 0x80;
    assert_eq!(
        parse(&b, &rx(true, d)),
        Err(PduError::DataDigest {
            kind: kind::COMMAND,
            cid: 77,
            len: n
        })
    );
}
