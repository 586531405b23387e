//! End-to-end benchmark of upsync-dns (`make bench`, or `scripts/bench/dns.sh`).
//!
//! One run, one catalog, six servers answering the same records side by side on loopback:
//! upsync-dns, Consul's own DNS interface (the agent holding the catalog), dnsmasq (the same
//! records as `host-record`/`srv-host` lines), unbound (`local-data`), and the authoritative
//! servers NSD and Knot DNS (a zone file written by the benchmark; each started here on a free
//! port with its own configuration and files in the run's directory, never the system service). dnsperf sends A and
//! SRV questions for every service in random order; we report queries per second, dnsperf's
//! average latency, lost queries, and the CPU time the server spent per query (from /proc: it
//! does not move when other work competes for the 2 cores, unlike queries per second).
//!
//! dnsperf sends EDNS0 (`-e`, as resolvers do): without it, a 10-instance service's SRV answer
//! with the glue of its targets (about 540 bytes) exceeds 512 bytes, which upsync-dns answers
//! with TC (the client retries over TCP) while unbound and the authoritative servers leave
//! the glue out, so the SRV runs would not compare the same answers.
//!
//! Then freshness: the time from a Consul write (HTTP call returned) to the first DNS answer
//! showing it, for a check going critical/passing and for an instance registered/
//! deregistered, on a small catalog and on the full one, with the Consul cost of one full
//! catalog read.
//!
//! Settings: UPSYNC_BENCH_DNS_SERVICES (10000), UPSYNC_BENCH_DNS_PER_SERVICE (10),
//! UPSYNC_BENCH_DNS_NODES (1000), UPSYNC_BENCH_SECS (10), UPSYNC_BENCH_DNS_ROUNDS (50).
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::json;
use upsync_benches::{cpu_split_us, percentile};
use upsync_tests::consul::Consul;
use upsync_tests::dns::{dig, DnsOptions, DnsServer};
use upsync_tests::net::free_port;
use upsync_tests::proc::Proc;
use upsync_tests::{wait_until, TestDir};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Instance `k` of service `s`: a unique address and port.
fn instance_addr(n: usize) -> (String, u16) {
    (format!("10.{}.{}.{}", 100 + n / 65536, (n / 256) % 256, n % 256), 10000 + (n % 50000) as u16)
}

fn ip_label(ip: &str) -> String {
    ip.replace('.', "-")
}

/// Registers `services` x `per` instances on `nodes` external nodes through /v1/txn, each
/// with a passing service check (as agents register them), 4 requests in parallel.
fn load_catalog(consul: &Consul, services: std::ops::Range<usize>, per: usize, nodes: usize) -> anyhow::Result<()> {
    // Nodes first; then each service with its check in the same transaction (pairs never
    // straddle two batches of 64), transactions in parallel.
    let nodes_ops: Vec<serde_json::Value> = (0..nodes)
        .map(
            |n| json!({"Node": {"Verb": "set", "Node": {"Node": format!("node{n}"), "Address": format!("10.99.{}.{}", n / 256, n % 256)}}}),
        )
        .collect();
    for chunk in nodes_ops.chunks(64) {
        let r = ureq::put(&consul.url("/v1/txn"))
            .send_string(&serde_json::Value::from(chunk.to_vec()).to_string())
            .map_err(|e| anyhow::anyhow!("PUT /v1/txn: {e}"))?;
        anyhow::ensure!(r.status() == 200, "PUT /v1/txn: HTTP {}", r.status());
    }
    let mut ops = Vec::new();
    for s in services {
        for k in 0..per {
            let i = s * per + k;
            let node = format!("node{}", i % nodes);
            let (ip, port) = instance_addr(i);
            let id = format!("svc{s}-{k}");
            ops.push(json!({"Service": {"Verb": "set", "Node": node, "Service": {"ID": id, "Service": format!("svc{s}"), "Address": ip, "Port": port, "Tags": ["v1"]}}}));
            ops.push(json!({"Check": {"Verb": "set", "Check": {"Node": node, "CheckID": format!("chk-{id}"), "Name": "http", "Status": "passing", "ServiceID": id, "Output": "HTTP GET http://service/health: 200 OK"}}}));
        }
    }
    let batches: Vec<String> = ops.chunks(64).map(|c| serde_json::Value::from(c.to_vec()).to_string()).collect();
    let url = consul.url("/v1/txn");
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (batches, url) = (&batches, &url);
                scope.spawn(move || -> anyhow::Result<()> {
                    for b in batches.iter().skip(t).step_by(4) {
                        let r = ureq::put(url).send_string(b).map_err(|e| anyhow::anyhow!("PUT /v1/txn: {e}"))?;
                        anyhow::ensure!(r.status() == 200, "PUT /v1/txn: HTTP {}", r.status());
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("loader thread panicked"))??;
        }
        Ok(())
    })
}

/// dnsmasq serving the same records: `host-record` for A and for the SRV targets, `srv-host`.
fn start_dnsmasq(dir: &std::path::Path, services: usize, per: usize) -> anyhow::Result<(Proc, u16)> {
    let port = free_port();
    let mut conf = format!("no-resolv\nno-hosts\nport={port}\nlisten-address=127.0.0.1\nbind-interfaces\nlocal-ttl=5\npid-file=\n");
    for s in 0..services {
        for k in 0..per {
            let (ip, p) = instance_addr(s * per + k);
            let target = format!("{}.addr.service.upsync", ip_label(&ip));
            conf.push_str(&format!("host-record=svc{s}.service.upsync,{ip}\nhost-record={target},{ip}\nsrv-host=_svc{s}._tcp.service.upsync,{target},{p},1,1\n"));
        }
    }
    let path = dir.join("dnsmasq.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new("/usr/sbin/dnsmasq");
    cmd.arg("-k").arg("-C").arg(&path);
    let p = Proc::spawn("dnsmasq", cmd, &dir.join("dnsmasq.log"))?;
    Ok((p, port))
}

/// unbound serving the same records as `local-data` in a static local zone, 2 threads.
fn start_unbound(dir: &std::path::Path, services: usize, per: usize) -> anyhow::Result<(Proc, u16)> {
    let port = free_port();
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1\n  port: {port}\n  do-ip6: no\n  num-threads: 2\n  so-reuseport: yes\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  module-config: \"iterator\"\n  access-control: 127.0.0.0/8 allow\n  local-zone: \"service.upsync.\" static\n",
        d = dir.display()
    );
    for s in 0..services {
        for k in 0..per {
            let (ip, p) = instance_addr(s * per + k);
            let target = format!("{}.addr.service.upsync.", ip_label(&ip));
            conf.push_str(&format!(
                "  local-data: \"svc{s}.service.upsync. 5 IN A {ip}\"\n  local-data: \"_svc{s}._tcp.service.upsync. 5 IN SRV 1 1 {p} {target}\"\n  local-data: \"{target} 5 IN A {ip}\"\n"
            ));
        }
    }
    conf.push_str("remote-control:\n  control-enable: no\n");
    let path = dir.join("unbound.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new(if std::path::Path::new("/usr/sbin/unbound").exists() { "/usr/sbin/unbound" } else { "unbound" });
    cmd.arg("-d").arg("-c").arg(&path);
    let p = Proc::spawn("unbound", cmd, &dir.join("unbound.log"))?;
    Ok((p, port))
}

/// The zone file NSD and Knot serve: the same A, SRV and target records.
fn write_zone(dir: &std::path::Path, services: usize, per: usize) -> anyhow::Result<std::path::PathBuf> {
    let mut z = String::from(
        "$ORIGIN service.upsync.\n$TTL 5\n@ IN SOA ns.service.upsync. hostmaster.service.upsync. 1 3600 600 86400 5\n@ IN NS ns\nns IN A 127.0.0.53\n",
    );
    for s in 0..services {
        for k in 0..per {
            let (ip, p) = instance_addr(s * per + k);
            let target = format!("{}.addr", ip_label(&ip));
            z.push_str(&format!("svc{s} IN A {ip}\n_svc{s}._tcp IN SRV 1 1 {p} {target}\n{target} IN A {ip}\n"));
        }
    }
    let path = dir.join("service.upsync.zone");
    std::fs::write(&path, z)?;
    Ok(path)
}

/// NSD (authoritative) serving the zone file, 2 server processes (one per core), its files in `dir`.
fn start_nsd(dir: &std::path::Path, zone: &std::path::Path) -> anyhow::Result<(Proc, u16)> {
    let port = free_port();
    let d = dir.join("nsd");
    std::fs::create_dir_all(&d)?;
    let conf = format!(
        "server:\n  ip-address: 127.0.0.1@{port}\n  port: {port}\n  server-count: 2\n  reuseport: yes\n  username: \"\"\n  chroot: \"\"\n  zonesdir: \"{d}\"\n  database: \"\"\n  pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  xfrdir: \"{d}\"\n  zonelistfile: \"{d}/zone.list\"\n  logfile: \"{d}/nsd.log\"\n  verbosity: 0\n  do-ip6: no\nremote-control:\n  control-enable: no\nzone:\n  name: service.upsync.\n  zonefile: \"{z}\"\n",
        d = d.display(),
        z = zone.display()
    );
    let path = d.join("nsd.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new("/usr/sbin/nsd");
    cmd.arg("-d").arg("-c").arg(&path);
    let p = Proc::spawn("nsd", cmd, &dir.join("nsd.log"))?;
    Ok((p, port))
}

/// Knot DNS (authoritative) serving the zone file, 2 UDP workers, its files in `dir`.
fn start_knot(dir: &std::path::Path, zone: &std::path::Path) -> anyhow::Result<(Proc, u16)> {
    let port = free_port();
    let d = dir.join("knot");
    std::fs::create_dir_all(&d)?;
    let conf = format!(
        "server:\n  rundir: \"{d}\"\n  listen: 127.0.0.1@{port}\n  udp-workers: 2\n  tcp-workers: 1\n  background-workers: 1\ndatabase:\n  storage: \"{d}\"\nlog:\n  - target: stderr\n    any: warning\ntemplate:\n  - id: default\n    storage: \"{d}\"\n    zonefile-sync: -1\n    journal-content: none\n    semantic-checks: off\nzone:\n  - domain: service.upsync.\n    file: \"{z}\"\n",
        d = d.display(),
        z = zone.display()
    );
    let path = d.join("knot.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new("/usr/sbin/knotd");
    cmd.arg("-c").arg(&path);
    let p = Proc::spawn("knot", cmd, &dir.join("knot.log"))?;
    Ok((p, port))
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct PerfReport {
    qps: f64,
    avg_latency_ms: f64,
    lost: u64,
    sent: u64,
    cpu_us_per_query: f64,
    /// The part of `cpu_us_per_query` spent in the kernel (system time): receiving and sending
    /// the datagrams, the same work for every server.
    system_us_per_query: f64,
}

/// dnsperf for `secs` against 127.0.0.1:port with `file`, and the CPU the server's `pids` used.
fn dnsperf(port: u16, file: &std::path::Path, secs: u64, pids: &[u32]) -> anyhow::Result<PerfReport> {
    let before = cpu_split_us(pids);
    let out = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-l", &secs.to_string(), "-c", "8", "-T", "2", "-q", "500", "-t", "2", "-e"])
        .arg("-d")
        .arg(file)
        .output()
        .map_err(|e| anyhow::anyhow!("running dnsperf (install it with `make deps`): {e}"))?;
    let after = cpu_split_us(pids);
    let (user, system) = (after.0 - before.0, after.1 - before.1);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut r = PerfReport::default();
    for line in text.lines().map(str::trim) {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["Queries", "per", "second:", v] => r.qps = v.parse()?,
            ["Queries", "sent:", v] => r.sent = v.parse()?,
            ["Queries", "lost:", v, ..] => r.lost = v.parse()?,
            ["Average", "Latency", "(s):", v, ..] => r.avg_latency_ms = v.parse::<f64>()? * 1000.0,
            _ => {}
        }
    }
    anyhow::ensure!(r.sent > 0, "cannot read dnsperf's report:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let answered = r.sent.saturating_sub(r.lost).max(1);
    r.cpu_us_per_query = (user + system) / answered as f64;
    r.system_us_per_query = system / answered as f64;
    Ok(r)
}

/// One UDP question; the answer, if one comes within 200 ms.
fn ask(sock: &UdpSocket, name: &Name, t: RecordType, id: u16) -> Option<Message> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.add_query(Query::query(name.clone(), t));
    sock.send(&m.to_vec().ok()?).ok()?;
    let mut buf = [0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).ok()?;
        let r = Message::from_vec(&buf[..n]).ok()?;
        if r.metadata.id == id {
            return Some(r);
        }
    }
}

/// Polls `targets` (server, name) in turn, from one thread with a short pause between rounds
/// (busy pollers on several threads would starve the servers of the 2 cores), until each
/// answers A with (`present`) or without `ip`; the delay of each from `start`.
fn until_visible(targets: &[(SocketAddr, &str)], ip: &str, present: bool, start: Instant) -> Vec<Duration> {
    let socks: Vec<(UdpSocket, Name)> = targets
        .iter()
        .map(|(server, name)| {
            let sock = UdpSocket::bind("127.0.0.1:0").expect("UDP socket");
            sock.connect(server).expect("connect");
            sock.set_read_timeout(Some(Duration::from_millis(200))).ok();
            (sock, Name::from_str(name).expect("name"))
        })
        .collect();
    let mut seen: Vec<Option<Duration>> = vec![None; targets.len()];
    let mut id = 0u16;
    while seen.iter().any(Option::is_none) {
        for (i, (sock, name)) in socks.iter().enumerate() {
            if seen[i].is_some() {
                continue;
            }
            id = id.wrapping_add(1);
            if let Some(m) = ask(sock, name, RecordType::A, id) {
                let has = m.answers.iter().any(|r| matches!(&r.data, RData::A(a) if a.to_string() == ip));
                if has == present {
                    seen[i] = Some(start.elapsed());
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{ip} never became {} in {targets:?}",
            if present { "visible" } else { "invisible" }
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    seen.into_iter().flatten().collect()
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct Percentiles {
    rounds: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Percentiles {
        let max = v.iter().cloned().fold(0.0, f64::max);
        Percentiles { rounds: v.len(), p50_ms: percentile(&mut v.clone(), 50.0), p99_ms: percentile(&mut v, 99.0), max_ms: max }
    }

    fn cell(&self) -> String {
        format!("{:.1} / {:.1} / {:.1} ms ({} rounds)", self.p50_ms, self.p99_ms, self.max_ms, self.rounds)
    }
}

/// upsync-dns's delays, and Consul DNS's for the same changes (it reads the agent's state
/// directly: the floor, what Consul itself takes to apply a write).
#[derive(Clone, Debug, Default, serde::Serialize)]
struct Delays {
    ours: Percentiles,
    consul_dns: Percentiles,
}

impl Delays {
    fn of(v: Vec<(f64, f64)>) -> Delays {
        Delays { ours: Percentiles::of(v.iter().map(|x| x.0).collect()), consul_dns: Percentiles::of(v.iter().map(|x| x.1).collect()) }
    }

    fn cell(&self) -> String {
        if self.ours.rounds == 0 {
            return "–".into();
        }
        format!("{} (Consul DNS {:.1} / {:.1})", self.ours.cell(), self.consul_dns.p50_ms, self.consul_dns.p99_ms)
    }
}

/// Consul write -> DNS answer, for the ways instances come and go.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct Freshness {
    /// A known instance's check failing / passing again.
    check_flip: Delays,
    /// A new instance (registered with its check, critical at first) turning passing.
    new_instance: Delays,
    /// An instance drained (maintenance mode on) before it goes.
    drain: Delays,
    /// A passing instance deregistered without draining first (of the service that has been
    /// changing: watched on its own, see `hot_services`).
    abrupt_deregistration: Delays,
    /// The same, in a service without any change since the catalog was loaded.
    abrupt_deregistration_cold: Delays,
    /// The same, each after `QUIET` without any change (not back to back).
    abrupt_deregistration_cold_quiet: Delays,
    /// A node leaving the catalog (all its instances at once): one of them gone.
    node_leaving: Delays,
}

/// The pause before each of the "after a quiet moment" rounds: longer than the spacing of
/// upsync-dns's instance-count reads (4x their ~0.4 s at the default budget).
const QUIET: Duration = Duration::from_secs(3);
/// Services registered to push the cold ones out of upsync-dns's hot watches: its default
/// `hot_services`.
const FLUSH: usize = 32;

/// An instance loaded by `load_catalog`: (node, service id, service, address).
type Loaded = (String, String, String, String);

/// Instance 0 of services `services` (loaded by `load_catalog`).
fn loaded(services: impl Iterator<Item = usize>, per: usize, nodes: usize) -> Vec<Loaded> {
    services.map(|s| (format!("node{}", (s * per) % nodes), format!("svc{s}-0"), format!("svc{s}"), instance_addr(s * per).0)).collect()
}

fn freshness(consul: &Consul, dns: &DnsServer, rounds: usize, slow_rounds: usize, cold: &[Loaded], leaving: &[Loaded]) -> Freshness {
    let put = |path: &str, body: Option<serde_json::Value>| {
        let b = body.map(|b| b.to_string());
        let (status, text) = consul.api("PUT", path, b.as_deref().map(str::as_bytes)).expect("Consul PUT");
        assert_eq!(status, 200, "PUT {path}: {text}");
    };
    let register = |id: &str, ip: &str| {
        put(
            "/v1/agent/service/register",
            Some(json!({"ID": id, "Name": "fresh", "Address": ip, "Port": 80, "Check": {"CheckID": format!("{id}-ttl"), "TTL": "1h"}})),
        );
    };
    let consul_dns = SocketAddr::from(([127, 0, 0, 1], consul.ports.dns));
    // Both servers polled in turn from the same start.
    let both = |ip: &str, present: bool, start: Instant| -> (f64, f64) {
        let d = until_visible(&[(dns.addr(), "fresh.service.upsync."), (consul_dns, "fresh.service.consul.")], ip, present, start);
        let (ours, theirs) = (d[0].as_secs_f64() * 1000.0, d[1].as_secs_f64() * 1000.0);
        if ours > 100.0 {
            // With the time of day, to find the round in upsync-dns's debug log.
            let at = humantime::format_rfc3339_micros(std::time::SystemTime::now() - d[0]);
            eprintln!(
                "  slow round: {ip} {} after {ours:.0} ms (write at {at}; Consul DNS {theirs:.0} ms)",
                if present { "visible" } else { "gone" }
            );
        }
        (ours, theirs)
    };
    let visible = |ip: &str, present: bool, start: Instant| both(ip, present, start).0;
    register("fresh-1", "127.0.0.81");
    put("/v1/agent/check/pass/fresh-1-ttl", None);
    visible("127.0.0.81", true, Instant::now());
    let mut f = Freshness::default();

    let mut v = Vec::new();
    for i in 0..rounds {
        let (state, present) = if i % 2 == 0 { ("fail", false) } else { ("pass", true) };
        let start = Instant::now();
        put(&format!("/v1/agent/check/{state}/fresh-1-ttl"), None);
        v.push(both("127.0.0.81", present, start));
    }
    f.check_flip = Delays::of(v);

    // Every instance has its own address, so the one before it cannot be mistaken for it.
    let (mut new, mut drain) = (Vec::new(), Vec::new());
    for i in 0..rounds / 2 {
        let (id, ip) = (format!("fresh-n{i}"), format!("127.0.1.{}", i % 250 + 1));
        register(&id, &ip);
        // A check passes a moment after its instance is registered (its first run).
        std::thread::sleep(Duration::from_millis(200));
        let start = Instant::now();
        put(&format!("/v1/agent/check/pass/{id}-ttl"), None);
        new.push(both(&ip, true, start));
        let start = Instant::now();
        put(&format!("/v1/agent/service/maintenance/{id}?enable=true&reason=drain"), None);
        drain.push(both(&ip, false, start));
        put(&format!("/v1/agent/service/deregister/{id}"), None);
    }
    f.new_instance = Delays::of(new);
    f.drain = Delays::of(drain);

    let mut abrupt = Vec::new();
    for i in 0..slow_rounds {
        let (id, ip) = (format!("fresh-a{i}"), format!("127.0.2.{}", i % 250 + 1));
        register(&id, &ip);
        put(&format!("/v1/agent/check/pass/{id}-ttl"), None);
        visible(&ip, true, Instant::now());
        let start = Instant::now();
        put(&format!("/v1/agent/service/deregister/{id}"), None);
        abrupt.push(both(&ip, false, start));
    }
    f.abrupt_deregistration = Delays::of(abrupt);

    // `ip` of `service` served by both, then after `pause` a catalog deregistration (`body`):
    // until it is gone from each.
    let gone_after = |service: &str, ip: &str, pause: Duration, body: serde_json::Value| -> (f64, f64) {
        let targets = [(dns.addr(), format!("{service}.service.upsync.")), (consul_dns, format!("{service}.service.consul."))];
        let targets: Vec<(SocketAddr, &str)> = targets.iter().map(|(a, n)| (*a, n.as_str())).collect();
        until_visible(&targets, ip, true, Instant::now());
        std::thread::sleep(pause);
        let start = Instant::now();
        put("/v1/catalog/deregister", Some(body));
        let d = until_visible(&targets, ip, false, start);
        (d[0].as_secs_f64() * 1000.0, d[1].as_secs_f64() * 1000.0)
    };
    // Cold means cold: services loaded one after another may still be among the last ones
    // upsync-dns watched alone. FLUSH services (its default hot_services) registered one at a
    // time, each seen before the next, push every earlier one out.
    let flush = if cold.is_empty() { 0 } else { FLUSH };
    for i in 0..flush {
        let (id, ip) = (format!("flush{i}"), format!("127.0.3.{}", i + 1));
        put("/v1/agent/service/register", Some(json!({"ID": id, "Name": id, "Address": ip, "Port": 80})));
        until_visible(&[(dns.addr(), &format!("{id}.service.upsync."))], &ip, true, Instant::now());
    }
    if flush > 0 {
        // Their reads done and spaced out: the rounds start from a quiet registry.
        std::thread::sleep(2 * QUIET);
    }
    // Back to back, then each after a quiet moment.
    for (half, pause) in [(0, Duration::ZERO), (1, QUIET)] {
        let v: Vec<(f64, f64)> = cold
            .iter()
            .skip(half)
            .step_by(2)
            .map(|(node, id, service, ip)| gone_after(service, ip, pause, json!({"Node": node, "ServiceID": id})))
            .collect();
        if !v.is_empty() {
            *(if half == 0 { &mut f.abrupt_deregistration_cold } else { &mut f.abrupt_deregistration_cold_quiet }) = Delays::of(v);
        }
    }
    // A node deregistered with its instances (a host leaving: `consul leave`, scale-in).
    let v: Vec<(f64, f64)> = leaving.iter().map(|(node, _, service, ip)| gone_after(service, ip, QUIET, json!({"Node": node}))).collect();
    if !v.is_empty() {
        f.node_leaving = Delays::of(v);
    }
    put("/v1/agent/service/deregister/fresh-1", None);
    for i in 0..flush {
        put(&format!("/v1/agent/service/deregister/flush{i}"), None);
    }
    f
}

/// dnsperf A and SRV against the six servers, serving services `0..services`.
struct Phase<'a> {
    dir: &'a std::path::Path,
    consul: &'a Consul,
    dns: &'a DnsServer,
    secs: u64,
}

impl Phase<'_> {
    fn run(&self, services: usize, per: usize) -> anyhow::Result<Vec<(String, &'static str, PerfReport)>> {
        let dir = self.dir.join(format!("{}-instances", services * per));
        std::fs::create_dir_all(&dir)?;
        let (dnsmasq, dnsmasq_port) = start_dnsmasq(&dir, services, per)?;
        let (unbound, unbound_port) = start_unbound(&dir, services, per)?;
        let zone = write_zone(&dir, services, per)?;
        let (nsd, nsd_port) = start_nsd(&dir, &zone)?;
        let (knot, knot_port) = start_knot(&dir, &zone)?;
        for (what, port) in [("dnsmasq", dnsmasq_port), ("unbound", unbound_port), ("NSD", nsd_port), ("Knot", knot_port)] {
            wait_until(&format!("{what} answering svc0"), Duration::from_secs(300), || {
                !dig(SocketAddr::from(([127, 0, 0, 1], port)), &["svc0.service.upsync.", "A"]).answer.is_empty()
            });
        }
        let consul_dns = SocketAddr::from(([127, 0, 0, 1], self.consul.ports.dns));
        wait_until("Consul DNS answering svc0", Duration::from_secs(60), || {
            !dig(consul_dns, &["svc0.service.consul.", "A"]).answer.is_empty()
        });

        // Query files: every service once, shuffled (xorshift, fixed seed).
        let mut order: Vec<usize> = (0..services).collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in (1..order.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let qfile = |name: &str, f: &dyn Fn(usize) -> String| -> anyhow::Result<std::path::PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, order.iter().map(|&s| f(s) + "\n").collect::<String>())?;
            Ok(p)
        };
        let a_ours = qfile("a.txt", &|s| format!("svc{s}.service.upsync A"))?;
        let srv_ours = qfile("srv.txt", &|s| format!("_svc{s}._tcp.service.upsync SRV"))?;
        let a_consul = qfile("a-consul.txt", &|s| format!("svc{s}.service.consul A"))?;
        let srv_consul = qfile("srv-consul.txt", &|s| format!("_svc{s}._tcp.service.consul SRV"))?;
        let servers: [(&str, u16, u32, bool); 6] = [
            ("upsync-dns", self.dns.port, self.dns.pid(), false),
            ("Consul DNS", self.consul.ports.dns, self.consul.pid(), true),
            ("dnsmasq", dnsmasq_port, dnsmasq.pid(), false),
            ("unbound", unbound_port, unbound.pid(), false),
            ("NSD", nsd_port, nsd.pid(), false),
            ("Knot", knot_port, knot.pid(), false),
        ];
        let mut results = Vec::new();
        for (qtype, ours, theirs) in [("A", &a_ours, &a_consul), ("SRV", &srv_ours, &srv_consul)] {
            for (name, port, pid, is_consul) in servers {
                eprintln!("dnsperf {qtype}: {name} ({} instances)", services * per);
                // NSD answers from forked server processes: their CPU counts.
                let mut pids = vec![pid];
                let mut i = 0;
                while i < pids.len() {
                    pids.extend(upsync_tests::proc::children_of(pids[i]));
                    i += 1;
                }
                let r = dnsperf(port, if is_consul { theirs } else { ours }, self.secs, &pids)?;
                results.push((name.to_string(), qtype, r));
            }
        }
        Ok(results)
    }
}

fn print_runs(instances: usize, results: &[(String, &str, PerfReport)]) {
    let find = |name: &str, t: &str| results.iter().find(|(n, q, _)| n == name && *q == t).map(|(_, _, r)| r.clone()).unwrap_or_default();
    for (name, qtype, r) in results {
        let ours = find("upsync-dns", qtype);
        println!(
            "| {instances} | {name} | {qtype} | {:.0} | {:.2} ms | {} | {:.1} µs | {:.1} µs | {:.2}x |",
            r.qps,
            r.avg_latency_ms,
            r.lost,
            r.cpu_us_per_query,
            r.system_us_per_query,
            ours.qps / r.qps.max(1e-9)
        );
    }
}

fn print_ratios(instances: usize, results: &[(String, &str, PerfReport)]) {
    let find = |name: &str, t: &str| results.iter().find(|(n, q, _)| n == name && *q == t).map(|(_, _, r)| r.clone()).unwrap_or_default();
    for t in ["A", "SRV"] {
        let (o, c, m, u) = (find("upsync-dns", t), find("Consul DNS", t), find("dnsmasq", t), find("unbound", t));
        let (n, k) = (find("NSD", t), find("Knot", t));
        let r = |x: &PerfReport| o.qps / x.qps.max(1e-9);
        let cpu = |x: &PerfReport| o.cpu_us_per_query / x.cpu_us_per_query.max(1e-9);
        let user = |x: &PerfReport| x.cpu_us_per_query - x.system_us_per_query;
        println!(
            "- {instances} instances, {t}: upsync-dns answers **{:.1}x** Consul DNS, **{:.2}x** dnsmasq, **{:.2}x** unbound, **{:.2}x** NSD, **{:.2}x** Knot (queries/s); its CPU per query is {:.2}x / {:.2}x / {:.2}x / {:.2}x / {:.2}x theirs; outside the kernel {:.2} µs per query (unbound {:.2}, Knot {:.2})",
            r(&c),
            r(&m),
            r(&u),
            r(&n),
            r(&k),
            cpu(&c),
            cpu(&m),
            cpu(&u),
            cpu(&n),
            cpu(&k),
            user(&o),
            user(&u),
            user(&k)
        );
    }
}

fn main() -> anyhow::Result<()> {
    let services = env("UPSYNC_BENCH_DNS_SERVICES", 10_000) as usize;
    let per = env("UPSYNC_BENCH_DNS_PER_SERVICE", 10) as usize;
    let nodes = env("UPSYNC_BENCH_DNS_NODES", 1000) as usize;
    let secs = env("UPSYNC_BENCH_SECS", 10);
    let rounds = env("UPSYNC_BENCH_DNS_ROUNDS", 50) as usize;
    let small = services.min(100);
    let total = services * per;
    let dir = TestDir::new("bench-dns");
    let consul = Consul::start(&dir.subdir("consul"));
    let dns = DnsServer::start(
        &dir.subdir("upsync-dns"),
        &consul.http_addr(),
        DnsOptions { args: vec!["--ttl".into(), "5".into()], ..Default::default() },
    );
    let phase = Phase { dir: dir.path(), consul: &consul, dns: &dns, secs };

    eprintln!("freshness on a small catalog: {rounds} rounds");
    let fresh_small = freshness(&consul, &dns, rounds, rounds / 2, &[], &[]);

    eprintln!("loading {small} services x {per} instances on {nodes} nodes into Consul");
    load_catalog(&consul, 0..small, per, nodes)?;
    wait_until("upsync-dns serving the small catalog", Duration::from_secs(300), || {
        dns.health()["usable_instances"].as_u64().unwrap_or(0) as usize >= small * per
    });
    // UPSYNC_BENCH_DNS_DNSPERF=0: freshness only (a quicker loop when working on the feed).
    let dnsperf_on = env("UPSYNC_BENCH_DNS_DNSPERF", 1) != 0;
    let small_runs = if dnsperf_on { phase.run(small, per)? } else { Vec::new() };

    eprintln!("loading {} more services x {per} instances into Consul", services - small);
    let t = Instant::now();
    load_catalog(&consul, small..services, per, nodes)?;
    eprintln!("  {} s", t.elapsed().as_secs());
    wait_until("upsync-dns serving the whole catalog", Duration::from_secs(900), || {
        dns.health()["usable_instances"].as_u64().unwrap_or(0) as usize >= total
    });
    let read_secs = dns.metric("upsync_dns_catalog_read_duration_seconds").unwrap_or(f64::NAN);
    let read_mb = dns.metric("upsync_dns_catalog_read_bytes").unwrap_or(f64::NAN) / 1e6;
    let dns_rss_mb = upsync_tests::proc::rss_kib(dns.pid()).unwrap_or(0) as f64 / 1024.0;
    let full_runs = if services > small && dnsperf_on { phase.run(services, per)? } else { Vec::new() };

    eprintln!("freshness on the full catalog");
    // Cold services: the first ones loaded, long evicted from the hot watches since.
    let cold = loaded((0..small).step_by(small.div_ceil(20).max(1)), per, nodes);
    // Nodes leaving: the first three instances of the big load, on three consecutive nodes
    // (each with about `total / nodes` instances of as many services; instances a node apart
    // would share a node when there are few nodes, and the second round would find it gone).
    let leaving: Vec<Loaded> = if services > small && nodes >= 3 {
        (small * per..small * per + 3)
            .map(|i| {
                let s = i / per;
                (format!("node{}", i % nodes), format!("svc{s}-{}", i % per), format!("svc{s}"), instance_addr(i).0)
            })
            .collect()
    } else {
        Vec::new()
    };
    let fresh_big = freshness(&consul, &dns, rounds, (rounds / 10).max(3), &cold, &leaving);

    println!(
        "### upsync-dns vs Consul DNS, dnsmasq, unbound, NSD, Knot (dnsperf -c 8 -T 2 -q 500 -e, {secs} s per run, same machine and run)\n"
    );
    println!(
        "| instances | server | type | queries/s | avg latency | lost | server CPU/query | of it in the kernel | upsync-dns qps ratio |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|---:|");
    print_runs(small * per, &small_runs);
    print_runs(total, &full_runs);
    println!();
    print_ratios(small * per, &small_runs);
    if !full_runs.is_empty() {
        print_ratios(total, &full_runs);
    }
    println!("- one full catalog read (`/v1/internal/ui/nodes`, {total} instances, Consul dev agent): {read_mb:.1} MB in {read_secs:.2} s (request + decoding); upsync-dns RSS {dns_rss_mb:.0} MB");
    println!("\n| freshness, Consul write -> DNS answer: upsync-dns p50 / p99 / max (Consul DNS p50 / p99) | few instances | {total} instances |");
    println!("|---|---:|---:|");
    type Row = (&'static str, fn(&Freshness) -> &Delays);
    let rows: [Row; 7] = [
        ("check of a known instance failing / passing", |f| &f.check_flip),
        ("new instance, its check passing 200 ms after registration", |f| &f.new_instance),
        ("instance drained (maintenance on)", |f| &f.drain),
        ("passing instance deregistered abruptly (a service being changed: watched alone)", |f| &f.abrupt_deregistration),
        ("the same in a service without a change for minutes, back to back", |f| &f.abrupt_deregistration_cold),
        ("the same, each after 3 s without any change", |f| &f.abrupt_deregistration_cold_quiet),
        ("a node leaving the catalog with its instances (one of them gone)", |f| &f.node_leaving),
    ];
    for (what, get) in rows {
        println!("| {what} | {} | {} |", get(&fresh_small).cell(), get(&fresh_big).cell());
    }
    let runs =
        |v: &[(String, &str, PerfReport)]| v.iter().map(|(n, q, r)| json!({"server": n, "type": q, "report": r})).collect::<Vec<_>>();
    let json = json!({
        "services": services, "instances": total, "seconds": secs,
        "runs_small": runs(&small_runs), "runs_full": runs(&full_runs),
        "catalog_read_seconds": read_secs, "catalog_read_mb": read_mb, "rss_mb": dns_rss_mb,
        "freshness_small": fresh_small, "freshness_full": fresh_big,
    });
    let out = upsync_tests::paths::build_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("dns.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
