//! Roaming: watches the node's own addresses and routes (rtnetlink) and, when one changes,
//! tells every peer at once where this node is now (an authenticated keepalive from the new
//! address moves the peer's endpoint) and asks the mesh to register again with its
//! lighthouses, instead of waiting for the next keepalive.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;
const RT_TABLE_MAIN: u8 = 254;
const RTA_OIF: u16 = 4;
const NLMSG_HDRLEN: usize = 16;
const LOOPBACK: u32 = 1;

/// Announcements happen at most this often; changes in between are folded into the next one.
pub const MIN_GAP: Duration = Duration::from_millis(20);
/// Under sustained churn (an interface that flaps, a routing daemon: more than
/// `CHURN_PER_SECOND` announcements in a second) the gap doubles up to this, and goes back to
/// `MIN_GAP` after a calmer second.
pub const MAX_GAP: Duration = Duration::from_secs(1);
const CHURN_PER_SECOND: u32 = 10;
/// Addresses of this scope or narrower (link, host) do not reach other machines.
const RT_SCOPE_LINK: u8 = 253;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
        *b.get(at + 2)?,
        *b.get(at + 3)?,
    ]))
}

/// The outgoing interface of a route message (`RTA_OIF`), if it names one.
fn route_oif(body: &[u8]) -> Option<u32> {
    // struct rtmsg is 12 bytes; attributes follow, each 4-byte aligned.
    let mut at = 12;
    while at + 4 <= body.len() {
        let len = usize::from(u16_at(body, at)?);
        let kind = u16_at(body, at + 2)?;
        if len < 4 {
            return None;
        }
        if kind == RTA_OIF {
            return u32_at(body, at + 4);
        }
        at += (len + 3) & !3;
    }
    None
}

/// Whether a batch of rtnetlink messages changes how this node reaches the world: an address
/// of global or site scope added or removed, or a default route in the main table, on any
/// interface but `ignore` (the TUN) and loopback. Link-local addresses and narrower routes
/// (a container's veth, a routing daemon's prefixes) do not count. Truncated or malformed
/// messages end the batch; what came before still counts.
pub fn changes_reachability(batch: &[u8], ignore: u32) -> bool {
    let mut at = 0;
    while at + NLMSG_HDRLEN <= batch.len() {
        let (Some(len), Some(kind)) = (u32_at(batch, at), u16_at(batch, at + 4)) else {
            return false;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || at + len > batch.len() {
            return false;
        }
        let body = &batch[at + NLMSG_HDRLEN..at + len];
        let interface = match kind {
            // struct ifaddrmsg: family, prefixlen, flags, scope (u8 each), then the index.
            RTM_NEWADDR | RTM_DELADDR if body.get(3).is_some_and(|s| *s < RT_SCOPE_LINK) => {
                u32_at(body, 4)
            }
            // struct rtmsg: dst_len is its 2nd byte (0: a default route), table its 5th.
            RTM_NEWROUTE | RTM_DELROUTE
                if body.get(1) == Some(&0) && body.get(4) == Some(&RT_TABLE_MAIN) =>
            {
                Some(route_oif(body).unwrap_or(0))
            }
            _ => None,
        };
        if interface.is_some_and(|i| i != ignore && i != LOOPBACK) {
            return true;
        }
        at += (len + 3) & !3;
    }
    false
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot open an rtnetlink socket to watch this node's addresses ({0}); roaming is noticed at the next keepalive instead")]
    Socket(std::io::Error),
}

fn open() -> Result<OwnedFd, WatchError> {
    use rustix::net::{netlink, AddressFamily, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        // Protocol 0 of AF_NETLINK is NETLINK_ROUTE.
        None,
    )
    .map_err(|e| WatchError::Socket(e.into()))?;
    let groups = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
    rustix::net::bind(&fd, &netlink::SocketAddrNetlink::new(0, groups))
        .map_err(|e| WatchError::Socket(e.into()))?;
    Ok(fd)
}

/// The interface index of `name`, from sysfs.
pub fn interface_index(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Watches until `cancel`; `roamed` runs once per change (at most every [`MIN_GAP`]).
pub fn spawn(
    ignore: u32,
    roamed: impl Fn() + Send + Sync + 'static,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, WatchError> {
    let fd = open()?;
    // SAFETY: the AsyncFd owns the descriptor and nothing else closes or replaces it while it
    // is registered.
    let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }
        .map_err(|e| WatchError::Socket(e.into()))?;
    let roamed = Arc::new(roamed);
    Ok(tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut last: Option<tokio::time::Instant> = None;
        let mut gap = MIN_GAP;
        let mut pending = false;
        // Announcements in the current second, and when it started.
        let mut window = (tokio::time::Instant::now(), 0u32);
        // The next gap: doubled while announcements come faster than churn allows.
        let mut widen = |gap: Duration| {
            let now = tokio::time::Instant::now();
            if now.duration_since(window.0) >= Duration::from_secs(1) {
                let calm = window.1 <= CHURN_PER_SECOND;
                window = (now, 1);
                if calm {
                    return MIN_GAP;
                }
            } else {
                window.1 += 1;
            }
            if window.1 > CHURN_PER_SECOND {
                (gap * 2).min(MAX_GAP)
            } else {
                gap
            }
        };
        loop {
            let due = match (pending, last) {
                (true, Some(t)) => Some(t + gap),
                (true, None) => Some(tokio::time::Instant::now()),
                _ => None,
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    pending = false;
                    gap = widen(gap);
                    last = Some(tokio::time::Instant::now());
                    roamed();
                }
                ready = fd.readable() => {
                    let mut guard = match ready {
                        Ok(g) => g,
                        Err(e) => {
                            tracing::warn!("the address watch stopped: {e}; roaming is noticed at the next keepalive instead");
                            return;
                        }
                    };
                    // Drain everything queued: a roam is several messages (address, routes).
                    loop {
                        match rustix::net::recv(guard.get_inner(), &mut buf[..], rustix::net::RecvFlags::DONTWAIT) {
                            Ok((n, _)) => {
                                if changes_reachability(buf.get(..n).unwrap_or(&[]), ignore) {
                                    pending = true;
                                }
                            }
                            Err(rustix::io::Errno::AGAIN) => {
                                guard.clear_ready();
                                break;
                            }
                            // The kernel dropped messages (ENOBUFS): something changed.
                            Err(rustix::io::Errno::NOBUFS) => pending = true,
                            Err(rustix::io::Errno::INTR) => {}
                            Err(e) => {
                                tracing::warn!("the address watch stopped: {e}; roaming is noticed at the next keepalive instead");
                                return;
                            }
                        }
                    }
                    if pending && last.is_none_or(|t| t.elapsed() >= gap) {
                        pending = false;
                        gap = widen(gap);
                        last = Some(tokio::time::Instant::now());
                        roamed();
                    }
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + body.len()) as u32;
        let mut m = len.to_ne_bytes().to_vec();
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn address(kind: u16, index: u32) -> Vec<u8> {
        scoped(kind, index, 0)
    }

    fn scoped(kind: u16, index: u32, scope: u8) -> Vec<u8> {
        let mut body = vec![2, 24, 0, scope];
        body.extend_from_slice(&index.to_ne_bytes());
        message(kind, &body)
    }

    fn route(kind: u16, table: u8, oif: Option<u32>) -> Vec<u8> {
        prefix_route(kind, 0, table, oif)
    }

    fn prefix_route(kind: u16, dst_len: u8, table: u8, oif: Option<u32>) -> Vec<u8> {
        let mut body = vec![2, dst_len, 0, 0, table, 3, 0, 1, 0, 0, 0, 0];
        if let Some(i) = oif {
            body.extend_from_slice(&8u16.to_ne_bytes());
            body.extend_from_slice(&RTA_OIF.to_ne_bytes());
            body.extend_from_slice(&i.to_ne_bytes());
        }
        message(kind, &body)
    }

    #[test]
    fn address_and_route_changes_count_except_on_the_tun_and_loopback() {
        let tun = 7;
        assert!(changes_reachability(&address(RTM_NEWADDR, 2), tun));
        assert!(changes_reachability(&address(RTM_DELADDR, 3), tun));
        assert!(!changes_reachability(&address(RTM_NEWADDR, tun), tun));
        assert!(!changes_reachability(&address(RTM_NEWADDR, LOOPBACK), tun));
        assert!(changes_reachability(
            &route(RTM_NEWROUTE, RT_TABLE_MAIN, Some(2)),
            tun
        ));
        assert!(changes_reachability(
            &route(RTM_DELROUTE, RT_TABLE_MAIN, None),
            tun
        ));
        assert!(!changes_reachability(
            &route(RTM_NEWROUTE, RT_TABLE_MAIN, Some(tun)),
            tun
        ));
        // The local table changes with every address; the address message already counted.
        assert!(!changes_reachability(
            &route(RTM_NEWROUTE, 255, Some(2)),
            tun
        ));
        // Link-local and host-scope addresses, and routes narrower than a default one, do not.
        assert!(!changes_reachability(
            &scoped(RTM_NEWADDR, 2, RT_SCOPE_LINK),
            tun
        ));
        assert!(!changes_reachability(&scoped(RTM_NEWADDR, 2, 254), tun));
        assert!(changes_reachability(&scoped(RTM_NEWADDR, 2, 200), tun));
        assert!(!changes_reachability(
            &prefix_route(RTM_NEWROUTE, 64, RT_TABLE_MAIN, Some(2)),
            tun
        ));
        // Link messages (RTM_NEWLINK = 16) are not subscribed to, and do not count.
        assert!(!changes_reachability(&message(16, &[0; 16]), tun));
        // One relevant message in a batch is enough.
        let mut batch = address(RTM_NEWADDR, tun);
        batch.extend(route(RTM_NEWROUTE, RT_TABLE_MAIN, Some(4)));
        assert!(changes_reachability(&batch, tun));
    }

    #[test]
    fn malformed_batches_end_without_a_panic() {
        let good = address(RTM_NEWADDR, 2);
        for cut in 0..good.len() {
            let _ = changes_reachability(&good[..cut], 7);
        }
        let mut lying = good.clone();
        lying[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(!changes_reachability(&lying, 7));
        let mut short = good;
        short[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(!changes_reachability(&short, 7));
        let cut_route = route(RTM_NEWROUTE, RT_TABLE_MAIN, Some(2));
        for cut in 0..cut_route.len() {
            let _ = changes_reachability(&cut_route[..cut], 7);
        }
    }
}
