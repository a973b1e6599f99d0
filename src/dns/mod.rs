//! Names for the fleet: the node answers `<member>.<domain>` (A and AAAA from the peer table,
//! and its own name) on its overlay addresses, NXDOMAIN for other names in the domain, and
//! REFUSED for the rest; and it tells the system's resolver about the domain (systemd-resolved
//! on the TUN, else the one line to add).

pub mod zone;

use crate::tunnel::PeerControl;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use tokio_util::sync::CancellationToken;
use zone::{Answer, Wanted};

/// Seconds a resolver may keep an answer: short, so a member that leaves is gone quickly.
const TTL: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot serve DNS on {addr}: {source}\n  fix: free UDP port {port} on the overlay address (a resolver listening on 0.0.0.0:{port}?), or set [dns] port, or enabled = false", port = addr.port())]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("[dns] domain: {0}\n  fix: e.g. domain = \"myelin.internal\"")]
    Domain(String),
}

/// Answers for the domain from the peer table, as it stands at each question.
struct MemberNames {
    domain: String,
    soa: Record,
    own_name: String,
    own: Vec<IpAddr>,
    peers: PeerControl,
}

impl MemberNames {
    fn new(
        domain: &str,
        own_name: &str,
        own: Vec<IpAddr>,
        peers: PeerControl,
    ) -> Result<Self, DnsError> {
        let apex =
            Name::from_str(&format!("{domain}.")).map_err(|e| DnsError::Domain(e.to_string()))?;
        let host = |l: &str| {
            Name::from_str(&format!("{l}.{domain}.")).map_err(|e| DnsError::Domain(e.to_string()))
        };
        let soa = SOA::new(
            host(own_name).or_else(|_| host("ns"))?,
            host("hostmaster")?,
            1,
            3600,
            600,
            86400,
            TTL,
        );
        Ok(Self {
            domain: domain.to_string(),
            soa: Record::from_rdata(apex, TTL, RData::SOA(soa)),
            own_name: own_name.to_string(),
            own,
            peers,
        })
    }

    fn lookup(&self, qname: &str, wanted: Wanted) -> Answer {
        zone::answer(&self.domain, qname, wanted, |label| {
            if self.own_name.eq_ignore_ascii_case(label) {
                return Some(self.own.clone());
            }
            let table = self.peers.table();
            let (_, peer) = table
                .iter()
                .find(|(_, p)| p.name.eq_ignore_ascii_case(label))?;
            Some(zone::host_addresses(&peer.spec.allowed_ips))
        })
    }

    async fn send<R: ResponseHandler>(
        &self,
        request: &Request,
        mut handle: R,
        edns: Option<&Edns>,
        rcode: ResponseCode,
        answers: &[Record],
        with_soa: bool,
    ) -> ResponseInfo {
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.authoritative = matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain);
        meta.response_code = rcode;
        let soa: &[Record] = if with_soa {
            std::slice::from_ref(&self.soa)
        } else {
            &[]
        };
        let response = MessageResponseBuilder::new(&request.queries, edns).build(
            meta,
            answers.iter(),
            std::iter::empty(),
            soa.iter(),
            std::iter::empty(),
        );
        match handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!("DNS answer not sent: {e}");
                let mut m = Metadata::response_from_request(&request.metadata);
                m.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: m,
                    counts: Default::default(),
                })
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for MemberNames {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        handle: R,
    ) -> ResponseInfo {
        // Our own OPT (version 0) when the client sent one; its options are never echoed.
        let edns = request.edns.as_ref().map(|asked| {
            let mut e = Edns::new();
            e.set_max_payload(asked.max_payload().max(512));
            e.set_version(0);
            e
        });
        if let (Some(asked), Some(mine)) = (request.edns.as_ref(), edns.as_ref()) {
            if asked.version() > 0 {
                let mut e = mine.clone();
                e.set_rcode_high(ResponseCode::BADVERS.high());
                return self
                    .send(request, handle, Some(&e), ResponseCode::BADVERS, &[], false)
                    .await;
            }
        }
        let edns = edns.as_ref();
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            return self
                .send(request, handle, edns, ResponseCode::NotImp, &[], false)
                .await;
        }
        let Ok(info) = request.request_info() else {
            return self
                .send(request, handle, edns, ResponseCode::FormErr, &[], false)
                .await;
        };
        let qtype = info.query.query_type();
        let wanted = match qtype {
            RecordType::A => Wanted::V4,
            RecordType::AAAA => Wanted::V6,
            RecordType::ANY => Wanted::Both,
            _ => Wanted::Other,
        };
        let owner = info.query.original().name().clone();
        match self.lookup(&owner.to_ascii(), wanted) {
            Answer::Refused => {
                self.send(request, handle, edns, ResponseCode::Refused, &[], false)
                    .await
            }
            Answer::NxDomain => {
                self.send(request, handle, edns, ResponseCode::NXDomain, &[], true)
                    .await
            }
            Answer::Apex if qtype == RecordType::SOA => {
                let soa = [self.soa.clone()];
                self.send(request, handle, edns, ResponseCode::NoError, &soa, false)
                    .await
            }
            Answer::Apex => {
                self.send(request, handle, edns, ResponseCode::NoError, &[], true)
                    .await
            }
            Answer::Member(addrs) => {
                let records: Vec<Record> = addrs
                    .into_iter()
                    .map(|a| match a {
                        IpAddr::V4(v4) => Record::from_rdata(owner.clone(), TTL, RData::A(A(v4))),
                        IpAddr::V6(v6) => {
                            Record::from_rdata(owner.clone(), TTL, RData::AAAA(AAAA(v6)))
                        }
                    })
                    .collect();
                let nodata = records.is_empty();
                self.send(
                    request,
                    handle,
                    edns,
                    ResponseCode::NoError,
                    &records,
                    nodata,
                )
                .await
            }
        }
    }
}

/// The running name server and its registration with the system's resolver.
pub struct NameService {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    registered: Option<String>,
}

/// Serves `domain` on UDP `port` of each of the node's overlay addresses, and
/// registers it with systemd-resolved for `interface` when `register` and resolved runs for
/// this network namespace.
pub async fn start(
    domain: &str,
    port: u16,
    register: bool,
    node: &myelin_sdk::NodeIdentity,
    interface: &str,
    peers: PeerControl,
) -> Result<NameService, DnsError> {
    let domain = zone::check_domain(domain).map_err(DnsError::Domain)?;
    let own: Vec<IpAddr> = node.overlay_addresses.iter().map(|n| n.addr()).collect();
    let handler = MemberNames::new(&domain, &node.name, own.clone(), peers)?;
    let mut server = Server::new(handler);
    // UDP only: an answer holds at most a member's few addresses, far below 512 bytes, so it
    // is never truncated; and no TCP listener means no connections to hoard.
    for ip in &own {
        let addr = SocketAddr::new(*ip, port);
        let udp = tokio::net::UdpSocket::bind(addr)
            .await
            .map_err(|source| DnsError::Bind { addr, source })?;
        server.register_socket(udp);
    }
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        tokio::select! {
            r = server.block_until_done() => if let Err(e) = r { tracing::warn!("DNS server ended: {e}") },
            _ = stopped.cancelled() => { let _ = server.shutdown_gracefully().await; }
        }
    });
    let servers: Vec<String> = own.iter().map(IpAddr::to_string).collect();
    let listed = if port == 53 {
        servers.join(", ")
    } else {
        format!("{} (port {port})", servers.join(", "))
    };
    let registered = match register.then(|| register_with_resolved(interface, &own, port, &domain))
    {
        Some(Ok(())) => {
            tracing::info!("DNS: <name>.{domain} served on {listed}; systemd-resolved sends {domain} lookups there (via {interface})");
            Some(interface.to_string())
        }
        other => {
            let why = match other {
                Some(Err(why)) => why,
                _ => "[dns] register = false".into(),
            };
            let first = servers.first().cloned().unwrap_or_default();
            tracing::info!(
                "DNS: <name>.{domain} served on {listed}; not registered with the system's resolver ({why}). Add this line first in /etc/resolv.conf: `nameserver {first}` (it answers only {domain} and refuses the rest, so other lookups move on to the next nameserver)"
            );
            None
        }
    };
    Ok(NameService {
        stop,
        task,
        registered,
    })
}

impl NameService {
    /// Stops serving and undoes the resolver registration.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
        if let Some(interface) = self.registered {
            let _ = std::process::Command::new("resolvectl")
                .args(["revert", &interface])
                .status();
        }
    }
}

/// Whether this process shares PID 1's network namespace (resolved only manages that one).
fn in_initial_network_namespace() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/net"),
        std::fs::read_link("/proc/1/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `resolvectl dns <if> <addrs>` and `resolvectl domain <if> ~<domain>`, or why not.
fn register_with_resolved(
    interface: &str,
    servers: &[IpAddr],
    port: u16,
    domain: &str,
) -> Result<(), String> {
    if !std::path::Path::new("/run/systemd/resolve").exists() {
        return Err("systemd-resolved is not running".into());
    }
    if !in_initial_network_namespace() {
        return Err(
            "this node runs in a network namespace that systemd-resolved does not manage".into(),
        );
    }
    let run = |args: &[String]| -> Result<(), String> {
        let out = std::process::Command::new("resolvectl")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run resolvectl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "resolvectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    // The routing domain first and no default route, so the link never takes other lookups,
    // not even between two of these calls.
    run(&[
        "domain".to_string(),
        interface.to_string(),
        format!("~{domain}"),
    ])?;
    run(&[
        "default-route".to_string(),
        interface.to_string(),
        "false".to_string(),
    ])?;
    let mut dns = vec!["dns".to_string(), interface.to_string()];
    dns.extend(servers.iter().map(|ip| match (ip, port) {
        (_, 53) => ip.to_string(),
        (IpAddr::V4(v4), p) => format!("{v4}:{p}"),
        (IpAddr::V6(v6), p) => format!("[{v6}]:{p}"),
    }));
    run(&dns)
}
