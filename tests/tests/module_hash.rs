//! nginx's `hash` balancing in synced upstreams, on real nginx + Consul 1.8.7: the consistent
//! ring follows the synced servers and maps every key as a stock nginx with the same servers
//! written in its configuration; adding one server to ten moves about an eleventh of the keys;
//! `hash` without `consistent` maps as stock nginx too; emptied upstreams answer 502 at once.
use std::collections::BTreeMap;
use std::time::Duration;

use upsync_tests::backend::Backend;
use upsync_tests::consul::Consul;
use upsync_tests::net::http_get;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::upsync::{key_mapping, shown_count, sort_by_port};
use upsync_tests::{wait_until, TestDir};

const KEYS: usize = 10_000;

fn synced_conf(consul: &str) -> NginxConf {
    NginxConf::new(&format!(
        "upstream ring {{
            server 127.0.0.1:9;
            upsync {consul}/v1/kv/upstreams/ring upsync_timeout=30s upsync_interval=10ms;
            upsync_lb hash_ketama;
            upsync_allow_empty on;
            hash $arg_k consistent;
        }}
        upstream modula {{
            server 127.0.0.1:9;
            upsync {consul}/v1/kv/upstreams/modula upsync_timeout=30s upsync_interval=10ms;
            upsync_lb hash_modula;
            upsync_allow_empty on;
            hash $arg_k;
        }}
        server {{
            listen 127.0.0.1:{{{{port}}}};
            location /ring {{ proxy_pass http://ring; proxy_next_upstream off; }}
            location /modula {{ proxy_pass http://modula; proxy_next_upstream off; }}
            location = /show {{ upstream_show; }}
        }}"
    ))
    .workers(2)
}

/// A stock nginx (no module) with `servers` written in the same blocks.
fn stock_conf(servers: &[String]) -> NginxConf {
    let lines: String = servers.iter().map(|s| format!("server {s};\n")).collect();
    NginxConf::new(&format!(
        "upstream ring {{ hash $arg_k consistent; {lines} }}
        upstream modula {{ hash $arg_k; {lines} }}
        server {{
            listen 127.0.0.1:{{{{port}}}};
            location /ring {{ proxy_pass http://ring; proxy_next_upstream off; }}
            location /modula {{ proxy_pass http://modula; proxy_next_upstream off; }}
        }}"
    ))
    .workers(2)
    .without_module()
}

fn differences(a: &[String], b: &[String]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

#[test]
fn synced_hash_upstreams_map_keys_as_stock_nginx_and_follow_changes() {
    let dir = TestDir::new("module_hash");
    let consul = Consul::start(dir.path());
    let backends: Vec<Backend> = (0..11).map(|i| Backend::start(&format!("b{i}"))).collect();
    // In the order the module lists servers (address, then port), for the order-dependent
    // `hash` without `consistent`.
    let mut addrs: Vec<String> = backends.iter().map(|b| b.host_port()).collect();
    sort_by_port(&mut addrs);
    let ten: Vec<String> = backends[..10].iter().map(|b| b.host_port()).collect();
    let mut ten_sorted = ten.clone();
    sort_by_port(&mut ten_sorted);
    for a in &ten {
        consul.kv_put(&format!("upstreams/ring/{a}"), "");
        consul.kv_put(&format!("upstreams/modula/{a}"), "");
    }
    let synced = Nginx::start(&dir.subdir("synced"), synced_conf(&consul.http_addr()));
    wait_until("both upstreams to list 10 servers", Duration::from_secs(20), || {
        shown_count(&synced, "ring") == 10 && shown_count(&synced, "modula") == 10
    });
    let stock = Nginx::start(&dir.subdir("stock"), stock_conf(&ten_sorted));

    // 10 servers: every key on the same server as stock nginx.
    let ring10 = key_mapping(&synced, "/ring", KEYS);
    assert_eq!(differences(&ring10, &key_mapping(&stock, "/ring", KEYS)), 0, "consistent hash differs from stock nginx");
    let used: BTreeMap<&String, usize> = ring10.iter().fold(BTreeMap::new(), |mut m, b| {
        *m.entry(b).or_default() += 1;
        m
    });
    assert_eq!(used.len(), 10, "keys spread over {used:?}");
    assert_eq!(differences(&key_mapping(&synced, "/modula", 2000), &key_mapping(&stock, "/modula", 2000)), 0, "hash (modula) differs");

    // An 11th server: about 1/11 of the keys move, all to it; stock nginx with 11 agrees.
    let new = backends[10].host_port();
    consul.kv_put(&format!("upstreams/ring/{new}"), "");
    consul.kv_put(&format!("upstreams/modula/{new}"), "");
    wait_until("both upstreams to list 11 servers", Duration::from_secs(20), || {
        shown_count(&synced, "ring") == 11 && shown_count(&synced, "modula") == 11
    });
    let ring11 = key_mapping(&synced, "/ring", KEYS);
    let moved = differences(&ring10, &ring11);
    let fraction = moved as f64 / KEYS as f64;
    eprintln!("adding 1 server to 10 moved {moved} of {KEYS} keys ({:.2}%; 1/11 = 9.09%)", fraction * 100.0);
    assert!(fraction <= 1.0 / 11.0 + 0.03, "{fraction}");
    assert!(ring10.iter().zip(&ring11).filter(|(a, b)| a != b).all(|(_, b)| *b == "b10"), "a key moved between old servers");
    // A fresh stock nginx (after a reload, old workers may still answer the first requests).
    drop(stock);
    let stock = Nginx::start(&dir.subdir("stock11"), stock_conf(&addrs));
    assert_eq!(differences(&ring11, &key_mapping(&stock, "/ring", KEYS)), 0, "consistent hash differs from stock nginx at 11");
    assert_eq!(
        differences(&key_mapping(&synced, "/modula", 2000), &key_mapping(&stock, "/modula", 2000)),
        0,
        "hash (modula) differs at 11"
    );

    // Emptied (upsync_allow_empty on): 502 at once, never a division by zero.
    consul.kv_delete_tree("upstreams/ring/");
    consul.kv_delete_tree("upstreams/modula/");
    wait_until("both upstreams to empty", Duration::from_secs(20), || {
        shown_count(&synced, "ring") == 0 && shown_count(&synced, "modula") == 0
    });
    for path in ["/ring?k=a", "/modula?k=b"] {
        for _ in 0..20 {
            assert_eq!(http_get(&synced.url(path)).map(|r| r.0).ok(), Some(502), "{path}");
        }
    }
    assert!(synced.crashes().is_empty(), "{:?}", synced.crashes());
}

#[test]
fn upsync_lb_hash_needs_the_matching_hash_directive() {
    let dir = TestDir::new("module_hash_conf");
    let conf = |lines: &str| {
        NginxConf::new(&format!(
            "upstream u {{ server 127.0.0.1:9; upsync 127.0.0.1:8500/v1/kv/upstreams/u; {lines} }}
            server {{ listen 127.0.0.1:{{{{port}}}}; location / {{ proxy_pass http://u; }} }}"
        ))
    };
    let t = Nginx::test_config(dir.path(), &conf("upsync_lb hash_ketama;"));
    assert!(!t.ok && t.output.contains("needs nginx's \"hash KEY consistent;\""), "{}", t.output);
    let t = Nginx::test_config(dir.path(), &conf("upsync_lb hash_modula; hash $arg_k consistent;"));
    assert!(!t.ok && t.output.contains("without \"consistent\""), "{}", t.output);
    assert!(Nginx::test_config(dir.path(), &conf("upsync_lb hash_ketama; hash $arg_k consistent;")).ok);
    assert!(Nginx::test_config(dir.path(), &conf("hash $arg_k consistent;")).ok);
}
