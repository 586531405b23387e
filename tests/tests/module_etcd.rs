//! The nginx module against a real etcd 3.5 (`upsync_type=etcd`), through both of etcd's APIs:
//! v2 (`/v2/keys/PREFIX`, nginx-upsync-module's syntax) and v3 (`/v3/kv/PREFIX`, the JSON
//! gateway's range and watch). Changes reach traffic without reload; a 3-member cluster loses
//! the member nginx talks to; history etcd no longer has (v3 compaction, v2's 1000 events) is
//! answered by reading the prefix afresh; bad values keep the last good state; HTTPS with a
//! client certificate; a member without quorum ends the v3 watch.
use std::time::Duration;

use upsync_tests::backend::Backend;
use upsync_tests::consul::ConsulTls;
use upsync_tests::etcd::{Etcd, Gate};
use upsync_tests::net::connections_to;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::upsync::{all_ok, hits, show_json, shown_server, shown_servers, wait_server_field, wait_servers};
use upsync_tests::{wait_until, TestDir};

#[derive(Clone, Copy, Debug)]
enum Api {
    V2,
    V3,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::V2 => "/v2/keys",
            Api::V3 => "/v3/kv",
        }
    }

    fn put(self, etcd: &Etcd, upstream: &str, addr: &str, value: &str) {
        let key = format!("upstreams/{upstream}/{addr}");
        match self {
            Api::V2 => etcd.v2_put(&key, value),
            Api::V3 => {
                etcd.put(&key, value);
            }
        }
    }

    fn delete(self, etcd: &Etcd, upstream: &str, addr: &str) {
        let key = format!("upstreams/{upstream}/{addr}");
        match self {
            Api::V2 => etcd.v2_delete(&key),
            Api::V3 => {
                etcd.delete(&key);
            }
        }
    }
}

/// One synced upstream per `(name, api, addresses, params)`, each proxied at `/NAME/`, and
/// `upstream_show` at `/show`.
fn http(upstreams: &[(&str, Api, &str, &str)]) -> String {
    let mut text = String::new();
    let mut locations = String::new();
    for (name, api, addrs, params) in upstreams {
        text.push_str(&format!(
            "upstream {name} {{
                server 127.0.0.1:9;
                upsync {addrs}{path}/upstreams/{name} upsync_type=etcd upsync_timeout=30s upsync_interval=10ms {params};
            }}\n",
            path = api.path()
        ));
        locations.push_str(&format!("location /{name}/ {{ proxy_pass http://{name}; proxy_next_upstream error timeout http_502; }}\n"));
    }
    format!("{text}\nserver {{ listen 127.0.0.1:{{{{port}}}}; {locations} location = /show {{ upstream_show; }} }}")
}

fn clean_log(nginx: &Nginx) {
    let log = nginx.error_log();
    assert!(!log.contains("[alert]") && !log.contains("[crit]") && !log.contains("panicked"), "{log}");
}

fn changes_reach_traffic_without_reload(api: Api, strong_dependency: bool) {
    let dir = TestDir::new(&format!("etcd_changes_{api:?}"));
    let etcd = Etcd::start(dir.path());
    let (a, b, c) = (Backend::start("a"), Backend::start("b"), Backend::start("c"));
    // With strong_dependency=on the first list is read before nginx starts serving.
    api.put(&etcd, "app", &a.host_port(), r#"{"weight":1,"max_fails":2,"fail_timeout":10}"#);
    let params = if strong_dependency { "strong_dependency=on" } else { "strong_dependency=off" };
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http(&[("app", api, &etcd.client_addr(), params)])).workers(2));
    let workers = nginx.worker_pids();
    let url = nginx.url("/app/");
    if strong_dependency {
        assert_eq!(all_ok(&url, 4).get("a"), Some(&4), "the first list was not read at start-up");
    }
    wait_servers(&nginx, "app", &[&a.host_port()]);
    assert_eq!(all_ok(&url, 10).get("a"), Some(&10));

    // Add b with three times a's weight.
    api.put(&etcd, "app", &b.host_port(), r#"{"weight":3}"#);
    wait_servers(&nginx, "app", &[&a.host_port(), &b.host_port()]);
    let h = all_ok(&url, 40);
    assert!(h.get("b").copied().unwrap_or(0) > h.get("a").copied().unwrap_or(0) && h.contains_key("a"), "{h:?}");

    // Re-weight, as a string (nginx-upsync-module reads both).
    api.put(&etcd, "app", &b.host_port(), r#"{"weight":"1"}"#);
    wait_server_field(&nginx, "app", &b.host_port(), "weight", serde_json::json!(1));

    // Mark a down: only b answers.
    api.put(&etcd, "app", &a.host_port(), r#"{"down":1}"#);
    wait_server_field(&nginx, "app", &a.host_port(), "down", serde_json::json!(true));
    assert_eq!(all_ok(&url, 20).get("b"), Some(&20));

    // Add c with an empty value (the defaults), remove a and b.
    api.put(&etcd, "app", &c.host_port(), "");
    api.delete(&etcd, "app", &a.host_port());
    api.delete(&etcd, "app", &b.host_port());
    wait_servers(&nginx, "app", &[&c.host_port()]);
    assert_eq!(all_ok(&url, 10).get("c"), Some(&10));
    let show = show_json(&nginx, "app");
    assert!(show["sync"]["last_error"].is_null(), "{show}");

    // Deleting the last server keeps it (upsync_allow_empty is off), with a warning naming etcd.
    api.delete(&etcd, "app", &c.host_port());
    wait_until("the empty-answer warning", Duration::from_secs(20), || nginx.error_log().contains("etcd returned no servers"));
    assert_eq!(all_ok(&url, 5).get("c"), Some(&5));

    assert_eq!(nginx.worker_pids(), workers, "workers were replaced: something reloaded nginx");
    clean_log(&nginx);
}

#[test]
fn v3_changes_reach_traffic_without_reload() {
    changes_reach_traffic_without_reload(Api::V3, true);
}

#[test]
fn v2_changes_reach_traffic_without_reload() {
    changes_reach_traffic_without_reload(Api::V2, false);
}

#[test]
fn a_three_member_cluster_loses_the_member_in_use() {
    let dir = TestDir::new("etcd_cluster");
    let mut members = Etcd::cluster(dir.path(), 3);
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let addrs = members.iter().map(|m| m.client_addr()).collect::<Vec<_>>().join(",");
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http(&[("app2", Api::V2, &addrs, ""), ("app3", Api::V3, &addrs, "")])).workers(2));
    for (name, api) in [("app2", Api::V2), ("app3", Api::V3)] {
        api.put(&members[1], name, &a.host_port(), "");
        wait_servers(&nginx, name, &[&a.host_port()]);
    }
    // Both watches are on the first member listed.
    let pids = || nginx.process_pids();
    wait_until("nginx's watches on member0", Duration::from_secs(20), || connections_to(&pids(), members[0].client_port) >= 2);
    assert_eq!(connections_to(&pids(), members[1].client_port) + connections_to(&pids(), members[2].client_port), 0);

    members[0].kill();
    // The writes below wait for the two others to elect a leader if member0 was it.
    for (name, api) in [("app2", Api::V2), ("app3", Api::V3)] {
        api.put(&members[1], name, &b.host_port(), r#"{"weight":2}"#);
        api.delete(&members[2], name, &a.host_port());
    }
    for name in ["app2", "app3"] {
        wait_servers(&nginx, name, &[&b.host_port()]);
        assert_eq!(all_ok(&nginx.url(&format!("/{name}/")), 5).get("b"), Some(&5));
    }
    // The watches moved to another member and stay there.
    wait_until("nginx's watches on the other members", Duration::from_secs(20), || {
        connections_to(&pids(), members[1].client_port) + connections_to(&pids(), members[2].client_port) >= 2
    });
    for (name, api) in [("app2", Api::V2), ("app3", Api::V3)] {
        api.put(&members[2], name, &a.host_port(), "");
        wait_servers(&nginx, name, &[&a.host_port(), &b.host_port()]);
    }
    clean_log(&nginx);
}

#[test]
fn v3_compaction_past_the_watch_is_answered_by_reading_afresh() {
    let dir = TestDir::new("etcd_compaction");
    let etcd = Etcd::start(dir.path());
    let gate = Gate::start(etcd.client_port);
    let (a, b, c) = (Backend::start("a"), Backend::start("b"), Backend::start("c"));
    etcd.put(&format!("upstreams/app/{}", a.host_port()), "");
    etcd.put(&format!("upstreams/app/{}", b.host_port()), "");
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http(&[("app", Api::V3, &gate.addr(), "")])));
    wait_servers(&nginx, "app", &[&a.host_port(), &b.host_port()]);

    // While the watch is cut off, a is removed, c added, and the history compacted past the
    // revision the watch will resume from: etcd cancels it with compact_revision.
    gate.cut();
    etcd.delete(&format!("upstreams/app/{}", a.host_port()));
    etcd.put(&format!("upstreams/app/{}", c.host_port()), r#"{"weight":4}"#);
    for i in 0..5 {
        etcd.put("elsewhere/key", &i.to_string());
    }
    etcd.compact(etcd.revision());
    gate.open();
    wait_servers(&nginx, "app", &[&b.host_port(), &c.host_port()]);
    assert!(nginx.error_log().contains("was compacted"), "no re-read after the compaction:\n{}", nginx.error_log());
    assert_eq!(shown_server(&nginx, "app", &c.host_port()).unwrap()["weight"], 4);

    // And the watch goes on from the fresh read.
    etcd.delete(&format!("upstreams/app/{}", b.host_port()));
    wait_servers(&nginx, "app", &[&c.host_port()]);
    assert_eq!(all_ok(&nginx.url("/app/"), 5).get("c"), Some(&5));
    clean_log(&nginx);
}

#[test]
fn v2_cleared_events_are_answered_by_reading_afresh() {
    let dir = TestDir::new("etcd_v2_cleared");
    let etcd = Etcd::start(dir.path());
    let gate = Gate::start(etcd.client_port);
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    etcd.v2_put(&format!("upstreams/app/{}", a.host_port()), "");
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http(&[("app", Api::V2, &gate.addr(), "")])));
    wait_servers(&nginx, "app", &[&a.host_port()]);

    // While the long poll is cut off, the change is followed by more than the 1000 events etcd
    // keeps: the poll that resumes from the old index is answered "event index cleared".
    gate.cut();
    etcd.v2_put(&format!("upstreams/app/{}", b.host_port()), "");
    etcd.v2_delete(&format!("upstreams/app/{}", a.host_port()));
    for i in 0..1100 {
        etcd.v2_put("elsewhere/key", &i.to_string());
    }
    gate.open();
    wait_servers(&nginx, "app", &[&b.host_port()]);
    assert!(nginx.error_log().contains("are gone (etcd keeps the last 1000)"), "{}", nginx.error_log());
    etcd.v2_put(&format!("upstreams/app/{}", a.host_port()), r#"{"backup":1}"#);
    wait_server_field(&nginx, "app", &a.host_port(), "backup", serde_json::json!(true));
    clean_log(&nginx);
}

#[test]
fn a_bad_value_is_skipped_with_a_warning_and_keeps_the_last_good_state() {
    let dir = TestDir::new("etcd_bad_value");
    let etcd = Etcd::start(dir.path());
    let (a, b, c) = (Backend::start("a"), Backend::start("b"), Backend::start("c"));
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http(&[("app", Api::V3, &etcd.client_addr(), "")])));
    Api::V3.put(&etcd, "app", &a.host_port(), r#"{"weight":2}"#);
    wait_servers(&nginx, "app", &[&a.host_port()]);

    // a's value turns to garbage: a stays as it was; b's is out of range: b is not added.
    Api::V3.put(&etcd, "app", &a.host_port(), "not json");
    Api::V3.put(&etcd, "app", &b.host_port(), r#"{"weight":0}"#);
    Api::V3.put(&etcd, "app", &c.host_port(), r#"{"weight":1}"#);
    wait_servers(&nginx, "app", &[&a.host_port(), &c.host_port()]);
    assert_eq!(shown_server(&nginx, "app", &a.host_port()).unwrap()["weight"], 2);
    let log = nginx.error_log();
    let key_a = format!("skipped etcd entry \"upstreams/app/{}\"", a.host_port());
    let key_b = format!("skipped etcd entry \"upstreams/app/{}\"", b.host_port());
    assert!(log.contains(&key_a) && log.contains("not a JSON object"), "{log}");
    assert!(log.contains(&key_b) && log.contains("weight=0 is out of range"), "{log}");
    let h = hits(&nginx.url("/app/"), 30);
    assert!(h.contains_key("a") && h.contains_key("c") && !h.contains_key("b"), "{h:?}");

    // Fixed, the value counts again.
    Api::V3.put(&etcd, "app", &a.host_port(), r#"{"weight":5}"#);
    wait_server_field(&nginx, "app", &a.host_port(), "weight", serde_json::json!(5));
    clean_log(&nginx);
}

#[test]
fn a_member_without_the_v2_api_is_reported_with_what_to_do() {
    let dir = TestDir::new("etcd_no_v2");
    let etcd = Etcd::start_without_v2(dir.path());
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http(&[("app", Api::V2, &etcd.client_addr(), "")])));
    wait_until("the v2 error in upstream_show", Duration::from_secs(20), || {
        show_json(&nginx, "app")["sync"]["last_error"].as_str().is_some_and(|e| e.contains("--enable-v2"))
    });
    let sync = show_json(&nginx, "app")["sync"].clone();
    let e = sync["last_error"].as_str().unwrap_or("").to_string();
    assert!(e.contains("etcd at http://127.0.0.1:") && e.contains("/v3/kv/PREFIX"), "{e}");
    // Counted as an HTTP error (the metrics' kind), not as "other".
    assert!(sync["errors"]["http"].as_u64().unwrap_or(0) >= 1, "{sync}");
    clean_log(&nginx);
}

#[test]
fn https_with_a_client_certificate() {
    let dir = TestDir::new("etcd_tls");
    let tls = ConsulTls::create(&dir.join("tls"));
    let etcd = Etcd::start_tls(dir.path(), &tls);
    let a = Backend::start("a");
    let https = format!("https://127.0.0.1:{}", etcd.https_port.unwrap());
    let with_cert = format!("upsync_tls ca={} cert={} key={}", tls.ca_file.display(), tls.client_cert.display(), tls.client_key.display());
    let block = |name: &str, tls_line: &str| {
        format!(
            "upstream {name} {{ server 127.0.0.1:9; upsync {https}/v3/kv/upstreams/app upsync_type=etcd upsync_timeout=30s upsync_interval=10ms; {tls_line}; }}\n"
        )
    };
    let http = format!(
        "{}{}server {{ listen 127.0.0.1:{{{{port}}}}; location / {{ proxy_pass http://app; }} location = /show {{ upstream_show; }} }}",
        block("app", &with_cert),
        block("nocert", &format!("upsync_tls ca={}", tls.ca_file.display()))
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http));
    Api::V3.put(&etcd, "app", &a.host_port(), "");
    wait_servers(&nginx, "app", &[&a.host_port()]);
    assert_eq!(all_ok(&nginx.url("/"), 5).get("a"), Some(&5));
    // Without a client certificate etcd refuses the handshake: reported, nothing served.
    wait_until("the refused handshake in upstream_show", Duration::from_secs(20), || {
        show_json(&nginx, "nocert")["sync"]["last_error"].as_str().is_some_and(|e| e.starts_with("etcd at https://127.0.0.1:"))
    });
    assert!(shown_servers(&nginx, "nocert").iter().all(|s| s == "127.0.0.1:9"));
    clean_log(&nginx);
}

#[test]
fn a_member_that_loses_its_quorum_ends_the_v3_watch_and_says_so() {
    let dir = TestDir::new("etcd_no_quorum");
    let mut members = Etcd::cluster(dir.path(), 3);
    let a = Backend::start("a");
    Api::V3.put(&members[0], "app", &a.host_port(), "");
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http(&[("app", Api::V3, &members[0].client_addr(), "")])));
    wait_servers(&nginx, "app", &[&a.host_port()]);
    // The two others die: member0 has no leader any more. The watch asked for one
    // (hasleader), so etcd ends it instead of leaving it open on a member that will see no
    // change; the module reports it and keeps the list.
    members[1].kill();
    members[2].kill();
    wait_until("the lost leader in upstream_show", Duration::from_secs(30), || {
        show_json(&nginx, "app")["sync"]["last_error"].as_str().is_some_and(|e| e.contains("no leader"))
    });
    assert_eq!(all_ok(&nginx.url("/app/"), 5).get("a"), Some(&5));
    clean_log(&nginx);
}
