//! Many-upstreams benchmark (`scripts/bench/many.sh`, part of `make bench`; issue 19).
//!
//! One nginx (2 workers) with UPSYNC_BENCH_MANY_UPSTREAMS synced upstreams (default 10,000), each
//! on its own KV prefix `upstreams/uNNNNN` with UPSYNC_BENCH_MANY_SERVERS servers (default 10,
//! so 100,000 keys, written with `/v1/txn`, 64 per transaction): one real backend (a stock nginx,
//! 4 ports answering `b0`..`b3`; upstream i starts on `b(i % 4)`) and fillers `127.X.Y.Z:8080`
//! marked `{"down":1}` (parsed and kept, never contacted). A *change* moves one upstream to the
//! next backend in one transaction (delete the old key, set the new one).
//!
//! Phase 1, Consul 1.8.7 dev agent with its default limits:
//! - what one read of the whole folder (`/v1/kv/upstreams?recurse`) costs Consul: size and CPU;
//! - Consul CPU for the churn alone (no watcher): UPSYNC_BENCH_MANY_WINDOW seconds (30) with one
//!   change every UPSYNC_BENCH_MANY_CHURN_MS (100 ms) to a random upstream;
//! - nginx + module (`upsync_consul_connections` UPSYNC_BENCH_MANY_CONNECTIONS, default 4,
//!   `upsync_shm_size` UPSYNC_BENCH_MANY_SHM_MB, default 64, default `upsync` parameters): time
//!   from starting nginx to every upstream listing its Consul servers (`upstream_show`, text,
//!   polled every second), Consul's CPU meanwhile; the latency of `upstream_show` for one
//!   upstream, for all, and for all as Prometheus metrics;
//! - Consul CPU over the window without changes, the module watching;
//! - propagation of UPSYNC_BENCH_MANY_CHANGES (50) changes, UPSYNC_BENCH_MANY_PAUSE_MS (500 ms)
//!   apart, each to a random upstream: Consul write -> both workers proxy `/?u=NAME` to the new
//!   backend (a new connection per request, `reuseport` spreads them; the worker is read from
//!   `X-Pid`);
//! - Consul CPU over the window with the churn, the module watching; then the time the churn's
//!   last change took to reach both workers, and every upstream must list exactly what Consul
//!   holds;
//! - connections nginx (master + workers) held to Consul (peak, sampled every 20 ms from
//!   `/proc`), workers' memory (`smaps_rollup`: RSS and private, i.e. not shared with the master
//!   or the other worker) after the sync and after the changes, next to a stock nginx with the
//!   same servers written out; the shared zone's use: resident pages of its mapping (the `rw-s`
//!   mapping of exactly upsync_shm_size in /proc/PID/smaps), the largest over master and workers
//!   (the slab allocator's own counters are not exposed);
//! - the peer, "one blocking query per upstream" as nginx-upsync-module does
//!   (`GET /v1/kv/upstreams/uNNNNN/?recurse&index=N`, Consul's default 5-minute wait), from a
//!   load generator in this process: one `upsync_discovery::Client` (so one connection) and one
//!   watch per upstream on a current-thread tokio runtime, for UPSYNC_BENCH_MANY_PEER_DEFAULT_S
//!   (30) seconds against Consul's default `http_max_conns_per_client` (200): how many of the
//!   queries Consul accepted, and what the others got.
//!
//! Phase 2, a fresh agent with `limits { http_max_conns_per_client = N + 1000 }`, same data:
//! the churn alone, then the peer: time until every query had its first answer, Consul's CPU
//! over the window without changes, then with the churn. Result: Consul CPU seconds per minute
//! under churn, module vs peer, raw and minus the churn-only baseline of the same agent.
//!
//! UPSYNC_BENCH_MANY_PEER=0 skips the peer. Prints a markdown section; everything measured goes
//! to build/bench/many.json.
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use upsync_benches::{cpu_us, percentile, proc_mem, zone_rss_kib, ProcMem};
use upsync_discovery::{Client, ConsulConfig, Query, WatchEvent, WatchOptions};
use upsync_tests::consul::{Consul, ConsulOptions};
use upsync_tests::net::connections_to;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::TestDir;

/// Consul refuses transactions of more than 64 operations.
const TXN_OPS: usize = 64;
const DOWN: &str = "{\"down\":1}";
/// Real backends (ports of one stock nginx).
const BACKENDS: usize = 4;
/// nginx-upsync-module sends no `wait`: Consul's default, 5 minutes.
const PEER_WAIT: Duration = Duration::from_secs(300);
/// Reads of the whole folder to measure what one costs Consul.
const FOLDER_READS: usize = 5;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The i-th filler server: distinct loopback addresses nginx parses and never contacts.
fn filler(i: usize) -> String {
    format!("127.{}.{}.{}:8080", 10 + i / 62_500, (i / 250) % 250, i % 250 + 1)
}

/// A small deterministic generator (xorshift64*): the same upstreams are picked in every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

/// The data set: names, backend addresses, which backend each upstream is on now.
struct Data {
    names: Vec<String>,
    servers: usize,
    backends: Vec<String>,
    current: Vec<usize>,
    /// The last change: upstream, new backend, when it was written.
    last: Option<(usize, usize, Instant)>,
}

impl Data {
    fn key(&self, i: usize, addr: &str) -> String {
        format!("upstreams/{}/{addr}", self.names[i])
    }

    /// Writes every upstream's servers; returns the seconds it took.
    fn load(&mut self, consul: &Consul) -> anyhow::Result<f64> {
        let t = Instant::now();
        let fillers = self.servers - 1;
        self.current = (0..self.names.len()).map(|i| i % BACKENDS).collect();
        let mut ops = Vec::with_capacity(TXN_OPS);
        for i in 0..self.names.len() {
            ops.push(set(&self.key(i, &self.backends[i % BACKENDS]), ""));
            for f in 0..fillers {
                ops.push(set(&self.key(i, &filler(i * fillers + f)), DOWN));
                if ops.len() == TXN_OPS {
                    txn(consul, &std::mem::take(&mut ops))?;
                }
            }
            if ops.len() == TXN_OPS {
                txn(consul, &std::mem::take(&mut ops))?;
            }
        }
        if !ops.is_empty() {
            txn(consul, &ops)?;
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// Moves upstream `i` to the next backend in one transaction; the new backend's index.
    fn change(&mut self, consul: &Consul, i: usize) -> anyhow::Result<usize> {
        let (old, new) = (self.current[i], (self.current[i] + 1) % BACKENDS);
        let ops = [
            serde_json::json!({ "KV": { "Verb": "delete", "Key": self.key(i, &self.backends[old]) } }),
            set(&self.key(i, &self.backends[new]), ""),
        ];
        txn(consul, &ops)?;
        self.current[i] = new;
        self.last = Some((i, new, Instant::now()));
        Ok(new)
    }
}

fn set(key: &str, value: &str) -> serde_json::Value {
    serde_json::json!({ "KV": { "Verb": "set", "Key": key, "Value": base64::engine::general_purpose::STANDARD.encode(value) } })
}

fn txn(consul: &Consul, ops: &[serde_json::Value]) -> anyhow::Result<()> {
    let (status, body) = consul.api("PUT", "/v1/txn", Some(serde_json::to_string(ops)?.as_bytes()))?;
    anyhow::ensure!(status == 200, "Consul /v1/txn answered HTTP {status}: {body}");
    Ok(())
}

/// Consul's CPU (utime + stime of its process), in seconds.
fn cpu_s(pids: &[u32]) -> f64 {
    cpu_us(pids) / 1e6
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct Window {
    seconds: f64,
    changes: usize,
    consul_cpu_s: f64,
    /// Of the watcher (nginx's processes, or this process for the peer).
    watcher_cpu_s: f64,
    /// Consul CPU seconds per minute.
    consul_cpu_s_per_min: f64,
}

/// One change every `every` (None: no change) to a random upstream for `len`, measuring the CPU
/// of `consul` and `watcher`. The last change made is in `data.last`.
fn churn_window(
    consul: &Consul,
    data: &mut Data,
    rng: &mut Rng,
    len: Duration,
    every: Option<Duration>,
    watcher: &dyn Fn() -> Vec<u32>,
) -> anyhow::Result<Window> {
    let (c0, w0) = (cpu_s(&[consul.pid()]), cpu_s(&watcher()));
    let t0 = Instant::now();
    let mut changes = 0;
    while let Some(every) = every.filter(|_| t0.elapsed() < len) {
        let due = t0 + every * changes as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let i = rng.below(data.names.len());
        data.change(consul, i)?;
        changes += 1;
    }
    if let Some(wait) = (t0 + len).checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let consul_cpu_s = cpu_s(&[consul.pid()]) - c0;
    Ok(Window {
        seconds,
        changes,
        consul_cpu_s,
        watcher_cpu_s: cpu_s(&watcher()) - w0,
        consul_cpu_s_per_min: consul_cpu_s * 60.0 / seconds,
    })
}

/// What `upstream_show` (text) lists: per upstream, the server count and the real backend's port.
fn shown(front: &Nginx) -> anyhow::Result<HashMap<String, (usize, Option<u16>)>> {
    let r = ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build().get(&front.url("/show")).call()?;
    let mut text = String::new();
    r.into_reader().read_to_string(&mut text)?;
    let mut out = HashMap::new();
    let mut cur: Option<(String, usize, Option<u16>)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Upstream name: ") {
            if let Some((name, count, port)) = cur.take() {
                out.insert(name, (count, port));
            }
            let (name, count) = rest.split_once("; Backend server count: ").unwrap_or((rest, "0"));
            cur = Some((name.to_string(), count.trim().parse().unwrap_or(0), None));
        } else if let Some(addr) = line.trim_start().strip_prefix("server 127.0.0.1:") {
            if let Some(c) = cur.as_mut() {
                c.2 = addr.split(' ').next().and_then(|p| p.parse().ok());
            }
        }
    }
    if let Some((name, count, port)) = cur {
        out.insert(name, (count, port));
    }
    Ok(out)
}

/// Upstreams that do not list exactly what Consul holds (server count and real backend).
fn out_of_sync(front: &Nginx, data: &Data, ports: &[u16]) -> anyhow::Result<usize> {
    let s = shown(front)?;
    Ok((0..data.names.len()).filter(|&i| s.get(&data.names[i]) != Some(&(data.servers, Some(ports[data.current[i]])))).count())
}

/// Waits until every upstream lists what Consul holds; the seconds it took.
fn wait_synced(front: &Nginx, data: &Data, ports: &[u16], timeout: Duration) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    loop {
        let bad = out_of_sync(front, data, ports)?;
        if bad == 0 {
            return Ok(t0.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            t0.elapsed() < timeout,
            "{bad} of {} upstreams still do not list their Consul servers after {timeout:?} (see {})",
            data.names.len(),
            front.dir().join("error.log").display()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The processes of an nginx: master, workers and the module's poller process.
fn nginx_pids(front: &Nginx) -> Vec<u32> {
    front.process_pids()
}

/// Samples, until finished, the connections `pids()` hold to `port` (the highest count seen).
struct ConnWatch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConnWatch {
    fn start(pids: impl Fn() -> Vec<u32> + Send + 'static, port: u16) -> ConnWatch {
        let (stop, peak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(connections_to(&pids(), port), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        ConnWatch { stop, peak, thread: Some(thread) }
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for ConnWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The peer: one blocking query per upstream, each on its own client (own connection).
struct Peer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Watches that had their first answer.
    answered: Arc<AtomicUsize>,
    /// Answers that changed a watch's value (first answers included).
    changed: Arc<AtomicUsize>,
    /// Failed requests, by message.
    errors: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Peer {
    fn start(consul: &Consul, names: &[String]) -> anyhow::Result<Peer> {
        let addr = consul.http_addr();
        let names = names.to_vec();
        let (answered, changed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let errors: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (a, c, e) = (answered.clone(), changed.clone(), errors.clone());
        let thread = std::thread::Builder::new().name("peer".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(err) => {
                    e.lock().unwrap().insert(format!("tokio runtime: {err}"), 1);
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                for name in names {
                    let client = match ConsulConfig::from_addresses(&addr).and_then(Client::new) {
                        Ok(c) => c,
                        Err(err) => {
                            *e.lock().unwrap().entry(format!("client: {err}")).or_insert(0) += 1;
                            continue;
                        }
                    };
                    let opts = WatchOptions { wait: PEER_WAIT, ramp_from: None, ..WatchOptions::default() };
                    let mut watch =
                        upsync_discovery::Watch::new(client, Query::Raw { path: format!("/v1/kv/upstreams/{name}/?recurse") }, opts);
                    let (a, c, e) = (a.clone(), c.clone(), e.clone());
                    tokio::task::spawn_local(async move {
                        let mut first = true;
                        loop {
                            match watch.next().await {
                                WatchEvent::Changed { .. } => {
                                    if std::mem::take(&mut first) {
                                        a.fetch_add(1, Ordering::Relaxed);
                                    }
                                    c.fetch_add(1, Ordering::Relaxed);
                                }
                                WatchEvent::Error { error, .. } => {
                                    // The message with its numbers (port, upstream) as N.
                                    let mut m = String::new();
                                    for ch in error.to_string().chars().take(200) {
                                        if !ch.is_ascii_digit() {
                                            m.push(ch);
                                        } else if !m.ends_with('N') {
                                            m.push('N');
                                        }
                                    }
                                    *e.lock().unwrap().entry(m).or_insert(0) += 1;
                                }
                            }
                        }
                    });
                    // Let the new task send its request: the queries start one after the other,
                    // as fast as this thread goes.
                    tokio::task::yield_now().await;
                }
                let _ = rx.await;
            });
            // Dropping the runtime drops every watch and closes its connection.
        })?;
        Ok(Peer { stop: Some(tx), thread: Some(thread), answered, changed, errors })
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }

    fn changed(&self) -> usize {
        self.changed.load(Ordering::Relaxed)
    }

    fn errors(&self) -> BTreeMap<String, usize> {
        self.errors.lock().unwrap().clone()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct PeerDefaultLimit {
    seconds: f64,
    answered: usize,
    connections_end: usize,
    connections_peak: usize,
    consul_cpu_s: f64,
    errors: BTreeMap<String, usize>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct PeerRaised {
    limit: usize,
    all_answered_s: Option<f64>,
    answered: usize,
    consul_cpu_start_s: f64,
    connections: usize,
    idle: Window,
    churn: Window,
    /// Watch answers with a changed value during the churn (each change should wake one).
    changed_in_churn: usize,
    errors: BTreeMap<String, usize>,
}

fn workers_mem(front: &Nginx) -> Vec<ProcMem> {
    front.worker_pids().into_iter().map(proc_mem).collect()
}

/// Polls `/?u=NAME` (a new connection each time) until every worker in `pids` answered `want`;
/// the milliseconds since `since`.
fn until_served(front: &Nginx, name: &str, want: usize, pids: &[u32], since: Instant) -> anyhow::Result<f64> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let (want, url) = (format!("b{want}"), front.url(&format!("/?u={name}")));
    let mut seen: Vec<u32> = Vec::new();
    while seen.len() < pids.len() {
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(60),
            "{name} did not reach {want} on every worker within 60 s (seen on {seen:?})"
        );
        if let Ok(r) = agent.get(&url).set("Connection", "close").call() {
            let pid: u32 = r.header("X-Pid").and_then(|p| p.parse().ok()).unwrap_or(0);
            if r.into_string().unwrap_or_default() == want && !seen.contains(&pid) {
                seen.push(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(since.elapsed().as_secs_f64() * 1000.0)
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct Report {
    upstreams: usize,
    servers_per_upstream: usize,
    keys: usize,
    workers: usize,
    consul_connections: usize,
    shm_mb: u64,
    load_s: f64,
    /// `GET /v1/kv/upstreams?recurse`: size of the answer and Consul CPU per read (ms).
    folder_bytes: usize,
    folder_cpu_ms: f64,
    baseline: Window,
    sync_s: f64,
    listening_s: f64,
    consul_cpu_sync_s: f64,
    nginx_cpu_sync_s: f64,
    mem_synced: Vec<ProcMem>,
    /// `upstream_show?upstream=ONE&format=json` latency (ms), median of 5.
    show_one_ms: f64,
    /// `upstream_show` (text, every upstream): latency (ms) and size.
    show_all_ms: f64,
    show_all_bytes: usize,
    /// The same as Prometheus metrics (`?format=prometheus`).
    show_prometheus_ms: f64,
    show_prometheus_bytes: usize,
    module_idle: Window,
    propagation_pause_ms: u64,
    propagation_ms: Vec<f64>,
    propagation_p50_ms: f64,
    propagation_p99_ms: f64,
    propagation_max_ms: f64,
    module: Window,
    /// The churn's last change: write -> served by every worker (ms).
    last_change_ms: f64,
    /// Every upstream listed what Consul holds (the full check, after the last change arrived).
    checked_all: bool,
    connections_peak: usize,
    mem_after: Vec<ProcMem>,
    zone_rss_kib: u64,
    static_mem: Vec<ProcMem>,
    static_start_s: f64,
    peer_default: Option<PeerDefaultLimit>,
    load2_s: f64,
    baseline2: Option<Window>,
    peer: Option<PeerRaised>,
    loadavg: Vec<String>,
    total_s: f64,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

/// The upstreams and servers as an nginx `http` block: synced (`upsync` line, the module) or
/// written out (stock nginx, the servers Consul holds now).
fn http_conf(consul: &Consul, data: &Data, shm_mb: u64, connections: usize, synced: bool) -> String {
    let mut http = if synced { format!("upsync_shm_size {shm_mb}m;\nupsync_consul_connections {connections};\n") } else { String::new() };
    let fillers = data.servers - 1;
    for (i, name) in data.names.iter().enumerate() {
        if synced {
            http.push_str(&format!("upstream {name} {{ server 127.0.0.1:9; upsync {}/v1/kv/upstreams/{name}; }}\n", consul.http_addr()));
        } else {
            http.push_str(&format!("upstream {name} {{ server {};", data.backends[data.current[i]]));
            for f in 0..fillers {
                http.push_str(&format!(" server {} down;", filler(i * fillers + f)));
            }
            http.push_str(" }\n");
        }
    }
    let show = if synced { "location = /show { upstream_show; }" } else { "" };
    http.push_str(&format!(
        "server {{ listen 127.0.0.1:{{{{port}}}} reuseport;
                  location / {{ proxy_pass http://$arg_u; add_header X-Pid $pid always; }}
                  {show} }}"
    ));
    http
}

fn main() -> anyhow::Result<()> {
    let n = env("UPSYNC_BENCH_MANY_UPSTREAMS", 10_000) as usize;
    let per = env("UPSYNC_BENCH_MANY_SERVERS", 10) as usize;
    anyhow::ensure!(n >= 1 && per >= 1, "UPSYNC_BENCH_MANY_UPSTREAMS and UPSYNC_BENCH_MANY_SERVERS must be at least 1");
    let workers = env("UPSYNC_BENCH_WORKERS", 2) as usize;
    let connections = env("UPSYNC_BENCH_MANY_CONNECTIONS", 4) as usize;
    let shm_mb = env("UPSYNC_BENCH_MANY_SHM_MB", 64);
    let k = env("UPSYNC_BENCH_MANY_CHANGES", 50) as usize;
    let pause = Duration::from_millis(env("UPSYNC_BENCH_MANY_PAUSE_MS", 500));
    let window = Duration::from_secs(env("UPSYNC_BENCH_MANY_WINDOW", 30));
    let every = Duration::from_millis(env("UPSYNC_BENCH_MANY_CHURN_MS", 100));
    let with_peer = env("UPSYNC_BENCH_MANY_PEER", 1) != 0;
    let peer_default_len = Duration::from_secs(env("UPSYNC_BENCH_MANY_PEER_DEFAULT_S", 30));
    let started = Instant::now();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut report = Report {
        upstreams: n,
        servers_per_upstream: per,
        keys: n * per,
        workers,
        consul_connections: connections,
        shm_mb,
        propagation_pause_ms: pause.as_millis() as u64,
        ..Default::default()
    };
    let width = n.saturating_sub(1).to_string().len().max(5);
    let names: Vec<String> = (0..n).map(|i| format!("u{i:0width$}")).collect();

    let dir = TestDir::new("bench-many");
    // Backends b0..b3: one stock nginx, one port each, answering with the name.
    let mut servers = String::new();
    for i in 0..BACKENDS {
        let port = if i == 0 { "{{port}}".to_string() } else { format!("{{{{port{i}}}}}") };
        servers.push_str(&format!("server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"b{i}\"; }} }}\n"));
    }
    let backends = Nginx::start(&dir.subdir("backends"), NginxConf::new(&servers).without_module().workers(1));
    let ports: Vec<u16> = (0..BACKENDS).map(|i| if i == 0 { backends.port() } else { backends.extra_port(i) }).collect();
    let mut data = Data {
        names: names.clone(),
        servers: per,
        backends: ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
        current: Vec::new(),
        last: None,
    };

    // ---- Phase 1: Consul with its default limits.
    let consul = Consul::start(&dir.subdir("consul-default"));
    eprintln!("loading {} keys ({n} upstreams x {per})", n * per);
    report.load_s = data.load(&consul)?;
    eprintln!("  {:.1} s", report.load_s);
    // What one answer of a query on the whole folder costs Consul.
    let c0 = cpu_s(&[consul.pid()]);
    for _ in 0..FOLDER_READS {
        let r = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build().get(&consul.url("/v1/kv/upstreams?recurse")).call()?;
        let mut body = Vec::new();
        r.into_reader().read_to_end(&mut body)?;
        report.folder_bytes = body.len();
    }
    report.folder_cpu_ms = (cpu_s(&[consul.pid()]) - c0) * 1000.0 / FOLDER_READS as f64;
    eprintln!("  one read of the whole folder: {} bytes, {:.0} ms of Consul CPU", report.folder_bytes, report.folder_cpu_ms);
    eprintln!("Consul CPU with the churn alone ({} s)", window.as_secs());
    report.baseline = churn_window(&consul, &mut data, &mut rng, window, Some(every), &Vec::new)?;
    eprintln!("  {:?}", report.baseline);

    let (consul_cpu0, la) = (cpu_s(&[consul.pid()]), loadavg());
    eprintln!("starting nginx with {n} synced upstreams (load {la})");
    report.loadavg.push(la);
    let t_start = Instant::now();
    let front = Nginx::start(&dir.subdir("front"), NginxConf::new(&http_conf(&consul, &data, shm_mb, connections, true)).workers(workers));
    let master = front.master_pid();
    let conns = ConnWatch::start(
        // The master and every descendant: workers and the poller process, which holds the
        // module's Consul connections.
        move || upsync_tests::proc::tree_of(master),
        consul.ports.http,
    );
    report.listening_s = t_start.elapsed().as_secs_f64();
    let waited = wait_synced(&front, &data, &ports, Duration::from_secs(600))?;
    report.sync_s = report.listening_s + waited;
    report.consul_cpu_sync_s = cpu_s(&[consul.pid()]) - consul_cpu0;
    report.nginx_cpu_sync_s = cpu_s(&nginx_pids(&front));
    report.mem_synced = workers_mem(&front);
    eprintln!(
        "  all {n} upstreams synced {:.1} s after starting nginx ({:.1} s until it listened); Consul CPU meanwhile {:.1} s, nginx {:.1} s; workers {:?}",
        report.sync_s, report.listening_s, report.consul_cpu_sync_s, report.nginx_cpu_sync_s, report.mem_synced
    );

    // upstream_show for one upstream, and for all.
    let mut show_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (status, _) = upsync_tests::net::http_request_timeout(
            &front.url(&format!("/show?upstream={}&format=json", names[n / 2])),
            Duration::from_secs(60),
        )?;
        anyhow::ensure!(status == 200, "upstream_show of one upstream answered {status}");
        show_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    report.show_one_ms = percentile(&mut show_ms, 50.0);
    let t = Instant::now();
    let mut all = Vec::new();
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
        .get(&front.url("/show"))
        .call()?
        .into_reader()
        .read_to_end(&mut all)?;
    report.show_all_ms = t.elapsed().as_secs_f64() * 1000.0;
    report.show_all_bytes = all.len();
    let t = Instant::now();
    let mut prom = Vec::new();
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
        .get(&front.url("/show?format=prometheus"))
        .call()?
        .into_reader()
        .read_to_end(&mut prom)?;
    report.show_prometheus_ms = t.elapsed().as_secs_f64() * 1000.0;
    report.show_prometheus_bytes = prom.len();
    eprintln!(
        "  upstream_show of one upstream (JSON): {:.1} ms; of all (text, {} bytes): {:.0} ms; metrics ({} bytes): {:.0} ms",
        report.show_one_ms, report.show_all_bytes, report.show_all_ms, report.show_prometheus_bytes, report.show_prometheus_ms
    );

    let front_pids = nginx_pids(&front);
    eprintln!("Consul CPU without changes, module watching ({} s)", window.as_secs());
    report.module_idle = churn_window(&consul, &mut data, &mut rng, window, None, &|| front_pids.clone())?;
    eprintln!("  {:?}", report.module_idle);

    // Propagation of K changes, one at a time, `pause` apart.
    eprintln!("propagation of {k} changes, {} ms apart", pause.as_millis());
    let pids = front.active_worker_pids();
    for _ in 0..k {
        std::thread::sleep(pause);
        let i = rng.below(n);
        let new = data.change(&consul, i)?;
        let since = data.last.map(|l| l.2).unwrap_or_else(Instant::now);
        report.propagation_ms.push(until_served(&front, &names[i], new, &pids, since)?);
    }
    let mut p = report.propagation_ms.clone();
    report.propagation_p50_ms = percentile(&mut p, 50.0);
    report.propagation_p99_ms = percentile(&mut p, 99.0);
    report.propagation_max_ms = p.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "  p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        report.propagation_p50_ms, report.propagation_p99_ms, report.propagation_max_ms
    );

    // Consul CPU over the churn window with the module watching.
    let la = loadavg();
    eprintln!("Consul CPU with the churn, module watching ({} s; load {la})", window.as_secs());
    report.loadavg.push(la);
    report.module = churn_window(&consul, &mut data, &mut rng, window, Some(every), &|| front_pids.clone())?;
    if let Some((i, new, at)) = data.last {
        report.last_change_ms = until_served(&front, &names[i], new, &pids, at)?;
    }
    eprintln!("  {:?}; the last change reached both workers {:.0} ms after its write", report.module, report.last_change_ms);
    // Every upstream must list what Consul holds.
    wait_synced(&front, &data, &ports, Duration::from_secs(120))?;
    report.checked_all = true;

    report.connections_peak = conns.peak();
    drop(conns);
    report.mem_after = workers_mem(&front);
    report.zone_rss_kib = nginx_pids(&front).iter().filter_map(|p| zone_rss_kib(*p, shm_mb * 1024)).max().unwrap_or(0);
    eprintln!(
        "  nginx held at most {} connection(s) to Consul; workers {:?}; zone pages {} KiB of {shm_mb} MiB",
        report.connections_peak, report.mem_after, report.zone_rss_kib
    );
    let crashes = front.crashes();
    anyhow::ensure!(crashes.is_empty(), "nginx crashed: {crashes:?}");
    drop(front);

    // The same upstreams written out for stock nginx: its workers' memory.
    let t = Instant::now();
    let stock = Nginx::start(
        &dir.subdir("static"),
        NginxConf::new(&http_conf(&consul, &data, shm_mb, connections, false)).without_module().workers(workers),
    );
    report.static_start_s = t.elapsed().as_secs_f64();
    let (i, want) = (n / 3, data.current[n / 3]);
    until_served(&stock, &names[i], want, &stock.active_worker_pids(), Instant::now())?;
    report.static_mem = workers_mem(&stock);
    eprintln!(
        "stock nginx with the same servers written out: listening after {:.1} s; workers {:?}",
        report.static_start_s, report.static_mem
    );
    drop(stock);

    if with_peer {
        // The peer against the default limit.
        eprintln!("peer: {n} blocking queries against Consul's default limit ({} s)", peer_default_len.as_secs());
        let c0 = cpu_s(&[consul.pid()]);
        let me = std::process::id();
        let peak = ConnWatch::start(move || vec![me], consul.ports.http);
        let t0 = Instant::now();
        let peer = Peer::start(&consul, &names)?;
        std::thread::sleep(peer_default_len);
        let r = PeerDefaultLimit {
            seconds: t0.elapsed().as_secs_f64(),
            answered: peer.answered(),
            connections_end: connections_to(&[me], consul.ports.http),
            connections_peak: peak.peak(),
            consul_cpu_s: cpu_s(&[consul.pid()]) - c0,
            errors: peer.errors(),
        };
        drop(peer);
        drop(peak);
        eprintln!(
            "  {} of {n} queries answered; {} connections held at the end (peak {}); Consul CPU {:.1} s; errors {:?}",
            r.answered, r.connections_end, r.connections_peak, r.consul_cpu_s, r.errors
        );
        report.peer_default = Some(r);
    }
    drop(consul);

    if with_peer {
        // ---- Phase 2: a fresh agent that lets one address hold every query.
        let limit = n + 1000;
        let opts = ConsulOptions { extra_hcl: vec![format!("limits {{ http_max_conns_per_client = {limit} }}")], ..Default::default() };
        let consul = Consul::start_with(&dir.subdir("consul-raised"), opts);
        eprintln!("Consul with http_max_conns_per_client = {limit}: loading {} keys", n * per);
        report.load2_s = data.load(&consul)?;
        eprintln!("  {:.1} s", report.load2_s);
        eprintln!("Consul CPU with the churn alone ({} s)", window.as_secs());
        let baseline2 = churn_window(&consul, &mut data, &mut rng, window, Some(every), &Vec::new)?;
        eprintln!("  {baseline2:?}");
        report.baseline2 = Some(baseline2);

        eprintln!("peer: {n} blocking queries");
        let me = std::process::id();
        let c0 = cpu_s(&[consul.pid()]);
        let t0 = Instant::now();
        let peer = Peer::start(&consul, &names)?;
        let mut all_answered_s = None;
        while t0.elapsed() < Duration::from_secs(300) {
            if peer.answered() == n {
                all_answered_s = Some(t0.elapsed().as_secs_f64());
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Every query back in its blocking wait.
        std::thread::sleep(Duration::from_secs(2));
        let consul_cpu_start_s = cpu_s(&[consul.pid()]) - c0;
        let held = connections_to(&[me], consul.ports.http);
        eprintln!("  {} of {n} answered ({all_answered_s:?} s), {held} connections; Consul CPU {consul_cpu_start_s:.1} s", peer.answered());
        eprintln!("Consul CPU without changes, peer watching ({} s)", window.as_secs());
        let idle = churn_window(&consul, &mut data, &mut rng, window, None, &|| vec![me])?;
        eprintln!("  {idle:?}");
        let la = loadavg();
        eprintln!("Consul CPU with the churn, peer watching ({} s; load {la})", window.as_secs());
        report.loadavg.push(la);
        let changed0 = peer.changed();
        let churn = churn_window(&consul, &mut data, &mut rng, window, Some(every), &|| vec![me])?;
        // Let the last changes arrive.
        std::thread::sleep(Duration::from_secs(1));
        let changed_in_churn = peer.changed() - changed0;
        eprintln!("  {churn:?}; {changed_in_churn} watch answers with a change");
        report.peer = Some(PeerRaised {
            limit,
            all_answered_s,
            answered: peer.answered(),
            consul_cpu_start_s,
            connections: held,
            idle,
            churn,
            changed_in_churn,
            errors: peer.errors(),
        });
        drop(peer);
    }
    report.total_s = started.elapsed().as_secs_f64();
    print_report(&report, window, every);
    let out = upsync_tests::paths::build_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("many.json"), serde_json::to_string_pretty(&report)?)?;
    Ok(())
}

fn print_report(r: &Report, window: Duration, every: Duration) {
    let mib = |k: u64| format!("{:.0}", k as f64 / 1024.0);
    let mems = |v: &[ProcMem], f: &dyn Fn(&ProcMem) -> u64| v.iter().map(|m| mib(f(m))).collect::<Vec<_>>().join(" / ");
    let per_min = |w: &Window| format!("{:.1} s/min", w.consul_cpu_s_per_min);
    let churn = |w: &Window| format!("{:.1} s of CPU in {:.0} s = {:.1} s/min", w.consul_cpu_s, w.seconds, w.consul_cpu_s_per_min);
    println!(
        "### Many upstreams: {} upstreams / {} servers on one nginx ({} workers, `upsync_consul_connections {}`, Consul 1.8.7 dev agent)\n",
        r.upstreams, r.keys, r.workers, r.consul_connections
    );
    println!("| start → all synced | propagation of one change p50 / p99 | connections to Consul (peak) | Consul CPU, one change / 100 ms | same, one query per upstream (peer) | workers' RSS (private) | shared zone used |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let peer_cell = match &r.peer {
        Some(p) => format!("{} (needs `http_max_conns_per_client` > {})", per_min(&p.churn), r.upstreams),
        None => "not run".into(),
    };
    println!(
        "| {:.1} s | {:.0} / {:.0} ms | {} | {} | {} | {} MiB ({} MiB) | {:.1} of {} MiB |",
        r.sync_s,
        r.propagation_p50_ms,
        r.propagation_p99_ms,
        r.connections_peak,
        per_min(&r.module),
        peer_cell,
        mems(&r.mem_after, &|m| m.rss),
        mems(&r.mem_after, &|m| m.private),
        r.zone_rss_kib as f64 / 1024.0,
        r.shm_mb
    );
    println!();
    println!(
        "- Data: {} KV keys in one folder (`upstreams/uNNNNN/IP:PORT`), written with `/v1/txn` in {:.1} s; each upstream has one real backend and {} `{{\"down\":1}}` fillers. A change moves one random upstream to another backend in one transaction.",
        r.keys,
        r.load_s,
        r.servers_per_upstream - 1
    );
    println!(
        "- One read of the whole folder (`GET /v1/kv/upstreams?recurse`, what the module's folder query gets back on every change): {:.1} MB, {:.0} ms of Consul CPU.",
        r.folder_bytes as f64 / 1e6,
        r.folder_cpu_ms
    );
    println!(
        "- Start: nginx listened after {:.1} s; every upstream listed its Consul servers {:.1} s after nginx was started (`upstream_show` polled every second). Consul used {:.1} s of CPU meanwhile, nginx {:.1} s.",
        r.listening_s, r.sync_s, r.consul_cpu_sync_s, r.nginx_cpu_sync_s
    );
    println!(
        "- Propagation: {} changes, {} ms apart; Consul write → both workers proxy `/?u=NAME` to the new backend: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms.",
        r.propagation_ms.len(),
        r.propagation_pause_ms,
        r.propagation_p50_ms,
        r.propagation_p99_ms,
        r.propagation_max_ms
    );
    println!(
        "- Consul CPU (utime + stime of its process) over {} s: no change, module watching: {}; one change every {} ms: churn alone (no watcher) {}, module watching {} (nginx used {:.1} s); the churn's last change reached both workers {:.0} ms after its write, and every upstream then listed what Consul holds.",
        window.as_secs(),
        churn(&r.module_idle),
        every.as_millis(),
        churn(&r.baseline),
        churn(&r.module),
        r.module.watcher_cpu_s,
        r.last_change_ms
    );
    println!(
        "- Workers' memory (MiB, per worker; private = not shared with another process): after the sync RSS {} (private {}), after the changes RSS {} (private {}); stock nginx with the same {} servers written out: RSS {} (private {}). Zone: resident pages of the {} MiB mapping (largest over master and workers).",
        mems(&r.mem_synced, &|m| m.rss),
        mems(&r.mem_synced, &|m| m.private),
        mems(&r.mem_after, &|m| m.rss),
        mems(&r.mem_after, &|m| m.private),
        r.keys,
        mems(&r.static_mem, &|m| m.rss),
        mems(&r.static_mem, &|m| m.private),
        r.shm_mb
    );
    println!(
        "- `upstream_show` (on a worker's event loop): one upstream (`?upstream=NAME&format=json`) {:.1} ms; all (text, {:.1} MB) {:.0} ms; all as Prometheus metrics (`?format=prometheus`, {:.1} MB) {:.0} ms.",
        r.show_one_ms,
        r.show_all_bytes as f64 / 1e6,
        r.show_all_ms,
        r.show_prometheus_bytes as f64 / 1e6,
        r.show_prometheus_ms
    );
    if let Some(d) = &r.peer_default {
        println!(
            "- One query per upstream (nginx-upsync-module's way, `GET /v1/kv/upstreams/uNNNNN/?recurse&index=N`, one connection each, from one process) against Consul's default `http_max_conns_per_client` (200): after {:.0} s {} of {} queries had an answer, {} connections held (peak {}); the others were refused over and over ({}); Consul used {:.1} s of CPU meanwhile.",
            d.seconds,
            d.answered,
            r.upstreams,
            d.connections_end,
            d.connections_peak,
            d.errors.iter().map(|(m, c)| format!("{c} × `{m}`")).collect::<Vec<_>>().join("; "),
            d.consul_cpu_s
        );
    }
    if let (Some(p), Some(b2)) = (&r.peer, &r.baseline2) {
        let net_module = r.module.consul_cpu_s_per_min - r.baseline.consul_cpu_s_per_min;
        let net_peer = p.churn.consul_cpu_s_per_min - b2.consul_cpu_s_per_min;
        println!(
            "- The same with `limits {{ http_max_conns_per_client = {} }}` (a fresh agent, same data): every query answered after {}, {} connections held, Consul CPU {:.1} s meanwhile; no change: {}; churn alone {}; peer watching {} ({} watch answers with a change for {} changes).",
            p.limit,
            p.all_answered_s.map(|s| format!("{s:.1} s")).unwrap_or_else(|| format!("300 s: only {}", p.answered)),
            p.connections,
            p.consul_cpu_start_s,
            churn(&p.idle),
            churn(b2),
            churn(&p.churn),
            p.changed_in_churn,
            p.churn.changes
        );
        println!(
            "- Consul CPU under churn, module / one query per upstream: **{:.1}** ({:.1} vs {:.1} s/min; minus the churn alone: {:.1} vs {:.1} s/min).",
            r.module.consul_cpu_s_per_min / p.churn.consul_cpu_s_per_min.max(1e-9),
            r.module.consul_cpu_s_per_min,
            p.churn.consul_cpu_s_per_min,
            net_module,
            net_peer
        );
    }
    println!("- Whole benchmark: {:.0} s; load averages at the measurements: {}.", r.total_s, r.loadavg.join(" | "));
}
