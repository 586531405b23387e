//! `upsync-discovery`'s client against a real Consul 1.8.7 agent: the KV and agent writes the
//! sidecar uses (CAS, prefix delete, service registration with checks, TTL updates,
//! maintenance), dc/consistency parameters, errors, and `fetch_once` on a short-lived runtime.
mod discovery_common;

use std::collections::BTreeMap;
use std::time::Duration;

use discovery_common::*;
use upsync_discovery::upsync::{kv_key, KvValue};
use upsync_discovery::{
    fetch_once, Check, CheckKind, Client, Consistency, ConsulConfig, Error, Host, Query, ServiceRegistration, ServiceWeights, Status,
};
use upsync_tests::backend::Backend;
use upsync_tests::consul::Consul;
use upsync_tests::net::free_port;
use upsync_tests::{wait_until, TestDir};

#[test]
fn kv_writes_with_cas_and_prefix_delete() {
    let dir = TestDir::new("discovery_kv_writes");
    let consul = Consul::start(dir.path());
    let c = client(&consul.http_addr());
    runtime().block_on(async {
        let key = kv_key("upstreams/web", &Host::parse("10.0.0.1").unwrap(), 8080);
        let value = KvValue { weight: 4, ..KvValue::default() }.to_json();
        // cas=0: create only if absent.
        assert!(c.kv_put(&key, value.as_bytes(), Some(0)).await.unwrap());
        assert!(!c.kv_put(&key, b"{}", Some(0)).await.unwrap(), "cas=0 overwrote an existing key");
        let got = c.kv_get(&key).await.unwrap().expect("the key");
        assert_eq!(got.value, value.as_bytes());
        // cas=ModifyIndex: succeeds once, then the index is stale.
        assert!(c.kv_put(&key, b"{\"weight\":5}", Some(got.modify_index)).await.unwrap());
        assert!(!c.kv_put(&key, b"{\"weight\":6}", Some(got.modify_index)).await.unwrap());
        assert_eq!(consul.kv_get(&key).as_deref(), Some("{\"weight\":5}"));

        c.kv_put("upstreams/web/[::1]:80", b"", None).await.unwrap();
        c.kv_put("upstreams/web2/10.0.0.9:80", b"", None).await.unwrap();
        let listed: Vec<String> = c.kv_list("upstreams/web/").await.unwrap().into_iter().map(|p| p.key).collect();
        assert_eq!(listed, ["upstreams/web/10.0.0.1:8080", "upstreams/web/[::1]:80"]);

        // Delete with a stale cas fails, with the current one succeeds.
        let cur = c.kv_get("upstreams/web/[::1]:80").await.unwrap().unwrap();
        assert!(!c.kv_delete("upstreams/web/[::1]:80", Some(cur.modify_index + 100)).await.unwrap());
        assert!(c.kv_delete("upstreams/web/[::1]:80", Some(cur.modify_index)).await.unwrap());
        assert!(c.kv_get("upstreams/web/[::1]:80").await.unwrap().is_none());

        c.kv_delete_prefix("upstreams/web/").await.unwrap();
        assert!(c.kv_list("upstreams/web/").await.unwrap().is_empty());
        assert_eq!(consul.kv_keys("upstreams/"), ["upstreams/web2/10.0.0.9:80"], "the prefix delete went beyond its folder");
        assert!(matches!(c.kv_delete_prefix("/").await, Err(Error::Config(_))));
        assert!(c.kv_list("nothing/").await.unwrap().is_empty());
    });
}

#[test]
fn agent_registration_checks_ttl_and_maintenance() {
    let dir = TestDir::new("discovery_agent");
    let consul = Consul::start(dir.path());
    let backend = Backend::start("web-1");
    let c = client(&consul.http_addr());
    runtime().block_on(async {
        let node = c.node_name().await.unwrap();
        assert!(node.starts_with("upsync-test-"), "{node}");
        let check = |name: &str, kind: CheckKind| Check {
            id: Some(name.to_string()),
            name: name.to_string(),
            kind,
            interval: Some(Duration::from_secs(1)),
            timeout: Some(Duration::from_secs(1)),
            deregister_critical_service_after: Some(Duration::from_secs(600)),
            status: None,
            notes: Some("made by the discovery test".into()),
        };
        let reg = ServiceRegistration {
            id: Some("web-1".into()),
            name: "web".into(),
            tags: vec!["weight=3".into()],
            meta: BTreeMap::from([("container".to_string(), "abc".to_string())]),
            address: Some("127.0.0.1".into()),
            port: Some(backend.port()),
            weights: Some(ServiceWeights { passing: 3, warning: 1 }),
            checks: vec![
                check(
                    "web-1-http",
                    CheckKind::Http {
                        url: format!("http://{}/", backend.host_port()),
                        method: None,
                        headers: BTreeMap::new(),
                        tls_skip_verify: false,
                    },
                ),
                check("web-1-tcp", CheckKind::Tcp { address: backend.host_port() }),
                Check {
                    interval: None,
                    status: Some(Status::Critical),
                    ..check("web-1-ttl", CheckKind::Ttl { ttl: Duration::from_secs(600) })
                },
            ],
            replace_existing_checks: true,
        };
        c.register_service(&reg).await.unwrap();
        let services = c.agent_services().await.unwrap();
        let s = &services["web-1"];
        assert_eq!((s.service.as_str(), s.port, s.meta["container"].as_str()), ("web", backend.port(), "abc"));

        // HTTP and TCP checks probe the real backend; the TTL check follows our updates.
        let health = Query::HealthService { name: "web".into(), tag: None, mode: upsync_discovery::HealthMode::MarkDown };
        let status_of = |id: &'static str| {
            let c = c.clone();
            async move { c.agent_checks().await.unwrap().get(id).map(|k| k.status.clone()).unwrap_or_default() }
        };
        for id in ["web-1-http", "web-1-tcp"] {
            wait_async(|| async { status_of(id).await == "passing" }).await;
        }
        assert_eq!(status_of("web-1-ttl").await, "critical");
        c.check_update("web-1-ttl", Status::Passing, Some("all good")).await.unwrap();
        let checks = c.agent_checks().await.unwrap();
        assert_eq!((checks["web-1-ttl"].status.as_str(), checks["web-1-ttl"].output.as_str()), ("passing", "all good"));
        let up = fetch_once(&c, &health).await.unwrap();
        let e = up.value.as_endpoints().unwrap().iter().next().unwrap().clone();
        assert_eq!((e.weight, e.down, e.service_id.as_deref()), (3, false, Some("web-1")));

        c.service_maintenance("web-1", true, Some("draining & deploying")).await.unwrap();
        let down = fetch_once(&c, &health).await.unwrap();
        assert!(down.value.as_endpoints().unwrap().iter().next().unwrap().down, "maintenance did not mark it down");
        c.service_maintenance("web-1", false, None).await.unwrap();

        c.deregister_service("web-1").await.unwrap();
        assert!(c.agent_services().await.unwrap().is_empty());
        // Consul 1.8 accepts deregistering an unknown ID; updating an unknown check is an error
        // that names the address and quotes Consul.
        c.deregister_service("web-1").await.unwrap();
        let err = c.check_update("no-such-check", Status::Passing, None).await.unwrap_err();
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(msg.contains(&consul.http_addr()) && msg.contains("no-such-check"), "{msg}");
        assert!(!err.is_transient(), "retrying cannot fix an unknown check: {msg}");
        let bad = ServiceRegistration { name: String::new(), ..Default::default() };
        assert!(matches!(c.register_service(&bad).await, Err(Error::Config(_))));
    });
}

async fn wait_async<F: std::future::Future<Output = bool>>(mut cond: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + LONG;
    while !cond().await {
        assert!(std::time::Instant::now() < deadline, "condition not met within {LONG:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn failover_skips_a_dead_address_and_sticks_to_the_live_one() {
    let dir = TestDir::new("discovery_failover_single");
    let consul = Consul::start(dir.path());
    consul.kv_put("f/10.0.0.1:80", "");
    let dead = format!("127.0.0.1:{}", free_port());
    let c = client(&format!("{dead},{}", consul.http_addr()));
    runtime().block_on(async {
        let got = fetch_once(&c, &Query::Kv { prefix: "f".into() }).await.unwrap();
        assert_eq!(got.value.as_endpoints().unwrap().len(), 1);
        assert_eq!(c.current_address().to_string(), format!("http://{}", consul.http_addr()));
        assert!(got.index > 0);
    });
}

#[test]
fn datacenter_and_consistency_reach_consul_and_errors_say_what_failed() {
    let dir = TestDir::new("discovery_dc");
    let consul = Consul::start(dir.path());
    consul.kv_put("dc/10.0.0.1:80", "");
    let cfg = |dc: &str, consistency| ConsulConfig {
        datacenter: Some(dc.to_string()),
        consistency,
        ..ConsulConfig::from_addresses(&consul.http_addr()).unwrap()
    };
    runtime().block_on(async {
        for mode in [Consistency::Default, Consistency::Stale, Consistency::Consistent] {
            let c = Client::new(cfg("dc1", mode)).unwrap();
            let got = fetch_once(&c, &Query::Kv { prefix: "dc".into() }).await.unwrap();
            assert_eq!(got.value.as_endpoints().unwrap().len(), 1, "{mode:?}");
        }
        let c = Client::new(cfg("nowhere", Consistency::Default)).unwrap();
        let err = fetch_once(&c, &Query::Kv { prefix: "dc".into() }).await.unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.status(), Some(500), "{msg}");
        assert!(msg.contains(&consul.http_addr()) && msg.contains("No path to datacenter"), "{msg}");
        assert!(err.is_transient());

        // A body that is not what the query returns is a decode error naming the path.
        let c = client(&consul.http_addr());
        let err = fetch_once(&c, &Query::Raw { path: "/v1/agent/self".into() }).await;
        assert!(err.is_ok(), "raw queries are not decoded");
        consul.kv_put("bad/10.0.0.1:80", "{\"weight\":0}");
        let got = fetch_once(&c, &Query::Kv { prefix: "bad".into() }).await.unwrap();
        assert!(got.value.as_endpoints().unwrap().is_empty());
        assert!(got.skipped[0].reason.contains("weight"), "{:?}", got.skipped);
    });
}

/// The module's start-up read: `fetch_once` on a short-lived current-thread runtime, then
/// everything dropped. No thread may survive it, even when the address is a name that must
/// be resolved (tokio resolves names on its blocking pool, which the runtime's drop joins).
#[test]
fn fetch_once_leaves_no_thread_behind() {
    let dir = TestDir::new("discovery_fetch_once");
    let consul = Consul::start(dir.path());
    consul.kv_put("boot/10.0.0.1:80", "");
    let by_name = format!("localhost:{}", consul.ports.http);
    // Other tests of this binary run on other threads: count this process's threads named
    // like tokio's only, which no other test creates.
    let tokio_threads = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|name| name.starts_with("tokio"))
            .count()
    };
    for addr in [consul.http_addr(), by_name] {
        let rt = runtime();
        let c = client(&addr);
        let got = rt.block_on(fetch_once(&c, &Query::Kv { prefix: "boot".into() })).unwrap();
        assert_eq!(got.value.as_endpoints().unwrap().len(), 1, "{addr}");
        drop(c);
        drop(rt);
        wait_until("no tokio thread left", Duration::from_secs(10), || tokio_threads() == 0);
    }
}

/// The module may read once at start-up on a short-lived runtime and keep the client for the
/// watch thread's runtime: pooled connections of the dead runtime must be replaced, not used.
#[test]
fn a_client_outlives_the_runtime_it_was_first_used_on() {
    let dir = TestDir::new("discovery_two_runtimes");
    let consul = Consul::start(dir.path());
    consul.kv_put("rt/10.0.0.1:80", "");
    let c = client(&consul.http_addr());
    let q = Query::Kv { prefix: "rt".into() };
    for round in 0..3 {
        let rt = runtime();
        let got = rt.block_on(fetch_once(&c, &q)).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(got.value.as_endpoints().unwrap().len(), 1);
        drop(rt);
    }
}
