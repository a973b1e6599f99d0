//! A lighthouse serving a fleet of 1000 robots and 5 operators, in process: the CPU one
//! registration costs (certificate checks, the roster answer, encoding what goes out), the
//! steady-state refresh of a robot and of an operator (whose roster lists every robot), and the
//! memory the lighthouse holds per member (counted by a wrapping allocator, printed once).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ed25519_dalek::SigningKey;
use myelin::mesh::cert::{CertBody, Certificate, Role};
use myelin::mesh::control::{LighthouseConfig, Mesh, MeshConfig, Output};
use myelin::mesh::wire::Message;
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

/// Bytes currently allocated by the process.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const ROBOTS: u32 = 1000;
const OPERATORS: u32 = 5;

/// One moment for every certificate made here: a member's certificate must fall within its
/// issuer's validity, and the CA is made again for every fresh lighthouse.
fn unix() -> u64 {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *START.get_or_init(myelin::mesh::shell::unix_now)
}

fn signed(
    ca: &SigningKey,
    role: Role,
    name: &str,
    key: [u8; 32],
    net: &str,
    groups: &[&str],
) -> Certificate {
    let now = unix();
    Certificate::sign(
        CertBody {
            role,
            name: name.into(),
            public_key: key,
            networks: if net.is_empty() {
                vec![]
            } else {
                vec![net.parse().unwrap()]
            },
            groups: groups.iter().map(|g| g.to_string()).collect(),
            not_before: now - 60,
            not_after: now + 86_400,
            max_days: 0,
            issuer: [0; 32],
        },
        ca,
    )
    .unwrap()
}

/// A member: its WireGuard key, its Hello and its Register, encoded as they arrive.
struct Member {
    key: [u8; 32],
    hello: Vec<u8>,
    register: Vec<u8>,
}

fn key_of(i: u32) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    k[31] = 1;
    k
}

fn fleet(ca: &SigningKey) -> Vec<Member> {
    let mut members = Vec::new();
    for i in 0..ROBOTS + OPERATORS {
        let operator = i >= ROBOTS;
        let (name, groups, talk_to): (String, &[&str], Vec<String>) = if operator {
            (
                format!("operator{i}"),
                &["operators"],
                vec!["robots".into(), "operators".into()],
            )
        } else {
            (format!("robot{i}"), &["robots"], vec!["operators".into()])
        };
        let addr = format!("10.77.{}.{}/16", 1 + i / 250, 1 + i % 250);
        let cert = signed(ca, Role::Node, &name, key_of(i), &addr, groups);
        members.push(Member {
            key: key_of(i),
            hello: Message::Hello {
                chain: vec![cert.to_bytes().to_vec()],
            }
            .encode(),
            register: Message::Register {
                talk_to,
                candidates: vec![format!("192.0.2.{}:51820", i % 250).parse().unwrap()],
                refresh_s: 30,
                multicast: vec![],
            }
            .encode(),
        });
    }
    members
}

fn lighthouse(ca_key: &SigningKey, now: Instant) -> Mesh {
    let ca = signed(
        ca_key,
        Role::Ca,
        "fleet",
        ca_key.verifying_key().to_bytes(),
        "",
        &[],
    );
    let own = signed(
        ca_key,
        Role::Node,
        "lighthouse",
        [0xee; 32],
        "10.77.0.250/16",
        &["lighthouses"],
    );
    Mesh::new(
        MeshConfig {
            ca,
            chain: vec![own],
            lighthouses: vec![LighthouseConfig {
                name: "lighthouse".into(),
                public_key: [0xee; 32],
                overlay: "10.77.0.250".parse().unwrap(),
                endpoint: "192.0.2.250:51820".parse().unwrap(),
            }],
            talk_to: vec![],
            multicast: vec![],
            candidates: vec![],
            listen_port: 51820,
            lighthouse: true,
            relay: true,
            refresh: Duration::from_secs(30),
            revocations: None,
            issuer: None,
        },
        now,
    )
}

/// Delivers one member's Hello and Register; encodes everything the lighthouse sends (as the
/// shell does) and returns the bytes.
fn register(lh: &mut Mesh, m: &Member, now: Instant, unix: u64) -> usize {
    let from = Some("192.0.2.1:51820".parse().unwrap());
    lh.handle(m.key, from, &m.hello, now, unix);
    lh.handle(m.key, from, &m.register, now, unix);
    drain(lh)
}

fn drain(lh: &mut Mesh) -> usize {
    let mut bytes = 0;
    while let Some(o) = lh.poll_output() {
        if let Output::Send { message, .. } = o {
            bytes += black_box(message.encode()).len();
        }
    }
    bytes
}

fn full(ca: &SigningKey, members: &[Member], now: Instant, unix: u64) -> Mesh {
    let mut lh = lighthouse(ca, now);
    // Operators first, as in a fleet that exists before its robots: every robot join is news
    // for five operators.
    for m in members.iter().rev() {
        register(&mut lh, m, now, unix);
    }
    lh
}

fn memory_per_member(ca: &SigningKey, members: &[Member]) {
    let now = Instant::now();
    let before = LIVE.load(Ordering::Relaxed);
    let lh = full(ca, members, now, unix());
    let after = LIVE.load(Ordering::Relaxed);
    let per = (after - before) as f64 / members.len() as f64;
    println!(
        "lighthouse with {} members: {:.1} KiB held, {:.0} bytes per member ({} listed)",
        members.len(),
        (after - before) as f64 / 1024.0,
        per,
        lh.members().len()
    );
}

fn bench(c: &mut Criterion) {
    let ca = SigningKey::from_bytes(&[7; 32]);
    let members = fleet(&ca);
    memory_per_member(&ca, &members);
    let unix = unix();
    let mut g = c.benchmark_group("lighthouse");
    g.sample_size(10);
    g.throughput(Throughput::Elements(members.len() as u64));
    g.bench_function("1005 members register from cold", |b| {
        b.iter_batched(
            || lighthouse(&ca, Instant::now()),
            |mut lh| {
                let now = Instant::now();
                for m in members.iter().rev() {
                    register(&mut lh, m, now, unix);
                }
                lh
            },
            BatchSize::LargeInput,
        )
    });
    // A join storm as it plays out: one member every 10 ms for ten seconds, the lighthouse's
    // timers running, so the coalesced roster pushes to the operators go out as they would.
    let storm = |lh: &mut Mesh| {
        let t0 = Instant::now();
        let mut bytes = 0;
        for (i, m) in members.iter().rev().enumerate() {
            let now = t0 + Duration::from_millis(10 * i as u64);
            lh.handle_timeout(now, unix);
            bytes += drain(lh);
            bytes += register(lh, m, now, unix);
        }
        bytes
    };
    g.bench_function("1005 members join over 10 s, pushes included", |b| {
        b.iter_batched(
            || lighthouse(&ca, Instant::now()),
            |mut lh| storm(&mut lh),
            BatchSize::LargeInput,
        )
    });
    let storm_bytes = storm(&mut lighthouse(&ca, Instant::now()));
    println!(
        "the join storm sent {:.1} MiB in all",
        storm_bytes as f64 / (1 << 20) as f64
    );
    g.throughput(Throughput::Elements(1));
    let now = Instant::now();
    let mut lh = full(&ca, &members, now, unix);
    assert_eq!(lh.members().len(), members.len(), "every member registered");
    drain(&mut lh);
    let robot = &members[0];
    let operator = &members[members.len() - 1];
    g.bench_function("a robot refreshes (roster: 5 operators)", |b| {
        b.iter(|| {
            lh.handle(robot.key, None, &robot.register, now, unix);
            drain(&mut lh)
        })
    });
    g.bench_function("an operator refreshes (roster: 1004 members)", |b| {
        b.iter(|| {
            lh.handle(operator.key, None, &operator.register, now, unix);
            drain(&mut lh)
        })
    });
    g.finish();
    let bytes = {
        lh.handle(operator.key, None, &operator.register, now, unix);
        drain(&mut lh)
    };
    println!(
        "an operator's roster of {} members: {bytes} bytes",
        members.len() - 1
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
