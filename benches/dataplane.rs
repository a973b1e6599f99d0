//! Per-packet costs of the data plane: WireGuard encapsulate + decapsulate for 64, 512 and
//! 1420-byte packets between two in-memory peers, an allowed-IPs lookup among 1000 peers, and
//! Myelin's own outbound path (route lookup in the peer table, then encryption into UDP GSO
//! batches, `tunnel::batch::Batcher`) for a TSO-sized burst to one peer and packets spread
//! over eight.

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ipnet::IpNet;
use myelin::tunnel::batch::Batcher;
use myelin::tunnel::lanes::{self, BulkQueue};
use myelin::tunnel::peers::{PeerSpec, PeerTable};
use myelin::tunnel::routes::RouteTable;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

fn key(seed: u8) -> StaticSecret {
    StaticSecret::from([seed; 32])
}

/// Two peers with a completed handshake.
fn connected_pair() -> (Tunn, Tunn) {
    let (a_sk, b_sk) = (key(1), key(2));
    let (a_pk, b_pk) = (PublicKey::from(&a_sk), PublicKey::from(&b_sk));
    let mut a = Tunn::new(a_sk, b_pk, None, None, 1, None);
    let mut b = Tunn::new(b_sk, a_pk, None, None, 2, None);
    let mut buf = vec![0u8; 2048];
    let mut buf2 = vec![0u8; 2048];
    let init = match a.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no handshake initiation"),
    };
    let resp = match b.decapsulate(None, &init, &mut buf2) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no handshake response"),
    };
    match a.decapsulate(None, &resp, &mut buf) {
        TunnResult::WriteToNetwork(p) => {
            let keepalive = p.to_vec();
            let _ = b.decapsulate(None, &keepalive, &mut buf2);
        }
        _ => panic!("no keepalive after the handshake"),
    }
    (a, b)
}

fn ipv4_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 77, 0, 1]);
    p[16..20].copy_from_slice(&[10, 77, 0, 2]);
    p
}

fn encap_decap(c: &mut Criterion) {
    let mut group = c.benchmark_group("encapsulate+decapsulate");
    for size in [64usize, 512, 1420] {
        let (mut a, mut b) = connected_pair();
        let packet = ipv4_packet(size);
        let mut wire = vec![0u8; size + 64];
        let mut plain = vec![0u8; size + 64];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |bench, _| {
            bench.iter(|| {
                let n = match a.encapsulate(black_box(&packet), &mut wire) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => 0,
                };
                match b.decapsulate(None, &wire[..n], &mut plain) {
                    TunnResult::WriteToTunnelV4(p, _) => black_box(p.len()),
                    _ => 0,
                }
            })
        });
    }
    group.finish();
}

fn route_lookup(c: &mut Criterion) {
    // 1000 peers with a /32 each, a /24 site behind every tenth one, and a default route.
    let mut nets: Vec<(IpNet, usize)> = (0..1000u32)
        .map(|i| {
            (
                IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0a4d_0000 + i))),
                i as usize,
            )
        })
        .collect();
    for i in (0..1000u32).step_by(10) {
        let site = IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a80_0000 + (i << 8))), 24).unwrap();
        nets.push((site, i as usize));
    }
    nets.push(("0.0.0.0/0".parse().unwrap(), 0));
    let table = RouteTable::new(nets.iter().map(|(n, p)| (n, *p)));
    let targets: Vec<IpAddr> = (0..1024u32)
        .map(|i| {
            IpAddr::V4(Ipv4Addr::from(match i % 3 {
                0 => 0x0a4d_0000 + (i % 1000),
                1 => 0x0a80_0000 + ((i % 1000) << 8) + 7,
                _ => 0x0808_0808,
            }))
        })
        .collect();
    c.bench_function("route lookup, 1000 peers", |bench| {
        let mut i = 0;
        bench.iter(|| {
            i = (i + 1) & 1023;
            black_box(table.lookup(black_box(targets[i])))
        })
    });
}

/// Peer `i`'s own key. Bytes 1..5 carry `i`: X25519 clamps the low bits of byte 0, so
/// seeds that differ only there would be one key.
fn remote_key(i: u32) -> StaticSecret {
    let mut seed = [7u8; 32];
    seed[1..5].copy_from_slice(&i.to_le_bytes());
    StaticSecret::from(seed)
}

/// A peer table of `n` peers (10.77.x.y/32 each, endpoint 192.0.2.1), every one with a
/// completed handshake (the remote ends are dropped: only the sending side runs).
fn connected_table(n: u32) -> PeerTable {
    let ours = key(1);
    let mut table = PeerTable::default();
    for i in 0..n {
        let theirs = remote_key(i);
        let spec = PeerSpec {
            name: format!("robot{i}"),
            public_key: PublicKey::from(&theirs).to_bytes(),
            allowed_ips: vec![IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0a4d_0000 + i + 2)))],
            endpoint: Some(SocketAddr::from((
                [192, 0, 2, 1],
                51820 + (i % 1000) as u16,
            ))),
            persistent_keepalive: None,
            probe_interval: None,
            idles: false,
            groups: vec![],
            multicast: vec![],
            certified: false,
            behind_nat: false,
            candidates: Vec::new(),
        };
        match table.upsert(&ours, spec) {
            Ok(Some(next)) => table = next,
            other => panic!("peer {i} not added: {:?}", other.err()),
        }
    }
    let mut remote_buf = vec![0u8; 2048];
    let mut buf = vec![0u8; 2048];
    for (_, peer) in table.iter() {
        let mut t = peer.tunn.lock().unwrap();
        let init = match t.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => continue,
        };
        let theirs = remote_key(peer.name[5..].parse::<u32>().unwrap());
        let mut remote = Tunn::new(theirs, PublicKey::from(&ours), None, None, 7, None);
        let resp = match remote.decapsulate(None, &init, &mut remote_buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => continue,
        };
        let _ = t.decapsulate(None, &resp, &mut buf);
    }
    table
}

fn packet_path(c: &mut Criterion) {
    let table = connected_table(1000);
    let mut group = c.benchmark_group("packet path: route + encrypt + GSO batch");
    for (label, spread) in [
        ("64 x 1420 B to one peer", 1u32),
        ("64 x 1420 B over 8 peers", 8),
    ] {
        let packets: Vec<Vec<u8>> = (0..64u32)
            .map(|i| {
                let mut p = ipv4_packet(1420);
                p[16..20].copy_from_slice(&(0x0a4d_0000 + 2 + (i % spread) * 97).to_be_bytes());
                p
            })
            .collect();
        let mut batcher = Batcher::new(65535 + 1420 + 48, 64);
        // The setup holds: every packet is routed, and comes out encrypted.
        let mut sent = 0usize;
        for p in &packets {
            let peer = Tunn::dst_address(p)
                .and_then(|dst| table.route(dst))
                .and_then(|s| table.get(s))
                .expect("every packet has a peer");
            let to = peer.endpoint().expect("an endpoint");
            batcher.push(peer, to, p, &mut |_, c, _| sent += c.len());
        }
        batcher.flush(&mut |_, c, _| sent += c.len());
        assert_eq!(
            sent,
            64 * (1420 + 32),
            "{label}: not every packet came out encrypted"
        );
        group.throughput(Throughput::Bytes(64 * 1420));
        group.bench_function(label, |bench| {
            bench.iter(|| {
                let mut sent = 0usize;
                let mut send = |_to: SocketAddr, contents: &[u8], _segment: Option<usize>| {
                    sent += contents.len();
                };
                for p in &packets {
                    let Some(dst) = Tunn::dst_address(p) else {
                        continue;
                    };
                    let Some(peer) = table.route(dst).and_then(|s| table.get(s)) else {
                        continue;
                    };
                    let Some(to) = peer.endpoint() else { continue };
                    batcher.push(peer, to, black_box(p), &mut send);
                }
                batcher.flush(&mut send);
                black_box(sent)
            })
        });
    }
    group.finish();
}

/// The lanes' share of the outbound path: 64 packets as one TSO read brings them (62 bulk
/// segments, an ACK and a ping), classified, the bulk queued by buffer swap and dequeued.
fn lanes_cost(c: &mut Criterion) {
    let mut read: Vec<Vec<u8>> = (0..64).map(|_| ipv4_packet(1420)).collect();
    let mut ack = ipv4_packet(52);
    ack[9] = 6;
    ack[32] = 0x50;
    read[20] = ack;
    let mut ping = ipv4_packet(84);
    ping[9] = 1;
    read[40] = ping;
    let lens: Vec<usize> = read.iter().map(|p| p.len()).collect();
    // Queueing swaps buffers, so each round writes the headers back as a TUN read would
    // write whole packets (the copy the read costs is not the lanes' and is left out).
    let headers: Vec<Vec<u8>> = read.iter().map(|p| p[..52].to_vec()).collect();
    for p in read.iter_mut() {
        p.resize(1756, 0);
    }
    let mut bulk = BulkQueue::new(1 << 20);
    let mut urgent = 0usize;
    c.bench_function("lanes: classify + queue + dequeue, 64 packets", |bench| {
        bench.iter(|| {
            for (buf, header) in read.iter_mut().zip(&headers) {
                buf[..52].copy_from_slice(header);
            }
            for (buf, &len) in read.iter_mut().zip(&lens) {
                if lanes::urgent(&buf[..len]) {
                    urgent += 1;
                } else {
                    bulk.push(buf, len);
                }
            }
            while let Some((buf, len)) = bulk.pop() {
                black_box(len);
                bulk.recycle(buf);
            }
        })
    });
    assert!(urgent > 0, "the ACK and the ping were not urgent");
}

criterion_group!(benches, encap_decap, route_lookup, packet_path, lanes_cost);
criterion_main!(benches);
