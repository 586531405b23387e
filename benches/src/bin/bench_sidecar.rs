//! End-to-end benchmark (run by `scripts/bench/sidecar.sh`): how long after the container
//! engine reports a container start (or death) the sidecar's change is visible in Consul, for
//! 100 containers started one after the other and then killed, on the Docker Engine (the
//! machine's dockerd) and on podman's API service, one after the other
//! (`SIDECAR_BENCH_ENGINES=docker` or `podman` runs one).
//!
//! Times are taken against the engine's own event timestamps (`timeNano`): "event → Consul"
//! is the time from that timestamp until a Consul blocking query on the KV prefix returns the
//! change. The peer measured in the same run is the engine's own event delivery: the time from
//! the same timestamp until a plain client reading `/events` receives the event. The sidecar
//! cannot be faster than that; the difference is the sidecar's own cost.
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use upsync_benches::percentile;
use upsync_tests::consul::Consul;
use upsync_tests::engine::{self, Kind};
use upsync_tests::net::free_port;
use upsync_tests::podman::{Httpd, Net};
use upsync_tests::sidecar::{eventually, Sidecar, SidecarOpts};
use upsync_tests::TestDir;

fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

#[derive(Default)]
struct Seen {
    /// container name → (action → (engine timestamp, time a plain client received it)).
    events: HashMap<String, HashMap<String, (i128, i128)>>,
    /// KV key → time it appeared in Consul / disappeared.
    appeared: HashMap<String, i128>,
    vanished: HashMap<String, i128>,
}

/// Reads the engine's event stream like any client would, recording receipt times.
fn read_events(socket: std::path::PathBuf, seen: Arc<Mutex<Seen>>) {
    let mut s = UnixStream::connect(&socket).unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
    write!(s, "GET /events?filters=%7B%22type%22%3A%5B%22container%22%5D%7D HTTP/1.0\r\nHost: engine\r\n\r\n").expect("events request");
    let reader = BufReader::new(s);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        let received = now_ns();
        let Ok(v) = serde_json::from_str::<Value>(line.trim_matches(|c: char| c == '\0' || c.is_whitespace())) else {
            continue;
        };
        let (Some(name), Some(action), Some(t)) = (v["Actor"]["Attributes"]["name"].as_str(), v["Action"].as_str(), v["timeNano"].as_i64())
        else {
            continue;
        };
        seen.lock().unwrap().events.entry(name.to_string()).or_default().entry(action.to_string()).or_insert((t as i128, received));
    }
}

/// Follows `prefix` with Consul blocking queries, recording when keys appear and vanish.
fn watch_kv(http: String, prefix: String, seen: Arc<Mutex<Seen>>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(90)).build();
    let mut index = 0u64;
    let mut keys: BTreeSet<String> = BTreeSet::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let url = format!("http://{http}/v1/kv/{prefix}?keys&index={index}&wait=5s");
        let (new_index, now_keys) = match agent.get(&url).call() {
            Ok(r) => {
                let i = r.header("X-Consul-Index").and_then(|v| v.parse().ok()).unwrap_or(0);
                (i, r.into_json::<Vec<String>>().unwrap_or_default())
            }
            Err(ureq::Error::Status(404, r)) => (r.header("X-Consul-Index").and_then(|v| v.parse().ok()).unwrap_or(0), Vec::new()),
            Err(_) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let t = now_ns();
        let now_keys: BTreeSet<String> = now_keys.into_iter().collect();
        let mut s = seen.lock().unwrap();
        for k in now_keys.difference(&keys) {
            s.appeared.entry(k.clone()).or_insert(t);
        }
        for k in keys.difference(&now_keys) {
            s.vanished.entry(k.clone()).or_insert(t);
        }
        keys = now_keys;
        index = new_index.max(1);
    }
}

fn report(what: &str, mut ms: Vec<f64>) -> (f64, f64) {
    let (p50, p99) = (percentile(&mut ms, 50.0), percentile(&mut ms, 99.0));
    let max = ms.last().copied().unwrap_or(f64::NAN);
    println!("| {what:<46} | {:>4} | {p50:>8.1} | {p99:>8.1} | {max:>8.1} |", ms.len());
    (p50, p99)
}

fn main() {
    let n: usize = std::env::var("SIDECAR_BENCH_CONTAINERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let engines = std::env::var("SIDECAR_BENCH_ENGINES").unwrap_or_else(|_| "docker podman".into());
    for name in engines.split([' ', ',']).filter(|e| !e.is_empty()) {
        let kind = match name {
            "docker" => Kind::Docker,
            "podman" => Kind::Podman,
            other => panic!("SIDECAR_BENCH_ENGINES: unknown engine {other:?} (docker, podman)"),
        };
        run(kind, n);
    }
}

fn run(kind: Kind, n: usize) {
    let dir = TestDir::new(&engine::dir_name("sidecar_bench", kind));
    let consul = Consul::start(dir.path());
    let eng = engine::start(kind, dir.path(), false);
    // Default settings (poll 1s, resync 30s), as an operator would run it.
    let mut opts = SidecarOpts::new("bench", &eng.socket());
    opts.extra_args.clear();
    opts.extra_args.extend(eng.sidecar_args()); // Docker: only this run's containers
    let sidecar = Sidecar::start(dir.path(), &consul.http_addr(), opts);
    // /healthz answers (degraded) before the first listing of the engine is done: measure from
    // a sidecar that follows the engine, not one still connecting.
    eventually("the sidecar connected to the engine", || sidecar.healthz()["engine"]["connected"] == true);

    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (sock, s) = (eng.socket(), seen.clone());
        std::thread::spawn(move || read_events(sock, s));
        let (h, s, st) = (consul.http_addr(), seen.clone(), stop.clone());
        std::thread::spawn(move || watch_kv(h, "upstreams/bench/".into(), s, st));
    }

    let containers: Vec<(Httpd, String)> = (0..n)
        .map(|i| {
            let port = free_port();
            let c = Httpd::new(&eng.unique(&format!("bench-{i}")), Net::Host { port }).label(&format!("SERVICE_{port}_NAME"), "bench");
            (c, format!("upstreams/bench/127.0.0.1:{port}"))
        })
        .collect();
    let started = std::time::Instant::now();
    for (c, _) in &containers {
        eng.run_httpd(c);
    }
    let start_secs = started.elapsed().as_secs_f64();
    eventually("all containers registered", || {
        let s = seen.lock().unwrap();
        containers.iter().all(|(_, k)| s.appeared.contains_key(k))
    });
    let rss_running = upsync_tests::proc::rss_kib(sidecar.pid()).unwrap_or(0);
    for (c, _) in &containers {
        eng.cli(&["kill", "--signal", "KILL", &c.name]);
    }
    eventually("all containers deregistered", || {
        let s = seen.lock().unwrap();
        containers.iter().all(|(_, k)| s.vanished.contains_key(k))
    });
    eventually("every start and die event read", || {
        let s = seen.lock().unwrap();
        containers.iter().all(|(c, _)| s.events.get(&c.name).is_some_and(|e| e.contains_key("start") && e.contains_key("die")))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let s = seen.lock().unwrap();
    let mut reg = Vec::new();
    let mut dereg = Vec::new();
    let mut peer_start = Vec::new();
    let mut peer_die = Vec::new();
    for (c, key) in &containers {
        let ev = s.events.get(&c.name).unwrap_or_else(|| panic!("no events seen for {}", c.name));
        let (t_start, rx_start) = ev["start"];
        let (t_die, rx_die) = ev["die"];
        reg.push((s.appeared[key] - t_start) as f64 / 1e6);
        dereg.push((s.vanished[key] - t_die) as f64 / 1e6);
        peer_start.push((rx_start - t_start) as f64 / 1e6);
        peer_die.push((rx_die - t_die) as f64 / 1e6);
    }
    println!();
    let version = match kind {
        Kind::Docker => format!("Docker Engine {}", eng.cli(&["version", "--format", "{{.Server.Version}}"])),
        Kind::Podman => eng.cli(&["--version"]),
    };
    println!("upsync-sidecar: engine event -> Consul, {n} containers ({version}, Consul dev agent)");
    println!("started {n} containers in {start_secs:.1} s; sidecar RSS with {n} running: {} KiB", rss_running);
    println!();
    println!("| latency (ms)                                   |    n |      p50 |      p99 |      max |");
    println!("|------------------------------------------------|-----:|---------:|---------:|---------:|");
    let (_, reg99) = report("start event -> KV entry visible (sidecar)", reg);
    let (_, peer99) = report("start event -> event received (engine, peer)", peer_start);
    let (_, dereg99) = report("die event -> KV entry gone (sidecar)", dereg);
    let (_, peerd99) = report("die event -> event received (engine, peer)", peer_die);
    let internal = sidecar_internal(&sidecar.log());
    println!("| *inside the sidecar (its log's timestamps)*    |      |          |          |          |");
    report("start event received -> written to Consul", internal.start);
    report("  of which: event -> port accepts connections", internal.app_start);
    let (_, own_start99) = report("  of which: port accepting -> written (own)", internal.own_start);
    let (_, own_die99) = report("die event received -> removed from Consul", internal.die);
    report("container inspection (engine's answer time)", internal.inspect);
    println!();
    println!("A change the sidecar's poll saw before the engine delivered the event counts as 0 ms inside the sidecar.");
    println!("The sidecar registers a port once it accepts connections: the wait for the application's start is not its own share.");
    println!("p99 ratio sidecar/engine: register {:.2}, deregister {:.2}", reg99 / peer99, dereg99 / peerd99);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "targets: end to end p99 < 100 ms {} (register {reg99:.1}, deregister {dereg99:.1}); sidecar's own share p99 < 10 ms {} ({own_start99:.1}, {own_die99:.1})",
        verdict(reg99 < 100.0 && dereg99 < 100.0),
        verdict(own_start99 < 10.0 && own_die99 < 10.0)
    );
}

/// Seconds since midnight of a log line's RFC 3339 timestamp (`2026-11-22T03:36:47.297533Z`).
fn log_time(line: &str) -> Option<f64> {
    let t = line.get(11..26)?;
    let (h, rest) = t.split_once(':')?;
    let (m, sec) = rest.split_once(':')?;
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + sec.parse::<f64>().ok()?)
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    let rest = &line[start..];
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    let end = rest.find(['"', ' ']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// From the sidecar's debug log: engine event received → Consul written (per container, for
/// start and die), and the engine's inspect times, in ms.
fn sidecar_internal(log: &str) -> Internal {
    let mut received: HashMap<(String, String), f64> = HashMap::new();
    // Container name → when its port first accepted a connection (the readiness probe).
    let mut ready: HashMap<String, f64> = HashMap::new();
    let mut out = Internal::default();
    let (start, die, inspect) = (&mut out.start, &mut out.die, &mut out.inspect);
    let ms = |a: f64, b: f64| ((b - a + 86_400.0) % 86_400.0 * 1000.0).max(0.0);
    for line in log.lines() {
        let Some(t) = log_time(line) else { continue };
        if line.contains("engine event") {
            if let (Some(name), Some(action)) = (field(line, "name"), field(line, "action")) {
                received.entry((name.to_string(), action.to_string())).or_insert(t);
            }
        } else if line.contains("accepts connections") {
            // endpoint="bench:bench-12-UNIQ:PORT"
            if let Some(name) = field(line, "endpoint").and_then(|e| e.split(':').nth(1)) {
                ready.entry(name.to_string()).or_insert(t);
            }
        } else if line.contains(" inspected") {
            if let Some(v) = field(line, "took_ms").and_then(|v| v.parse::<f64>().ok()) {
                inspect.push(v);
            }
        } else if let Some(id) = field(line, "id").filter(|_| line.contains("applier")) {
            // id="bench:bench-12:PORT"
            let Some(name) = id.split(':').nth(1) else { continue };
            let (action, into) = if line.contains("applier: deregistered") {
                ("die", &mut *die)
            } else if line.contains("applier: registered") {
                ("start", &mut *start)
            } else {
                continue;
            };
            // Written before the event arrived (the poll was first): 0.
            let got = received.get(&(name.to_string(), action.to_string())).copied();
            into.push(got.map(|r| ms(r, t)).unwrap_or(0.0));
            if action == "start" {
                // The sidecar's own share: from the later of the event and the port accepting
                // connections (the application's start, which the sidecar waits for).
                let from = match (got, ready.get(name)) {
                    (Some(r), Some(&p)) => Some(if ms(r, p) > 0.0 && ms(r, p) < 60_000.0 { p } else { r }),
                    (r, p) => r.or(p.copied()),
                };
                out.own_start.push(from.map(|f| ms(f, t)).unwrap_or(0.0));
                if let (Some(r), Some(&p)) = (got, ready.get(name)) {
                    out.app_start.push(if ms(r, p) < 60_000.0 { ms(r, p) } else { 0.0 });
                }
            }
        }
    }
    out
}

/// Times inside the sidecar, in ms, from its log.
#[derive(Default)]
struct Internal {
    /// Event received → written to Consul (start: including the wait for the port).
    start: Vec<f64>,
    die: Vec<f64>,
    /// Start event received → the port accepts connections (the application's start).
    app_start: Vec<f64>,
    /// Port accepting (or event, if later) → written to Consul: the sidecar's own work.
    own_start: Vec<f64>,
    inspect: Vec<f64>,
}
