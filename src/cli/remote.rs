//! `status`, `peers` and `plugins`: talk to a running node's control API.

use super::{FleetArgs, MembersArgs, PeersArgs, PluginsArgs, StatusArgs};
use crate::api::client;
use anyhow::{bail, Context};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;

pub(super) fn api_addr(
    api: &Option<String>,
    config: &Option<PathBuf>,
) -> anyhow::Result<SocketAddr> {
    if let Some(a) = api {
        return a
            .parse()
            .with_context(|| format!("--api {a}: expected ip:port, e.g. 127.0.0.1:7800"));
    }
    if let Some(path) = config {
        return Ok(crate::config::Config::load(path)?.control.listen);
    }
    if let Ok(a) = std::env::var("MYELIN_API") {
        return a
            .parse()
            .with_context(|| format!("MYELIN_API={a}: expected ip:port, e.g. 127.0.0.1:7800"));
    }
    Ok(SocketAddr::from(([127, 0, 0, 1], 7800)))
}

pub(super) async fn request(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<Value> {
    let (status, body) = client::call(addr, method, path, None, None)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}\n  fix: is the node running (`myelin up`)? Point --api or --config at it"
            )
        })?;
    let value: Value = serde_json::from_slice(&body)
        .with_context(|| format!("{addr}{path} answered {status} with a body that is not JSON"))?;
    if status >= 400 {
        let error = value["error"].as_str().unwrap_or("request failed");
        let hint = value["hint"].as_str().unwrap_or("");
        bail!("{error} (HTTP {status})\n  fix: {hint}");
    }
    Ok(value)
}

pub(super) fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(super) fn ms(v: &Value) -> String {
    v.as_f64()
        .map(|f| format!("{f:.1} ms"))
        .unwrap_or_else(|| "-".into())
}

pub async fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let addr = api_addr(&args.api, &args.config)?;
    let v = request(addr, "GET", "/api/v1/status").await?;
    if args.json {
        return print_json(&v);
    }
    let node = &v["node"];
    println!("node:       {}", node["name"].as_str().unwrap_or("?"));
    println!("public key: {}", node["public_key"].as_str().unwrap_or("?"));
    let addrs: Vec<&str> = node["overlay_addresses"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!("addresses:  {}", addrs.join(", "));
    println!(
        "version:    {} ({})",
        v["version"].as_str().unwrap_or("?"),
        v["git"].as_str().unwrap_or("?")
    );
    println!("uptime:     {:.0} s", v["uptime_s"].as_f64().unwrap_or(0.0));
    let t = &v["tunnel"];
    println!(
        "tunnel:     {} (UDP {}, MTU {}, offload {})",
        t["interface"].as_str().unwrap_or("?"),
        t["listen_port"],
        t["mtu"],
        if t["offload"] == true { "on" } else { "off" }
    );
    println!(
        "peers:      {} configured, {} up",
        v["peers"], v["peers_up"]
    );
    let c = &v["connectivity"];
    if c.is_object() {
        let seen: Vec<String> = c["observed"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|o| {
                        format!(
                            "{} by {}",
                            o["endpoint"].as_str().unwrap_or("?"),
                            o["lighthouse"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!("nat:        {}", c["nat"].as_str().unwrap_or("unknown"));
        if !seen.is_empty() {
            println!("seen as:    {}", seen.join(", "));
        }
        let relays: Vec<&str> = c["relays"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !relays.is_empty() {
            println!("relays:     {}", relays.join(", "));
        }
    }
    let plugins: Vec<String> = v["plugins"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    format!(
                        "{} ({})",
                        p["name"].as_str().unwrap_or("?"),
                        p["state"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "plugins:    {}",
        if plugins.is_empty() {
            "none".into()
        } else {
            plugins.join(", ")
        }
    );
    Ok(())
}

pub async fn whois(args: &super::WhoisArgs) -> anyhow::Result<()> {
    let addr = api_addr(&args.api, &args.config)?;
    // Checked here too, so a typo never becomes a path of another endpoint.
    let ip: std::net::IpAddr = args.address.parse().map_err(|_| {
        anyhow::anyhow!(
            "`{}` is not an IP address; e.g. `myelin whois 10.77.0.2`",
            args.address
        )
    })?;
    let v = request(addr, "GET", &format!("/api/v1/whois/{ip}")).await?;
    if args.json {
        return print_json(&v);
    }
    let groups: Vec<&str> = v["groups"]
        .as_array()
        .map(|g| g.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!(
        "{ip} is {} (key {}), groups [{}]",
        v["name"].as_str().unwrap_or("?"),
        v["public_key"].as_str().unwrap_or("?"),
        groups.join(", ")
    );
    match v["certificate"].as_object() {
        Some(c) => println!(
            "  certificate {} valid until {}, known by {}",
            c.get("fingerprint").and_then(Value::as_str).unwrap_or("?"),
            c.get("not_after").and_then(Value::as_str).unwrap_or("?"),
            c.get("source").and_then(Value::as_str).unwrap_or("?"),
        ),
        None => println!("  a static peer: no certificate, no groups"),
    }
    Ok(())
}

pub async fn firewall(args: &super::FirewallArgs) -> anyhow::Result<()> {
    let addr = api_addr(&args.api, &args.config)?;
    if args.reload {
        let r = request(addr, "POST", "/api/v1/firewall/reload").await?;
        if !args.json {
            println!(
                "reloaded: {} inbound and {} outbound rules",
                r["inbound"], r["outbound"]
            );
        }
    }
    let v = request(addr, "GET", "/api/v1/firewall").await?;
    if args.json {
        return print_json(&v);
    }
    if v["enabled"] != true {
        println!("no firewall: every peer may reach every port (add a [firewall] section; see docs/policy.md)");
        return Ok(());
    }
    let f = &v["firewall"];
    let rules = &f["rules"];
    let default = |allow: &Value| if allow == true { "allow" } else { "deny" };
    println!(
        "default inbound {}, outbound {}; {} flows tracked",
        default(&rules["default_inbound_allow"]),
        default(&rules["default_outbound_allow"]),
        f["flows"]
    );
    for side in ["inbound", "outbound"] {
        for r in rules[side].as_array().cloned().unwrap_or_default() {
            let peers = &r["peers"];
            let mut who = Vec::new();
            for key in ["groups", "hosts"] {
                if let Some(list) = peers[key].as_array().filter(|l| !l.is_empty()) {
                    let names: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
                    who.push(format!("{key} {}", names.join(",")));
                }
            }
            if let Some(c) = peers["cidr"].as_str() {
                who.push(format!("cidr {c}"));
            }
            let ports = match (r["ports"][0].as_u64(), r["ports"][1].as_u64()) {
                (Some(0), Some(65535)) | (None, _) | (_, None) => "any".to_string(),
                (Some(a), Some(b)) if a == b => a.to_string(),
                (Some(a), Some(b)) => format!("{a}-{b}"),
            };
            println!(
                "  {side:<8} allow {:<22} {} port {ports}  from {}",
                r["name"].as_str().unwrap_or("?"),
                r["proto"].as_str().unwrap_or("?"),
                if who.is_empty() {
                    "any peer".into()
                } else {
                    who.join("; ")
                }
            );
        }
    }
    match f["drops"].as_object().filter(|d| !d.is_empty()) {
        None => println!("nothing dropped"),
        Some(drops) => {
            for (cause, n) in drops {
                println!("  dropped {n} ({cause})");
            }
        }
    }
    Ok(())
}

pub async fn members(args: &MembersArgs) -> anyhow::Result<()> {
    let addr = api_addr(&args.api, &args.config)?;
    let v = request(addr, "GET", "/api/v1/members").await?;
    if args.json {
        return print_json(&v);
    }
    let members = v["members"].as_array().cloned().unwrap_or_default();
    if members.is_empty() {
        println!("no mesh members known (is [mesh] configured, and is a lighthouse reachable?)");
    }
    let list = |v: &Value| -> String {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    for m in members {
        let multicast = list(&m["multicast"]);
        println!(
            "{:<16} {:<20} groups [{}]  via {}  endpoint {}  valid until {}{}",
            m["name"].as_str().unwrap_or("?"),
            list(&m["addresses"]),
            list(&m["groups"]),
            m["source"].as_str().unwrap_or("?"),
            m["endpoint"].as_str().unwrap_or("-"),
            m["not_after"].as_str().unwrap_or("?"),
            if multicast.is_empty() {
                String::new()
            } else {
                format!("  multicast [{multicast}]")
            },
        );
    }
    Ok(())
}

pub async fn fleet(args: &FleetArgs) -> anyhow::Result<()> {
    let addr = api_addr(&args.api, &args.config)?;
    let v = request(addr, "GET", "/api/v1/fleet").await?;
    if args.json {
        return print_json(&v);
    }
    let members = v["members"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<14} {:<12} {:<9} {:<30} {:<18} {:>4} {:>4} {:>6} {:>5}",
        "MEMBER", "OVERLAY", "RTT", "INTERLOCK", "PLUGINS", "CPU", "MEM", "TEMP", "BATT"
    );
    for m in &members {
        print!("{}", fleet_row(m));
    }
    Ok(())
}

/// A member's word as one line of text: no control characters (a terminal would obey them),
/// at most 120 characters.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(120)
        .collect()
}

/// One member's line of `myelin fleet`, as `tailscale status` prints a peer.
fn fleet_row(m: &Value) -> String {
    let name = clean(m["name"].as_str().unwrap_or("?"));
    let overlay = clean(m["overlay"].as_str().unwrap_or("-"));
    let rtt = if m["self"] == true {
        "self".to_string()
    } else if m["online"] != true {
        "offline".to_string()
    } else {
        m["rtt_ms"]
            .as_f64()
            .map_or_else(|| "-".into(), |f| format!("{f:.1}ms"))
    };
    if m["reachable"] != true {
        let why = clean(m["error"].as_str().unwrap_or("no answer"));
        return format!("{name:<14} {overlay:<12} {rtt:<9} unreachable: {why}\n");
    }
    let summary = &m["summary"];
    let summaries: Vec<&Value> = summary["summaries"]
        .as_object()
        .map(|o| o.values().collect())
        .unwrap_or_default();
    let of_kind = |kind: &str| summaries.iter().find(|s| s["kind"] == kind).copied();
    let interlock = match of_kind("safety") {
        None => "-".to_string(),
        Some(s) => {
            let state = clean(s["state"].as_str().unwrap_or("?"));
            match s["reason"].as_str().filter(|_| state != "armed") {
                Some(reason) => format!("{state} ({})", clean(reason)),
                None => state,
            }
        }
    };
    let plugins = summary["plugins"].as_array().cloned().unwrap_or_default();
    let running = plugins.iter().filter(|p| p["state"] == "running").count();
    let troubled: Vec<String> = plugins
        .iter()
        .filter(|p| !matches!(p["state"].as_str(), Some("running" | "disabled")))
        .map(|p| {
            format!(
                "{} {}",
                clean(p["name"].as_str().unwrap_or("?")),
                clean(p["state"].as_str().unwrap_or("?"))
            )
        })
        .collect();
    let off = plugins.iter().filter(|p| p["state"] == "disabled").count();
    let plugin_text = if troubled.is_empty() && off == 0 {
        format!("{running} running")
    } else if troubled.is_empty() {
        format!("{running} running, {off} off")
    } else {
        troubled.join(", ")
    };
    let health = of_kind("health");
    let figure = |key: &str, unit: &str| {
        health
            .and_then(|h| h[key].as_f64())
            .map_or_else(|| "-".into(), |f| format!("{f:.0}{unit}"))
    };
    format!(
        "{name:<14} {overlay:<12} {rtt:<9} {interlock:<30} {plugin_text:<18} {:>4} {:>4} {:>6} {:>5}\n",
        figure("cpu_percent", "%"),
        figure("memory_used_percent", "%"),
        figure("temperature_c", "°C"),
        figure("battery_percent", "%"),
    )
}

/// "direct IPv4", "direct IPv6" or "relayed via <relay>", with the number of changes.
fn path_text(p: &Value) -> String {
    let path = match (p["relay"].as_str(), p["endpoint"].as_str()) {
        (Some(relay), Some(direct)) => {
            format!("relayed via {relay} (direct {direct} tried every 5 s)")
        }
        (Some(relay), None) => format!("relayed via {relay}"),
        (None, Some(e)) if e.starts_with('[') => "direct IPv6".to_string(),
        (None, Some(_)) => "direct IPv4".to_string(),
        (None, None) => "none (no endpoint yet)".to_string(),
    };
    match p["path_changes"].as_u64() {
        Some(n) if n > 0 => format!("{path}, {n} path changes"),
        _ => path,
    }
}

pub async fn peers(args: &PeersArgs) -> anyhow::Result<()> {
    let addr = api_addr(&args.api, &args.config)?;
    let v = request(addr, "GET", "/api/v1/peers").await?;
    if args.json {
        return print_json(&v);
    }
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    if peers.is_empty() {
        println!("no peers configured");
    }
    // Mesh members' own addresses (from the roster); a node outside a mesh has none.
    let members = request(addr, "GET", "/api/v1/members")
        .await
        .ok()
        .and_then(|m| m["members"].as_array().cloned())
        .unwrap_or_default();
    for p in peers {
        println!(
            "peer: {}  ({})",
            p["name"].as_str().unwrap_or("?"),
            p["public_key"].as_str().unwrap_or("?")
        );
        println!(
            "  endpoint:         {}",
            p["endpoint"].as_str().unwrap_or("(none)")
        );
        println!("  path:             {}", path_text(&p));
        let candidates: Vec<&str> = members
            .iter()
            .find(|m| m["name"] == p["name"])
            .and_then(|m| m["candidates"].as_array())
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !candidates.is_empty() {
            println!("  candidates:       {}", candidates.join(", "));
        }
        let ips: Vec<&str> = p["overlay_ips"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!("  allowed ips:      {}", ips.join(", "));
        println!(
            "  latest handshake: {}",
            p["last_handshake_age_ms"]
                .as_u64()
                .map(|m| format!("{:.1} s ago", m as f64 / 1000.0))
                .unwrap_or_else(|| "never".into())
        );
        println!(
            "  transfer:         {} B received, {} B sent",
            p["rx_bytes"], p["tx_bytes"]
        );
        println!(
            "  rtt:              {}  loss: {}",
            ms(&p["rtt_ms"]),
            p["loss"]
                .as_f64()
                .map(|l| format!("{:.1}%", l * 100.0))
                .unwrap_or_else(|| "-".into())
        );
    }
    Ok(())
}

pub async fn plugins(args: &PluginsArgs) -> anyhow::Result<()> {
    let addr = api_addr(&args.api, &args.config)?;
    if args.words.len() > 2 {
        bail!("too many arguments: use `myelin plugins [list|enable|disable|restart] [NAME]`");
    }
    let action = args.words.first().map(String::as_str).unwrap_or("list");
    let name = args.words.get(1);
    let v = match (action, name) {
        ("list", None) => request(addr, "GET", "/api/v1/plugins").await?,
        ("list", Some(name)) => {
            serde_json::json!({ "plugins": [request(addr, "GET", &format!("/api/v1/plugins/{name}")).await?] })
        }
        ("enable" | "disable" | "restart", Some(name)) => {
            serde_json::json!({ "plugins": [request(addr, "POST", &format!("/api/v1/plugins/{name}/{action}")).await?] })
        }
        ("enable" | "disable" | "restart", None) => bail!(
            "`myelin plugins {action}` needs a plugin name, e.g. `myelin plugins {action} zenoh`"
        ),
        (other, _) => bail!("unknown action `{other}`: use list, enable, disable or restart"),
    };
    if args.json {
        return print_json(&v);
    }
    println!(
        "{:<14} {:<10} {:<9} {:<11} {:>8} {:>8}  last failure",
        "NAME", "PLUGIN", "ISOLATION", "STATE", "RESTARTS", "PID"
    );
    for p in v["plugins"].as_array().cloned().unwrap_or_default() {
        let last = p["failures"]
            .as_array()
            .and_then(|f| f.last())
            .and_then(|f| f["reason"].as_str())
            .unwrap_or("-")
            .to_string();
        println!(
            "{:<14} {:<10} {:<9} {:<11} {:>8} {:>8}  {}",
            p["name"].as_str().unwrap_or("?"),
            p["plugin"].as_str().unwrap_or("?"),
            p["isolation"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
            p["restarts"],
            p["pid"]
                .as_u64()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            last
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_cannot_draw_on_the_terminal() {
        let card = serde_json::json!({
            "name": "robot1\u{1b}[2J",
            "overlay": "10.77.0.2",
            "online": true,
            "reachable": false,
            "error": "gone\r\nrobot9 10.77.0.9 fine",
        });
        let line = fleet_row(&card);
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(!line.contains('\u{1b}') && !line.contains('\r'), "{line:?}");
        assert!(line.contains("unreachable: gone  robot9"), "{line:?}");
    }
}
