//! The module's Prometheus metrics and its live status page, against real nginx and a real
//! Consul agent; the page in Debian's headless Chromium, driven over the DevTools protocol. With
//! the stream module loaded too, the HTTP `upstream_show` lists the stream upstreams (JSON and
//! page).
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
use upsync_tests::stream::{stream_block, stream_servers};
use upsync_tests::upsync::{http_block, put_server, server_names, show_json, wait_servers};
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
    // Only the HTTP module loaded: the JSON has no stream key.
    let (_, _, body) = get(&nginx.url("/show?format=json"), "*/*");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(doc.get("stream_upstreams").is_none(), "{doc}");
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

/// The class (up, down, backup) of the row of `server` in the first section matching `section`.
fn row_class(tab: &Tab, section: &str, server: &str) -> Option<String> {
    let expr = format!(
        r#"(() => {{ const r = document.querySelector('{section} tr[data-server="{server}"]'); return r ? r.className : null; }})()"#
    );
    eval(tab, &expr).as_str().map(str::to_string)
}

fn row_state(tab: &Tab, upstream: &str, server: &str) -> Option<String> {
    row_class(tab, &format!(r#"section[data-upstream="{upstream}"]"#), server)
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

/// The HTTP `upstream_show` as JSON (all upstreams, the answering worker's view).
fn show_doc(nginx: &Nginx, query: &str) -> (u16, serde_json::Value) {
    let (status, _, body) = get(&nginx.url(&format!("/show?{query}")), "application/json");
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("upstream_show JSON: {e}: {body}")))
}

/// The `server` names of the entry `name` of a list of upstreams (sorted).
fn names_of(list: &serde_json::Value, name: &str) -> Option<Vec<String>> {
    list.as_array()?.iter().find(|u| u["name"] == name).map(server_names)
}

fn upstream_names(list: &serde_json::Value) -> Vec<String> {
    list.as_array().map(|a| a.iter().filter_map(|u| u["name"].as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// The class of the row of `server` in the page's section of the `kind` (http, stream) upstream.
fn kind_row_state(tab: &Tab, kind: &str, upstream: &str, server: &str) -> Option<String> {
    row_class(tab, &format!(r#"section[data-kind="{kind}"][data-upstream="{upstream}"]"#), server)
}

/// nginx with both modules: the HTTP `upstream_show` lists the synced stream upstream under
/// `stream_upstreams` (servers with their parameters, the sync state), `?NAME` finds it after the
/// HTTP upstreams, the text and the metrics stay HTTP only; a server added in Consul to the stream
/// upstream shows in the JSON and on the status page without a reload.
#[test]
fn the_http_upstream_show_lists_the_stream_upstreams() {
    let dir = TestDir::new("status_stream");
    let consul = Consul::start(dir.path());
    // The stream proxy listens on {{port2}} and the stream upstream_show on {{port1}}: {{port}}
    // is the HTTP server's (nginx.url).
    let stream = stream_block("db", &consul.http_addr(), "", "").replace("{{port}}", "{{port2}}");
    let conf = NginxConf::new(&http_block("app", &consul.http_addr(), "", "")).stream(&stream).workers(2);
    let mut nginx = Nginx::start(dir.path(), conf.clone());
    let (master, workers) = (nginx.master_pid(), nginx.worker_pids());
    put_server(&consul, "app", "127.0.0.1:8001", "");
    put_server(&consul, "db", "127.0.0.1:7001", r#"{"weight":2,"max_fails":3,"fail_timeout":7}"#);
    put_server(&consul, "db", "127.0.0.1:7002", r#"{"down":1}"#);
    wait_servers(&nginx, "app", &["127.0.0.1:8001"]);
    let doc = wait_for("the stream upstream db in the HTTP upstream_show", Duration::from_secs(20), || {
        let (_, doc) = show_doc(&nginx, "format=json");
        (names_of(&doc["stream_upstreams"], "db")? == ["127.0.0.1:7001", "127.0.0.1:7002"]).then_some(doc)
    });
    assert_eq!(upstream_names(&doc["upstreams"]), ["app"], "the HTTP list is unchanged: {doc}");
    assert_eq!(upstream_names(&doc["stream_upstreams"]), ["db"], "{doc}");
    let db = &doc["stream_upstreams"][0];
    let server = |addr: &str| db["servers"].as_array().unwrap().iter().find(|s| s["server"] == addr).cloned().unwrap();
    let s1 = server("127.0.0.1:7001");
    assert_eq!((s1["weight"].as_u64(), s1["max_fails"].as_u64(), s1["fail_timeout"].as_u64()), (Some(2), Some(3), Some(7)), "{s1}");
    assert_eq!((s1["down"].as_bool(), s1["backup"].as_bool(), s1["fails"].as_u64()), (Some(false), Some(false), Some(0)), "{s1}");
    assert_eq!(server("127.0.0.1:7002")["down"], true);
    let sync = &db["sync"];
    assert_eq!(sync["source"], format!("http://{}/v1/kv/upstreams/db", consul.http_addr()), "{sync}");
    assert_eq!((sync["origin"].as_str(), sync["watch"].as_str()), (Some("consul"), Some("healthy")), "{sync}");
    assert!(sync["consul_index"].as_u64().unwrap() > 0 && sync["version"].as_u64().unwrap() > 0, "{sync}");
    let leader = sync["leader_pid"].as_u64().unwrap() as u32;
    assert!(workers.contains(&leader), "stream leader {leader} is not a worker of {workers:?}");
    // The stream module's own upstream_show lists the same servers.
    assert_eq!(stream_servers(nginx.extra_port(1), "db"), ["127.0.0.1:7001", "127.0.0.1:7002"]);

    // ?NAME: an HTTP upstream of that name first, else a stream one; 404 when neither.
    let (status, one) = show_doc(&nginx, "db&format=json");
    assert_eq!(status, 200);
    assert_eq!((upstream_names(&one["upstreams"]), upstream_names(&one["stream_upstreams"])), (vec![], vec!["db".to_string()]));
    let (_, one) = show_doc(&nginx, "upstream=app&format=json");
    assert_eq!(upstream_names(&one["upstreams"]), ["app"]);
    assert!(one.get("stream_upstreams").is_none(), "{one}");
    assert_eq!(show_doc(&nginx, "nope&format=json").0, 404);
    // The text stays nginx-upsync-module's (HTTP only); so do the metrics.
    let (_, _, text) = get(&nginx.url("/show"), "*/*");
    assert!(text.starts_with("Upstream name: app;") && !text.contains("db"), "{text}");
    let (_, _, metrics) = get(&nginx.url("/show?format=prometheus"), "*/*");
    assert!(metrics.contains(r#"upstream="app""#) && !metrics.contains(r#"upstream="db""#), "{metrics}");

    // A server added in Consul to the stream upstream: in the JSON without a reload.
    put_server(&consul, "db", "127.0.0.1:7003", r#"{"backup":1}"#);
    wait_until("the new stream server in the HTTP upstream_show", Duration::from_secs(20), || {
        names_of(&show_doc(&nginx, "format=json").1["stream_upstreams"], "db").is_some_and(|v| v.len() == 3)
    });

    // The page: the stream upstream in a section of its own, following Consul.
    let chromium = Chromium::start(dir.path());
    let tab: Arc<Tab> = chromium.browser.new_tab().expect("a new tab");
    tab.navigate_to(&nginx.url("/show")).and_then(|t| t.wait_until_navigated()).expect("opening the status page");
    wait_until("the page to render stream upstream db", Duration::from_secs(20), || {
        kind_row_state(&tab, "stream", "db", "127.0.0.1:7001").is_some()
    });
    assert_eq!(kind_row_state(&tab, "stream", "db", "127.0.0.1:7002").as_deref(), Some("down"));
    assert_eq!(kind_row_state(&tab, "stream", "db", "127.0.0.1:7003").as_deref(), Some("backup"));
    assert_eq!(kind_row_state(&tab, "http", "app", "127.0.0.1:8001").as_deref(), Some("up"));
    assert_eq!(eval(&tab, r#"document.querySelector('#stream h2').textContent"#), "stream");
    let badge = eval(&tab, r#"document.querySelector('section[data-kind="stream"][data-upstream="db"] .badge').textContent"#);
    assert_eq!(badge, "healthy");
    eval(&tab, "window.__upsyncMark = 'before'; 1");
    put_server(&consul, "db", "127.0.0.1:7004", "");
    wait_until("the page to show the new stream server", Duration::from_secs(20), || {
        kind_row_state(&tab, "stream", "db", "127.0.0.1:7004").is_some()
    });
    assert_eq!(kind_row_state(&tab, "stream", "db", "127.0.0.1:7004").as_deref(), Some("up"));
    assert_eq!(eval(&tab, "window.__upsyncMark"), "before", "the page was reloaded");
    if let Ok(png) = tab.capture_screenshot(headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption::Png, None, None, true) {
        let _ = std::fs::write(dir.join("status-page-stream.png"), png);
    }

    assert_eq!(nginx.master_pid(), master, "the master changed");
    assert_eq!(nginx.worker_pids(), workers, "workers were replaced: something reloaded nginx");

    // After `nginx -s reload` the new workers list the stream upstream too, and follow Consul.
    nginx.reload_with(conf);
    put_server(&consul, "db", "127.0.0.1:7005", "");
    wait_until("the stream server added after the reload in the HTTP upstream_show", Duration::from_secs(20), || {
        names_of(&show_doc(&nginx, "format=json").1["stream_upstreams"], "db").is_some_and(|v| v.len() == 5)
    });
    let log = nginx.error_log();
    assert!(!log.contains("[alert]") && !log.contains("[crit]") && !log.contains("panicked"), "{log}");
}
