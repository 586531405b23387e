//! Several hosts, one cut off: the whole system on a topology of real hosts (network namespaces
//! joined by a bridge, `tests/src/hosts.rs`):
//!
//! - `s1`, `s2`, `s3`: the three servers of a Consul 1.8.7 cluster;
//! - `a1`, `a2`: application hosts, each with a Consul client agent, an `upsync-sidecar`
//!   (scheduler API, no container engine) and two HTTP backends the sidecar registers as
//!   service `web` with an HTTP check;
//! - `ng`: nginx with the module (`upsync_type=consul_health health=omit`, the three servers'
//!   addresses) and `upsync-dns` (the same three addresses), and the load generator (wrk).
//!
//! Each test builds its own topology (the tests of this file run one at a time: each runs six
//! Consul agents and the load on a 2-core machine) and prints the figures it measured
//! (README, *Scenarios*). Timings are reported, never asserted: the assertions are that nothing
//! failed that must not fail, that every change arrived, and that every list converged.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use upsync_tests::backend::Backend;
use upsync_tests::consul::{ClusterMember, Consul, ConsulOptions, ConsulPorts};
use upsync_tests::dns::{Dig, DnsOptions, DnsServer};
use upsync_tests::hosts::{tcp_peers, Host, Topology};
use upsync_tests::load::{wrk_with, WrkReport};
use upsync_tests::net::http_get;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::sidecar::{Sidecar, SidecarOpts};
use upsync_tests::upsync::{show_json, shown_servers};
use upsync_tests::{wait_for, wait_until, TestDir};

/// Bound of every wait: only a hang trips it.
const LONG: Duration = Duration::from_secs(120);

/// One topology at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The whole site. Fields are dropped in declaration order: processes first, then the hosts'
/// namespaces, then the directory.
struct Site {
    nginx: Nginx,
    dns: DnsServer,
    sidecars: Vec<Sidecar>,
    /// Backends of `a1` and `a2`, by app host.
    backends: Vec<Vec<Backend>>,
    _clients: Vec<Consul>,
    servers: Vec<Consul>,
    server_hosts: Vec<Host>,
    app_hosts: Vec<Host>,
    ng: Host,
    topo: Topology,
    _dir: TestDir,
}

fn nginx_http(servers: &str) -> String {
    format!(
        "upstream web {{
            server 127.0.0.1:9;
            upsync {servers}/v1/health/service/web upsync_type=consul_health health=omit upsync_interval=50ms;
        }}
        proxy_connect_timeout 1s;
        proxy_read_timeout 2s;
        server {{
            listen 127.0.0.1:{{{{port}}}} reuseport;
            location /on/ {{ proxy_pass http://web; proxy_next_upstream error timeout http_502 http_504; }}
            location /off/ {{ proxy_pass http://web; proxy_next_upstream off; }}
            location = /show {{ upstream_show; }}
        }}"
    )
}

/// HCL every agent gets: `UPSYNC_SCENARIO_AGENT_HCL` (e.g. a `gossip_lan { ... }` block to
/// measure tuned failure detection), none by default (Consul's defaults).
fn agent_hcl() -> Vec<String> {
    std::env::var("UPSYNC_SCENARIO_AGENT_HCL").ok().filter(|h| !h.trim().is_empty()).into_iter().collect()
}

impl Site {
    fn start(name: &str) -> Site {
        let dir = TestDir::new(name);
        let mut topo = Topology::new();
        let server_hosts: Vec<Host> = (1..=3).map(|i| topo.add_host(&format!("s{i}"), 10 + i)).collect();
        let app_hosts: Vec<Host> = (1..=2).map(|i| topo.add_host(&format!("a{i}"), 20 + i)).collect();
        let ng = topo.add_host("ng", 30);

        // Three servers, each joining the two others. raft_multiplier = 1 is Consul's
        // recommendation for production servers (the default, 5, is for development machines).
        let ports: Vec<ConsulPorts> = (0..3).map(|_| ConsulPorts::fresh()).collect();
        let serf: Vec<String> = server_hosts.iter().zip(&ports).map(|(h, p)| h.addr(p.serf_lan)).collect();
        let servers: Vec<Consul> = server_hosts
            .iter()
            .zip(ports)
            .enumerate()
            .map(|(i, (h, p))| {
                let opts = ConsulOptions {
                    node_name: Some(h.name.clone()),
                    bind: Some(h.ip.to_string()),
                    client: Some("0.0.0.0".into()),
                    cluster: Some(ClusterMember {
                        bootstrap_expect: 3,
                        join: serf.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, s)| s.clone()).collect(),
                        server: true,
                    }),
                    extra_hcl: [vec!["performance { raft_multiplier = 1 }".to_string()], agent_hcl()].concat(),
                    ..Default::default()
                };
                let d = dir.join(&h.name);
                h.run(|| Consul::spawn_with(&d, opts, p))
            })
            .collect();
        for (h, s) in server_hosts.iter().zip(&servers) {
            h.run(|| s.wait_ready(LONG)).unwrap_or_else(|e| panic!("Consul server on {}: {e}", h.name));
        }
        let clients: Vec<Consul> = app_hosts
            .iter()
            .map(|h| {
                let opts = ConsulOptions {
                    node_name: Some(h.name.clone()),
                    bind: Some(h.ip.to_string()),
                    client: Some("0.0.0.0".into()),
                    cluster: Some(ClusterMember { bootstrap_expect: 0, join: serf.clone(), server: false }),
                    extra_hcl: agent_hcl(),
                    ..Default::default()
                };
                let d = dir.join(&h.name);
                let c = h.run(|| Consul::spawn_with(&d, opts, ConsulPorts::fresh()));
                h.run(|| c.wait_ready(LONG)).unwrap_or_else(|e| panic!("Consul client agent on {}: {e}", h.name));
                c
            })
            .collect();

        let backends: Vec<Vec<Backend>> = app_hosts
            .iter()
            .map(|h| (0..2).map(|i| h.run(|| Backend::start_on(&format!("{}-{i}", h.name), (h.ip, 0).into()))).collect())
            .collect();
        let sidecars: Vec<Sidecar> = app_hosts
            .iter()
            .zip(&clients)
            .map(|(h, c)| {
                let opts = SidecarOpts::new(&h.name, &dir.join("no-engine.sock")).arg("--no-engine");
                h.run(|| Sidecar::start(dir.path(), &c.http_addr(), opts))
            })
            .collect();
        let consul_addrs: Vec<String> = servers.iter().map(Consul::bind_http_addr).collect();
        let nginx = ng.run(|| Nginx::start(&dir.join("nginx"), NginxConf::new(&nginx_http(&consul_addrs.join(","))).workers(2)));
        let dns_conf = "[consul]\nwait = \"5s\"\nrequest_timeout = \"3s\"\nconnect_timeout = \"1s\"\n".to_string();
        let dns =
            ng.run(|| DnsServer::start(dir.path(), &consul_addrs.join(","), DnsOptions { config: Some(dns_conf), ..Default::default() }));
        let site = Site { nginx, dns, sidecars, backends, _clients: clients, servers, server_hosts, app_hosts, ng, topo, _dir: dir };
        for (h, bs) in site.backends.iter().enumerate() {
            for b in bs {
                site.register(h, &b.name, b.port());
            }
        }
        site.wait_lists("every backend listed at start", &site.all_backends(), Instant::now());
        site
    }

    /// Registers `IP:port` of app host `h` as endpoint `id` of `web` through its sidecar.
    fn register(&self, h: usize, id: &str, port: u16) {
        let body =
            serde_json::json!({ "address": self.app_hosts[h].ip.to_string(), "port": port, "check": { "http": "/", "interval": "1s" } });
        let (status, text) =
            self.app_hosts[h].run(|| self.sidecars[h].api("PUT", &format!("/v1/endpoints/web/{id}"), Some(&body.to_string())));
        assert!((200..300).contains(&status), "registering {id} on {}: HTTP {status}: {text}", self.app_hosts[h].name);
    }

    /// Removes endpoint `id` of app host `h` (no drain: the scenario tests use the lists, not
    /// the traffic, after a removal).
    fn deregister(&self, h: usize, id: &str) {
        let (status, text) = self.app_hosts[h].run(|| self.sidecars[h].api("DELETE", &format!("/v1/endpoints/web/{id}?drain=0s"), None));
        assert!((200..300).contains(&status), "removing {id} on {}: HTTP {status}: {text}", self.app_hosts[h].name);
    }

    fn all_backends(&self) -> Vec<String> {
        let mut v: Vec<String> = self.backends.iter().flatten().map(|b| b.addr.to_string()).collect();
        v.sort();
        v
    }

    fn backends_of(&self, h: usize) -> Vec<String> {
        self.backends[h].iter().map(|b| b.addr.to_string()).collect()
    }

    /// The servers nginx lists for `web` (the answering worker's view).
    fn nginx_list(&self) -> Vec<String> {
        self.ng.run(|| shown_servers(&self.nginx, "web"))
    }

    /// The `IP:PORT` of upsync-dns's SRV answer for `web`, sorted.
    fn dns_list(&self) -> Vec<String> {
        self.ng.run(|| srv_addrs(&self.dns.dig(&["web.service.upsync.", "SRV"])))
    }

    /// Waits until nginx and upsync-dns both list exactly `want`; the time from `since` until
    /// each did.
    fn wait_lists(&self, what: &str, want: &[String], since: Instant) -> (Duration, Duration) {
        let mut want = want.to_vec();
        want.sort();
        let start = since;
        let (mut t_nginx, mut t_dns) = (None, None);
        while t_nginx.is_none() || t_dns.is_none() {
            if t_nginx.is_none() && self.nginx_list() == want {
                t_nginx = Some(start.elapsed());
            }
            if t_dns.is_none() && self.dns_list() == want {
                t_dns = Some(start.elapsed());
            }
            assert!(
                start.elapsed() < LONG,
                "{what}: after {LONG:?} nginx lists {:?}, upsync-dns {:?}, want {want:?}",
                self.nginx_list(),
                self.dns_list()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        (t_nginx.unwrap_or_default(), t_dns.unwrap_or_default())
    }

    /// The PID of the worker holding the module's Consul watches.
    fn leader_worker(&self) -> u32 {
        wait_for("a leader worker", LONG, || {
            let pid = self.ng.run(|| show_json(&self.nginx, "web"))["sync"]["leader_pid"].as_u64().unwrap_or(0) as u32;
            (pid != 0 && self.nginx.active_worker_pids().contains(&pid)).then_some(pid)
        })
    }

    /// The Consul poller process of the leader worker `leader` (it holds the module's Consul
    /// connections).
    fn poller_of(&self, leader: u32) -> u32 {
        wait_for("the leader's poller process", LONG, || self.nginx.poller_pids().into_iter().find(|&(w, _)| w == leader).map(|(_, p)| p))
    }

    /// Indexes of the Consul servers `pid` holds connections to (their HTTP API).
    fn servers_used_by(&self, pid: u32) -> Vec<usize> {
        let peers = tcp_peers(pid);
        (0..self.servers.len()).filter(|&i| peers.contains(&self.servers[i].bind_http_addr())).collect()
    }

    /// Waits until every server reports a healthy cluster (autopilot: every server alive,
    /// in contact with the leader and caught up), as operators check between restarts.
    fn wait_cluster_healthy(&self, what: &str) {
        wait_until(what, LONG, || {
            self.server_hosts.iter().zip(&self.servers).all(|(h, s)| {
                h.run(|| s.api("GET", "/v1/operator/autopilot/health", None))
                    .ok()
                    .and_then(|(st, b)| (st == 200).then(|| serde_json::from_str::<serde_json::Value>(&b).ok()).flatten())
                    .is_some_and(|v| v["Healthy"] == true && v["Servers"].as_array().is_some_and(|a| a.len() == 3))
            })
        });
    }

    /// The list each nginx worker serves, by worker PID (reuseport spreads the connections
    /// over the workers; asks until every active worker has answered).
    fn lists_by_worker(&self) -> BTreeMap<u64, Vec<String>> {
        let workers = self.nginx.active_worker_pids();
        let url = self.ng.run(|| self.nginx.url("/show?upstream=web&format=json"));
        let mut m = BTreeMap::new();
        self.ng.run(|| {
            for _ in 0..500 {
                let (_, body) = http_get(&url).expect("upstream_show");
                let j: serde_json::Value = serde_json::from_str(&body).expect("upstream_show JSON");
                let mut list: Vec<String> = j["upstreams"][0]["servers"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|s| s["server"].as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                list.sort();
                m.insert(j["worker_pid"].as_u64().unwrap_or(0), list);
                if workers.iter().all(|w| m.contains_key(&(*w as u64))) {
                    break;
                }
            }
        });
        assert!(workers.iter().all(|w| m.contains_key(&(*w as u64))), "not every worker answered: {m:?} (workers {workers:?})");
        m
    }
}

/// `IP:PORT` of SRV records (`priority weight port a-b-c-d.addr.ZONE`), sorted.
fn srv_addrs(d: &Dig) -> Vec<String> {
    let mut v: Vec<String> = d
        .data("SRV")
        .iter()
        .filter_map(|r| {
            let f: Vec<&str> = r.split_whitespace().collect();
            let ip = f.get(3)?.split('.').next()?.replace('-', ".");
            Some(format!("{ip}:{}", f.get(2)?))
        })
        .collect();
    v.sort();
    v
}

/// wrk in rounds against `path` on nginx (from the nginx host) until `stop`.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<(String, std::thread::JoinHandle<Vec<WrkReport>>)>,
}

impl Load {
    fn start(site: &Site, paths: &[&str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = paths
            .iter()
            .map(|p| {
                let url = site.ng.run(|| site.nginx.url(p));
                let stop = stop.clone();
                let t = site.ng.spawn(move || {
                    let mut rounds = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        rounds.push(wrk_with(&url, 1, 8, Duration::from_secs(2), &["--timeout", "10s"]).expect("wrk through nginx"));
                    }
                    rounds
                });
                (p.to_string(), t)
            })
            .collect();
        // At least one round has begun on every path before the scenario starts.
        std::thread::sleep(Duration::from_millis(300));
        Load { stop, threads }
    }

    /// Stops and sums the rounds, per path.
    fn finish(mut self) -> BTreeMap<String, WrkReport> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut self.threads).into_iter().map(|(p, t)| (p, WrkReport::sum(&t.join().expect("load thread")))).collect()
    }
}

impl Drop for Load {
    /// A test that fails with the load running stops it (after the round under way).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `PATH N (F failed), ...` of a load's report.
fn describe(report: &BTreeMap<String, WrkReport>) -> String {
    report.iter().map(|(p, r)| format!("{p} {} ({} failed)", r.requests, r.failed())).collect::<Vec<_>>().join(", ")
}

/// Asserts that every path had traffic and none of it failed `during` the scenario.
fn assert_none_failed(report: &BTreeMap<String, WrkReport>, during: &str) {
    for (p, r) in report {
        assert!(r.requests > 100, "too little traffic on {p} to mean anything: {r:?}");
        assert_eq!(r.failed(), 0, "requests failed on {p} {during}: {r:?}");
    }
}

/// Names of the interfaces of the test process's own network namespace.
fn own_interfaces() -> Vec<String> {
    let out = std::process::Command::new("ip").args(["-o", "link", "show"]).output().expect("ip link");
    let mut v: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split(": ").nth(1).map(|n| n.to_string())).collect();
    v.sort();
    v
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// The harness itself: hosts reach each other and a cut host is unreachable until healed;
/// processes started in a host run in its namespace and outlive the thread that started them;
/// the machine's own namespace gets no interface; every namespace goes when the topology is
/// dropped, also during a panic.
#[test]
fn the_topology_links_its_hosts_only_and_is_removed_even_after_a_panic() {
    use std::os::unix::fs::MetadataExt;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TestDir::new("scenario_topology");
    let before = own_interfaces();
    let mut topo = Topology::new();
    let (h1, h2) = (topo.add_host("h1", 41), topo.add_host("h2", 42));
    assert_eq!(own_interfaces(), before, "the topology added interfaces to the machine's namespace");

    let b = h1.run(|| Backend::start_on("h1", (h1.ip, 0).into()));
    let url = format!("http://{}/", b.addr);
    assert_eq!(h2.run(|| http_get(&url)).expect("h2 reaches h1"), (200, "h1".to_string()));
    let connects = || h2.run(|| std::net::TcpStream::connect_timeout(&b.addr, Duration::from_secs(1)).is_ok());
    topo.cut(&h1);
    assert!(!connects(), "h1 still reachable after the cut");
    topo.heal(&h1);
    wait_until("h1 reachable again after the heal", LONG, connects);

    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("600");
    let p = h1.run(|| upsync_tests::proc::Proc::spawn("sleep", cmd, &dir.join("sleep.log")).expect("sleep in h1"));
    let ns_of = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).map(|l| l.to_string_lossy().into_owned()).unwrap_or_default();
    let h1_ns = std::fs::metadata(std::path::Path::new("/run/netns").join(&h1.netns)).expect("h1's namespace").ino();
    // (`ip netns exec` joins the namespace, then execs the program: wait for it to have done so.)
    wait_until("the process started in h1 to run in h1's namespace", LONG, || ns_of(p.pid()) == format!("net:[{h1_ns}]"));
    // The thread that started it has ended: a death signal tied to it would have fired by now.
    std::thread::sleep(Duration::from_millis(300));
    assert!(upsync_tests::proc::alive(p.pid()), "the process died with the thread that started it");
    drop(p);
    drop(b);
    let names = [h1.netns.clone(), h2.netns.clone()];
    drop(topo);
    assert!(names.iter().all(|n| !netns_exists(n)), "namespaces left after the drop: {names:?}");

    let made = Mutex::new(String::new());
    let r = std::panic::catch_unwind(|| {
        let mut t = Topology::new();
        *made.lock().unwrap() = t.add_host("h3", 43).netns;
        panic!("a test failing with its topology up");
    });
    assert!(r.is_err());
    let name = made.into_inner().unwrap();
    assert!(!name.is_empty() && !netns_exists(&name), "namespace {name} left after a panic");
    assert_eq!(own_interfaces(), before);
}

#[test]
fn an_application_host_cut_off_leaves_nginx_and_dns_and_comes_back_when_healed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let site = Site::start("scenario_cut_app_host");
    let workers = site.nginx.active_worker_pids();
    let load = Load::start(&site, &["/on/", "/off/"]);

    let cut = 1;
    let remaining = site.backends_of(0);
    let t_cut = Instant::now();
    site.topo.cut(&site.app_hosts[cut]);
    let (gone_nginx, gone_dns) = site.wait_lists("the cut host's endpoints to leave", &remaining, t_cut);
    let t_heal = Instant::now();
    site.topo.heal(&site.app_hosts[cut]);
    let (back_nginx, back_dns) = site.wait_lists("the healed host's endpoints to come back", &site.all_backends(), t_heal);
    let report = load.finish();

    let (on, off) = (&report["/on/"], &report["/off/"]);
    eprintln!(
        "SCENARIO cut-app-host: endpoints gone from nginx {:.1} s, from upsync-dns {:.1} s after the cut; back in nginx {:.1} s, \
         upsync-dns {:.1} s after the heal; proxy_next_upstream on: {} requests, {} failed; off: {} requests, {} failed \
         ({} non-2xx, {} socket errors)",
        gone_nginx.as_secs_f64(),
        gone_dns.as_secs_f64(),
        back_nginx.as_secs_f64(),
        back_dns.as_secs_f64(),
        on.requests,
        on.failed(),
        off.requests,
        off.failed(),
        off.non_2xx,
        off.socket_errors
    );
    assert!(on.requests > 100 && off.requests > 100, "too little traffic to mean anything: {report:?}");
    assert_eq!(on.failed(), 0, "requests failed with proxy_next_upstream on: {on:?}");
    // No restart: the same workers serve the whole time.
    let mut after = site.nginx.active_worker_pids();
    after.sort();
    let mut before = workers;
    before.sort();
    assert_eq!(after, before, "nginx's workers changed");
}

#[test]
fn the_consul_server_in_use_cut_off_fails_over_and_changes_keep_arriving() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let site = Site::start("scenario_cut_consul_server");
    let poller = site.poller_of(site.leader_worker());
    // A watch's `wait` grows with its age (up to 15/17 of upsync_timeout, here the default 6m),
    // and the request's own bound is wait x 17/16 + 10 s: 30 s into the poller's life that is
    // 42 s, so what ends the query on the cut server is TCP keepalive (HALF_OPEN_BOUND).
    std::thread::sleep(Duration::from_secs(30));
    let used = wait_for("the module's connection to a Consul server", LONG, || site.servers_used_by(poller).first().copied());
    let dns_used = site.servers_used_by(site.dns.pid()).first().copied();
    let raft_leader =
        site.server_hosts[used].run(|| site.servers[used].api("GET", "/v1/status/leader", None)).map(|(_, b)| b).unwrap_or_default();
    let load = Load::start(&site, &["/on/", "/off/"]);

    let t_cut = Instant::now();
    site.topo.cut(&site.server_hosts[used]);
    // A change right after the cut: a new backend on a1.
    let extra = site.app_hosts[0].run(|| Backend::start_on("a1-extra", (site.app_hosts[0].ip, 0).into()));
    site.register(0, "a1-extra", extra.port());
    let mut want = site.all_backends();
    want.push(extra.addr.to_string());
    // The module moves to another server once TCP keepalive ends its blocking query on the cut
    // one: with the default upsync_timeout (6m) nothing else would for minutes. (Measured on its
    // own: the change's way through a1's agent waits for a new Raft leader when the cut server
    // led, which can take longer.)
    let now_used = wait_for("the module's connection to another server", LONG, || {
        // (A connection to the cut server may linger until the module closes it.)
        site.servers_used_by(poller).into_iter().find(|&i| i != used)
    });
    let moved = t_cut.elapsed();
    let (added_nginx, added_dns) = site.wait_lists("a change made after the cut", &want, t_cut);
    // And one more, with the module settled on its new server.
    let t_change = Instant::now();
    site.deregister(0, "a1-extra");
    let (removed_nginx, removed_dns) = site.wait_lists("a later change", &site.all_backends(), t_change);
    site.topo.heal(&site.server_hosts[used]);
    let report = load.finish();

    eprintln!(
        "SCENARIO cut-consul-server: module and upsync-dns used {} / {:?} (Raft leader {}); the module on another server {:.1} s \
         after the cut; a change made right after the cut reached nginx {:.1} s, upsync-dns {:.1} s after the cut (module now on {}); \
         the next change {:.2} s / {:.2} s; requests: {}",
        site.server_hosts[used].name,
        dns_used.map(|i| site.server_hosts[i].name.clone()),
        raft_leader.trim(),
        moved.as_secs_f64(),
        added_nginx.as_secs_f64(),
        added_dns.as_secs_f64(),
        site.server_hosts[now_used].name,
        removed_nginx.as_secs_f64(),
        removed_dns.as_secs_f64(),
        describe(&report)
    );
    assert_none_failed(&report, "while a Consul server was cut off");
    // TCP keepalive ends the connection within HALF_OPEN_BOUND of the last answer from the cut
    // server (11 s); the next server is asked at once.
    let bound = upsync_discovery::client::HALF_OPEN_BOUND + Duration::from_secs(3);
    assert!(moved <= bound, "the module left the cut Consul server {moved:?} after the cut, expected within {bound:?}");
}

#[test]
fn a_rolling_restart_of_the_consul_servers_under_load_loses_no_request_and_no_change() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut site = Site::start("scenario_rolling_restart");
    let load = Load::start(&site, &["/on/", "/off/"]);
    let start = Instant::now();
    let mut want = site.all_backends();
    let mut extra = Vec::new();
    for i in 0..3 {
        // One change before the server stops, one while it is down.
        for phase in ["before", "during"] {
            if phase == "during" {
                site.servers[i].stop();
            }
            let h = i % 2;
            let b = site.app_hosts[h].run(|| Backend::start_on(&format!("s{}-{phase}", i + 1), (site.app_hosts[h].ip, 0).into()));
            site.register(h, &b.name, b.port());
            want.push(b.addr.to_string());
            extra.push(b);
        }
        let (host, server) = (&site.server_hosts[i], &mut site.servers[i]);
        host.run(|| server.rejoin(LONG)).unwrap_or_else(|e| panic!("restarting the Consul server on {}: {e}", host.name));
        site.wait_cluster_healthy(&format!("the cluster healthy after restarting {}", host.name));
    }
    let restarts = start.elapsed();
    let (t_nginx, t_dns) = site.wait_lists("every change made during the rolling restart", &want, Instant::now());
    let report = load.finish();
    eprintln!(
        "SCENARIO rolling-restart: 3 servers restarted one by one in {:.1} s, 6 changes made; all in nginx {:.1} s and upsync-dns {:.1} s \
         after the last restart; requests: {}",
        restarts.as_secs_f64(),
        t_nginx.as_secs_f64(),
        t_dns.as_secs_f64(),
        describe(&report)
    );
    assert_none_failed(&report, "during the rolling restart");
}

#[test]
fn the_leader_worker_killed_during_a_burst_of_changes_leaves_the_right_list_on_every_worker() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let site = Site::start("scenario_kill_leader");
    let leader = site.leader_worker();
    let mut want = site.all_backends();
    let burst: Vec<(usize, Backend)> = (0..10)
        .map(|i| {
            let h = i % 2;
            (h, site.app_hosts[h].run(|| Backend::start_on(&format!("burst-{i}"), (site.app_hosts[h].ip, 0).into())))
        })
        .collect();
    let start = Instant::now();
    for (i, (h, b)) in burst.iter().enumerate() {
        site.register(*h, &b.name, b.port());
        if i == 4 {
            // kill -9 of a worker of the nginx this test started.
            assert!(std::process::Command::new("kill").args(["-KILL", &leader.to_string()]).status().expect("kill").success());
        }
    }
    // Two of them go again, and one of the original backends.
    for (h, b) in &burst[8..] {
        site.deregister(*h, &b.name);
    }
    site.deregister(0, &site.backends[0][0].name);
    want.extend(burst[..8].iter().map(|(_, b)| b.addr.to_string()));
    want.retain(|a| *a != site.backends[0][0].addr.to_string());
    want.sort();
    let (t_nginx, t_dns) = site.wait_lists("the list after the burst", &want, start);
    let new_leader = site.leader_worker();
    wait_until("the killed worker replaced", LONG, || site.nginx.active_worker_pids().len() == 2);
    let by_worker = site.lists_by_worker();
    eprintln!(
        "SCENARIO kill-leader: leader worker {leader} killed after 5 of 13 changes; new leader {new_leader}; the final list ({} servers) \
         in nginx {:.1} s and upsync-dns {:.1} s after the burst began; workers {:?}",
        want.len(),
        t_nginx.as_secs_f64(),
        t_dns.as_secs_f64(),
        by_worker.keys().collect::<Vec<_>>()
    );
    assert_ne!(new_leader, leader);
    for (w, list) in &by_worker {
        assert_eq!(list, &want, "worker {w} serves another list");
    }
}
