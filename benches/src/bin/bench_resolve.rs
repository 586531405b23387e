//! The module beside nginx's own `server NAME resolve` (nginx >= 1.27.3) and the reload way, on
//! the same work (`make bench`, or `scripts/bench/resolve.sh`).
//!
//! Four fronts, all nginx 1.28 (`make build NGINX=1.28`) with 2 workers and `keepalive 64`, in
//! front of the same 6 backends (a stock nginx answering with each port's name):
//! - `module`: the upsync module following `/v1/health/service/app` (`upsync_type=consul_health`);
//! - `reload`: stock nginx, an `include` file rewritten and `nginx -s reload` (consul-template's way);
//! - `resolve_consul`: stock nginx, `server service.consul service=app resolve` in a `zone`
//!   upstream, `resolver` pointed at Consul's DNS interface;
//! - `resolve_upsync_dns`: the same with `service.upsync` through upsync-dns.
//!
//! Consul runs with `dns_config { enable_truncate = true }`: by default its DNS answers at most
//! 3 records over UDP without the TC flag, and nginx's `resolve` then sees 3 instances (a
//! different 3 at each resolution); with TC set nginx asks again over TCP and sees them all.
//! The resolvers use `valid=1s`: Consul's DNS answers with TTL 0, which would make nginx
//! re-resolve every millisecond, and nginx's re-resolution timer counts in whole seconds
//! (`valid - now + 1`), so 1 s is the shortest period nginx can be given: it re-resolves every
//! 2 s. upsync-dns's own TTL (5 s) would be slower still.
//!
//! Measured, one front at a time: (1) churn: wrk while one instance is registered and
//! deregistered in Consul every second (for `reload`: the include file rewritten and SIGHUP
//! every second), throughput over time from the backends' request counter (`stub_status`,
//! sampled every 250 ms) and failed requests; (2) what each can express: a weight, `backup`,
//! `down` and a drain (Consul's maintenance mode), each checked by counting which backend
//! answers; (3) propagation: Consul registration -> first request on the new instance.
//! Writes build/bench/resolve.json (read by `bench-report`). Settings: UPSYNC_BENCH_SECS (10),
//! UPSYNC_BENCH_WORKERS (2), UPSYNC_BENCH_CONNS (64), UPSYNC_BENCH_RESOLVE_ROUNDS (40).
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use upsync_benches::{backend_requests, percentile, wrk, WrkReport};
use upsync_tests::consul::{Consul, ConsulOptions};
use upsync_tests::dns::{DnsOptions, DnsServer};
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::TestDir;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

const BACKENDS: usize = 6;
const BASE: usize = 4;
/// The instance added and removed every second under churn.
const CHURNED: usize = BASE;
/// The instance whose registration the propagation rounds time.
const PROBE: usize = BASE + 1;
/// How long a change is given to reach every front before the expressiveness counts: two of
/// nginx's re-resolution periods (2 s with `valid=1s`) and some.
const SETTLE: Duration = Duration::from_secs(5);

/// The fronts that follow Consul (the reload front follows its include file).
const FOLLOWERS: [&str; 3] = ["module", "resolve_consul", "resolve_upsync_dns"];

struct Registry<'a> {
    consul: &'a Consul,
    addrs: &'a [String],
}

impl Registry<'_> {
    /// Registers backend `i` as instance `b<i>` of service `app`, with `weight` in the upsync
    /// tag (module, upsync-dns) and in Consul's `Weights` (Consul's DNS SRV weight).
    fn register(&self, i: usize, weight: u32, tags: &[&str]) {
        let port: u16 = self.addrs[i].rsplit(':').next().and_then(|p| p.parse().ok()).expect("backend port");
        let mut tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
        if weight != 1 {
            tags.push(format!("weight={weight}"));
        }
        self.consul.register_service(&json!({
            "ID": format!("b{i}"), "Name": "app", "Address": "127.0.0.1", "Port": port, "Tags": tags,
            "Weights": { "Passing": weight, "Warning": 1 },
        }));
    }

    fn deregister(&self, i: usize) {
        self.consul.deregister_service(&format!("b{i}"));
    }

    fn maintenance(&self, i: usize, on: bool) {
        let path = format!("/v1/agent/service/maintenance/b{i}?enable={on}&reason=bench");
        match self.consul.api("PUT", &path, None) {
            Ok((200, _)) => {}
            other => panic!("Consul PUT {path}: {other:?}"),
        }
    }
}

/// Answers of `n` requests through one keepalive client: backend name -> count, failures as "failed".
fn count(agent: &ureq::Agent, url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let key = agent.get(url).call().ok().and_then(|r| r.into_string().ok()).unwrap_or_else(|| "failed".into());
        *m.entry(key).or_insert(0) += 1;
    }
    m
}

/// Waits (at most 60 s) until 40 requests in a row are answered by exactly the backends `names`.
fn wait_served_by(agent: &ureq::Agent, url: &str, names: &[String]) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let h = count(agent, url, 40);
        if h.len() == names.len() && names.iter().all(|n| h.contains_key(n)) {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("{url} not served by exactly {names:?} after 60 s: {h:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pause of 0..max_ms, different every call, so that propagation rounds do not keep the same
/// phase against nginx's re-resolution timer.
fn jitter(max_ms: u64) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) as u64;
    Duration::from_millis(nanos.wrapping_mul(6364136223846793005).rotate_right(17) % max_ms.max(1))
}

/// wrk's report of a churn run, the throughput series (seconds since the start, requests/s)
/// and the seconds at which changes were made.
type Churn = (WrkReport, Vec<(f64, f64)>, Vec<f64>);

/// One churn run: wrk against `url` while `change(on)` is called every second, and the
/// backends' request counter sampled every 250 ms. Returns wrk's report, the throughput series
/// (seconds since the start, requests/s) and the seconds at which changes were made.
fn churn(url: &str, conns: u32, secs: Duration, counter_addr: &str, change: impl Fn(bool) + Send + 'static) -> anyhow::Result<Churn> {
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let changer = {
        let (stop, changes) = (stop.clone(), changes.clone());
        std::thread::spawn(move || {
            let mut on = false;
            // First change a second in, so the series starts with a flat stretch.
            std::thread::sleep(Duration::from_secs(1));
            while !stop.load(Ordering::Relaxed) {
                on = !on;
                change(on);
                changes.lock().unwrap().push(t0.elapsed().as_secs_f64());
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let sampler = {
        let (stop, addr) = (stop.clone(), counter_addr.to_string());
        std::thread::spawn(move || {
            let mut series = Vec::new();
            let mut last = (Instant::now(), backend_requests(&addr).unwrap_or(0));
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let now = (Instant::now(), backend_requests(&addr).unwrap_or(last.1));
                let dt = now.0.duration_since(last.0).as_secs_f64();
                series.push((now.0.duration_since(t0).as_secs_f64(), now.1.saturating_sub(last.1) as f64 / dt));
                last = now;
            }
            series
        })
    };
    let report = wrk(url, 2, conns, secs);
    stop.store(true, Ordering::Relaxed);
    changer.join().map_err(|_| anyhow::anyhow!("the churn thread panicked"))?;
    let series = sampler.join().map_err(|_| anyhow::anyhow!("the sampling thread panicked"))?;
    let changes = changes.lock().unwrap().clone();
    Ok((report?, series, changes))
}

/// Propagation rounds against one front: register the probe instance with weight 1000, time
/// until a request lands on it, deregister it, wait until requests leave it.
fn propagation(reg: &Registry, url: &str, rounds: usize) -> anyhow::Result<Vec<f64>> {
    let probe = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
    let target = format!("b{PROBE}");
    let answer = || probe.get(url).call().ok().and_then(|r| r.into_string().ok()).unwrap_or_default();
    let mut delays = Vec::new();
    for _ in 0..rounds {
        let t0 = Instant::now();
        reg.register(PROBE, 1000, &[]);
        while answer() != target {
            if t0.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("{url}: the new instance got no request within 30 s");
            }
        }
        delays.push(t0.elapsed().as_secs_f64() * 1000.0);
        reg.deregister(PROBE);
        // Gone when 300 answers in a row come from others: while it is listed with weight
        // 1000 against 4, one request in 251 goes elsewhere, so one such answer proves nothing.
        let (t1, mut others) = (Instant::now(), 0);
        while others < 300 {
            others = if answer() == target { 0 } else { others + 1 };
            if t1.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("{url}: the removed instance still gets requests after 30 s");
            }
        }
        // 0-2 s more: a registration lands anywhere in nginx's 2 s re-resolution period.
        std::thread::sleep(Duration::from_millis(250) + jitter(2000));
    }
    Ok(delays)
}

fn main() -> anyhow::Result<()> {
    let secs = Duration::from_secs(env("UPSYNC_BENCH_SECS", 10));
    let workers = env("UPSYNC_BENCH_WORKERS", 2) as usize;
    let conns = env("UPSYNC_BENCH_CONNS", 64) as u32;
    let rounds = env("UPSYNC_BENCH_RESOLVE_ROUNDS", 40) as usize;
    let dir = TestDir::new("bench-resolve");
    // Consul's DNS answers at most 3 records over UDP (`udp_answer_limit`), without setting TC:
    // nginx would see 3 instances of 4, a different 3 at every resolution. A careful operator
    // sets `enable_truncate`, so that nginx asks again over TCP and gets them all.
    let opts = ConsulOptions { extra_hcl: vec!["dns_config { enable_truncate = true }".into()], ..Default::default() };
    let consul = Consul::start_with(&dir.subdir("consul"), opts);
    let dns = DnsServer::start(&dir.subdir("dns"), &consul.http_addr(), DnsOptions::default());
    let (_backends, addrs) = upsync_benches::named_backends(&dir.subdir("backends"), BACKENDS);
    let reg = Registry { consul: &consul, addrs: &addrs };
    for i in 0..BASE {
        reg.register(i, 1, &[]);
    }
    let nginx_version = {
        let out = std::process::Command::new(upsync_tests::paths::nginx128_bin()).arg("-v").output()?;
        String::from_utf8_lossy(&out.stderr).trim().trim_start_matches("nginx version: ").to_string()
    };

    let front = |upstream_body: &str, before: &str| -> String {
        format!(
            "keepalive_requests 1000000;
             {before}
             upstream app {{ {upstream_body} keepalive 64; }}
             server {{ listen 127.0.0.1:{{{{port}}}};
                       location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        )
    };
    let conf = |http: String| NginxConf::new(&http).nginx128().workers(workers);
    let module_body = format!(
        "server 127.0.0.1:9; upsync {}/v1/health/service/app upsync_type=consul_health upsync_timeout=6m upsync_interval=100ms;",
        consul.http_addr()
    );
    let resolver = |port: u16| format!("resolver 127.0.0.1:{port} valid=1s ipv6=off;");
    let mut fronts: BTreeMap<&str, Nginx> = BTreeMap::new();
    fronts.insert("module", Nginx::start(&dir.subdir("module"), conf(front(&module_body, ""))));
    let reload_dir = dir.subdir("reload");
    let include = reload_dir.join("servers.conf");
    let static_body: String = addrs[..BASE].iter().map(|a| format!("server {a};")).collect();
    std::fs::write(&include, &static_body)?;
    fronts.insert("reload", Nginx::start(&reload_dir, conf(front(&format!("include {};", include.display()), "")).without_module()));
    fronts.insert(
        "resolve_consul",
        Nginx::start(
            &dir.subdir("resolve-consul"),
            conf(front("zone app 1m; server service.consul service=app resolve;", &resolver(consul.ports.dns))).without_module(),
        ),
    );
    fronts.insert(
        "resolve_upsync_dns",
        Nginx::start(
            &dir.subdir("resolve-upsync-dns"),
            conf(front("zone app 1m; server service.upsync service=app resolve;", &resolver(dns.port))).without_module(),
        ),
    );
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
    let base_names: Vec<String> = (0..BASE).map(|i| format!("b{i}")).collect();
    for (name, n) in &fronts {
        eprintln!("{name}: waiting for the {BASE} base instances");
        wait_served_by(&agent, &n.url("/"), &base_names)?;
        wrk(&n.url("/"), 2, conns, Duration::from_secs(2))?;
    }

    // 1. Churn, one front at a time.
    let mut churn_runs = BTreeMap::new();
    for (name, n) in &fronts {
        eprintln!("churn: {name}");
        let run_secs = secs + Duration::from_secs(5);
        let run = if *name == "reload" {
            let (inc, master, base, extra) = (include.clone(), n.master_pid(), static_body.clone(), format!("server {};", addrs[CHURNED]));
            churn(&n.url("/"), conns, run_secs, &addrs[0], move |on| {
                let _ = std::fs::write(&inc, if on { format!("{base}{extra}") } else { base.clone() });
                // SAFETY: a signal to the master of the nginx this benchmark started.
                unsafe { libc::kill(master as i32, libc::SIGHUP) };
            })?
        } else {
            let (c, port) = (consul.http_addr(), addrs[CHURNED].rsplit(':').next().unwrap_or("0").to_string());
            churn(&n.url("/"), conns, run_secs, &addrs[0], move |on| {
                let url = format!("http://{c}/v1/agent/service/");
                let _ = if on {
                    ureq::put(&format!("{url}register"))
                        .send_string(&format!(r#"{{"ID":"b{CHURNED}","Name":"app","Address":"127.0.0.1","Port":{port}}}"#))
                } else {
                    ureq::put(&format!("{url}deregister/b{CHURNED}")).call()
                };
            })?
        };
        eprintln!("  {:.0} req/s, {} failed", run.0.requests_per_sec, run.0.non_2xx + run.0.socket_errors);
        churn_runs.insert(*name, run);
        reg.deregister(CHURNED);
        std::fs::write(&include, &static_body)?;
    }

    // 2. What each can express: b0 and b1 only, then one attribute of b1 at a time. Before the
    //    propagation rounds: nginx's smooth weighted round robin keeps each peer's running
    //    weight, and the weight-1000 probe instance of those rounds leaves the others' far
    //    below zero for a thousand requests after it is gone (the module's lists start afresh).
    eprintln!("expressiveness");
    for i in 2..BASE {
        reg.deregister(i);
    }
    let two: Vec<String> = vec!["b0".into(), "b1".into()];
    for name in FOLLOWERS {
        wait_served_by(&agent, &fronts[name].url("/"), &two)?;
    }
    type Check<'a> = (&'static str, &'static str, Box<dyn Fn() + 'a>, Box<dyn Fn() + 'a>);
    let checks: Vec<Check> = vec![
        (
            "weight",
            "b1 weight 3 (tag `weight=3`, Consul `Weights.Passing` 3): share of b1, 0.75 when honoured",
            Box::new(|| reg.register(1, 3, &[])),
            Box::new(|| reg.register(1, 1, &[])),
        ),
        (
            "backup",
            "b1 tagged `backup`: share of b1, 0 when honoured",
            Box::new(|| reg.register(1, 1, &["backup"])),
            Box::new(|| reg.register(1, 1, &[])),
        ),
        (
            "down",
            "b1 tagged `down`: share of b1, 0 when honoured",
            Box::new(|| reg.register(1, 1, &["down"])),
            Box::new(|| reg.register(1, 1, &[])),
        ),
        (
            "drain",
            "b1 in maintenance (Consul's drain; upsync-sidecar drains this way): share of b1, 0 when honoured",
            Box::new(|| reg.maintenance(1, true)),
            Box::new(|| reg.maintenance(1, false)),
        ),
    ];
    let mut express: BTreeMap<&str, BTreeMap<&str, serde_json::Value>> = BTreeMap::new();
    for (what, _, apply, undo) in &checks {
        apply();
        std::thread::sleep(SETTLE);
        for name in FOLLOWERS {
            let h = count(&agent, &fronts[name].url("/"), 400);
            let share = h.get("b1").copied().unwrap_or(0) as f64 / 400.0;
            let honoured = match *what {
                "weight" => (0.65..=0.85).contains(&share),
                _ => share == 0.0,
            };
            eprintln!("  {what} on {name}: b1 share {share:.2} {h:?}");
            express.entry(name).or_default().insert(what, json!({ "b1_share": share, "honoured": honoured, "answers": h }));
        }
        undo();
        for name in FOLLOWERS {
            wait_served_by(&agent, &fronts[name].url("/"), &two)?;
        }
    }

    for i in 2..BASE {
        reg.register(i, 1, &[]);
    }
    for name in FOLLOWERS {
        wait_served_by(&agent, &fronts[name].url("/"), &base_names)?;
    }

    // 3. Propagation, for the fronts that follow Consul.
    let mut delays = BTreeMap::new();
    for name in FOLLOWERS {
        eprintln!("propagation: {name}, {rounds} rounds");
        delays.insert(name, propagation(&reg, &fronts[name].url("/"), rounds)?);
    }

    // Report.
    let label = |name: &str| match name {
        "module" => "upsync module (consul_health)",
        "reload" => "include file + `nginx -s reload`",
        "resolve_consul" => "`resolve` via Consul DNS",
        "resolve_upsync_dns" => "`resolve` via upsync-dns",
        _ => "?",
    };
    println!("### nginx's `resolve` beside the module ({nginx_version}, wrk -t2 -c{conns}, {workers} workers, keepalive 64, resolver `valid=1s`)\n");
    println!("| front | churn: req/s | p99 latency | failed requests | propagation p50 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut prop_json = BTreeMap::new();
    for (name, (r, _, _)) in &churn_runs {
        let (p50, p99, max) = match delays.get(name) {
            Some(d) => {
                let mut d = d.clone();
                let (p50, p99, max) = (percentile(&mut d, 50.0), percentile(&mut d, 99.0), percentile(&mut d, 100.0));
                prop_json.insert(*name, json!({ "p50": p50, "p99": p99, "max": max, "samples_ms": d }));
                (format!("{p50:.1} ms"), format!("{p99:.1} ms"), format!("{max:.1} ms"))
            }
            None => ("n/a".into(), "n/a".into(), "n/a".into()),
        };
        println!(
            "| {} | {:.0} | {:.2} ms | {} | {p50} | {p99} | {max} |",
            label(name),
            r.requests_per_sec,
            r.latency_p99_ms,
            r.non_2xx + r.socket_errors
        );
    }
    println!("\n| can express | {} | reload |", FOLLOWERS.map(label).join(" | "));
    println!("|---|---|---|---|---|");
    for (what, desc, _, _) in &checks {
        let cells: Vec<String> = FOLLOWERS
            .iter()
            .map(|f| {
                let v = &express[f][what];
                format!("{} ({:.2})", if v["honoured"] == true { "yes" } else { "**no**" }, v["b1_share"].as_f64().unwrap_or(f64::NAN))
            })
            .collect();
        println!("| {what}: {desc} | {} | in nginx.conf, applied by a reload |", cells.join(" | "));
    }
    let json = json!({
        "nginx": nginx_version, "workers": workers, "connections": conns, "seconds": secs.as_secs() + 5,
        "resolver_valid_s": 1, "rounds": rounds,
        "churn": churn_runs.iter().map(|(k, (r, series, changes))| (k.to_string(), json!({
            "label": label(k), "report": r, "series": series, "changes_s": changes,
        }))).collect::<serde_json::Map<_, _>>(),
        "propagation_ms": prop_json,
        "expressiveness": express,
    });
    let out = upsync_tests::paths::build_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("resolve.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
