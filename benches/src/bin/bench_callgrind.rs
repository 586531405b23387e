//! The module's cost per request in instructions (`scripts/bench/callgrind.sh`, part of
//! `make bench`).
//!
//! Wall-clock throughput on a 2-core machine shared by the load generator cannot show 200k
//! requests/s; instruction counts can: callgrind counts the same instructions for the same work
//! whatever else the machine does. nginx runs in single-process mode (`master_process off`: the
//! one process is the worker, the module leads in it) under `valgrind --tool=callgrind`;
//! `callgrind_control --zero` / `--dump` bracket each measured window, so start-up is excluded,
//! and an idle window of the same length is subtracted (timers, the module's 200 ms tick).
//! Backends are a stock nginx outside valgrind.
//!
//! Measured: instructions per request for stock nginx with 4 static servers and for nginx +
//! module with the same 4 servers synced from Consul, for round robin, `least_conn` and
//! `ip_hash`, `keepalive` on, UPSYNC_BENCH_CG_REQUESTS requests (default 20,000) over 8
//! keep-alive client connections; the module again while a fifth server is added or removed
//! every 100 requests; and what one list change costs the worker for lists of 10 / 1,000 /
//! 20,000 servers (a window with one change minus an idle window). The projection to 200k
//! requests/s uses stock nginx's CPU time per request measured natively (outside valgrind) in
//! the same run. Prints a markdown section.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use upsync_tests::consul::Consul;
use upsync_tests::net::{free_port, port_open};
use upsync_tests::proc::Proc;
use upsync_tests::TestDir;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

const BACKENDS: usize = 5;
const BASE: usize = 4;
const CONNS: usize = 8;

/// The i-th filler server (parsed and kept by nginx, never contacted: it is `down`).
fn filler(i: usize) -> String {
    format!("127.{}.{}.{}:8080", 10 + i / 62_500, (i / 250) % 250, i % 250 + 1)
}

/// A single-process nginx under callgrind.
struct Traced {
    proc: Proc,
    dir: PathBuf,
    port: u16,
    dumps: usize,
}

impl Traced {
    /// `main`: extra directives for the main context.
    fn start(dir: &Path, main: &str, http: &str, module: bool) -> anyhow::Result<Traced> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        let port = free_port();
        let d = dir.display();
        let load = if module { format!("load_module {};", upsync_tests::paths::module_so().display()) } else { String::new() };
        let conf = format!(
            "{load}
{main}
daemon off;
master_process off;
user root root;
error_log {d}/error.log notice;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy; fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
    keepalive_requests 1000000;
    {http}
    server {{ listen 127.0.0.1:{port};
        location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}
        {show} }}
}}
",
            show = if module { "location = /show { upstream_show; }" } else { "" }
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let mut cmd = Command::new("valgrind");
        cmd.arg("--tool=callgrind")
            .arg("--separate-threads=yes")
            .arg(format!("--callgrind-out-file={}/callgrind.out.%p", dir.display()))
            .arg(upsync_tests::paths::nginx_bin())
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.join("error.log"));
        let proc = Proc::spawn("nginx-callgrind", cmd, &dir.join("valgrind.log"))?;
        let start = Instant::now();
        while !port_open(port) {
            anyhow::ensure!(start.elapsed() < Duration::from_secs(120), "nginx under valgrind did not listen within 120 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Traced { proc, dir: dir.to_path_buf(), port, dumps: 0 })
    }

    fn control(&self, what: &str) -> anyhow::Result<()> {
        let out = Command::new("callgrind_control").arg(what).arg(self.proc.pid().to_string()).output()?;
        anyhow::ensure!(out.status.success(), "callgrind_control {what}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// Instructions executed in `work` (counters zeroed before, dumped after): by nginx's
    /// event loop (the process's main thread, what every worker runs) and by the module's other
    /// threads (the leader's Consul poller, builders of large lists).
    fn count(&mut self, work: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Ir> {
        self.control("--zero")?;
        work()?;
        self.control("--dump")?;
        self.dumps += 1;
        // With --separate-threads=yes a dump is one file per thread: callgrind.out.PID.N-TT,
        // thread 01 the main thread.
        let prefix = format!("callgrind.out.{}.{}-", self.proc.pid(), self.dumps);
        let start = Instant::now();
        loop {
            let mut ir = Ir::default();
            let mut main_seen = false;
            for entry in std::fs::read_dir(&self.dir)? {
                let name = entry?.file_name().to_string_lossy().into_owned();
                let Some(thread) = name.strip_prefix(&prefix) else { continue };
                let text = std::fs::read_to_string(self.dir.join(&name)).unwrap_or_default();
                let total = text.lines().find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")));
                let Some(total) = total else { continue };
                let n: u64 = total.split_whitespace().next().unwrap_or("0").parse()?;
                if thread == "01" {
                    ir.event_loop += n;
                    main_seen = true;
                } else {
                    ir.threads += n;
                }
            }
            if main_seen {
                return Ok(ir);
            }
            anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "no callgrind dump {}{prefix}01", self.dir.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Instructions for `work` beyond an idle window of the same length.
    fn net_count(&mut self, work: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Ir> {
        let t = Instant::now();
        let busy = self.count(work)?;
        let took = t.elapsed();
        let idle = self.count(|| {
            std::thread::sleep(took);
            Ok(())
        })?;
        Ok(Ir { event_loop: busy.event_loop.saturating_sub(idle.event_loop), threads: busy.threads.saturating_sub(idle.threads) })
    }
}

/// Instructions counted in one window.
#[derive(Clone, Copy, Debug, Default)]
struct Ir {
    /// nginx's event loop (the main thread): what every worker pays.
    event_loop: u64,
    /// The module's other threads: the Consul poller (the leader worker only, once per nginx
    /// instance) and the builders of large lists.
    threads: u64,
}

impl Ir {
    fn total(self) -> u64 {
        self.event_loop + self.threads
    }
}

/// Keep-alive HTTP/1.1 connections, used one request at a time in turn.
struct Client {
    conns: Vec<TcpStream>,
    next: usize,
    buf: Vec<u8>,
}

impl Client {
    fn new(port: u16) -> anyhow::Result<Client> {
        let conns = (0..CONNS).map(|_| TcpStream::connect(("127.0.0.1", port))).collect::<Result<Vec<_>, _>>()?;
        for c in &conns {
            c.set_read_timeout(Some(Duration::from_secs(60)))?;
            c.set_nodelay(true)?;
        }
        Ok(Client { conns, next: 0, buf: Vec::with_capacity(4096) })
    }

    fn run(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let c = &mut self.conns[self.next];
            self.next = (self.next + 1) % CONNS;
            c.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
            self.buf.clear();
            let mut chunk = [0u8; 2048];
            loop {
                let k = c.read(&mut chunk)?;
                anyhow::ensure!(k > 0, "connection closed");
                self.buf.extend_from_slice(&chunk[..k]);
                if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                    anyhow::ensure!(head.starts_with("http/1.1 200"), "answer: {head}");
                    let len: usize =
                        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                    if self.buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

fn show_count(port: u16) -> usize {
    ureq::get(&format!("http://127.0.0.1:{port}/show?upstream=app&format=json"))
        .call()
        .ok()
        .and_then(|r| r.into_json::<serde_json::Value>().ok())
        .and_then(|v| v["upstreams"][0]["servers"].as_array().map(Vec::len))
        .unwrap_or(0)
}

fn wait_count(port: u16, n: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    while show_count(port) != n {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(300), "the module did not sync {n} servers");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// CPU seconds (user + system) of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    upsync_tests::load::cpu_us(&[pid]) / 1e6
}

fn main() -> anyhow::Result<()> {
    let requests = env("UPSYNC_BENCH_CG_REQUESTS", 20_000) as usize;
    let dir = TestDir::new("bench-callgrind");
    let consul = Consul::start(&dir.subdir("consul"));
    let (_backends, addrs) = upsync_benches::named_backends(&dir.subdir("backends"), BACKENDS);
    let addr = |i: usize| addrs[i].clone();
    let static_servers: String = (0..BASE).map(|i| format!("server {};", addr(i))).collect();
    let upsync = |prefix: &str| {
        format!("server 127.0.0.1:9; upsync {}/v1/kv/upstreams/{prefix} upsync_timeout=6m upsync_interval=10ms;", consul.http_addr())
    };
    consul.kv_put_many(&(0..BASE).map(|i| (format!("upstreams/app/{}", addr(i)), String::new())).collect::<Vec<_>>());

    // Native stock nginx: CPU time per request, for the projection.
    let native = {
        let d = dir.subdir("native");
        std::fs::create_dir_all(d.join("tmp"))?;
        let port = free_port();
        let conf = format!(
            "daemon off; master_process off; user root root; error_log {0}/error.log notice; pid {0}/nginx.pid;
             events {{ worker_connections 1024; }}
             http {{ access_log off; keepalive_requests 1000000; client_body_temp_path {0}/tmp/b; proxy_temp_path {0}/tmp/p;
                     fastcgi_temp_path {0}/tmp/f; uwsgi_temp_path {0}/tmp/u; scgi_temp_path {0}/tmp/s;
                     upstream app {{ {static_servers} keepalive 64; }}
                     server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}",
            d.display()
        );
        std::fs::write(d.join("nginx.conf"), conf)?;
        let mut cmd = Command::new(upsync_tests::paths::nginx_bin());
        cmd.arg("-p").arg(&d).arg("-c").arg(d.join("nginx.conf")).arg("-e").arg(d.join("error.log"));
        let p = Proc::spawn("nginx-native", cmd, &d.join("stderr.log"))?;
        while !port_open(port) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut c = Client::new(port)?;
        c.run(2_000)?;
        let before = cpu_seconds(p.pid());
        let n = 100_000;
        c.run(n)?;
        (cpu_seconds(p.pid()) - before) / n as f64
    };
    eprintln!("native stock nginx: {:.1} us CPU per request", native * 1e6);

    // UPSYNC_BENCH_CG_ONLY (comma-separated: rr, least_conn, ip_hash, churn, change) runs only
    // those parts (churn needs rr's module run; to profile one part with callgrind_annotate, keep
    // the dumps with UPSYNC_KEEP_TEST_DIRS=1).
    let only = std::env::var("UPSYNC_BENCH_CG_ONLY").unwrap_or_default();
    let wanted = |part: &str| only.is_empty() || only.split(',').any(|p| p.trim() == part);
    let mut rows = Vec::new();
    let mut churn: Option<Ir> = None;
    for (lb, part, directive) in
        [("round robin", "rr", ""), ("least_conn", "least_conn", "least_conn;"), ("ip_hash", "ip_hash", "ip_hash;")]
    {
        let with_churn = part == "rr" && wanted("churn");
        if !wanted(part) && !with_churn {
            continue;
        }
        let mut per = Vec::new();
        for module in [false, true] {
            let label = format!("{lb} {}", if module { "module" } else { "stock" });
            eprintln!("{label}");
            let d = dir.subdir(&format!("cg-{}-{}", lb.replace(' ', "_"), module));
            let body = if module { upsync("app") } else { static_servers.clone() };
            let mut t = Traced::start(&d, "", &format!("upstream app {{ {directive} {body} keepalive 64; }}"), module)?;
            if module {
                wait_count(t.port, BASE)?;
            }
            let mut c = Client::new(t.port)?;
            c.run(1_000)?;
            let ir = t.net_count(|| c.run(requests))?;
            eprintln!("{label}: {ir:?}");
            per.push(ir.total() as f64 / requests as f64);
            if module && with_churn {
                // Churn: a fifth server added or removed every 100 requests.
                let key = format!("upstreams/app/{}", addr(BASE));
                let mut on = false;
                let ir = t.net_count(|| {
                    for _ in 0..requests / 100 {
                        on = !on;
                        if on {
                            consul.kv_put(&key, "");
                        } else {
                            consul.kv_delete(&key);
                        }
                        c.run(100)?;
                    }
                    Ok(())
                })?;
                eprintln!("churn: {ir:?}");
                if on {
                    consul.kv_delete(&key);
                }
                churn = Some(ir);
            }
            drop(c);
            drop(t);
        }
        rows.push((lb, per));
    }

    // Control: stock nginx with one idle thread of its own (a thread pool), as the module's
    // leader worker has its Consul poller thread. Once a process has a second thread, glibc's
    // system call wrappers (recv, writev, epoll_wait...) add cancellation-point bookkeeping to
    // every call; a worker that never starts a thread (a follower) does not pay it.
    let mut threaded_stock = None;
    if wanted("rr") {
        eprintln!("round robin stock, one thread pool thread");
        let d = dir.subdir("cg-round_robin-stock-thread");
        let mut t =
            Traced::start(&d, "thread_pool bench threads=1;", &format!("upstream app {{ {static_servers} keepalive 64; }}"), false)?;
        let mut c = Client::new(t.port)?;
        c.run(1_000)?;
        let ir = t.net_count(|| c.run(requests))?;
        eprintln!("round robin stock, thread: {ir:?}");
        threaded_stock = Some(ir.total() as f64 / requests as f64);
    }

    // One list change, for lists of 10 / 1,000 / 20,000 servers.
    let mut changes = Vec::new();
    // UPSYNC_BENCH_CG_SIZES (comma-separated) replaces the list sizes.
    let sizes: Vec<usize> = std::env::var("UPSYNC_BENCH_CG_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).filter(|&n| n > BASE).collect())
        .unwrap_or_else(|| vec![10, 1_000, 20_000]);
    for size in sizes {
        if !wanted("change") {
            break;
        }
        eprintln!("one change in a list of {size}");
        let prefix = format!("big{size}");
        let mut pairs: Vec<(String, String)> = (0..BASE).map(|i| (format!("upstreams/{prefix}/{}", addr(i)), String::new())).collect();
        pairs.extend((0..size - BASE).map(|i| (format!("upstreams/{prefix}/{}", filler(i)), "{\"down\":1}".to_string())));
        consul.kv_put_many(&pairs);
        let d = dir.subdir(&format!("cg-change-{size}"));
        let mut t = Traced::start(&d, "", &format!("upstream app {{ {} keepalive 64; }}", upsync(&prefix)), true)?;
        wait_count(t.port, size)?;
        // Settle (the first list's build and dump).
        std::thread::sleep(Duration::from_secs(3));
        let key = format!("upstreams/{prefix}/{}", filler(0));
        let ir = t.net_count(|| {
            consul.kv_put(&key, "{\"down\":1,\"weight\":2}");
            let start = Instant::now();
            // The worker sees the change at its next request or tick; give it time under valgrind.
            while start.elapsed() < Duration::from_secs(if size > 5_000 { 20 } else { 5 }) {
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        })?;
        eprintln!("change {size}: {ir:?}");
        changes.push((size, ir));
        drop(t);
    }

    let cores = |per_req_s: f64| 200_000.0 * per_req_s;
    println!("### Instructions per request: `scripts/bench/callgrind.sh`\n");
    println!(
        "nginx in single-process mode under callgrind, {requests} requests over {CONNS} keep-alive connections, 4 servers, \
         `keepalive 64`; an idle window of the same length subtracted. Stock nginx natively: {:.1} us CPU per request \
         ({:.1} cores at 200k requests/s).\n",
        native * 1e6,
        cores(native)
    );
    println!("| balancer | stock nginx | nginx + module | module adds | at 200k req/s the module adds |");
    println!("|---|---:|---:|---:|---:|");
    for (lb, per) in &rows {
        let (s, m) = (per[0], per[1]);
        let extra = (m - s) / s;
        println!("| {lb} | {s:.0} | {m:.0} | {:+.2}% | {:.3} cores |", extra * 100.0, cores(native) * extra);
        if let (Some(t), "round robin") = (threaded_stock, *lb) {
            let e = (t - s) / s;
            println!(
                "| {lb}: stock nginx with one thread_pool thread (control, no module) | {s:.0} | {t:.0} | {:+.2}% | {:.3} cores |",
                e * 100.0,
                cores(native) * e
            );
        }
        if let (Some(ir), "round robin") = (churn, *lb) {
            let row = |what: &str, n: u64| {
                let c = n as f64 / requests as f64;
                let e = (c - s) / s;
                println!(
                    "| {lb}, a server added/removed every 100 requests{what} | {s:.0} | {c:.0} | {:+.2}% | {:.3} cores |",
                    e * 100.0,
                    cores(native) * e
                );
            };
            row(", every worker (event loop)", ir.event_loop);
            row(", the leader worker (+ its Consul poller)", ir.total());
        }
    }
    if !changes.is_empty() {
        println!("\n| one list change in an upstream of | every worker (event loop: the slot to installed peers) | the module's threads (the leader's Consul poller: answer to slot; over 32 KB of list, every worker's builder) | total, leader worker |");
        println!("|---|---:|---:|---:|");
    }
    for (size, ir) in &changes {
        println!(
            "| {size} servers | {} ({:.0} per server) | {} | {} |",
            ir.event_loop,
            ir.event_loop as f64 / *size as f64,
            ir.threads,
            ir.total()
        );
    }
    Ok(())
}
