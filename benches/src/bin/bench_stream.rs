//! End-to-end benchmark of the stream module (`scripts/bench/stream.sh`): new TCP connections
//! per second through nginx's stream proxy, with the upstream synced from Consul by
//! `ngx_stream_upsync_module` vs stock nginx with the same servers written statically. wrk sends
//! `Connection: close`, so every request is a new client connection and a new upstream
//! connection (peer init, balancing, connect): the path the module adds to.
//!
//! The two fronts run side by side, interleaved twice. The backends are a stock nginx answering
//! with its port's name. Settings: UPSYNC_BENCH_SECS (default 10), UPSYNC_BENCH_WORKERS (2),
//! UPSYNC_BENCH_CONNS (32).
use std::time::Duration;

use upsync_benches::{cpu_us, wrk_with, WrkReport};
use upsync_tests::consul::Consul;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::stream::wait_stream_servers;
use upsync_tests::upsync::put_server;
use upsync_tests::TestDir;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

const BACKENDS: usize = 4;

/// wrk with one connection per request; CPU of `pids` per connection filled in.
fn run(n: &Nginx, conns: u32, secs: Duration) -> anyhow::Result<WrkReport> {
    let pids = n.worker_pids();
    let before = cpu_us(&pids);
    let mut r = wrk_with(&n.url("/"), 2, conns, secs, &["-H", "Connection: close"])?;
    r.cpu_us_per_request = (cpu_us(&pids) - before) / r.requests.max(1) as f64;
    Ok(r)
}

fn main() -> anyhow::Result<()> {
    let secs = Duration::from_secs(env("UPSYNC_BENCH_SECS", 10));
    let workers = env("UPSYNC_BENCH_WORKERS", 2) as usize;
    let conns = env("UPSYNC_BENCH_CONNS", 32) as u32;
    let dir = TestDir::new("bench-stream");
    let consul = Consul::start(&dir.subdir("consul"));
    let (_backends, addrs) = upsync_benches::named_backends(&dir.subdir("backends"), BACKENDS);

    let front = |upstream_body: &str| {
        format!(
            "upstream app {{ {upstream_body} }}
             server {{ listen 127.0.0.1:{{{{port}}}}; proxy_pass app; }}"
        )
    };
    let synced = format!("server 127.0.0.1:9; upsync {}/v1/kv/upstreams/app upsync_timeout=6m upsync_interval=100ms;", consul.http_addr());
    let module_stream = format!("{}\n server {{ listen 127.0.0.1:{{{{port1}}}}; upstream_show; }}", front(&synced));
    let module = Nginx::start(&dir.subdir("module"), NginxConf::new("").stream(&module_stream).workers(workers));
    for a in &addrs {
        put_server(&consul, "app", a, "");
    }
    wait_stream_servers(module.extra_port(1), "app", &addrs.iter().map(String::as_str).collect::<Vec<_>>());
    let static_body: String = addrs.iter().map(|a| format!("server {a};")).collect();
    let stock = Nginx::start(&dir.subdir("stock"), NginxConf::new("").stream(&front(&static_body)).without_module().workers(workers));

    eprintln!("warming up");
    for n in [&module, &stock] {
        run(n, conns, Duration::from_secs(2))?;
    }
    let (mut m, mut s) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        eprintln!("stream module");
        m.push(run(&module, conns, secs)?);
        eprintln!("stock nginx stream");
        s.push(run(&stock, conns, secs)?);
    }
    let mean = |v: &[WrkReport], f: fn(&WrkReport) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    let errs = |v: &[WrkReport]| v.iter().map(|r| r.non_2xx + r.socket_errors).sum::<u64>();
    println!(
        "### stream module (wrk -t2 -c{conns} -H 'Connection: close', {} s runs, {workers} nginx workers, {BACKENDS} backends)\n",
        secs.as_secs()
    );
    println!("| run | connections/s | p99 latency | nginx CPU/connection | failed |");
    println!("|---|---:|---:|---:|---:|");
    for (name, v) in [("stock nginx stream, static servers", &s), ("nginx stream + upsync stream module", &m)] {
        println!(
            "| {name} | {:.0} | {:.2} ms | {:.1} µs | {} |",
            mean(v, |r| r.requests_per_sec),
            mean(v, |r| r.latency_p99_ms),
            mean(v, |r| r.cpu_us_per_request),
            errs(v)
        );
    }
    println!(
        "\n- module / stock: connections/s **{:.3}**, CPU per connection **{:.3}**",
        mean(&m, |r| r.requests_per_sec) / mean(&s, |r| r.requests_per_sec),
        mean(&m, |r| r.cpu_us_per_request) / mean(&s, |r| r.cpu_us_per_request)
    );
    let json = serde_json::json!({ "module": m, "stock": s, "workers": workers, "connections": conns, "seconds": secs.as_secs() });
    let out = upsync_tests::paths::build_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("stream.json"), serde_json::to_string_pretty(&json)?)?;
    if errs(&m) > 0 {
        anyhow::bail!("{} failed connections through the stream module", errs(&m));
    }
    Ok(())
}
