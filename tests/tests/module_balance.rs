//! Balancing over synced servers is nginx's own: same smooth weighted round-robin sequence as a
//! static upstream, passive health that survives updates, retries, keepalive reuse, requests in
//! flight finishing on the server they were given.
use std::time::Duration;

use upsync_tests::backend::Backend;
use upsync_tests::consul::Consul;
use upsync_tests::net::http_get;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::upsync::{all_ok, delete_server, hits, http_block, put_server, shown_server, wait_server_field, wait_servers};
use upsync_tests::{wait_for, wait_until, TestDir};

fn sequence(url: &str, n: usize) -> Vec<String> {
    (0..n).map(|_| http_get(url).map(|(_, b)| b).unwrap_or_else(|e| e.to_string())).collect()
}

#[test]
fn same_smooth_weighted_round_robin_sequence_as_a_static_upstream() {
    let dir = TestDir::new("bal_wrr");
    let consul = Consul::start(dir.path());
    let (a, b, c) = (Backend::start("a"), Backend::start("b"), Backend::start("c"));
    // The synced list is sorted by address; the stock upstream lists the same servers in that order.
    let mut order = vec![(&a, 1), (&b, 2), (&c, 4)];
    order.sort_by_key(|(be, _)| be.host_port());
    let http = format!(
        "{}\n upstream stock {{ {} }}
         server {{ listen 127.0.0.1:{{{{port1}}}}; location / {{ proxy_pass http://stock; }} }}",
        http_block("app", &consul.http_addr(), "", ""),
        order.iter().map(|(be, w)| format!("server {} weight={w};", be.host_port())).collect::<String>()
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http).workers(1));
    for (be, w) in &order {
        put_server(&consul, "app", &be.host_port(), &format!("{{\"weight\":{w}}}"));
    }
    wait_servers(&nginx, "app", &[&a.host_port(), &b.host_port(), &c.host_port()]);
    let synced = sequence(&nginx.url("/"), 21);
    let stock = sequence(&format!("http://127.0.0.1:{}/", nginx.extra_port(1)), 21);
    assert_eq!(synced, stock, "the synced upstream does not balance like nginx's own round robin");
    assert_eq!(synced.iter().filter(|s| *s == "c").count(), 12);
}

#[test]
fn a_request_in_flight_finishes_on_a_removed_server() {
    let dir = TestDir::new("bal_inflight");
    let consul = Consul::start(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &consul.http_addr(), "", "keepalive 4;")).workers(2));
    put_server(&consul, "app", &a.host_port(), "");
    wait_servers(&nginx, "app", &[&a.host_port()]);
    let url = nginx.url("/slow?ms=1500");
    let slow = std::thread::spawn(move || http_get(&url));
    wait_until("the slow request to reach a", Duration::from_secs(10), || a.requests() >= 1);
    put_server(&consul, "app", &b.host_port(), "");
    delete_server(&consul, "app", &a.host_port());
    wait_servers(&nginx, "app", &[&b.host_port()]);
    assert_eq!(all_ok(&nginx.url("/"), 10).get("b"), Some(&10));
    let (status, body) = slow.join().unwrap().expect("the in-flight request failed");
    assert_eq!((status, body.as_str()), (200, "a"));
}

#[test]
fn passive_health_and_retries_and_failure_state_survive_updates() {
    let dir = TestDir::new("bal_health");
    let consul = Consul::start(dir.path());
    let (mut a, b, c) = (Backend::start("a"), Backend::start("b"), Backend::start("c"));
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &consul.http_addr(), "", "")).workers(1));
    put_server(&consul, "app", &a.host_port(), r#"{"max_fails":1,"fail_timeout":60}"#);
    put_server(&consul, "app", &b.host_port(), r#"{"max_fails":1,"fail_timeout":60}"#);
    wait_servers(&nginx, "app", &[&a.host_port(), &b.host_port()]);
    a.stop();
    // proxy_next_upstream retries on b: no request fails; a is taken out after one failure.
    let h = all_ok(&nginx.url("/"), 20);
    assert_eq!(h.get("b"), Some(&20), "{h:?}");
    let fails = |nginx: &Nginx| -> u64 { shown_server(nginx, "app", &a.host_port()).and_then(|s| s["fails"].as_u64()).unwrap_or(0) };
    assert!(fails(&nginx) >= 1);
    // An unrelated change: a stays in the list with its failure count, so it stays out of rotation.
    put_server(&consul, "app", &c.host_port(), r#"{"max_fails":1,"fail_timeout":60}"#);
    wait_servers(&nginx, "app", &[&a.host_port(), &b.host_port(), &c.host_port()]);
    assert!(fails(&nginx) >= 1, "a's failure state was lost by the update");
    let before = b.requests() + c.requests();
    let h = all_ok(&nginx.url("/"), 20);
    assert!(!h.contains_key("a") && b.requests() + c.requests() == before + 20, "{h:?}");
}

#[test]
fn keepalive_connections_are_reused_across_updates() {
    let dir = TestDir::new("bal_keepalive");
    let consul = Consul::start(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &consul.http_addr(), "", "keepalive 8;")).workers(1));
    put_server(&consul, "app", &a.host_port(), "");
    wait_servers(&nginx, "app", &[&a.host_port()]);
    all_ok(&nginx.url("/"), 50);
    assert!(a.connections() <= 2, "{} connections for 50 sequential requests: keepalive is not used", a.connections());
    // The list changes (b added, then a re-weighted): a's idle connections stay usable.
    put_server(&consul, "app", &b.host_port(), r#"{"down":1}"#);
    put_server(&consul, "app", &a.host_port(), r#"{"weight":5}"#);
    wait_server_field(&nginx, "app", &a.host_port(), "weight", serde_json::json!(5));
    let before = a.connections();
    all_ok(&nginx.url("/"), 50);
    assert!(a.connections() <= before + 1, "updates dropped keepalive connections ({before} -> {})", a.connections());
}

#[test]
fn upsync_lb_least_conn_and_ip_hash_use_nginx_balancers() {
    let dir = TestDir::new("bal_lb");
    let consul = Consul::start(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let http = format!(
        "{}\n upstream iph {{ server 127.0.0.1:9; upsync {c}/v1/kv/upstreams/iph upsync_interval=10ms; upsync_lb ip_hash; }}
         upstream lc {{ server 127.0.0.1:9; upsync {c}/v1/kv/upstreams/lc upsync_interval=10ms; upsync_lb least_conn; }}
         upstream hashempty {{ server 127.0.0.1:9; upsync {c}/v1/kv/upstreams/hashempty upsync_interval=10ms; upsync_lb ip_hash; upsync_allow_empty on; }}
         server {{ listen 127.0.0.1:{{{{port1}}}}; location /iph {{ proxy_pass http://iph; }} location /lc {{ proxy_pass http://lc; }}
                   location /hashempty {{ proxy_pass http://hashempty; }} location = /lcslow {{ proxy_pass http://lc/slow; }} }}",
        http_block("app", &consul.http_addr(), "", ""),
        c = consul.http_addr()
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http).workers(1));
    for up in ["iph", "lc", "hashempty"] {
        put_server(&consul, up, &a.host_port(), "");
        put_server(&consul, up, &b.host_port(), "");
        wait_servers(&nginx, up, &[&a.host_port(), &b.host_port()]);
    }
    let base = format!("http://127.0.0.1:{}", nginx.extra_port(1));
    // ip_hash: one client address, one backend.
    assert_eq!(all_ok(&format!("{base}/iph"), 10).len(), 1);
    // least_conn with sequential requests behaves like round robin: both serve.
    assert_eq!(all_ok(&format!("{base}/lc"), 10).len(), 2);
    // While one backend holds a slow request, least_conn sends every new request to the other
    // (round robin would alternate): upsync_lb least_conn really runs nginx's least_conn.
    let before = (a.requests(), b.requests());
    let slow_url = format!("{base}/lcslow?ms=3000");
    let slow = std::thread::spawn(move || http_get(&slow_url).map(|r| r.1));
    let busy = wait_for("the slow request to reach a backend", Duration::from_secs(10), || {
        if a.requests() > before.0 {
            Some("a")
        } else if b.requests() > before.1 {
            Some("b")
        } else {
            None
        }
    });
    let quick = all_ok(&format!("{base}/lc"), 10);
    let idle = if busy == "a" { "b" } else { "a" };
    assert_eq!(quick.get(idle), Some(&10), "least_conn sent requests to the busy backend {busy}: {quick:?}");
    assert_eq!(slow.join().unwrap().ok().as_deref(), Some(busy));
    // Emptying an ip_hash upstream (allowed only with upsync_allow_empty) never divides by zero:
    // here the empty answer is refused and the list stays.
    consul.kv_delete_tree("upstreams/iph");
    wait_until("the refusal", Duration::from_secs(20), || nginx.error_log().contains("upstream \"iph\": Consul returned no servers"));
    assert_eq!(hits(&format!("{base}/iph"), 5).values().sum::<usize>(), 5);
    // With upsync_allow_empty on, the ip_hash upstream does become empty: requests fail at once
    // with 502 (the placeholder peer is down), and no worker crashes (checked when nginx stops).
    assert_eq!(all_ok(&format!("{base}/hashempty"), 4).len(), 1);
    consul.kv_delete_tree("upstreams/hashempty");
    wait_servers(&nginx, "hashempty", &[]);
    assert_eq!(hits(&format!("{base}/hashempty"), 5).get("HTTP 502"), Some(&5));
}

/// With `zone` in a synced upstream, the workers share their servers' failure state as nginx's
/// workers do for a static upstream with `zone`: with `max_fails=1`, the first failure in any
/// worker takes the server out of every worker's choice for `fail_timeout`.
#[test]
fn zone_shares_failures_between_workers() {
    let dir = TestDir::new("bal_zone_fails");
    let consul = Consul::start(dir.path());
    let good = Backend::start("good");
    // A server that accepts and closes every connection at once: each try on it is a failure
    // (nginx: "upstream prematurely closed connection") that proxy_next_upstream retries.
    let broken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let broken_addr = broken.local_addr().unwrap().to_string();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for conn in broken.incoming() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    let log = dir.path().join("upstream.log");
    let http = format!(
        "log_format peers '$pid $upstream_addr';
         upstream app {{
             zone app 64k;
             server 127.0.0.1:9;
             upsync {c}/v1/kv/upstreams/app upsync_timeout=30s upsync_interval=10ms;
         }}
         server {{
             listen 127.0.0.1:{{{{port}}}} reuseport;
             location / {{ proxy_pass http://app; proxy_next_upstream error timeout; access_log {log} peers; }}
             location = /show {{ upstream_show; }}
         }}",
        c = consul.http_addr(),
        log = log.display()
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http).workers(4));
    let params = r#"{"weight":1,"max_fails":1,"fail_timeout":60}"#;
    put_server(&consul, "app", &good.host_port(), params);
    put_server(&consul, "app", &broken_addr, params);
    wait_servers(&nginx, "app", &[&good.host_port(), &broken_addr]);
    // Every request succeeds (a try on the broken server is retried on the good one).
    let answers = all_ok(&nginx.url("/"), 200);
    assert_eq!(answers.get("good"), Some(&200), "{answers:?}");
    let lines = wait_for("the access log of 200 requests", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        (lines.len() >= 200).then_some(lines)
    });
    let pids: std::collections::BTreeSet<&str> = lines.iter().filter_map(|l| l.split(' ').next()).collect();
    let tries_on_broken = lines.iter().filter(|l| l.contains(&broken_addr)).count();
    // The test means something only if several workers served requests.
    assert!(pids.len() >= 2, "only worker(s) {pids:?} served the 200 requests; reuseport should spread them");
    assert_eq!(
        (tries_on_broken, accepted.load(std::sync::atomic::Ordering::SeqCst)),
        (1, 1),
        "after its first failure the broken server must be avoided by all {} workers that served: {lines:?}",
        pids.len()
    );
}
