//! The fleet view. `GET /api/v1/summary` is this node's card: its plugins and what each of
//! them summarises (`GET /summary` of a plugin: the interlock, health figures, video streams).
//! `GET /api/v1/fleet` gathers every member's card from its API over the overlay, each with its
//! own timeout, so one unreachable robot never holds up the rest. `GET /api/v1/fleet/events`
//! streams the cards and a timeline (trips, clears, re-arms, plugin failures and restarts,
//! peers up and down). `POST /api/v1/fleet/{member}/rearm` re-arms a member's interlock.

use super::{client, ApiError, ApiState};
use crate::host::PluginState;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use myelin_sdk::{Caller, Via, CALLER_HEADER};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a member's API has to answer before its card says unreachable.
pub const MEMBER_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a plugin has to answer `GET /summary`.
const PLUGIN_TIMEOUT: Duration = Duration::from_millis(800);
/// A member's card is read up to this; a real one is a few KiB.
const MAX_CARD: usize = 256 * 1024;
/// Timeline entries kept.
const TIMELINE: usize = 500;
/// How often an open event stream asks the members again.
const POLL: Duration = Duration::from_secs(1);
/// A gathering this recent is shared instead of asking every member again.
const FRESH: Duration = Duration::from_millis(900);
/// Member-supplied text kept in the timeline, at most.
const MAX_TEXT: usize = 200;
/// Plugins of one member the timeline follows, and entries one member may add per gathering.
const MAX_PLUGINS: usize = 32;
const MAX_ENTRIES_PER_MEMBER: usize = 8;

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The fleet view's state: the port members' APIs listen on and the timeline.
pub struct Fleet {
    /// The port of each member's API on its overlay address (`[control].fleet_port`).
    pub port: u16,
    tracker: Mutex<Tracker>,
    /// One gathering at a time, shared by every stream and request that asks within `FRESH`
    /// of it: the timeline sees gatherings in order, and members are asked once however many
    /// pages are open.
    gathering: tokio::sync::Mutex<Option<(std::time::Instant, Vec<Value>)>>,
}

impl Fleet {
    pub fn new(port: u16) -> Fleet {
        Fleet {
            port,
            tracker: Mutex::new(Tracker {
                boot: unix_ms(),
                ..Tracker::default()
            }),
            gathering: tokio::sync::Mutex::new(None),
        }
    }

    fn note(&self, member: &str, kind: &'static str, text: String) {
        if let Ok(mut t) = self.tracker.lock() {
            t.push(member, kind, text, unix_ms());
        }
    }

    /// Timeline entries after sequence number `after`, oldest first.
    fn since(&self, after: u64) -> Vec<Entry> {
        self.tracker
            .lock()
            .map(|t| {
                t.timeline
                    .iter()
                    .filter(|e| e.seq > after)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// One line of the fleet's timeline.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Entry {
    /// When this node's timeline began (its start): sequence numbers restart with it.
    pub boot: u64,
    pub seq: u64,
    pub at_unix_ms: u64,
    pub member: String,
    /// `peer_up`, `peer_down`, `unreachable`, `reachable`, `trip`, `latched`, `clear`,
    /// `rearm`, `rearm_request`, `plugin_failed`, `plugin_restart`.
    pub kind: &'static str,
    pub text: String,
}

/// What was last seen of a member, to tell what changed.
#[derive(Clone, Debug, Default, PartialEq)]
struct Seen {
    online: bool,
    reachable: bool,
    /// The interlock's state and reason.
    safety: Option<(String, Option<String>)>,
    rearm_at: Option<u64>,
    /// Each plugin's state and restart count.
    plugins: HashMap<String, (String, u64)>,
}

#[derive(Default)]
struct Tracker {
    boot: u64,
    seq: u64,
    timeline: VecDeque<Entry>,
    seen: HashMap<String, Seen>,
}

impl Tracker {
    fn push(&mut self, member: &str, kind: &'static str, text: String, now_ms: u64) {
        let text = clip(&text, 2 * MAX_TEXT);
        let member = clip(member, 64);
        self.seq += 1;
        self.timeline.push_back(Entry {
            boot: self.boot,
            seq: self.seq,
            at_unix_ms: now_ms,
            member,
            kind,
            text,
        });
        while self.timeline.len() > TIMELINE {
            self.timeline.pop_front();
        }
    }

    /// Compares `cards` with what was seen before and adds what changed to the timeline.
    /// A member seen for the first time adds only a safe stop that is already in force.
    fn observe(&mut self, cards: &[Value], now_ms: u64) {
        // Members that left the fleet are forgotten (a roster changes over months).
        self.seen
            .retain(|name, _| cards.iter().any(|c| c["name"] == name.as_str()));
        for card in cards {
            let Some(name) = card["name"].as_str() else {
                continue;
            };
            let mut now = seen_of(card);
            // An unreachable member tells nothing of its interlock or plugins: what was known
            // stands, so its return is no re-arm or restart.
            if let (false, Some(before)) = (now.reachable, self.seen.get(name)) {
                now.safety = before.safety.clone();
                now.rearm_at = before.rearm_at;
                now.plugins = before.plugins.clone();
            }
            let before = self.seen.insert(name.to_string(), now.clone());
            let Some(before) = before else {
                if let Some(stop) = stop_in_force(&now) {
                    self.push(name, "trip", stop, now_ms);
                }
                continue;
            };
            if before.online != now.online {
                let (kind, text) = if now.online {
                    ("peer_up", "session up".to_string())
                } else {
                    ("peer_down", "session down".to_string())
                };
                self.push(name, kind, text, now_ms);
            }
            if before.reachable != now.reachable {
                let (kind, text) = if now.reachable {
                    ("reachable", "its API answers again".to_string())
                } else {
                    let why = clip(card["error"].as_str().unwrap_or("no answer"), MAX_TEXT);
                    ("unreachable", format!("its API does not answer: {why}"))
                };
                self.push(name, kind, text, now_ms);
            }
            if now.reachable {
                let mut changes = safety_changes(&before, &now, card);
                changes.extend(plugin_changes(&before, &now, card));
                // One member cannot push the others out of the timeline.
                let more = changes.len().saturating_sub(MAX_ENTRIES_PER_MEMBER);
                changes.truncate(MAX_ENTRIES_PER_MEMBER);
                if more > 0 {
                    let text = format!("{more} more changes at once, not listed");
                    changes.push(("plugin_restart", text));
                }
                for (kind, text) in changes {
                    self.push(name, kind, text, now_ms);
                }
            }
        }
    }
}

/// A timeline change: its kind and text.
type Change = (&'static str, String);

/// The safe stop a member's interlock is in, when it is seen for the first time (or again
/// after a gap): that is news; an earlier re-arm is not.
fn stop_in_force(now: &Seen) -> Option<String> {
    let (state, reason) = now.safety.as_ref()?;
    let reason = reason.as_deref().unwrap_or("unknown");
    (state != "armed").then(|| format!("safe stop in force ({state}, {reason})"))
}

fn safety_changes(before: &Seen, now: &Seen, card: &Value) -> Vec<Change> {
    let Some((was, _)) = &before.safety else {
        // Not seen before (unreachable or restarting since): as at a first look.
        return stop_in_force(now)
            .map(|t| ("trip", t))
            .into_iter()
            .collect();
    };
    let mut changes = Vec::new();
    if let Some((state, reason)) = &now.safety {
        if was != state {
            let reason = reason.as_deref().unwrap_or("unknown");
            changes.push(match state.as_str() {
                "tripped" => ("trip", format!("safe stop: {reason}")),
                "latched" => ("latched", "link good again; latched until re-armed".into()),
                "clearing" => ("clear", "link good again; clearing".into()),
                "armed" => ("clear", "armed: motion permitted".into()),
                other => ("trip", format!("interlock {other}")),
            });
        }
    }
    if now.rearm_at.is_some() && now.rearm_at != before.rearm_at {
        let by = clip(
            safety_of(card)
                .and_then(|s| s["last_rearm"]["by"].as_str())
                .unwrap_or("unknown"),
            MAX_TEXT,
        );
        changes.push(("rearm", format!("re-armed by {by}")));
    }
    changes
}

fn plugin_changes(before: &Seen, now: &Seen, card: &Value) -> Vec<Change> {
    let mut names: Vec<&String> = now.plugins.keys().collect();
    names.sort();
    let mut changes = Vec::new();
    for plugin in names {
        let (state, restarts) = &now.plugins[plugin];
        let Some((was, was_restarts)) = before.plugins.get(plugin) else {
            continue;
        };
        let reason = last_failure(card, plugin).unwrap_or_default();
        if state == "failed" && was != "failed" {
            changes.push(("plugin_failed", format!("plugin {plugin} failed: {reason}")));
        } else if restarts > was_restarts {
            let text = format!("plugin {plugin} restarted ({restarts} restarts): {reason}");
            changes.push(("plugin_restart", text));
        }
    }
    changes
}

/// At most `max` characters of `text`, without control characters (they reach terminals).
fn clip(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

fn seen_of(card: &Value) -> Seen {
    let plugins = card["summary"]["plugins"]
        .as_array()
        .map(|list| {
            list.iter()
                .take(MAX_PLUGINS)
                .filter_map(|p| {
                    Some((
                        clip(p["name"].as_str()?, 64),
                        (
                            clip(p["state"].as_str().unwrap_or(""), 32),
                            p["restarts"].as_u64().unwrap_or(0),
                        ),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let safety = safety_of(card);
    Seen {
        online: card["online"] == true,
        reachable: card["reachable"] == true,
        safety: safety.and_then(|s| {
            Some((
                clip(s["state"].as_str()?, 32),
                s["reason"].as_str().map(|r| clip(r, MAX_TEXT)),
            ))
        }),
        rearm_at: safety.and_then(|s| s["last_rearm"]["at_unix_ms"].as_u64()),
        plugins,
    }
}

/// The first summary of kind `safety` in a card, with its plugin instance's name.
fn safety_instance(card: &Value) -> Option<(&str, &Value)> {
    card["summary"]["summaries"]
        .as_object()?
        .iter()
        .find(|(_, v)| v["kind"] == "safety")
        .map(|(k, v)| (k.as_str(), v))
}

fn safety_of(card: &Value) -> Option<&Value> {
    safety_instance(card).map(|(_, v)| v)
}

fn last_failure(card: &Value, plugin: &str) -> Option<String> {
    card["summary"]["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == plugin)?["last_failure"]
        .as_str()
        .map(|f| clip(f, MAX_TEXT))
}

/// A plugin instance name as it may appear in a path: what the node's config allows.
fn is_instance_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `GET /summary` of plugin `name`, if it serves one.
async fn plugin_summary(s: &ApiState, name: &str) -> Option<Value> {
    let req = Request::builder()
        .uri("/summary")
        .header("host", "plugin")
        .header(CALLER_HEADER, Caller::local().to_header())
        .body(Body::empty())
        .ok()?;
    let socket = s.host.http_socket(name);
    let answer = tokio::time::timeout(PLUGIN_TIMEOUT, async {
        let resp = client::unix(&socket, req).await.ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_CARD)
            .collect()
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice::<Value>(&body).ok()
    })
    .await
    .ok()
    .flatten()?;
    answer.is_object().then_some(answer)
}

/// This node's card: identity, version, plugins and their summaries.
pub async fn own_summary(s: &ApiState) -> Value {
    let statuses = s.host.statuses();
    let serving: Vec<String> = statuses
        .iter()
        .filter(|p| p.serves_http && p.state == PluginState::Running)
        .map(|p| p.name.clone())
        .collect();
    let answers =
        futures::future::join_all(serving.iter().map(|name| plugin_summary(s, name))).await;
    let summaries: serde_json::Map<String, Value> = serving
        .into_iter()
        .zip(answers)
        .filter_map(|(name, v)| Some((name, v?)))
        .collect();
    let info = crate::build_info::build_info();
    json!({
        "node": s.node.name,
        "overlay_addresses": s.node.overlay_addresses,
        "version": info.version,
        "plugins": statuses.iter().map(|p| json!({
            "name": p.name,
            "plugin": p.plugin,
            "state": p.state.as_str(),
            "enabled": p.enabled,
            "restarts": p.restarts,
            "last_failure": p.failures.last().map(|f| f.reason.clone()),
        })).collect::<Vec<_>>(),
        "summaries": summaries,
    })
}

pub async fn summary(State(s): State<Arc<ApiState>>) -> Json<Value> {
    Json(own_summary(&s).await)
}

/// A member's overlay address to ask: its first host address (a peer's allowed IPs also
/// hold routed ranges), IPv4 first.
fn member_address(overlay_ips: &[ipnet::IpNet]) -> Option<IpAddr> {
    first_address(
        overlay_ips
            .iter()
            .filter(|n| n.prefix_len() == n.max_prefix_len())
            .map(|n| n.addr()),
    )
}

fn first_address(addresses: impl Iterator<Item = IpAddr>) -> Option<IpAddr> {
    let mut all: Vec<IpAddr> = addresses.collect();
    all.sort_by_key(|a| a.is_ipv6());
    all.first().copied()
}

/// What `body` says went wrong, from the API's `{error, hint}`.
fn api_error(status: u16, body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    match v["error"].as_str() {
        Some(e) => format!("HTTP {status}: {}", clip(e, MAX_TEXT)),
        None => format!("HTTP {status}"),
    }
}

/// Asks the member at `addr` for its card.
async fn fetch_card(addr: SocketAddr) -> Result<Value, String> {
    let answer = tokio::time::timeout(
        MEMBER_TIMEOUT,
        client::call_capped(addr, "GET", "/api/v1/summary", None, None, MAX_CARD),
    )
    .await;
    match answer {
        Err(_) => Err(format!(
            "no answer from {addr} within {:.1} s",
            MEMBER_TIMEOUT.as_secs_f64()
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok((200, body))) => match serde_json::from_slice::<Value>(&body) {
            Ok(v) if v.is_object() => Ok(v),
            _ => Err(format!("{addr} answered with something that is not a card")),
        },
        Ok(Ok((status, body))) => Err(api_error(status, &body)),
    }
}

/// Every member's card (this node's first), each asked for at once with its own timeout;
/// the timeline learns what changed. A gathering younger than `FRESH` is shared.
pub async fn cards(s: &ApiState) -> Vec<Value> {
    let mut last = s.fleet.gathering.lock().await;
    if let Some((at, cards)) = last.as_ref() {
        if at.elapsed() < FRESH {
            return cards.clone();
        }
    }
    let cards = gather(s).await;
    if let Ok(mut t) = s.fleet.tracker.lock() {
        t.observe(&cards, unix_ms());
    }
    *last = Some((std::time::Instant::now(), cards.clone()));
    cards
}

/// Each mesh member's certificate groups, by name.
fn member_groups(s: &ApiState) -> HashMap<String, Vec<String>> {
    s.members
        .borrow()
        .iter()
        .map(|m| (m.name.clone(), m.groups.clone()))
        .collect()
}

async fn gather(s: &ApiState) -> Vec<Value> {
    let view = s.mesh.borrow().clone();
    let groups = member_groups(s);
    let table = s.peers.table();
    let port = s.fleet.port;
    let own = async {
        json!({
            "name": s.node.name,
            "self": true,
            "overlay": first_address(s.node.overlay_addresses.iter().map(|n| n.addr())),
            "groups": groups.get(&s.node.name).cloned().unwrap_or_default(),
            "online": true,
            "reachable": true,
            "rtt_ms": null,
            "summary": own_summary(s).await,
        })
    };
    let others = view.peers.iter().map(|p| {
        let member_groups = groups.get(&p.name).cloned().unwrap_or_else(|| {
            table
                .iter()
                .find(|(_, peer)| peer.name == p.name)
                .map(|(_, peer)| peer.spec.groups.clone())
                .unwrap_or_default()
        });
        let address = member_address(&p.overlay_ips);
        async move {
            let started = std::time::Instant::now();
            let card = match address {
                Some(ip) => fetch_card(SocketAddr::new(ip, port)).await,
                None => Err("it has no overlay host address".to_string()),
            };
            let took = started.elapsed().as_secs_f64() * 1000.0;
            let (summary, error) = match card {
                Ok(v) => (v, None),
                Err(e) => (Value::Null, Some(e)),
            };
            json!({
                "name": p.name,
                "self": false,
                "overlay": address,
                "groups": member_groups,
                "online": p.up,
                "endpoint": p.endpoint,
                "relay": p.relay,
                "rtt_ms": p.rtt_ms,
                "loss": p.loss,
                "reachable": error.is_none(),
                "error": error,
                "answered_in_ms": took,
                "summary": summary,
            })
        }
    });
    let (own, others) = tokio::join!(own, futures::future::join_all(others));
    let mut all = vec![own];
    all.extend(others);
    all
}

/// The members as this node knows them, not yet asked: name, address, session and RTT.
fn pending_cards(s: &ApiState) -> Vec<Value> {
    let view = s.mesh.borrow().clone();
    let groups = member_groups(s);
    let own = json!({
        "name": s.node.name,
        "self": true,
        "pending": true,
        "overlay": first_address(s.node.overlay_addresses.iter().map(|n| n.addr())),
        "groups": groups.get(&s.node.name).cloned().unwrap_or_default(),
        "online": true,
    });
    std::iter::once(own)
        .chain(view.peers.iter().map(|p| {
            json!({
                "name": p.name,
                "self": false,
                "pending": true,
                "overlay": member_address(&p.overlay_ips),
                "groups": groups.get(&p.name).cloned().unwrap_or_default(),
                "online": p.up,
                "rtt_ms": p.rtt_ms,
            })
        }))
        .collect()
}

pub async fn fleet(State(s): State<Arc<ApiState>>) -> Json<Value> {
    let members = cards(&s).await;
    Json(json!({
        "node": s.node.name,
        "members": members,
        "timeline": s.fleet.since(0),
    }))
}

/// `GET /api/v1/fleet/events`: a `fleet` event with every card whenever one changes (asked
/// again every second while the stream is open), and a `timeline` event per new entry (the
/// whole timeline first).
pub async fn events(State(s): State<Arc<ApiState>>) -> Response {
    super::events::open(s, produce).await
}

async fn produce(s: Arc<ApiState>, tx: mpsc::Sender<Event>) {
    let mut sent = 0;
    let mut last: Option<Vec<Value>> = None;
    // Every member at once from what this node knows, before any is asked: a large fleet is
    // listed at once and each card fills in when its member answers.
    let data = json!({ "node": s.node.name, "members": pending_cards(&s) });
    if tx.send(super::events::event("fleet", data)).await.is_err() {
        return;
    }
    loop {
        let members = tokio::select! {
            m = cards(&s) => m,
            _ = tx.closed() => return,
        };
        if last.as_ref() != Some(&members) {
            let data = json!({ "node": s.node.name, "members": members });
            // A client that stops reading gets no backlog of whole fleets: only the newest
            // is worth sending, and the next round sends it again.
            match tx.try_send(super::events::event("fleet", data)) {
                Ok(()) => last = Some(members),
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {}
            }
        }
        for entry in s.fleet.since(sent) {
            sent = entry.seq;
            let data = serde_json::to_value(&entry).unwrap_or_default();
            if tx
                .send(super::events::event("timeline", data))
                .await
                .is_err()
            {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = tx.closed() => return,
        }
    }
}

/// `POST /api/v1/fleet/{member}/rearm`: sends a re-arm to the member's interlock. The member
/// sees this node's identity, so only this node's own users may ask (the local API, or the
/// remote API with the token); a member calling through the tunnel must ask the robot itself.
pub async fn rearm(
    State(s): State<Arc<ApiState>>,
    Path(member): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(Caller::local);
    if caller.via == Via::Mesh {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} may not re-arm through this node: the robot would see this node's identity",
                caller.describe()
            ),
            format!("POST /plugins/safety/rearm on {member}'s own API, with your own identity"),
        ));
    }
    let who = match caller.via {
        Via::Local => "a local user".to_string(),
        _ => caller.describe(),
    };
    let (status, body) = if member == s.node.name {
        rearm_here(&s, &caller).await?
    } else {
        rearm_member(&s, &member).await?
    };
    let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    s.fleet.note(
        &member,
        "rearm_request",
        format!(
            "re-arm asked by {who}: {}",
            if status < 300 {
                "accepted".to_string()
            } else {
                api_error(status, &body)
            }
        ),
    );
    let code = match StatusCode::from_u16(status) {
        Ok(c) if c.is_success() || c.is_client_error() => c,
        _ => StatusCode::BAD_GATEWAY,
    };
    Ok((
        code,
        Json(json!({ "member": member, "status": status, "answer": answer })),
    )
        .into_response())
}

fn no_interlock(member: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("{member} runs no safety interlock that answers"),
        "its card on GET /api/v1/fleet shows its plugins; enable [plugins.safety] there",
    )
}

async fn rearm_here(s: &ApiState, caller: &Caller) -> Result<(u16, bytes::Bytes), ApiError> {
    let card = json!({ "summary": own_summary(s).await });
    let (instance, _) = safety_instance(&card).ok_or_else(|| no_interlock(&s.node.name))?;
    let req = Request::builder()
        .method("POST")
        .uri("/rearm")
        .header("host", "plugin")
        .header(CALLER_HEADER, caller.to_header())
        .body(Body::empty())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), ""))?;
    let resp = client::unix(&s.host.http_socket(instance), req)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the safety plugin did not answer: {e}"),
                "GET /api/v1/plugins shows its state",
            )
        })?;
    let status = resp.status().as_u16();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_CARD)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok((status, body))
}

async fn rearm_member(s: &ApiState, member: &str) -> Result<(u16, bytes::Bytes), ApiError> {
    let peer = s
        .mesh
        .borrow()
        .peers
        .iter()
        .find(|p| p.name == member)
        .map(|p| member_address(&p.overlay_ips));
    let Some(Some(ip)) = peer else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no fleet member `{member}` with an overlay address"),
            "GET /api/v1/fleet lists the members",
        ));
    };
    let addr = SocketAddr::new(ip, s.fleet.port);
    let unreachable = |e: String| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("{member} is unreachable: {e}"),
            "its card on GET /api/v1/fleet says why; check the peer's session with `myelin peers`",
        )
    };
    let card = json!({ "summary": fetch_card(addr).await.map_err(unreachable)? });
    let (instance, _) = safety_instance(&card).ok_or_else(|| no_interlock(member))?;
    if !is_instance_name(instance) {
        return Err(no_interlock(member));
    }
    let path = format!("/plugins/{instance}/rearm");
    tokio::time::timeout(
        MEMBER_TIMEOUT,
        client::call_capped(addr, "POST", &path, None, None, MAX_CARD),
    )
    .await
    .map_err(|_| {
        unreachable(format!(
            "no answer within {:.1} s",
            MEMBER_TIMEOUT.as_secs_f64()
        ))
    })?
    .map_err(|e| unreachable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(
        name: &str,
        online: bool,
        safety: Option<(&str, Option<&str>, Option<u64>)>,
        restarts: u64,
    ) -> Value {
        let mut summaries = serde_json::Map::new();
        if let Some((state, reason, rearm)) = safety {
            summaries.insert(
                "safety".into(),
                json!({
                    "kind": "safety",
                    "state": state,
                    "reason": reason,
                    "last_rearm": rearm.map(|at| json!({"by": "operator (10.77.0.1, groups operators)", "at_unix_ms": at})),
                }),
            );
        }
        json!({
            "name": name,
            "online": online,
            "reachable": online,
            "error": if online { Value::Null } else { json!("no answer within 1.5 s") },
            "summary": if online { json!({
                "plugins": [{"name": "chaos", "state": "running", "restarts": restarts, "last_failure": "panicked: boom"}],
                "summaries": summaries,
            }) } else { Value::Null },
        })
    }

    fn kinds(t: &Tracker) -> Vec<(String, &'static str)> {
        t.timeline
            .iter()
            .map(|e| (e.member.clone(), e.kind))
            .collect()
    }

    #[test]
    fn the_timeline_tells_what_changed() {
        let mut t = Tracker::default();
        t.observe(&[card("robot1", true, Some(("armed", None, None)), 0)], 1);
        assert!(
            t.timeline.is_empty(),
            "a first look at an armed robot is no event"
        );
        t.observe(
            &[card(
                "robot1",
                true,
                Some(("tripped", Some("latency"), None)),
                0,
            )],
            2,
        );
        t.observe(
            &[card(
                "robot1",
                true,
                Some(("latched", Some("latency"), None)),
                0,
            )],
            3,
        );
        t.observe(
            &[card(
                "robot1",
                true,
                Some(("latched", Some("latency"), None)),
                0,
            )],
            4,
        );
        t.observe(
            &[card("robot1", true, Some(("armed", None, Some(5))), 1)],
            5,
        );
        t.observe(&[card("robot1", false, None, 1)], 6);
        t.observe(
            &[card("robot1", true, Some(("armed", None, Some(5))), 1)],
            7,
        );
        assert_eq!(
            kinds(&t),
            [
                ("robot1".into(), "trip"),
                ("robot1".into(), "latched"),
                ("robot1".into(), "clear"),
                ("robot1".into(), "rearm"),
                ("robot1".into(), "plugin_restart"),
                ("robot1".into(), "peer_down"),
                ("robot1".into(), "unreachable"),
                ("robot1".into(), "peer_up"),
                ("robot1".into(), "reachable"),
            ]
        );
        let texts: Vec<&str> = t.timeline.iter().map(|e| e.text.as_str()).collect();
        assert_eq!(texts[0], "safe stop: latency");
        assert_eq!(
            texts[3],
            "re-armed by operator (10.77.0.1, groups operators)"
        );
        assert!(texts[4].contains("panicked: boom"), "{}", texts[4]);
        assert!(texts[6].contains("no answer within 1.5 s"), "{}", texts[6]);
        let seqs: Vec<u64> = t.timeline.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[test]
    fn a_robot_first_seen_stopped_says_so_and_the_timeline_is_bounded() {
        let mut t = Tracker::default();
        t.observe(
            &[card(
                "robot2",
                true,
                Some(("latched", Some("silence"), None)),
                0,
            )],
            1,
        );
        assert_eq!(kinds(&t), [("robot2".into(), "trip")]);
        for i in 0..(TIMELINE as u64 + 50) {
            t.push("robot2", "peer_up", "x".into(), i);
        }
        assert_eq!(t.timeline.len(), TIMELINE);
        assert_eq!(t.timeline.back().map(|e| e.seq), Some(TIMELINE as u64 + 51));
    }

    #[test]
    fn one_member_cannot_flood_the_timeline_or_fake_lines() {
        let mut t = Tracker::default();
        // A full timeline: the cap must still hold (entries pushed out at the front).
        for i in 0..TIMELINE as u64 {
            t.push("robot1", "peer_up", "x".into(), i);
        }
        let plugins = |restarts: u64| -> Vec<Value> {
            (0..100)
                .map(|i| json!({"name": format!("p{i}"), "state": "running", "restarts": restarts, "last_failure": format!("x\u{1b}[2J{}", "y".repeat(5000))}))
                .collect()
        };
        let card = |restarts| json!({"name": "robot6", "online": true, "reachable": true, "summary": {"plugins": plugins(restarts), "summaries": {}}});
        t.observe(&[card(0)], 1);
        t.observe(&[card(1)], 2);
        let flood = t.timeline.iter().filter(|e| e.member == "robot6").count();
        assert_eq!(
            flood,
            MAX_ENTRIES_PER_MEMBER + 1,
            "capped, plus one line saying so"
        );
        assert!(t
            .timeline
            .back()
            .unwrap()
            .text
            .contains("more changes at once"));
        for e in &t.timeline {
            assert!(
                e.text.chars().count() <= 2 * MAX_TEXT + 1,
                "{}",
                e.text.len()
            );
            assert!(!e.text.chars().any(char::is_control), "{:?}", e.text);
        }
    }

    #[test]
    fn an_interlock_seen_again_after_a_gap_is_news_only_if_stopped() {
        let mut t = Tracker::default();
        // First seen while its safety plugin was restarting (no summary), then latched with an
        // old re-arm on record: the stop is noted, the old re-arm is not news.
        t.observe(&[card("robot3", true, None, 0)], 1);
        t.observe(
            &[card(
                "robot3",
                true,
                Some(("latched", Some("silence"), Some(1))),
                0,
            )],
            2,
        );
        assert_eq!(kinds(&t), [("robot3".into(), "trip")]);
        assert!(
            t.timeline[0].text.contains("latched, silence"),
            "{}",
            t.timeline[0].text
        );
    }

    #[test]
    fn only_safe_instance_names_reach_a_path() {
        assert!(is_instance_name("safety"));
        assert!(is_instance_name("safety_2-b"));
        for bad in ["", "../api", "a/b", "a?x", "a b", &"x".repeat(65)] {
            assert!(!is_instance_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_member_is_asked_on_its_ipv4_host_address() {
        let nets: Vec<ipnet::IpNet> = ["fd77::2/128", "10.77.0.0/16", "10.77.0.2/32"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(member_address(&nets), Some("10.77.0.2".parse().unwrap()));
        assert_eq!(member_address(&nets[..2]), Some("fd77::2".parse().unwrap()));
        assert_eq!(member_address(&nets[1..2]), None);
    }
}
