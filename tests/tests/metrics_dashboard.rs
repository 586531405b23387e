//! The three programs' Prometheus metrics as a real Prometheus (Debian's) scrapes them, and the
//! Grafana dashboard in `dashboards/grafana-upsync.json` against that Prometheus: every query
//! of the dashboard is valid PromQL and returns data, every metric it names exists, and the
//! names that mean the same thing are the same in the nginx module, upsync-dns and the sidecar.
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use upsync_tests::consul::Consul;
use upsync_tests::dns::{DnsOptions, DnsServer};
use upsync_tests::net::free_port;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::proc::Proc;
use upsync_tests::sidecar::{Sidecar, SidecarOpts};
use upsync_tests::upsync::{http_block, put_server, wait_servers};
use upsync_tests::{wait_until, TestDir};

/// Debian's `prometheus` on a free loopback port, scraping `jobs` (name, metrics path, port)
/// every second; storage in the test's directory.
struct Prometheus {
    port: u16,
    _proc: Proc,
}

impl Prometheus {
    fn start(dir: &Path, jobs: &[(&str, &str, u16)]) -> Prometheus {
        let mut config = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n");
        for (job, path, port) in jobs {
            config.push_str(&format!(
                "  - job_name: {job}\n    metrics_path: {path}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
            ));
        }
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config).expect("writing prometheus.yml");
        let port = free_port();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("prometheus-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let proc = Proc::spawn("prometheus", cmd, &dir.join("prometheus.log"))
            .unwrap_or_else(|e| panic!("{e}; install Debian's prometheus package (make deps)"));
        let p = Prometheus { port, _proc: proc };
        wait_until("Prometheus to be ready", Duration::from_secs(60), || {
            ureq::get(&format!("http://127.0.0.1:{port}/-/ready")).call().is_ok_and(|r| r.status() == 200)
        });
        p
    }

    /// `/api/v1/query` with `expr`: the result vector, or Prometheus' error.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let body: Value = match ureq::get(&url).query("query", expr).call() {
            Ok(r) => r.into_json().map_err(|e| e.to_string())?,
            Err(ureq::Error::Status(_, r)) => r.into_json().map_err(|e| e.to_string())?,
            Err(e) => return Err(e.to_string()),
        };
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Names of the series Prometheus holds under `upsync_`.
    fn names(&self) -> BTreeSet<String> {
        self.query(r#"count by (__name__) ({__name__=~"upsync_.+"})"#)
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s["metric"]["__name__"].as_str().map(str::to_string))
            .collect()
    }
}

/// The `upsync_...` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("upsync_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The sample names a scrape declares (`# TYPE` lines), with or without samples: a counter
/// family `F` gives `F_total`, a histogram `F_bucket`, `F_sum`, `F_count`.
fn declared(url: &str) -> BTreeSet<String> {
    let body = ureq::get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}")).into_string().expect("body");
    let mut out = BTreeSet::new();
    for l in body.lines() {
        let mut w = l.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(family), Some(kind)) = (w.next(), w.next(), w.next(), w.next()) {
            match kind {
                "counter" => {
                    out.insert(format!("{family}_total"));
                }
                "histogram" => out.extend(["_bucket", "_sum", "_count"].map(|s| format!("{family}{s}"))),
                _ => {
                    out.insert(family.to_string());
                }
            }
        }
    }
    out
}

/// Every query of the dashboard (panel title, expressions), with its variables set as Grafana
/// would: every upstream, a one-minute rate interval.
fn dashboard_queries() -> Vec<(String, Vec<String>)> {
    let path = upsync_tests::paths::repo_root().join("dashboards/grafana-upsync.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let d: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    assert_eq!(d["uid"], "upsync");
    let panels = d["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids must be unique");
    let mut out = Vec::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}: the data source is the dashboard's variable");
        assert!(p["description"].as_str().is_some_and(|s| !s.is_empty()), "{title}: no description");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        let exprs = targets
            .iter()
            .map(|t| {
                let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{title}: a target without expr"));
                expr.replace("$__rate_interval", "1m").replace("$upstream", ".*")
            })
            .collect();
        out.push((title, exprs));
    }
    out
}

#[test]
fn prometheus_scrapes_the_three_programs_and_every_dashboard_query_has_data() {
    let dir = TestDir::new("metrics_dashboard");
    let consul = Consul::start(dir.path());
    let http = format!(
        "{}\n server {{ listen 127.0.0.1:{{{{port1}}}}; location = /metrics {{ upsync_metrics; }} }}",
        http_block("app", &consul.http_addr(), "", "")
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http).workers(2));
    put_server(&consul, "app", "127.0.0.1:8001", "");
    put_server(&consul, "app", "127.0.0.1:8002", r#"{"backup":1}"#);
    wait_servers(&nginx, "app", &["127.0.0.1:8001", "127.0.0.1:8002"]);
    let dns = DnsServer::start(dir.path(), &consul.http_addr(), DnsOptions::default());
    // And one whose Consul is gone, so that the errors are there too.
    let dns_down =
        DnsServer::start(dir.path(), &format!("127.0.0.1:{}", free_port()), DnsOptions { no_wait_synced: true, ..Default::default() });
    // The container engine enabled on a socket where nothing listens: engine_up is exported (0).
    let sidecar = Sidecar::start(dir.path(), &consul.http_addr(), SidecarOpts::new("node-metrics", &dir.join("no-engine.sock")));
    let prometheus = Prometheus::start(
        dir.path(),
        &[
            // upstream_show itself: Prometheus' Accept header selects the metrics.
            ("nginx", "/show", nginx.port()),
            ("nginx-location", "/metrics", nginx.extra_port(1)),
            ("upsync-dns", "/metrics", dns.metrics_port),
            ("upsync-dns-down", "/metrics", dns_down.metrics_port),
            ("sidecar", "/metrics", sidecar.api_port),
        ],
    );
    // A query, so that upsync-dns has query counters and latency buckets.
    let _ = dns.dig(&["app.service.consul", "A"]);

    for job in ["nginx", "nginx-location", "upsync-dns", "upsync-dns-down", "sidecar"] {
        wait_until(&format!("Prometheus to scrape {job}"), Duration::from_secs(60), || {
            prometheus.query(&format!(r#"up{{job="{job}"}} == 1"#)).is_ok_and(|r| r.len() == 1)
        });
    }
    // Both nginx paths give the same metrics.
    let per_job = |job: &str| -> BTreeSet<String> {
        prometheus
            .query(&format!(r#"count by (__name__) ({{__name__=~"upsync_.+", job="{job}"}})"#))
            .unwrap()
            .iter()
            .filter_map(|s| s["metric"]["__name__"].as_str().map(str::to_string))
            .collect()
    };
    wait_until("the sidecar's first reconcile and upsync-dns's errors in Prometheus", Duration::from_secs(60), || {
        let names = prometheus.names();
        names.contains("upsync_sidecar_last_sync_age_seconds") && names.contains("upsync_dns_consul_errors_total")
    });
    assert_eq!(per_job("nginx"), per_job("nginx-location"));

    // What the programs declare, samples or not (a counter family with no series yet, such as
    // upsync-dns's errors by watch before any error, is declared all the same).
    let mut exported: BTreeSet<String> = BTreeSet::new();
    for url in [nginx.url("/show?format=prometheus"), dns.url("/metrics"), dns_down.url("/metrics"), sidecar.url("/metrics")] {
        exported.extend(declared(&url));
    }
    let names = prometheus.names();
    assert!(names.is_subset(&exported), "series not declared: {:?}", names.difference(&exported).collect::<Vec<_>>());

    // Names: one prefix per program, snake case, and the same suffix for the same meaning.
    for n in &exported {
        let rest = ["upsync_nginx_", "upsync_dns_", "upsync_sidecar_"].iter().find_map(|p| n.strip_prefix(p));
        assert!(
            rest.is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')),
            "{n}: not upsync_<program>_<snake_case>"
        );
    }
    for program in ["nginx", "dns", "sidecar"] {
        for suffix in ["consul_up", "consul_errors_total"] {
            assert!(exported.contains(&format!("upsync_{program}_{suffix}")), "upsync_{program}_{suffix} missing from {exported:#?}");
        }
    }
    for program in ["nginx", "sidecar"] {
        assert!(names.contains(&format!("upsync_{program}_last_sync_age_seconds")), "{program}");
    }
    // Prometheus read the counters as counters.
    let meta: Value = ureq::get(&format!("http://127.0.0.1:{}/api/v1/metadata", prometheus.port)).call().unwrap().into_json().unwrap();
    for family in ["upsync_nginx_consul_errors", "upsync_sidecar_consul_errors", "upsync_nginx_watch_restarts", "upsync_dns_queries"] {
        assert_eq!(meta["data"][family][0]["type"], "counter", "{family}: {}", meta["data"][family]);
    }

    // The dashboard: every query valid, every metric it names exported, data in every panel.
    let panels = dashboard_queries();
    assert!(panels.len() >= 20, "{} panels", panels.len());
    let mut referenced = BTreeSet::new();
    for (title, exprs) in &panels {
        for expr in exprs {
            if let Err(e) = prometheus.query(expr) {
                panic!("panel \"{title}\": Prometheus refuses {expr}: {e}");
            }
            referenced.extend(metric_names(expr));
        }
    }
    for n in &referenced {
        assert!(exported.contains(n), "the dashboard uses {n}, which no program exports (exported: {exported:#?})");
    }
    for program in ["upsync_nginx_", "upsync_dns_", "upsync_sidecar_"] {
        assert!(referenced.iter().any(|n| n.starts_with(program)), "the dashboard shows nothing of {program}*");
    }
    for (title, exprs) in &panels {
        wait_until(&format!("data for panel \"{title}\": {exprs:?}"), Duration::from_secs(60), || {
            exprs.iter().any(|e| prometheus.query(e).is_ok_and(|r| !r.is_empty()))
        });
    }
    eprintln!(
        "Prometheus scraped {} upsync series names; the dashboard's {} panels ({} queries) all have data",
        names.len(),
        panels.len(),
        panels.iter().map(|(_, e)| e.len()).sum::<usize>()
    );
}
