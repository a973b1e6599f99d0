//! Per-packet costs of the data plane: WireGuard encapsulate + decapsulate for 64, 512 and
//! 1420-byte packets between two in-memory peers, and an allowed-IPs lookup among 1000 peers.

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ipnet::IpNet;
use myelin::tunnel::routes::RouteTable;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

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

criterion_group!(benches, encap_decap, route_lookup);
criterion_main!(benches);
