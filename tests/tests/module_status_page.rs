//! The module's Prometheus metrics and its live status page, against real nginx and a real
//! Consul agent; the page in Debian's headless Chromium, driven over the DevTools protocol.
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use headless_chrome::{Browser, Tab};
use upsync_tests::consul::Consul;
use upsync_tests::net::free_port;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::proc::Proc;
use upsync_tests::upsync::{http_block, put_server, show_json, wait_servers};
use upsync_tests::{wait_for, wait_until, TestDir};

/// `GET url` with `accept`: status, Content-Type, body.
fn get(url: &str, accept: &str) -> (u16, String, String) {
    let resp = match ureq::get(url).set("Accept", accept).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    let (status, ct) = (resp.status(), resp.header("Content-Type").unwrap_or("").to_string());
    (status, ct, resp.into_string().expect("body"))
}

/// The samples of an OpenMetrics text, `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample line: {l:?}"));
            (k.to_string(), v.parse().unwrap_or_else(|e| panic!("{l:?}: {e}")))
        })
        .collect()
}

const PROMETHEUS_ACCEPT: &str =
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

#[test]
fn metrics_follow_consul_and_count_errors_by_kind() {
    let dir = TestDir::new("status_metrics");
    let consul = Consul::start(dir.path());
    // An upstream whose Consul address has nothing listening: connect errors, watch failing.
    let dead = free_port();
    let http = format!(
        "{}
         upstream dead {{ server 127.0.0.1:9; upsync 127.0.0.1:{dead}/v1/kv/upstreams/dead upsync_timeout=30s upsync_interval=10ms; }}
         server {{ listen 127.0.0.1:{{{{port1}}}}; location = /metrics {{ upsync_metrics; }} }}",
        http_block("app", &consul.http_addr(), "", "")
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http).workers(2));
    let metrics_url = format!("http://127.0.0.1:{}/metrics", nginx.extra_port(1));
    let scrape = || {
        let (status, ct, body) = get(&metrics_url, "*/*");
        assert_eq!(status, 200, "{body}");
        assert_eq!(ct, "application/openmetrics-text; version=1.0.0; charset=utf-8");
        assert!(body.ends_with("# EOF\n"), "{body}");
        samples(&body)
    };

    put_server(&consul, "app", "127.0.0.1:8001", "");
    put_server(&consul, "app", "127.0.0.1:8002", r#"{"down":1}"#);
    put_server(&consul, "app", "127.0.0.1:8003", r#"{"backup":1}"#);
    let version = wait_servers(&nginx, "app", &["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"]);
    let index = show_json(&nginx, "app")["sync"]["consul_index"].as_u64().unwrap();
    let m = scrape();
    let s = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no sample {k} in {m:#?}"));
    for (state, n) in [("up", 1.0), ("down", 1.0), ("backup", 1.0)] {
        assert_eq!(s(&format!(r#"upsync_nginx_upstream_servers{{upstream="app",state="{state}"}}"#)), n, "{state}");
    }
    assert_eq!(s(r#"upsync_nginx_list_version{upstream="app"}"#), version as f64);
    assert!(s(r#"upsync_nginx_consul_index{upstream="app"}"#) >= index as f64);
    assert_eq!(s(r#"upsync_nginx_consul_up{upstream="app"}"#), 1.0);
    assert_eq!(s(r#"upsync_nginx_list_origin{upstream="app",origin="consul"}"#), 1.0);
    assert!(s(r#"upsync_nginx_last_sync_age_seconds{upstream="app"}"#) >= 0.0);
    assert!(s(r#"upsync_nginx_last_sync_timestamp_seconds{upstream="app"}"#) > 1.6e9);
    let leader = s("upsync_nginx_leader_pid") as u32;
    assert!(nginx.worker_pids().contains(&leader), "leader {leader} is not a worker of {:?}", nginx.worker_pids());

    // The dead Consul: connect errors counted, watch failing, the list from the config kept.
    let m = wait_for("connect errors of \"dead\"", Duration::from_secs(20), || {
        let m = scrape();
        (m.get(r#"upsync_nginx_consul_errors_total{upstream="dead",kind="connect"}"#).copied().unwrap_or(0.0) >= 1.0).then_some(m)
    });
    let s = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no sample {k} in {m:#?}"));
    assert_eq!(s(r#"upsync_nginx_consul_up{upstream="dead"}"#), 0.0);
    assert_eq!(s(r#"upsync_nginx_watch_state{upstream="dead",state="failing"}"#), 1.0);
    assert_eq!(s(r#"upsync_nginx_list_origin{upstream="dead",origin="config"}"#), 1.0);
    assert_eq!(s(r#"upsync_nginx_upstream_servers{upstream="dead",state="up"}"#), 1.0);
    assert!(!m.contains_key(r#"upsync_nginx_last_sync_age_seconds{upstream="dead"}"#), "never synced: no age");
    assert_eq!(s(r#"upsync_nginx_consul_errors_total{upstream="app",kind="connect"}"#), 0.0);

    // An answer with no servers is refused (the last list kept) and counted as "empty".
    consul.kv_delete_tree("upstreams/app/");
    let m = wait_for("an \"empty\" error of \"app\"", Duration::from_secs(20), || {
        let m = scrape();
        (m.get(r#"upsync_nginx_consul_errors_total{upstream="app",kind="empty"}"#).copied().unwrap_or(0.0) >= 1.0).then_some(m)
    });
    for state in ["up", "down", "backup"] {
        assert_eq!(m[&format!(r#"upsync_nginx_upstream_servers{{upstream="app",state="{state}"}}"#)], 1.0, "the last list is kept");
    }
    // Every worker reads the same counters from the shared zone; the JSON shows them too.
    let json = show_json(&nginx, "app");
    assert!(json["sync"]["errors"]["empty"].as_u64().unwrap() >= 1, "{json}");

    // The same metrics from upstream_show: ?format=prometheus, a Prometheus scraper's Accept,
    // one upstream with ?upstream=.
    let (status, ct, body) = get(&nginx.url("/show?format=prometheus"), "*/*");
    assert_eq!((status, ct.as_str()), (200, "application/openmetrics-text; version=1.0.0; charset=utf-8"));
    assert!(body.contains(r#"upsync_nginx_consul_index{upstream="app"}"#), "{body}");
    let (_, ct, body) = get(&nginx.url("/show?upstream=dead"), PROMETHEUS_ACCEPT);
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(body.contains(r#"upstream="dead""#) && !body.contains(r#"upstream="app""#), "{body}");
    let (status, _, _) = get(&nginx.url("/show?upstream=nope&format=prometheus"), "*/*");
    assert_eq!(status, 404);
    // curl's Accept still gets nginx-upsync-module's text, a browser's the page.
    let (_, ct, body) = get(&nginx.url("/show"), "*/*");
    assert_eq!(ct, "text/plain");
    assert!(body.starts_with("Upstream name: "), "{body}");
    let (_, ct, body) = get(&nginx.url("/show"), "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8");
    assert_eq!(ct, "text/html; charset=utf-8");
    assert!(body.starts_with("<!DOCTYPE html>"), "{body}");
    assert!(!nginx.error_log().contains("[alert]") && !nginx.error_log().contains("[crit]"), "{}", nginx.error_log());
}

/// Debian's headless Chromium in its own process group (stopped with it, by PID), reachable
/// over the DevTools protocol on a loopback port. Nothing it does leaves the machine: every
/// request but those to 127.0.0.1 goes to a proxy address where nothing listens, and every
/// host name but 127.0.0.1 fails to resolve.
struct Chromium {
    browser: Browser,
    _proc: Proc,
}

impl Chromium {
    fn start(dir: &Path) -> Chromium {
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile).expect("chromium profile dir");
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            // The suite runs as root, where Chromium's sandbox cannot start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--disable-breakpad",
            "--no-pings",
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--window-size=1200,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank");
        let proc = Proc::spawn("chromium", cmd, &dir.join("chromium.log"))
            .unwrap_or_else(|e| panic!("{e}; install Debian's chromium package (make deps)"));
        // Chromium writes the port it bound and the browser's DevTools path to this file.
        let active = profile.join("DevToolsActivePort");
        let ws = wait_for("Chromium's DevToolsActivePort", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&active).ok()?;
            let mut lines = text.lines();
            let (port, path) = (lines.next()?.trim().to_string(), lines.next()?.trim().to_string());
            (!port.is_empty() && path.starts_with("/devtools/")).then(|| format!("ws://127.0.0.1:{port}{path}"))
        });
        let browser = Browser::connect_with_timeout(ws, Duration::from_secs(600)).expect("connecting to Chromium's DevTools");
        Chromium { browser, _proc: proc }
    }
}

/// Evaluates `expr` in the page and returns its value as JSON.
fn eval(tab: &Tab, expr: &str) -> serde_json::Value {
    let r = tab.evaluate(expr, false).unwrap_or_else(|e| panic!("evaluating {expr}: {e}"));
    r.value.unwrap_or(serde_json::Value::Null)
}

fn row_state(tab: &Tab, upstream: &str, server: &str) -> Option<String> {
    let expr = format!(
        r#"(() => {{ const r = document.querySelector('section[data-upstream="{upstream}"] tr[data-server="{server}"]'); return r ? r.className : null; }})()"#
    );
    eval(tab, &expr).as_str().map(str::to_string)
}

fn polls(tab: &Tab) -> u64 {
    eval(tab, "Number(document.body.dataset.polls || 0)").as_u64().unwrap_or(0)
}

#[test]
fn the_status_page_shows_a_server_added_in_consul_without_a_reload() {
    let dir = TestDir::new("status_page");
    let consul = Consul::start(dir.path());
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &consul.http_addr(), "", "")).workers(2));
    put_server(&consul, "app", "127.0.0.1:8001", r#"{"weight":3}"#);
    put_server(&consul, "app", "127.0.0.1:8002", r#"{"down":1}"#);
    wait_servers(&nginx, "app", &["127.0.0.1:8001", "127.0.0.1:8002"]);

    let chromium = Chromium::start(dir.path());
    let tab: Arc<Tab> = chromium.browser.new_tab().expect("a new tab");
    // A browser's own request: its Accept header selects the page.
    tab.navigate_to(&nginx.url("/show")).and_then(|t| t.wait_until_navigated()).expect("opening the status page");
    wait_until("the page to render upstream app", Duration::from_secs(20), || row_state(&tab, "app", "127.0.0.1:8001").is_some());
    assert_eq!(eval(&tab, "document.title"), "upsync: upstreams");
    assert_eq!(row_state(&tab, "app", "127.0.0.1:8001").as_deref(), Some("up"));
    assert_eq!(row_state(&tab, "app", "127.0.0.1:8002").as_deref(), Some("down"));
    let badge = eval(&tab, r#"document.querySelector('section[data-upstream="app"] .badge').textContent"#);
    assert_eq!(badge, "healthy");
    // It polls on its own.
    let p0 = polls(&tab);
    wait_until("the page to poll twice", Duration::from_secs(20), || polls(&tab) >= p0 + 2);

    // A mark on this document: a reload would make a new one without it.
    eval(&tab, "window.__upsyncMark = 'before'; 1");
    let t0 = Instant::now();
    put_server(&consul, "app", "127.0.0.1:8003", r#"{"backup":1}"#);
    let mut shown_after = None;
    wait_until("the page to show the new server", Duration::from_secs(20), || {
        let seen = row_state(&tab, "app", "127.0.0.1:8003").is_some();
        if seen {
            shown_after = Some(t0.elapsed());
        }
        seen
    });
    let shown_after = shown_after.unwrap();
    assert_eq!(row_state(&tab, "app", "127.0.0.1:8003").as_deref(), Some("backup"));
    assert_eq!(eval(&tab, "window.__upsyncMark"), "before", "the page was reloaded");

    // What bounds the delay is the page's polling, not luck: once nginx serves a change, the
    // page shows it by its second poll after that (the first may have been under way).
    put_server(&consul, "app", "127.0.0.1:8004", "");
    wait_servers(&nginx, "app", &["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003", "127.0.0.1:8004"]);
    let p1 = polls(&tab);
    wait_until("two more polls", Duration::from_secs(20), || polls(&tab) >= p1 + 2);
    assert_eq!(row_state(&tab, "app", "127.0.0.1:8004").as_deref(), Some("up"), "the page lags behind nginx by more than a poll");
    // The poll period is the page's constant (500 ms).
    assert_eq!(eval(&tab, "POLL_MS"), 500);

    // Self-contained: every request the page made went to nginx's upstream_show.
    let origin = nginx.url("/show");
    let resources = eval(&tab, "JSON.stringify(performance.getEntriesByType('resource').map(e => e.name))");
    let resources: Vec<String> = serde_json::from_str(resources.as_str().unwrap_or("null")).unwrap();
    assert!(!resources.is_empty());
    assert!(resources.iter().all(|u| u.starts_with(&format!("{origin}?"))), "requests outside upstream_show: {resources:?}");
    assert_eq!(eval(&tab, "window.__upsyncMark"), "before", "the page was reloaded");

    // A screenshot for people (kept with the test's files when UPSYNC_KEEP_TEST_DIRS is set).
    if let Ok(png) = tab.capture_screenshot(headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption::Png, None, None, true) {
        let _ = std::fs::write(dir.join("status-page.png"), png);
    }
    eprintln!(
        "status page: server added in Consul shown after {} ms without a reload (page polls every 500 ms; {} polls so far)",
        shown_after.as_millis(),
        polls(&tab)
    );
}
