//! Answers from a [`Snapshot`]: pure functions of the snapshot and the question, so every
//! DNS rule (NXDOMAIN vs NODATA, SOA in negative answers, glue, rotation) is unit-tested
//! without sockets.
//!
//! Names in the zone (`ZONE` is `service.upsync.` by default):
//! - `ZONE`: SOA, NS.
//! - `NAME.ZONE`, `TAG.NAME.ZONE`: A/AAAA of the usable instances, SRV, TXT (instance meta).
//! - `_NAME._tcp.ZONE`, `_NAME._udp.ZONE` (RFC 2782), `_NAME._TAG.ZONE` (Consul's form): SRV.
//! - `LABEL.addr.ZONE`: the address an SRV target stands for (`10-0-0-1.addr.ZONE`).
//! - `ns.ZONE` (the NS target when inside the zone): the configured name-server addresses.
//!
//! Reverse names: PTR for every registered instance address → `NAME.ZONE`.
//!
//! `ANY` is answered minimally (RFC 8482): one HINFO "RFC8482" for a service name, the SOA
//! alone at the apex, the one address of an `addr` name.
use std::net::IpAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, HINFO, PTR, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::names::{is_reverse, parse_ip_label, parse_reverse, ADDR_LABEL};
use crate::snapshot::{Host, Inst, Service, Snapshot, View};

/// The sections of an answer. Reused between queries to avoid allocations.
#[derive(Debug, Default)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    pub additional: Vec<Record>,
}

impl Answer {
    pub fn clear(&mut self) {
        self.rcode = ResponseCode::NoError;
        self.answers.clear();
        self.authority.clear();
        self.additional.clear();
    }

    /// NOERROR with no answer (the name exists, not with this type) or NXDOMAIN, with `soa`
    /// in the authority section for negative caching (RFC 2308).
    fn negative(&mut self, rcode: ResponseCode, soa: Record) {
        self.rcode = rcode;
        self.answers.clear();
        self.additional.clear();
        self.authority.push(soa);
    }
}

/// Whether the snapshot answered the question, or it is outside the zones we serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `Answer` holds an authoritative answer.
    Authoritative,
    /// Not ours: forward it, or refuse it.
    NotOurs,
}

/// How a question is answered beyond the snapshot's data.
#[derive(Clone, Copy, Debug, Default)]
pub struct Params {
    /// Rotation offset (a per-thread counter): answers start at `rotation % len`.
    pub rotation: usize,
    /// At most this many A/AAAA/SRV/TXT records (0: no limit). Only for UDP when configured.
    pub limit: usize,
}

impl Snapshot {
    /// Answers `qtype` for `qname` (lower case, absolute) into `out` (cleared first).
    pub fn answer(&self, qname: &Name, qtype: RecordType, params: Params, out: &mut Answer) -> Outcome {
        out.clear();
        let zone = &self.zone.zone;
        if zone.zone_of(qname) {
            self.answer_in_zone(qname, qtype, params, out);
            return Outcome::Authoritative;
        }
        if is_reverse(qname) {
            return self.answer_reverse(qname, qtype, out);
        }
        Outcome::NotOurs
    }

    fn answer_in_zone(&self, qname: &Name, qtype: RecordType, params: Params, out: &mut Answer) {
        let rel = (qname.num_labels() - self.zone.zone.num_labels()) as usize;
        let mut labels = qname.iter();
        let nodata = |out: &mut Answer| out.negative(ResponseCode::NoError, self.soa.clone());
        let nxdomain = |out: &mut Answer| out.negative(ResponseCode::NXDomain, self.soa.clone());
        match rel {
            0 => match qtype {
                RecordType::SOA => out.answers.push(self.soa.clone()),
                RecordType::NS => {
                    out.answers.push(self.ns.clone());
                    out.additional.extend(self.ns_glue.iter().cloned());
                }
                // RFC 8482: one RRset for ANY.
                RecordType::ANY => out.answers.push(self.soa.clone()),
                _ => nodata(out),
            },
            1 => {
                let label = labels.next().unwrap_or_default();
                if *qname == self.zone.ns_name {
                    self.answer_ns_addrs(qtype, out);
                } else if let Some(svc) = self.services.get(label) {
                    svc.answer(&svc.all, qname, qtype, params, self, out);
                } else if (label == ADDR_LABEL && self.has_addrs()) || (label.starts_with(b"_") && !self.services.is_empty()) {
                    // Empty non-terminals above `X.addr.ZONE` and `_NAME._tcp.ZONE`.
                    nodata(out);
                } else {
                    nxdomain(out);
                }
            }
            2 => {
                let (a, b) = (labels.next().unwrap_or_default(), labels.next().unwrap_or_default());
                if b == ADDR_LABEL {
                    if let Some(ip) = parse_ip_label(a).filter(|ip| self.addrs.contains_key(ip)) {
                        return self.answer_addr(qname, ip, qtype, out);
                    }
                }
                let (service, sub) = match (a.strip_prefix(b"_"), b.strip_prefix(b"_")) {
                    // RFC 2782 `_NAME._PROTO`, or Consul's `_NAME._TAG`.
                    (Some(name), Some(proto)) => (name, (proto != b"tcp" && proto != b"udp").then_some(proto)),
                    _ => (b, Some(a)),
                };
                let Some(svc) = self.services.get(service) else { return nxdomain(out) };
                match sub {
                    None => svc.answer(&svc.all, qname, qtype, params, self, out),
                    Some(tag) => match svc.tags.get(tag) {
                        Some(view) => svc.answer(view, qname, qtype, params, self, out),
                        None => nxdomain(out),
                    },
                }
            }
            _ => nxdomain(out),
        }
    }

    fn answer_ns_addrs(&self, qtype: RecordType, out: &mut Answer) {
        let want = |r: &&Record| qtype == RecordType::ANY || r.record_type() == qtype;
        out.answers.extend(self.ns_glue.iter().filter(want).cloned());
        if out.answers.is_empty() {
            out.negative(ResponseCode::NoError, self.soa.clone());
        }
    }

    fn answer_addr(&self, qname: &Name, ip: IpAddr, qtype: RecordType, out: &mut Answer) {
        match (ip, qtype) {
            (IpAddr::V4(a), RecordType::A | RecordType::ANY) => {
                out.answers.push(Record::from_rdata(qname.clone(), self.zone.ttl, RData::A(A(a))))
            }
            (IpAddr::V6(a), RecordType::AAAA | RecordType::ANY) => {
                out.answers.push(Record::from_rdata(qname.clone(), self.zone.ttl, RData::AAAA(AAAA(a))))
            }
            _ => out.negative(ResponseCode::NoError, self.soa.clone()),
        }
    }

    fn answer_reverse(&self, qname: &Name, qtype: RecordType, out: &mut Answer) -> Outcome {
        let known = parse_reverse(qname).and_then(|ip| self.addrs.get(&ip));
        if let (Some(names), RecordType::PTR | RecordType::ANY) = (known, qtype) {
            out.answers.extend(names.iter().map(|n| Record::from_rdata(qname.clone(), self.zone.ttl, RData::PTR(PTR(n.clone())))));
            return Outcome::Authoritative;
        }
        // Negative answers only inside a reverse zone we are configured to serve.
        let Some(rz) = self.zone.reverse_zones.iter().find(|z| z.name.zone_of(qname)) else { return Outcome::NotOurs };
        let soa = Record::from_rdata(
            rz.name.clone(),
            self.zone.negative_ttl,
            match &self.soa.data {
                RData::SOA(soa) => RData::SOA(soa.clone()),
                other => other.clone(),
            },
        );
        let exists = known.is_some() || qname.parse_arpa_name().is_ok_and(|net| self.reverse_ents.contains_key(&net)) || *qname == rz.name;
        out.negative(if exists { ResponseCode::NoError } else { ResponseCode::NXDomain }, soa);
        Outcome::Authoritative
    }
}

impl Service {
    fn answer(&self, view: &View, qname: &Name, qtype: RecordType, params: Params, snap: &Snapshot, out: &mut Answer) {
        let ttl = snap.zone.ttl;
        let rec = |rdata: RData| Record::from_rdata(qname.clone(), ttl, rdata);
        match qtype {
            RecordType::A => push_rotated(&view.v4, params, &mut out.answers, |a| rec(RData::A(A(*a)))),
            RecordType::AAAA => push_rotated(&view.v6, params, &mut out.answers, |a| rec(RData::AAAA(AAAA(*a)))),
            // RFC 8482 (4.2): ANY is answered with one synthesized HINFO record, however many
            // instances the name has: ANY cannot be used to amplify, and a resolver asking
            // ANY gets a positive answer it may cache.
            RecordType::ANY if !view.v4.is_empty() || !view.v6.is_empty() || !view.srv.is_empty() => {
                out.answers.push(rec(RData::HINFO(HINFO::new("RFC8482".into(), String::new()))))
            }
            RecordType::SRV => {
                push_rotated(&view.srv, params, &mut out.answers, |&i| {
                    let inst = &self.insts[i as usize];
                    rec(RData::SRV(SRV::new(inst.priority, inst.weight, inst.port, inst.target.clone())))
                });
                self.push_glue(view, params, out, ttl);
            }
            RecordType::TXT => push_rotated(&view.srv, params, &mut out.answers, |&i| rec(RData::TXT(txt(&self.insts[i as usize])))),
            _ => {}
        }
        if out.answers.is_empty() {
            out.negative(ResponseCode::NoError, snap.soa.clone());
        }
    }

    /// A/AAAA of the SRV targets that are addresses, once per target.
    fn push_glue(&self, view: &View, params: Params, out: &mut Answer, ttl: u32) {
        let glue = |&i: &u32| {
            let inst = &self.insts[i as usize];
            let rdata = match inst.ip {
                Some(IpAddr::V4(a)) => RData::A(A(a)),
                Some(IpAddr::V6(a)) => RData::AAAA(AAAA(a)),
                None => return None,
            };
            Some(Record::from_rdata(inst.target.clone(), ttl, rdata))
        };
        if params.limit == 0 || params.limit >= view.srv.len() {
            out.additional.extend(view.glue.iter().filter_map(glue));
            return;
        }
        // A few rotated records: the glue of those only (a short list, linear dedup).
        let start = params.rotation % view.srv.len();
        let mut chosen: Vec<u32> = Vec::with_capacity(params.limit);
        for &i in view.srv[start..].iter().chain(&view.srv[..start]).take(params.limit) {
            let ip = self.insts[i as usize].ip;
            if ip.is_some() && !chosen.iter().any(|&c| self.insts[c as usize].ip == ip) {
                chosen.push(i);
            }
        }
        out.additional.extend(chosen.iter().filter_map(glue));
    }
}

/// Appends `items` rotated by `params.rotation`, at most `params.limit` of them.
fn push_rotated<T>(items: &[T], params: Params, out: &mut Vec<Record>, mut make: impl FnMut(&T) -> Record) {
    if items.is_empty() {
        return;
    }
    let start = params.rotation % items.len();
    let n = if params.limit == 0 { items.len() } else { params.limit.min(items.len()) };
    out.extend(items[start..].iter().chain(&items[..start]).take(n).map(&mut make));
}

/// An instance's TXT record: `id=`, `node=`, `address=` then its meta as `key=value`
/// (RFC 1464 style), each string cut to the 255 bytes a TXT string can hold.
fn txt(inst: &Inst) -> TXT {
    let address = match &inst.host {
        Host::Ip(IpAddr::V6(a)) => format!("[{a}]:{}", inst.port),
        Host::Ip(IpAddr::V4(a)) => format!("{a}:{}", inst.port),
        Host::Name(h) => format!("{h}:{}", inst.port),
    };
    let mut strings = vec![format!("id={}", inst.id), format!("node={}", inst.node), format!("address={address}")];
    strings.extend(inst.meta.iter().map(|(k, v)| format!("{k}={v}")));
    for s in &mut strings {
        if s.len() > 255 {
            let mut cut = 255;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
    }
    TXT::new(strings)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::names::parse_zone;
    use crate::snapshot::tests::{inst, zone};
    use crate::snapshot::{Health, ReverseZone, ZoneConfig, PRIORITY_BACKUP, PRIORITY_PRIMARY};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn ask(s: &Snapshot, q: &str, t: RecordType) -> Answer {
        let mut a = Answer::default();
        assert_eq!(s.answer(&name(q), t, Params::default(), &mut a), Outcome::Authoritative, "{q} {t}");
        a
    }

    fn ips(a: &Answer) -> Vec<String> {
        let mut v: Vec<String> = a.answers.iter().map(|r| r.data.to_string()).collect();
        v.sort();
        v
    }

    fn is_nodata(a: &Answer) -> bool {
        a.rcode == ResponseCode::NoError
            && a.answers.is_empty()
            && matches!(a.authority[..], [ref soa] if soa.record_type() == RecordType::SOA)
    }

    fn is_nxdomain(a: &Answer) -> bool {
        a.rcode == ResponseCode::NXDomain
            && a.answers.is_empty()
            && a.authority.len() == 1
            && a.authority[0].record_type() == RecordType::SOA
    }

    fn web() -> Snapshot {
        let mut w1 = inst("web", "w1", "10.0.0.1", 8080);
        w1.tags = vec!["v1".into(), "Canary".into()];
        w1.weight = 3;
        w1.meta.insert("version".into(), "1.2".into());
        let mut w2 = inst("web", "w2", "10.0.0.2", 8081);
        w2.tags = vec!["v1".into()];
        let mut b = inst("web", "w3", "10.0.0.3", 8082);
        b.backup = true;
        let mut sick = inst("web", "w4", "10.0.0.4", 8083);
        sick.health = Health::Critical;
        sick.tags = vec!["v2".into()];
        let v6 = inst("web", "w6", "2001:db8::6", 8086);
        let pg = inst("pg", "pg1", "db.example.com", 5432);
        Snapshot::build(42, zone(), vec![w1, w2, b, sick, v6, pg])
    }

    #[test]
    fn a_and_aaaa_of_usable_primaries() {
        let s = web();
        let a = ask(&s, "web.service.upsync.", RecordType::A);
        assert_eq!(ips(&a), ["10.0.0.1", "10.0.0.2"]);
        assert!(a.answers.iter().all(|r| r.ttl == 5 && r.name == name("web.service.upsync.")));
        assert_eq!(ips(&ask(&s, "web.service.upsync.", RecordType::AAAA)), ["2001:db8::6"]);
        assert_eq!(ips(&ask(&s, "WEB.service.upsync.".to_lowercase().as_str(), RecordType::A)).len(), 2);
    }

    #[test]
    fn tags_select_instances_case_insensitively() {
        let s = web();
        assert_eq!(ips(&ask(&s, "canary.web.service.upsync.", RecordType::A)), ["10.0.0.1"]);
        assert_eq!(ips(&ask(&s, "v1.web.service.upsync.", RecordType::A)), ["10.0.0.1", "10.0.0.2"]);
        // v2 exists only on a failing instance: the name exists, it has no usable answer.
        assert!(is_nodata(&ask(&s, "v2.web.service.upsync.", RecordType::A)));
        assert!(is_nxdomain(&ask(&s, "v3.web.service.upsync.", RecordType::A)));
    }

    #[test]
    fn any_is_answered_minimally() {
        let many: Vec<_> = (0..200).map(|i| inst("big", &format!("b{i}"), &format!("10.2.0.{}", i + 1), 80)).collect();
        let s = Snapshot::build(1, zone(), many);
        let a = ask(&s, "big.service.upsync.", RecordType::ANY);
        assert_eq!(a.answers.len(), 1);
        assert!(matches!(&a.answers[0].data, RData::HINFO(h) if &*h.cpu == b"RFC8482"), "{:?}", a.answers);
        assert!(a.additional.is_empty() && a.authority.is_empty());
        let apex = ask(&s, "service.upsync.", RecordType::ANY);
        assert_eq!(apex.answers.iter().map(|r| r.record_type()).collect::<Vec<_>>(), [RecordType::SOA]);
        assert!(is_nxdomain(&ask(&s, "nope.service.upsync.", RecordType::ANY)));
    }

    #[test]
    fn srv_with_priorities_weights_and_glue() {
        let s = web();
        for q in ["web.service.upsync.", "_web._tcp.service.upsync."] {
            let a = ask(&s, q, RecordType::SRV);
            assert_eq!(a.answers.len(), 4, "{q}");
            let mut seen = Vec::new();
            for r in &a.answers {
                let RData::SRV(srv) = &r.data else { panic!("not SRV: {r}") };
                seen.push((srv.port, srv.priority, srv.weight, srv.target.to_ascii()));
            }
            seen.sort();
            assert_eq!(
                seen,
                [
                    (8080, PRIORITY_PRIMARY, 3, "10-0-0-1.addr.service.upsync.".to_string()),
                    (8081, PRIORITY_PRIMARY, 1, "10-0-0-2.addr.service.upsync.".to_string()),
                    (8082, PRIORITY_BACKUP, 1, "10-0-0-3.addr.service.upsync.".to_string()),
                    (8086, PRIORITY_PRIMARY, 1, "2001-db8--6.addr.service.upsync.".to_string()),
                ]
            );
            // Every target has its address in the additional section.
            let mut glue: Vec<String> = a.additional.iter().map(|r| format!("{} {}", r.name, r.data)).collect();
            glue.sort();
            assert_eq!(
                glue,
                [
                    "10-0-0-1.addr.service.upsync. 10.0.0.1",
                    "10-0-0-2.addr.service.upsync. 10.0.0.2",
                    "10-0-0-3.addr.service.upsync. 10.0.0.3",
                    "2001-db8--6.addr.service.upsync. 2001:db8::6"
                ]
            );
        }
        // Consul's `_NAME._TAG` form.
        assert_eq!(ask(&s, "_web._canary.service.upsync.", RecordType::SRV).answers.len(), 1);
    }

    #[test]
    fn srv_targets_resolve() {
        let s = web();
        assert_eq!(ips(&ask(&s, "10-0-0-1.addr.service.upsync.", RecordType::A)), ["10.0.0.1"]);
        assert_eq!(ips(&ask(&s, "2001-db8--6.addr.service.upsync.", RecordType::AAAA)), ["2001:db8::6"]);
        assert!(is_nodata(&ask(&s, "10-0-0-1.addr.service.upsync.", RecordType::AAAA)));
        assert!(is_nxdomain(&ask(&s, "10-9-9-9.addr.service.upsync.", RecordType::A)));
        assert!(is_nodata(&ask(&s, "addr.service.upsync.", RecordType::A)));
    }

    #[test]
    fn host_name_instances_are_srv_targets_only() {
        let s = web();
        assert!(is_nodata(&ask(&s, "pg.service.upsync.", RecordType::A)));
        let a = ask(&s, "pg.service.upsync.", RecordType::SRV);
        let RData::SRV(srv) = &a.answers[0].data else { panic!() };
        assert_eq!(srv.target.to_ascii(), "db.example.com.");
        assert!(a.additional.is_empty());
    }

    #[test]
    fn nxdomain_and_nodata_carry_the_soa() {
        let s = web();
        let nx = ask(&s, "nope.service.upsync.", RecordType::A);
        assert!(is_nxdomain(&nx));
        let RData::SOA(soa) = &nx.authority[0].data else { panic!() };
        assert_eq!((soa.serial, soa.minimum, nx.authority[0].ttl), (42, 5, 5));
        assert!(is_nodata(&ask(&s, "web.service.upsync.", RecordType::MX)));
        assert!(is_nxdomain(&ask(&s, "a.b.web.service.upsync.", RecordType::A)));
        assert!(is_nodata(&ask(&s, "_tcp.service.upsync.", RecordType::A)));
        assert!(is_nxdomain(&ask(&s, "_nope._tcp.service.upsync.", RecordType::SRV)));
    }

    #[test]
    fn apex_soa_ns_and_ns_address() {
        let s = web();
        assert_eq!(ask(&s, "service.upsync.", RecordType::SOA).answers[0].record_type(), RecordType::SOA);
        let ns = ask(&s, "service.upsync.", RecordType::NS);
        assert_eq!(ns.answers[0].data.to_string(), "ns.service.upsync.");
        assert_eq!(ips(&Answer { answers: ns.additional, ..Answer::default() }), ["127.0.0.53"]);
        assert_eq!(ips(&ask(&s, "ns.service.upsync.", RecordType::A)), ["127.0.0.53"]);
        assert!(is_nodata(&ask(&s, "service.upsync.", RecordType::A)));
    }

    #[test]
    fn txt_carries_instance_meta() {
        let s = web();
        let a = ask(&s, "canary.web.service.upsync.", RecordType::TXT);
        let RData::TXT(txt) = &a.answers[0].data else { panic!() };
        let strings: Vec<String> = txt.txt_data.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
        assert_eq!(strings, ["id=w1", "node=node1", "address=10.0.0.1:8080", "version=1.2"]);
    }

    #[test]
    fn answers_rotate() {
        let s = web();
        let mut firsts = std::collections::HashSet::new();
        for rotation in 0..4 {
            let mut a = Answer::default();
            s.answer(&name("web.service.upsync."), RecordType::A, Params { rotation, limit: 0 }, &mut a);
            assert_eq!(a.answers.len(), 2);
            firsts.insert(a.answers[0].data.to_string());
        }
        assert_eq!(firsts.len(), 2);
        let mut a = Answer::default();
        s.answer(&name("web.service.upsync."), RecordType::SRV, Params { rotation: 1, limit: 2 }, &mut a);
        assert_eq!((a.answers.len(), a.additional.len()), (2, 2));
    }

    #[test]
    fn ptr_for_registered_addresses() {
        let s = web();
        let a = ask(&s, "4.0.0.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(ips(&a), ["web.service.upsync."]);
        let mut a = Answer::default();
        assert_eq!(s.answer(&name("9.9.9.10.in-addr.arpa."), RecordType::PTR, Params::default(), &mut a), Outcome::NotOurs);
        assert_eq!(s.answer(&name("example.com."), RecordType::A, Params::default(), &mut a), Outcome::NotOurs);
    }

    #[test]
    fn reverse_zones_answer_negatively_inside() {
        let mut z = (*zone()).clone();
        z.reverse_zones = vec![ReverseZone { name: name("10.in-addr.arpa."), net: "10.0.0.0/8".parse().unwrap() }];
        let s = Snapshot::build(1, Arc::new(z), vec![inst("web", "w1", "10.0.0.1", 80)]);
        assert!(is_nxdomain(&ask(&s, "9.9.9.10.in-addr.arpa.", RecordType::PTR)));
        assert!(is_nodata(&ask(&s, "0.0.10.in-addr.arpa.", RecordType::PTR)));
        assert!(is_nodata(&ask(&s, "1.0.0.10.in-addr.arpa.", RecordType::A)));
        let nx = ask(&s, "9.9.9.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(nx.authority[0].name, name("10.in-addr.arpa."));
        let mut a = Answer::default();
        assert_eq!(s.answer(&name("1.0.0.11.in-addr.arpa."), RecordType::PTR, Params::default(), &mut a), Outcome::NotOurs);
    }

    #[test]
    fn other_zone_names() {
        let z = Arc::new(ZoneConfig::new(parse_zone("dc1.example.").unwrap()));
        let s = Snapshot::build(1, z, vec![inst("web", "w1", "10.0.0.1", 80)]);
        assert_eq!(ips(&ask(&s, "web.dc1.example.", RecordType::A)), ["10.0.0.1"]);
        let mut a = Answer::default();
        assert_eq!(s.answer(&name("web.service.upsync."), RecordType::A, Params::default(), &mut a), Outcome::NotOurs);
    }

    #[test]
    fn empty_snapshot_is_all_nxdomain() {
        let s = Snapshot::empty(zone());
        assert!(is_nxdomain(&ask(&s, "web.service.upsync.", RecordType::A)));
        assert!(is_nxdomain(&ask(&s, "_tcp.service.upsync.", RecordType::A)));
        assert_eq!(ask(&s, "service.upsync.", RecordType::SOA).answers.len(), 1);
    }
}
