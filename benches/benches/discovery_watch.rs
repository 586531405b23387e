//! How fast a watch learns of a KV write, against a real Consul 1.8.7 dev agent (started by the
//! test harness on free loopback ports).
//!
//! Measured: from the start of a KV PUT to the moment the waiting side has the new value.
//! - `upsync_watch`: `Watch::next` (blocking query, decode, compare) on a current-thread runtime,
//!   the write through `upsync_discovery::Client`.
//! - `peer_ureq_long_poll`: the plain long-poll any client does: a thread blocked in
//!   `GET /v1/kv/PREFIX/?recurse&index=N` with ureq, the write with ureq. No decoding.
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use upsync_discovery::{Client, ConsulConfig, Query, RateLimit, Watch, WatchEvent, WatchOptions};
use upsync_tests::consul::Consul;
use upsync_tests::TestDir;

/// Gives the waiting side time to park its blocking query before the write.
const PARK: Duration = Duration::from_millis(3);

fn watch_latency(c: &mut Criterion) {
    let dir = TestDir::new("bench_discovery_watch");
    let consul = Consul::start(dir.path());
    consul.kv_put("bench/10.0.0.1:80", r#"{"weight":1}"#);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = Client::new(ConsulConfig::from_addresses(&consul.http_addr()).unwrap()).unwrap();
    let opts = WatchOptions { rate: RateLimit { burst: 1, per_second: 0.0 }, ..WatchOptions::default() };
    let mut watch = Watch::new(client.clone(), Query::Kv { prefix: "bench".into() }, opts);
    rt.block_on(watch.next());
    let mut n = 1u64;

    let mut g = c.benchmark_group("watch_wakeup");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function("upsync_watch", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let value = format!(r#"{{"weight":{n}}}"#);
                    let write = async {
                        tokio::time::sleep(PARK).await;
                        let t = Instant::now();
                        client.kv_put("bench/10.0.0.1:80", value.as_bytes(), None).await.unwrap();
                        t
                    };
                    let seen = async {
                        let ev = watch.next().await;
                        (Instant::now(), ev)
                    };
                    let (start, (end, ev)) = tokio::join!(write, seen);
                    assert!(matches!(ev, WatchEvent::Changed { .. }), "{ev:?}");
                    total += end - start;
                }
                total
            })
        })
    });

    let url = consul.url("/v1/kv/bench/?recurse");
    let put_url = consul.url("/v1/kv/bench/10.0.0.1:80");
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
    g.bench_function("peer_ureq_long_poll", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let index = agent.get(&url).call().unwrap().header("X-Consul-Index").unwrap().parse::<u64>().unwrap();
                let poller = {
                    let (agent, url) = (agent.clone(), format!("{url}&index={index}&wait=60s"));
                    std::thread::spawn(move || {
                        let body = agent.get(&url).call().unwrap().into_string().unwrap();
                        (Instant::now(), body)
                    })
                };
                std::thread::sleep(PARK);
                let start = Instant::now();
                agent.put(&put_url).send_string(&format!(r#"{{"weight":{n}}}"#)).unwrap();
                let (end, body) = poller.join().unwrap();
                assert!(body.contains("Key"));
                total += end - start;
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, watch_latency);
criterion_main!(benches);
