//! Zenoh latency and throughput between two zenoh peers, for `scripts/bench-zenoh.sh`, which
//! runs the two sides in two lab namespaces and points them at each other's overlay address
//! (through Myelin) and underlay address (the raw veth).
//!
//! ```text
//! zenoh_link pong <listen locator>
//! zenoh_link ping <connect locator> <payload bytes> <round trips>     # JSON: RTT p50/p99
//! zenoh_link sink <listen locator>                                    # JSON: what arrived
//! zenoh_link flood <connect locator> <payload bytes> <seconds>
//! ```
//!
//! Without arguments (as `cargo bench` runs it) both sides run in this process over loopback.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zenoh::qos::CongestionControl;
use zenoh::Wait;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const WAIT: Duration = Duration::from_secs(20);

fn session(listen: Option<&str>, connect: Option<&str>) -> Result<zenoh::Session> {
    let mut c = zenoh::Config::default();
    c.insert_json5("mode", "\"peer\"")?;
    c.insert_json5("scouting/multicast/enabled", "false")?;
    c.insert_json5("scouting/gossip/enabled", "false")?;
    if let Some(l) = listen {
        c.insert_json5("listen/endpoints", &format!("[\"{l}\"]"))?;
    }
    if let Some(e) = connect {
        c.insert_json5("connect/endpoints", &format!("[\"{e}\"]"))?;
    }
    zenoh::open(c).wait()
}

/// Answers every ping with the same payload.
fn pong(listen: &str) -> Result<()> {
    let s = session(Some(listen), None)?;
    let publisher = s
        .declare_publisher("bench/pong")
        .congestion_control(CongestionControl::Block)
        .express(true)
        .wait()?;
    let sub = s.declare_subscriber("bench/ping").wait()?;
    println!("ready");
    while let Ok(sample) = sub.recv() {
        publisher.put(sample.payload().clone()).wait()?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

fn ping(connect: &str, size: usize, count: usize) -> Result<String> {
    let s = session(None, Some(connect))?;
    let publisher = s
        .declare_publisher("bench/ping")
        .congestion_control(CongestionControl::Block)
        .express(true)
        .wait()?;
    let sub = s.declare_subscriber("bench/pong").wait()?;
    let payload = vec![0x5a_u8; size];
    // Until the first answer: the pong side may still be connecting and subscribing.
    let deadline = Instant::now() + WAIT;
    loop {
        publisher.put(payload.clone()).wait()?;
        if sub.recv_timeout(Duration::from_millis(500))?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            return Err(
                format!("no answer from the pong side at {connect} within {WAIT:?}").into(),
            );
        }
    }
    let warmup = (count / 10).max(10);
    let mut rtts = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t0 = Instant::now();
        publisher.put(payload.clone()).wait()?;
        if sub.recv_timeout(Duration::from_secs(5))?.is_none() {
            return Err(format!("round trip {i} lost (no answer within 5 s)").into());
        }
        if i >= warmup {
            rtts.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    rtts.sort_by(f64::total_cmp);
    Ok(format!(
        "{{\"size\":{size},\"round_trips\":{count},\"rtt_p50_us\":{:.1},\"rtt_p99_us\":{:.1}}}",
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99)
    ))
}

/// Counts what arrives on `bench/flood` until the flood side says it is done, then
/// acknowledges so the flood side knows everything arrived before it closes.
fn sink(listen: &str) -> Result<String> {
    let s = session(Some(listen), None)?;
    let bytes = Arc::new(AtomicU64::new(0));
    let msgs = Arc::new(AtomicU64::new(0));
    let span: Arc<std::sync::Mutex<Option<(Instant, Instant)>>> = Arc::default();
    let (b, m, sp) = (bytes.clone(), msgs.clone(), span.clone());
    let _flood = s
        .declare_subscriber("bench/flood")
        .callback(move |sample| {
            let now = Instant::now();
            if let Ok(mut span) = sp.lock() {
                let first = span.map_or(now, |(f, _)| f);
                *span = Some((first, now));
            }
            b.fetch_add(sample.payload().len() as u64, Ordering::Relaxed);
            m.fetch_add(1, Ordering::Relaxed);
        })
        .wait()?;
    let end = s.declare_subscriber("bench/end").wait()?;
    let ack = s.declare_publisher("bench/ack").wait()?;
    println!("ready");
    end.recv()?;
    ack.put("ok").wait()?;
    let secs = span
        .lock()
        .ok()
        .and_then(|s| *s)
        .map(|(first, last)| (last - first).as_secs_f64())
        .unwrap_or(f64::NAN);
    let bytes = bytes.load(Ordering::Relaxed);
    let msgs = msgs.load(Ordering::Relaxed);
    Ok(format!(
        "{{\"messages\":{msgs},\"bytes\":{bytes},\"seconds\":{secs:.3},\"mbit_s\":{:.1},\"msg_s\":{:.0}}}",
        bytes as f64 * 8.0 / secs / 1e6,
        msgs as f64 / secs
    ))
}

fn flood(connect: &str, size: usize, seconds: f64) -> Result<()> {
    let s = session(None, Some(connect))?;
    let publisher = s
        .declare_publisher("bench/flood")
        .congestion_control(CongestionControl::Block)
        .wait()?;
    let end = s
        .declare_publisher("bench/end")
        .congestion_control(CongestionControl::Block)
        .wait()?;
    let ack = s.declare_subscriber("bench/ack").wait()?;
    let deadline = Instant::now() + WAIT;
    while !publisher.matching_status().wait()?.matching()
        || !end.matching_status().wait()?.matching()
    {
        if Instant::now() > deadline {
            return Err(format!("no sink subscribed at {connect} within {WAIT:?}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let payload = zenoh::bytes::ZBytes::from(vec![0xa5_u8; size]);
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < stop {
        publisher.put(payload.clone()).wait()?;
    }
    // Until the sink acknowledges: the end marker queues behind the flood.
    let deadline = Instant::now() + WAIT;
    loop {
        end.put("done").wait()?;
        if ack.recv_timeout(Duration::from_secs(1))?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("the sink at {connect} never acknowledged the end").into());
        }
    }
    s.close().wait()?;
    Ok(())
}

fn loopback() -> Result<()> {
    let port = 17447;
    let listen = format!("tcp/127.0.0.1:{port}");
    let l = listen.clone();
    std::thread::spawn(move || pong(&l));
    for size in [1024, 1 << 20] {
        println!("loopback {}", ping(&listen, size, 1000)?);
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let num = |i: usize, what: &str| -> Result<f64> {
        arg(i)
            .parse::<f64>()
            .map_err(|_| format!("{what}: expected a number, got `{}`", arg(i)).into())
    };
    let result: Result<()> = (|| match arg(0) {
        "" => loopback(),
        "pong" => pong(arg(1)),
        "ping" => {
            println!(
                "{}",
                ping(
                    arg(1),
                    num(2, "payload bytes")? as usize,
                    num(3, "round trips")? as usize
                )?
            );
            Ok(())
        }
        "sink" => {
            println!("{}", sink(arg(1))?);
            Ok(())
        }
        "flood" => flood(
            arg(1),
            num(2, "payload bytes")? as usize,
            num(3, "seconds")?,
        ),
        other => Err(format!("unknown mode `{other}`: pong, ping, sink or flood").into()),
    })();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
