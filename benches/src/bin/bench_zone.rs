//! Memory per synced server (`scripts/bench/zone.sh`, part of `make bench`): what an upstream's
//! servers cost in the module's shared zone and in each worker's private memory, next to stock
//! nginx with the same servers written out in an upstream with nginx's own `zone`.
//!
//! For each size in UPSYNC_BENCH_ZONE_SIZES (default 10,1000,10000): a KV prefix holding that
//! many servers (`127.X.Y.Z:8080`, no attributes; never contacted: no request goes through), a
//! fresh nginx (2 workers, the module, the default `upsync_shm_size` of 32 MiB) with one
//! upstream synced from it, measured once `upstream_show` lists every server and 1 s has passed;
//! then a stock nginx (2 workers) with the same servers in `upstream app { zone app 16m; ... }`.
//! Measured per nginx: the zone's resident pages in the process(es) that wrote the servers there
//! (the shared mapping of exactly the zone's size in /proc/PID/smaps; [`Writer`]; nginx's slab
//! allocator does not expose its own counters, so this is page-granular: 4 KiB) and each
//! worker's private memory (`Private_Clean` + `Private_Dirty` of /proc/PID/smaps_rollup; the
//! module's leader worker and the other; and the private memory of the leader's Consul poller
//! process, forked by the leader and sharing its pages until either writes them). Sizes up to 10,000:
//! `upstream_show`'s JSON of a larger upstream exceeds the test client's answer limit. The figures per 1,000 servers are
//! differences against the smallest size. Prints a markdown section; writes build/bench/zone.json.
use std::time::Duration;

use upsync_benches::{proc_mem, zone_rss_kib};
use upsync_tests::consul::Consul;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::wait::wait_for_value;
use upsync_tests::TestDir;

/// The module's zone (`upsync_shm_size`'s default) and stock nginx's `zone`, in KiB: the two
/// sizes tell the mappings apart in smaps.
const MODULE_ZONE_KIB: u64 = 32 * 1024;
const STOCK_ZONE_KIB: u64 = 16 * 1024;

/// The i-th server: `127.X.Y.Z:8080`.
fn server(i: usize) -> String {
    format!("127.{}.{}.{}:8080", 10 + i / 62_500, (i / 250) % 250, i % 250 + 1)
}

/// One nginx's memory, in KiB.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct Mem {
    /// Resident pages of the zone's mapping in the process that wrote the servers there.
    zone: u64,
    /// Private memory (`Private_Clean` + `Private_Dirty`: pages no other process maps, so not
    /// the master's copy-on-write pages) of the module's leader worker (the one that forked the
    /// Consul poller; stock nginx: either worker) and of the other.
    leader_private: u64,
    other_private: u64,
    /// Private memory of the module's Consul poller process (0 for stock nginx).
    poller_private: u64,
}

/// Who wrote the servers into the zone, whose resident pages of it count.
#[derive(Clone, Copy, PartialEq)]
enum Writer {
    /// The module: a worker (the leader) installs the list, the other reads it; the largest
    /// over the workers. Not the master: `ngx_slab_init` zeroes the slab's page array, 24 bytes
    /// per 4 KiB page of the zone (192 KiB at 32 MiB), in the master only.
    Workers,
    /// Stock nginx's `zone`: the master copies the peers in at start; the largest over master
    /// and workers.
    Master,
}

fn measure(nginx: &Nginx, zone_kib: u64, writer: Writer) -> Mem {
    let workers = nginx.worker_pids();
    let mut pids = workers.clone();
    if writer == Writer::Master {
        pids.push(nginx.master_pid());
    }
    let zone = pids.iter().filter_map(|p| zone_rss_kib(*p, zone_kib)).max().unwrap_or(0);
    let pollers = nginx.poller_pids();
    let mut by_role: Vec<(bool, u64)> = workers.iter().map(|&p| (pollers.iter().any(|&(w, _)| w == p), proc_mem(p).private)).collect();
    by_role.sort();
    let other_private = by_role.first().map_or(0, |w| w.1);
    let leader_private = by_role.last().map_or(0, |w| w.1);
    let poller_private = pollers.first().map_or(0, |&(_, p)| proc_mem(p).private);
    Mem { zone, leader_private, other_private, poller_private }
}

fn main() -> anyhow::Result<()> {
    let mut sizes: Vec<usize> = std::env::var("UPSYNC_BENCH_ZONE_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).filter(|&n| n > 0).collect())
        .unwrap_or_else(|| vec![10, 1_000, 10_000]);
    sizes.sort();
    anyhow::ensure!(sizes.len() >= 2, "UPSYNC_BENCH_ZONE_SIZES needs two sizes or more");
    let dir = TestDir::new("bench-zone");
    let consul = Consul::start(&dir.subdir("consul"));
    let site = "server { listen 127.0.0.1:{{port}}; location / { proxy_pass http://app; } location = /show { upstream_show; } }";
    let mut results = Vec::new();
    for &size in &sizes {
        let prefix = format!("z{size}");
        let pairs: Vec<(String, String)> = (0..size).map(|i| (format!("upstreams/{prefix}/{}", server(i)), String::new())).collect();
        consul.kv_put_many(&pairs);

        let module = Nginx::start(
            &dir.subdir(&format!("module-{size}")),
            NginxConf::new(&format!(
                "upstream app {{ server 127.0.0.1:9; upsync {}/v1/kv/upstreams/{prefix} upsync_timeout=6m; }}\n{}",
                consul.http_addr(),
                site
            ))
            .workers(2),
        );
        wait_for_value(Duration::from_secs(120), || upsync_tests::upsync::shown_count(&module, "app"), |&n| n == size)
            .map_err(|t| anyhow::anyhow!("the module did not sync {size} servers ({} listed)", t.last))?;
        std::thread::sleep(Duration::from_secs(1));
        let m = measure(&module, MODULE_ZONE_KIB, Writer::Workers);
        drop(module);

        let servers: String = (0..size).map(|i| format!("server {};\n", server(i))).collect();
        let stock = Nginx::start(
            &dir.subdir(&format!("stock-{size}")),
            NginxConf::new(&format!(
                "upstream app {{ zone app {}k;\n{servers} }}\n{}",
                STOCK_ZONE_KIB,
                site.replace(" location = /show { upstream_show; }", "")
            ))
            .without_module()
            .workers(2),
        );
        std::thread::sleep(Duration::from_secs(1));
        let s = measure(&stock, STOCK_ZONE_KIB, Writer::Master);
        drop(stock);
        eprintln!("{size} servers: module {m:?}, stock {s:?}");
        results.push((size, m, s));
    }

    println!("### Memory per server: `scripts/bench/zone.sh`\n");
    println!(
        "One upstream of N servers synced by the module (2 workers, `upsync_shm_size` 32m) and the same servers written \
         out in stock nginx with `zone app 16m` (2 workers). Zone: resident pages of its mapping (4 KiB granularity) in \
         the workers (module: the leader writes the list, the other reads it) or the master (stock: it copies the \
         peers in at start); worker: private memory (pages no other process maps), leader (the module's worker \
         that forked the Consul poller) / other; the poller process's private memory. KiB.\n"
    );
    println!(
        "| servers | module: shared zone | module: leader / other worker | module: poller process | stock nginx `zone`: shared zone | stock nginx: per worker |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for (size, m, s) in &results {
        println!(
            "| {size} | {} | {} / {} | {} | {} | {} / {} |",
            m.zone, m.leader_private, m.other_private, m.poller_private, s.zone, s.leader_private, s.other_private
        );
    }
    let (base, bm, bs) = results[0];
    println!("\nPer 1,000 servers (difference against {base} servers), bytes:\n");
    println!("| from | module: shared zone | module: leader / other worker | module: poller process | stock nginx `zone`: shared zone | stock nginx: per worker |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let per_1000 = |a: u64, b: u64, n: usize| (a as f64 - b as f64) * 1024.0 * 1000.0 / (n - base) as f64;
    for (size, m, s) in &results[1..] {
        println!(
            "| {size} servers | {:.0} | {:.0} / {:.0} | {:.0} | {:.0} | {:.0} / {:.0} |",
            per_1000(m.zone, bm.zone, *size),
            per_1000(m.leader_private, bm.leader_private, *size),
            per_1000(m.other_private, bm.other_private, *size),
            per_1000(m.poller_private, bm.poller_private, *size),
            per_1000(s.zone, bs.zone, *size),
            per_1000(s.leader_private, bs.leader_private, *size),
            per_1000(s.other_private, bs.other_private, *size)
        );
    }
    let json: Vec<_> =
        results.iter().map(|(size, m, s)| serde_json::json!({ "servers": size, "module_kib": m, "stock_zone_kib": s })).collect();
    let out = upsync_tests::paths::build_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("zone.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
