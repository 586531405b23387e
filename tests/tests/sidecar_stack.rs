//! The whole stack: wrk drives traffic through nginx, whose upsync module watches the KV prefix
//! the sidecar writes, to busybox httpd containers run by eng. The service is scaled
//! 2 → 6 → 2 while the traffic runs: no request may fail (no non-2xx answer, no socket error).
//! Scaling in relies on the drain: `docker stop` / `podman stop` starts, the sidecar sees the container
//! stopping and marks it down, nginx stops sending it requests, and only then (at the end of the
//! stop timeout) does the container die. nginx does not retry failed requests on another
//! server here, so a request sent to a container that is gone would be counted.
//! upsync-dns, fed by the same Consul, answers the service's SRV records and follows the scaling
//! (a draining container leaves the answers when the sidecar puts it in maintenance).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use upsync_tests::consul::Consul;
use upsync_tests::dns::{wait_dig, Dig, DnsOptions, DnsServer};
use upsync_tests::engine::{self, Kind};
use upsync_tests::load::{wrk, WrkReport};
use upsync_tests::net::{free_port, http_get};
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::podman::{Httpd, Net};
use upsync_tests::sidecar::{eventually, Sidecar};
use upsync_tests::upsync::wait_servers;
use upsync_tests::TestDir;

fn nginx_block(consul: &str) -> String {
    format!(
        "upstream web {{
            server 127.0.0.1:9;
            upsync {consul}/v1/kv/upstreams/web upsync_timeout=30s upsync_interval=10ms;
        }}
        server {{
            listen 127.0.0.1:{{{{port}}}};
            location / {{ proxy_pass http://web; proxy_next_upstream off; }}
            location = /show {{ upstream_show; }}
        }}"
    )
}

/// The ports of the SRV answer's records ("priority weight port target"), sorted.
fn srv_ports(d: &Dig) -> Vec<String> {
    let mut v: Vec<String> = d.data("SRV").iter().filter_map(|r| r.split_whitespace().nth(2).map(str::to_string)).collect();
    v.sort();
    v
}

/// Waits until upsync-dns answers the SRV of `web` with exactly the ports of `addrs`.
fn wait_srv(dns: &DnsServer, what: &str, addrs: &[String]) {
    let mut want: Vec<String> = addrs.iter().map(|a| a.rsplit(':').next().unwrap_or_default().to_string()).collect();
    want.sort();
    wait_dig(dns, what, &["web.service.upsync.", "SRV"], |d| srv_ports(d) == want);
}

upsync_tests::on_both_engines! {
    scaling_2_6_2_under_wrk_through_nginx_loses_no_request => scaling;
}

fn scaling(kind: Kind) {
    let dir = TestDir::new(&engine::dir_name("sidecar_stack", kind));
    let consul = Consul::start(dir.path());
    let eng = engine::start(kind, dir.path(), false);
    let _sidecar = Sidecar::start(dir.path(), &consul.http_addr(), eng.sidecar_opts("node-a"));
    // No retries on another server (`proxy_next_upstream off`): a request nginx sends to a
    // container that is gone fails. Only the drain can keep the count at zero.
    let nginx = Nginx::start(dir.path(), NginxConf::new(&nginx_block(&consul.http_addr())));
    let dns = DnsServer::start(dir.path(), &consul.http_addr(), DnsOptions::default());

    // httpd ignores SIGTERM (PID 1): `stop` leaves it serving for its stop timeout.
    let containers: Vec<Httpd> = (0..6)
        .map(|i| {
            let port = free_port();
            Httpd::new(&eng.unique(&format!("web-{i}")), Net::Host { port }).label(&format!("SERVICE_{port}_NAME"), "web").stop_timeout(5)
        })
        .collect();
    let addrs: Vec<String> = containers.iter().map(|c| c.host_port()).collect();
    let wait_answering = |c: &Httpd| {
        eventually(&format!("{} answering", c.name), || http_get(&format!("http://{}/", c.host_port())).is_ok_and(|(s, _)| s == 200))
    };
    for c in &containers[..2] {
        eng.run_httpd(c);
        wait_answering(c);
    }
    wait_servers(&nginx, "web", &[&addrs[0], &addrs[1]]);
    wait_srv(&dns, "SRV of the first 2 containers", &addrs[..2]);

    // Traffic for as long as the scaling takes, in rounds of wrk.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, url) = (stop.clone(), nginx.url("/"));
        std::thread::spawn(move || {
            let mut rounds = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                rounds.push(wrk(&url, 2, 16, Duration::from_secs(2)).expect("wrk through nginx"));
            }
            rounds
        })
    };

    // Scale out to 6.
    for c in &containers[2..] {
        eng.run_httpd(c);
    }
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    wait_servers(&nginx, "web", &all);
    wait_srv(&dns, "SRV of all 6 containers", &addrs);

    // Scale in to 2: four stops at once, each drained before its container dies.
    let stoppers: Vec<_> = containers[2..].iter().map(|c| eng.spawn_stop(&c.name)).collect();
    for mut s in stoppers {
        let _ = s.wait();
    }
    wait_servers(&nginx, "web", &[&addrs[0], &addrs[1]]);
    wait_srv(&dns, "SRV back to the first 2 containers", &addrs[..2]);
    stop.store(true, Ordering::Relaxed);
    let rounds = traffic.join().expect("traffic thread");

    let total = WrkReport::sum(&rounds);
    eprintln!(
        "wrk: {} rounds, {} requests, {} non-2xx, {} socket errors",
        rounds.len(),
        total.requests,
        total.non_2xx,
        total.socket_errors
    );
    assert!(total.requests > 1000, "too little traffic to mean anything: {total:?}");
    assert_eq!((total.non_2xx, total.socket_errors), (0, 0), "requests failed while scaling: {rounds:?}");
    for c in &containers[2..] {
        assert_eq!(eng.state(&c.name).as_deref(), Some("exited"));
    }
}
