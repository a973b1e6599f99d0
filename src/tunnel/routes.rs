//! Allowed-IPs routing: longest-prefix match from an overlay address to a peer. Built once per
//! peer change; lookups hash one masked key per prefix length in use, longest first.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug, Default)]
struct Family {
    /// (prefix length, masked address → peer), longest prefix first.
    by_len: Vec<(u8, HashMap<u128, usize>)>,
}

impl Family {
    fn insert(&mut self, key: u128, len: u8, peer: usize) {
        match self.by_len.iter_mut().find(|(l, _)| *l == len) {
            Some((_, map)) => {
                map.insert(key, peer);
            }
            None => {
                self.by_len.push((len, HashMap::from([(key, peer)])));
                self.by_len.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
            }
        }
    }

    fn lookup(&self, addr: u128, bits: u8) -> Option<usize> {
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&mask(addr, *len, bits)).copied())
    }
}

fn mask(addr: u128, len: u8, bits: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let keep = u32::from(len.min(bits));
    let drop = u32::from(bits) - keep;
    (addr >> drop) << drop
}

/// Maps overlay addresses to peer indexes.
#[derive(Debug, Default)]
pub struct RouteTable {
    v4: Family,
    v6: Family,
}

impl RouteTable {
    /// `routes` pairs each allowed-IPs prefix with its peer index; a later duplicate wins.
    pub fn new<'a>(routes: impl IntoIterator<Item = (&'a IpNet, usize)>) -> Self {
        let mut table = RouteTable::default();
        for (net, peer) in routes {
            match net.trunc() {
                IpNet::V4(n) => {
                    table
                        .v4
                        .insert(u128::from(u32::from(n.addr())), n.prefix_len(), peer)
                }
                IpNet::V6(n) => table.v6.insert(u128::from(n.addr()), n.prefix_len(), peer),
            }
        }
        table
    }

    /// The peer whose allowed IPs hold `addr` most specifically.
    pub fn lookup(&self, addr: IpAddr) -> Option<usize> {
        match addr {
            IpAddr::V4(a) => self.v4.lookup(u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => self.v4.lookup(u128::from(u32::from(v4)), 32),
                None => self.v6.lookup(u128::from(a), 128),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(&str, usize)]) -> RouteTable {
        let nets: Vec<(IpNet, usize)> = routes
            .iter()
            .map(|(n, p)| (n.parse().unwrap(), *p))
            .collect();
        RouteTable::new(nets.iter().map(|(n, p)| (n, *p)))
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(&[
            ("10.77.0.0/16", 1),
            ("10.77.0.2/32", 2),
            ("0.0.0.0/0", 3),
            ("fd77::/64", 4),
            ("fd77::2/128", 5),
        ]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(t.lookup(ip("10.77.0.2")), Some(2));
        assert_eq!(t.lookup(ip("10.77.9.9")), Some(1));
        assert_eq!(t.lookup(ip("8.8.8.8")), Some(3));
        assert_eq!(t.lookup(ip("fd77::2")), Some(5));
        assert_eq!(t.lookup(ip("fd77::9")), Some(4));
        assert_eq!(t.lookup(ip("fd78::1")), None);
    }

    #[test]
    fn host_bits_in_config_are_ignored() {
        let t = table(&[("10.77.1.9/24", 7)]);
        assert_eq!(t.lookup("10.77.1.200".parse().unwrap()), Some(7));
    }

    #[test]
    fn empty_table_routes_nothing() {
        assert_eq!(
            RouteTable::default().lookup("10.0.0.1".parse().unwrap()),
            None
        );
    }
}
