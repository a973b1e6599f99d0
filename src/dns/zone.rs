//! The names a node answers for, without I/O: `<member>.<domain>` from the peer table and the
//! node itself, NXDOMAIN for other names in the domain, and a refusal for everything outside
//! it (the node is no open resolver).

use ipnet::IpNet;
use std::net::IpAddr;

/// Addresses in one answer at most, so it always fits a 512-byte UDP answer (the server
/// speaks UDP only).
pub const MAX_RECORDS: usize = 8;

/// What a question gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The member exists; its addresses of the asked type (none: it has no such record).
    Member(Vec<IpAddr>),
    /// The domain itself (SOA, and no addresses).
    Apex,
    /// A name in the domain that nobody holds.
    NxDomain,
    /// A name outside the domain.
    Refused,
}

/// The record types a member can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    V4,
    V6,
    Both,
    /// Another type (MX, TXT, ...): a member has none.
    Other,
}

/// A member's overlay addresses: its host routes (a /32 or /128 among its allowed IPs, or
/// its own addresses for this node). A subnet routed through a peer names no host.
pub fn host_addresses(nets: &[IpNet]) -> Vec<IpAddr> {
    nets.iter()
        .filter(|n| n.prefix_len() == n.max_prefix_len())
        .map(IpNet::addr)
        .collect()
}

/// Answers `qname` (any case, with or without the trailing dot) in `domain` (lowercase, no
/// trailing dot); `member` gives the host addresses of the member with a name (compared
/// without regard to case), if there is one.
pub fn answer(
    domain: &str,
    qname: &str,
    wanted: Wanted,
    member: impl FnOnce(&str) -> Option<Vec<IpAddr>>,
) -> Answer {
    let q = qname
        .strip_suffix('.')
        .unwrap_or(qname)
        .to_ascii_lowercase();
    if q == domain {
        return Answer::Apex;
    }
    let Some(label) = q
        .strip_suffix(domain)
        .and_then(|rest| rest.strip_suffix('.'))
    else {
        return Answer::Refused;
    };
    if label.is_empty() || label.contains('.') {
        return Answer::NxDomain;
    }
    let Some(addrs) = member(label) else {
        return Answer::NxDomain;
    };
    Answer::Member(
        addrs
            .into_iter()
            .filter(|a| match wanted {
                Wanted::V4 => a.is_ipv4(),
                Wanted::V6 => a.is_ipv6(),
                Wanted::Both => true,
                Wanted::Other => false,
            })
            .take(MAX_RECORDS)
            .collect(),
    )
}

/// Checks a `[dns] domain`: DNS labels of letters, digits and `-`, 1..=253 characters.
pub fn check_domain(domain: &str) -> Result<String, String> {
    let d = domain
        .strip_suffix('.')
        .unwrap_or(domain)
        .to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if d.is_empty() || d.len() > 253 || !d.split('.').all(label_ok) {
        return Err(format!(
            "`{domain}` is not a DNS domain: labels of letters, digits and `-`, separated by dots"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn members_answer_by_type_and_the_rest_is_nxdomain_or_refused() {
        let robot1 = ips(&["10.77.0.2", "fd77::2"]);
        let op = ips(&["10.77.0.1"]);
        let members = [("robot1", &robot1), ("Operator", &op)];
        let ask = |q: &str, w| {
            answer("myelin.internal", q, w, |label| {
                members
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(label))
                    .map(|(_, a)| a.to_vec())
            })
        };
        assert_eq!(
            ask("robot1.myelin.internal.", Wanted::V4),
            Answer::Member(ips(&["10.77.0.2"]))
        );
        assert_eq!(
            ask("ROBOT1.Myelin.Internal", Wanted::V6),
            Answer::Member(ips(&["fd77::2"]))
        );
        assert_eq!(
            ask("robot1.myelin.internal", Wanted::Both),
            Answer::Member(robot1.clone())
        );
        assert_eq!(
            ask("operator.myelin.internal", Wanted::V6),
            Answer::Member(vec![]),
            "NODATA"
        );
        assert_eq!(
            ask("robot1.myelin.internal", Wanted::Other),
            Answer::Member(vec![])
        );
        assert_eq!(ask("robot9.myelin.internal", Wanted::V4), Answer::NxDomain);
        assert_eq!(
            ask("a.robot1.myelin.internal", Wanted::V4),
            Answer::NxDomain
        );
        assert_eq!(ask("myelin.internal.", Wanted::V4), Answer::Apex);
        assert_eq!(ask("example.com", Wanted::V4), Answer::Refused);
        assert_eq!(ask("xmyelin.internal", Wanted::V4), Answer::Refused);
        assert_eq!(
            ask("robot1.myelin.internal.evil", Wanted::V4),
            Answer::Refused
        );
        assert_eq!(ask("", Wanted::V4), Answer::Refused);
    }

    #[test]
    fn only_host_routes_name_a_member() {
        let nets: Vec<IpNet> = ["10.77.0.2/32", "192.168.7.0/24", "fd77::2/128"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(host_addresses(&nets), ips(&["10.77.0.2", "fd77::2"]));
    }

    #[test]
    fn domains_are_checked() {
        assert_eq!(check_domain("Myelin.Internal.").unwrap(), "myelin.internal");
        for bad in ["", ".", "a..b", "-a.b", "a b.c", "ä.internal"] {
            assert!(check_domain(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        /// Whatever is asked, a name outside the domain is refused, and nothing panics.
        #[test]
        fn outside_names_are_always_refused(q in "[a-zA-Z0-9.-]{0,40}") {
            let a = ips(&["10.0.0.1"]);
            let got = answer("myelin.internal", &q, Wanted::Both, |l| (l == "x").then(|| a.clone()));
            let lower = q.strip_suffix('.').unwrap_or(&q).to_ascii_lowercase();
            let inside = lower == "myelin.internal" || lower.ends_with(".myelin.internal");
            prop_assert_eq!(got == Answer::Refused, !inside);
        }
    }
}
