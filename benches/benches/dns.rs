//! upsync-dns's in-memory parts (`upsync-dns` crate): building a snapshot of 100,000 instances
//! (what a full catalog read costs after decoding), rebuilding one service in it (what a
//! health change costs), and answering A / SRV questions from it, next to hickory's own
//! encoding of the same answer as the peer.
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use upsync_dns::answer::{Answer, Params};
use upsync_dns::names::parse_zone;
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

criterion_group!(benches, snapshot, answers);
criterion_main!(benches);
