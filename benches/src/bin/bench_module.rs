//! End-to-end benchmark of the nginx module (`make bench`, or `scripts/bench/module.sh`).
//!
//! Everything runs in one go on loopback, so the figures are ratios measured side by side:
//! 1. steady load: wrk through nginx + module (servers synced from Consul) vs stock nginx with
//!    the same servers written statically; same worker count, `keepalive` on both;
//! 2. churn (one server added or removed every second) through the module, and the same churn
//!    done the reload way (rewrite an `include` file + `nginx -s reload`);
//! 3. propagation delay: Consul write -> first request served by the new server.
//!
//! The backends are a stock nginx answering with its port's name (fast enough not to be the
//! bottleneck). Settings: UPSYNC_BENCH_SECS (default 10), UPSYNC_BENCH_WORKERS (2),
//! UPSYNC_BENCH_CONNS (64), UPSYNC_BENCH_ROUNDS (60).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use upsync_benches::{percentile, wrk, wrk_cpu, WrkReport};
use upsync_tests::consul::Consul;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::upsync::{put_server, wait_servers};
use upsync_tests::TestDir;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

const BACKENDS: usize = 6;
const BASE: usize = 4;

fn main() -> anyhow::Result<()> {
    let secs = Duration::from_secs(env("UPSYNC_BENCH_SECS", 10));
    let workers = env("UPSYNC_BENCH_WORKERS", 2) as usize;
    let conns = env("UPSYNC_BENCH_CONNS", 64) as u32;
    let rounds = env("UPSYNC_BENCH_ROUNDS", 60) as usize;
    let dir = TestDir::new("bench-module");
    let consul = Consul::start(&dir.subdir("consul"));

    // Backends: one stock nginx, one port per backend, answering with the backend's name.
    let (_backends, addrs) = upsync_benches::named_backends(&dir.subdir("backends"), BACKENDS);
    let addr = |i: usize| addrs[i].clone();

    // The same front config for all three; only the module's has upstream_show.
    let front = |upstream_body: &str, with_module: bool| -> String {
        let show = if with_module { "location = /show { upstream_show; }" } else { "" };
        format!(
            "keepalive_requests 1000000;
             upstream app {{ {upstream_body} keepalive 64; }}
             server {{ listen 127.0.0.1:{{{{port}}}};
                       location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}
                       {show} }}"
        )
    };
    // The module's front: interval 100 ms lets the poll loop follow 10 changes a second.
    let upsync_body =
        format!("server 127.0.0.1:9; upsync {}/v1/kv/upstreams/app upsync_timeout=6m upsync_interval=100ms;", consul.http_addr());
    let module = Nginx::start(&dir.subdir("module"), NginxConf::new(&front(&upsync_body, true)).workers(workers));
    for i in 0..BASE {
        put_server(&consul, "app", &addr(i), "");
    }
    let base: Vec<String> = (0..BASE).map(addr).collect();
    wait_servers(&module, "app", &base.iter().map(String::as_str).collect::<Vec<_>>());

    let static_body: String = base.iter().map(|a| format!("server {a};")).collect();
    let stock = Nginx::start(&dir.subdir("stock"), NginxConf::new(&front(&static_body, false)).without_module().workers(workers));
    let reload_dir = dir.subdir("reload");
    let include = reload_dir.join("servers.conf");
    std::fs::write(&include, &static_body)?;
    let reload = Nginx::start(
        &reload_dir,
        NginxConf::new(&front(&format!("include {};", include.display()), false)).without_module().workers(workers),
    );

    eprintln!("warming up");
    for n in [&module, &stock, &reload] {
        wrk(&n.url("/"), 2, conns, Duration::from_secs(2))?;
    }

    // 1. Steady load, interleaved twice to even out drift on a shared machine.
    let mut steady_module = Vec::new();
    let mut steady_stock = Vec::new();
    for _ in 0..2 {
        eprintln!("steady: module");
        steady_module.push(wrk_cpu(&module.url("/"), 2, conns, secs, &module.worker_pids())?);
        eprintln!("steady: stock nginx");
        steady_stock.push(wrk_cpu(&stock.url("/"), 2, conns, secs, &stock.worker_pids())?);
    }

    // 2. Churn: server b4 added / removed every second.
    eprintln!("churn: module (Consul writes)");
    let churned = addr(BASE);
    let churn_module = {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c, a) = (stop.clone(), consul.http_addr(), churned.clone());
        let t = std::thread::spawn(move || {
            let mut on = false;
            while !s.load(Ordering::Relaxed) {
                on = !on;
                let url = format!("http://{c}/v1/kv/upstreams/app/{a}");
                let _ = if on { ureq::put(&url).send_string("") } else { ureq::delete(&url).call() };
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        let r = wrk_cpu(&module.url("/"), 2, conns, secs + Duration::from_secs(5), &module.worker_pids())?;
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        r
    };
    eprintln!("churn: stock nginx with include file + reload");
    let reloads_before = reload.worker_pids().len();
    let churn_reload = {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, inc, master) = (stop.clone(), include.clone(), reload.master_pid());
        let (base_body, extra) = (static_body.clone(), format!("server {churned};"));
        let t = std::thread::spawn(move || {
            let mut on = false;
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                on = !on;
                let body = if on { format!("{base_body}{extra}") } else { base_body.clone() };
                let _ = std::fs::write(&inc, body);
                // SAFETY: a signal to the master of the nginx this benchmark started.
                unsafe { libc::kill(master as i32, libc::SIGHUP) };
                n += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            n
        });
        let r = wrk(&reload.url("/"), 2, conns, secs + Duration::from_secs(5))?;
        stop.store(true, Ordering::Relaxed);
        let n = t.join().unwrap();
        eprintln!("  {n} reloads");
        r
    };
    let _ = reloads_before;

    // 3. Propagation: PUT a heavy server, time until a request lands on it.
    eprintln!("propagation: {rounds} rounds");
    let probe = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
    let url = module.url("/");
    let target = format!("b{}", BASE + 1);
    let key = format!("http://{}/v1/kv/upstreams/app/{}", consul.http_addr(), addr(BASE + 1));
    let _ = ureq::delete(&format!("http://{}/v1/kv/upstreams/app/{churned}", consul.http_addr())).call();
    let mut delays = Vec::new();
    for _ in 0..rounds {
        let t0 = Instant::now();
        ureq::put(&key).send_string("{\"weight\":1000}")?;
        loop {
            let body = probe.get(&url).call().map(|r| r.into_string().unwrap_or_default()).unwrap_or_default();
            if body == target {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                anyhow::bail!("the new server got no request within 10 s");
            }
        }
        delays.push(t0.elapsed().as_secs_f64() * 1000.0);
        ureq::delete(&key).call()?;
        let t1 = Instant::now();
        while probe.get(&url).call().map(|r| r.into_string().unwrap_or_default()).unwrap_or_default() == target {
            if t1.elapsed() > Duration::from_secs(10) {
                anyhow::bail!("the removed server still gets requests after 10 s");
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let p50 = percentile(&mut delays, 50.0);
    let p99 = percentile(&mut delays, 99.0);

    // 4. Memory: UPSYNC_BENCH_CHANGES writes (default 100,000) to a second upstream that follows
    //    every change it can (upsync_interval=1ms); RSS of the workers before and after.
    let changes = env("UPSYNC_BENCH_CHANGES", 100_000) as usize;
    eprintln!("memory: {changes} changes");
    let mem = Nginx::start(
        &dir.subdir("memory"),
        NginxConf::new(&front(
            &format!("server 127.0.0.1:9; upsync {}/v1/kv/upstreams/mem upsync_interval=1ms;", consul.http_addr()),
            true,
        ))
        .workers(workers),
    );
    put_server(&consul, "mem", &addr(0), "");
    wait_servers(&mem, "app", &[&addr(0)]);
    // Private memory (RssAnon) and touched pages of shared memory (RssShmem: the module's zone,
    // bounded by upsync_shm_size), summed over the workers, in KiB.
    let rss = |n: &Nginx| {
        let sum = |field: &str| n.worker_pids().iter().filter_map(|p| upsync_tests::proc::status_kib(*p, field)).sum::<u64>();
        (sum("RssAnon"), sum("RssShmem"))
    };
    let writer = ureq::AgentBuilder::new().build();
    let churn_url =
        |i: usize| format!("http://{}/v1/kv/upstreams/mem/10.{}.{}.{}:80", consul.http_addr(), (i / 65536) % 256, (i / 256) % 256, i % 256);
    let warm = 2_000.min(changes);
    for i in 0..warm {
        writer.put(&churn_url(i % 50)).send_string("{\"down\":1}")?;
        writer.delete(&churn_url(i % 50)).call()?;
    }
    let rss_before = rss(&mem);
    let v_before = upsync_tests::upsync::show_json(&mem, "app")["sync"]["version"].as_u64().unwrap_or(0);
    let t_mem = Instant::now();
    // RSS at each quarter of the writes: a leak grows with every quarter, allocator warm-up does not.
    let mut rss_quarters = Vec::new();
    for i in 0..changes / 2 {
        writer.put(&churn_url(i % 50)).send_string("{\"down\":1}")?;
        writer.delete(&churn_url(i % 50)).call()?;
        if i % 1000 == 0 {
            let _ = wrk(&mem.url("/"), 1, 4, Duration::from_secs(1)).ok();
        }
        if (i + 1) % (changes / 8).max(1) == 0 {
            rss_quarters.push(rss(&mem));
        }
    }
    wait_servers(&mem, "app", &[&addr(0)]);
    let rss_after = rss(&mem);
    let v_after = upsync_tests::upsync::show_json(&mem, "app")["sync"]["version"].as_u64().unwrap_or(0);
    eprintln!("  {} s", t_mem.elapsed().as_secs());

    let mean = |v: &[WrkReport], f: fn(&WrkReport) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    let (m_rps, s_rps) = (mean(&steady_module, |r| r.requests_per_sec), mean(&steady_stock, |r| r.requests_per_sec));
    let (m_p99, s_p99) = (mean(&steady_module, |r| r.latency_p99_ms), mean(&steady_stock, |r| r.latency_p99_ms));
    let errs = |r: &WrkReport| r.non_2xx + r.socket_errors;
    println!("### nginx module (wrk -t2 -c{conns}, {} s runs, {workers} nginx workers, keepalive 64)\n", secs.as_secs());
    let (m_cpu, s_cpu) = (mean(&steady_module, |r| r.cpu_us_per_request), mean(&steady_stock, |r| r.cpu_us_per_request));
    println!("| run | req/s | p99 latency | nginx CPU/request | non-2xx | socket errors |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| stock nginx, static servers | {s_rps:.0} | {s_p99:.2} ms | {s_cpu:.1} µs | {} | {} |",
        steady_stock.iter().map(|r| r.non_2xx).sum::<u64>(),
        steady_stock.iter().map(|r| r.socket_errors).sum::<u64>()
    );
    println!(
        "| nginx + upsync module | {m_rps:.0} | {m_p99:.2} ms | {m_cpu:.1} µs | {} | {} |",
        steady_module.iter().map(|r| r.non_2xx).sum::<u64>(),
        steady_module.iter().map(|r| r.socket_errors).sum::<u64>()
    );
    println!(
        "| upsync module, churn 1 change/s | {:.0} | {:.2} ms | {:.1} µs | {} | {} |",
        churn_module.requests_per_sec,
        churn_module.latency_p99_ms,
        churn_module.cpu_us_per_request,
        churn_module.non_2xx,
        churn_module.socket_errors
    );
    println!(
        "| include file + nginx -s reload, churn 1 change/s | {:.0} | {:.2} ms | n/a (workers replaced) | {} | {} |",
        churn_reload.requests_per_sec, churn_reload.latency_p99_ms, churn_reload.non_2xx, churn_reload.socket_errors
    );
    println!();
    println!(
        "- module / stock throughput: **{:.3}**, CPU per request **{:.3}**, p99 {:.2} ms vs {:.2} ms",
        m_rps / s_rps,
        m_cpu / s_cpu,
        m_p99,
        s_p99
    );
    println!(
        "- under churn: module {:.3} of stock with {} failed requests; reload approach {:.3} of stock with {} failed requests",
        churn_module.requests_per_sec / s_rps,
        errs(&churn_module),
        churn_reload.requests_per_sec / s_rps,
        errs(&churn_reload)
    );
    println!("- propagation (Consul write -> first request on the new server), {rounds} rounds: p50 {p50:.1} ms, p99 {p99:.1} ms");
    let kib = |(anon, shm): (u64, u64)| format!("{anon} + {shm}");
    println!(
        "- memory: {changes} Consul writes, {} server lists installed by each worker; RSS of the {workers} workers, private + shared-zone pages (KiB): before {}, after each quarter {}",
        v_after.saturating_sub(v_before),
        kib(rss_before),
        rss_quarters.iter().map(|q| kib(*q)).collect::<Vec<_>>().join(", "),
    );
    let json = serde_json::json!({
        "steady_module": steady_module, "steady_stock": steady_stock,
        "churn_module": churn_module, "churn_reload": churn_reload,
        "propagation_ms": { "p50": p50, "p99": p99, "rounds": rounds },
        "memory": { "changes": changes, "lists_installed": v_after.saturating_sub(v_before), "rss_kib_before": rss_before, "rss_kib_after": rss_after, "rss_kib_quarters": rss_quarters },
        "workers": workers, "connections": conns, "seconds": secs.as_secs(),
    });
    let out = upsync_tests::paths::build_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("module.json"), serde_json::to_string_pretty(&json)?)?;
    if errs(&churn_module) > 0 {
        anyhow::bail!("the module failed {} requests under churn", errs(&churn_module));
    }
    Ok(())
}
