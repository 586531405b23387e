//! `upsync-discovery` watches against a real Consul 1.8.7 agent: KV changes, identical writes,
//! a flood of writes, agent crash and restart, an unreachable address, health and catalog.
mod discovery_common;

use std::time::{Duration, Instant};

use discovery_common::*;
use upsync_discovery::{Backoff, Error, HealthMode, Query, RateLimit, WatchEvent, WatchOptions};
use upsync_tests::consul::Consul;
use upsync_tests::net::free_port;
use upsync_tests::TestDir;

fn kv(prefix: &str) -> Query {
    Query::Kv { prefix: prefix.to_string() }
}

#[test]
fn kv_change_is_seen_once_and_identical_writes_yield_nothing() {
    let dir = TestDir::new("discovery_kv_change");
    let consul = Consul::start(dir.path());
    consul.kv_put("upstreams/app/10.0.0.1:80", r#"{"weight":2}"#);
    let w = WatchThread::start(client(&consul.http_addr()), kv("upstreams/app"), opts());
    let (set, index) = w.next_set(LONG);
    assert_eq!(addrs(&set), ["10.0.0.1:80"]);
    assert_eq!(set.iter().next().unwrap().weight, 2);
    assert!(index > 0);

    // The watch is now parked in a blocking query: a write wakes it.
    let written = Instant::now();
    consul.kv_put("upstreams/app/10.0.0.2:80", "");
    let (seen, ev) = w.next_timed(LONG);
    let WatchEvent::Changed { value, index: i2, .. } = ev else { panic!("{ev:?}") };
    assert_eq!(addrs(value.as_endpoints().unwrap()), ["10.0.0.1:80", "10.0.0.2:80"]);
    assert!(i2 > index);
    eprintln!("KV change seen by the watch {:?} after the write returned", seen.saturating_duration_since(written));

    // Identical values and writes outside the prefix bump Consul's index but change nothing:
    // the next event must be the real change that follows them, not a repeat.
    consul.kv_put("upstreams/app/10.0.0.2:80", "");
    consul.kv_put("upstreams/app/10.0.0.1:80", r#"{"weight":2}"#);
    consul.kv_put("upstreams/other/10.0.0.9:80", "");
    consul.kv_put("upstreams/app/10.0.0.1:80", r#"{"weight":3}"#);
    let (set, _) = w.next_set(LONG);
    assert_eq!(set.iter().next().unwrap().weight, 3, "an identical write produced an event");

    // Deleting everything is a change to the empty set (keeping the last list is the
    // caller's policy, not the watch's).
    consul.kv_delete_tree("upstreams/app/");
    let (set, _) = w.next_set(LONG);
    assert!(set.is_empty());
}

#[test]
fn flood_of_writes_yields_a_bounded_number_of_sets_ending_on_the_last() {
    let dir = TestDir::new("discovery_flood");
    let consul = Consul::start(dir.path());
    consul.kv_put("flood/10.0.0.1:80", r#"{"weight":1}"#);
    let rate = RateLimit { burst: 3, per_second: 2.0 };
    let w = WatchThread::start(client(&consul.http_addr()), kv("flood"), WatchOptions { rate, ..opts() });
    w.next_set(LONG);

    let start = Instant::now();
    for i in 2..=1000 {
        consul.kv_put("flood/10.0.0.1:80", &format!(r#"{{"weight":{i}}}"#));
    }
    let (_, changes) = w.until_set(LONG, "the final weight 1000", |s| s.iter().next().is_some_and(|e| e.weight == 1000));
    let secs = start.elapsed().as_secs_f64();
    // The token bucket allows `burst` requests, then `per_second`; each request yields at most
    // one set. +2: the request in flight when the flood began and rounding.
    let bound = rate.burst as usize + (secs * rate.per_second).ceil() as usize + 2;
    eprintln!("1000 writes in {secs:.2} s gave {changes} sets (bound {bound})");
    assert!(changes <= bound, "{changes} sets for 1000 writes in {secs:.2} s; the rate limit allows {bound}");
    assert!(changes < 100);
}

#[test]
fn agent_crash_and_restart_resets_the_index_and_the_watch_recovers() {
    let dir = TestDir::new("discovery_restart");
    let mut consul = Consul::start(dir.path());
    // Push the index well above what a fresh dev agent starts with.
    for i in 0..60 {
        consul.kv_put("junk/k", &i.to_string());
    }
    consul.kv_put("svc/10.0.0.1:80", "");
    let c = client(&consul.http_addr());
    let backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_millis(500) };
    let w = WatchThread::start(c, kv("svc"), WatchOptions { backoff, ..opts() });
    let (_, old_index) = w.next_set(LONG);

    consul.kill();
    let err = w.next_error(LONG);
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains(&consul.http_addr()), "the error does not name the address: {err}");

    consul.restart(); // a dev agent comes back empty, with a small index
    consul.kv_put("svc/10.0.0.2:80", "");
    let (set, _) = w.until_set(LONG, "the restarted agent's state", |s| addrs(s) == ["10.0.0.2:80"]);
    assert_eq!(addrs(&set), ["10.0.0.2:80"]);
    let new_index = consul.kv_index("svc/");
    assert!(new_index < old_index, "the test needs the restarted agent's index ({new_index}) below the old one ({old_index})");

    // And it keeps blocking on the new, lower index: the next write is seen too.
    consul.kv_put("svc/10.0.0.3:80", "");
    let (set, _) = w.until_set(LONG, "a write after the restart", |s| s.len() == 2);
    assert_eq!(addrs(&set), ["10.0.0.2:80", "10.0.0.3:80"]);
}

#[test]
fn unreachable_address_backs_off() {
    let port = free_port(); // nothing listens there
    let backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_millis(400) };
    // No rate limit: only the backoff may slow the retries down.
    let rate = RateLimit { burst: 1, per_second: 0.0 };
    let w = WatchThread::start(client(&format!("127.0.0.1:{port}")), kv("x"), WatchOptions { backoff, rate, ..opts() });
    let window = Duration::from_secs(3);
    let events = w.collect_for(window);
    let mut attempts = Vec::new();
    for ev in &events {
        match ev {
            WatchEvent::Error { error, attempt, retry_in, .. } => {
                assert!(matches!(error, Error::Connect { .. }), "{error}");
                assert!(error.is_transient() && !error.is_acl_denied());
                assert!(error.to_string().contains(&format!("127.0.0.1:{port}")), "{error}");
                assert!(*retry_in <= backoff.max);
                attempts.push(*attempt);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Delays are drawn from [d/2, d] with d = 100, 200, 400, 400... ms: in 3 s at most
    // 1 + 3 s / 200 ms + the first three = 19 attempts; a loop without backoff makes thousands.
    eprintln!("{} attempts in {window:?}: {attempts:?}", attempts.len());
    assert!(attempts.len() >= 3, "too few attempts: {attempts:?}");
    assert!(attempts.len() <= 19, "{} attempts in {window:?}: no backoff?", attempts.len());
    assert_eq!(attempts, (1..=attempts.len() as u32).collect::<Vec<_>>(), "attempts must count up");
}

#[test]
fn health_and_catalog_watches_follow_checks_and_registrations() {
    let dir = TestDir::new("discovery_health");
    let consul = Consul::start(dir.path());
    let svc = |id: &str, addr: &str, tags: &[&str]| {
        serde_json::json!({ "ID": id, "Name": "web", "Address": addr, "Port": 80, "Tags": tags,
                            "Check": { "CheckID": format!("ttl-{id}"), "TTL": "10m", "Status": "passing" } })
    };
    consul.register_service(&svc("web-1", "10.0.0.1", &["weight=5"]));
    consul.register_service(&svc("web-2", "10.0.0.2", &["backup"]));
    let c = client(&consul.http_addr());
    let marked = WatchThread::start(c.clone(), Query::HealthService { name: "web".into(), tag: None, mode: HealthMode::MarkDown }, opts());
    let omitted = WatchThread::start(c.clone(), Query::HealthService { name: "web".into(), tag: None, mode: HealthMode::Omit }, opts());
    let catalog = WatchThread::start(c.clone(), Query::CatalogService { name: "web".into(), tag: Some("backup".into()) }, opts());
    let services = WatchThread::start(c, Query::Services, opts());

    let (set, _) = marked.next_set(LONG);
    assert_eq!(addrs(&set), ["10.0.0.1:80", "10.0.0.2:80"]);
    assert_eq!(set.iter().next().unwrap().weight, 5);
    assert!(set.iter().nth(1).unwrap().backup);
    assert_eq!(addrs(&omitted.next_set(LONG).0), ["10.0.0.1:80", "10.0.0.2:80"]);
    assert_eq!(addrs(&catalog.next_set(LONG).0), ["10.0.0.2:80"]);
    match services.next(LONG) {
        WatchEvent::Changed { value, .. } => assert!(value.as_services().unwrap().contains_key("web")),
        other => panic!("{other:?}"),
    }

    consul.ttl_check("ttl-web-1", "fail");
    let (set, _) = marked.until_set(LONG, "web-1 down", |s| s.iter().next().is_some_and(|e| e.down));
    assert_eq!(set.len(), 2);
    assert_eq!(set.iter().next().unwrap().health, upsync_discovery::Health::Critical);
    let (set, _) = omitted.until_set(LONG, "web-1 left out", |s| s.len() == 1);
    assert_eq!(addrs(&set), ["10.0.0.2:80"]);

    consul.deregister_service("web-2");
    let (set, _) = catalog.until_set(LONG, "web-2 gone from the catalog", |s| s.is_empty());
    assert!(set.is_empty());
}
