//! `safety [status|rearm]`: the safety plugin's interlock from the command line.

use super::remote::{api_addr, ms, print_json, request};
use super::SafetyArgs;
use anyhow::bail;

/// `myelin safety [status|rearm]`: the safety plugin's routes through the control API.
pub async fn safety(args: &SafetyArgs) -> anyhow::Result<()> {
    let addr = api_addr(&args.api, &args.config)?;
    let base = format!("/plugins/{}", args.instance);
    let v = match args.action.as_str() {
        "status" => request(addr, "GET", &format!("{base}/status")).await?,
        "rearm" => request(addr, "POST", &format!("{base}/rearm")).await?,
        other => bail!("unknown safety action `{other}`\n  fix: use `myelin safety status` or `myelin safety rearm`"),
    };
    if args.json {
        return print_json(&v);
    }
    if args.action == "rearm" {
        println!("re-armed: motion is permitted (nothing was commanded)");
        return Ok(());
    }
    let state = v["state"].as_str().unwrap_or("unknown");
    if v["stopped"].as_bool() == Some(true) {
        println!(
            "SAFE STOP ({state}): {}{}{}",
            v["reason"].as_str().unwrap_or("tripped"),
            v["peer"]
                .as_str()
                .map(|p| format!(" on the link to {p}"))
                .unwrap_or_default(),
            v["rtt_ms"]
                .as_f64()
                .map(|r| format!(", probe {r:.0} ms"))
                .unwrap_or_default()
        );
        if state == "latched" {
            println!("the link is good again: `myelin safety rearm` permits motion");
        } else if v["rearm_required"].as_bool() == Some(true) {
            println!("once the link is good, a re-arm is needed to permit motion");
        } else if v["reason"].as_str() == Some("startup") {
            println!("motion is permitted once the link has been good for the clearing time");
        }
    } else {
        println!("armed: motion permitted");
    }
    println!("trips since start: {}", v["trips"].as_u64().unwrap_or(0));
    for a in v["actions"].as_array().into_iter().flatten() {
        println!(
            "  action {} {:<28} {}{}",
            a["kind"].as_str().unwrap_or("?"),
            a["target"].as_str().unwrap_or(""),
            if a["pending"].as_bool() == Some(true) {
                format!("applying generation {}", a["generation"])
            } else {
                format!(
                    "applied {} (generation {})",
                    a["applied_state"].as_str().unwrap_or("nothing yet"),
                    a["applied_generation"]
                )
            },
            match a["failures"].as_u64() {
                Some(0) | None => String::new(),
                Some(n) => format!(
                    ", {n} failures, last: {}",
                    a["last_error"].as_str().unwrap_or("?")
                ),
            }
        );
    }
    if let Some(e) = v["state_file_error"].as_str() {
        println!(
            "cannot save the state to {}: {e}",
            v["state_file"].as_str().unwrap_or("?")
        );
    }
    for l in v["links"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} rtt {:>10}  last answer {:>6.0} ms ago{}",
            l["peer"].as_str().unwrap_or("?"),
            ms(&l["rtt_ms"]),
            l["since_answer_ms"].as_f64().unwrap_or(f64::NAN),
            l["good_for_s"]
                .as_f64()
                .map(|g| format!("  good for {g:.1} s"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
