//! The NVMe/TCP target over loopback, driven by the project's host
//! (`nvmf::host`) and by raw sockets that misbehave on purpose.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::nvmf::{stable_nguid, SubsystemOptions, Target};
use appliance::volume::{Volume, VolumeConfig};
use bdev::{BlockDevice, RamDevice};
use nvme::spec::{io as cmd, Sqe, Status};
use nvmf::capsule::{self, status};
use nvmf::host::{Controller, HostConfig, HostError, Queue};
use nvmf::pdu::{self, Digests, Pdu, Receiver};
use poller::{ReactorConfig, Reactors};
use rand::{Rng, SeedableRng};

const BS: u64 = 4096;
const BLOCKS: u64 = 16384; // 64 MiB
const LONG: Duration = Duration::from_secs(20);
const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000001";
const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-0000-0000-000000000002";
const NQN: &str = "nqn.2026-12.io.appliance:vol0";

/// Dropped in field order: the target closes its connections while the
/// reactors still run.
struct Rig {
    target: Target,
    volume: Volume,
    addr: SocketAddr,
    _reactors: Reactors,
}

fn rig(hosts: &[&str]) -> Rig {
    let dev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("d", BS as u32, BLOCKS).unwrap());
    rig_on(hosts, dev)
}

/// A rig whose volume is `dev`.
fn rig_on(hosts: &[&str], dev: Arc<dyn BlockDevice>) -> Rig {
    let reactors = Reactors::start(ReactorConfig {
        count: 2,
        ..Default::default()
    })
    .unwrap();
    let volume = Volume::new(reactors.set(), "vol0", dev);
    let target = Target::new(reactors.set());
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let addr = target
        .add(&volume, options(NQN, listen, hosts))
        .unwrap()
        .opts
        .listen;
    Rig {
        target,
        volume,
        addr,
        _reactors: reactors,
    }
}

fn options(nqn: &str, listen: SocketAddr, hosts: &[&str]) -> SubsystemOptions {
    SubsystemOptions {
        nqn: nqn.into(),
        listen,
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        allow_any_host: false,
        serial: "vol0".into(),
        nguid: stable_nguid(nqn),
        read_only: false,
    }
}

fn host(nqn: &str, digests: Digests) -> HostConfig {
    HostConfig {
        hostnqn: nqn.into(),
        host_id: [nqn.len() as u8; 16],
        digests,
        kato_ms: 0,
        timeout: LONG,
    }
}

fn connect(addr: SocketAddr, cfg: &HostConfig, queues: u16) -> Controller {
    let mut c = Controller::connect(addr, NQN, cfg).unwrap();
    let n = (queues - 1) as u32;
    let granted = c.set_features(0x07, n | n << 16).unwrap();
    assert!(granted & 0xffff >= n, "granted {granted:#x}");
    c
}

fn rw(op: u8, slba: u64, blocks: u32) -> Sqe {
    let mut s = Sqe::new(op, 1);
    s.set_range(slba, blocks);
    s
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = rand::rngs::SmallRng::seed_from_u64(seed);
    (0..len).map(|_| r.gen()).collect()
}

/// Writes of every size class (in the capsule, one R2T, the largest
/// transfer) pipelined `depth` deep, then read back and compared.
fn verify_queue(q: &mut Queue, seed: u64, first_block: u64, depth: usize) {
    let sizes = [1u32, 2, 8, 16, 32, 3, 1, 32];
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut written = Vec::new();
    let mut at = first_block;
    for round in 0..4 {
        let mut batch = Vec::new();
        for k in 0..depth {
            let blocks = sizes[rng.gen_range(0..sizes.len())];
            let data = pattern(
                seed * 1000 + round * 100 + k as u64,
                blocks as usize * BS as usize,
            );
            q.send(rw(cmd::WRITE, at, blocks), &data, 0).unwrap();
            batch.push((at, data));
            at += blocks as u64;
        }
        for _ in 0..depth {
            let r = q.recv().unwrap();
            assert_eq!(r.status(), Status::SUCCESS);
        }
        written.extend(batch);
    }
    for chunk in written.chunks(depth) {
        let mut cids = Vec::new();
        for (slba, data) in chunk {
            let cid = q
                .send(
                    rw(cmd::READ, *slba, (data.len() / BS as usize) as u32),
                    &[],
                    data.len(),
                )
                .unwrap();
            cids.push((cid, data));
        }
        for _ in 0..chunk.len() {
            let r = q.recv().unwrap();
            assert_eq!(r.status(), Status::SUCCESS);
            let (_, want) = cids
                .iter()
                .find(|(cid, _)| *cid == r.cqe.cid())
                .expect("a reply for a command sent");
            assert!(r.data == **want, "read back differs");
        }
    }
}

#[test]
fn two_hosts_with_two_queues_each_read_back_what_they_wrote() {
    let r = rig(&[HOST_A, HOST_B]);
    let mut threads = Vec::new();
    for (h, nqn) in [HOST_A, HOST_B].into_iter().enumerate() {
        let addr = r.addr;
        // One host with both digests, the other with none.
        let d = Digests {
            header: h == 0,
            data: h == 0,
        };
        threads.push(std::thread::spawn(move || {
            let c = connect(addr, &host(nqn, d), 2);
            let mut qs: Vec<Queue> = (1..=2).map(|qid| c.io_queue(qid, 32).unwrap()).collect();
            let mut inner = Vec::new();
            for (i, mut q) in qs.drain(..).enumerate() {
                let region = (h as u64 * 2 + i as u64) * 4096;
                inner.push(std::thread::spawn(move || {
                    verify_queue(&mut q, region + 1, region, 16)
                }));
            }
            for t in inner {
                t.join().unwrap();
            }
            c
        }));
    }
    let ctrls: Vec<Controller> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // Two controllers with different IDs in one subsystem.
    assert_ne!(ctrls[0].cntlid, ctrls[1].cntlid);
    // Another association of the second host sees the first one's data
    // (one namespace).
    let mut c = connect(r.addr, &host(HOST_B, Digests::default()), 1);
    let mut q = c.io_queue(1, 8).unwrap();
    let read = q.exec(rw(cmd::READ, 0, 1), &[], 4096).unwrap();
    assert!(
        read.data.iter().any(|&b| b != 0),
        "host A's first block is not zero"
    );
    let smart = c.log_page(0x02, 512, 0).unwrap();
    let field = |at: usize| u128::from_le_bytes(smart[at..at + 16].try_into().unwrap());
    assert!(field(64) >= 1, "SMART host read commands {}", field(64));
    // Data units (thousands of 512-byte units), rounded up: both hosts
    // wrote, and this one read a block.
    assert!(field(32) >= 1, "SMART data units read {}", field(32));
    assert!(field(48) >= 1, "SMART data units written {}", field(48));
    assert!(field(80) >= 1, "SMART host write commands {}", field(80));
}

#[test]
fn identify_describes_the_volume_and_is_stable() {
    let r = rig(&[HOST_A]);
    let mut c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    let id = &c.id;
    assert_eq!(u16::from_le_bytes([id[78], id[79]]), c.cntlid);
    assert_eq!(id[111], 1, "an IO controller");
    assert_ne!(u16::from_le_bytes([id[320], id[321]]), 0, "KAS");
    assert_eq!(u16::from_le_bytes([id[1800], id[1801]]), 0, "ICDOFF");
    let subnqn = String::from_utf8_lossy(&id[768..768 + NQN.len()]);
    assert_eq!(subnqn, NQN);
    let ns = c.identify(0x00, 1).unwrap();
    assert_eq!(u64::from_le_bytes(ns[0..8].try_into().unwrap()), BLOCKS);
    assert_eq!(ns[130], 12, "4 KiB blocks");
    assert_eq!(&ns[104..120], &stable_nguid(NQN));
    let list = c.identify(0x02, 0).unwrap();
    assert_eq!(u32::from_le_bytes(list[0..4].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(list[4..8].try_into().unwrap()), 0);
    let desc = c.identify(0x03, 1).unwrap();
    assert_eq!((desc[0], desc[1]), (2, 16));
    assert_eq!(&desc[4..20], &stable_nguid(NQN));
    // No namespace 2; an unknown CNS is an invalid field.
    let e = c.identify(0x00, 2).unwrap_err();
    assert!(
        matches!(
            e,
            HostError::Status {
                status: Status::INVALID_NAMESPACE,
                ..
            }
        ),
        "{e}"
    );
    // The active namespace list from FFFFFFFEh or FFFFFFFFh: Invalid
    // Namespace or Format, as the base specification says (from an audit:
    // it was an invalid field).
    for nsid in [0xffff_fffe, 0xffff_ffff] {
        let e = c.identify(0x02, nsid).unwrap_err();
        assert!(
            matches!(
                e,
                HostError::Status {
                    status: Status::INVALID_NAMESPACE,
                    ..
                }
            ),
            "{e}"
        );
    }
    let e = c.identify(0x1f, 0).unwrap_err();
    assert!(
        matches!(
            e,
            HostError::Status {
                status: Status::INVALID_FIELD,
                ..
            }
        ),
        "{e}"
    );
    // The NGUID of an NQN never changes between releases (computed
    // independently: CRC32C with the four seeds, RFC 9562 version 8).
    let hex: String = stable_nguid(NQN)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(hex, "b18033f8ea818b5f8001284372b6918c");
    assert_ne!(
        stable_nguid(NQN),
        stable_nguid("nqn.2026-12.io.appliance:vol1")
    );
    drop(r.volume);
}

#[test]
fn io_outside_the_namespace_or_malformed_gets_the_specified_status() {
    let r = rig(&[HOST_A]);
    let c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    let mut q = c.io_queue(1, 16).unwrap();
    let expect = |q: &mut Queue, s: Sqe, write: &[u8], read: usize, want: Status| {
        let opcode = s.opcode();
        match q.exec(s, write, read) {
            Err(HostError::Status { status, .. }) => assert_eq!(status, want, "opcode {opcode:#x}"),
            other => panic!("opcode {opcode:#x}: {other:?}"),
        }
    };
    expect(
        &mut q,
        rw(cmd::READ, BLOCKS, 1),
        &[],
        4096,
        Status::LBA_OUT_OF_RANGE,
    );
    // Half of a fused pair (Identify says FUSES 0): from review, it ran
    // as a plain write.
    for fuse in [1u32, 2] {
        let mut s = rw(cmd::WRITE, 0, 1);
        s.cdw0 |= fuse << 8;
        expect(&mut q, s, &[0u8; 4096], 0, Status::INVALID_FIELD);
    }
    expect(
        &mut q,
        rw(cmd::READ, BLOCKS - 1, 2),
        &[],
        8192,
        Status::LBA_OUT_OF_RANGE,
    );
    expect(
        &mut q,
        rw(cmd::READ, u64::MAX, 1),
        &[],
        4096,
        Status::LBA_OUT_OF_RANGE,
    );
    let mut s = rw(cmd::READ, 0, 1);
    s.nsid = 7;
    expect(&mut q, s, &[], 4096, Status::INVALID_NAMESPACE);
    // The buffer does not match the block count.
    expect(&mut q, rw(cmd::READ, 0, 2), &[], 4096, status::SGL_LENGTH);
    // More than MDTS.
    expect(
        &mut q,
        rw(cmd::READ, 0, 64),
        &[],
        64 * 4096,
        Status::INVALID_FIELD,
    );
    expect(&mut q, Sqe::new(0x7e, 1), &[], 0, Status::INVALID_OPCODE);
    // From an audit: in-capsule data past what Identify says (IOCCSZ, 8
    // KiB) was taken, up to 128 KiB a command, and held outside the
    // connection's data budget while it waited.
    q.set_in_capsule(128 << 10);
    expect(
        &mut q,
        rw(cmd::WRITE, 0, 32),
        &[0u8; 128 << 10],
        0,
        status::SGL_LENGTH,
    );
    q.set_in_capsule(8192);
    q.exec(rw(cmd::WRITE, 0, 2), &[0u8; 8192], 0).unwrap();
    // Write zeroes and deallocate, then the blocks read back as zero.
    let ones = vec![0xa5u8; 8192];
    q.exec(rw(cmd::WRITE, 100, 2), &ones, 0).unwrap();
    let mut wz = rw(cmd::WRITE_ZEROES, 100, 1);
    wz.cdw[2] &= !0xffff;
    q.exec(wz, &[], 0).unwrap();
    let back = q.exec(rw(cmd::READ, 100, 2), &[], 8192).unwrap().data;
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert!(back[4096..].iter().all(|&b| b == 0xa5));
    let mut ranges = vec![0u8; 16];
    ranges[4..8].copy_from_slice(&1u32.to_le_bytes());
    ranges[8..16].copy_from_slice(&101u64.to_le_bytes());
    let mut dsm = Sqe::new(cmd::DSM, 1);
    dsm.cdw[1] = cmd::DSM_AD;
    q.exec(dsm, &ranges, 0).unwrap();
    // As Linux sends it: one range in a whole 4 KiB page.
    let mut page = ranges.clone();
    page[8..16].copy_from_slice(&100u64.to_le_bytes());
    page.resize(4096, 0xee);
    let mut dsm = Sqe::new(cmd::DSM, 1);
    dsm.cdw[1] = cmd::DSM_AD;
    q.exec(dsm, &page, 0).unwrap();
    let back = q.exec(rw(cmd::READ, 100, 2), &[], 8192).unwrap().data;
    assert!(
        back.iter().all(|&b| b == 0),
        "deallocated blocks of a RAM device read zero"
    );
    let mut bad = ranges.clone();
    bad[8..16].copy_from_slice(&BLOCKS.to_le_bytes());
    let mut dsm = Sqe::new(cmd::DSM, 1);
    dsm.cdw[1] = cmd::DSM_AD;
    expect(&mut q, dsm, &bad, 0, Status::LBA_OUT_OF_RANGE);
    q.exec(Sqe::new(cmd::FLUSH, 1), &[], 0).unwrap();
    // The queue still serves.
    q.exec(rw(cmd::READ, 0, 1), &[], 4096).unwrap();
}

#[test]
fn discovery_lists_only_what_the_host_may_use_and_others_are_refused() {
    let r = rig(&[HOST_A]);
    let listen = r.addr;
    r.target
        .add(
            &r.volume,
            options("nqn.2026-12.io.appliance:other", listen, &[HOST_B]),
        )
        .unwrap();
    // A keep-alive of 10 minutes asked for is held to 2, and Get Features
    // says so.
    let cfg = HostConfig {
        kato_ms: 600_000,
        ..host(HOST_A, Digests::default())
    };
    let mut d = Controller::connect(r.addr, capsule::DISCOVERY_NQN, &cfg).unwrap();
    assert_eq!(d.id[111], 2, "a discovery controller");
    let mut get = Sqe::new(0x0a, 0);
    get.cdw[0] = 0x0f;
    assert_eq!(d.admin.exec(get, &[], 0).unwrap().cqe.result, 120_000);
    let head = d.log_page(0x70, 1024, 0).unwrap();
    let numrec = u64::from_le_bytes(head[8..16].try_into().unwrap());
    assert_eq!(numrec, 1);
    let log = d.log_page(0x70, 2048, 0).unwrap();
    let e = &log[1024..];
    assert_eq!((e[0], e[1], e[2]), (3, 1, 2), "TCP, IPv4, NVMe subsystem");
    let subnqn = String::from_utf8_lossy(&e[256..256 + NQN.len()]).to_string();
    assert_eq!(subnqn, NQN);
    let port = String::from_utf8_lossy(&e[32..64])
        .trim()
        .trim_end_matches('\0')
        .to_string();
    assert_eq!(port, r.addr.port().to_string());
    // libnvme's newer way: a 20-byte header, entries from offset 1024.
    let small = d.log_page(0x70, 20, 0).unwrap();
    assert_eq!(&small[..16], &head[..16]);
    let entries = d.log_page(0x70, 1024, 1024).unwrap();
    assert_eq!(entries, log[1024..]);
    // A host not on the list is refused; an unknown subsystem too.
    match Controller::connect(r.addr, NQN, &host(HOST_B, Digests::default())) {
        Err(HostError::Status { status: s, .. }) => assert_eq!(s, status::CONNECT_HOST),
        other => panic!("{:?}", other.map(|_| ())),
    }
    match Controller::connect(
        r.addr,
        "nqn.2026-12.io.appliance:none",
        &host(HOST_A, Digests::default()),
    ) {
        Err(HostError::Status {
            status: s, result, ..
        }) => {
            assert_eq!(s, status::CONNECT_INVALID);
            assert_eq!(result, 1 << 16 | 256, "IATTR data, IPO SUBNQN");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    // The discovery controller has no IO queues.
    assert!(d.io_queue(1, 8).is_err());
    // A log read of 4 GiB is refused, not allocated; the controller serves on.
    let mut huge = Sqe::new(0x02, 0);
    huge.cdw[0] = 0x70 | 0xfffe << 16;
    huge.cdw[1] = 0x3fff;
    capsule::set_data_pointer(&mut huge, false, 0xffff_fffc);
    match d.admin.exec(huge, &[], 0) {
        Err(HostError::Status { status: s, .. }) => assert_eq!(s, status::SGL_LENGTH),
        other => panic!("{:?}", other.map(|r| r.cqe)),
    }
    assert_eq!(d.log_page(0x70, 1024, 0).unwrap()[..16], head[..16]);
}

/// From an audit: a discovery controller took the asynchronous event
/// configuration and said it holds four requests, then refused every
/// request at once; SPDK's host sends a refused one again at once, for as
/// long as it stays connected. It is held, as on an IO controller.
#[test]
fn a_discovery_controller_holds_asynchronous_event_requests() {
    let r = rig(&[HOST_A]);
    let mut d = Controller::connect(
        r.addr,
        capsule::DISCOVERY_NQN,
        &host(HOST_A, Digests::default()),
    )
    .unwrap();
    d.set_features(0x0b, 1 << 31).unwrap();
    let aer = d.admin.send(Sqe::new(0x0c, 0), &[], 0).unwrap();
    // Commands are taken in order: the next answer is the keep-alive's.
    let ka = d.admin.send(Sqe::new(0x18, 0), &[], 0).unwrap();
    let reply = d.admin.recv().unwrap();
    assert_eq!(reply.cqe.cid(), ka, "the event request {aer} was answered");
    assert_eq!(reply.status(), Status::SUCCESS);
}

/// From an audit: a refused Connect left its connection waiting for
/// another, so a peer with no allowed host NQN sent thousands in one
/// write, each a warning written out by the reactor. The connection ends
/// with the first refusal now.
#[test]
fn a_refused_connect_ends_its_connection() {
    let r = rig(&[HOST_A]);
    let mut s = raw(r.addr, true);
    let mut b = Vec::new();
    for cid in 0..100u16 {
        let mut sqe = capsule::fabrics_sqe(capsule::fctype::CONNECT);
        sqe.set_cid(cid);
        capsule::Connect {
            recfmt: 0,
            qid: 0,
            sqsize: 31,
            cattr: 0,
            kato: 0,
        }
        .to_sqe(&mut sqe);
        let data = capsule::ConnectData {
            host_id: [7; 16],
            cntlid: 0xffff,
            subnqn: NQN.into(),
            hostnqn: HOST_B.into(),
        }
        .encode();
        capsule::set_data_pointer(&mut sqe, true, data.len() as u32);
        pdu::encode_command(
            &capsule::sqe_bytes(&sqe),
            &data,
            Digests::default(),
            0,
            &mut b,
        );
    }
    s.write_all(&b).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let rx = Receiver {
        controller: false,
        digests: Digests::default(),
        max_data: 1 << 20,
    };
    let mut answers = Vec::new();
    let mut at = 0;
    while let Some((p, n)) = pdu::parse(&got[at..], &rx).unwrap() {
        match p {
            Pdu::Response(c) => answers.push(capsule::cqe_from(&c).code()),
            other => panic!("{other:?}"),
        }
        at += n;
    }
    assert_eq!(at, got.len());
    assert_eq!(
        answers,
        vec![status::CONNECT_HOST],
        "one answer, then the close"
    );
    // The host that may connect still does.
    connect(r.addr, &host(HOST_A, Digests::default()), 1);
}

#[test]
fn a_wildcard_listener_names_the_address_the_host_reached() {
    let r = rig(&[HOST_A]);
    let any = r
        .target
        .add(
            &r.volume,
            options(
                "nqn.2026-12.io.appliance:any",
                "0.0.0.0:0".parse().unwrap(),
                &[HOST_A],
            ),
        )
        .unwrap()
        .opts
        .listen;
    let reach: SocketAddr = format!("127.0.0.1:{}", any.port()).parse().unwrap();
    let mut d = Controller::connect(
        reach,
        capsule::DISCOVERY_NQN,
        &host(HOST_A, Digests::default()),
    )
    .unwrap();
    let log = d.log_page(0x70, 2048, 0).unwrap();
    let traddr = String::from_utf8_lossy(&log[1024 + 512..1024 + 768])
        .trim()
        .trim_end_matches('\0')
        .to_string();
    assert_eq!(traddr, "127.0.0.1");
    // From an audit: through a dual-stack listener ([::]) an IPv4 host was
    // told the IPv6 family and "::ffff:127.0.0.1".
    let Ok(dual) = r.target.add(
        &r.volume,
        options(
            "nqn.2026-12.io.appliance:dual",
            "[::]:0".parse().unwrap(),
            &[HOST_A],
        ),
    ) else {
        // (A machine without IPv6 has no such listener.)
        return;
    };
    let reach: SocketAddr = format!("127.0.0.1:{}", dual.opts.listen.port())
        .parse()
        .unwrap();
    // (With net.ipv6.bindv6only set, [::] takes no IPv4 host.)
    let Ok(mut d) = Controller::connect(
        reach,
        capsule::DISCOVERY_NQN,
        &host(HOST_A, Digests::default()),
    ) else {
        return;
    };
    let log = d.log_page(0x70, 1024 * 4, 0).unwrap();
    let numrec = u64::from_le_bytes(log[8..16].try_into().unwrap()) as usize;
    assert!(numrec >= 1);
    for k in 1..=numrec {
        let e = &log[1024 * k..1024 * (k + 1)];
        let traddr = String::from_utf8_lossy(&e[512..768])
            .trim()
            .trim_end_matches('\0')
            .to_string();
        assert_eq!((e[1], traddr.as_str()), (1, "127.0.0.1"), "entry {k}");
    }
}

#[test]
fn keep_alive_keeps_the_association_and_its_expiry_ends_it() {
    let r = rig(&[HOST_A]);
    let mut cfg = host(HOST_A, Digests::default());
    cfg.kato_ms = 1500;
    let mut live = connect(r.addr, &cfg, 1);
    let mut lq = live.io_queue(1, 8).unwrap();
    let mut idle = connect(r.addr, &cfg, 1);
    let mut iq = idle.io_queue(1, 8).unwrap();
    // The live host keeps alive for twice the timeout.
    let until = Instant::now() + Duration::from_millis(3000);
    while Instant::now() < until {
        live.keep_alive().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    lq.exec(rw(cmd::READ, 0, 1), &[], 4096).unwrap();
    // The idle one's association is gone: its IO queue closes too.
    let deadline = Instant::now() + LONG;
    loop {
        match iq.exec(rw(cmd::READ, 0, 1), &[], 4096) {
            Err(HostError::Io(_)) => break,
            Err(e) => panic!("{e}"),
            Ok(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "the expired association's IO queue still serves"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(idle.keep_alive().is_err());
    assert_eq!(
        r.target.get(NQN).unwrap().controllers().len(),
        1,
        "only the live controller is left"
    );
}

#[test]
fn a_resize_completes_a_held_asynchronous_event_request() {
    let r = rig(&[HOST_A]);
    let mut c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    c.set_features(0x0b, 1 << 8).unwrap();
    let aer = c.admin.send(Sqe::new(0x0c, 0), &[], 0).unwrap();
    let grown = BLOCKS * 2;
    r.volume
        .quiesce()
        .reconfigure(LONG, |cur: &VolumeConfig| {
            let dev = cur.device.resized(grown).map_err(|e| e.to_string())?;
            Ok::<_, String>((VolumeConfig::plain(dev), ()))
        })
        .unwrap();
    let reply = c.admin.recv().unwrap();
    assert_eq!(reply.cqe.cid(), aer);
    assert_eq!(
        reply.cqe.result, 0x0004_0002,
        "notice: namespace attribute changed, log 0x04"
    );
    let log = c.log_page(0x04, 4096, 0).unwrap();
    assert_eq!(u32::from_le_bytes(log[0..4].try_into().unwrap()), 1);
    let again = c.log_page(0x04, 4096, 0).unwrap();
    assert!(again.iter().all(|&b| b == 0), "reading the log clears it");
    let ns = c.identify(0x00, 1).unwrap();
    assert_eq!(u64::from_le_bytes(ns[0..8].try_into().unwrap()), grown);
    let mut q = c.io_queue(1, 8).unwrap();
    let data = pattern(9, 4096);
    q.exec(rw(cmd::WRITE, grown - 1, 1), &data, 0).unwrap();
    assert_eq!(
        q.exec(rw(cmd::READ, grown - 1, 1), &[], 4096).unwrap().data,
        data
    );
}

#[test]
fn io_goes_on_across_suspends_and_deleting_the_export_closes_its_queues() {
    let r = rig(&[HOST_A]);
    let c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    let mut q = c.io_queue(1, 32).unwrap();
    let writer = std::thread::spawn(move || {
        verify_queue(&mut q, 77, 0, 16);
        q
    });
    // Reconfigurations drain the queue's IO and let it go on.
    let mut suspends = 0;
    while !writer.is_finished() && suspends < 200 {
        let g = r.volume.suspend(LONG).unwrap();
        drop(g);
        suspends += 1;
    }
    let mut q = writer.join().unwrap();
    r.target.remove(NQN).unwrap();
    assert_eq!(r.target.get(NQN).map(|s| s.connections()), None);
    match q.exec(rw(cmd::READ, 0, 1), &[], 4096) {
        Err(HostError::Io(_)) => {}
        other => panic!("{:?}", other.map(|r| r.cqe)),
    }
    assert!(Controller::connect(r.addr, NQN, &host(HOST_A, Digests::default())).is_err());
}

/// Read one PDU from a raw socket.
fn read_pdu(s: &mut TcpStream, digests: Digests) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let r = Receiver {
        controller: false,
        digests,
        max_data: 1 << 20,
    };
    let deadline = Instant::now() + LONG;
    loop {
        if let Ok(Some((_, n))) = pdu::parse(&buf, &r) {
            buf.truncate(n);
            return Some(buf);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if Instant::now() > deadline {
            return None;
        }
    }
}

/// An ICReq asking for `digests`.
fn ic_req(digests: Digests) -> Vec<u8> {
    let mut b = Vec::new();
    pdu::encode_ic_req(
        &pdu::IcReq {
            pfv: 0,
            hpda: 0,
            digests,
            maxr2t: 0,
        },
        &mut b,
    );
    b
}

fn raw(addr: SocketAddr, ic: bool) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    if ic {
        s.write_all(&ic_req(Digests::default())).unwrap();
        let p = read_pdu(&mut s, Digests::default()).unwrap();
        assert_eq!(p[0], pdu::kind::IC_RESP);
    }
    s
}

/// What the target does with the bytes: a termination request (its FES)
/// followed by the close, or a response (its status).
fn outcome(s: &mut TcpStream) -> Result<Status, u16> {
    let p = read_pdu(s, Digests::default()).expect("an answer before the close");
    let r = Receiver {
        controller: false,
        digests: Digests::default(),
        max_data: 1 << 20,
    };
    match pdu::parse(&p, &r).unwrap().unwrap().0 {
        Pdu::Term { fes, .. } => {
            let mut rest = [0u8; 16];
            assert_eq!(
                s.read(&mut rest).unwrap_or(0),
                0,
                "closed after the termination request"
            );
            Err(fes)
        }
        Pdu::Response(c) => Ok(capsule::cqe_from(&c).code()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn hostile_pdus_cost_only_their_own_connection() {
    let r = rig(&[HOST_A]);
    let c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    let mut good = c.io_queue(1, 16).unwrap();
    let data = pattern(5, 8192);
    good.exec(rw(cmd::WRITE, 10, 2), &data, 0).unwrap();

    // A command before ICReq.
    let mut s = raw(r.addr, false);
    let mut b = Vec::new();
    pdu::encode_command(&[0u8; 64], &[], Digests::default(), 0, &mut b);
    s.write_all(&b).unwrap();
    assert_eq!(outcome(&mut s), Err(pdu::fes::SEQUENCE));

    // An unknown PDU type, a wrong header length, a huge length.
    for ch in [
        [0x42u8, 0, 8, 0, 8, 0, 0, 0],
        [pdu::kind::COMMAND, 0, 40, 0, 40, 0, 0, 0],
        [pdu::kind::COMMAND, 0, 72, 72, 0xff, 0xff, 0xff, 0xff],
    ] {
        let mut s = raw(r.addr, true);
        s.write_all(&ch).unwrap();
        let fes = outcome(&mut s).unwrap_err();
        assert!(
            matches!(fes, pdu::fes::INVALID_HEADER | pdu::fes::DATA_LIMIT),
            "{fes}"
        );
    }

    // A header digest the connection did not negotiate... and a wrong one
    // where it did.
    let mut s = raw(r.addr, true);
    b.clear();
    pdu::encode_command(
        &[0u8; 64],
        &[],
        Digests {
            header: true,
            data: false,
        },
        0,
        &mut b,
    );
    s.write_all(&b).unwrap();
    assert_eq!(outcome(&mut s), Err(pdu::fes::INVALID_HEADER));
    let mut s = TcpStream::connect(r.addr).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    let dg = Digests {
        header: true,
        data: true,
    };
    s.write_all(&ic_req(dg)).unwrap();
    read_pdu(&mut s, Digests::default()).unwrap();
    b.clear();
    pdu::encode_command(&[0u8; 64], &[], dg, 0, &mut b);
    b[20] ^= 1;
    s.write_all(&b).unwrap();
    let p = read_pdu(&mut s, dg).unwrap();
    assert_eq!(p[0], pdu::kind::C2H_TERM);

    // Commands before Connect get a status and the connection goes on.
    let mut s = raw(r.addr, true);
    b.clear();
    let sq = capsule::sqe_bytes(&rw(cmd::READ, 0, 1));
    pdu::encode_command(&sq, &[], Digests::default(), 0, &mut b);
    s.write_all(&b).unwrap();
    assert_eq!(outcome(&mut s), Ok(Status::COMMAND_SEQUENCE));

    // An H2CData for a transfer nobody asked for.
    assert!(c.io_queue(1, 8).is_err(), "queue 1 is taken");
    let mut s = raw(r.addr, true);
    b.clear();
    let h = pdu::DataHeader {
        cccid: 1,
        ttag: 3,
        offset: 0,
        length: 16,
        last: true,
        success: false,
    };
    pdu::encode_data(true, &h, &[0u8; 16], Digests::default(), 0, &mut b);
    s.write_all(&b).unwrap();
    assert!(outcome(&mut s).is_err());

    // Random bytes after a good handshake, many times: never a panic.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    for _ in 0..50 {
        let mut s = raw(r.addr, true);
        let len = rng.gen_range(1..600);
        let mut junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        junk[0] = [pdu::kind::COMMAND, pdu::kind::H2C_DATA, pdu::kind::IC_REQ][rng.gen_range(0..3)];
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }

    // The good connection never noticed.
    assert_eq!(
        good.exec(rw(cmd::READ, 10, 2), &[], 8192).unwrap().data,
        data
    );
}

/// A volume's IO limits hold for its NVMe/TCP hosts too.
#[test]
fn the_volumes_io_limits_hold_over_nvme_tcp() {
    let r = rig(&[HOST_A]);
    r.volume.init_qos(appliance::qos::QosLimits {
        read_iops: 200,
        ..Default::default()
    });
    let c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    let mut q = c.io_queue(1, 16).unwrap();
    let t = Instant::now();
    let reads = 600u64;
    for batch in 0..reads / 8 {
        for k in 0..8 {
            q.send(rw(cmd::READ, batch * 8 + k, 1), &[], 4096).unwrap();
        }
        for _ in 0..8 {
            assert_eq!(q.recv().unwrap().status(), Status::SUCCESS);
        }
    }
    // 600 reads at 200/s: at least 2 s even with a second's burst.
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "{reads} reads in {took:?} under a 200/s limit"
    );
}

/// A listener keeps at most its connection limit open: more peers are
/// closed as they come, and a freed place is taken again.
#[test]
fn a_listener_keeps_at_most_its_connection_limit() {
    let r = rig(&[HOST_A]);
    r.target.set_max_connections(3);
    let mut held: Vec<TcpStream> = (0..3).map(|_| raw(r.addr, true)).collect();
    let mut extra = TcpStream::connect(r.addr).unwrap();
    extra.set_read_timeout(Some(LONG)).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(extra.read(&mut b).unwrap_or(0), 0, "the fourth is closed");
    // One goes; its place is free again once the target has seen it go.
    drop(held.pop());
    let deadline = Instant::now() + LONG;
    loop {
        let mut s = TcpStream::connect(r.addr).unwrap();
        s.set_read_timeout(Some(LONG)).unwrap();
        let _ = s.write_all(&ic_req(Digests::default()));
        if read_pdu(&mut s, Digests::default()).is_some_and(|p| p[0] == pdu::kind::IC_RESP) {
            break;
        }
        assert!(Instant::now() < deadline, "the freed place was never taken");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The connections held are untouched.
    for s in &mut held {
        let mut b = Vec::new();
        pdu::encode_command(
            &capsule::sqe_bytes(&rw(cmd::READ, 0, 1)),
            &[],
            Digests::default(),
            0,
            &mut b,
        );
        s.write_all(&b).unwrap();
        assert_eq!(outcome(s), Ok(Status::COMMAND_SEQUENCE));
    }
}

/// One host holds at most three quarters of a listener's connections:
/// one that opens them all (and idles in the handshake) does not keep the
/// other hosts out.
#[test]
fn one_host_cannot_take_every_connection_of_a_listener() {
    let r = rig(&[HOST_A]);
    r.target.set_max_connections(8);
    let held: Vec<TcpStream> = (0..6).map(|_| raw(r.addr, true)).collect();
    // The seventh from the same host gets no answer: it is closed.
    let mut extra = TcpStream::connect(r.addr).unwrap();
    extra.set_read_timeout(Some(LONG)).unwrap();
    let _ = extra.write_all(&ic_req(Digests::default()));
    assert!(
        read_pdu(&mut extra, Digests::default()).is_none(),
        "the seventh was taken"
    );
    // Another host still gets in.
    let mut other = common::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), r.addr);
    other.set_read_timeout(Some(LONG)).unwrap();
    other.write_all(&ic_req(Digests::default())).unwrap();
    let p = read_pdu(&mut other, Digests::default()).expect("an answer");
    assert_eq!(p[0], pdu::kind::IC_RESP);
    drop(held);
}

/// A Get Log Page of the discovery log, `len` bytes of answer.
fn discovery_log(len: usize) -> Sqe {
    let mut s = Sqe::new(capsule::admin::GET_LOG_PAGE, 0);
    let numd = (len / 4 - 1) as u32;
    s.cdw[0] = 0x70 | (numd & 0xffff) << 16;
    s.cdw[1] = numd >> 16;
    capsule::set_data_pointer(&mut s, false, len as u32);
    s
}

/// The process's resident memory, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap();
    kib << 10
}

/// From review: the target checked its output limit once per poll, then
/// answered every command of up to 1 MiB of input. A host (any host: the
/// discovery controller takes everyone) that sends thousands of 256 KiB
/// Get Log Page commands and never reads made it queue gigabytes on a
/// reactor. It now stops reading commands while its output is full.
#[test]
fn a_host_that_never_reads_cannot_make_the_target_buffer_without_bound() {
    let r = rig(&[HOST_A]);
    let c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    let mut good = c.io_queue(1, 16).unwrap();
    let cfg = host(
        "nqn.2014-08.org.nvmexpress:uuid:cccccccc-0000-0000-0000-000000000003",
        Digests::default(),
    );
    let mut q = Queue::open(r.addr, &cfg).unwrap();
    q.connect(0, 31, 0xffff, capsule::DISCOVERY_NQN, &cfg)
        .unwrap();
    let before = rss();
    // 2,000 commands, 500 MiB of answers; none read.
    const LEN: usize = 256 << 10;
    for _ in 0..2000 {
        // No buffer for the answer on our side (500 MiB of them would
        // count in the same process's RSS).
        q.send(discovery_log(LEN), &[], 0).unwrap();
    }
    q.flush().unwrap();
    // The target answers what fits in its output and the socket, then
    // waits for the host; watch it for a while.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let grown = rss().saturating_sub(before);
        assert!(grown < 128 << 20, "the target buffered {} MiB", grown >> 20);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Other hosts are served meanwhile.
    let data = pattern(9, 4096);
    good.exec(rw(cmd::WRITE, 3, 1), &data, 0).unwrap();
    assert_eq!(
        good.exec(rw(cmd::READ, 3, 1), &[], 4096).unwrap().data,
        data
    );
    drop(q);
}

/// A device whose every request times out (a controller that stopped
/// answering, its requests aborted).
struct TimingOut(bdev::DeviceInfo);

struct TimingOutChannel(Vec<u64>);

impl BlockDevice for TimingOut {
    fn info(&self) -> &bdev::DeviceInfo {
        &self.0
    }
    fn open_channel(&self) -> Result<Box<dyn bdev::IoChannel>, bdev::BdevError> {
        Ok(Box::new(TimingOutChannel(Vec::new())))
    }
}

impl bdev::IoChannel for TimingOutChannel {
    fn submit(&mut self, req: bdev::IoRequest) -> Result<(), bdev::SubmitError> {
        self.0.push(req.tag);
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<bdev::Completion>) -> usize {
        let n = self.0.len();
        out.extend(self.0.drain(..).map(|tag| bdev::Completion {
            tag,
            result: Err(bdev::IoError::TimedOut),
        }));
        n
    }
    fn inflight(&self) -> usize {
        self.0.len()
    }
}

/// From an audit: every volume failure was a media error with Do Not
/// Retry, so a device that timed out (a remote member's target
/// restarting, a controller reset) told the host never to retry. It is
/// Namespace Not Ready, which a host retries; a device failed for good is
/// still a media error.
#[test]
fn a_volume_whose_device_timed_out_answers_a_retryable_status() {
    let info = RamDevice::new("d", BS as u32, BLOCKS)
        .unwrap()
        .info()
        .clone();
    let r = rig_on(&[HOST_A], Arc::new(TimingOut(info)));
    let c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    let mut q = c.io_queue(1, 16).unwrap();
    match q.exec(rw(cmd::READ, 0, 1), &[], 4096) {
        Err(HostError::Status { status, .. }) => assert_eq!(status, status::NS_NOT_READY),
        other => panic!("{other:?}"),
    }
    let cqe = capsule::completion(1, 1, 0, 0, status::NS_NOT_READY);
    assert_eq!(cqe.status >> 31, 0, "Do Not Retry is clear");
    let cqe = capsule::completion(1, 1, 0, 0, Status::UNRECOVERED_READ);
    assert_eq!(cqe.status >> 31, 1, "a media error is not retried");
}

/// From an audit: an IO queue's read gave its data budget back once its
/// data was queued for sending, not once sent, so deferred reads went on
/// starting while the host read nothing: 1,023 reads of 128 KiB made the
/// target hold 128 MiB for one queue. Deferred commands start only while
/// the output is below its mark.
#[test]
fn an_io_queue_whose_host_never_reads_holds_a_bounded_amount_of_read_data() {
    let r = rig(&[HOST_A]);
    let c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    let mut q = c.io_queue(1, 1024).unwrap();
    let before = rss();
    const BLOCKS_PER: u32 = 32;
    for i in 0..1023u64 {
        let mut s = rw(
            cmd::READ,
            (i * BLOCKS_PER as u64) % (BLOCKS - 32),
            BLOCKS_PER,
        );
        capsule::set_data_pointer(&mut s, false, BLOCKS_PER * BS as u32);
        q.send(s, &[], 0).unwrap();
    }
    q.flush().unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let grown = rss().saturating_sub(before);
        assert!(grown < 48 << 20, "the target buffered {} MiB", grown >> 20);
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(q);
}

/// From an audit: a host that stops reading left its connection with
/// output the socket had no room for, and the connection asked to be
/// polled again on every loop: its reactor never slept again, a core busy
/// for as long as the host stayed connected. It now waits for room in
/// the reactor's sleep: the reactors stay off the CPU, window after
/// window.
#[test]
fn a_host_that_stops_reading_does_not_keep_its_reactor_busy() {
    let r = rig(&[HOST_A]);
    let c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    let mut q = c.io_queue(1, 1024).unwrap();
    // 128 MiB asked for: far more than the sockets' buffers take.
    for i in 0..1023u64 {
        let mut s = rw(cmd::READ, (i * 32) % (BLOCKS - 32), 32);
        capsule::set_data_pointer(&mut s, false, 32 * BS as u32);
        q.send(s, &[], 32 * BS as usize).unwrap();
    }
    q.flush().unwrap();
    // Three windows in a row in which no reactor thread ran a third of
    // the time (the output fills within the first; from then on the old
    // code ran all of it, or as much as the machine gave it). Time on the
    // CPU, as the kernel counts it: a sleep that returns at once costs it
    // too (review: time counted busy by the reactor does not).
    const WINDOW: Duration = Duration::from_millis(500);
    let t = Instant::now();
    let mut in_a_row = 0;
    while in_a_row < 3 {
        let before = reactors_on_cpu();
        std::thread::sleep(WINDOW);
        let ran = reactors_on_cpu() - before;
        assert!(
            t.elapsed() < LONG,
            "the reactors stay on the CPU: {ran:?} of {WINDOW:?}"
        );
        in_a_row = if ran < WINDOW / 3 { in_a_row + 1 } else { 0 };
    }
    // The host reads again: every read is answered.
    for _ in 0..1023 {
        assert_eq!(q.recv().unwrap().status(), Status::SUCCESS);
    }
    drop(q);
}

/// From an audit: a connection closing with output its peer took no
/// more of (here a discovery controller whose keep-alive expired while
/// its host read nothing) asked to be polled on every loop until its
/// linger (5 s) ended: a core busy for that long, for each such
/// connection. It sleeps until the socket has room or the linger ends.
#[test]
fn a_closing_connection_whose_peer_reads_nothing_does_not_keep_its_reactor_busy() {
    let r = rig(&[HOST_A]);
    let mut cfg = host(
        "nqn.2014-08.org.nvmexpress:uuid:eeeeeeee-0000-0000-0000-000000000005",
        Digests::default(),
    );
    cfg.kato_ms = 1000;
    let mut q = Queue::open(r.addr, &cfg).unwrap();
    q.connect(0, 31, 0xffff, capsule::DISCOVERY_NQN, &cfg)
        .unwrap();
    // More answers than the socket buffers and the output take; none
    // read, and no keep-alive sent: the controller expires after 1 s.
    for _ in 0..31 {
        q.send(discovery_log(256 << 10), &[], 0).unwrap();
    }
    q.flush().unwrap();
    let opened = Instant::now();
    // From the expiry to the linger's end, no window in which the
    // reactors ran most of the time (the old code ran all of each, or
    // as much as the machine gave it).
    const WINDOW: Duration = Duration::from_millis(500);
    std::thread::sleep(Duration::from_millis(1500));
    while opened.elapsed() < Duration::from_millis(6500) {
        let before = reactors_on_cpu();
        std::thread::sleep(WINDOW);
        let ran = reactors_on_cpu() - before;
        assert!(
            ran < WINDOW * 2 / 3,
            "the reactors stay on the CPU: {ran:?} of {WINDOW:?}"
        );
    }
    // The linger over, the connection is gone.
    let (mut s, ..) = q.into_parts();
    until_closed(&mut s);
}

/// From review: a connection that ran out of its handshake time while
/// already waiting for its peer to read (it answered commands sent
/// before any Connect and read nothing) closed without a timer for the
/// linger's end, and nothing else woke its reactor: it held its place in
/// the listener for good.
#[test]
fn a_handshake_that_ran_out_while_its_output_waited_ends_after_the_linger() {
    let r = rig(&[HOST_A]);
    r.target.set_max_connections(1);
    let mut s = raw(r.addr, true);
    // A small receive buffer, so that the target's output fills soon.
    let small: libc::c_int = 4096;
    // SAFETY: a valid socket and option of the given size.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &small as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    // Commands before any Connect, each answered, none read: the writes
    // stop once the target stops reading for want of output room.
    let mut b = Vec::new();
    for cid in 0..4096u16 {
        let mut sqe = Sqe::new(cmd::FLUSH, 1);
        sqe.set_cid(cid);
        pdu::encode_command(
            &capsule::sqe_bytes(&sqe),
            &[],
            Digests::default(),
            0,
            &mut b,
        );
    }
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let t = Instant::now();
    while s.write_all(&b).is_ok() {
        assert!(t.elapsed() < LONG, "the target read on without end");
    }
    // The handshake limit (10 s) and then the linger (5 s) end it: its
    // place is free again.
    let deadline = Instant::now() + 2 * LONG;
    loop {
        let mut next = TcpStream::connect(r.addr).unwrap();
        next.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = next.write_all(&ic_req(Digests::default()));
        if read_pdu(&mut next, Digests::default()).is_some_and(|p| p[0] == pdu::kind::IC_RESP) {
            break;
        }
        assert!(Instant::now() < deadline, "its place was never freed");
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(s);
}

/// From review: a discovery controller (open to every host) with no
/// keep-alive never expired, so 1,024 idle ones held every connection of
/// the port for good. Idle without a keep-alive, one closes after 30 s.
#[test]
fn an_idle_discovery_controller_without_keep_alive_is_closed() {
    let r = rig(&[HOST_A]);
    let mut cfg = host(
        "nqn.2014-08.org.nvmexpress:uuid:dddddddd-0000-0000-0000-000000000004",
        Digests::default(),
    );
    cfg.kato_ms = 0;
    let mut q = Queue::open(r.addr, &cfg).unwrap();
    q.connect(0, 31, 0xffff, capsule::DISCOVERY_NQN, &cfg)
        .unwrap();
    let (mut s, ..) = q.into_parts();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let t = Instant::now();
    let mut sink = Vec::new();
    // Read until the target closes (a timeout is an error here).
    let got = s.read_to_end(&mut sink);
    assert!(got.is_ok(), "still open after {:?}: {got:?}", t.elapsed());
    assert!(t.elapsed() >= Duration::from_secs(20), "{:?}", t.elapsed());
}

/// Time the reactor threads of this process have run on a CPU, summed
/// (the first field of each thread's schedstat, in nanoseconds).
fn reactors_on_cpu() -> Duration {
    let ns: u64 = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            comm.starts_with("reactor-").then_some(())?;
            let stat = std::fs::read_to_string(dir.join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    Duration::from_nanos(ns)
}

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim_end() == name)
        .count()
}

/// From review: every 0 -> 1 edge of CC.SHN spawned a thread that flushed
/// the volume, so a host toggling it (thousands of Property Sets in one
/// read) made thousands of threads and flushes. One flush runs per
/// controller; notifications during it get one more flush after it, and
/// shutdown is complete only then.
#[test]
fn toggling_shutdown_notifications_runs_one_flush_at_a_time() {
    const CC: u32 = 0x14;
    const CSTS: u32 = 0x1c;
    let ram: Arc<dyn BlockDevice> =
        Arc::new(RamDevice::with_volatile_cache("d", BS as u32, BLOCKS).unwrap());
    let dev = Arc::new(bdev::FaultDevice::new(ram));
    let ctl = dev.control();
    let r = rig_on(&[HOST_A], dev);
    let addr = r.addr;
    ctl.hold(Some(bdev::IoOp::Flush), 0, u64::MAX, u64::MAX);
    let mut c = Controller::connect(addr, NQN, &host(HOST_A, Digests::default())).unwrap();
    let cc = c.property_get(CC, false).unwrap() as u32;
    let shn = 1 << 14;
    c.property_set(CC, cc | shn).unwrap();
    assert!(
        ctl.wait_held(1, LONG),
        "the shutdown flush reaches the device"
    );
    for _ in 0..200 {
        c.property_set(CC, cc).unwrap();
        c.property_set(CC, cc | shn).unwrap();
    }
    // Each Property Set was answered after its notification was handled:
    // any thread it started exists by now.
    assert_eq!(threads_named("nvmf-shutdown"), 1);
    assert_eq!(ctl.held(), 1, "one flush at a time");
    let done = |c: &mut Controller| c.property_get(CSTS, false).unwrap() & 0xc == 0x8;
    assert!(!done(&mut c), "not complete while the flush is held");
    ctl.release();
    let deadline = Instant::now() + LONG;
    while !done(&mut c) {
        assert!(Instant::now() < deadline, "shutdown never completed");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(c);
}

/// From an audit: "shutdown complete" was said after a flush that failed,
/// so the host powered off believing what it wrote was durable. The
/// controller says it failed (CSTS.CFS) instead, and a reset clears that.
#[test]
fn a_shutdown_whose_flush_failed_is_not_complete() {
    const CC: u32 = 0x14;
    const CSTS: u32 = 0x1c;
    let ram: Arc<dyn BlockDevice> =
        Arc::new(RamDevice::with_volatile_cache("d", BS as u32, BLOCKS).unwrap());
    let dev = Arc::new(bdev::FaultDevice::new(ram));
    let ctl = dev.control();
    let r = rig_on(&[HOST_A], dev);
    let mut c = Controller::connect(r.addr, NQN, &host(HOST_A, Digests::default())).unwrap();
    ctl.pull();
    let cc = c.property_get(CC, false).unwrap() as u32;
    c.property_set(CC, cc | 1 << 14).unwrap();
    let deadline = Instant::now() + LONG;
    let csts = loop {
        let csts = c.property_get(CSTS, false).unwrap();
        if csts & 0xe != 0 {
            break csts;
        }
        assert!(Instant::now() < deadline, "the shutdown never ended");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(csts & 0xc, 0, "shutdown said complete: {csts:#x}");
    assert_eq!(csts & 0x2, 0x2, "not fatal: {csts:#x}");
}

/// From review: a failed command's whole buffer was counted into the
/// bytes read and written (metrics, and the SMART log's data units).
#[test]
fn failed_commands_move_no_bytes_in_the_counters() {
    let ram: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("d", BS as u32, BLOCKS).unwrap());
    let dev = Arc::new(bdev::FaultDevice::new(ram));
    let ctl = dev.control();
    let r = rig_on(&[HOST_A], dev);
    let mut c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    let mut q = c.io_queue(1, 8).unwrap();
    ctl.fail_reads(0, BLOCKS);
    ctl.fail_writes(0, BLOCKS);
    // 64 KiB each way, failed: one data unit each if counted.
    let blocks = 16;
    let len = 16 * BS as usize;
    let read = q.exec(rw(cmd::READ, 0, blocks), &[], len).unwrap_err();
    assert!(
        matches!(read, nvmf::host::HostError::Status { status, .. } if status.sct == 2),
        "a media error: {read:?}"
    );
    let write = q
        .exec(rw(cmd::WRITE, 0, blocks), &vec![1u8; len], 0)
        .unwrap_err();
    assert!(
        matches!(write, nvmf::host::HostError::Status { status, .. } if status.sct == 2),
        "a media error: {write:?}"
    );
    let smart = c.log_page(0x02, 512, 0).unwrap();
    let field = |at: usize| u128::from_le_bytes(smart[at..at + 16].try_into().unwrap());
    assert_eq!((field(32), field(48)), (0, 0), "data units read, written");
    assert_eq!((field(64), field(80)), (1, 1), "commands completed");
}

/// From review: every IO queue a host connects opens a channel to each
/// member, and a member that refused one because its queue pairs were
/// all in use (a Linux host asks for a queue per CPU; an NVMe drive has
/// 64 or fewer) was reported failed: connecting queues degraded, then
/// failed, a RAID volume. Now that Connect fails and the members stay;
/// a queue closed makes room again.
#[test]
fn more_queues_than_the_members_can_open_fail_the_connect_not_the_members() {
    use appliance::raid::members::{FailureSink, Member, MemberState};
    let faults: Vec<Arc<bdev::FaultDevice>> = (0..2)
        .map(|i| {
            let ram: Arc<dyn BlockDevice> =
                Arc::new(RamDevice::new(&format!("m{i}"), BS as u32, BLOCKS).unwrap());
            Arc::new(bdev::FaultDevice::new(ram))
        })
        .collect();
    let member = |f: &Arc<bdev::FaultDevice>| Member {
        dev: f.clone(),
        state: MemberState::InSync,
        write_mostly: false,
        gone: Default::default(),
        errors: Default::default(),
        readd: false,
    };
    let sink = FailureSink::none();
    let raid = appliance::raid::raid1::Raid1Device::new(
        "r1",
        faults.iter().map(member).collect(),
        8,
        sink.clone(),
    )
    .unwrap();
    let r = rig_on(&[HOST_A], Arc::new(raid));
    let (addr, volume) = (r.addr, &r.volume);
    // Room for three more channels on each member than are open now.
    for f in &faults {
        let c = f.control();
        c.limit_channels(c.open_channels() + 3);
    }
    let c = connect(addr, &host(HOST_A, Digests::default()), 8);
    let mut queues = Vec::new();
    let mut refused = 0;
    for qid in 1..=8 {
        match c.io_queue(qid, 32) {
            Ok(q) => queues.push(q),
            // Busy for now, which a host may try again (Internal Error
            // carries DNR: Linux then never reconnects: audit).
            Err(HostError::Status { status: s, .. }) => {
                assert_eq!(s, status::CONNECT_BUSY);
                refused += 1
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        queues.len(),
        3,
        "as many queues as the members have room for"
    );
    assert_eq!(refused, 5);
    assert_eq!(sink.ledger().reported(), 0, "no member reported failed");
    for (i, q) in queues.iter_mut().enumerate() {
        verify_queue(q, 40 + i as u64, i as u64 * 1024, 4);
    }
    // A queue that goes makes room for another.
    drop(queues.pop());
    let deadline = Instant::now() + LONG;
    let mut q = loop {
        if let Ok(q) = c.io_queue(8, 32) {
            break q;
        }
        assert!(
            Instant::now() < deadline,
            "the closed queue's room never came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    verify_queue(&mut q, 50, 8192, 4);
    assert_eq!(sink.ledger().reported(), 0);
    // From review: a queue that moves to a new generation when another
    // opener has taken the room its old channel left failed every request
    // until the next change. It waits and asks again. Here the members
    // have one channel less than the queues need while they move.
    queues.push(q);
    for f in &faults {
        let c = f.control();
        c.limit_channels(c.open_channels() - 1);
    }
    let refused = faults[0].control().refused() + faults[1].control().refused();
    {
        let g = volume.suspend(LONG).unwrap();
        let (_, cfg) = volume.quiesce().config();
        volume.quiesce().publish(&g, (*cfg).clone()).unwrap();
    }
    let deadline = Instant::now() + LONG;
    while faults[0].control().refused() + faults[1].control().refused() == refused {
        assert!(Instant::now() < deadline, "no queue was refused a channel");
        std::thread::sleep(Duration::from_millis(5));
    }
    for f in &faults {
        let c = f.control();
        c.limit_channels(c.open_channels() + 1);
    }
    // Every queue serves again, the one that waited too.
    for (i, q) in queues.iter_mut().enumerate() {
        verify_queue(q, 60 + i as u64, 10_000 + i as u64 * 1024, 4);
    }
    assert_eq!(sink.ledger().reported(), 0);
    drop(queues);
    drop(c);
}

/// Read until the target closes `s`; how long that took (a read timeout
/// is an error).
fn until_closed(s: &mut TcpStream) -> Duration {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let t = Instant::now();
    let mut sink = Vec::new();
    let got = s.read_to_end(&mut sink);
    assert!(got.is_ok(), "still open after {:?}: {got:?}", t.elapsed());
    t.elapsed()
}

/// From review: the handshake time limit and the end of a dead
/// controller's IO queues were only looked at when the connection's
/// reactor woke for something else; on an idle reactor a connection that
/// sent nothing stayed forever (and held its share of the listener), and
/// an IO queue outlived its expired association. Both wake their reactor
/// now.
#[test]
fn silent_connections_are_closed_on_an_idle_reactor() {
    let r = rig(&[HOST_A]);
    // Sends nothing at all: closed after the 10 s handshake limit.
    let mut silent = TcpStream::connect(r.addr).unwrap();
    // An association whose host goes silent: its keep-alive expires, and
    // its IO queue (perhaps on the other reactor) closes with it.
    let mut cfg = host(HOST_A, Digests::default());
    cfg.kato_ms = 1000;
    let c = connect(r.addr, &cfg, 1);
    let q = c.io_queue(1, 8).unwrap();
    let (mut qs, ..) = q.into_parts();
    let waited = until_closed(&mut qs);
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
    let waited = until_closed(&mut silent);
    assert!(waited >= Duration::from_secs(5), "{waited:?}");
    drop(c);
}

/// From review: every write whose data the host was to send (R2T) got
/// its whole buffer, zeroed, as it arrived, and kept it after; a host that
/// sent 1,023 writes of 128 KiB (72 KiB on the wire) and no data made the
/// target allocate 128 MiB per queue. Data buffers of a connection's
/// commands in progress are now bounded: the rest wait for room, with no
/// R2T yet, and go on as room is made.
#[test]
fn writes_whose_data_never_comes_hold_a_bounded_amount_of_memory() {
    const LEN: usize = 128 << 10;
    const WRITES: u16 = 1023;
    let r = rig(&[HOST_A]);
    let cfg = host(HOST_A, Digests::default());
    let c = connect(r.addr, &cfg, 1);
    let mut q = RawQueue::new(c.io_queue(1, 1024).unwrap());
    let before = rss();
    let asked = q.writes_without_data(WRITES, LEN);
    let grown = rss().saturating_sub(before);
    assert!(
        asked.len() <= 64,
        "{} writes asked for their data at once",
        asked.len()
    );
    assert!(grown < 48 << 20, "the target holds {} MiB", grown >> 20);
    // The data of one asked-for write comes: it completes, and the next
    // waiting write is asked for.
    q.send_data(asked[0], &pattern(7, LEN));
    let (mut completed, mut more) = (false, 0);
    while !(completed && more > 0) {
        match q.next() {
            Ok(_) => more += 1,
            Err(st) => {
                assert_eq!(st, Status::SUCCESS);
                completed = true;
            }
        }
    }
    drop(q);
    drop(c);
}

/// A device that answers every write only once let go, counting those
/// it was given (a device that holds requests at an exact point: no
/// sleep decides it).
#[derive(Default)]
struct Parking {
    writes: std::sync::atomic::AtomicU64,
    let_go: std::sync::atomic::AtomicBool,
}

struct Parked(bdev::DeviceInfo, Arc<Parking>);

struct ParkedChannel(Arc<Parking>, Vec<(u64, bool)>);

impl BlockDevice for Parked {
    fn info(&self) -> &bdev::DeviceInfo {
        &self.0
    }
    fn open_channel(&self) -> Result<Box<dyn bdev::IoChannel>, bdev::BdevError> {
        Ok(Box::new(ParkedChannel(self.1.clone(), Vec::new())))
    }
}

impl bdev::IoChannel for ParkedChannel {
    fn submit(&mut self, req: bdev::IoRequest) -> Result<(), bdev::SubmitError> {
        let write = req.op == bdev::IoOp::Write;
        if write {
            self.0
                .writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.1.push((req.tag, write));
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<bdev::Completion>) -> usize {
        let go = self.0.let_go.load(std::sync::atomic::Ordering::SeqCst);
        let before = out.len();
        self.1.retain(|&(tag, write)| {
            let answer = go || !write;
            if answer {
                out.push(bdev::Completion {
                    tag,
                    result: Ok(()),
                });
            }
            !answer
        });
        out.len() - before
    }
    fn inflight(&self) -> usize {
        self.1.len()
    }
}

/// From an audit: a write whose data came in its capsule was taken in at
/// once, its data held against the connection's budget but never waiting
/// for room: behind a device (or the volume's limits) that held them, one
/// queue held 8 MiB where its share is 4, and the sum over connections
/// put every other host's transfers one at a time. Such a command now
/// stays in the socket while the budget has no room.
#[test]
fn in_capsule_writes_wait_in_the_socket_for_room_in_the_data_budget() {
    use std::sync::atomic::Ordering::SeqCst;
    let info = RamDevice::new("d", BS as u32, BLOCKS)
        .unwrap()
        .info()
        .clone();
    let parking = Arc::new(Parking::default());
    let r = rig_on(&[HOST_A], Arc::new(Parked(info, parking.clone())));
    let c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    let mut q = c.io_queue(1, 1024).unwrap();
    const N: u64 = 1000;
    const LEN: usize = 8192;
    // (Sent from a thread: the socket fills once the target stops reading.)
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            q.send(rw(cmd::WRITE, i * 2, 2), &pattern(i, LEN), 0)
                .unwrap();
        }
        q.flush().unwrap();
        q
    });
    // A connection's share of the data budget, 4 MiB, is 512 of them.
    let share = ((4 << 20) / LEN) as u64;
    let t = Instant::now();
    while parking.writes.load(SeqCst) < share {
        assert!(
            t.elapsed() < LONG,
            "{} writes taken in",
            parking.writes.load(SeqCst)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The bound holds however long one looks; a second is long enough for
    // the old code to take in all 1,000.
    std::thread::sleep(Duration::from_secs(1));
    let taken = parking.writes.load(SeqCst);
    assert!(taken <= share, "{taken} writes of 8 KiB taken in");
    parking.let_go.store(true, SeqCst);
    let mut q = sender.join().unwrap();
    for _ in 0..N {
        assert_eq!(q.recv().unwrap().status(), Status::SUCCESS);
    }
    assert_eq!(parking.writes.load(SeqCst), N);
}

/// The other side of the rule above: writes whose data the host was
/// asked for may fill the budget, and their data comes behind commands
/// the host sent first. An in-capsule write among those is taken even
/// then (left unread, it would keep that data out for good).
#[test]
fn an_in_capsule_write_behind_writes_awaiting_their_data_is_taken() {
    let r = rig(&[HOST_A]);
    let c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    let mut q = c.io_queue(1, 128).unwrap();
    const BIG: usize = 128 << 10;
    // 4 MiB asked for by R2T (the whole share), then 8 KiB in a capsule,
    // all sent before any data.
    for i in 0..32u64 {
        q.send(rw(cmd::WRITE, i * 32, 32), &pattern(i, BIG), 0)
            .unwrap();
    }
    q.send(rw(cmd::WRITE, 2048, 2), &pattern(99, 8192), 0)
        .unwrap();
    q.flush().unwrap();
    for _ in 0..33 {
        assert_eq!(q.recv().unwrap().status(), Status::SUCCESS);
    }
    let got = q.exec(rw(cmd::READ, 2048, 2), &[], 8192).unwrap().data;
    assert!(got == pattern(99, 8192));
    let got = q.exec(rw(cmd::READ, 31 * 32, 32), &[], BIG).unwrap().data;
    assert!(got == pattern(31, BIG));
}

/// From review: one write whose data the host never sends (its R2T left
/// unanswered) let in-capsule writes past the data budget for good. Such
/// a connection is closed after 30 s.
#[test]
fn a_write_whose_data_never_comes_ends_its_connection() {
    let r = rig(&[HOST_A]);
    let c = connect(r.addr, &host(HOST_A, Digests::default()), 1);
    let mut q = RawQueue::new(c.io_queue(1, 16).unwrap());
    let asked = q.writes_without_data(1, 128 << 10);
    assert_eq!(asked.len(), 1);
    let t = Instant::now();
    until_closed(&mut q.s);
    assert!(t.elapsed() >= Duration::from_secs(20), "{:?}", t.elapsed());
    drop(c);
}

/// An IO queue driven PDU by PDU: commands written raw, R2Ts and
/// responses read as they come.
struct RawQueue {
    s: TcpStream,
    digests: Digests,
    cpda: u8,
    /// Received, not yet parsed.
    inbox: Vec<u8>,
}

impl RawQueue {
    fn new(q: Queue) -> RawQueue {
        let (s, digests, cpda, _) = q.into_parts();
        RawQueue {
            s,
            digests,
            cpda,
            inbox: Vec::new(),
        }
    }

    /// The next R2T, or the next response's status.
    fn next(&mut self) -> Result<pdu::R2t, Status> {
        let rx = Receiver {
            controller: false,
            digests: self.digests,
            max_data: 1 << 20,
        };
        loop {
            let got = pdu::parse(&self.inbox, &rx).unwrap().map(|(p, n)| {
                let got = match p {
                    Pdu::R2t(t) => Ok(t),
                    Pdu::Response(c) => Err(capsule::cqe_from(&c).code()),
                    other => panic!("{other:?}"),
                };
                (got, n)
            });
            if let Some((got, n)) = got {
                self.inbox.drain(..n);
                return got;
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed");
            self.inbox.extend_from_slice(&chunk[..n]);
        }
    }

    /// Send `n` writes of `len` bytes (command IDs `0..n`) and no data,
    /// then a flush: the R2Ts that came before the flush's answer, which
    /// comes once every write before it was taken in (asked for its data
    /// or put to wait for room).
    fn writes_without_data(&mut self, n: u16, len: usize) -> Vec<pdu::R2t> {
        let mut out = Vec::new();
        let blocks = (len as u64 / BS) as u32;
        for cid in 0..n {
            let mut sqe = rw(cmd::WRITE, (cid as u64 % 500) * blocks as u64, blocks);
            sqe.set_cid(cid);
            capsule::set_data_pointer(&mut sqe, false, len as u32);
            let sqe = capsule::sqe_bytes(&sqe);
            pdu::encode_command(&sqe, &[], self.digests, self.cpda, &mut out);
        }
        let mut flush = Sqe::new(cmd::FLUSH, 1);
        flush.set_cid(n);
        let flush = capsule::sqe_bytes(&flush);
        pdu::encode_command(&flush, &[], self.digests, self.cpda, &mut out);
        self.s.write_all(&out).unwrap();
        let mut asked = Vec::new();
        while let Ok(t) = self.next() {
            asked.push(t);
        }
        asked
    }

    /// The data an R2T asked for, in one H2CData PDU.
    fn send_data(&mut self, t: pdu::R2t, data: &[u8]) {
        let mut h2c = Vec::new();
        let h = pdu::DataHeader {
            cccid: t.cccid,
            ttag: t.ttag,
            offset: 0,
            length: data.len() as u32,
            last: true,
            success: false,
        };
        pdu::encode_data(true, &h, data, self.digests, self.cpda, &mut h2c);
        self.s.write_all(&h2c).unwrap();
    }
}

/// From review: the target's connections shared one bound of memory, so
/// one host whose connections held all they might (writes whose data it
/// never sends) left every other host's connections one command at a
/// time. A host holds at most three quarters of it now: another host's
/// queue is still asked for the data of several writes at once.
#[test]
fn a_host_whose_writes_hold_all_they_may_leaves_room_for_another_host() {
    const LEN: usize = 128 << 10;
    let r = rig(&[HOST_A, HOST_B]);
    // Host A: 80 queues of 32 writes of 128 KiB with no data, 320 MiB
    // asked for, more than the whole target's 256 MiB.
    let cfg_a = host(HOST_A, Digests::default());
    let ctrls: Vec<Controller> = (0..2).map(|_| connect(r.addr, &cfg_a, 40)).collect();
    let mut hog = Vec::new();
    let mut asked_a = 0;
    for c in &ctrls {
        for qid in 1..=40 {
            let mut q = RawQueue::new(c.io_queue(qid, 64).unwrap());
            asked_a += q.writes_without_data(32, LEN).len();
            hog.push(q);
        }
    }
    assert!(
        asked_a * LEN <= (192 << 20) + 80 * LEN,
        "host A holds {} MiB",
        (asked_a * LEN) >> 20
    );
    // Host B, from another address: two writes, both asked for.
    let cfg_b = host(HOST_B, Digests::default());
    let c = connect(r.addr, &cfg_b, 1);
    let from_b = common::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), r.addr);
    let mut q = RawQueue::new(c.io_queue_over(from_b, 1, 64).unwrap());
    let asked = q.writes_without_data(2, LEN);
    assert_eq!(asked.len(), 2, "host B asked for {:?}", asked);
    for t in asked {
        q.send_data(t, &pattern(9, LEN));
        assert_eq!(q.next().err(), Some(Status::SUCCESS));
    }
    drop((q, c, hog, ctrls));
}

/// From review: the listener's limit was checked against connections
/// counted when their reactor started them, so a burst that came while
/// the reactors were busy all passed it. They are counted as accepted.
#[test]
fn a_burst_of_connections_cannot_pass_the_listener_limit() {
    let r = rig(&[HOST_A]);
    r.target.set_max_connections(3);
    // Both reactors busy until the test lets them go: nothing accepted
    // meanwhile is started.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let wait = Arc::new(std::sync::Mutex::new(wait));
    let (busy, started) = std::sync::mpsc::channel::<()>();
    for core in 0..2 {
        let (wait, busy) = (wait.clone(), busy.clone());
        r._reactors
            .set()
            .send(
                core,
                Box::new(move |_| {
                    let _ = busy.send(());
                    let _ = wait.lock().map(|w| w.recv());
                }),
            )
            .unwrap();
    }
    for _ in 0..2 {
        started.recv().unwrap();
    }
    // From six addresses: one host's share (three quarters) is not what
    // stops them.
    let mut conns: Vec<TcpStream> = (1..=6)
        .map(|i| {
            let mut s = common::connect_from(std::net::Ipv4Addr::new(127, 0, 0, i), r.addr);
            s.set_read_timeout(Some(LONG)).unwrap();
            let _ = s.write_all(&ic_req(Digests::default()));
            s
        })
        .collect();
    drop(go);
    let answered = conns
        .iter_mut()
        .map(|s| read_pdu(s, Digests::default()))
        .filter(|p| p.as_ref().is_some_and(|p| p[0] == pdu::kind::IC_RESP))
        .count();
    assert!(answered <= 3, "{answered} connections over a limit of 3");
    assert!(answered >= 1);
}

/// From an audit: removing an export woke its listener's accept loop by
/// connecting to it, which fails once the listen address is gone from
/// the host (a DHCP or VLAN change); the removal then waited for ever,
/// holding the target's lock, and every export call after it with it.
/// Here the address lives in a network namespace of this test's own.
#[test]
fn an_export_whose_address_went_away_is_removed_without_hanging() {
    // SAFETY: unshare(2) of this thread's network namespace; threads it
    // starts (the accept loop) and commands it runs are in it too.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    let ip = |args: &str| {
        let st = std::process::Command::new("ip")
            .args(args.split(' '))
            .status()
            .unwrap();
        assert!(st.success(), "ip {args}");
    };
    ip("link set lo up");
    ip("addr add 10.255.0.1/32 dev lo");
    let reactors = Reactors::start(ReactorConfig {
        count: 1,
        ..Default::default()
    })
    .unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new("d", BS as u32, 256).unwrap());
    let volume = Volume::new(reactors.set(), "vol0", dev);
    let target = Arc::new(Target::new(reactors.set()));
    let listen: SocketAddr = "10.255.0.1:0".parse().unwrap();
    target
        .add(&volume, options(NQN, listen, &[HOST_A]))
        .unwrap();
    ip("addr del 10.255.0.1/32 dev lo");
    let (tx, rx) = std::sync::mpsc::channel();
    let t = target.clone();
    std::thread::spawn(move || {
        let _ = tx.send(t.remove(NQN));
    });
    let removed = rx.recv_timeout(LONG).expect("the removal returns");
    assert!(removed.is_ok(), "{removed:?}");
    assert!(target.list().is_empty());
    drop(target);
    drop(volume);
    drop(reactors);
}

/// From an audit: each connection could hold 4 MiB of output (and as
/// much of data buffers, and of buffers kept for reuse) however many
/// there were, so one host with a thousand connections could make the
/// daemon hold 12 GiB and be killed for it. The target's connections
/// share a bounded amount now: 200 that never read hold about 1.3 MiB of
/// output each (4 MiB each before: 800 MiB).
#[test]
fn many_connections_that_never_read_share_a_bounded_memory() {
    let r = rig(&[HOST_A]);
    let before = rss();
    const LEN: usize = 256 << 10;
    let mut queues = Vec::new();
    for i in 0..200u32 {
        let cfg = host(
            &format!("nqn.2014-08.org.nvmexpress:uuid:cccccccc-0000-0000-0000-{i:012}"),
            Digests::default(),
        );
        let mut q = Queue::open(r.addr, &cfg).unwrap();
        q.connect(0, 31, 0xffff, capsule::DISCOVERY_NQN, &cfg)
            .unwrap();
        // 8 MiB of answers asked for, none read.
        for _ in 0..32 {
            q.send(discovery_log(LEN), &[], 0).unwrap();
        }
        q.flush().unwrap();
        queues.push(q);
    }
    let t = Instant::now();
    let mut most = 0;
    while t.elapsed() < Duration::from_secs(3) {
        most = most.max(rss().saturating_sub(before));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(most < 480 << 20, "the target held {} MiB", most >> 20);
    drop(queues);
}
