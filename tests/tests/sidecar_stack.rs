//! The whole stack: wrk drives traffic through nginx, whose upsync module watches the KV prefix
//! the sidecar writes, to busybox httpd containers run by podman. The service is scaled
//! 2 → 6 → 2 while the traffic runs: no request may fail (no non-2xx answer, no socket error).
//! Scaling in relies on the drain: `podman stop` starts, the sidecar sees the container
//! stopping and marks it down, nginx stops sending it requests, and only then (at the end of the
//! stop timeout) does the container die. nginx does not retry failed requests on another
//! server here, so a request sent to a container that is gone would be counted.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use upsync_tests::consul::Consul;
use upsync_tests::net::{free_port, http_get};
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::podman::{Httpd, Net, Podman};
use upsync_tests::sidecar::{eventually, Sidecar, SidecarOpts};
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

/// What a run of wrk reported.
#[derive(Debug, Default, Clone, Copy)]
struct Wrk {
    requests: u64,
    non_2xx: u64,
    socket_errors: u64,
}

/// `wrk -t2 -c16 -d{secs}s URL`, its request count, non-2xx answers and socket errors.
fn wrk(url: &str, secs: u32) -> Wrk {
    let out = std::process::Command::new("wrk")
        .args(["-t2", "-c16", &format!("-d{secs}s"), url])
        .output()
        .expect("running wrk (installed by `make deps`)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut r = Wrk::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [n, "requests", "in", ..] => r.requests = n.parse().unwrap_or(0),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.non_2xx = n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                r.socket_errors = rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok()).sum()
            }
            _ => {}
        }
    }
    assert!(r.requests > 0, "wrk made no requests:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    r
}

#[test]
fn scaling_2_6_2_under_wrk_through_nginx_loses_no_request() {
    let dir = TestDir::new("sidecar_stack");
    let consul = Consul::start(dir.path());
    let podman = Podman::start(dir.path());
    let _sidecar = Sidecar::start(dir.path(), &consul.http_addr(), SidecarOpts::new("node-a", &podman.socket));
    // No retries on another server (`proxy_next_upstream off`): a request nginx sends to a
    // container that is gone fails. Only the drain can keep the count at zero.
    let nginx = Nginx::start(dir.path(), NginxConf::new(&nginx_block(&consul.http_addr())));

    // httpd ignores SIGTERM (PID 1): `podman stop` leaves it serving for its stop timeout.
    let containers: Vec<Httpd> = (0..6)
        .map(|i| {
            let port = free_port();
            Httpd::new(&format!("web-{i}"), Net::Host { port }).label(&format!("SERVICE_{port}_NAME"), "web").stop_timeout(5)
        })
        .collect();
    let addrs: Vec<String> = containers.iter().map(|c| c.host_port()).collect();
    let wait_answering = |c: &Httpd| {
        eventually(&format!("{} answering", c.name), || http_get(&format!("http://{}/", c.host_port())).is_ok_and(|(s, _)| s == 200))
    };
    for c in &containers[..2] {
        podman.run_httpd(c);
        wait_answering(c);
    }
    wait_servers(&nginx, "web", &[&addrs[0], &addrs[1]]);

    // Traffic for as long as the scaling takes, in rounds of wrk.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, url) = (stop.clone(), nginx.url("/"));
        std::thread::spawn(move || {
            let mut rounds = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                rounds.push(wrk(&url, 2));
            }
            rounds
        })
    };

    // Scale out to 6.
    for c in &containers[2..] {
        podman.run_httpd(c);
    }
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    wait_servers(&nginx, "web", &all);

    // Scale in to 2: four stops at once, each drained before its container dies.
    let stoppers: Vec<_> = containers[2..]
        .iter()
        .map(|c| {
            podman
                .command()
                .args(["stop", &c.name])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("podman stop")
        })
        .collect();
    for mut s in stoppers {
        let _ = s.wait();
    }
    wait_servers(&nginx, "web", &[&addrs[0], &addrs[1]]);
    stop.store(true, Ordering::Relaxed);
    let rounds = traffic.join().expect("traffic thread");

    let total = rounds.iter().fold(Wrk::default(), |a, r| Wrk {
        requests: a.requests + r.requests,
        non_2xx: a.non_2xx + r.non_2xx,
        socket_errors: a.socket_errors + r.socket_errors,
    });
    eprintln!("wrk: {} rounds, {total:?}", rounds.len());
    assert!(total.requests > 1000, "too little traffic to mean anything: {total:?}");
    assert_eq!((total.non_2xx, total.socket_errors), (0, 0), "requests failed while scaling: {rounds:?}");
    for c in &containers[2..] {
        assert_eq!(podman.state(&c.name).as_deref(), Some("exited"));
    }
}
