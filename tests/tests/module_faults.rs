//! The nginx module under the faults operators meet: reloads that fail, a resolver that never
//! answers, a shared zone too small for a list, slots of old configurations, a watch that
//! cannot start. Each test reproduces the fault on real nginx + Consul 1.8.7 (module/README.md,
//! "Reliability").
use std::net::UdpSocket;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use std::time::{Duration, Instant};

use upsync_tests::backend::Backend;
use upsync_tests::consul::{Consul, ConsulOptions, ConsulTls};
use upsync_tests::net::{free_port, http_get};
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::proc::alive;
use upsync_tests::upsync::{all_ok, delete_server, http_block, put_server, show_json, wait_servers};
use upsync_tests::{wait_for, wait_until, TestDir};

fn leader_pid(nginx: &Nginx, upstream: &str) -> u32 {
    wait_for("a leader", Duration::from_secs(20), || {
        let pid = show_json(nginx, upstream)["sync"]["leader_pid"].as_u64().unwrap_or(0) as u32;
        (pid != 0 && nginx.active_worker_pids().contains(&pid)).then_some(pid)
    })
}

fn version(nginx: &Nginx, upstream: &str) -> u64 {
    show_json(nginx, upstream)["sync"]["version"].as_u64().unwrap_or(0)
}

fn signal(pid: u32, sig: &str) {
    // A worker of the nginx this test started.
    assert!(std::process::Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

/// After a reload that fails (at any step of nginx's cycle initialisation), the running workers
/// keep following Consul; a later good reload takes over as usual.
#[test]
fn a_failed_reload_changes_nothing() {
    let dir = TestDir::new("faults_failed_reload");
    let consul = Consul::start(dir.path());
    let b: Vec<Backend> = (0..5).map(|i| Backend::start(&format!("b{i}"))).collect();
    let good = NginxConf::new(&http_block("app", &consul.http_addr(), "", "keepalive 8;")).workers(2);
    let mut nginx = Nginx::start(dir.path(), good.clone());
    put_server(&consul, "app", &b[0].host_port(), "");
    wait_servers(&nginx, "app", &[&b[0].host_port()]);
    let leader = leader_pid(&nginx, "app");

    // A port nginx cannot bind: the reload fails after the zones were set up.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let port_taken = NginxConf { http: format!("{}\nserver {{ listen 127.0.0.1:{taken_port}; }}", good.http), ..good.clone() };
    // A file the new configuration needs is missing.
    let missing_file = NginxConf {
        http: format!(
            "{}\nserver {{ listen 127.0.0.1:{{{{port2}}}}; access_log {}/no/such/dir/access.log; }}",
            good.http,
            dir.path().display()
        ),
        ..good.clone()
    };
    // A new upstream with strong_dependency=on whose Consul is down: our own zone init fails.
    let dead_consul = format!("127.0.0.1:{}", free_port());
    let strong_down = NginxConf {
        http: format!(
            "{}\nupstream new {{ server 127.0.0.1:9; upsync {dead_consul}/v1/kv/upstreams/new strong_dependency=on upsync_timeout=30s; }}",
            good.http
        ),
        ..good.clone()
    };
    let cases = [
        ("listen port taken", port_taken, "Address already in use"),
        ("missing file", missing_file, "No such file"),
        ("strong_dependency=on with Consul down", strong_down, "strong_dependency=on"),
    ];
    for (i, (what, conf, needle)) in cases.into_iter().enumerate() {
        let log = nginx.reload_failing(conf);
        assert!(log.contains(needle), "{what}: the reload did not fail as expected:\n{log}");
        // A change in Consul still reaches traffic, as fast as before the failed reload.
        let v = version(&nginx, "app");
        let (old, new) = (&b[i], &b[i + 1]);
        let start = Instant::now();
        put_server(&consul, "app", &new.host_port(), "");
        delete_server(&consul, "app", &old.host_port());
        wait_servers(&nginx, "app", &[&new.host_port()]);
        eprintln!("{what}: change installed {:?} after the write", start.elapsed());
        assert!(version(&nginx, "app") > v, "{what}: the version did not move");
        let h = all_ok(&nginx.url("/"), 10);
        assert_eq!(h.get(&format!("b{}", i + 1)), Some(&10), "{what}: {h:?}");
        assert_eq!(leader_pid(&nginx, "app"), leader, "{what}: the lease moved");
    }
    drop(taken);

    // A good reload takes over: new workers lead and follow the next change.
    nginx.reload_with(good);
    // The old leader may read as active for a moment (it has not handled QUIT yet): wait for
    // the new configuration's leader rather than read the first one shown.
    wait_for("a new leader", Duration::from_secs(20), || {
        let pid = show_json(&nginx, "app")["sync"]["leader_pid"].as_u64().unwrap_or(0) as u32;
        (pid != 0 && pid != leader && nginx.active_worker_pids().contains(&pid)).then_some(pid)
    });
    put_server(&consul, "app", &b[4].host_port(), "");
    wait_servers(&nginx, "app", &[&b[3].host_port(), &b[4].host_port()]);
    assert!(!nginx.error_log().contains("[alert]"), "{}", nginx.error_log());
}

/// A UDP socket on a loopback address's port 53 that reads queries and never answers.
struct Blackhole {
    addr: std::net::SocketAddr,
    _socket: UdpSocket,
}

impl Blackhole {
    fn start() -> Blackhole {
        for i in 0..50u32 {
            let a = format!("127.53.{}.{}:53", (std::process::id() + i) % 250 + 1, i % 250 + 1);
            if let Ok(s) = UdpSocket::bind(&a) {
                return Blackhole { addr: s.local_addr().unwrap(), _socket: s };
            }
        }
        panic!("no free 127.53.x.y:53 for the never-answering resolver");
    }
}

/// Requests over new connections, one after the other, for `duration`; the slowest one.
fn slowest_request(url: &str, duration: Duration) -> Duration {
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    let mut n = 0;
    while start.elapsed() < duration {
        let t = Instant::now();
        let r = http_get(url);
        worst = worst.max(t.elapsed());
        assert!(matches!(r, Ok((200, _))), "request failed: {r:?}");
        n += 1;
    }
    eprintln!("{n} requests, slowest {worst:?}");
    worst
}

/// A hostname key whose resolver never answers: resolution runs on the poller thread with a
/// timeout, and stopping the poller never waits for it, so no worker's event loop blocks on
/// leader handover, reload or quit.
#[test]
fn a_resolver_that_never_answers_blocks_no_worker() {
    let dir = TestDir::new("faults_resolver");
    let consul = Consul::start(dir.path());
    let a = Backend::start("a");
    let hole = Blackhole::start();
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {}\noptions timeout:30 attempts:3\n", hole.addr.ip())).unwrap();
    // reuseport: every worker accepts its share of new connections, so a worker whose event
    // loop blocks shows up in the requests' latency.
    let http = http_block("app", &consul.http_addr(), "", "").replace("listen 127.0.0.1:{{port}};", "listen 127.0.0.1:{{port}} reuseport;");
    let mut nginx = Nginx::start(dir.path(), NginxConf::new(&http).workers(2).resolv_conf(&resolv));
    put_server(&consul, "app", &a.host_port(), "");
    put_server(&consul, "app", "upsync-never-resolves.example:80", "");
    wait_servers(&nginx, "app", &[&a.host_port()]);
    let normal = slowest_request(&nginx.url("/"), Duration::from_secs(1));

    // Leader handover: the leader stops past the lease timeout, another worker takes the
    // watches, and the old leader, resumed, gives its poller up without waiting for it.
    let leader = leader_pid(&nginx, "app");
    signal(leader, "-STOP");
    // (With reuseport, half of the new connections wait in the stopped worker's queue: ask
    // with a short timeout and retry.)
    let other = wait_for("another worker to take the lease", Duration::from_secs(15), || {
        let (_, body) =
            upsync_tests::net::http_request_timeout(&nginx.url("/show?upstream=app&format=json"), Duration::from_millis(300)).ok()?;
        let j: serde_json::Value = serde_json::from_str(&body).ok()?;
        let pid = j["upstreams"][0]["sync"]["leader_pid"].as_u64().unwrap_or(0) as u32;
        (pid != 0 && pid != leader).then_some(pid)
    });
    signal(leader, "-CONT");
    std::thread::sleep(Duration::from_millis(300));
    let during = slowest_request(&nginx.url("/"), Duration::from_secs(3));
    assert!(during < Duration::from_millis(500).max(normal * 5), "requests stalled after the handover to {other}: {during:?}");

    // Reload: the old workers stop their pollers and exit at once.
    let old = nginx.worker_pids();
    let start = Instant::now();
    nginx.reload();
    wait_until("the old workers to exit", Duration::from_secs(20), || old.iter().all(|p| !alive(*p)));
    let exit = start.elapsed();
    assert!(exit < Duration::from_secs(3), "old workers took {exit:?} to exit");
    wait_servers(&nginx, "app", &[&a.host_port()]);

    // Quit.
    let start = Instant::now();
    assert!(nginx.quit(Duration::from_secs(20)), "nginx did not exit");
    let quit = start.elapsed();
    eprintln!("quit took {quit:?}");
    assert!(quit < Duration::from_secs(1), "nginx -s quit took {quit:?}");
}

/// `count` KV entries for `upstream` in transactions of 64 (Consul's limit per transaction).
fn put_many(consul: &Consul, upstream: &str, addrs: &[String], value: &str) {
    for chunk in addrs.chunks(64) {
        let ops: Vec<serde_json::Value> = chunk
            .iter()
            .map(
                |a| serde_json::json!({"KV": {"Verb": "set", "Key": format!("upstreams/{upstream}/{a}"), "Value": STANDARD.encode(value)}}),
            )
            .collect();
        let (status, body) = consul.api("PUT", "/v1/txn", Some(serde_json::Value::Array(ops).to_string().as_bytes())).unwrap();
        assert_eq!(status, 200, "{body}");
    }
}

/// The workers' view of one upstream's server count, from every worker (JSON names the worker).
fn counts_by_worker(nginx: &Nginx, upstream: &str, workers: usize) -> std::collections::BTreeMap<u64, usize> {
    let mut m = std::collections::BTreeMap::new();
    for _ in 0..200 {
        let (_, body) = http_get(&nginx.url(&format!("/show?upstream={upstream}&format=json"))).unwrap();
        let j: serde_json::Value = serde_json::from_str(&body).unwrap();
        let n = j["upstreams"][0]["servers"].as_array().map(Vec::len).unwrap_or(0);
        m.insert(j["worker_pid"].as_u64().unwrap_or(0), n);
        if m.len() >= workers {
            break;
        }
    }
    assert_eq!(m.len(), workers, "not every worker answered: {m:?}");
    m
}

/// A list too big for the shared zone: the error is logged and shown, the last good list keeps
/// serving, and the version, every worker's peers and the dump file agree on it. When the list
/// fits again, syncing goes on.
#[test]
fn a_list_the_zone_cannot_hold_keeps_the_last_one_everywhere() {
    let dir = TestDir::new("faults_zone_full");
    let consul = Consul::start(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let dump = dir.join("app.dump");
    let http = http_block("app", &consul.http_addr(), "", &format!("upsync_dump_path {};", dump.display())).replacen(
        "upstream app",
        "upsync_shm_size 64k;\nupstream app",
        1,
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http).workers(2));
    put_server(&consul, "app", &a.host_port(), "");
    wait_servers(&nginx, "app", &[&a.host_port()]);
    wait_until("the dump file", Duration::from_secs(10), || std::fs::read_to_string(&dump).is_ok_and(|d| d.lines().count() == 1));

    // 6,000 more servers (marked down: no traffic goes there), written 64 at a time: the lists
    // grow until one no longer fits.
    let many: Vec<String> = (0..6000u32).map(|i| format!("127.77.{}.{}:1", i / 250, i % 250 + 1)).collect();
    put_many(&consul, "app", &many, r#"{"down":1}"#);
    wait_until("the zone-full error in upstream_show", Duration::from_secs(30), || {
        show_json(&nginx, "app")["sync"]["last_error"].as_str().is_some_and(|e| e.contains("no room"))
    });
    assert!(nginx.error_log().contains("raise upsync_shm_size"), "not logged");
    wait_until("the last answer", Duration::from_secs(30), || {
        consul.kv_index("upstreams/app") <= show_json(&nginx, "app")["sync"]["consul_index"].as_u64().unwrap_or(0)
    });
    let j = show_json(&nginx, "app");
    eprintln!("{}", j["sync"]);
    let installed = j["servers"].as_array().map(Vec::len).unwrap();
    assert!((2..6001).contains(&installed), "{installed} servers installed");
    // The version, every worker's peers and the dump file agree on that list.
    let v = j["sync"]["version"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(version(&nginx, "app"), v, "the version moved without a new list");
    for (pid, n) in counts_by_worker(&nginx, "app", 2) {
        assert_eq!(n, installed, "worker {pid} serves {n} servers, the zone holds {installed}");
    }
    wait_until("the dump file to match", Duration::from_secs(10), || {
        std::fs::read_to_string(&dump).is_ok_and(|d| d.lines().count() == installed)
    });
    assert_eq!(all_ok(&nginx.url("/"), 10).get("a"), Some(&10));

    // The list fits again: syncing goes on, the error clears, the dump follows.
    consul.kv_delete_tree("upstreams/app/127.77.");
    put_server(&consul, "app", &b.host_port(), "");
    let mut both = [a.host_port(), b.host_port()];
    both.sort();
    wait_servers(&nginx, "app", &[&both[0], &both[1]]);
    wait_until("the error to clear", Duration::from_secs(10), || show_json(&nginx, "app")["sync"]["last_error"].is_null());
    wait_until("the dump file", Duration::from_secs(10), || std::fs::read_to_string(&dump).is_ok_and(|d| d.lines().count() == 2));
    for (pid, n) in counts_by_worker(&nginx, "app", 2) {
        assert_eq!(n, 2, "worker {pid} serves {n} servers");
    }
}

/// Slots of configurations that no longer run are freed: 1,000 reloads, each syncing the
/// upstream from another KV path (a new slot each time, filled from a 40-server dump file),
/// never fill a 1m zone, and syncing works at the end.
#[test]
fn a_thousand_reloads_never_fill_the_zone() {
    let dir = TestDir::new("faults_slots");
    let consul = Consul::start(dir.path());
    let a = Backend::start("a");
    let dump = dir.join("app.dump");
    let lines: String = (0..40).map(|i| format!("server 127.78.0.{}:1 down;\n", i + 1)).collect();
    std::fs::write(&dump, lines).unwrap();
    // During the reloads the upstream syncs from a port where nothing listens: each reload
    // abandons the old leader's query, and Consul 1.8.7 would count each against its
    // per-client connection limit until the query's wait ends.
    let dead = format!("127.0.0.1:{}", free_port());
    let conf = |i: usize, consul: &str| {
        let block = http_block("app", consul, "", &format!("upsync_dump_path {};", dump.display()))
            .replace("/v1/kv/upstreams/app ", &format!("/v1/kv/upstreams/app{i} "))
            .replacen("upstream app", "upsync_shm_size 1m;\nupstream app", 1);
        NginxConf::new(&block).workers(1)
    };
    let mut nginx = Nginx::start(dir.path(), conf(0, &dead));
    let start = Instant::now();
    for i in 1..=1000 {
        nginx.reload_with(conf(i, &dead));
    }
    eprintln!("1,000 reloads in {:?}", start.elapsed());
    // One more, syncing from Consul.
    nginx.reload_with(conf(1001, &consul.http_addr()));
    consul.kv_put(&format!("upstreams/app1001/{}", a.host_port()), "");
    wait_until("the last configuration to sync", Duration::from_secs(20), || {
        show_json(&nginx, "app")["servers"].as_array().is_some_and(|s| s.len() == 1)
    });
    wait_until("the old workers to exit", Duration::from_secs(20), || nginx.worker_pids().len() == 1);
    assert_eq!(all_ok(&nginx.url("/"), 5).get("a"), Some(&5));
    let log = nginx.error_log();
    assert!(!log.contains("zone is full") && !log.contains("no room"), "{}", &log[log.len().saturating_sub(3000)..]);
    assert!(log.contains("freed"), "no slot was freed");
}

/// A watch that cannot start (its CA file moved away during a rotation) reports it, retries
/// with backoff and resumes by itself once the file is back.
#[test]
fn a_watch_that_cannot_start_retries_until_the_cause_is_fixed() {
    let dir = TestDir::new("faults_watch_start");
    let tls = ConsulTls::create(&dir.subdir("tls"));
    let https_port = free_port();
    let consul = Consul::start_with(dir.path(), ConsulOptions::default().with_https(&tls, https_port, false));
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let ca = dir.join("ca.pem");
    std::fs::copy(&tls.ca_file, &ca).unwrap();
    let http = http_block("app", &format!("https://127.0.0.1:{https_port}"), "", &format!("upsync_tls ca={};", ca.display()));
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http).workers(2));
    put_server(&consul, "app", &a.host_port(), "");
    wait_servers(&nginx, "app", &[&a.host_port()]);
    assert_eq!(show_json(&nginx, "app")["sync"]["watch"], "healthy");

    // The CA file disappears; the leader dies; the new leader cannot build its client.
    let moved = dir.join("ca.pem.rotating");
    std::fs::rename(&ca, &moved).unwrap();
    let leader = leader_pid(&nginx, "app");
    signal(leader, "-9");
    wait_until("the watch to report it cannot start", Duration::from_secs(20), || {
        let s = &show_json(&nginx, "app")["sync"];
        s["watch"] == "failing" && s["last_error"].as_str().is_some_and(|e| e.contains("cannot start the Consul watch"))
    });
    put_server(&consul, "app", &b.host_port(), "");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(show_json(&nginx, "app")["servers"].as_array().map(Vec::len), Some(1), "synced without a client?");

    // The file is back: the watch resumes by itself.
    std::fs::rename(&moved, &ca).unwrap();
    let start = Instant::now();
    let mut both = [a.host_port(), b.host_port()];
    both.sort();
    wait_servers(&nginx, "app", &[&both[0], &both[1]]);
    eprintln!("resumed {:?} after the CA file came back", start.elapsed());
    wait_until("the watch healthy", Duration::from_secs(10), || show_json(&nginx, "app")["sync"]["watch"] == "healthy");
}
