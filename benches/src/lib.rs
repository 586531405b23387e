//! Shared pieces of the end-to-end benchmarks. The load helpers live in the test harness
//! (`upsync_tests::load`) because the whole-stack tests drive `wrk` too.
pub use upsync_tests::load::{cpu_split_us, cpu_us, parse_wrk, percentile, wrk, wrk_cpu, wrk_with, WrkReport};

use std::path::Path;

use upsync_tests::nginx::{Nginx, NginxConf};

/// `n` backends served by one stock nginx (one worker, no module), each on its own port and
/// answering with its name `b<i>`; with their `127.0.0.1:PORT` addresses. Fast enough not to be
/// the bottleneck of a benchmark. `/__status` on any of them is nginx's `stub_status`: the
/// requests all of them served ([`backend_requests`]).
pub fn named_backends(dir: &Path, n: usize) -> (Nginx, Vec<String>) {
    let mut servers = String::from("keepalive_requests 1000000;\n");
    for i in 0..n {
        let port = if i == 0 { "{{port}}".to_string() } else { format!("{{{{port{i}}}}}") };
        servers.push_str(&format!(
            "server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"b{i}\"; }} location = /__status {{ stub_status; }} }}\n"
        ));
    }
    let backends = Nginx::start(dir, NginxConf::new(&servers).without_module().workers(1));
    let addrs = (0..n).map(|i| format!("127.0.0.1:{}", if i == 0 { backends.port() } else { backends.extra_port(i) })).collect();
    (backends, addrs)
}

/// Requests the [`named_backends`] nginx has served so far (its `stub_status` counter; the
/// status requests themselves count too), through the backend at `addr`.
pub fn backend_requests(addr: &str) -> anyhow::Result<u64> {
    let (status, body) = upsync_tests::net::http_get(&format!("http://{addr}/__status"))?;
    // "Active connections: N\nserver accepts handled requests\n A H R\n..."
    let requests = body.lines().nth(2).and_then(|l| l.split_whitespace().nth(2)).and_then(|v| v.parse().ok());
    requests.ok_or_else(|| anyhow::anyhow!("unexpected stub_status answer from {addr} (HTTP {status}): {body}"))
}

/// Resident KiB of the shared mapping of exactly `size_kib` in `pid` (the module's zone:
/// `upsync_shm_size`; the `rw-s` mapping of that size in /proc/PID/smaps): the zone's pages
/// this process touched. nginx's slab allocator does not expose its own counters.
pub fn zone_rss_kib(pid: u32, size_kib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut shared = false;
    let mut size_ok = false;
    for line in smaps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first().is_some_and(|a| a.contains('-') && !a.ends_with(':')) && f.len() >= 5 {
            shared = f[1].ends_with('s');
            size_ok = false;
        } else if f.first() == Some(&"Size:") {
            size_ok = shared && f.get(1).and_then(|v| v.parse::<u64>().ok()) == Some(size_kib);
        } else if f.first() == Some(&"Rss:") && size_ok {
            return f.get(1).and_then(|v| v.parse().ok());
        }
    }
    None
}

/// Memory of one process (KiB, /proc/PID/smaps_rollup): resident, private (`Private_Clean` +
/// `Private_Dirty`: pages no other process maps, so not a worker's copy-on-write pages shared
/// with the master: what it costs on its own) and anonymous.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ProcMem {
    pub rss: u64,
    pub private: u64,
    pub anon: u64,
}

/// [`ProcMem`] of `pid` (zeros when it is gone).
pub fn proc_mem(pid: u32) -> ProcMem {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        rollup.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0)
    };
    ProcMem { rss: field("Rss"), private: field("Private_Clean") + field("Private_Dirty"), anon: field("Anonymous") }
}
