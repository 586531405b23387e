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
//! every 100 requests (`upsync_interval=10ms`: under valgrind every change gets a Consul read and
//! a list of its own), and on the leader the same churn at the default `upsync_interval`, where
//! the poller's token bucket merges changes, with the projection of both to 200k requests/s;
//! and what one list change costs the worker for lists of 10 / 1,000 / 20,000 servers (a window
//! with one change minus an idle window).
//!
//! Each per-request configuration runs in UPSYNC_BENCH_CG_RUNS process starts (default 3) and
//! the table gives the minimum and the spread: glibc malloc's heap layout differs from start to
//! start and moves a run by ±150-270 instructions per request. Beside the difference against
//! stock nginx, the instructions executed inside the module's own object (callgrind's self cost
//! per object, event loop only) per request. The single process is a leader (it forks the
//! Consul poller process, measured as well: see `Traced::fresh_poller`); the `follower`
//! part runs the same three balancers with `master_process on`, 2 workers and `reuseport`,
//! keeps only client connections the worker without the poller accepted (its pid in an `X-Pid`
//! answer header) and measures that worker: what most workers of a large nginx pay. The
//! projection to 200k requests/s uses stock nginx's CPU time per request measured natively
//! (outside valgrind) in the same run. Prints a markdown section and writes every window's
//! counts to build/bench/callgrind.json (UPSYNC_BENCH_CG_JSON: another path). `make test` runs a
//! short version of it and checks the module's code against its budget
//! (benches/tests/instruction_budget.rs).
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use upsync_tests::consul::Consul;
use upsync_tests::net::{free_port, port_open};
use upsync_tests::proc::{children_of, Proc};
use upsync_tests::wait::wait_for_value;
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
    /// The process measured: the single process, or one worker (`Mode::Workers`).
    target: u32,
    /// Its dumps so far.
    target_dumps: usize,
    /// `Mode::Single` with the module: the Consul poller process measured in the current window
    /// (the single process forked it; it runs under callgrind too).
    poller: Option<u32>,
    /// The module is loaded.
    module: bool,
    /// `Mode::Follower`: a connection to the measured worker, for the requests that zero and
    /// dump its counters (`callgrind_control` reaches only the process valgrind started, not
    /// the workers nginx forks; `--zero-before=ngx_http_arg` / `--dump-before=ngx_http_map_find`
    /// fire on `/cg-zero` / `/cg-dump`, which nothing else in the run calls).
    trigger: Option<TcpStream>,
}

/// How nginx runs under callgrind.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// `master_process off`: the one process is the worker (and, with the module, the leader).
    Single,
    /// `master_process on`, 2 workers, `reuseport`; the measured worker is the one without the
    /// module's Consul poller (any worker for stock nginx), and the client keeps only
    /// connections that worker accepted.
    Follower,
}

impl Traced {
    /// `main`: extra directives for the main context.
    fn start(dir: &Path, main: &str, http: &str, module: bool, mode: Mode) -> anyhow::Result<Traced> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        let port = free_port();
        let d = dir.display();
        let load = if module { format!("load_module {};", upsync_tests::paths::module_so().display()) } else { String::new() };
        let conf = format!(
            "{load}
{main}
daemon off;
{process}
user root root;
error_log {d}/error.log notice;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy; fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
    keepalive_requests 1000000;
    map $uri $cg_dump {{ default 1; }}
    {http}
    server {{ listen 127.0.0.1:{port}{reuseport};
        location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; add_header X-Pid $pid; }}
        location = /cg-zero {{ return 200 $arg_z; }}
        location = /cg-dump {{ return 200 $cg_dump; }}
        {show} }}
}}
",
            show = if module { "location = /show { upstream_show; }" } else { "" },
            process = if mode == Mode::Single { "master_process off;" } else { "master_process on; worker_processes 2;" },
            reuseport = if mode == Mode::Single { "" } else { " reuseport" },
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let mut cmd = Command::new("valgrind");
        if mode == Mode::Follower {
            cmd.arg("--zero-before=ngx_http_arg").arg("--dump-before=ngx_http_map_find");
        }
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
        let target = proc.pid();
        Ok(Traced { proc, dir: dir.to_path_buf(), port, dumps: 0, target, target_dumps: 0, poller: None, module, trigger: None })
    }

    /// `Mode::Follower`: measures a worker that does not lead (with the module: the one of the
    /// 2 workers without a Consul poller process, once the leader's runs; stock nginx: either).
    fn pick_follower(&mut self, module: bool) -> anyhow::Result<u32> {
        // The workers and whether each has forked a poller.
        let has_poller = |w: u32| {
            children_of(w)
                .into_iter()
                .any(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "upsync-poller"))
        };
        let probe = || children_of(self.proc.pid()).into_iter().map(|w| (w, has_poller(w))).collect::<Vec<_>>();
        let single = |workers: &[(u32, bool)]| workers.iter().filter(|w| !w.1).map(|w| w.0).collect::<Vec<_>>();
        let found = |workers: &Vec<(u32, bool)>| workers.len() == 2 && single(workers).len() == if module { 1 } else { 2 };
        let workers = wait_for_value(Duration::from_secs(60), probe, found)
            .map_err(|t| anyhow::anyhow!("no follower worker among the workers (pid, has a poller) {:?}", t.last))?;
        self.target = single(&workers)[0];
        self.target_dumps = 0;
        self.trigger = Some(pinned_conn(self.port, Some(self.target))?);
        Ok(self.target)
    }

    fn control(&mut self, what: &str) -> anyhow::Result<()> {
        if let Some(c) = self.trigger.as_mut() {
            let path = if what == "--zero" { "/cg-zero?z=1" } else { "/cg-dump" };
            request(c, &mut Vec::new(), path)?;
            return Ok(());
        }
        let out = Command::new("callgrind_control").arg(what).arg(self.target.to_string()).output()?;
        anyhow::ensure!(out.status.success(), "callgrind_control {what}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// The module's Consul poller process: a child of the single process, named by its comm.
    fn poller_pid(&self) -> Option<u32> {
        children_of(self.target)
            .into_iter()
            .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "upsync-poller"))
    }

    /// Before a window of `Mode::Single` with the module: a poller process that started and
    /// settled, whose whole life the window's count can take. valgrind's gdbserver, through
    /// which callgrind_control zeroes and dumps, does not follow a fork, so a poller's counts
    /// come only from the dump callgrind writes when it ends: the running poller is stopped
    /// (SIGTERM), the worker starts the next one a second later, and it settles (its start, its
    /// connection and its first answer, equal to the list served). The idle window pays the
    /// same start, so the difference is the busy window's work.
    fn fresh_poller(&mut self) -> anyhow::Result<()> {
        let old = self.poller_pid();
        if let Some(p) = old {
            stop_poller(p);
            dumped(&self.dir, &format!("callgrind.out.{p}-"))?;
        }
        // A forked child starts from its parent's counters: zero the worker's before it forks
        // the next poller, so that the poller's dump holds only its own work (and the worker's
        // few idle ticks until the fork, the same in every window).
        self.control("--zero")?;
        let next = wait_for_value(Duration::from_secs(60), || self.poller_pid(), |p| p.is_some() && *p != old)
            .map_err(|t| anyhow::anyhow!("no new poller process after {old:?} (last seen {:?})", t.last))?;
        std::thread::sleep(Duration::from_secs(3));
        self.poller = next;
        Ok(())
    }

    /// Instructions executed in `work` (counters zeroed before, dumped after; in
    /// `Mode::Follower` the zero and dump requests add the same few instructions to every
    /// window, and the idle window takes them off again): by nginx's
    /// event loop (the process's main thread, what every worker runs), by the module's other
    /// threads (builders of large lists) and by the leader's Consul poller process.
    fn count(&mut self, work: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Ir> {
        if self.module && self.trigger.is_none() {
            self.fresh_poller()?;
        }
        self.control("--zero")?;
        work()?;
        self.control("--dump")?;
        self.dumps += 1;
        self.target_dumps += 1;
        // With --separate-threads=yes a dump is one file per thread: callgrind.out.PID.N-TT,
        // thread 01 the main thread.
        let prefix = format!("callgrind.out.{}.{}-", self.target, self.target_dumps);
        let start = Instant::now();
        loop {
            let mut ir = Ir::default();
            let mut main_seen = false;
            for (thread, text, n) in dump_files(&self.dir, &prefix)? {
                if thread == "01" {
                    ir.event_loop += n;
                    (ir.module_own, ir.module_calls) = object_cost(&text, MODULE_OBJECT);
                    main_seen = true;
                } else {
                    ir.threads += n;
                }
            }
            if main_seen {
                if let Some(pid) = self.poller.take() {
                    stop_poller(pid);
                    ir.poller = dumped(&self.dir, &format!("callgrind.out.{pid}-"))?;
                }
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
        Ok(Ir {
            event_loop: busy.event_loop.saturating_sub(idle.event_loop),
            threads: busy.threads.saturating_sub(idle.threads),
            poller: busy.poller.saturating_sub(idle.poller),
            module_own: busy.module_own.saturating_sub(idle.module_own),
            module_calls: busy.module_calls.saturating_sub(idle.module_calls),
        })
    }
}

/// Instructions counted in one window.
#[derive(Clone, Copy, Debug, Default)]
struct Ir {
    /// nginx's event loop (the main thread): what every worker pays.
    event_loop: u64,
    /// The module's other threads: the builders of large lists.
    threads: u64,
    /// The leader's Consul poller process (once per nginx instance).
    poller: u64,
    /// Of `event_loop`, the instructions executed inside the module's own object (self cost:
    /// not the libc or nginx functions it calls).
    module_own: u64,
    /// Of `event_loop`, the nginx and libc functions the module's code calls (not the
    /// balancer's own peer init, which stock nginx runs too).
    module_calls: u64,
}

/// Stops a poller process of the nginx this bench started (callgrind writes its dump as it ends).
fn stop_poller(pid: u32) {
    // SAFETY: a signal to a process this bench's nginx started; no memory is involved.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
}

/// The instructions of a callgrind dump, all threads (the files named `prefix` + thread),
/// waiting up to 30 s for callgrind to write it.
fn dumped(dir: &Path, prefix: &str) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut seen = false;
    loop {
        let files = dump_files(dir, prefix)?;
        let total = (!files.is_empty()).then(|| files.iter().map(|f| f.2).sum::<u64>());
        // Once the first thread's file is there, read again a moment later: callgrind writes
        // one file per thread, one after the other.
        match total {
            Some(t) if seen => return Ok(t),
            Some(_) => seen = true,
            None => {}
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "no callgrind dump {}/{prefix}*", dir.display());
        std::thread::sleep(Duration::from_millis(if seen { 300 } else { 50 }));
    }
}

/// The callgrind dump files in `dir` named `prefix` + thread that are complete (they have their
/// `summary:`/`totals:` line): (thread, text, instructions).
fn dump_files(dir: &Path, prefix: &str) -> anyhow::Result<Vec<(String, String, u64)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(thread) = name.strip_prefix(prefix) else { continue };
        let text = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        let total = text.lines().find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")));
        let Some(total) = total else { continue };
        let n: u64 = total.split_whitespace().next().unwrap_or("0").parse()?;
        files.push((thread.to_string(), text, n));
    }
    Ok(files)
}

/// The module's shared object, as callgrind names it.
const MODULE_OBJECT: &str = "ngx_http_upsync_module";

/// Instructions executed inside the objects whose path contains `needle` (their functions' self
/// cost) and, second, in what code there calls in other objects (the calls' inclusive cost),
/// except the balancer's own peer init that the module wraps (stock nginx runs it too), from
/// one callgrind dump (`--dump-instr=no`, the default: cost lines are `position Ir`). A cost
/// line right after `calls=` is the inclusive cost of that call, not self cost; `ob=`/`cob=`
/// and `fn=`/`cfn=` names are compressed as `(id) name` on first use; without `cob=` the
/// callee is in the caller's object.
fn object_cost(text: &str, needle: &str) -> (u64, u64) {
    fn resolve(names: &mut std::collections::HashMap<String, String>, v: &str) -> String {
        let v = v.trim();
        match v.strip_prefix('(').and_then(|r| r.split_once(')')) {
            Some((id, name)) if !name.trim().is_empty() => {
                names.insert(id.to_string(), name.trim().to_string());
                name.trim().to_string()
            }
            Some((id, _)) => names.get(id).cloned().unwrap_or_default(),
            None => v.to_string(),
        }
    }
    let (mut objects, mut functions) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    let (mut inside, mut after_call, mut own, mut calls) = (false, false, 0u64, 0u64);
    let (mut callee_inside, mut callee_fn) = (None::<bool>, String::new());
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("ob=") {
            inside = resolve(&mut objects, v).contains(needle);
        } else if let Some(v) = line.strip_prefix("cob=") {
            callee_inside = Some(resolve(&mut objects, v).contains(needle));
        } else if let Some(v) = line.strip_prefix("fn=") {
            resolve(&mut functions, v);
        } else if let Some(v) = line.strip_prefix("cfn=") {
            callee_fn = resolve(&mut functions, v);
        } else if line.starts_with("calls=") {
            after_call = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-' || c == '*') {
            let ir = line.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            if !std::mem::take(&mut after_call) {
                own += if inside { ir } else { 0 };
                continue;
            }
            let to_other = !callee_inside.take().unwrap_or(inside);
            // A callee without a symbol (`0x...`) is a static nginx function, which the module can
            // reach only through a pointer nginx gave it: the wrapped peer init (e.g.
            // `keepalive`'s), which stock nginx runs too.
            let balancer = callee_fn.starts_with("ngx_http_upstream_init_") || callee_fn.starts_with("0x");
            if inside && to_other && !balancer {
                calls += ir;
            }
        }
    }
    (own, calls)
}

impl Ir {
    fn total(self) -> u64 {
        self.event_loop + self.threads + self.poller
    }

    /// The module's code on the event loop: its own instructions and the nginx/libc functions
    /// it calls.
    fn code(self) -> u64 {
        self.module_own + self.module_calls
    }
}

/// One configuration's measurements, one per process start.
struct Row {
    lb: &'static str,
    mode: Mode,
    stock: Vec<Ir>,
    module: Vec<Ir>,
    /// The module's run again while a server is added or removed every 100 requests
    /// (`upsync_interval=10ms`: one Consul read and one list per change), with the lists the
    /// workers installed in the window.
    churn: Vec<(Ir, u64)>,
    /// The leader only: the same churn with `upsync_interval` at its default (500ms), where the
    /// poller's token bucket merges changes that come faster than one per interval.
    churn_default: Vec<(Ir, u64)>,
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// `minimum (+max - min)`, in instructions.
fn spread(v: &[f64]) -> String {
    let lo = min(v);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} (+{:.0})", thousands(lo), hi - lo)
}

fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Keep-alive HTTP/1.1 connections, used one request at a time in turn.
struct Client {
    conns: Vec<TcpStream>,
    next: usize,
    buf: Vec<u8>,
}

impl Client {
    fn new(port: u16) -> anyhow::Result<Client> {
        Client::pinned(port, None)
    }

    /// With `only`: only connections accepted by that worker.
    fn pinned(port: u16, only: Option<u32>) -> anyhow::Result<Client> {
        let conns = (0..CONNS).map(|_| pinned_conn(port, only)).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Client { conns, next: 0, buf: Vec::with_capacity(4096) })
    }

    fn run(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let c = &mut self.conns[self.next];
            self.next = (self.next + 1) % CONNS;
            request(c, &mut self.buf, "/")?;
        }
        Ok(())
    }
}

/// A keep-alive connection; with `only`, one accepted by that worker (its `X-Pid` answer
/// header; `reuseport` spreads connections over the workers), up to 400 tries.
fn pinned_conn(port: u16, only: Option<u32>) -> anyhow::Result<TcpStream> {
    let mut buf = Vec::with_capacity(4096);
    for _ in 0..400 {
        let mut c = TcpStream::connect(("127.0.0.1", port))?;
        c.set_read_timeout(Some(Duration::from_secs(60)))?;
        c.set_nodelay(true)?;
        let Some(pid) = only else { return Ok(c) };
        let head = request(&mut c, &mut buf, "/")?;
        if head.lines().find_map(|l| l.strip_prefix("x-pid:")).and_then(|v| v.trim().parse::<u32>().ok()) == Some(pid) {
            return Ok(c);
        }
    }
    anyhow::bail!("no connection accepted by worker {only:?} in 400 tries")
}

/// One keep-alive request; returns the answer's head, lowercased.
fn request(c: &mut TcpStream, buf: &mut Vec<u8>, path: &str) -> anyhow::Result<String> {
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes())?;
    buf.clear();
    let mut chunk = [0u8; 2048];
    loop {
        let k = c.read(&mut chunk)?;
        anyhow::ensure!(k > 0, "connection closed");
        buf.extend_from_slice(&chunk[..k]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            anyhow::ensure!(head.starts_with("http/1.1 200"), "answer: {head}");
            let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Ok(head);
            }
        }
    }
}

/// A fifth server added or removed every 100 requests, `requests` in all, counted; with the
/// lists the workers installed meanwhile (the list version's growth).
fn churn(t: &mut Traced, c: &mut Client, consul: &Consul, key: &str, requests: usize) -> anyhow::Result<(Ir, u64)> {
    let before = show_version(t.port)?;
    let mut on = false;
    let ir = t.net_count(|| {
        for _ in 0..requests / 100 {
            on = !on;
            if on {
                consul.kv_put(key, "");
            } else {
                consul.kv_delete(key);
            }
            c.run(100)?;
        }
        Ok(())
    })?;
    let lists = show_version(t.port)? - before;
    if on {
        consul.kv_delete(key);
    }
    Ok((ir, lists))
}

/// The module's status of upstream `app` (`/show`, JSON).
fn show_app(port: u16) -> anyhow::Result<serde_json::Value> {
    let v: serde_json::Value = ureq::get(&format!("http://127.0.0.1:{port}/show?upstream=app&format=json")).call()?.into_json()?;
    Ok(v["upstreams"][0].clone())
}

/// The version of the list the workers serve (one more for each list installed).
fn show_version(port: u16) -> anyhow::Result<u64> {
    let u = show_app(port)?;
    u["sync"]["version"].as_u64().ok_or_else(|| anyhow::anyhow!("no list version in {u}"))
}

fn show_count(port: u16) -> usize {
    show_app(port).ok().and_then(|u| u["servers"].as_array().map(Vec::len)).unwrap_or(0)
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

    // UPSYNC_BENCH_CG_ONLY (comma-separated: rr, least_conn, ip_hash, follower, churn,
    // churn-default, change)
    // runs only those parts (follower: the three balancers on a follower worker, or one with
    // follower-rr / follower-least_conn / follower-ip_hash; churn runs with the round robin rows'
    // module runs, leader and follower; to profile one part
    // with callgrind_annotate, keep the dumps with UPSYNC_KEEP_TEST_DIRS=1).
    let only = std::env::var("UPSYNC_BENCH_CG_ONLY").unwrap_or_default();
    let wanted = |part: &str| only.is_empty() || only.split(',').any(|p| p.trim() == part);
    // UPSYNC_BENCH_CG_RUNS (default 3): process starts per configuration. glibc malloc's heap
    // layout differs from start to start (±150-270 instructions per request under
    // ngx_create_pool), so the tables give the minimum over the starts and the spread.
    let runs = env("UPSYNC_BENCH_CG_RUNS", 3).max(1) as usize;
    let mut rows: Vec<Row> = Vec::new();
    // Parts: rr, least_conn, ip_hash (single process: the worker leads); follower (the same three
    // balancers with 2 workers, the one without the poller measured; follower-rr,
    // follower-least_conn, follower-ip_hash run one); churn (with both round robin rows:
    // `upsync_interval=10ms`, one list per change); churn-default (the leader's round robin row
    // again at the default interval, another start).
    for (lb, part, directive, mode) in [
        ("round robin", "rr", "", Mode::Single),
        ("least_conn", "least_conn", "least_conn;", Mode::Single),
        ("ip_hash", "ip_hash", "ip_hash;", Mode::Single),
        ("round robin", "follower-rr", "", Mode::Follower),
        ("least_conn", "follower-least_conn", "least_conn;", Mode::Follower),
        ("ip_hash", "follower-ip_hash", "ip_hash;", Mode::Follower),
    ] {
        if !(wanted(part) || mode == Mode::Follower && wanted("follower")) {
            continue;
        }
        let with_churn = wanted("churn") && lb == "round robin";
        let with_churn_default = wanted("churn-default") && lb == "round robin" && mode == Mode::Single;
        let mut row = Row { lb, mode, stock: Vec::new(), module: Vec::new(), churn: Vec::new(), churn_default: Vec::new() };
        for run in 0..runs {
            for module in [false, true] {
                let label = format!("{lb} {:?} {} run {}", mode, if module { "module" } else { "stock" }, run + 1);
                eprintln!("{label}");
                let d = dir.subdir(&format!("cg-{part}-{module}-{run}"));
                let body = if module { upsync("app") } else { static_servers.clone() };
                let mut t = Traced::start(&d, "", &format!("upstream app {{ {directive} {body} keepalive 64; }}"), module, mode)?;
                if module {
                    wait_count(t.port, BASE)?;
                }
                let only = if mode == Mode::Follower { Some(t.pick_follower(module)?) } else { None };
                let mut c = Client::pinned(t.port, only)?;
                c.run(1_000)?;
                let ir = t.net_count(|| c.run(requests))?;
                eprintln!("{label}: {ir:?}");
                if !module {
                    row.stock.push(ir);
                    continue;
                }
                row.module.push(ir);
                if with_churn {
                    let (ir, lists) = churn(&mut t, &mut c, &consul, &format!("upstreams/app/{}", addr(BASE)), requests)?;
                    eprintln!("{label}, churn: {ir:?}, {lists} lists");
                    row.churn.push((ir, lists));
                }
                if with_churn_default {
                    // The same churn at the default upsync_interval (another start: the interval
                    // is configuration).
                    drop(c);
                    drop(t);
                    let d = dir.subdir(&format!("cg-{part}-default-interval-{run}"));
                    let body = upsync("app").replace(" upsync_interval=10ms", "");
                    let mut t = Traced::start(&d, "", &format!("upstream app {{ {directive} {body} keepalive 64; }}"), true, mode)?;
                    wait_count(t.port, BASE)?;
                    let mut c = Client::pinned(t.port, None)?;
                    c.run(1_000)?;
                    let (ir, lists) = churn(&mut t, &mut c, &consul, &format!("upstreams/app/{}", addr(BASE)), requests)?;
                    eprintln!("{label}, churn at the default upsync_interval: {ir:?}, {lists} lists");
                    row.churn_default.push((ir, lists));
                }
            }
        }
        rows.push(row);
    }

    // Control: stock nginx with one idle thread of its own (a thread pool), as the module's
    // leader worker had when its Consul poller was a thread. Once a process has a second
    // thread, glibc's system call wrappers (recv, writev, epoll_wait...) add cancellation-point
    // bookkeeping to every call, and malloc takes its locks: what the poller's own process
    // spares every worker.
    let mut threaded_stock = Vec::new();
    if wanted("rr") {
        for run in 0..runs {
            eprintln!("round robin stock, one thread pool thread, run {}", run + 1);
            let d = dir.subdir(&format!("cg-rr-stock-thread-{run}"));
            let mut t = Traced::start(
                &d,
                "thread_pool bench threads=1;",
                &format!("upstream app {{ {static_servers} keepalive 64; }}"),
                false,
                Mode::Single,
            )?;
            let mut c = Client::new(t.port)?;
            c.run(1_000)?;
            let ir = t.net_count(|| c.run(requests))?;
            eprintln!("round robin stock, thread: {ir:?}");
            threaded_stock.push(ir);
        }
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
        let mut t = Traced::start(&d, "", &format!("upstream app {{ {} keepalive 64; }}", upsync(&prefix)), true, Mode::Single)?;
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
    let per = |n: u64| n as f64 / requests as f64;
    println!("### Instructions per request: `scripts/bench/callgrind.sh`\n");
    println!(
        "nginx under callgrind, {requests} requests over {CONNS} keep-alive connections, 4 servers, `keepalive 64`; an idle \
         window of the same length subtracted; {runs} process starts per configuration: the minimum, and in brackets how \
         much more the highest start counted (glibc malloc's heap layout). Stock nginx natively: {:.1} us CPU per request \
         ({:.1} cores at 200k requests/s). \"Leader\": `master_process off`, the one process is the worker and forks \
         the module's Consul poller process. \"Follower\": `master_process on`, 2 workers, `reuseport`, the load on the \
         worker without the poller (stock nginx: one of its 2 workers). The module's code: instructions executed inside \
         the module's object on the event loop (callgrind's self cost), then with the nginx and libc functions it calls \
         (not the balancer's own peer init, which stock nginx runs too).\n",
        native * 1e6,
        cores(native)
    );
    println!(
        "| worker, balancer | stock nginx | nginx + module | difference (minimum against minimum) | module's code: in its object | \
         module's code with the nginx/libc functions it calls | at 200k req/s: the difference | at 200k req/s: the module's code |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let line = |what: &str, stock: &[f64], module: &[f64], own: Option<(&[f64], &[f64])>| {
        let s = min(stock);
        let m = min(module);
        let e = (m - s) / s;
        let pct = |o: &[f64]| format!("{} ({:.2}%)", spread(o), min(o) / s * 100.0);
        let (own, code, code_cores) = match own {
            Some((o, c)) => (pct(o), pct(c), format!("{:.3} cores", cores(native) * min(c) / s)),
            None => ("—".into(), "—".into(), "—".into()),
        };
        println!(
            "| {what} | {} | {} | {:+.2}% | {own} | {code} | {:.3} cores | {code_cores} |",
            spread(stock),
            spread(module),
            e * 100.0,
            cores(native) * e
        );
    };
    // Followers first: what most workers of a multi-worker nginx pay.
    rows.sort_by_key(|r| r.mode == Mode::Single);
    for r in &rows {
        let who = r.mode.worker();
        let stock: Vec<f64> = r.stock.iter().map(|i| per(i.total())).collect();
        let module: Vec<f64> = r.module.iter().map(|i| per(i.total())).collect();
        let own: Vec<f64> = r.module.iter().map(|i| per(i.module_own)).collect();
        let code: Vec<f64> = r.module.iter().map(|i| per(i.code())).collect();
        line(&format!("{who}, {}", r.lb), &stock, &module, Some((&own, &code)));
        if r.mode == Mode::Single && r.lb == "round robin" && !threaded_stock.is_empty() {
            let t: Vec<f64> = threaded_stock.iter().map(|i| per(i.total())).collect();
            line("control: stock nginx with one `thread_pool` thread, no module (against stock)", &stock, &t, None);
        }
        // Per request, a field of each churn window; and the lists installed in each.
        let col = |w: &[(Ir, u64)], f: fn(&Ir) -> u64| w.iter().map(|(i, _)| per(f(i))).collect::<Vec<f64>>();
        let lists = |w: &[(Ir, u64)]| w.iter().map(|(_, l)| l.to_string()).collect::<Vec<_>>().join(", ");
        if !r.churn.is_empty() {
            let label = format!(
                "{who}, {}, a server added or removed every 100 requests (lists installed for {} changes: {})",
                r.lb,
                requests / 100,
                lists(&r.churn)
            );
            let (o, c, ev) = (col(&r.churn, |i| i.module_own), col(&r.churn, |i| i.code()), col(&r.churn, |i| i.event_loop));
            if r.mode == Mode::Single {
                line(&format!("{label}: event loop"), &stock, &ev, Some((&o, &c)));
                line(&format!("{label}: event loop + its Consul poller"), &stock, &col(&r.churn, |i| i.total()), None);
            } else {
                line(&label, &stock, &ev, Some((&o, &c)));
            }
        }
        if !r.churn_default.is_empty() {
            let label = format!(
                "{who}, {}, the same churn at the default `upsync_interval` (500ms; lists installed for {} changes: {}): event loop + its Consul poller",
                r.lb,
                requests / 100,
                lists(&r.churn_default)
            );
            let (o, c) = (col(&r.churn_default, |i| i.module_own), col(&r.churn_default, |i| i.code()));
            line(&label, &stock, &col(&r.churn_default, |i| i.total()), Some((&o, &c)));
        }
    }
    // At 200k requests/s a change every 100 requests is 2,000 changes a second. Under callgrind
    // a request takes ~50 times as long, so every change of the churn rows above gets a Consul
    // read and a list of its own; at full speed the poller's token bucket reads at most one list
    // per `upsync_interval` once its burst is spent, whatever the change rate. Projected from
    // the cost of one list measured in the leader's churn (upsync_interval=10ms) windows.
    if let Some(leader) = rows.iter().find(|r| r.mode == Mode::Single && !r.churn.is_empty()) {
        let stock = min(&leader.stock.iter().map(|i| per(i.total())).collect::<Vec<_>>());
        let base_ev = min(&leader.module.iter().map(|i| per(i.event_loop)).collect::<Vec<_>>());
        let base_code = min(&leader.module.iter().map(|i| per(i.code())).collect::<Vec<_>>());
        let (ir, lists) = leader.churn.iter().min_by_key(|(i, _)| i.total()).copied().unwrap_or_default();
        let lists = lists.max(1) as f64;
        let poller_per_list = ir.poller as f64 / lists;
        // The event loop's whole growth (the link's wake-ups too), or the module code's if heap
        // layout made that smaller: the larger of the two.
        let grown = |now: f64, before: f64| (now - before) * requests as f64 / lists;
        let loop_per_list = grown(per(ir.event_loop), base_ev).max(grown(per(ir.code()), base_code)).max(0.0);
        println!(
            "\nUnder churn at 200k requests/s (a change every 100 requests: 2,000 a second), projected from one list's \
             cost in the leader's churn windows ({lists:.0} lists): its Consul poller {poller_per_list:.0} instructions, its \
             event loop {loop_per_list:.0} (every worker installs each list). Leader's module code without \
             churn: {base_code:.0} per request (event loop {:+.2}% against stock).\n",
            (base_ev - stock) / stock * 100.0
        );
        println!("| `upsync_interval` | lists a second at most (after a burst of 10) | the poller per request | each worker's event loop per request, beyond no churn | the leader in all: module code + poller, against stock |");
        println!("|---|---:|---:|---:|---:|");
        for (what, per_second) in [("500ms (default)", 2.0f64), ("10ms", 100.0), ("1ms (the least)", 1_000.0)] {
            let lists_per_request = per_second.min(2_000.0) / 200_000.0;
            let poller = lists_per_request * poller_per_list;
            let ev = lists_per_request * loop_per_list;
            println!(
                "| {what} | {per_second:.0} | {poller:.1} ({:.3}%) | {ev:.1} ({:.3}%) | {:.2}% |",
                poller / stock * 100.0,
                ev / stock * 100.0,
                (base_code + ev + poller) / stock * 100.0
            );
        }
    }
    if !changes.is_empty() {
        println!("\n| one list change in an upstream of | the leader's Consul poller process (answer to encoded list) | every worker's event loop (the leader: the list into the slot; all: the slot to installed peers) | every worker's builder thread (lists over 32 KB) | total |");
        println!("|---|---:|---:|---:|---:|");
    }
    for (size, ir) in &changes {
        println!(
            "| {size} servers | {} | {} ({:.0} per server) | {} | {} |",
            ir.poller,
            ir.event_loop,
            ir.event_loop as f64 / *size as f64,
            ir.threads,
            ir.total()
        );
    }
    write_json(requests, native, &rows, &threaded_stock, &changes)
}

impl Ir {
    fn json(self) -> serde_json::Value {
        serde_json::json!({
            "event_loop": self.event_loop, "threads": self.threads, "poller": self.poller,
            "module_own": self.module_own, "module_calls": self.module_calls,
        })
    }
}

impl Mode {
    fn worker(self) -> &'static str {
        if self == Mode::Single {
            "leader"
        } else {
            "follower"
        }
    }
}

/// build/bench/callgrind.json: every window's instructions (not per request), one entry per
/// process start, as measured.
fn write_json(requests: usize, native: f64, rows: &[Row], threaded_stock: &[Ir], changes: &[(usize, Ir)]) -> anyhow::Result<()> {
    let list = |v: &[Ir]| v.iter().map(|i| i.json()).collect::<Vec<_>>();
    let churn = |v: &[(Ir, u64)]| v.iter().map(|(i, l)| serde_json::json!({ "ir": i.json(), "lists": l })).collect::<Vec<_>>();
    let rows: Vec<_> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "worker": r.mode.worker(), "balancer": r.lb,
                "stock": list(&r.stock), "module": list(&r.module),
                "churn": churn(&r.churn), "churn_default_interval": churn(&r.churn_default),
            })
        })
        .collect();
    let changes: Vec<_> = changes.iter().map(|(size, ir)| serde_json::json!({ "servers": size, "ir": ir.json() })).collect();
    let json = serde_json::json!({
        "requests": requests, "native_stock_us_per_request": native * 1e6,
        "rows": rows, "stock_with_thread_pool": list(threaded_stock), "changes": changes,
    });
    // UPSYNC_BENCH_CG_JSON: another path (the instruction-count check of `make test` uses one
    // of its own).
    let path = match std::env::var_os("UPSYNC_BENCH_CG_JSON") {
        Some(p) => PathBuf::from(p),
        None => upsync_tests::paths::build_dir().join("bench").join("callgrind.json"),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
