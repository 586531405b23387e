//! The endpoint model: one upstream server ([`Endpoint`]) and an ordered set of them
//! ([`EndpointSet`]) whose order is the same on every nginx instance for the same input.
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// Where an endpoint lives: an IP literal (never resolved) or a host name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl Host {
    /// Parses an IP literal (`10.0.0.1`, `::1`, `[::1]`) or a DNS host name (letters, digits,
    /// `-`, `_` and dots; labels of 1-63 characters, at most 253 in all). Names are lowercased
    /// so `App.local` and `app.local` are one host.
    pub fn parse(s: &str) -> Result<Host, String> {
        let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
        if let Some(inner) = bare {
            return inner
                .parse::<std::net::Ipv6Addr>()
                .map(|ip| Host::Ip(IpAddr::V6(ip)))
                .map_err(|_| format!("`{s}` is not a bracketed IPv6 address"));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        if is_host_name(s) {
            // A name made only of digits and dots is a malformed IPv4 address, not a name.
            if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                return Err(format!("`{s}` is not a valid IPv4 address"));
            }
            return Ok(Host::Name(s.to_ascii_lowercase()));
        }
        if s.is_empty() {
            return Err("empty host".to_string());
        }
        Err(format!("`{s}` is neither an IP address nor a valid host name"))
    }

    pub fn is_ip(&self) -> bool {
        matches!(self, Host::Ip(_))
    }
}

fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `1.2.3.4`, `::1` (no brackets: use [`Endpoint::addr`] for `[::1]:80`) or the name.
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// Renders `host:port` with IPv6 in brackets.
pub(crate) fn host_port(host: &Host, port: u16) -> String {
    match host {
        Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Host::Ip(IpAddr::V4(ip)) => format!("{ip}:{port}"),
        Host::Name(n) => format!("{n}:{port}"),
    }
}

/// Splits `host:port`, `[v6]:port`, `host`, `[v6]`; a bare IPv6 address without brackets is
/// taken as a host without port.
pub(crate) fn split_host_port(s: &str) -> Result<(&str, Option<&str>), String> {
    if s.is_empty() {
        return Err("empty host".into());
    }
    if s.starts_with('[') {
        let end = s.find(']').ok_or("missing `]` after an IPv6 address")?;
        let host = &s[..=end];
        return match &s[end + 1..] {
            "" => Ok((host, None)),
            r => r.strip_prefix(':').map(|p| (host, Some(p))).ok_or_else(|| format!("unexpected `{r}` after `{host}`")),
        };
    }
    match s.matches(':').count() {
        0 => Ok((s, None)),
        1 => s.split_once(':').map(|(h, p)| (h, Some(p))).ok_or_else(|| "bad host:port".into()),
        _ => Ok((s, None)),
    }
}

/// Health as Consul reports it (the worst of an instance's checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Health {
    #[default]
    Passing,
    Warning,
    Critical,
}

impl Health {
    /// Consul's spelling: `passing`, `warning`, `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }

    /// Parses Consul's check status; `maintenance` counts as critical (Consul puts instances
    /// in maintenance behind a critical check). Unknown strings are `None`.
    pub fn from_consul(s: &str) -> Option<Health> {
        match s {
            "passing" => Some(Health::Passing),
            "warning" => Some(Health::Warning),
            "critical" | "maintenance" => Some(Health::Critical),
            _ => None,
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// nginx-upsync-module's defaults for a server with no attributes.
pub const DEFAULT_WEIGHT: u32 = 1;
pub const DEFAULT_MAX_FAILS: u32 = 2;
pub const DEFAULT_FAIL_TIMEOUT: u32 = 10;

/// One upstream server with nginx's attributes and what Consul says about it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: Host,
    pub port: u16,
    pub weight: u32,
    pub max_fails: u32,
    /// Seconds.
    pub fail_timeout: u32,
    pub down: bool,
    pub backup: bool,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub health: Health,
    /// Consul node name (catalog/health sources).
    pub node: Option<String>,
    /// Consul service name (catalog/health sources).
    pub service: Option<String>,
    /// Consul service ID (catalog/health sources).
    pub service_id: Option<String>,
}

impl Endpoint {
    /// An endpoint with nginx-upsync-module's defaults: weight=1 max_fails=2 fail_timeout=10,
    /// not down, not backup, passing, no tags or meta.
    pub fn new(host: Host, port: u16) -> Endpoint {
        Endpoint {
            host,
            port,
            weight: DEFAULT_WEIGHT,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            down: false,
            backup: false,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            health: Health::Passing,
            node: None,
            service: None,
            service_id: None,
        }
    }

    /// `1.2.3.4:80`, `[::1]:80` or `host:80`.
    pub fn addr(&self) -> String {
        host_port(&self.host, self.port)
    }

    /// The identity of an endpoint inside a set: host and port.
    pub fn key(&self) -> (&Host, u16) {
        (&self.host, self.port)
    }
}

/// Endpoints sorted by host then port (IPv4 < IPv6 < names; names in byte order), without
/// duplicates. The same input gives the same order on every nginx instance, which hash
/// balancing depends on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointSet {
    endpoints: Vec<Endpoint>,
}

/// What changed between two sets, by `host:port`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetDiff {
    /// In the new set only.
    pub added: Vec<Endpoint>,
    /// In the old set only.
    pub removed: Vec<Endpoint>,
    /// In both with different attributes: `(old, new)`.
    pub changed: Vec<(Endpoint, Endpoint)>,
}

impl SetDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl EndpointSet {
    pub fn new() -> EndpointSet {
        EndpointSet::default()
    }

    /// Sorts `endpoints` and drops later duplicates of the same `host:port` (the first one in
    /// input order wins). Use [`EndpointSet::from_vec_reporting`] to learn which were dropped.
    pub fn from_vec(endpoints: Vec<Endpoint>) -> EndpointSet {
        EndpointSet::from_vec_reporting(endpoints).0
    }

    /// Like [`EndpointSet::from_vec`], also returning the dropped duplicates.
    pub fn from_vec_reporting(endpoints: Vec<Endpoint>) -> (EndpointSet, Vec<Endpoint>) {
        // Sorted by key, then input position (as a stable sort: among equal keys the input
        // order is kept, so "first wins" holds). The positions are sorted, not the endpoints
        // (large structs that a sort moves n log n times: half of its cost at 20,000 servers,
        // callgrind), by a packed key for addresses: (family, address, port, position) in the
        // order of `Host`'s `Ord` (IPv4 < IPv6 < names); names go last and are sorted among
        // themselves by the full key.
        let order = sorted_positions(&endpoints);
        let mut slots: Vec<Option<Endpoint>> = endpoints.into_iter().map(Some).collect();
        let mut dropped = Vec::new();
        let mut out: Vec<Endpoint> = Vec::with_capacity(slots.len());
        for i in order {
            let Some(e) = slots[i as usize].take() else { continue };
            match out.last() {
                Some(last) if last.key() == e.key() => dropped.push(e),
                _ => out.push(e),
            }
        }
        (EndpointSet { endpoints: out }, dropped)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Endpoint> {
        self.endpoints.iter()
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn as_slice(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub fn into_vec(self) -> Vec<Endpoint> {
        self.endpoints
    }

    /// The endpoint at `host:port`, if any (binary search).
    pub fn get(&self, host: &Host, port: u16) -> Option<&Endpoint> {
        self.endpoints.binary_search_by(|e| e.key().cmp(&(host, port))).ok().map(|i| &self.endpoints[i])
    }

    /// What must change to go from `self` (old) to `other` (new). Linear: both sets are sorted.
    pub fn diff(&self, other: &EndpointSet) -> SetDiff {
        let mut d = SetDiff::default();
        let (mut i, mut j) = (0, 0);
        let (a, b) = (&self.endpoints, &other.endpoints);
        while i < a.len() && j < b.len() {
            match a[i].key().cmp(&b[j].key()) {
                std::cmp::Ordering::Less => {
                    d.removed.push(a[i].clone());
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    d.added.push(b[j].clone());
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    if a[i] != b[j] {
                        d.changed.push((a[i].clone(), b[j].clone()));
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        d.removed.extend(a[i..].iter().cloned());
        d.added.extend(b[j..].iter().cloned());
        d
    }
}

/// The positions of `endpoints` in the order of their keys, equal keys in input order (see
/// [`EndpointSet::from_vec_reporting`]).
fn sorted_positions(endpoints: &[Endpoint]) -> Vec<u32> {
    // Only IPv4 addresses (the usual list): one u128 per endpoint, address, port, position.
    let v4: Option<Vec<u128>> = endpoints
        .iter()
        .zip(0u32..)
        .map(|(e, i)| match e.host {
            Host::Ip(IpAddr::V4(ip)) => Some(u128::from(u32::from(ip)) << 64 | u128::from(e.port) << 32 | u128::from(i)),
            _ => None,
        })
        .collect();
    if let Some(mut keys) = v4 {
        keys.sort_unstable();
        return keys.into_iter().map(|k| k as u32).collect();
    }
    let mut order: Vec<(u8, u128, u16, u32)> = endpoints
        .iter()
        .zip(0u32..)
        .map(|(e, i)| match &e.host {
            Host::Ip(IpAddr::V4(ip)) => (0, u128::from(u32::from(*ip)), e.port, i),
            Host::Ip(IpAddr::V6(ip)) => (1, u128::from(*ip), e.port, i),
            Host::Name(_) => (2, 0, 0, i),
        })
        .collect();
    order.sort_unstable();
    let names = order.partition_point(|k| k.0 < 2);
    order[names..].sort_unstable_by(|a, b| endpoints[a.3 as usize].key().cmp(&endpoints[b.3 as usize].key()).then(a.3.cmp(&b.3)));
    order.into_iter().map(|k| k.3).collect()
}

impl<'a> IntoIterator for &'a EndpointSet {
    type Item = &'a Endpoint;
    type IntoIter = std::slice::Iter<'a, Endpoint>;
    fn into_iter(self) -> Self::IntoIter {
        self.endpoints.iter()
    }
}

impl IntoIterator for EndpointSet {
    type Item = Endpoint;
    type IntoIter = std::vec::IntoIter<Endpoint>;
    fn into_iter(self) -> Self::IntoIter {
        self.endpoints.into_iter()
    }
}

impl FromIterator<Endpoint> for EndpointSet {
    fn from_iter<I: IntoIterator<Item = Endpoint>>(iter: I) -> Self {
        EndpointSet::from_vec(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str, port: u16) -> Endpoint {
        Endpoint::new(Host::parse(s).unwrap(), port)
    }

    #[test]
    fn addr_renders_ipv4_ipv6_and_names() {
        assert_eq!(ep("1.2.3.4", 80).addr(), "1.2.3.4:80");
        assert_eq!(ep("::1", 80).addr(), "[::1]:80");
        assert_eq!(ep("[::1]", 80).addr(), "[::1]:80");
        assert_eq!(ep("App.Local", 8080).addr(), "app.local:8080");
    }

    #[test]
    fn host_parse_rejects_garbage() {
        for bad in ["", "-x", "a..b", "1.2.3", "999.1.1.1", "[1.2.3.4]", "a b", "x:y", &"a".repeat(64)] {
            assert!(Host::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn order_is_stable_and_duplicates_dropped() {
        let input = vec![ep("b.example", 1), ep("::1", 80), ep("10.0.0.2", 80), ep("10.0.0.1", 81), ep("10.0.0.1", 80)];
        let mut dup = ep("10.0.0.1", 80);
        dup.weight = 9;
        let mut with_dup = input.clone();
        with_dup.push(dup);
        let (set, dropped) = EndpointSet::from_vec_reporting(with_dup);
        let addrs: Vec<String> = set.iter().map(|e| e.addr()).collect();
        assert_eq!(addrs, ["10.0.0.1:80", "10.0.0.1:81", "10.0.0.2:80", "[::1]:80", "b.example:1"]);
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].weight, 9);
        let mut rev = input;
        rev.reverse();
        assert_eq!(EndpointSet::from_vec(rev), set);
    }

    proptest::proptest! {
        /// The sort of positions gives the order and the dropped duplicates of a stable sort
        /// of the endpoints by key.
        #[test]
        fn set_order_is_a_stable_sort_by_key(hosts in proptest::collection::vec((0usize..8, 0u16..3, 0u32..3), 0..40), v4_only: bool) {
            let names = ["10.0.0.1", "10.0.0.2", "9.255.255.255", "::1", "fe80::1", "b.example", "a.example", "255.0.0.0"];
            let input: Vec<Endpoint> = hosts
                .iter()
                .map(|&(h, port, weight)| {
                    let h = if v4_only { [0, 1, 2, 7][h % 4] } else { h };
                    let mut e = ep(names[h], port);
                    e.weight = weight;
                    e
                })
                .collect();
            let mut expected = input.clone();
            expected.sort_by(|a, b| a.key().cmp(&b.key()));
            let (mut kept, mut gone) = (Vec::new(), Vec::new());
            for e in expected {
                match kept.last() {
                    Some(last) if Endpoint::key(last) == e.key() => gone.push(e),
                    _ => kept.push(e),
                }
            }
            let (set, dropped) = EndpointSet::from_vec_reporting(input);
            proptest::prop_assert_eq!(set.into_vec(), kept);
            proptest::prop_assert_eq!(dropped, gone);
        }
    }

    #[test]
    fn diff_finds_added_removed_changed() {
        let old = EndpointSet::from_vec(vec![ep("10.0.0.1", 80), ep("10.0.0.2", 80), ep("10.0.0.3", 80)]);
        let mut changed = ep("10.0.0.2", 80);
        changed.down = true;
        let new = EndpointSet::from_vec(vec![changed.clone(), ep("10.0.0.3", 80), ep("10.0.0.4", 80)]);
        let d = old.diff(&new);
        assert_eq!(d.removed, vec![ep("10.0.0.1", 80)]);
        assert_eq!(d.added, vec![ep("10.0.0.4", 80)]);
        assert_eq!(d.changed, vec![(ep("10.0.0.2", 80), changed)]);
        assert!(new.diff(&new).is_empty());
        assert!(new.get(&Host::parse("10.0.0.4").unwrap(), 80).is_some());
        assert!(new.get(&Host::parse("10.0.0.1").unwrap(), 80).is_none());
    }
}
