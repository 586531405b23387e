//! Big-upstream stall benchmark (`scripts/bench/stall.sh`, part of `make bench`).
//!
//! How long does one Consul change stall requests when the upstream holds 1,000 / 20,000 /
//! 50,000 servers? Real Consul (dev agent), real nginx with the module (2 workers), a stock nginx
//! as backends. The upstream's KV prefix holds N entries: 4 real backends, one *probe* backend
//! that starts `{"down":1}`, and N - 5 fillers `127.10.X.Y:8080` with `{"down":1}` (nginx parses
//! and keeps them, traffic never goes there). Entries are written with `/v1/txn`, 64 per
//! transaction.
//!
//! Each run: a closed-loop client (UPSYNC_BENCH_STALL_CONNS keep-alive connections, one thread
//! each, a request as soon as the previous answer arrived) records every request's latency and
//! the worker that answered (`X-Pid: $pid`; the front listens with `reuseport` so the kernel
//! spreads the connections over the workers). After a quiet window (no change, 3 s), one KV write
//! puts the probe up (`{"weight":1}`): the change window runs from that write until every worker
//! served a request from the probe (the propagation time), plus a tail, at least 3 s in all. A
//! request counts in the window in which it completed, so a request held up by the change counts
//! in the change window. The probe is put down again between runs (outside any window) and the
//! upstream's `version` in `upstream_show` must have moved by exactly one per change.
//!
//! Per size: max and p99.9 latency of both windows, the extra stall = max(change) - max(quiet),
//! and the propagation; the worst of UPSYNC_BENCH_STALL_RUNS runs (default 3) is reported.
//! On a loaded machine the stall is mostly time the workers wait for a core, so each size also
//! measures, without traffic, the CPU one change costs each worker's event loop: on-CPU time of
//! the worker's main thread (schedstat) in 4 s after one change minus 4 s without a change. That
//! figure is what a request queued behind the change waits on an idle core. The
//! module under test is `build/ngx_http_upsync_module.so` or UPSYNC_MODULE;
//! UPSYNC_BENCH_STALL_LABEL names it in the output. Other settings: UPSYNC_BENCH_STALL_SIZES
//! (default `1000,20000,50000`), UPSYNC_BENCH_WORKERS (2). Prints a markdown section; the runs
//! in JSON go to build/bench/stall-LABEL.json.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use upsync_benches::percentile;
use upsync_tests::consul::Consul;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::TestDir;

const UPSTREAM: &str = "stall";
/// Real backends in the list (up), then the probe (index REAL).
const REAL: usize = 4;
const QUIET: Duration = Duration::from_secs(3);
const CHANGE_MIN: Duration = Duration::from_secs(3);
const TAIL: Duration = Duration::from_secs(1);
/// Window of the event-loop CPU measurement (without traffic: idle workers install a new list
/// at their next 200 ms tick).
const CPU_WINDOW: Duration = Duration::from_secs(4);
/// Consul refuses transactions of more than 64 operations.
const TXN_OPS: usize = 64;
const DOWN: &str = "{\"down\":1}";
const UP: &str = "{\"weight\":1}";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The i-th filler server: distinct loopback addresses nginx parses and never contacts.
fn filler(i: usize) -> String {
    format!("127.{}.{}.{}:8080", 10 + i / 62_500, (i / 250) % 250, i % 250 + 1)
}

/// One request as the client saw it: completion time (s since the run started), latency (ms),
/// answering worker, whether the probe answered, whether it failed.
#[derive(Clone, Copy)]
struct Sample {
    done_s: f64,
    latency_ms: f64,
    pid: u32,
    probe: bool,
    failed: bool,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct Window {
    requests: usize,
    failed: usize,
    max_ms: f64,
    p999_ms: f64,
    p99_ms: f64,
    seconds: f64,
}

fn window(samples: &[Sample], from: f64, to: f64) -> Window {
    let mut lat: Vec<f64> = samples.iter().filter(|s| s.done_s >= from && s.done_s < to).map(|s| s.latency_ms).collect();
    let failed = samples.iter().filter(|s| s.done_s >= from && s.done_s < to && s.failed).count();
    Window {
        requests: lat.len(),
        failed,
        max_ms: lat.iter().copied().fold(0.0, f64::max),
        p999_ms: percentile(&mut lat, 99.9),
        p99_ms: percentile(&mut lat, 99.0),
        seconds: to - from,
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct Run {
    servers: usize,
    quiet: Window,
    change: Window,
    extra_stall_ms: f64,
    /// Consul write -> first request served by the probe, per worker (ms); None: never within 60 s.
    propagation_ms: BTreeMap<u32, Option<f64>>,
    /// Requests per answering worker in the run (both windows).
    requests_per_worker: BTreeMap<u32, usize>,
    version_step: i64,
    loadavg: String,
}

/// On-CPU time of each worker's main thread (its event loop; the Consul poller is a process of
/// its own, a builder thread another task), in ns, from the scheduler's accounting (`/proc/PID/task/PID/schedstat`).
fn event_loop_cpu_ns(pids: &[u32]) -> Vec<u64> {
    pids.iter()
        .map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// Event-loop CPU of the workers (ms each) over `CPU_WINDOW` after `f`, with no traffic.
fn event_loop_cpu_ms(pids: &[u32], f: impl FnOnce()) -> Vec<f64> {
    let before = event_loop_cpu_ns(pids);
    f();
    std::thread::sleep(CPU_WINDOW);
    event_loop_cpu_ns(pids).iter().zip(before).map(|(a, b)| a.saturating_sub(b) as f64 / 1e6).collect()
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct CpuRun {
    servers: usize,
    /// Event-loop CPU per worker (ms) in CPU_WINDOW without a change, then with one change.
    idle_ms: Vec<f64>,
    change_ms: Vec<f64>,
    version_step: i64,
}

impl CpuRun {
    /// The largest per-worker difference: CPU one change cost one event loop.
    fn extra_ms(&self) -> f64 {
        self.change_ms.iter().zip(&self.idle_ms).map(|(c, i)| c - i).fold(f64::MIN, f64::max)
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

/// Writes `entries` (key, value) with `/v1/txn`, TXN_OPS per transaction.
fn txn_put(consul: &Consul, entries: &[(String, &str)]) -> anyhow::Result<()> {
    let b64 = base64::engine::general_purpose::STANDARD;
    for chunk in entries.chunks(TXN_OPS) {
        let ops: Vec<serde_json::Value> = chunk
            .iter()
            .map(
                |(k, v)| serde_json::json!({ "KV": { "Verb": "set", "Key": format!("upstreams/{UPSTREAM}/{k}"), "Value": b64.encode(v) } }),
            )
            .collect();
        let (status, body) = consul.api("PUT", "/v1/txn", Some(serde_json::to_string(&ops)?.as_bytes()))?;
        anyhow::ensure!(status == 200, "Consul /v1/txn answered HTTP {status}: {body}");
    }
    Ok(())
}

/// `upstream_show` JSON of the upstream, read as a stream: at 50,000 servers it is larger than
/// the 10 MB `into_string` (and the harness's `show_json`) accepts.
fn show_json(front: &Nginx) -> anyhow::Result<serde_json::Value> {
    let url = front.url(&format!("/show?upstream={UPSTREAM}&format=json"));
    let r = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build().get(&url).call()?;
    let v: serde_json::Value = serde_json::from_reader(r.into_reader())?;
    Ok(v["upstreams"][0].clone())
}

/// Waits until `upstream_show` lists `n` servers with the probe `down` as given; the version.
fn wait_list(front: &Nginx, n: usize, probe: &str, probe_down: bool) -> anyhow::Result<u64> {
    let t0 = Instant::now();
    loop {
        let s = show_json(front)?;
        let servers = s["servers"].as_array().cloned().unwrap_or_default();
        let probe_ok = servers.iter().any(|x| x["server"] == probe && x["down"] == probe_down);
        if servers.len() == n && probe_ok {
            return Ok(s["sync"]["version"].as_u64().unwrap_or(0));
        }
        if t0.elapsed() > Duration::from_secs(300) {
            anyhow::bail!(
                "upstream {UPSTREAM} did not list {n} servers with {probe} down={probe_down} within 300 s (lists {}; sync {})",
                servers.len(),
                s["sync"]
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Closed-loop load on `url` from `conns` keep-alive connections until `stop`; the samples.
fn load(url: String, conns: usize, probe_name: String, epoch: Instant, stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<Vec<Sample>>> {
    (0..conns)
        .map(|_| {
            let (url, probe_name, stop) = (url.clone(), probe_name.clone(), stop.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().max_idle_connections_per_host(1).timeout(Duration::from_secs(60)).build();
                let mut out = Vec::with_capacity(1 << 16);
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let (pid, probe, failed) = match agent.get(&url).call() {
                        Ok(r) => {
                            let pid = r.header("X-Pid").and_then(|p| p.parse().ok()).unwrap_or(0);
                            let body = r.into_string().unwrap_or_default();
                            (pid, body == probe_name, false)
                        }
                        Err(_) => (0, false, true),
                    };
                    let done = Instant::now();
                    out.push(Sample {
                        done_s: done.duration_since(epoch).as_secs_f64(),
                        latency_ms: done.duration_since(t0).as_secs_f64() * 1000.0,
                        pid,
                        probe,
                        failed,
                    });
                }
                out
            })
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::var("UPSYNC_BENCH_STALL_SIZES")
        .unwrap_or_else(|_| "1000,20000,50000".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("UPSYNC_BENCH_STALL_SIZES must be comma-separated server counts: {e}"))?;
    anyhow::ensure!(sizes.iter().all(|&n| n > REAL), "every size in UPSYNC_BENCH_STALL_SIZES must exceed {REAL}");
    let runs = env("UPSYNC_BENCH_STALL_RUNS", 3) as usize;
    let conns = env("UPSYNC_BENCH_STALL_CONNS", 8) as usize;
    let workers = env("UPSYNC_BENCH_WORKERS", 2) as usize;
    let label = std::env::var("UPSYNC_BENCH_STALL_LABEL").unwrap_or_else(|_| "module".into());
    let module = upsync_tests::paths::module_so();

    let dir = TestDir::new("bench-stall");
    let consul = Consul::start(&dir.subdir("consul"));
    // Backends b0..b4 (b4 is the probe): one stock nginx, one port each, answering with the name.
    let mut servers = String::from("keepalive_requests 1000000;\n");
    for i in 0..=REAL {
        let port = if i == 0 { "{{port}}".to_string() } else { format!("{{{{port{i}}}}}") };
        servers.push_str(&format!("server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"b{i}\"; }} }}\n"));
    }
    let backends = Nginx::start(&dir.subdir("backends"), NginxConf::new(&servers).without_module().workers(1));
    let addr = |i: usize| format!("127.0.0.1:{}", if i == 0 { backends.port() } else { backends.extra_port(i) });
    let probe = addr(REAL);
    let probe_name = format!("b{REAL}");

    let mut initial: Vec<(String, &str)> = (0..REAL).map(|i| (addr(i), "")).collect();
    initial.push((probe.clone(), DOWN));
    txn_put(&consul, &initial)?;
    let front = Nginx::start(
        &dir.subdir("front"),
        NginxConf::new(&format!(
            "keepalive_requests 1000000;
             upstream {UPSTREAM} {{ server 127.0.0.1:9;
                 upsync {}/v1/kv/upstreams/{UPSTREAM} upsync_timeout=6m upsync_interval=100ms; keepalive 64; }}
             server {{ listen 127.0.0.1:{{{{port}}}} reuseport;
                       location / {{ proxy_pass http://{UPSTREAM}; proxy_http_version 1.1; proxy_set_header Connection \"\";
                                     add_header X-Pid $pid always; }}
                       location = /show {{ upstream_show; }} }}",
            consul.http_addr()
        ))
        .workers(workers),
    );
    let url = front.url("/");

    let mut loaded = 0usize; // fillers in Consul
    let mut results: Vec<Run> = Vec::new();
    let mut cpu_results: Vec<CpuRun> = Vec::new();
    for &n in &sizes {
        let want = n - REAL - 1;
        if want > loaded {
            eprintln!("loading {} filler entries ({n} servers)", want - loaded);
            let t = Instant::now();
            let entries: Vec<(String, &str)> = (loaded..want).map(|i| (filler(i), DOWN)).collect();
            txn_put(&consul, &entries)?;
            loaded = want;
            eprintln!("  {:.1} s", t.elapsed().as_secs_f64());
        } else {
            anyhow::ensure!(want == loaded, "UPSYNC_BENCH_STALL_SIZES must be increasing");
        }
        wait_list(&front, n, &probe, true)?;
        // Warm up: every worker installs the list and opens its keepalive connections.
        let stop = Arc::new(AtomicBool::new(false));
        let warm = load(url.clone(), conns, probe_name.clone(), Instant::now(), stop.clone());
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        warm.into_iter().for_each(|h| drop(h.join()));

        for run in 0..runs {
            let pids = front.active_worker_pids();
            let v_before = wait_list(&front, n, &probe, true)?;
            let la = loadavg();
            let epoch = Instant::now();
            let stop = Arc::new(AtomicBool::new(false));
            let threads = load(url.clone(), conns, probe_name.clone(), epoch, stop.clone());
            std::thread::sleep(QUIET);
            let t_change = epoch.elapsed().as_secs_f64();
            consul.kv_put(&format!("upstreams/{UPSTREAM}/{probe}"), UP);
            // Propagated when every worker served the probe: the threads' samples are not
            // visible before they end, so poll for it with a separate keep-alive client.
            let seen: Arc<Mutex<BTreeMap<u32, f64>>> = Arc::default();
            let watcher = {
                let (url, probe_name, seen, pids) = (url.clone(), probe_name.clone(), seen.clone(), pids.clone());
                std::thread::spawn(move || {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
                    let t0 = Instant::now();
                    while seen.lock().unwrap().len() < pids.len() && t0.elapsed() < Duration::from_secs(60) {
                        if let Ok(r) = agent.get(&url).set("Connection", "close").call() {
                            let pid: u32 = r.header("X-Pid").and_then(|p| p.parse().ok()).unwrap_or(0);
                            if r.into_string().unwrap_or_default() == probe_name {
                                seen.lock().unwrap().entry(pid).or_insert_with(|| epoch.elapsed().as_secs_f64());
                            }
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            };
            let _ = watcher.join();
            let after = epoch.elapsed().as_secs_f64() - t_change;
            std::thread::sleep(TAIL.max(CHANGE_MIN.saturating_sub(Duration::from_secs_f64(after))));
            let end = epoch.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            let samples: Vec<Sample> = threads.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect();

            // Propagation per worker from the load's own samples (and the watcher's).
            let mut propagation: BTreeMap<u32, Option<f64>> = pids.iter().map(|p| (*p, None)).collect();
            for s in samples.iter().filter(|s| s.probe) {
                let d = (s.done_s - t_change) * 1000.0;
                let e = propagation.entry(s.pid).or_insert(None);
                *e = Some(e.map_or(d, |x: f64| x.min(d)));
            }
            for (pid, t) in seen.lock().unwrap().iter() {
                let d = (t - t_change) * 1000.0;
                let e = propagation.entry(*pid).or_insert(None);
                *e = Some(e.map_or(d, |x: f64| x.min(d)));
            }
            let mut per_worker: BTreeMap<u32, usize> = BTreeMap::new();
            for s in &samples {
                *per_worker.entry(s.pid).or_insert(0) += 1;
            }
            let quiet = window(&samples, 0.2, t_change);
            let change = window(&samples, t_change, end);
            let v_after = wait_list(&front, n, &probe, false)?;
            let r = Run {
                servers: n,
                extra_stall_ms: change.max_ms - quiet.max_ms,
                quiet,
                change,
                propagation_ms: propagation,
                requests_per_worker: per_worker,
                version_step: v_after as i64 - v_before as i64,
                loadavg: la,
            };
            eprintln!(
                "  {n} servers, run {}: quiet max {:.1} ms p99.9 {:.1} ms | change max {:.1} ms p99.9 {:.1} ms | extra {:.1} ms | propagation {:?} | version +{} | per worker {:?} | load {}",
                run + 1,
                r.quiet.max_ms,
                r.quiet.p999_ms,
                r.change.max_ms,
                r.change.p999_ms,
                r.extra_stall_ms,
                r.propagation_ms,
                r.version_step,
                r.requests_per_worker,
                r.loadavg
            );
            results.push(r);
            // Put the probe down again (outside any window) and let every worker settle.
            consul.kv_put(&format!("upstreams/{UPSTREAM}/{probe}"), DOWN);
            wait_list(&front, n, &probe, true)?;
            std::thread::sleep(Duration::from_secs(1));
        }

        // Event-loop CPU of one change, without traffic: independent of how loaded the machine is.
        for run in 0..runs {
            let pids = front.active_worker_pids();
            let v_before = wait_list(&front, n, &probe, true)?;
            std::thread::sleep(Duration::from_secs(1));
            let idle_ms = event_loop_cpu_ms(&pids, || {});
            let change_ms = event_loop_cpu_ms(&pids, || consul.kv_put(&format!("upstreams/{UPSTREAM}/{probe}"), UP));
            let v_after = wait_list(&front, n, &probe, false)?;
            let r = CpuRun { servers: n, idle_ms, change_ms, version_step: v_after as i64 - v_before as i64 };
            eprintln!(
                "  {n} servers, CPU run {}: event-loop CPU per worker idle {:?} ms, with one change {:?} ms, version +{}",
                run + 1,
                r.idle_ms,
                r.change_ms,
                r.version_step
            );
            cpu_results.push(r);
            consul.kv_put(&format!("upstreams/{UPSTREAM}/{probe}"), DOWN);
            wait_list(&front, n, &probe, true)?;
        }
    }

    println!("### Big upstreams: request stall around one change ({label}, {workers} nginx workers, {conns} keep-alive connections)\n");
    println!("Worst of {runs} runs per size; quiet window {} s, change window from the Consul write until every worker served the new server plus {} s (at least {} s).\n", QUIET.as_secs(), TAIL.as_secs(), CHANGE_MIN.as_secs());
    println!("| servers | quiet max | quiet p99.9 | change max | change p99.9 | extra stall (max change - max quiet) | propagation to all workers | event-loop CPU of one change, per worker, no traffic | failed requests | load average |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let worst = |v: &[&Run], f: &dyn Fn(&Run) -> f64| v.iter().map(|r| f(r)).fold(f64::MIN, f64::max);
    let prop = |r: &Run| r.propagation_ms.values().map(|p| p.unwrap_or(f64::INFINITY)).fold(0.0, f64::max);
    for &n in &sizes {
        let rs: Vec<&Run> = results.iter().filter(|r| r.servers == n).collect();
        let p = worst(&rs, &prop);
        println!(
            "| {n} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | **{:.1} ms** | {} | {:.1} ms | {} | {} |",
            worst(&rs, &|r| r.quiet.max_ms),
            worst(&rs, &|r| r.quiet.p999_ms),
            worst(&rs, &|r| r.change.max_ms),
            worst(&rs, &|r| r.change.p999_ms),
            worst(&rs, &|r| r.extra_stall_ms),
            if p.is_finite() { format!("{p:.0} ms") } else { "not within 60 s".into() },
            cpu_results.iter().filter(|r| r.servers == n).map(CpuRun::extra_ms).fold(f64::MIN, f64::max),
            rs.iter().map(|r| r.quiet.failed + r.change.failed).sum::<usize>(),
            rs.iter().map(|r| r.loadavg.split(' ').next().unwrap_or("?")).collect::<Vec<_>>().join(", "),
        );
    }
    println!(
        "\nEvent-loop CPU: on-CPU time of each worker's main thread ({} s after one change minus {} s without), worst worker of {runs} runs.",
        CPU_WINDOW.as_secs(),
        CPU_WINDOW.as_secs()
    );
    println!("\nModule: `{}`.", module.display());
    let out = upsync_tests::paths::build_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let json = serde_json::json!({ "label": label, "module": module, "workers": workers, "connections": conns, "runs": results, "cpu_runs": cpu_results });
    std::fs::write(out.join(format!("stall-{label}.json")), serde_json::to_string_pretty(&json)?)?;
    let bad = results.iter().filter(|r| r.version_step != 1 || r.propagation_ms.values().any(Option::is_none)).count()
        + cpu_results.iter().filter(|r| r.version_step != 1).count();
    if bad > 0 {
        anyhow::bail!("{bad} run(s) did not see exactly one change reach every worker (see build/bench/stall-{label}.json)");
    }
    Ok(())
}
