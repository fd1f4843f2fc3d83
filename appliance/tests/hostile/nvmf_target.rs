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
    use nvmf::pdu::{self, Digests, Pdu, Receiver};
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let counts = sent.clone();
    std::thread::spawn(move || {
        for host in listener.incoming() {
            let Ok(mut host) = host else { return };
            let Ok(mut up) = std::net::TcpStream::connect(target) else {
                return;
            };
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
                let mut buf = Vec::new();
                let mut digests: Option<Digests> = None;
                let mut chunk = vec![0u8; 64 << 10];
                loop {
                    let n = match up.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
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
                        let times = match p {
                            Pdu::IcResp(a) => {
                                digests = Some(a.digests);
                                1
                            }
                            Pdu::R2t(_) => copies,
                            _ => 1,
                        };
                        for _ in 0..times {
                            if host.write_all(&buf[..len]).is_err() {
                                break;
                            }
                        }
                        buf.drain(..len);
                    }
                }
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
    use nvmf::pdu::{self, Digests, Pdu, Receiver};
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for host in listener.incoming() {
            let Ok(mut host) = host else { return };
            let Ok(mut up) = std::net::TcpStream::connect(target) else {
                return;
            };
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
                let mut buf = Vec::new();
                let mut digests: Option<Digests> = None;
                let mut chunk = vec![0u8; 64 << 10];
                loop {
                    let n = match up.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
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
                        match p {
                            Pdu::IcResp(a) => {
                                digests = Some(a.digests);
                                let _ = host.write_all(&buf[..len]);
                            }
                            Pdu::R2t(t) => {
                                deaf.store(true, Ordering::SeqCst);
                                let mut out = Vec::with_capacity(1 << 20);
                                for i in 0..t.length {
                                    let one = pdu::R2t {
                                        offset: t.offset + i,
                                        length: 1,
                                        ..t
                                    };
                                    pdu::encode_r2t(&one, digests.unwrap_or_default(), &mut out);
                                    if out.len() >= 1 << 20 {
                                        let _ = host.write_all(&out);
                                        out.clear();
                                    }
                                }
                                let _ = host.write_all(&out);
                            }
                            _ => {
                                let _ = host.write_all(&buf[..len]);
                            }
                        }
                        buf.drain(..len);
                    }
                }
                let _ = host.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}
