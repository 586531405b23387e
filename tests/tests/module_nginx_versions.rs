//! What differs between the nginx lines the module is tested on (Debian's 1.22.1 and nginx.org's
//! 1.28, `make test-nginx128`), on real nginx + Consul 1.8.7:
//! - nginx >= 1.27.3 resolves `server NAME resolve;` itself: such a server in a synced upstream is
//!   refused by `nginx -t` with a clear message; an upstream of nginx's own `resolve` beside a
//!   synced one keeps following DNS while the module syncs the other;
//! - `zone` + `hash ... consistent` (nginx >= 1.27.3 builds no ring at configuration time there,
//!   and a new field moved the hash module's conf): keys map as on a stock nginx.
use std::process::Command;
use std::time::Duration;

use upsync_tests::backend::Backend;
use upsync_tests::consul::Consul;
use upsync_tests::net::http_get;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::paths::nginx_bin;
use upsync_tests::upsync::{key_mapping, shown_count, sort_by_port};
use upsync_tests::{wait_until, TestDir};

/// The version of the nginx under test as `1_028_003`.
fn nginx_version() -> u64 {
    let out = Command::new(nginx_bin()).arg("-v").output().expect("running nginx -v");
    let text = String::from_utf8_lossy(&out.stderr);
    let v = text.split("nginx/").nth(1).unwrap_or_else(|| panic!("no version in `nginx -v`: {text}"));
    let parts: Vec<u64> = v.split_whitespace().next().unwrap_or("").split('.').map(|p| p.parse().unwrap_or(0)).collect();
    assert_eq!(parts.len(), 3, "unexpected `nginx -v`: {text}");
    parts[0] * 1_000_000 + parts[1] * 1_000 + parts[2]
}

/// nginx with `server NAME resolve;` in upstreams.
fn has_upstream_resolve() -> bool {
    nginx_version() >= 1_027_003
}

#[test]
fn a_resolve_server_in_a_synced_upstream_fails_nginx_t() {
    let dir = TestDir::new("versions_resolve_refused");
    let conf = |server: &str| {
        NginxConf::new(&format!(
            "resolver 127.0.0.1:{{{{port1}}}};
             upstream app {{ zone app 64k; server 127.0.0.1:9; {server} upsync 127.0.0.1:8500/v1/kv/upstreams/app; }}
             server {{ listen 127.0.0.1:{{{{port}}}}; location / {{ proxy_pass http://app; }} }}"
        ))
    };
    let t = Nginx::test_config(&dir.subdir("resolve"), &conf("server localhost:9 resolve;"));
    assert!(!t.ok, "nginx -t accepted a resolve server in a synced upstream:\n{}", t.output);
    if has_upstream_resolve() {
        for want in ["[emerg]", "upstream \"app\"", "server \"localhost:9\" has \"resolve\"", "upstream without upsync"] {
            assert!(t.output.contains(want), "the message lacks {want:?}:\n{}", t.output);
        }
        let t = Nginx::test_config(&dir.subdir("service"), &conf("server web.service.consul service=http resolve;"));
        assert!(!t.ok && t.output.contains("has \"resolve\""), "{}", t.output);
    } else {
        // Before 1.27.3 nginx itself does not know the parameter.
        assert!(t.output.contains("invalid parameter \"resolve\""), "{}", t.output);
    }
    // The same upstream without `resolve` passes.
    let t = Nginx::test_config(&dir.subdir("plain"), &conf("server localhost:10;"));
    assert!(t.ok, "{}", t.output);
    // The same in a synced stream upstream (ngx_stream_upsync_module).
    let stream = NginxConf::new("").stream(
        "resolver 127.0.0.1:53;
         upstream app { zone app 64k; server 127.0.0.1:9; server localhost:9 resolve; upsync 127.0.0.1:8500/v1/kv/upstreams/app; }
         server { listen 127.0.0.1:{{port}}; proxy_pass app; }",
    );
    let t = Nginx::test_config(&dir.subdir("stream"), &stream);
    assert!(!t.ok, "nginx -t accepted a resolve server in a synced stream upstream:\n{}", t.output);
    let want = if has_upstream_resolve() { "server \"localhost:9\" has \"resolve\"" } else { "invalid parameter \"resolve\"" };
    assert!(t.output.contains(want), "the message lacks {want:?}:\n{}", t.output);
}

#[test]
fn nginx_resolve_beside_a_synced_upstream_keeps_following_dns() {
    if !has_upstream_resolve() {
        eprintln!("nginx {} has no `resolve` in upstreams: nothing to test", nginx_version());
        return;
    }
    let dir = TestDir::new("versions_resolve_beside");
    let consul = Consul::start(dir.path());
    // Two DNS-side backends on the same port of two loopback addresses: nginx's resolver
    // turns `web.service.consul` (one A record per instance) into one peer per address.
    let b_dns = Backend::start_on("dns1", "127.0.0.2:0".parse().unwrap());
    let port = b_dns.port();
    let _dns2 = Backend::start_on("dns2", format!("127.0.0.3:{port}").parse().unwrap());
    let b_app = Backend::start("app1");
    let b_app2 = Backend::start("app2");
    consul.register_service(&serde_json::json!({"ID": "web1", "Name": "web", "Address": "127.0.0.2", "Port": port}));
    consul.kv_put(&format!("upstreams/app/{}", b_app.host_port()), "");
    let conf = NginxConf::new(&format!(
        "resolver 127.0.0.1:{dns} valid=1s ipv6=off;
         upstream dns {{ zone dns 64k; server web.service.consul:{port} resolve; }}
         upstream app {{
             zone app 64k;
             server 127.0.0.1:9;
             upsync {consul}/v1/kv/upstreams/app upsync_timeout=30s upsync_interval=10ms;
         }}
         server {{
             listen 127.0.0.1:{{{{port}}}};
             location /dns {{ proxy_pass http://dns; }}
             location /app {{ proxy_pass http://app; }}
             location = /show {{ upstream_show; }}
         }}",
        dns = consul.ports.dns,
        consul = consul.http_addr(),
    ))
    .workers(2);
    let nginx = Nginx::start(&dir.subdir("nginx"), conf);
    let answers = |path: &str, n: usize| -> Vec<String> {
        (0..n)
            .map(|_| match http_get(&nginx.url(path)) {
                Ok((200, body)) => body,
                other => format!("{other:?}"),
            })
            .collect()
    };
    wait_until("the synced upstream to list app1", Duration::from_secs(20), || shown_count(&nginx, "app") == 1);
    wait_until("nginx's resolve to reach dns1", Duration::from_secs(20), || answers("/dns", 4).iter().all(|b| b == "dns1"));
    assert!(answers("/app", 10).iter().all(|b| b == "app1"));

    // A change on each side: the module syncs app, nginx's resolver follows dns; neither sees
    // the other's servers.
    consul.kv_put(&format!("upstreams/app/{}", b_app2.host_port()), "");
    consul.register_service(&serde_json::json!({"ID": "web2", "Name": "web", "Address": "127.0.0.3", "Port": port}));
    wait_until("the synced upstream to list app1 and app2", Duration::from_secs(20), || shown_count(&nginx, "app") == 2);
    wait_until("nginx's resolve to use dns1 and dns2", Duration::from_secs(30), || {
        let a = answers("/dns", 20);
        a.iter().any(|b| b == "dns1") && a.iter().any(|b| b == "dns2") && a.iter().all(|b| b.starts_with("dns"))
    });
    let a = answers("/app", 20);
    assert!(a.iter().all(|b| b == "app1" || b == "app2") && a.iter().any(|b| b == "app2"), "{a:?}");
    // And back down on the DNS side.
    consul.deregister_service("web1");
    wait_until("nginx's resolve to drop dns1", Duration::from_secs(30), || answers("/dns", 20).iter().all(|b| b == "dns2"));
    let a = answers("/app", 20);
    assert!(a.iter().all(|b| b == "app1" || b == "app2"), "{a:?}");
    assert!(nginx.crashes().is_empty(), "{:?}", nginx.crashes());
}

fn hash_blocks(ring_lines: &str, modula_lines: &str) -> String {
    let show = if ring_lines.contains("upsync") { "location = /show { upstream_show; }" } else { "" };
    format!(
        "upstream ring {{ zone ring 256k; hash $arg_k consistent; {ring_lines} }}
         upstream modula {{ zone modula 256k; hash $arg_k; {modula_lines} }}
         server {{
             listen 127.0.0.1:{{{{port}}}};
             location /ring {{ proxy_pass http://ring; proxy_next_upstream off; }}
             location /modula {{ proxy_pass http://modula; proxy_next_upstream off; }}
             {show}
         }}"
    )
}

#[test]
fn zone_and_hash_in_a_synced_upstream_map_keys_as_stock_nginx() {
    let dir = TestDir::new("versions_zone_hash");
    let consul = Consul::start(dir.path());
    let backends: Vec<Backend> = (0..4).map(|i| Backend::start(&format!("b{i}"))).collect();
    let mut addrs: Vec<String> = backends.iter().map(|b| b.host_port()).collect();
    // The module's peer order (by address, then port), for the order-dependent plain `hash`.
    sort_by_port(&mut addrs);
    for a in &addrs[..3] {
        consul.kv_put(&format!("upstreams/ring/{a}"), "");
        consul.kv_put(&format!("upstreams/modula/{a}"), "");
    }
    let c = consul.http_addr();
    let synced = Nginx::start(
        &dir.subdir("synced"),
        NginxConf::new(&hash_blocks(
            // Without upsync_lb: nothing tells the module that this `hash` is consistent.
            &format!("server 127.0.0.1:9; upsync {c}/v1/kv/upstreams/ring upsync_timeout=30s upsync_interval=10ms;"),
            &format!(
                "server 127.0.0.1:9; upsync {c}/v1/kv/upstreams/modula upsync_timeout=30s upsync_interval=10ms; upsync_lb hash_modula;"
            ),
        ))
        .workers(2),
    );
    // upsync_lb hash_ketama with `zone` + `hash ... consistent` passes nginx -t on every line.
    let t = Nginx::test_config(
        &dir.subdir("ketama"),
        &NginxConf::new(&hash_blocks(
            &format!("server 127.0.0.1:9; upsync {c}/v1/kv/upstreams/ring; upsync_lb hash_ketama;"),
            "server 127.0.0.1:9;",
        )),
    );
    assert!(t.ok, "{}", t.output);
    let stock = |name: &str, servers: &[String]| {
        let lines: String = servers.iter().map(|s| format!("server {s}; ")).collect();
        Nginx::start(&dir.subdir(name), NginxConf::new(&hash_blocks(&lines, &lines)).workers(2).without_module())
    };
    for (n, name) in [(3usize, "stock3"), (4, "stock4")] {
        if n == 4 {
            consul.kv_put(&format!("upstreams/ring/{}", addrs[3]), "");
            consul.kv_put(&format!("upstreams/modula/{}", addrs[3]), "");
        }
        wait_until(&format!("both upstreams to list {n} servers"), Duration::from_secs(20), || {
            shown_count(&synced, "ring") == n && shown_count(&synced, "modula") == n
        });
        let reference = stock(name, &addrs[..n]);
        let ring = key_mapping(&synced, "/ring", 2000);
        let spread: std::collections::BTreeSet<&String> = ring.iter().collect();
        assert_eq!(spread.len(), n, "keys spread over {spread:?}");
        let d = ring.iter().zip(key_mapping(&reference, "/ring", 2000)).filter(|(a, b)| *a != b).count();
        assert_eq!(d, 0, "consistent hash with zone differs from stock nginx at {n} servers");
        let d =
            key_mapping(&synced, "/modula", 1000).into_iter().zip(key_mapping(&reference, "/modula", 1000)).filter(|(a, b)| a != b).count();
        assert_eq!(d, 0, "hash with zone differs from stock nginx at {n} servers");
    }
    assert!(synced.crashes().is_empty(), "{:?}", synced.crashes());
}
