//! The mesh control messages and their encoding. They travel inside WireGuard, as UDP to
//! port `MESH_PORT` on the overlay, so WireGuard has authenticated the sending key before a
//! byte here is parsed; the parser still treats every byte as untrusted.

use std::net::{IpAddr, SocketAddr};

/// Overlay UDP port of mesh control messages (intercepted by the data plane, never a socket).
pub const MESH_PORT: u16 = 51822;
const MAGIC: &[u8; 4] = b"MYM1";
/// A control message fits one unfragmented datagram inside the tunnel.
pub const MAX_MESSAGE: usize = 1200;
pub const MAX_CERT: usize = 1024;
const MAX_CANDIDATES: usize = 8;
const MAX_TALK_TO: usize = 32;
const MAX_GROUPS: usize = crate::tunnel::multicast::MAX_GROUPS;

/// The type byte of a relayed datagram (`relay_frame`), after `MAGIC`: on its way to the
/// relay, and from it. A relay forwards only the first; a member unpacks only the second.
const TO_RELAY: u8 = 13;
const FROM_RELAY: u8 = 14;

/// Which way a relay frame travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    /// From a member to the relay: the key is where it goes.
    ToRelay,
    /// From the relay to a member: the key is who sent it.
    FromRelay,
}
/// The largest WireGuard datagram a relay carries: a full-size packet of the largest TUN MTU
/// the node allows (9000), plus WireGuard's 32 bytes.
pub const MAX_RELAYED: usize = 9032;

/// A WireGuard datagram carried by a relay, inside the member-to-relay tunnel: to the relay,
/// `peer` is where it goes; from the relay, who sent it. The relay never holds a key for the
/// datagram itself, so it sees only ciphertext.
pub fn relay_frame(leg: Leg, peer: &[u8; 32], datagram: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 1 + 32 + datagram.len());
    out.extend_from_slice(MAGIC);
    out.push(match leg {
        Leg::ToRelay => TO_RELAY,
        Leg::FromRelay => FROM_RELAY,
    });
    out.extend_from_slice(peer);
    out.extend_from_slice(datagram);
    out
}

/// The leg, peer and datagram of a relay frame; `None` for anything else (other mesh
/// messages included), and for an empty or oversized datagram.
pub fn parse_relay(bytes: &[u8]) -> Option<(Leg, &[u8; 32], &[u8])> {
    let rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let (kind, rest) = rest.split_first()?;
    let leg = match *kind {
        TO_RELAY => Leg::ToRelay,
        FROM_RELAY => Leg::FromRelay,
        _ => return None,
    };
    let (peer, datagram) = rest.split_first_chunk::<32>()?;
    (!datagram.is_empty() && datagram.len() <= MAX_RELAYED).then_some((leg, peer, datagram))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed mesh message: {0}")]
pub struct WireError(pub &'static str);

/// A member as a lighthouse lists it: its certificate chain and where it was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RosterEntry {
    pub chain: Vec<Vec<u8>>,
    /// The address the lighthouse sees the member's datagrams come from.
    pub endpoint: Option<SocketAddr>,
    /// The multicast groups it takes part in, as it registered them.
    pub multicast: Vec<IpAddr>,
    /// Its own interface addresses, as it registered them: a member behind the same NAT
    /// reaches it there (NATs rarely hairpin).
    pub candidates: Vec<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// "This is who I am": the sender's certificate chain (node, then its signer).
    Hello { chain: Vec<Vec<u8>> },
    /// "I verified your Hello": stops the sender's retries.
    Welcome,
    /// A member to a lighthouse: the groups it wants to talk to, its own addresses, and how
    /// often it registers (the lighthouse forgets it after three missed refreshes).
    Register {
        talk_to: Vec<String>,
        candidates: Vec<SocketAddr>,
        refresh_s: u16,
        /// The multicast groups it takes part in (`[multicast].groups`).
        multicast: Vec<IpAddr>,
    },
    /// A lighthouse to a member: one page of the CA's revocation list issued at `issued_at`.
    Revocations {
        issued_at: u64,
        page: u16,
        pages: u16,
        bytes: Vec<u8>,
    },
    /// A lighthouse to a member: one page of the roster generation `generation`.
    Roster {
        generation: u64,
        page: u16,
        pages: u16,
        members: Vec<RosterEntry>,
    },
    /// A member to a lighthouse: "who holds this overlay address?" (it has a packet for it).
    Lookup { address: IpAddr },
    /// A lighthouse's answer to `Lookup`: the registered member holding `address`, if any.
    Found {
        address: IpAddr,
        member: Option<RosterEntry>,
    },
    /// A member to a lighthouse: "sign my certificate again" (it nears its expiry).
    Renew,
    /// A lighthouse to a member: its new chain (node, then signer).
    Renewed { chain: Vec<Vec<u8>> },
    /// A lighthouse to a member: why it did not renew, and from when it would (unix seconds;
    /// 0: not here at all).
    RenewRefused { reason: String, opens_at: u64 },
    /// A member that stops: "forget me now" (its lighthouses drop its registration, its peers
    /// drop it) instead of waiting for its registration to expire.
    Leave,
    /// A lighthouse to a member, answering its registration: the address the member's
    /// datagrams come from as the lighthouse sees them (its reflexive address), and whether
    /// the lighthouse relays between members (`[relay]`).
    Observed { endpoint: SocketAddr, relay: bool },
    /// A lighthouse to a member, as it answers another member's `Lookup` for it: that member,
    /// which is about to send its first handshake here. The member introduced sends its own at
    /// the same moment, so each opens its NAT for the other's (hole punching).
    Introduce { member: RosterEntry },
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v) => {
            out.push(4);
            out.extend_from_slice(&v.octets());
        }
        IpAddr::V6(v) => {
            out.push(6);
            out.extend_from_slice(&v.octets());
        }
    }
}

fn put_sock(out: &mut Vec<u8>, a: Option<SocketAddr>) {
    match a {
        None => out.push(0),
        Some(a) => {
            put_ip(out, a.ip());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
    }
}

fn put_groups(out: &mut Vec<u8>, groups: &[IpAddr]) {
    out.push(groups.len().min(MAX_GROUPS) as u8);
    for g in groups.iter().take(MAX_GROUPS) {
        put_ip(out, *g);
    }
}

fn put_entry(out: &mut Vec<u8>, m: &RosterEntry) {
    put_chain(out, &m.chain);
    put_sock(out, m.endpoint);
    put_groups(out, &m.multicast);
    put_candidates(out, &m.candidates);
}

fn put_candidates(out: &mut Vec<u8>, candidates: &[SocketAddr]) {
    out.push(candidates.len().min(MAX_CANDIDATES) as u8);
    for c in candidates.iter().take(MAX_CANDIDATES) {
        put_sock(out, Some(*c));
    }
}

fn put_chain(out: &mut Vec<u8>, chain: &[Vec<u8>]) {
    out.push(chain.len().min(2) as u8);
    for c in chain.iter().take(2) {
        let c = &c[..c.len().min(MAX_CERT)];
        out.extend_from_slice(&(c.len() as u16).to_be_bytes());
        out.extend_from_slice(c);
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn sock(&mut self) -> Result<Option<SocketAddr>, WireError> {
        let Some(ip) = self.family_ip()? else {
            return Ok(None);
        };
        Ok(Some(SocketAddr::new(ip, self.u16()?)))
    }
    /// An address after its family byte (4 or 6); `None` for family 0 (no address).
    fn family_ip(&mut self) -> Result<Option<IpAddr>, WireError> {
        Ok(Some(match self.u8()? {
            0 => return Ok(None),
            4 => {
                let mut a = [0u8; 4];
                a.copy_from_slice(self.take(4)?);
                a.into()
            }
            6 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(self.take(16)?);
                a.into()
            }
            _ => return Err(WireError("unknown address family")),
        }))
    }
    fn chain(&mut self) -> Result<Vec<Vec<u8>>, WireError> {
        let n = self.u8()? as usize;
        if n == 0 || n > 2 {
            return Err(WireError("a chain has one or two certificates"));
        }
        (0..n)
            .map(|_| {
                let len = self.u16()? as usize;
                if len > MAX_CERT {
                    return Err(WireError("certificate too long"));
                }
                Ok(self.take(len)?.to_vec())
            })
            .collect()
    }
    fn groups(&mut self) -> Result<Vec<IpAddr>, WireError> {
        let n = self.u8()? as usize;
        if n > MAX_GROUPS {
            return Err(WireError("too many multicast groups"));
        }
        (0..n)
            .map(|_| match self.ip()? {
                ip if ip.is_multicast() => Ok(ip),
                _ => Err(WireError(
                    "a multicast group that is not a multicast address",
                )),
            })
            .collect()
    }
    fn entry(&mut self) -> Result<RosterEntry, WireError> {
        Ok(RosterEntry {
            chain: self.chain()?,
            endpoint: self.sock()?,
            multicast: self.groups()?,
            candidates: self.candidates()?,
        })
    }
    fn candidates(&mut self) -> Result<Vec<SocketAddr>, WireError> {
        let n = self.u8()? as usize;
        if n > MAX_CANDIDATES {
            return Err(WireError("too many candidates"));
        }
        (0..n)
            .map(|_| self.sock()?.ok_or(WireError("empty candidate")))
            .collect()
    }
    fn ip(&mut self) -> Result<IpAddr, WireError> {
        self.family_ip()?.ok_or(WireError("empty address"))
    }
    fn text(&mut self) -> Result<String, WireError> {
        let n = self.u8()? as usize;
        if n > 63 {
            return Err(WireError("a group name is at most 63 bytes"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| WireError("text is not UTF-8"))
    }
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        match self {
            Message::Hello { chain } => {
                out.push(1);
                put_chain(&mut out, chain);
            }
            Message::Welcome => out.push(2),
            Message::Register {
                talk_to,
                candidates,
                refresh_s,
                multicast,
            } => {
                out.push(3);
                out.extend_from_slice(&refresh_s.to_be_bytes());
                out.push(talk_to.len().min(MAX_TALK_TO) as u8);
                for g in talk_to.iter().take(MAX_TALK_TO) {
                    let g = &g.as_bytes()[..g.len().min(63)];
                    out.push(g.len() as u8);
                    out.extend_from_slice(g);
                }
                put_candidates(&mut out, candidates);
                put_groups(&mut out, multicast);
            }
            Message::Revocations {
                issued_at,
                page,
                pages,
                bytes,
            } => {
                out.push(5);
                out.extend_from_slice(&issued_at.to_be_bytes());
                out.extend_from_slice(&page.to_be_bytes());
                out.extend_from_slice(&pages.to_be_bytes());
                let b = &bytes[..bytes.len().min(MAX_MESSAGE)];
                out.extend_from_slice(&(b.len() as u16).to_be_bytes());
                out.extend_from_slice(b);
            }
            Message::Roster {
                generation,
                page,
                pages,
                members,
            } => {
                out.push(4);
                out.extend_from_slice(&generation.to_be_bytes());
                out.extend_from_slice(&page.to_be_bytes());
                out.extend_from_slice(&pages.to_be_bytes());
                out.push(members.len().min(255) as u8);
                for m in members.iter().take(255) {
                    put_entry(&mut out, m);
                }
            }
            Message::Lookup { address } => {
                out.push(6);
                put_ip(&mut out, *address);
            }
            Message::Found { address, member } => {
                out.push(7);
                put_ip(&mut out, *address);
                match member {
                    None => out.push(0),
                    Some(m) => {
                        out.push(1);
                        put_entry(&mut out, m);
                    }
                }
            }
            Message::Renew => out.push(8),
            Message::Leave => out.push(11),
            Message::Observed { endpoint, relay } => {
                out.push(12);
                put_sock(&mut out, Some(*endpoint));
                out.push(u8::from(*relay));
            }
            Message::Introduce { member } => {
                out.push(15);
                put_entry(&mut out, member);
            }
            Message::Renewed { chain } => {
                out.push(9);
                put_chain(&mut out, chain);
            }
            Message::RenewRefused { reason, opens_at } => {
                out.push(10);
                out.extend_from_slice(&opens_at.to_be_bytes());
                let r = reason.as_bytes();
                // At a character boundary, so a long reason still decodes as UTF-8.
                let mut n = r.len().min(255);
                while !reason.is_char_boundary(n) {
                    n -= 1;
                }
                out.push(n as u8);
                out.extend_from_slice(&r[..n]);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader(bytes);
        if r.take(4)? != MAGIC {
            return Err(WireError("not a mesh message"));
        }
        let m = match r.u8()? {
            1 => Message::Hello { chain: r.chain()? },
            2 => Message::Welcome,
            3 => {
                let refresh_s = r.u16()?;
                let n = r.u8()? as usize;
                if n > MAX_TALK_TO {
                    return Err(WireError("too many groups"));
                }
                let talk_to = (0..n).map(|_| r.text()).collect::<Result<_, _>>()?;
                let candidates = r.candidates()?;
                let multicast = r.groups()?;
                Message::Register {
                    talk_to,
                    candidates,
                    refresh_s,
                    multicast,
                }
            }
            4 => {
                let generation = r.u64()?;
                let page = r.u16()?;
                let pages = r.u16()?;
                if pages == 0 || page >= pages {
                    return Err(WireError("page out of range"));
                }
                let n = r.u8()? as usize;
                let members = (0..n)
                    .map(|_| r.entry())
                    .collect::<Result<_, WireError>>()?;
                Message::Roster {
                    generation,
                    page,
                    pages,
                    members,
                }
            }
            5 => {
                let issued_at = r.u64()?;
                let page = r.u16()?;
                let pages = r.u16()?;
                if pages == 0 || page >= pages {
                    return Err(WireError("page out of range"));
                }
                let len = r.u16()? as usize;
                if len > MAX_MESSAGE {
                    return Err(WireError("page too long"));
                }
                Message::Revocations {
                    issued_at,
                    page,
                    pages,
                    bytes: r.take(len)?.to_vec(),
                }
            }
            6 => Message::Lookup { address: r.ip()? },
            7 => {
                let address = r.ip()?;
                let member = match r.u8()? {
                    0 => None,
                    1 => Some(r.entry()?),
                    _ => return Err(WireError("bad presence flag")),
                };
                Message::Found { address, member }
            }
            8 => Message::Renew,
            11 => Message::Leave,
            12 => Message::Observed {
                endpoint: r.sock()?.ok_or(WireError("empty address"))?,
                // A lighthouse from before relays sends no flag: it does not relay.
                relay: match r.0.first() {
                    None => false,
                    Some(_) => match r.u8()? {
                        0 => false,
                        1 => true,
                        _ => return Err(WireError("relay flag is neither 0 nor 1")),
                    },
                },
            },
            9 => Message::Renewed { chain: r.chain()? },
            15 => Message::Introduce { member: r.entry()? },
            10 => {
                let opens_at = r.u64()?;
                let n = r.u8()? as usize;
                let reason = String::from_utf8(r.take(n)?.to_vec())
                    .map_err(|_| WireError("text is not UTF-8"))?;
                Message::RenewRefused { reason, opens_at }
            }
            _ => return Err(WireError("unknown message kind")),
        };
        if !r.0.is_empty() {
            return Err(WireError("trailing bytes"));
        }
        Ok(m)
    }
}

/// Splits an encoded revocation list into pages that each fit one message.
pub fn revocation_pages(issued_at: u64, list: &[u8]) -> Vec<Message> {
    let chunks: Vec<&[u8]> = list.chunks(MAX_MESSAGE - 64).collect();
    let pages = chunks.len().clamp(1, u16::MAX as usize) as u16;
    chunks
        .into_iter()
        .take(pages as usize)
        .enumerate()
        .map(|(i, c)| Message::Revocations {
            issued_at,
            page: i as u16,
            pages,
            bytes: c.to_vec(),
        })
        .collect()
}

/// Splits a roster into pages that each fit one message.
pub fn roster_pages(generation: u64, members: &[RosterEntry]) -> Vec<Message> {
    let mut pages: Vec<Vec<RosterEntry>> = vec![Vec::new()];
    let mut size = 0;
    for m in members {
        let len = 4
            + m.chain.iter().map(|c| c.len() + 2).sum::<usize>()
            + 19
            + 1
            + 17 * m.multicast.len().min(MAX_GROUPS)
            + 1
            + 19 * m.candidates.len().min(MAX_CANDIDATES);
        if size + len > MAX_MESSAGE - 32 && pages.last().is_some_and(|p| !p.is_empty()) {
            pages.push(Vec::new());
            size = 0;
        }
        size += len;
        if let Some(p) = pages.last_mut() {
            p.push(m.clone());
        }
    }
    let count = pages.len().min(u16::MAX as usize) as u16;
    pages
        .into_iter()
        .take(count as usize)
        .enumerate()
        .map(|(i, members)| Message::Roster {
            generation,
            page: i as u16,
            pages: count,
            members,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_message_roundtrips() {
        let entry = RosterEntry {
            chain: vec![vec![1; 180], vec![2; 180]],
            endpoint: Some("192.0.2.1:51820".parse().unwrap()),
            multicast: vec!["239.255.0.1".parse().unwrap(), "ff05::1:3".parse().unwrap()],
            candidates: vec![
                "10.1.0.2:51820".parse().unwrap(),
                "[2001:db8::2]:51820".parse().unwrap(),
            ],
        };
        for m in [
            Message::Hello {
                chain: vec![vec![7; 200]],
            },
            Message::Welcome,
            Message::Observed {
                endpoint: "[2001:db8::7]:40000".parse().unwrap(),
                relay: true,
            },
            Message::Observed {
                endpoint: "198.51.100.9:61000".parse().unwrap(),
                relay: false,
            },
            Message::Revocations {
                issued_at: 5,
                page: 1,
                pages: 2,
                bytes: vec![3; 900],
            },
            Message::Register {
                talk_to: vec!["robots".into(), "operators".into()],
                candidates: vec![
                    "10.0.0.1:51820".parse().unwrap(),
                    "[2001:db8::1]:51820".parse().unwrap(),
                ],
                refresh_s: 30,
                multicast: vec!["239.255.0.1".parse().unwrap()],
            },
            Message::Lookup {
                address: "10.77.0.9".parse().unwrap(),
            },
            Message::Lookup {
                address: "fd77::9".parse().unwrap(),
            },
            Message::Found {
                address: "10.77.0.9".parse().unwrap(),
                member: Some(entry.clone()),
            },
            Message::Found {
                address: "10.77.0.9".parse().unwrap(),
                member: None,
            },
            Message::Introduce {
                member: entry.clone(),
            },
            Message::Renew,
            Message::Leave,
            Message::Renewed {
                chain: vec![vec![4; 190], vec![5; 190]],
            },
            Message::RenewRefused {
                reason: "too early".into(),
                opens_at: 1_800_000_000,
            },
            Message::Roster {
                generation: 9,
                page: 0,
                pages: 1,
                members: vec![
                    entry.clone(),
                    RosterEntry {
                        endpoint: None,
                        multicast: vec![],
                        candidates: vec![],
                        ..entry
                    },
                ],
            },
        ] {
            assert_eq!(Message::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn the_fuzzers_introduce_seed_is_an_introduction() {
        let seed = include_bytes!("../../fuzz/seeds/mesh_control/introduce.bin");
        match Message::decode(seed) {
            Ok(Message::Introduce { member }) => {
                assert_eq!(
                    member.endpoint,
                    "203.0.113.21:51820".parse::<SocketAddr>().ok()
                );
                assert_eq!(
                    member.candidates,
                    vec!["10.1.0.2:51820".parse::<SocketAddr>().unwrap()]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn relay_frames_carry_a_datagram_and_nothing_else_passes_for_one() {
        let key = [9u8; 32];
        let datagram = vec![4u8; 1452];
        let frame = relay_frame(Leg::ToRelay, &key, &datagram);
        assert_eq!(
            parse_relay(&frame),
            Some((Leg::ToRelay, &key, datagram.as_slice()))
        );
        let back = relay_frame(Leg::FromRelay, &key, &datagram);
        assert_eq!(
            parse_relay(&back),
            Some((Leg::FromRelay, &key, datagram.as_slice()))
        );
        // Not a mesh message, and a mesh message is not a frame.
        assert!(Message::decode(&frame).is_err());
        assert_eq!(parse_relay(&Message::Welcome.encode()), None);
        // Empty, truncated or oversized: no frame.
        assert_eq!(parse_relay(&relay_frame(Leg::ToRelay, &key, &[])), None);
        assert_eq!(parse_relay(&frame[..4 + 1 + 20]), None);
        assert_eq!(
            parse_relay(&relay_frame(
                Leg::FromRelay,
                &key,
                &vec![0; MAX_RELAYED + 1]
            )),
            None
        );
    }

    #[test]
    fn an_observed_answer_without_the_relay_flag_means_no_relay() {
        // What a lighthouse from before relays sends.
        let mut old = Message::Observed {
            endpoint: "198.51.100.9:61000".parse().unwrap(),
            relay: true,
        }
        .encode();
        old.pop();
        assert_eq!(
            Message::decode(&old),
            Ok(Message::Observed {
                endpoint: "198.51.100.9:61000".parse().unwrap(),
                relay: false,
            })
        );
        let mut odd = old.clone();
        odd.push(7);
        assert!(Message::decode(&odd).is_err());
    }

    #[test]
    fn a_group_that_is_not_multicast_is_refused() {
        let mut bytes = Message::Register {
            talk_to: vec![],
            candidates: vec![],
            refresh_s: 30,
            multicast: vec!["239.255.0.1".parse().unwrap()],
        }
        .encode();
        let at = bytes.len() - 4;
        bytes[at..].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(
            Message::decode(&bytes),
            Err(WireError(
                "a multicast group that is not a multicast address"
            ))
        );
    }

    #[test]
    fn a_roster_of_fifty_splits_into_pages_that_fit() {
        let members: Vec<RosterEntry> = (0..50)
            .map(|i| RosterEntry {
                chain: vec![vec![i; 190], vec![i; 190]],
                endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                multicast: vec!["ff05::1:3".parse().unwrap(); (i % 3) as usize],
                candidates: vec!["[2001:db8::1]:51820".parse().unwrap(); (i % 9) as usize],
            })
            .collect();
        let pages = roster_pages(3, &members);
        assert!(pages.len() > 1);
        let mut back = Vec::new();
        for p in &pages {
            let bytes = p.encode();
            assert!(bytes.len() <= MAX_MESSAGE, "{}", bytes.len());
            if let Message::Roster { members, .. } = Message::decode(&bytes).unwrap() {
                back.extend(members);
            }
        }
        assert_eq!(back, members);
        assert_eq!(
            roster_pages(1, &[]).len(),
            1,
            "an empty roster is one empty page"
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let _ = Message::decode(&bytes);
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            if let Ok(m) = Message::decode(&framed) {
                prop_assert_eq!(Message::decode(&m.encode()), Ok(m));
            }
        }
    }
}
