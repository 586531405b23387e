//! upsync-dns's in-memory parts (`upsync-dns` crate): building a snapshot of 100,000 instances
//! (what a full catalog read costs after decoding), rebuilding one service in it (what a
//! health change costs), and answering A / SRV questions from it, next to hickory's own
//! encoding of the same answer as the peer; then whole packets, query to answer, from the
//! precompiled wire forms and through the encoding path.
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use upsync_dns::answer::{Answer, Params};
use upsync_dns::config::ServerConfig;
use upsync_dns::names::parse_zone;
use upsync_dns::rrl::RrlConfig;
use upsync_dns::server::{Responder, Scratch, Shared, UdpStep};
use upsync_dns::snapshot::{Health, Host, Instance, Snapshot, ZoneConfig};

const SERVICES: usize = 10_000;
const PER: usize = 10;

fn instance(s: usize, k: usize) -> Instance {
    let i = s * PER + k;
    Instance {
        service: format!("svc{s}"),
        id: format!("svc{s}-{k}"),
        node: format!("node{}", i % 1000),
        host: Host::Ip(format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256).parse().unwrap()),
        port: 10000 + k as u16,
        tags: vec!["v1".into(), format!("weight={}", 1 + k % 3)],
        meta: BTreeMap::from([("version".to_string(), "1.2.3".to_string())]),
        weight: 1 + (k % 3) as u32,
        backup: k == PER - 1,
        down: false,
        health: Health::Passing,
    }
}

fn all() -> Vec<Instance> {
    (0..SERVICES).flat_map(|s| (0..PER).map(move |k| instance(s, k))).collect()
}

fn zone() -> Arc<ZoneConfig> {
    Arc::new(ZoneConfig::new(parse_zone("service.upsync.").unwrap()))
}

fn snapshot(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(10);
    g.throughput(Throughput::Elements((SERVICES * PER) as u64));
    g.bench_function("build 100k instances", |b| {
        b.iter_batched(all, |v| black_box(Snapshot::build(1, zone(), v)), criterion::BatchSize::LargeInput)
    });
    let snap = Snapshot::build(1, zone(), all());
    g.throughput(Throughput::Elements(1));
    g.bench_function("rebuild one service of 100k instances", |b| {
        b.iter(|| {
            let mut list: Vec<Instance> = (0..PER).map(|k| instance(42, k)).collect();
            list[0].health = Health::Critical;
            black_box(snap.with_services(2, vec![("svc42".to_string(), list)]))
        })
    });
    g.finish();
}

fn answers(c: &mut Criterion) {
    let snap = Snapshot::build(1, zone(), all());
    let mut g = c.benchmark_group("answer");
    g.throughput(Throughput::Elements(1));
    for (label, name, t) in [("A", "svc4242.service.upsync.", RecordType::A), ("SRV", "_svc4242._tcp.service.upsync.", RecordType::SRV)] {
        let qname = Name::from_ascii(name).unwrap();
        let mut out = Answer::default();
        let mut rotation = 0;
        g.bench_function(format!("{label} from the snapshot"), |b| {
            b.iter(|| {
                rotation += 1;
                snap.answer(black_box(&qname), t, Params { rotation, limit: 0 }, &mut out);
                black_box(out.answers.len())
            })
        });
        // The peer: hickory encoding the same answer as a message (what every answer also costs).
        snap.answer(&qname, t, Params::default(), &mut out);
        let mut m = Message::response(1, hickory_proto::op::OpCode::Query);
        m.add_query(Query::query(qname.clone(), t));
        m.add_answers(out.answers.clone());
        m.add_additionals(out.additional.clone());
        g.bench_function(format!("{label} encoded by hickory"), |b| b.iter(|| black_box(m.to_vec().unwrap())));
    }
    g.finish();
}

/// A UDP query packet → the answer packet, through `Responder::handle_udp` (what a UDP thread
/// does per datagram besides the system calls): from the snapshot's precompiled wire forms,
/// and with that path off (answer built and encoded by hickory per query), the peer.
fn packets(c: &mut Criterion) {
    let cfg = ServerConfig {
        listen: vec![],
        udp_workers: 1,
        max_udp_payload: 1232,
        udp_answer_limit: 0,
        tcp_idle_timeout: std::time::Duration::from_secs(1),
        max_tcp_connections: 8,
        rrl: RrlConfig { rate: 0, ..Default::default() },
    };
    let shared = Shared::new(Snapshot::build(1, zone(), all()));
    let fast = Responder::new(shared.clone(), None, &cfg);
    let mut slow = Responder::new(shared, None, &cfg);
    slow.set_precompiled(false);
    let src: std::net::SocketAddr = "127.0.0.1:5353".parse().unwrap();
    let mut g = c.benchmark_group("packet");
    g.throughput(Throughput::Elements(1));
    for (label, name, t, edns) in [
        ("A", "svc4242.service.upsync.", RecordType::A, false),
        ("SRV", "_svc4242._tcp.service.upsync.", RecordType::SRV, false),
        ("SRV, EDNS 1232", "_svc4242._tcp.service.upsync.", RecordType::SRV, true),
    ] {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        if edns {
            let mut e = hickory_proto::op::Edns::new();
            e.set_max_payload(1232);
            m.edns = Some(e);
        }
        let raw = m.to_vec().unwrap();
        for (path, r) in [("precompiled", &fast), ("encoded", &slow)] {
            let mut scratch = Scratch::default();
            g.bench_function(format!("{label} {path}"), |b| {
                b.iter(|| match r.handle_udp(black_box(&raw), src, &mut scratch) {
                    UdpStep::Send { .. } => black_box(scratch.out.len()),
                    _ => panic!("{label}: not answered"),
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, snapshot, answers, packets);
criterion_main!(benches);
