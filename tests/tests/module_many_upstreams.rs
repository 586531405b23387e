//! Many synced upstreams on one nginx over a handful of Consul connections (module/README.md,
//! "Many upstreams"), on real nginx + Consul 1.8.7: 1,000 KV and 200 health upstreams converge
//! and follow changes while nginx never holds more than `upsync_consul_connections` connections
//! to Consul and another client on the same address is never refused; 300 reloads in a minute
//! leave Consul serving everyone.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use upsync_tests::backend::Backend;
use upsync_tests::consul::Consul;
use upsync_tests::net::{connections_to, http_get, http_request_timeout};
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::{wait_until, TestDir};

fn register(consul: &Consul, name: &str, backend: &Backend) {
    consul.register_service(&serde_json::json!({
        "ID": name, "Name": name, "Address": "127.0.0.1", "Port": backend.port()
    }));
}

/// The nginx configuration: `kv` upstreams `app<i>` on `upstreams/app<i>`, `health` upstreams
/// `svc<i>` on the health of service `svc<i>`; `/?u=NAME` proxies to upstream NAME.
fn conf(consul: &str, kv: usize, health: usize, connections: usize, workers: usize) -> NginxConf {
    let mut http = format!("upsync_shm_size 32m;\nupsync_consul_connections {connections};\n");
    for i in 0..kv {
        http.push_str(&format!(
            "upstream app{i} {{ server 127.0.0.1:9; upsync {consul}/v1/kv/upstreams/app{i} upsync_timeout=30s upsync_interval=10ms; }}\n"
        ));
    }
    for i in 0..health {
        http.push_str(&format!(
            "upstream svc{i} {{ server 127.0.0.1:9; upsync {consul}/v1/health/service/svc{i} upsync_type=consul_health upsync_timeout=30s upsync_interval=10ms; }}\n"
        ));
    }
    http.push_str(
        "server {
            listen 127.0.0.1:{{port}};
            location / { proxy_pass http://$arg_u; proxy_next_upstream error timeout http_502; }
            location = /show { upstream_show; }
        }",
    );
    NginxConf::new(&http).workers(workers)
}

/// Every upstream's servers as `upstream_show` lists them.
fn shown(nginx: &Nginx) -> BTreeMap<String, Vec<String>> {
    let (status, body) = http_request_timeout(&nginx.url("/show?format=json"), Duration::from_secs(10)).expect("upstream_show");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("upstream_show JSON");
    v["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let mut servers: Vec<String> =
                u["servers"].as_array().unwrap().iter().filter_map(|s| s["server"].as_str().map(str::to_string)).collect();
            servers.sort();
            (u["name"].as_str().unwrap().to_string(), servers)
        })
        .collect()
}

/// Watches, until dropped, the connections nginx holds to Consul (the highest count seen) and
/// whether another client on the same address is ever refused or fails.
struct Watcher {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    probes: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(nginx_pids: impl Fn() -> Vec<u32> + Send + 'static, consul: &Consul) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let (peak, refused, probes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let port = consul.ports.http;
        let (s, p) = (stop.clone(), peak.clone());
        let counter = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(connections_to(&nginx_pids(), port), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let (s, r, n) = (stop.clone(), refused.clone(), probes.clone());
        let url = consul.url("/v1/status/leader");
        let prober = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match http_request_timeout(&url, Duration::from_secs(5)) {
                    Ok((200, _)) => {}
                    other => {
                        eprintln!("another Consul client failed: {other:?}");
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watcher { stop, peak, refused, probes, threads: vec![counter, prober] }
    }

    /// Stops; returns (peak connections, failed probes, probes).
    fn finish(mut self) -> (usize, usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (self.peak.load(Ordering::Relaxed), self.refused.load(Ordering::Relaxed), self.probes.load(Ordering::Relaxed))
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn nginx_pids(dir: &std::path::Path) -> impl Fn() -> Vec<u32> + Send + 'static {
    // The processes of the nginx this test started: its master and every descendant (workers
    // and the leader's poller process, which holds the Consul connections), read from /proc.
    let pid_file = dir.join("nginx.pid");
    move || {
        let Some(master) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok()) else { return Vec::new() };
        upsync_tests::proc::tree_of(master)
    }
}

#[test]
fn twelve_hundred_upstreams_follow_consul_over_four_connections() {
    const KV: usize = 1000;
    const HEALTH: usize = 200;
    let dir = TestDir::new("many_upstreams");
    let consul = Consul::start(dir.path());
    let backends: Vec<Backend> = (0..4).map(|i| Backend::start(&format!("b{i}"))).collect();
    // Upstream i starts on backend i % 4.
    let pairs: Vec<(String, String)> =
        (0..KV).map(|i| (format!("upstreams/app{i}/{}", backends[i % 4].host_port()), String::new())).collect();
    consul.kv_put_many(&pairs);
    for i in 0..HEALTH {
        register(&consul, &format!("svc{i}"), &backends[i % 4]);
    }
    let watcher_dir = dir.path().to_path_buf();
    let nginx = Nginx::start(dir.path(), conf(&consul.http_addr(), KV, HEALTH, 4, 4));
    let watcher = Watcher::start(nginx_pids(&watcher_dir), &consul);

    let started = Instant::now();
    let expected = |_: usize, b: &Backend| vec![b.host_port()];
    wait_until("all 1,200 upstreams to sync", Duration::from_secs(60), || {
        let s = shown(&nginx);
        (0..KV).all(|i| s.get(&format!("app{i}")) == Some(&expected(i, &backends[i % 4])))
            && (0..HEALTH).all(|i| s.get(&format!("svc{i}")) == Some(&expected(i, &backends[i % 4])))
    });
    eprintln!("all upstreams synced {:?} after nginx started", started.elapsed());

    // One change in each of 50 upstreams picked at random (40 KV, 10 health): each moves to
    // the next backend, and requests follow.
    // Spread over the whole range (397 is prime to both counts: no repeats).
    let picked: Vec<usize> = (0..40).map(|k| (k * 397 + 19) % KV).collect();
    let picked_health: Vec<usize> = (0..10).map(|k| (k * 397 + 19) % HEALTH).collect();
    let mut took = Vec::new();
    for &i in &picked {
        let (old, new) = (&backends[i % 4], &backends[(i + 1) % 4]);
        let t = Instant::now();
        consul.kv_put(&format!("upstreams/app{i}/{}", new.host_port()), "");
        consul.kv_delete(&format!("upstreams/app{i}/{}", old.host_port()));
        let url = nginx.url(&format!("/?u=app{i}"));
        let want = format!("b{}", (i + 1) % 4);
        wait_until(&format!("app{i} to move to {want}"), Duration::from_secs(20), || {
            (0..4).all(|_| http_get(&url).is_ok_and(|(s, body)| s == 200 && body == want))
        });
        took.push(t.elapsed());
    }
    for &i in &picked_health {
        let new = &backends[(i + 1) % 4];
        let t = Instant::now();
        register(&consul, &format!("svc{i}"), new);
        let url = nginx.url(&format!("/?u=svc{i}"));
        let want = format!("b{}", (i + 1) % 4);
        wait_until(&format!("svc{i} to move to {want}"), Duration::from_secs(20), || {
            (0..4).all(|_| http_get(&url).is_ok_and(|(s, body)| s == 200 && body == want))
        });
        took.push(t.elapsed());
    }
    took.sort();
    eprintln!("50 changes reached traffic: median {:?}, slowest {:?}", took[took.len() / 2], took[took.len() - 1]);
    // The upstreams not changed still list what they did.
    let s = shown(&nginx);
    for i in (0..KV).filter(|i| !picked.contains(i)) {
        assert_eq!(s[&format!("app{i}")], expected(i, &backends[i % 4]), "app{i}");
    }

    let (peak, refused, probes) = watcher.finish();
    eprintln!("nginx held at most {peak} connection(s) to Consul; another client's {probes} requests: {refused} failed");
    assert!(peak <= 4, "nginx held {peak} connections to Consul (upsync_consul_connections 4)");
    if peak == 0 {
        eprintln!("note: the sampler never saw nginx's connection to Consul (sampling every 20 ms under load)");
    }
    assert_eq!(refused, 0, "another client on the same address was refused or failed");
    assert!(probes > 10);
    assert!(nginx.crashes().is_empty(), "{:?}", nginx.crashes());
}

/// Reloads abandon the old leader's blocking queries, which Consul 1.8.7 counts against its
/// per-client connection limit (200) until their `wait` ends: 300 reloads in a minute must
/// neither cut nginx off Consul nor get another client on the same address refused.
#[test]
fn three_hundred_reloads_in_a_minute_leave_consul_serving_everyone() {
    // As many upstreams as connections: each keeps a query of its own, so every reload
    // abandons 4 (up to 26 s each with upsync_timeout=30s, without the wait's ramp).
    const KV: usize = 4;
    let dir = TestDir::new("many_reloads");
    let consul = Consul::start(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let pairs: Vec<(String, String)> = (0..KV).map(|i| (format!("upstreams/app{i}/{}", a.host_port()), String::new())).collect();
    consul.kv_put_many(&pairs);
    let c = conf(&consul.http_addr(), KV, 0, 4, 2);
    let mut nginx = Nginx::start(dir.path(), c.clone());
    wait_until("the upstreams to sync", Duration::from_secs(20), || {
        let s = shown(&nginx);
        (0..KV).all(|i| s.get(&format!("app{i}")) == Some(&vec![a.host_port()]))
    });
    let watcher = Watcher::start(nginx_pids(dir.path()), &consul);
    let start = Instant::now();
    for n in 0..300 {
        nginx.reload();
        // Spread over a minute.
        let due = start + Duration::from_millis(200 * (n + 1));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    eprintln!("300 reloads in {:?}", start.elapsed());
    // Syncing still works: a change reaches traffic.
    consul.kv_put(&format!("upstreams/app3/{}", b.host_port()), "");
    consul.kv_delete(&format!("upstreams/app3/{}", a.host_port()));
    let url = nginx.url("/?u=app3");
    wait_until("app3 to move to b", Duration::from_secs(20), || {
        (0..4).all(|_| http_get(&url).is_ok_and(|(s, body)| s == 200 && body == "b"))
    });
    let (peak, refused, probes) = watcher.finish();
    eprintln!("peak connections of the nginx processes to Consul: {peak}; another client's {probes} requests: {refused} failed");
    assert_eq!(refused, 0, "another client on the same address was refused or failed during the reloads");
    assert!(nginx.crashes().is_empty(), "{:?}", nginx.crashes());
}
