//! The DNS request path as a pure function, for the fuzz targets (`fuzz/`) and their
//! regression cases (`tests/tests/fuzz_regressions.rs`): UDP packet bytes in, answer bytes
//! out, answered by the same [`Responder::handle_udp`] the UDP threads run, over a fixed
//! snapshot that has every kind of data the server answers for (IPv4, IPv6 and host-name
//! instances, tags, backups, down and failing instances, a service too large for UDP, a name
//! that cannot be a label, reverse zones).
//!
//! [`check_packet`] also checks what every answer must satisfy whatever the query: it parses
//! as a DNS message, carries the query's id, and fits the UDP size the server allows.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use clap::Parser;
use hickory_proto::op::Message;

use crate::config::{Cli, Config};
use crate::metrics::Metrics;
use crate::names::parse_zone;
use crate::server::{Responder, Scratch, Shared, UdpStep};
use crate::snapshot::{Health, Host, Instance, ReverseZone, Snapshot};

/// A responder over the fixed snapshot, with the server's default configuration.
pub struct Fixture {
    responder: Responder,
    scratch: Scratch,
    /// The largest UDP answer the configuration allows.
    max_udp_payload: usize,
}

/// What the server does with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// These bytes go back to the client.
    Send(&'a [u8]),
    /// Forwarded to an upstream resolver (never with this fixture: it has none).
    Forward,
    /// Nothing is sent (not a query, or unparseable).
    Drop,
}

/// The client address every packet comes from: outside the networks allowed recursion.
const CLIENT: &str = "192.0.2.1:5353";

impl Fixture {
    pub fn new() -> Fixture {
        // Rate limiting off (`--rrl-rate 0`): every packet is answered the same way whatever came
        // before it, so a crash reproduces from its input alone.
        let cli = Cli::try_parse_from(["upsync-dns", "--listen", "127.0.0.1:53", "--consul", "127.0.0.1:8500", "--rrl-rate", "0"])
            .expect("the fuzz fixture's command line parses");
        let mut cfg = Config::load(&cli, None).expect("the fuzz fixture's configuration is valid");
        for (zone, net) in [("10.in-addr.arpa.", "10.0.0.0/8"), ("d.f.ip6.arpa.", "fd00::/8")] {
            cfg.zone
                .reverse_zones
                .push(ReverseZone { name: parse_zone(zone).expect("a valid reverse zone"), net: net.parse().expect("a valid network") });
        }
        let snapshot = Snapshot::build(42, Arc::new(cfg.zone.clone()), instances());
        let shared = Arc::new(Shared { snapshot: ArcSwap::from_pointee(snapshot), metrics: Metrics::new() });
        Fixture {
            responder: Responder::new(shared, None, &cfg.server),
            scratch: Scratch::default(),
            max_udp_payload: usize::from(cfg.server.max_udp_payload),
        }
    }

    /// Answers one UDP packet.
    pub fn answer(&mut self, packet: &[u8]) -> Reply<'_> {
        let src: SocketAddr = CLIENT.parse().expect("a valid address");
        match self.responder.handle_udp(packet, src, &mut self.scratch) {
            UdpStep::Send { .. } | UdpStep::Slip => Reply::Send(&self.scratch.out),
            UdpStep::Forward(_) => Reply::Forward,
            UdpStep::Drop(_) => Reply::Drop,
        }
    }
}

impl Default for Fixture {
    fn default() -> Fixture {
        Fixture::new()
    }
}

thread_local! {
    static FIXTURE: RefCell<Fixture> = RefCell::new(Fixture::new());
}

/// Answers `packet` and panics if the answer breaks a rule every answer keeps: it parses as a
/// DNS response, has the query's id, fits in 512 bytes or the configured `max_udp_payload`,
/// and nothing is forwarded for a client outside the networks allowed recursion.
pub fn check_packet(packet: &[u8]) {
    FIXTURE.with_borrow_mut(|f| {
        let limit = f.max_udp_payload.max(512);
        match f.answer(packet) {
            Reply::Drop => {}
            Reply::Forward => panic!("forwarded a query from {CLIENT}, which may not recurse"),
            Reply::Send(out) => {
                assert!(out.len() <= limit, "a UDP answer of {} bytes, above the limit of {limit}", out.len());
                let m = Message::from_vec(out).unwrap_or_else(|e| panic!("the answer does not parse ({e}): {out:02x?}"));
                assert_eq!(&out[..2], &packet[..2], "the answer's id differs from the query's");
                assert!(m.metadata.message_type == hickory_proto::op::MessageType::Response, "the answer is not a response");
            }
        }
    })
}

fn instances() -> Vec<Instance> {
    let inst = |service: &str, id: &str, host: &str, port: u16| Instance {
        service: service.into(),
        id: id.into(),
        node: format!("node-{}", id.len() % 3),
        host: match host.parse() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(host.into()),
        },
        port,
        tags: Vec::new(),
        meta: BTreeMap::new(),
        weight: 1,
        backup: false,
        down: false,
        health: Health::Passing,
    };
    let mut v = vec![
        inst("web", "web-1", "10.0.0.1", 80),
        inst("web", "web-2", "10.0.0.2", 8080),
        inst("web", "web-3", "fd00::3", 80),
        inst("v6", "v6-1", "fd00::1", 443),
        inst("db", "db-1", "db1.example.com", 5432),
        inst("Mixed_Case", "m-1", "10.0.1.1", 9000),
        inst("a.b", "unnamable", "10.0.9.9", 1),
    ];
    let mut backup = inst("web", "web-b", "10.0.0.9", 80);
    backup.backup = true;
    backup.tags = vec!["backup".into()];
    let mut down = inst("web", "web-d", "10.0.0.10", 80);
    down.down = true;
    let mut critical = inst("web", "web-c", "10.0.0.11", 80);
    critical.health = Health::Critical;
    critical.tags = vec!["canary".into()];
    let mut warning = inst("db", "db-w", "10.0.2.2", 5432);
    warning.health = Health::Warning;
    v[0].tags = vec!["primary".into(), "v1".into(), "weight=3".into()];
    v[0].weight = 3;
    v[0].meta = BTreeMap::from([("team".into(), "core".into()), ("long".into(), "x".repeat(300))]);
    v[1].tags = vec!["v1".into(), "Not.A.Label".into()];
    v.extend([backup, down, critical, warning]);
    // More than any UDP answer holds: truncation and TC.
    v.extend((0..200u32).map(|i| inst("big", &format!("big-{i}"), &format!("10.1.{}.{}", i / 250, i % 250 + 1), 8000)));
    v
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    use super::*;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    #[test]
    fn the_fixture_answers_from_its_snapshot() {
        let mut f = Fixture::new();
        let Reply::Send(out) = f.answer(&query("web.service.upsync.", RecordType::A)) else { panic!("no answer") };
        let m = Message::from_vec(out).unwrap();
        assert!(m.metadata.authoritative);
        assert_eq!(m.answers.len(), 2, "{m:?}");
        for q in [("big.service.upsync.", RecordType::SRV), ("1.0.0.10.in-addr.arpa.", RecordType::PTR), ("x.example.", RecordType::A)] {
            check_packet(&query(q.0, q.1));
        }
        assert_eq!(f.answer(&[0; 3]), Reply::Drop);
    }
}
