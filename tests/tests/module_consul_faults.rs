//! The module under a slow or hostile Consul: real nginx + module, real Consul, and the fault
//! proxy (`upsync_tests::faultproxy`) between them. For each fault: the last list keeps serving,
//! the fault shows in `upstream_show`'s `last_error`, memory stays bounded, and once the proxy
//! passes answers again a Consul change reaches traffic.
use std::time::{Duration, Instant};

use upsync_tests::backend::Backend;
use upsync_tests::consul::Consul;
use upsync_tests::faultproxy::{Fault, FaultProxy, HUGE_BODY};
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::proc::status_kib;
use upsync_tests::upsync::{all_ok, delete_server, http_block, put_server, show_json, wait_servers};
use upsync_tests::{wait_for, wait_until, TestDir};

/// The module's transfer limit: once an answer has begun, the rest must follow within the
/// client's request timeout (10 s). The upstreams here use `upsync_timeout=30s`, so a blocking
/// query's own timeout is 10 s + 26.5 s wait + 1.7 s jitter = 38 s: an error within
/// `SLOW_BOUND` can only come from the transfer limit.
const SLOW_BOUND: Duration = Duration::from_secs(25);

struct Setup {
    // Field order is drop order: nginx first, then the proxy it talks to, then Consul.
    nginx: Nginx,
    proxy: FaultProxy,
    consul: Consul,
    a: Backend,
    b: Backend,
    _dir: TestDir,
}

/// nginx (2 workers) syncing upstream `app` from Consul through the fault proxy, serving `a`.
fn setup(name: &str, params: &str) -> Setup {
    let dir = TestDir::new(name);
    let consul = Consul::start(dir.path());
    let proxy = FaultProxy::start(consul.ports.http);
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    put_server(&consul, "app", &a.host_port(), "");
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &proxy.addr(), params, "")).workers(2));
    wait_servers(&nginx, "app", &[&a.host_port()]);
    Setup { nginx, proxy, consul, a, b, _dir: dir }
}

impl Setup {
    fn url(&self) -> String {
        self.nginx.url("/")
    }

    fn last_error(&self) -> String {
        show_json(&self.nginx, "app")["sync"]["last_error"].as_str().unwrap_or("").to_string()
    }

    /// Switches the proxy to `fault`, writes a change to Consul (b joins) so the waiting blocking
    /// query answers, and waits until the fault hit an answer and `last_error` contains `want`.
    /// Meanwhile and after, requests go to `a` only: the last list keeps serving.
    fn fault(&self, fault: Fault, want: &str, within: Duration) -> Duration {
        let hits = self.proxy.faulted();
        self.proxy.set(fault.clone());
        let started = Instant::now();
        put_server(&self.consul, "app", &self.b.host_port(), "");
        wait_until(&format!("{fault:?} to hit an answer"), Duration::from_secs(10), || self.proxy.faulted() > hits);
        wait_until(&format!("last_error with {want:?} under {fault:?}"), within, || self.last_error().contains(want));
        let took = started.elapsed();
        assert_eq!(all_ok(&self.url(), 10).get("a"), Some(&10), "the last list stopped serving under {fault:?}");
        assert_eq!(show_json(&self.nginx, "app")["servers"].as_array().map(Vec::len), Some(1), "the list changed under {fault:?}");
        took
    }

    /// Back to pass-through: the change written during the fault reaches traffic, and so does
    /// the next one.
    fn recover(&self) {
        self.proxy.set(Fault::Pass);
        let both = [self.a.host_port(), self.b.host_port()];
        wait_servers_within(&self.nginx, &[&both[0], &both[1]], Duration::from_secs(45));
        wait_until("b serving", Duration::from_secs(10), || upsync_tests::upsync::hits(&self.url(), 4).contains_key("b"));
        delete_server(&self.consul, "app", &self.b.host_port());
        wait_servers(&self.nginx, "app", &[&both[0]]);
        assert_eq!(all_ok(&self.url(), 5).get("a"), Some(&5));
    }
}

/// `wait_servers` with a longer bound (a retry may be in its backoff or in a second fault).
fn wait_servers_within(nginx: &Nginx, expected: &[&str], within: Duration) {
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_for(&format!("app to list {want:?}"), within, || {
        let s = show_json(nginx, "app");
        let mut got: Vec<String> = s["servers"].as_array()?.iter().filter_map(|x| x["server"].as_str().map(str::to_string)).collect();
        got.sort();
        (got == want).then_some(())
    });
}

/// Established connections from this host to 127.0.0.1:`port`, with their kernel timer:
/// (timer kind, seconds until it fires), from /proc/net/tcp (kind 2 is the keepalive timer).
fn timers_of_connections_to(port: u16) -> Vec<(u32, f64)> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let want = format!("0100007F:{port:04X}");
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 6 || f[2] != want || f[3] != "01" {
                return None;
            }
            let (kind, when) = f[5].split_once(':')?;
            // tm->when is in USER_HZ (100 per second).
            Some((u32::from_str_radix(kind, 16).ok()?, u64::from_str_radix(when, 16).ok()? as f64 / 100.0))
        })
        .collect()
}

#[test]
fn consul_connections_are_probed_by_tcp_keepalive() {
    let s = setup("faults_keepalive", "");
    // The leader's blocking query idles on its connection to the proxy: the kernel's keepalive
    // timer runs on it (first probe 5 s after the last packet), so a peer that vanished is
    // noticed within 5 s + 3 probes x 2 s = 11 s even while the query waits.
    let timers = wait_for("a keepalive timer on the Consul connection", Duration::from_secs(10), || {
        let t = timers_of_connections_to(s.proxy.port());
        t.iter().any(|(kind, _)| *kind == 2).then_some(t)
    });
    let (_, due) = timers.iter().find(|(k, _)| *k == 2).copied().unwrap();
    assert!(due <= 5.5, "first keepalive probe due in {due} s, expected at most 5 s: {timers:?}");
    s.recover_check_only();
}

impl Setup {
    /// A change still reaches traffic (for tests without a fault phase).
    fn recover_check_only(&self) {
        put_server(&self.consul, "app", &self.b.host_port(), "");
        wait_servers(&self.nginx, "app", &[&self.a.host_port(), &self.b.host_port()]);
    }
}

#[test]
fn stalled_and_trickling_answers_are_cut_and_the_last_list_kept() {
    let s = setup("faults_slow", "");
    for fault in [Fault::Stall, Fault::Dribble] {
        let took = s.fault(fault.clone(), "was not complete 10s later", SLOW_BOUND);
        eprintln!("{fault:?}: cut, error shown {took:?} after the change");
        s.recover();
    }
    assert!(s.nginx.crashes().is_empty(), "{:?}", s.nginx.crashes());
}

#[test]
fn a_connection_dropped_mid_answer_keeps_the_last_list() {
    let s = setup("faults_drop", "");
    s.fault(Fault::Drop, "HTTP exchange with Consul", Duration::from_secs(10));
    s.recover();
}

/// Peak resident memory (VmHWM) of nginx's processes minus their resident memory before, in
/// MiB: the largest over the master, the workers and the poller process (which reads Consul's
/// answers).
fn worker_growth_mib(before: &[(u32, u64)]) -> f64 {
    before.iter().map(|(pid, rss)| status_kib(*pid, "VmHWM").unwrap_or(0).saturating_sub(*rss) as f64 / 1024.0).fold(0.0, f64::max)
}

#[test]
fn a_300mb_answer_keeps_worker_memory_bounded() {
    let s = setup("faults_huge", "max_body=16m");
    let before: Vec<(u32, u64)> = s.nginx.process_pids().into_iter().map(|p| (p, status_kib(p, "VmRSS").unwrap_or(0))).collect();
    assert_eq!(s.nginx.poller_pids().len(), 1, "the poller is measured");
    s.fault(Fault::Huge, "exceeds 16777216 bytes", Duration::from_secs(20));
    let growth = worker_growth_mib(&before);
    let taken = s.proxy.huge_sent() as f64 / 1048576.0;
    eprintln!(
        "huge answer: the client took {taken:.1} MiB of {} MiB; peak RSS growth of an nginx process {growth:.1} MiB",
        HUGE_BODY >> 20
    );
    assert!(taken < 64.0, "the module read {taken:.1} MiB of a body limited to 16 MiB");
    assert!(growth < 48.0, "an nginx process's peak RSS (workers, poller) grew by {growth:.1} MiB with max_body=16m");
    s.recover();
    assert_eq!(s.nginx.worker_pids().len(), 2);
}

#[test]
fn a_garbage_index_backs_off_and_keeps_index_and_list() {
    let s = setup("faults_index", "");
    let index_before = show_json(&s.nginx, "app")["sync"]["consul_index"].as_u64().unwrap();
    let requests_before = s.proxy.requests();
    let started = Instant::now();
    for (value, shown) in [("abc", "\"abc\""), ("-5", "\"-5\""), ("18446744073709551616", "\"18446744073709551616\""), ("", "\"\" is not")]
    {
        s.fault(Fault::GarbageIndex(value.into()), shown, Duration::from_secs(20));
        let index = show_json(&s.nginx, "app")["sync"]["consul_index"].as_u64().unwrap();
        assert!(index >= index_before, "consul_index regressed from {index_before} to {index} on X-Consul-Index {value:?}");
    }
    // Every garbage answer is an error with exponential backoff: no request storm (the token
    // bucket alone would allow 10 + 100 per second at upsync_interval=10ms).
    let (requests, secs) = (s.proxy.requests() - requests_before, started.elapsed().as_secs_f64());
    eprintln!("garbage index: {requests} requests in {secs:.1} s");
    assert!((requests as f64) < 20.0 + 2.0 * secs, "{requests} requests in {secs:.1} s: the watch spins on a garbage index");
    s.recover();
}
