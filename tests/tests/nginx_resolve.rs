//! nginx's own `server NAME service=NAME resolve` (nginx >= 1.27.3) pointed at upsync-dns: a
//! supported way to follow Consul without the module. nginx 1.28 (`make build NGINX=1.28`,
//! stock: no module loaded) resolves `_web._tcp.service.upsync` SRV through upsync-dns and must
//! follow the service as it scales up and down, with the SRV weights upsync-dns derives from the
//! `weight=N` tags and the priority 2 it gives `backup` instances (nginx makes those backup
//! peers).
//!
//! Outside the `module_*` glob on purpose: it needs nginx 1.28 whatever `UPSYNC_NGINX` says, and
//! `make test` builds that nginx before running it.
use std::time::Duration;

use upsync_tests::backend::Backend;
use upsync_tests::consul::Consul;
use upsync_tests::dns::{wait_dig, DnsOptions, DnsServer};
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::upsync::hits;
use upsync_tests::{wait_until, TestDir};

fn register(consul: &Consul, b: &Backend, tags: &[&str]) {
    consul.register_service(&serde_json::json!({
        "ID": b.name, "Name": "web", "Address": "127.0.0.1", "Port": b.port(), "Tags": tags,
    }));
}

/// Waits until 30 requests in a row are all answered, by exactly the backends `names` (each at
/// least once).
fn wait_served_by(nginx: &Nginx, names: &[&str]) {
    let what = format!("nginx's resolve to spread requests over exactly {names:?}");
    wait_until(&what, Duration::from_secs(60), || {
        let h = hits(&nginx.url("/"), 30);
        h.len() == names.len() && names.iter().all(|n| h.contains_key(*n))
    });
}

#[test]
fn nginx_resolve_follows_scaling_through_upsync_dns_srv_records() {
    let dir = TestDir::new("nginx-resolve-upsync-dns");
    let consul = Consul::start(&dir.subdir("consul"));
    let dns = DnsServer::start(&dir.subdir("dns"), &consul.http_addr(), DnsOptions::default());
    let backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let (a, b, c) = (&backends[0], &backends[1], &backends[2]);
    register(&consul, a, &[]);

    // One worker: nginx's round robin is then deterministic (smooth weighted), so the weight
    // check below needs no statistics. `valid=1s`: re-resolve every 2 s whatever the TTL.
    let http = format!(
        "resolver 127.0.0.1:{} valid=1s ipv6=off;
         upstream web {{ zone web 256k; server service.upsync service=web resolve; }}
         server {{ listen 127.0.0.1:{{{{port}}}};
                   location / {{ proxy_pass http://web; proxy_next_upstream error timeout; }} }}",
        dns.port
    );
    let nginx = Nginx::start(&dir.subdir("nginx"), NginxConf::new(&http).without_module().nginx128().workers(1));
    let version = std::process::Command::new(upsync_tests::paths::nginx128_bin()).arg("-v").output().expect("nginx -v");
    eprintln!("{}", String::from_utf8_lossy(&version.stderr).trim());
    wait_served_by(&nginx, &["a"]);

    // Scale up to three instances, and back down to one.
    register(&consul, b, &[]);
    register(&consul, c, &[]);
    wait_served_by(&nginx, &["a", "b", "c"]);
    consul.deregister_service("b");
    consul.deregister_service("c");
    wait_served_by(&nginx, &["a"]);

    // Weights: upsync-dns puts the `weight=3` tag in the SRV weight, which nginx uses for a
    // `server` line without a weight of its own.
    register(&consul, b, &["weight=3"]);
    wait_served_by(&nginx, &["a", "b"]);
    let h = hits(&nginx.url("/"), 40);
    let on_b = h.get("b").copied().unwrap_or(0);
    assert!((28..=32).contains(&on_b), "weight 3 against 1 should give b about 30 of 40 requests: {h:?}");

    // Backup: SRV priority 2, which nginx makes a backup peer. Once nginx has seen c (it has
    // when b's removal, which comes after, shows), c gets nothing while a is up...
    register(&consul, c, &["backup"]);
    wait_dig(&dns, "c as an SRV record of priority 2", &["_web._tcp.service.upsync", "SRV"], |d| {
        d.data("SRV").iter().any(|r| r.starts_with("2 ") && r.contains(&format!(" {} ", c.port())))
    });
    consul.deregister_service("b");
    wait_served_by(&nginx, &["a"]);
    let h = hits(&nginx.url("/"), 40);
    assert_eq!(h.get("a"), Some(&40), "a backup instance must get no request while a primary is up: {h:?}");
    // ... and everything once the last primary is gone.
    consul.deregister_service("a");
    wait_served_by(&nginx, &["c"]);

    assert!(nginx.error_log().lines().all(|l| !l.contains("[emerg]")), "nginx errors:\n{}", nginx.error_log());
}
