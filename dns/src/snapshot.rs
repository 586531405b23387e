//! The registry as the DNS server sees it: an immutable snapshot built from the instances the
//! Consul feed delivers, indexed for answering. A new snapshot is built aside and swapped in
//! whole ([`crate::state::Shared`]), so answering never waits for an update.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use hickory_proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_proto::rr::{Name, RData, Record};
use ipnet::IpNet;

use crate::names::{addr_name, ip_label};
use crate::wire::{record_head, ZoneWire, LABEL_MAX, TYPE_A, TYPE_AAAA};

/// An instance's address (a host name is served in SRV only, see the README) and its
/// aggregated health (its own checks and its node's), as the discovery library models them.
pub use upsync_discovery::{Health, Host};

/// One registered service instance, as the feed delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub service: String,
    pub id: String,
    pub node: String,
    pub host: Host,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// upsync weight (tag `weight=N`), the SRV weight.
    pub weight: u32,
    /// tag `backup`: a larger SRV priority; in A/AAAA only when no other instance is usable.
    pub backup: bool,
    /// tag `down`: never in answers.
    pub down: bool,
    pub health: Health,
}

/// SRV priority of ordinary instances and of backups (lower is preferred, RFC 2782).
pub const PRIORITY_PRIMARY: u16 = 1;
pub const PRIORITY_BACKUP: u16 = 2;

/// What the zone looks like, from the configuration. Shared by every snapshot.
#[derive(Clone, Debug)]
pub struct ZoneConfig {
    /// Lower-case, absolute (`service.upsync.`).
    pub zone: Name,
    /// TTL of positive answers.
    pub ttl: u32,
    /// TTL of the SOA in negative answers and its MINIMUM field (RFC 2308).
    pub negative_ttl: u32,
    /// Target of the zone's NS record (`ns.ZONE` by default).
    pub ns_name: Name,
    /// Addresses served for `ns_name` when it is inside the zone.
    pub ns_addrs: Vec<IpAddr>,
    /// RNAME of the SOA.
    pub hostmaster: Name,
    /// Leave instances whose checks are `warning` out of answers (only `passing` ones are served).
    pub only_passing: bool,
    /// Reverse zones served authoritatively (NXDOMAIN for unknown addresses inside them).
    pub reverse_zones: Vec<ReverseZone>,
}

#[derive(Clone, Debug)]
pub struct ReverseZone {
    pub name: Name,
    pub net: IpNet,
}

impl ZoneConfig {
    /// Defaults for `zone`, as the configuration would give them.
    pub fn new(zone: Name) -> ZoneConfig {
        let label = |l: &str| Name::from_ascii(l).and_then(|n| n.append_domain(&zone)).unwrap_or_else(|_| zone.clone());
        ZoneConfig {
            ns_name: label("ns"),
            hostmaster: label("hostmaster"),
            zone,
            ttl: 5,
            negative_ttl: 5,
            ns_addrs: Vec::new(),
            only_passing: true,
            reverse_zones: Vec::new(),
        }
    }
}

/// An instance prepared for answering.
#[derive(Debug)]
pub(crate) struct Inst {
    pub id: String,
    pub node: String,
    pub host: Host,
    pub ip: Option<IpAddr>,
    /// SRV target: `LABEL.addr.ZONE` for IPs, the host name otherwise.
    pub target: Name,
    pub port: u16,
    pub priority: u16,
    pub weight: u16,
    pub meta: BTreeMap<String, String>,
    /// Wire form ([`crate::wire`]): SRV priority, weight and port; the target's first label
    /// with its length byte (`label[0] == 0`: the target is not `LABEL.addr.ZONE`); the glue
    /// record after its owner (type to address).
    pub srv_rdata: [u8; 6],
    pub label: [u8; LABEL_MAX],
    pub glue: [u8; 26],
    pub glue_len: u8,
}

/// A set of usable instances answered together (a whole service, or one tag of it).
#[derive(Debug, Default)]
pub(crate) struct View {
    /// Distinct IPv4 / IPv6 addresses for A / AAAA: of the primaries, or of the backups when
    /// no primary is usable.
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
    /// Every usable instance (primaries and backups), indexes into `Service::insts`.
    pub srv: Vec<u32>,
    /// One instance per distinct address among `srv`: the glue of an SRV answer.
    pub glue: Vec<u32>,
    /// Wire form ([`crate::wire`]): the A and AAAA records (`v4`, `v6` in order), for each
    /// `srv` member the index in `glue` of its address, and whether every SRV target is an
    /// address name (the SRV answer can be assembled from precompiled parts).
    pub wire_a: Box<[u8]>,
    pub wire_aaaa: Box<[u8]>,
    pub srv_glue: Box<[u16]>,
    pub srv_wire: bool,
}

#[derive(Debug)]
pub(crate) struct Service {
    /// `NAME.ZONE`, the PTR target of the service's addresses.
    pub fqdn: Name,
    pub insts: Vec<Inst>,
    pub all: View,
    /// Lower-case tag → its view. Tags of registered but unusable instances are present
    /// with an empty view, so their names answer NODATA rather than NXDOMAIN.
    pub tags: HashMap<Box<[u8]>, View>,
    /// Addresses of every registered instance, healthy or not (sorted, distinct): for PTR.
    pub ips: Vec<IpAddr>,
    /// Registered instances, and tags that cannot be a label.
    pub registered: usize,
    pub unnamable_tags: usize,
}

/// Counts a snapshot was built from, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub services: usize,
    pub instances: usize,
    pub usable: usize,
    /// Services or tags that cannot be a DNS label (dots, too long), left out.
    pub unnamable: usize,
}

/// An immutable view of the registry, indexed for answering. Services are shared between
/// successive snapshots ([`Snapshot::with_services`] rebuilds only those that changed).
#[derive(Debug)]
pub struct Snapshot {
    /// Consul index the data is from (0 before the first sync).
    pub index: u64,
    /// False for the placeholder served before the first read of Consul: in-zone questions
    /// then get SERVFAIL (try again), not an NXDOMAIN that resolvers would cache.
    pub synced: bool,
    /// When it was built (monotonic, for staleness) and the wall-clock time (for logs).
    pub built: Instant,
    pub built_wall: SystemTime,
    pub zone: Arc<ZoneConfig>,
    pub stats: Stats,
    pub(crate) services: HashMap<Arc<[u8]>, Arc<Service>>,
    /// Instances whose service name cannot be a label.
    unnamable_services: usize,
    /// Every registered instance address → services with an instance there (PTR).
    pub(crate) addrs: Addrs,
    /// Reverse-zone empty non-terminals (partial reverse names above known addresses), each
    /// with the number of known addresses under it.
    pub(crate) reverse_ents: ReverseEnts,
    pub(crate) soa: Record,
    pub(crate) ns: Record,
    pub(crate) ns_glue: Vec<Record>,
    /// The zone's precompiled parts (SOA of negative answers).
    pub(crate) wire: ZoneWire,
}

/// Every registered address → the services there (PTR), and the reverse-zone empty
/// non-terminals above them. Persistent maps (imbl): a snapshot shares them with the one it
/// was derived from and an instance coming or going updates a few nodes, instead of
/// rebuilding 100,000 entries (~50 ms) at each membership change.
pub(crate) type Addrs = imbl::HashMap<IpAddr, Vec<Name>>;
pub(crate) type ReverseEnts = imbl::HashMap<IpNet, u32>;

/// A label usable in a DNS name: 1..=63 bytes, no dot. Lower-cased.
fn dns_label(s: &str) -> Option<Box<[u8]>> {
    (!s.is_empty() && s.len() <= 63 && !s.contains('.')).then(|| s.to_ascii_lowercase().into_bytes().into_boxed_slice())
}

/// Stable order: answers (before rotation) and SRV lists do not depend on Consul's order.
fn sort_instances(instances: &mut [Instance]) {
    instances.sort_by(|a, b| (&a.host, a.port, &a.id).cmp(&(&b.host, b.port, &b.id)));
}

impl Snapshot {
    /// An empty snapshot (before the first sync with Consul).
    pub fn empty(zone: Arc<ZoneConfig>) -> Snapshot {
        Snapshot { synced: false, ..Snapshot::build(0, zone, Vec::new()) }
    }

    /// Indexes `instances` (any order) for answering.
    pub fn build(index: u64, zone: Arc<ZoneConfig>, instances: Vec<Instance>) -> Snapshot {
        let mut by_service: HashMap<Box<[u8]>, Vec<Instance>> = HashMap::new();
        let mut unnamable_services = 0;
        for inst in instances {
            match dns_label(&inst.service) {
                Some(key) => by_service.entry(key).or_default().push(inst),
                None => unnamable_services += 1,
            }
        }
        let mut services = HashMap::with_capacity(by_service.len());
        for (key, list) in by_service {
            let len = list.len();
            match Service::build(&key, list, &zone) {
                Some(svc) => {
                    services.insert(Arc::from(key), Arc::new(svc));
                }
                None => unnamable_services += len,
            }
        }
        Snapshot::finish(index, zone, services, unnamable_services, None)
    }

    /// This snapshot with the instances of some services replaced (an empty list removes the
    /// service), at `index`. Unchanged services are shared, not rebuilt: a health change of
    /// one instance costs the rebuild of its service only.
    pub fn with_services(&self, index: u64, changed: Vec<(String, Vec<Instance>)>) -> Snapshot {
        let mut services = self.services.clone();
        let (mut addrs, mut ents) = (self.addrs.clone(), self.reverse_ents.clone());
        let reverse = !self.zone.reverse_zones.is_empty();
        let mut unnamable_services = self.unnamable_services;
        for (name, list) in changed {
            let Some(key) = dns_label(&name) else {
                unnamable_services += list.len();
                continue;
            };
            let len = list.len();
            let new = if list.is_empty() { None } else { Service::build(&key, list, &self.zone) };
            if new.is_none() {
                unnamable_services += len;
            }
            let old = services.get(&key[..]).map(|s| (s.fqdn.clone(), s.ips.clone()));
            let (fqdn, new_ips) = match &new {
                Some(s) => (Some(s.fqdn.clone()), s.ips.clone()),
                None => (None, Vec::new()),
            };
            if let Some((old_fqdn, old_ips)) = &old {
                for ip in old_ips.iter().filter(|ip| new_ips.binary_search(ip).is_err()) {
                    unindex(&mut addrs, &mut ents, reverse, *ip, old_fqdn);
                }
            }
            if let Some(fqdn) = &fqdn {
                let old_ips = old.as_ref().map(|o| &o.1[..]).unwrap_or_default();
                for ip in new_ips.iter().filter(|ip| old_ips.binary_search(ip).is_err()) {
                    index_addr(&mut addrs, &mut ents, reverse, *ip, fqdn);
                }
            }
            match new {
                Some(svc) => services.insert(Arc::from(key), Arc::new(svc)),
                None => services.remove(&key[..]),
            };
        }
        Snapshot::finish(index, self.zone.clone(), services, unnamable_services, Some((addrs, ents)))
    }

    fn finish(
        index: u64,
        zone: Arc<ZoneConfig>,
        services: HashMap<Arc<[u8]>, Arc<Service>>,
        unnamable_services: usize,
        addrs: Option<(Addrs, ReverseEnts)>,
    ) -> Snapshot {
        let (addrs, reverse_ents) = addrs.unwrap_or_else(|| {
            let mut addrs: HashMap<IpAddr, Vec<Name>> = HashMap::new();
            for svc in services.values() {
                for ip in &svc.ips {
                    addrs.entry(*ip).or_default().push(svc.fqdn.clone());
                }
            }
            for names in addrs.values_mut() {
                names.sort();
            }
            let mut ents = ReverseEnts::new();
            if !zone.reverse_zones.is_empty() {
                for ip in addrs.keys() {
                    for net in reverse_parents(*ip) {
                        *ents.entry(net).or_insert(0) += 1;
                    }
                }
            }
            (addrs.into_iter().collect(), ents)
        });
        let mut stats = Stats { services: services.len(), unnamable: unnamable_services, ..Stats::default() };
        for svc in services.values() {
            stats.instances += svc.registered;
            stats.usable += svc.insts.len();
            stats.unnamable += svc.unnamable_tags;
        }
        stats.instances += unnamable_services;
        let (soa, ns, ns_glue) = apex_records(&zone, index);
        let wire = ZoneWire::new(&zone.zone, &zone.ns_name, &soa);
        Snapshot {
            index,
            synced: true,
            built: Instant::now(),
            built_wall: SystemTime::now(),
            stats,
            services,
            unnamable_services,
            addrs,
            reverse_ents,
            soa,
            ns,
            ns_glue,
            wire,
            zone,
        }
    }

    /// Whether the zone has `addr.ZONE` names (any instance with an IP).
    pub(crate) fn has_addrs(&self) -> bool {
        !self.addrs.is_empty()
    }
}

impl Service {
    /// The service `key` (its label) from its instances; `None` when `NAME.ZONE` would be too
    /// long a name.
    fn build(key: &[u8], mut list: Vec<Instance>, zone: &ZoneConfig) -> Option<Service> {
        let fqdn = Name::from_labels([key]).and_then(|n| n.append_domain(&zone.zone)).ok()?;
        sort_instances(&mut list);
        let usable_health = |h: Health| h == Health::Passing || (h == Health::Warning && !zone.only_passing);
        let registered = list.len();
        let mut ips: Vec<IpAddr> = list.iter().filter_map(|i| if let Host::Ip(ip) = i.host { Some(ip) } else { None }).collect();
        ips.sort_unstable();
        ips.dedup();
        let mut insts = Vec::new();
        let mut tag_members: HashMap<Box<[u8]>, Vec<u32>> = HashMap::new();
        let mut unnamable_tags = 0;
        for inst in list {
            let usable = !inst.down && usable_health(inst.health);
            let idx = insts.len() as u32;
            for tag in &inst.tags {
                let Some(t) = dns_label(tag) else {
                    unnamable_tags += 1;
                    continue;
                };
                let members = tag_members.entry(t).or_default();
                if usable && members.last() != Some(&idx) {
                    members.push(idx);
                }
            }
            if !usable {
                continue;
            }
            let mut label = [0u8; LABEL_MAX];
            let (ip, target) = match &inst.host {
                Host::Ip(ip) => {
                    let target = addr_name(*ip, &zone.zone);
                    let l = ip_label(*ip);
                    // `LABEL.addr.ZONE` (a zone too long for it gets the zone itself).
                    if target.num_labels() == zone.zone.num_labels() + 2
                        && target.iter().next() == Some(l.as_bytes())
                        && l.len() < LABEL_MAX
                    {
                        label[0] = l.len() as u8;
                        label[1..=l.len()].copy_from_slice(l.as_bytes());
                    }
                    (Some(*ip), target)
                }
                Host::Name(h) => {
                    let mut n = Name::from_ascii(h).unwrap_or_else(|_| zone.zone.clone());
                    n.set_fqdn(true);
                    (None, n)
                }
            };
            let priority = if inst.backup { PRIORITY_BACKUP } else { PRIORITY_PRIMARY };
            let weight = inst.weight.min(u32::from(u16::MAX)) as u16;
            let mut srv_rdata = [0u8; 6];
            srv_rdata[..2].copy_from_slice(&priority.to_be_bytes());
            srv_rdata[2..4].copy_from_slice(&weight.to_be_bytes());
            srv_rdata[4..].copy_from_slice(&inst.port.to_be_bytes());
            let mut glue = [0u8; 26];
            let glue_len = match ip {
                Some(IpAddr::V4(a)) => {
                    glue[..14].copy_from_slice(&[&record_head(TYPE_A, zone.ttl, 4)[2..], &a.octets()[..]].concat());
                    14
                }
                Some(IpAddr::V6(a)) => {
                    glue.copy_from_slice(&[&record_head(TYPE_AAAA, zone.ttl, 16)[2..], &a.octets()[..]].concat());
                    26
                }
                None => 0,
            };
            insts.push(Inst {
                id: inst.id,
                node: inst.node,
                host: inst.host,
                ip,
                target,
                port: inst.port,
                priority,
                weight,
                meta: inst.meta,
                srv_rdata,
                label,
                glue,
                glue_len,
            });
        }
        let all = View::build(&insts, 0..insts.len() as u32, zone.ttl);
        let tags = tag_members.into_iter().map(|(t, members)| (t, View::build(&insts, members, zone.ttl))).collect();
        Some(Service { fqdn, insts, all, tags, ips, registered, unnamable_tags })
    }
}

impl View {
    fn build(insts: &[Inst], members: impl IntoIterator<Item = u32>, ttl: u32) -> View {
        let srv: Vec<u32> = members.into_iter().collect();
        let any_primary = srv.iter().any(|&i| insts[i as usize].priority == PRIORITY_PRIMARY);
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for &i in &srv {
            let inst = &insts[i as usize];
            if any_primary && inst.priority != PRIORITY_PRIMARY {
                continue;
            }
            match inst.ip {
                Some(IpAddr::V4(a)) => v4.push(a),
                Some(IpAddr::V6(a)) => v6.push(a),
                None => {}
            }
        }
        v4.sort_unstable();
        v4.dedup();
        v6.sort_unstable();
        v6.dedup();
        let mut by_ip: Vec<(IpAddr, u32)> = srv.iter().filter_map(|&i| insts[i as usize].ip.map(|ip| (ip, i))).collect();
        by_ip.sort_unstable();
        by_ip.dedup_by_key(|(ip, _)| *ip);
        let srv_wire = srv.iter().all(|&i| insts[i as usize].label[0] != 0) && by_ip.len() <= usize::from(u16::MAX);
        let srv_glue = if srv_wire {
            srv.iter()
                .map(|&i| {
                    by_ip
                        .binary_search_by(|(ip, _)| ip.cmp(&insts[i as usize].ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))))
                        .unwrap_or(0) as u16
                })
                .collect()
        } else {
            Box::default()
        };
        let glue = by_ip.into_iter().map(|(_, i)| i).collect();
        let wire_a = v4.iter().flat_map(|a| [&record_head(TYPE_A, ttl, 4)[..], &a.octets()[..]].concat()).collect();
        let wire_aaaa = v6.iter().flat_map(|a| [&record_head(TYPE_AAAA, ttl, 16)[..], &a.octets()[..]].concat()).collect();
        View { v4, v6, srv, glue, wire_a, wire_aaaa, srv_glue, srv_wire }
    }
}

/// Every partial reverse name above the known addresses (`0.127.in-addr.arpa.` above
/// 127.0.0.5), so they answer NODATA: an NXDOMAIN there would hide the names below
/// (RFC 8020).
/// The partial reverse names above `ip` (one per label: octets for IPv4, nibbles for IPv6).
fn reverse_parents(ip: IpAddr) -> impl Iterator<Item = IpNet> {
    let (max, step) = match ip {
        IpAddr::V4(_) => (32u8, 8u8),
        IpAddr::V6(_) => (128, 4),
    };
    (1..max / step).filter_map(move |i| IpNet::new(ip, i * step).ok().map(|n| n.trunc()))
}

/// Records that service `fqdn` has an instance at `ip`.
fn index_addr(addrs: &mut Addrs, ents: &mut ReverseEnts, reverse: bool, ip: IpAddr, fqdn: &Name) {
    let names = addrs.entry(ip).or_default();
    if names.is_empty() && reverse {
        for net in reverse_parents(ip) {
            *ents.entry(net).or_insert(0) += 1;
        }
    }
    if let Err(pos) = names.binary_search(fqdn) {
        names.insert(pos, fqdn.clone());
    }
}

/// Records that service `fqdn` no longer has an instance at `ip`.
fn unindex(addrs: &mut Addrs, ents: &mut ReverseEnts, reverse: bool, ip: IpAddr, fqdn: &Name) {
    let Some(names) = addrs.get_mut(&ip) else { return };
    names.retain(|n| n != fqdn);
    if !names.is_empty() {
        return;
    }
    addrs.remove(&ip);
    if reverse {
        for net in reverse_parents(ip) {
            if let Some(n) = ents.get_mut(&net) {
                *n -= 1;
                if *n == 0 {
                    ents.remove(&net);
                }
            }
        }
    }
}

fn apex_records(zone: &ZoneConfig, index: u64) -> (Record, Record, Vec<Record>) {
    // The SOA serial is 32 bits; Consul's index is 64. Serial arithmetic (RFC 1982) only
    // matters for zone transfers, which this server does not offer.
    let serial = (index & 0xffff_ffff) as u32;
    let soa = Record::from_rdata(
        zone.zone.clone(),
        zone.negative_ttl,
        RData::SOA(SOA::new(zone.ns_name.clone(), zone.hostmaster.clone(), serial, 3600, 600, 86400, zone.negative_ttl)),
    );
    let ns = Record::from_rdata(zone.zone.clone(), zone.ttl, RData::NS(NS(zone.ns_name.clone())));
    let glue = if zone.zone.zone_of(&zone.ns_name) {
        zone.ns_addrs
            .iter()
            .map(|ip| {
                let rdata = match ip {
                    IpAddr::V4(a) => RData::A(A(*a)),
                    IpAddr::V6(a) => RData::AAAA(AAAA(*a)),
                };
                Record::from_rdata(zone.ns_name.clone(), zone.ttl, rdata)
            })
            .collect()
    } else {
        Vec::new()
    };
    (soa, ns, glue)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::names::parse_zone;

    pub fn inst(service: &str, id: &str, ip: &str, port: u16) -> Instance {
        Instance {
            service: service.into(),
            id: id.into(),
            node: "node1".into(),
            host: match ip.parse() {
                Ok(ip) => Host::Ip(ip),
                Err(_) => Host::Name(ip.into()),
            },
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            weight: 1,
            backup: false,
            down: false,
            health: Health::Passing,
        }
    }

    pub fn zone() -> Arc<ZoneConfig> {
        let mut z = ZoneConfig::new(parse_zone("service.upsync.").unwrap());
        z.ns_addrs = vec!["127.0.0.53".parse().unwrap()];
        Arc::new(z)
    }

    #[test]
    fn unusable_instances_are_left_out_but_keep_their_tags_known() {
        let mut bad = inst("web", "w2", "10.0.0.2", 80);
        bad.health = Health::Critical;
        bad.tags = vec!["canary".into()];
        let mut down = inst("web", "w3", "10.0.0.3", 80);
        down.down = true;
        let mut warn = inst("web", "w4", "10.0.0.4", 80);
        warn.health = Health::Warning;
        let s = Snapshot::build(7, zone(), vec![inst("web", "w1", "10.0.0.1", 80), bad, down, warn]);
        let web = &s.services[&b"web"[..]];
        assert_eq!(web.all.v4, vec!["10.0.0.1".parse::<Ipv4Addr>().unwrap()]);
        assert!(web.tags[&b"canary"[..]].srv.is_empty());
        assert_eq!(s.stats, Stats { services: 1, instances: 4, usable: 1, unnamable: 0 });
        // Every registered address has its PTR, healthy or not.
        assert_eq!(s.addrs.len(), 4);
    }

    #[test]
    fn warning_instances_are_served_when_only_passing_is_off() {
        let mut z = (*zone()).clone();
        z.only_passing = false;
        let mut warn = inst("web", "w4", "10.0.0.4", 80);
        warn.health = Health::Warning;
        let s = Snapshot::build(1, Arc::new(z), vec![warn]);
        assert_eq!(s.stats.usable, 1);
    }

    #[test]
    fn backups_are_served_by_a_only_without_usable_primaries() {
        let mut b = inst("web", "b", "10.0.0.9", 80);
        b.backup = true;
        let s = Snapshot::build(1, zone(), vec![inst("web", "p", "10.0.0.1", 80), b.clone()]);
        let web = &s.services[&b"web"[..]];
        assert_eq!(web.all.v4.len(), 1);
        assert_eq!(web.all.srv.len(), 2);
        let s = Snapshot::build(1, zone(), vec![b]);
        assert_eq!(s.services[&b"web"[..]].all.v4, vec!["10.0.0.9".parse::<Ipv4Addr>().unwrap()]);
    }

    #[test]
    fn names_that_cannot_be_labels_are_counted_not_served() {
        let mut t = inst("web", "w1", "10.0.0.1", 80);
        t.tags = vec!["a.b".into(), "x".repeat(64)];
        let s = Snapshot::build(1, zone(), vec![inst("my.service", "x", "10.0.0.1", 80), t]);
        assert_eq!(s.stats.unnamable, 3);
        assert_eq!(s.services.len(), 1);
    }

    /// The address index updated service by service equals the one a full build makes, through
    /// instances coming, going, moving and sharing addresses.
    #[test]
    fn address_index_updates_match_full_builds() {
        let mut z = ZoneConfig::new(parse_zone("service.upsync.").unwrap());
        z.reverse_zones = vec![ReverseZone { name: Name::from_ascii("10.in-addr.arpa.").unwrap(), net: "10.0.0.0/8".parse().unwrap() }];
        let z = Arc::new(z);
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut state: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        let mut snap = Snapshot::build(1, z.clone(), Vec::new());
        for step in 0..300 {
            let svc = format!("s{}", rnd(8));
            let list: Vec<Instance> =
                (0..rnd(4)).map(|i| inst(&svc, &format!("{svc}-{i}"), &format!("10.0.{}.{}", rnd(3), rnd(6)), 80)).collect();
            state.insert(svc.clone(), list.clone());
            snap = snap.with_services(step + 2, vec![(svc, list)]);
            let full = Snapshot::build(step + 2, z.clone(), state.values().flatten().cloned().collect());
            assert_eq!(snap.addrs, full.addrs, "step {step}");
            assert_eq!(snap.reverse_ents, full.reverse_ents, "step {step}");
        }
        assert!(!snap.reverse_ents.is_empty());
    }

    #[test]
    fn with_services_rebuilds_only_what_changed() {
        let s = Snapshot::build(1, zone(), vec![inst("web", "w1", "10.0.0.1", 80), inst("api", "a1", "10.0.0.2", 80)]);
        let mut sick = inst("web", "w1", "10.0.0.1", 80);
        sick.health = Health::Critical;
        let s2 = s.with_services(2, vec![("web".into(), vec![sick])]);
        assert_eq!((s2.index, s2.stats.usable, s2.stats.instances), (2, 1, 2));
        assert!(Arc::ptr_eq(&s.services[&b"api"[..]], &s2.services[&b"api"[..]]), "api is shared");
        assert!(s.addrs.ptr_eq(&s2.addrs), "same addresses: the PTR map is shared");
        let s3 = s2.with_services(3, vec![("web".into(), vec![inst("web", "w2", "10.0.0.3", 80)]), ("api".into(), vec![])]);
        assert_eq!(s3.stats, Stats { services: 1, instances: 1, usable: 1, unnamable: 0 });
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(s3.addrs.contains_key(&ip("10.0.0.3")) && !s3.addrs.contains_key(&ip("10.0.0.2")));
        let s4 = s3.with_services(4, vec![("new".into(), vec![inst("new", "n1", "10.0.0.9", 80)])]);
        assert_eq!(s4.stats.services, 2);
    }

    #[test]
    fn same_address_twice_gives_one_a_record() {
        let s = Snapshot::build(1, zone(), vec![inst("web", "a", "10.0.0.1", 80), inst("web", "b", "10.0.0.1", 81)]);
        let web = &s.services[&b"web"[..]];
        assert_eq!(web.all.v4.len(), 1);
        assert_eq!(web.all.srv.len(), 2);
    }
}
