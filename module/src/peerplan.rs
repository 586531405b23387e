//! The shape of a round-robin peer list built from synced servers, decided without nginx.
//!
//! The FFI layer (`ffi/generation.rs`, the same code for the HTTP and the stream module) turns a
//! [`Plan`] into nginx's `ngx_{http,stream}_upstream_rr_peers_t` and `..._rr_peer_t` structs
//! field by field; everything that can be decided without those structs is decided here and
//! unit-tested: the peer order (by address, whatever the listing order), the split into a
//! primary and a backup list, the placeholder of an empty list, each list's `number`,
//! `total_weight`, `tries`, `weighted` and `single`, the `next` links, each server's index among
//! the peers and the consistent-hash ring of the primary peers.
use std::collections::HashMap;
use std::net::SocketAddr;

use crate::chash;
use crate::model::Server;

/// Address -> index in [`Plan::peers`].
pub type AddrIndex = HashMap<SocketAddr, usize, fnv::FnvBuildHasher>;

/// One peer, in the values nginx's peer struct takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPlan {
    pub addr: SocketAddr,
    /// nginx's peer name (`1.2.3.4:80`, `[::1]:80`): `Plan::names[name.0..name.0 + name.1]`.
    pub name: (usize, usize),
    /// At least 1 (nginx's `weight` and `effective_weight`).
    pub weight: usize,
    pub max_fails: u32,
    /// Seconds.
    pub fail_timeout: u32,
    pub down: bool,
    /// Last peer of its list (`next` null); otherwise `next` is the following peer.
    pub last_of_list: bool,
}

/// One list (`ngx_*_upstream_rr_peers_t`): peers `first..first + number` of [`Plan::peers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListPlan {
    pub first: usize,
    pub number: usize,
    pub total_weight: usize,
    /// Peers not marked down (how many peers a request may try).
    pub tries: usize,
    /// Some weight differs from 1.
    pub weighted: bool,
    /// The only peer, with no backup list (the primary list only).
    pub single: bool,
}

/// A peer list for a set of servers: primary peers first, then backup peers.
#[derive(Debug)]
pub struct Plan {
    pub peers: Vec<PeerPlan>,
    /// Every peer's name, concatenated (see [`PeerPlan::name`]).
    pub names: Vec<u8>,
    pub primary: ListPlan,
    pub backup: Option<ListPlan>,
    /// The primary list is the placeholder of an empty list: one server `127.0.0.1:0` marked
    /// down, which fails requests fast with 502 (an empty primary list would divide by zero in
    /// nginx's ip_hash and hash: total weight 0).
    pub placeholder: bool,
    /// For `servers[i]` (the order given to [`plan`]), its index in `peers`.
    pub peer_index: Vec<usize>,
    /// Address -> index in `peers`, for every real server (not the placeholder).
    pub by_addr: AddrIndex,
}

/// The address of the placeholder of an empty list.
pub const PLACEHOLDER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0));

/// Plans the peer list of `servers` (addresses unique, as in every synced list).
///
/// Peers are sorted by address whatever the listing order of `servers` (which follows
/// nginx-upsync-module's history order for upstream_show and the dump): the same servers give
/// the same peer order on every nginx instance, which `hash` and `ip_hash` need.
pub fn plan(servers: &[Server]) -> Plan {
    let mut primary: Vec<&Server> = servers.iter().filter(|s| !s.backup).collect();
    let mut backup: Vec<&Server> = servers.iter().filter(|s| s.backup).collect();
    primary.sort_by_key(|s| s.addr);
    backup.sort_by_key(|s| s.addr);
    let placeholder_server = Server { addr: PLACEHOLDER, weight: 1, max_fails: 0, fail_timeout: 0, down: true, backup: false };
    let placeholder = primary.is_empty();
    if placeholder {
        primary.push(&placeholder_server);
    }
    let np = primary.len();
    let nb = backup.len();
    let all = primary.iter().chain(backup.iter());
    let mut names = Vec::with_capacity((np + nb) * 20);
    let mut peers = Vec::with_capacity(np + nb);
    let mut by_addr = AddrIndex::with_capacity_and_hasher(np + nb, Default::default());
    for (i, s) in all.enumerate() {
        let start = names.len();
        crate::model::write_addr(&mut names, &s.addr);
        peers.push(PeerPlan {
            addr: s.addr,
            name: (start, names.len() - start),
            weight: s.weight.max(1) as usize,
            max_fails: s.max_fails,
            fail_timeout: s.fail_timeout,
            down: s.down,
            last_of_list: i + 1 == np || i + 1 == np + nb,
        });
        if !(placeholder && i == 0) {
            by_addr.insert(s.addr, i);
        }
    }
    let list = |first: usize, number: usize| {
        let slice = &peers[first..first + number];
        let total_weight: usize = slice.iter().map(|p| p.weight).sum();
        ListPlan {
            first,
            number,
            total_weight,
            tries: slice.iter().filter(|p| !p.down).count(),
            weighted: total_weight != number,
            single: false,
        }
    };
    let primary_list = ListPlan { single: np == 1 && nb == 0, ..list(0, np) };
    let backup_list = (nb > 0).then(|| list(np, nb));
    // Every server of `servers` is in `by_addr` (addresses are unique in a list).
    let peer_index = servers.iter().map(|s| by_addr.get(&s.addr).copied().unwrap_or(0)).collect();
    Plan { peers, names, primary: primary_list, backup: backup_list, placeholder, peer_index, by_addr }
}

impl Plan {
    /// The name of `peers[i]`.
    pub fn name(&self, i: usize) -> &[u8] {
        let (start, len) = self.peers[i].name;
        &self.names[start..start + len]
    }

    /// The consistent-hash ring of the primary peers (nginx's `hash KEY consistent`): each
    /// point's `server` is an index in `peers`.
    pub fn ring(&self) -> Vec<chash::Point> {
        let primary = &self.peers[..self.primary.number];
        chash::ring(primary.iter().enumerate().map(|(i, p)| (self.name(i), p.weight)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(addr: &str, weight: u32) -> Server {
        Server { addr: addr.parse().unwrap(), weight, max_fails: 1, fail_timeout: 10, down: false, backup: false }
    }

    fn backup(addr: &str) -> Server {
        Server { backup: true, ..server(addr, 1) }
    }

    #[test]
    fn peers_are_sorted_by_address_and_servers_point_at_them() {
        let servers = vec![server("10.0.0.3:80", 1), server("10.0.0.1:80", 1), server("10.0.0.2:80", 1)];
        let p = plan(&servers);
        let addrs: Vec<String> = p.peers.iter().map(|p| p.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        assert_eq!(p.peer_index, [2, 0, 1]);
        for (i, s) in servers.iter().enumerate() {
            assert_eq!(p.peers[p.peer_index[i]].addr, s.addr);
            assert_eq!(p.by_addr[&s.addr], p.peer_index[i]);
        }
        assert_eq!(p.name(0), b"10.0.0.1:80");
        assert!(!p.placeholder);
    }

    #[test]
    fn tries_count_the_peers_not_down_and_weights_are_at_least_one() {
        let mut servers = vec![server("10.0.0.1:80", 0), server("10.0.0.2:80", 3), server("10.0.0.3:80", 1)];
        servers[2].down = true;
        let p = plan(&servers);
        let weights: Vec<usize> = p.peers.iter().map(|p| p.weight).collect();
        assert_eq!(weights, [1, 3, 1]);
        assert_eq!(p.primary, ListPlan { first: 0, number: 3, total_weight: 5, tries: 2, weighted: true, single: false });
        assert!(p.peers[2].down);
        assert_eq!((p.peers[0].max_fails, p.peers[0].fail_timeout), (1, 10));
    }

    #[test]
    fn equal_weights_are_not_weighted_and_one_server_is_single() {
        let p = plan(&[server("10.0.0.1:80", 1), server("10.0.0.2:80", 1)]);
        assert!(!p.primary.weighted && !p.primary.single);
        let p = plan(&[server("10.0.0.1:80", 2)]);
        assert!(p.primary.weighted && p.primary.single);
        // One primary server with a backup is not `single`: nginx would skip the backup.
        let p = plan(&[server("10.0.0.1:80", 1), backup("10.0.0.9:80")]);
        assert!(!p.primary.single);
    }

    #[test]
    fn backup_servers_form_a_second_list_after_the_primary_peers() {
        let servers = vec![backup("10.0.0.9:80"), server("10.0.0.2:80", 2), backup("10.0.0.8:80"), server("10.0.0.1:80", 1)];
        let p = plan(&servers);
        let addrs: Vec<String> = p.peers.iter().map(|p| p.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.8:80", "10.0.0.9:80"]);
        assert_eq!(p.primary, ListPlan { first: 0, number: 2, total_weight: 3, tries: 2, weighted: true, single: false });
        assert_eq!(p.backup, Some(ListPlan { first: 2, number: 2, total_weight: 2, tries: 2, weighted: false, single: false }));
        // `next` links: each list ends at its own last peer.
        let last: Vec<bool> = p.peers.iter().map(|p| p.last_of_list).collect();
        assert_eq!(last, [false, true, false, true]);
        assert_eq!(p.peer_index, [3, 1, 2, 0]);
    }

    #[test]
    fn an_empty_or_backup_only_list_has_a_placeholder_marked_down() {
        let p = plan(&[]);
        assert!(p.placeholder);
        assert_eq!(p.peers.len(), 1);
        assert_eq!(p.peers[0].addr, PLACEHOLDER);
        assert!(p.peers[0].down && p.peers[0].last_of_list);
        assert_eq!(p.primary, ListPlan { first: 0, number: 1, total_weight: 1, tries: 0, weighted: false, single: true });
        assert!(p.by_addr.is_empty() && p.peer_index.is_empty());

        let p = plan(&[backup("10.0.0.9:80")]);
        assert!(p.placeholder);
        assert_eq!(p.primary.number, 1);
        assert_eq!(p.backup.map(|b| (b.first, b.number)), Some((1, 1)));
        assert_eq!(p.peer_index, [1]);
        assert!(!p.by_addr.contains_key(&PLACEHOLDER));
    }

    #[test]
    fn names_are_nginx_peer_names() {
        let p = plan(&[server("[::1]:8080", 1), server("192.168.1.10:443", 1)]);
        assert_eq!(p.name(0), b"192.168.1.10:443");
        assert_eq!(p.name(1), b"[::1]:8080");
    }

    #[test]
    fn the_ring_covers_the_primary_peers_only_with_their_weights() {
        let p = plan(&[server("10.0.0.2:80", 2), server("10.0.0.1:80", 1), backup("10.0.0.9:80")]);
        let ring = p.ring();
        assert!(ring.iter().all(|pt| pt.server < 2));
        let of = |i| ring.iter().filter(|pt| pt.server == i).count();
        assert!((155..=160).contains(&of(0)), "{}", of(0));
        assert!((315..=320).contains(&of(1)), "{}", of(1));
        // The same as the ring of the names in peer order.
        assert_eq!(ring, chash::ring([(&b"10.0.0.1:80"[..], 1), (&b"10.0.0.2:80"[..], 2)].into_iter()));
    }
}
