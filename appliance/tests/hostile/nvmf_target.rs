//! Hostile NVMe/TCP targets for the initiator's tests: proxies in front
//! of the appliance's own target that bend what it sends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A TCP proxy to `target` that sends every R2T the target sends on to
/// the host `copies` times, and counts, per connection, the H2CData bytes
/// the host sends: what a hostile target repeating R2Ts gets.
pub fn r2t_repeating_proxy(
    target: SocketAddr,
    copies: usize,
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<usize>>>) {
    use nvmf::pdu::{self, Pdu, Receiver};
    use std::io::{Read, Write};
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let counts = sent.clone();
    let addr = proxy(target, move |mut host, up| {
        {
            let (mut host_r, mut up_w) = (host.try_clone().unwrap(), up.try_clone().unwrap());
            let slot = {
                let mut c = counts.lock().unwrap();
                c.push(0);
                c.len() - 1
            };
            let counts = counts.clone();
            // Host to target: forwarded as is; H2CData bytes counted.
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut digests = None;
                let mut chunk = vec![0u8; 64 << 10];
                loop {
                    let n = match host_r.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let _ = up_w.write_all(&chunk[..n]);
                    buf.extend_from_slice(&chunk[..n]);
                    let r = Receiver {
                        controller: true,
                        digests: digests.unwrap_or_default(),
                        max_data: 4 << 20,
                    };
                    while let Ok(Some((p, len))) = pdu::parse(&buf, &r) {
                        match p {
                            Pdu::IcReq(q) => digests = Some(q.digests),
                            Pdu::H2cData(h, _) => counts.lock().unwrap()[slot] += h.length as usize,
                            _ => {}
                        }
                        buf.drain(..len);
                    }
                }
                let _ = up_w.shutdown(std::net::Shutdown::Both);
            });
            // Target to host: R2Ts repeated.
            std::thread::spawn(move || {
                each_target_pdu(up, |p, bytes, _| {
                    let times = if matches!(p, Pdu::R2t(_)) { copies } else { 1 };
                    for _ in 0..times {
                        if host.write_all(bytes).is_err() {
                            break;
                        }
                    }
                });
                let _ = host.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (addr, sent)
}

/// A TCP proxy to `target` that turns each R2T into 1-byte R2Ts for the
/// same range and, from the first R2T on, reads nothing more from the
/// host: a target that asks for data in the smallest pieces while it
/// takes none of what is sent.
pub fn tiny_r2t_proxy(target: SocketAddr) -> SocketAddr {
    use nvmf::pdu::{self, Pdu};
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    proxy(target, move |mut host, up| {
        {
            let (mut host_r, mut up_w) = (host.try_clone().unwrap(), up.try_clone().unwrap());
            let deaf = Arc::new(AtomicBool::new(false));
            let deaf_r = deaf.clone();
            std::thread::spawn(move || {
                let mut chunk = vec![0u8; 64 << 10];
                while !deaf_r.load(Ordering::SeqCst) {
                    match host_r.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let _ = up_w.write_all(&chunk[..n]);
                        }
                    }
                }
                // Reads nothing more: the host's sends pile up.
                std::thread::sleep(Duration::from_secs(30));
            });
            std::thread::spawn(move || {
                each_target_pdu(up, |p, bytes, digests| {
                    let Pdu::R2t(t) = p else {
                        let _ = host.write_all(bytes);
                        return;
                    };
                    deaf.store(true, Ordering::SeqCst);
                    let mut out = Vec::with_capacity(1 << 20);
                    for i in 0..t.length {
                        let one = pdu::R2t {
                            offset: t.offset + i,
                            length: 1,
                            ..*t
                        };
                        pdu::encode_r2t(&one, digests, &mut out);
                        if out.len() >= 1 << 20 {
                            let _ = host.write_all(&out);
                            out.clear();
                        }
                    }
                    let _ = host.write_all(&out);
                });
                let _ = host.shutdown(std::net::Shutdown::Both);
            });
        }
    })
}

/// A TCP proxy to `target` that sends each C2HData PDU on as PDUs of
/// `piece` bytes, `gap` apart: a target that trickles a reply's data,
/// each PDU well within a time-out of its own.
pub fn trickling_proxy(target: SocketAddr, piece: usize, gap: Duration) -> SocketAddr {
    c2h_proxy(target, move |h, data, digests, out| {
        for (i, part) in data.chunks(piece).enumerate() {
            let at = i * piece;
            let end = at + part.len() == data.len();
            let one = nvmf::pdu::DataHeader {
                offset: h.offset + at as u32,
                length: part.len() as u32,
                last: end && h.last,
                success: end && h.success,
                ..*h
            };
            nvmf::pdu::encode_data(false, &one, part, digests, 0, out);
        }
        gap
    })
}

/// A TCP proxy to `target` that lets `edit` change the data of each
/// C2HData PDU (its length kept): a target that says other things.
pub fn editing_proxy(
    target: SocketAddr,
    edit: impl Fn(&mut [u8]) + Clone + Send + 'static,
) -> SocketAddr {
    c2h_proxy(target, move |h, data, digests, out| {
        let mut data = data.to_vec();
        edit(&mut data);
        nvmf::pdu::encode_data(false, h, &data, digests, 0, out);
        Duration::ZERO
    })
}

/// A TCP proxy to `target` that passes the host's bytes on as they are
/// and, for each C2HData PDU the target sends, the PDUs `each` encodes
/// instead (sent one by one, the returned gap before each); every other
/// PDU as it is.
fn c2h_proxy(
    target: SocketAddr,
    each: impl Fn(&nvmf::pdu::DataHeader, &[u8], nvmf::pdu::Digests, &mut Vec<u8>) -> Duration
        + Clone
        + Send
        + 'static,
) -> SocketAddr {
    use nvmf::pdu::{self, Pdu, Receiver};
    use std::io::Write;
    proxy(target, move |mut host, up| {
        let (mut host_r, mut up_w) = (host.try_clone().unwrap(), up.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut host_r, &mut up_w);
            let _ = up_w.shutdown(std::net::Shutdown::Both);
        });
        let each = each.clone();
        std::thread::spawn(move || {
            each_target_pdu(up, |p, bytes, digests| {
                let Pdu::C2hData(h, data) = p else {
                    let _ = host.write_all(bytes);
                    return;
                };
                let mut out = Vec::new();
                let gap = each(h, data, digests, &mut out);
                // One PDU at a time, each after the gap.
                let r = Receiver {
                    controller: false,
                    digests,
                    max_data: 4 << 20,
                };
                let mut at = 0;
                while let Ok(Some((_, n))) = pdu::parse(&out[at..], &r) {
                    std::thread::sleep(gap);
                    if host.write_all(&out[at..at + n]).is_err() {
                        return;
                    }
                    at += n;
                }
            });
            let _ = host.shutdown(std::net::Shutdown::Both);
        });
    })
}

/// Read the PDUs a target sends on `up` until it closes, and hand each,
/// with its bytes and the digests the connection negotiated, to `f`.
fn each_target_pdu(
    mut up: std::net::TcpStream,
    mut f: impl FnMut(&nvmf::pdu::Pdu<'_>, &[u8], nvmf::pdu::Digests),
) {
    use nvmf::pdu::{self, Digests, Pdu, Receiver};
    use std::io::Read;
    let mut buf = Vec::new();
    let mut digests: Option<Digests> = None;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = match up.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            let r = Receiver {
                controller: false,
                digests: digests.unwrap_or_default(),
                max_data: 4 << 20,
            };
            let Ok(Some((p, len))) = pdu::parse(&buf, &r) else {
                break;
            };
            if let Pdu::IcResp(a) = &p {
                digests = Some(a.digests);
            }
            f(&p, &buf[..len], digests.unwrap_or_default());
            buf.drain(..len);
        }
    }
}

/// Listen on the loopback; for each connection, connect to `target` and
/// hand both streams (host's, target's) to `relay`. Its address.
fn proxy(
    target: SocketAddr,
    relay: impl Fn(std::net::TcpStream, std::net::TcpStream) + Send + 'static,
) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for host in listener.incoming() {
            let Ok(host) = host else { return };
            let Ok(up) = std::net::TcpStream::connect(target) else {
                return;
            };
            relay(host, up);
        }
    });
    addr
}
