//! Decoding Consul responses and diffing endpoint sets (`upsync-discovery`).
//!
//! Each decoder is measured next to a peer on the same bytes in the same run:
//! `serde_json::from_slice::<serde_json::Value>`, the generic parse any JSON reader pays before
//! it can look at a single field. The ratio (decoder / peer) is what README.md reports.
//! Bodies are synthetic but shaped exactly like Consul 1.8.7's (the health entry is the one
//! captured in discovery/testdata/health_web.json).
use std::hint::black_box;

use base64::Engine as _;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::collections::HashMap;

use upsync_discovery::{decode_health_service, decode_kv, decode_services, Endpoint, EndpointSet, HealthMode, Host};

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

/// `GET /v1/kv/upstreams/app/?recurse` with `n` servers, as Consul formats it.
fn kv_body(n: usize) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let entries: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let value = format!(r#"{{"weight":{},"max_fails":2,"fail_timeout":10,"down":0,"backup":0}}"#, 1 + i % 10);
            serde_json::json!({ "LockIndex": 0, "Key": format!("upstreams/app/{}:8080", ip(i)), "Flags": 0,
                                "Value": b64.encode(value), "CreateIndex": 100 + i, "ModifyIndex": 100 + i })
        })
        .collect();
    serde_json::to_vec_pretty(&entries).unwrap()
}

/// `GET /v1/health/service/web` with `n` instances, from the captured entry.
fn health_body(n: usize) -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../discovery/testdata/health_web.json");
    let captured: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let template = &captured[0];
    let entries: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let mut e = template.clone();
            e["Node"]["Node"] = format!("node-{}", i / 10).into();
            e["Node"]["Address"] = ip(i / 10).into();
            e["Service"]["ID"] = format!("web-{i}").into();
            e["Service"]["Address"] = ip(i).into();
            e["Service"]["Port"] = (8000 + i % 1000).into();
            e
        })
        .collect();
    serde_json::to_vec_pretty(&entries).unwrap()
}

/// `GET /v1/catalog/services` with `n` services.
fn services_body(n: usize) -> Vec<u8> {
    let m: serde_json::Map<String, serde_json::Value> =
        (0..n).map(|i| (format!("service-{i}"), serde_json::json!(["v1", format!("weight={}", i % 5)]))).collect();
    serde_json::to_vec_pretty(&m).unwrap()
}

fn peer(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

fn decoders(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_kv");
    for n in [100, 10_000] {
        let body = kv_body(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("decode_kv", n), &body, |b, body| {
            b.iter(|| decode_kv("upstreams/app/", black_box(body)).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("peer_serde_json_value", n), &body, |b, body| b.iter(|| peer(black_box(body))));
    }
    g.finish();

    let mut g = c.benchmark_group("decode_health_service");
    for n in [100, 10_000] {
        let body = health_body(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("decode_health_service", n), &body, |b, body| {
            b.iter(|| decode_health_service(black_box(body), HealthMode::MarkDown).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("peer_serde_json_value", n), &body, |b, body| b.iter(|| peer(black_box(body))));
    }
    g.finish();

    let mut g = c.benchmark_group("decode_services");
    let n = 10_000;
    let body = services_body(n);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_with_input(BenchmarkId::new("decode_services", n), &body, |b, body| b.iter(|| decode_services(black_box(body)).unwrap()));
    g.bench_with_input(BenchmarkId::new("peer_serde_json_value", n), &body, |b, body| b.iter(|| peer(black_box(body))));
    g.finish();
}

fn diff(c: &mut Criterion) {
    let mut g = c.benchmark_group("diff");
    for n in [100, 10_000] {
        let old = decode_kv("upstreams/app/", &kv_body(n)).unwrap().value;
        // 1% changed (weight), 1% removed, 1% added.
        let mut v: Vec<_> = old.iter().cloned().collect();
        let step = 100.min(n);
        for (k, e) in v.iter_mut().enumerate().filter(|(k, _)| k % step == 0) {
            e.weight += 1 + (k % 3) as u32;
        }
        v.retain(|e| e.port != 8081);
        let extra = decode_kv("upstreams/app/", &kv_body(n + n / 100)).unwrap().value;
        v.extend(extra.iter().skip(n).cloned());
        let new = EndpointSet::from_vec(v);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("diff", n), &(old.clone(), new.clone()), |b, (o, nw)| {
            b.iter(|| black_box(o).diff(black_box(nw)))
        });
        // Peer: the hash-map diff a caller writes when the sets are not sorted.
        g.bench_with_input(BenchmarkId::new("peer_hashmap_diff", n), &(old, new), |b, (o, nw)| {
            b.iter(|| hashmap_diff(black_box(o), black_box(nw)))
        });
    }
    g.finish();
}

/// (added, removed, changed) by `host:port` through a HashMap.
fn hashmap_diff<'a>(
    old: &'a EndpointSet,
    new: &'a EndpointSet,
) -> (Vec<&'a Endpoint>, Vec<&'a Endpoint>, Vec<(&'a Endpoint, &'a Endpoint)>) {
    let before: HashMap<(&Host, u16), &Endpoint> = old.iter().map(|e| ((&e.host, e.port), e)).collect();
    let after: HashMap<(&Host, u16), &Endpoint> = new.iter().map(|e| ((&e.host, e.port), e)).collect();
    let added = new.iter().filter(|e| !before.contains_key(&(&e.host, e.port))).collect();
    let removed = old.iter().filter(|e| !after.contains_key(&(&e.host, e.port))).collect();
    let changed = old.iter().filter_map(|e| after.get(&(&e.host, e.port)).filter(|n| **n != e).map(|n| (e, *n))).collect();
    (added, removed, changed)
}

criterion_group!(benches, decoders, diff);
criterion_main!(benches);
