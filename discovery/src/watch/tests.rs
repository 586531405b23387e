//! The watch's index rules, rate limit and backoff, without a network (responses are built
//! here; the same rules are checked against real Consul in tests/tests/discovery_watch.rs).
use super::*;
use crate::config::{ConsulAddr, ConsulConfig};

fn watch() -> Watch {
    let client = Client::new(ConsulConfig::from_addresses("127.0.0.1:1").unwrap()).unwrap();
    Watch::new(client, Query::Kv { prefix: "up/app".into() }, WatchOptions::default())
}

fn kv_body(addrs: &[&str]) -> Bytes {
    let entries: Vec<String> = addrs.iter().map(|a| format!(r#"{{"Key":"up/app/{a}","Value":null}}"#)).collect();
    Bytes::from(format!("[{}]", entries.join(",")))
}

fn resp(index: u64, status: u16, body: Bytes) -> Result<Response, Error> {
    Ok(Response { index, status, body, address: ConsulAddr::parse("127.0.0.1:1").unwrap(), known_leader: true })
}

fn changed_addrs(ev: Option<WatchEvent>) -> Vec<String> {
    match ev {
        Some(WatchEvent::Changed { value, .. }) => value.as_endpoints().unwrap().iter().map(|e| e.addr()).collect(),
        other => panic!("expected Changed, got {other:?}"),
    }
}

#[test]
fn first_answer_always_yields_even_when_empty() {
    let mut w = watch();
    assert_eq!(changed_addrs(w.on_result(resp(5, 404, Bytes::new()))), Vec::<String>::new());
    assert_eq!(w.index(), 5);
}

#[test]
fn same_index_or_same_value_yields_nothing() {
    let mut w = watch();
    changed_addrs(w.on_result(resp(10, 200, kv_body(&["10.0.0.1:80"]))));
    assert!(w.on_result(resp(10, 200, kv_body(&["10.0.0.9:80"]))).is_none(), "same index must not be decoded");
    assert!(w.on_result(resp(11, 200, kv_body(&["10.0.0.1:80"]))).is_none(), "identical value must not yield");
    assert_eq!(w.index(), 11);
    assert_eq!(changed_addrs(w.on_result(resp(12, 200, kv_body(&["10.0.0.2:80"])))), ["10.0.0.2:80"]);
}

#[test]
fn index_going_backwards_resets_to_a_fresh_read() {
    let mut w = watch();
    changed_addrs(w.on_result(resp(100, 200, kv_body(&["10.0.0.1:80"]))));
    assert_eq!(changed_addrs(w.on_result(resp(7, 200, kv_body(&["10.0.0.2:80"])))), ["10.0.0.2:80"]);
    assert_eq!(w.index(), 0, "after a reset the next request must not block");
    assert!(w.on_result(resp(7, 200, kv_body(&["10.0.0.2:80"]))).is_none());
    assert_eq!(w.index(), 7);
}

/// The entries of a KV answer are decoded again only when they changed, unless Consul's
/// index went backwards (a restored snapshot): then the whole answer is decoded afresh.
#[test]
fn an_index_going_backwards_decodes_the_whole_answer_again() {
    let weights = |ev: Option<WatchEvent>| match ev {
        Some(WatchEvent::Changed { value, .. }) => value.as_endpoints().unwrap().iter().map(|e| e.weight).collect::<Vec<_>>(),
        other => panic!("expected Changed, got {other:?}"),
    };
    let mut w = watch();
    assert_eq!(weights(w.on_result(resp(100, 200, kv_body(&["10.0.0.1:80", "10.0.0.2:80"])))), [1, 1]);
    // Taken from the cache (marked): only the new key is decoded.
    w.kv_cache.poison();
    assert_eq!(weights(w.on_result(resp(101, 200, kv_body(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"])))), [99, 99, 1]);
    w.kv_cache.poison();
    assert_eq!(weights(w.on_result(resp(7, 200, kv_body(&["10.0.0.1:80", "10.0.0.2:80"])))), [1, 1]);
}

#[test]
fn index_zero_is_never_blocked_on() {
    let mut w = watch();
    changed_addrs(w.on_result(resp(0, 200, kv_body(&["10.0.0.1:80"]))));
    assert_eq!(w.index(), 1);
}

#[test]
fn errors_back_off_and_force_a_non_blocking_resync() {
    let mut w = watch();
    changed_addrs(w.on_result(resp(10, 200, kv_body(&["10.0.0.1:80"]))));
    let err = || Err(Error::Connect { address: ConsulAddr::parse("127.0.0.1:1").unwrap(), message: "refused".into() });
    let mut last = Duration::ZERO;
    for n in 1..=12 {
        match w.on_result(err()) {
            Some(WatchEvent::Error { attempt, index, retry_in, .. }) => {
                assert_eq!((attempt, index), (n, 10));
                let cap = w.opts.backoff.initial.saturating_mul(1 << (n - 1)).min(w.opts.backoff.max);
                assert!(retry_in >= cap / 2 && retry_in <= cap, "attempt {n}: {retry_in:?} outside [{:?}, {cap:?}]", cap / 2);
                last = retry_in;
            }
            other => panic!("{other:?}"),
        }
        assert!(w.resync);
    }
    assert!(last >= w.opts.backoff.max / 2);
    // Recovery: the value is unchanged, so nothing is yielded, and the attempt count resets.
    assert!(w.on_result(resp(10, 200, kv_body(&["10.0.0.1:80"]))).is_none());
    assert_eq!((w.attempt, w.resync), (0, false));
}

#[test]
fn a_body_that_cannot_be_decoded_is_an_error_and_keeps_the_last_value() {
    let mut w = watch();
    changed_addrs(w.on_result(resp(10, 200, kv_body(&["10.0.0.1:80"]))));
    match w.on_result(resp(11, 200, Bytes::from_static(b"<html>proxy error</html>"))) {
        Some(WatchEvent::Error { error: Error::Decode { .. }, index: 10, attempt: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(w.index(), 10);
    assert!(w.last().is_some());
}

#[test]
fn token_bucket_allows_a_burst_then_the_rate() {
    let start = Instant::now();
    let mut b = TokenBucket::new(RateLimit { burst: 3, per_second: 2.0 });
    b.last = start;
    for _ in 0..3 {
        assert!(b.take(start).is_ok());
    }
    let wait = b.take(start).unwrap_err();
    assert_eq!(wait, Duration::from_millis(500));
    assert!(b.take(start + Duration::from_millis(499)).is_err());
    assert!(b.take(start + Duration::from_millis(1000)).is_ok());
    let mut unlimited = TokenBucket::new(RateLimit { burst: 1, per_second: 0.0 });
    assert!((0..1000).all(|_| unlimited.take(start).is_ok()));
}

#[test]
fn query_paths() {
    assert_eq!(Query::Kv { prefix: "/upstreams/app".into() }.path(), "/v1/kv/upstreams/app?recurse");
    assert_eq!(
        Query::HealthService { name: "web api".into(), tag: Some("v1&x".into()), mode: HealthMode::Omit }.path(),
        "/v1/health/service/web%20api?tag=v1%26x&passing"
    );
    assert_eq!(Query::CatalogService { name: "web".into(), tag: None }.path(), "/v1/catalog/service/web");
    assert_eq!(Query::KvTree { root: "upstreams/".into() }.path(), "/v1/kv/upstreams?recurse");
    assert_eq!(Query::KvTree { root: "".into() }.path(), "/v1/kv/?recurse");
    assert_eq!(Query::NodeDump.path(), "/v1/internal/ui/nodes");
}

#[test]
fn the_wait_grows_with_the_watch_age_when_ramped() {
    let client = Client::new(ConsulConfig::from_addresses("127.0.0.1:1").unwrap()).unwrap();
    let opts = WatchOptions { wait: Duration::from_secs(300), ramp_from: Some(Duration::from_secs(2)), ..WatchOptions::default() };
    let w = Watch::new(client.clone(), Query::NodeDump, opts);
    assert_eq!(w.wait(w.born), Duration::from_secs(2));
    assert_eq!(w.wait(w.born + Duration::from_secs(40)), Duration::from_secs(40));
    assert_eq!(w.wait(w.born + Duration::from_secs(4000)), Duration::from_secs(300));
    let fixed = Watch::new(client, Query::NodeDump, WatchOptions { wait: Duration::from_secs(900), ..WatchOptions::default() });
    assert_eq!(fixed.wait(fixed.born), MAX_WAIT);
}

#[test]
fn a_kv_tree_serves_each_prefix_as_its_own_read_would() {
    // In Consul's order (bytes: `-` sorts before `/`).
    let body = br#"[
        {"Key":"up/a","Value":null,"ModifyIndex":3},
        {"Key":"up/a-b/10.0.0.3:80","Value":null,"ModifyIndex":11},
        {"Key":"up/a/10.0.0.1:80","Value":null,"ModifyIndex":4},
        {"Key":"up/a/10.0.0.2:80","Value":"eyJ3ZWlnaHQiOjN9","ModifyIndex":9},
        {"Key":"up/ab/10.0.0.4:80","Value":null,"ModifyIndex":12},
        {"Key":"up/b/bad","Value":null,"ModifyIndex":5}
    ]"#;
    let tree = decode::decode_kv_tree(body).unwrap();
    for prefix in ["up/a", "up/a/", "up/a-b", "up/ab", "up/b", "up/none", "up"] {
        let alone = decode::decode_kv(prefix, body).unwrap();
        assert_eq!(tree.endpoints(prefix), alone, "{prefix}");
    }
    assert_eq!(
        tree.endpoints("up/a").value.iter().map(|e| (e.addr(), e.weight)).collect::<Vec<_>>(),
        [("10.0.0.1:80".to_string(), 1), ("10.0.0.2:80".to_string(), 3)]
    );
    assert_eq!(tree.stamp("up/a"), decode::KvStamp { keys: 3, max_modify_index: 9 });
    assert_eq!(tree.stamp("up/a-b"), decode::KvStamp { keys: 1, max_modify_index: 11 });
    assert_eq!(tree.stamp("up/none"), decode::KvStamp::default());
    assert!(decode::decode_kv_tree(b"").unwrap().is_empty());
    assert!(decode::decode_kv_tree(b"{").is_err());
}

/// Dropping `next()` in the middle of its backoff sleep loses nothing: the next call still
/// waits out the same deadline (cancel safety).
#[tokio::test(start_paused = true)]
async fn next_is_cancel_safe_during_backoff() {
    let mut w = watch();
    let ev = w.on_result(Err(Error::Connect { address: ConsulAddr::parse("127.0.0.1:1").unwrap(), message: "x".into() }));
    let Some(WatchEvent::Error { retry_in, .. }) = ev else { panic!() };
    let deadline = w.not_before.unwrap();
    let _ = tokio::time::timeout(retry_in / 4, w.next()).await;
    assert_eq!(w.not_before, Some(deadline));
}

/// The module and the DNS server may run watches on any runtime: the futures must be `Send`
/// and the client shareable across threads.
#[test]
fn futures_are_send_and_the_client_is_sync() {
    fn send<T: Send>(_: &T) {}
    fn sync<T: Send + Sync>() {}
    sync::<Client>();
    sync::<Error>();
    let mut w = watch();
    send(&w.next());
    let c = Client::new(ConsulConfig::default()).unwrap();
    send(&fetch_once(&c, &Query::Services));
    send(&c.kv_put("k", b"v", None));
}

/// A garbage `X-Consul-Index` (the client turns it into a decode error): the watch keeps its
/// index and value, backs off exponentially (no hot loop) and keeps blocking on the index it
/// had, never on 0.
#[test]
fn a_garbage_index_backs_off_and_keeps_index_and_value() {
    let mut w = watch();
    changed_addrs(w.on_result(resp(10, 200, kv_body(&["10.0.0.1:80"]))));
    let garbage = || {
        Err(Error::Decode {
            address: ConsulAddr::parse("127.0.0.1:1").unwrap(),
            path: "/v1/kv/up/app?recurse".into(),
            error: crate::decode::DecodeError { what: "X-Consul-Index header", message: "\"abc\" is not a Consul index".into() },
        })
    };
    let mut previous = Duration::ZERO;
    for n in 1..=6 {
        let Some(WatchEvent::Error { attempt, index, retry_in, .. }) = w.on_result(garbage()) else { panic!() };
        assert_eq!((attempt, index, w.index(), w.resync), (n, 10, 10, false));
        let floor = w.opts.backoff.initial.saturating_mul(1 << (n - 1)).min(w.opts.backoff.max) / 2;
        assert!(retry_in >= floor && retry_in >= previous / 2, "attempt {n}: {retry_in:?}");
        previous = retry_in;
    }
    assert_eq!(changed_addrs(Some(WatchEvent::Changed { value: w.last().unwrap().clone(), index: 10, skipped: vec![] })), ["10.0.0.1:80"]);
    assert_eq!(changed_addrs(w.on_result(resp(12, 200, kv_body(&["10.0.0.2:80"])))), ["10.0.0.2:80"]);
    assert_eq!(w.index(), 12);
}

fn moved(ev: IndexEvent) -> (u64, bool) {
    match ev {
        IndexEvent::Moved { response, reset } => (response.index, reset),
        other => panic!("expected Moved, got {other:?}"),
    }
}

/// Index mode: every index change is reported, whatever the body; the same index only says
/// that Consul answered; a request that did not block always reports its answer.
#[test]
fn index_mode_reports_every_index_change() {
    let mut w = watch();
    let body = || kv_body(&["10.0.0.1:80"]);
    assert_eq!(moved(w.on_answer(resp(10, 200, body()), false)), (10, false), "the first answer");
    assert!(matches!(w.on_answer(resp(10, 200, body()), true), IndexEvent::Same { index: 10 }));
    assert_eq!(moved(w.on_answer(resp(11, 200, body()), true)), (11, false), "same body, new index");
    assert_eq!(moved(w.on_answer(resp(11, 200, body()), false)), (11, false), "a non-blocking read");
    // Garbage is not decoded here: the caller decodes.
    assert_eq!(moved(w.on_answer(resp(12, 200, Bytes::from_static(b"<html>")), true)), (12, false));
    assert_eq!(w.index(), 12);
    assert!(w.last().is_none());
}

/// Index mode: a lower index is reported as a reset and blocked on (no second read); index 0
/// is never blocked on and is no reset.
#[test]
fn index_mode_reports_an_index_going_backwards_and_blocks_on_it() {
    let mut w = watch();
    moved(w.on_answer(resp(100, 200, Bytes::new()), false));
    assert_eq!(moved(w.on_answer(resp(7, 200, Bytes::new()), true)), (7, true));
    assert_eq!(w.index(), 7);
    assert!(matches!(w.on_answer(resp(7, 200, Bytes::new()), true), IndexEvent::Same { index: 7 }));
    let mut w = watch();
    assert_eq!(moved(w.on_answer(resp(0, 200, Bytes::new()), false)), (0, false));
    assert_eq!(w.index(), 1);
    assert_eq!(moved(w.on_answer(resp(0, 200, Bytes::new()), true)), (0, false), "1 stands for no index: no reset");
}

/// Index mode: errors back off as in `next`, and every error (a garbage index too) makes the
/// next request non-blocking.
#[test]
fn index_mode_errors_back_off_and_resync() {
    let mut w = watch();
    moved(w.on_answer(resp(10, 200, Bytes::new()), false));
    let garbage = Error::Decode {
        address: ConsulAddr::parse("127.0.0.1:1").unwrap(),
        path: "/v1/catalog/services".into(),
        error: crate::decode::DecodeError { what: "X-Consul-Index header", message: "not a number".into() },
    };
    let refused = Error::Connect { address: ConsulAddr::parse("127.0.0.1:1").unwrap(), message: "refused".into() };
    for (n, error) in [(1, garbage), (2, refused)] {
        let IndexEvent::Error { attempt, index, retry_in, .. } = w.on_answer(Err(error), true) else { panic!() };
        assert_eq!((attempt, index, w.resync), (n, 10, true));
        assert!(retry_in >= w.opts.backoff.initial.saturating_mul(1 << (n - 1)) / 2, "{retry_in:?}");
        assert!(w.not_before.is_some());
    }
    assert_eq!(moved(w.on_answer(resp(10, 200, Bytes::new()), false)), (10, false), "the same index, read without blocking");
    assert_eq!((w.attempt, w.resync), (0, false));
}
