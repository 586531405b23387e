//! The nginx module against a real Consul: changes reach traffic without reload, workers agree,
//! one Consul connection per upstream, registry edge cases, upstream_show formats.
use std::time::Duration;

use upsync_tests::backend::Backend;
use upsync_tests::consul::Consul;
use upsync_tests::net::{connections_to, http_get};
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::upsync::{all_ok, delete_server, hits, http_block, put_server, show_json, shown_server, wait_server_field, wait_servers};
use upsync_tests::{wait_until, TestDir};

#[test]
fn add_remove_reweight_down_and_backup_reach_traffic_without_reload() {
    let dir = TestDir::new("sync_changes");
    let consul = Consul::start(dir.path());
    let (a, b, c) = (Backend::start("a"), Backend::start("b"), Backend::start("c"));
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &consul.http_addr(), "", "")).workers(2));
    let master = nginx.master_pid();
    let workers = nginx.worker_pids();
    let url = nginx.url("/");

    put_server(&consul, "app", &a.host_port(), r#"{"weight":1,"max_fails":2,"fail_timeout":10}"#);
    wait_servers(&nginx, "app", &[&a.host_port()]);
    assert_eq!(all_ok(&url, 10).get("a"), Some(&10));

    // Add b with three times a's weight.
    put_server(&consul, "app", &b.host_port(), r#"{"weight":3}"#);
    wait_servers(&nginx, "app", &[&a.host_port(), &b.host_port()]);
    let h = all_ok(&url, 40);
    assert!(h.get("a").copied().unwrap_or(0) > 0 && h.get("b").copied().unwrap_or(0) > h.get("a").copied().unwrap_or(0), "{h:?}");

    // Re-weight: the new weight is what upstream_show reports and what traffic follows.
    put_server(&consul, "app", &b.host_port(), r#"{"weight":"1"}"#);
    wait_server_field(&nginx, "app", &b.host_port(), "weight", serde_json::json!(1));

    // Mark a down: only b answers.
    put_server(&consul, "app", &a.host_port(), r#"{"down":1}"#);
    wait_server_field(&nginx, "app", &a.host_port(), "down", serde_json::json!(true));
    assert_eq!(all_ok(&url, 20).get("b"), Some(&20));

    // c as backup: unused while b is usable, used when no primary is.
    put_server(&consul, "app", &c.host_port(), r#"{"backup":1}"#);
    wait_servers(&nginx, "app", &[&a.host_port(), &b.host_port(), &c.host_port()]);
    assert_eq!(all_ok(&url, 20).get("b"), Some(&20));
    put_server(&consul, "app", &b.host_port(), r#"{"down":"1"}"#);
    wait_until("backup c serving", Duration::from_secs(20), || hits(&url, 1).contains_key("c"));
    assert_eq!(all_ok(&url, 10).get("c"), Some(&10));

    // Remove a and b: only the backup is left, and it still serves.
    delete_server(&consul, "app", &a.host_port());
    delete_server(&consul, "app", &b.host_port());
    wait_servers(&nginx, "app", &[&c.host_port()]);
    assert_eq!(all_ok(&url, 10).get("c"), Some(&10));

    assert_eq!(nginx.master_pid(), master, "the master changed");
    assert_eq!(nginx.worker_pids(), workers, "workers were replaced: something reloaded nginx");
    assert!(!nginx.error_log().contains("[alert]") && !nginx.error_log().contains("[crit]"), "{}", nginx.error_log());
}

#[test]
fn four_workers_one_version_one_consul_connection_per_upstream() {
    let dir = TestDir::new("sync_workers");
    let consul = Consul::start(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let http = format!(
        "{}\n upstream other {{ server 127.0.0.1:9; upsync {}/v1/kv/upstreams/other upsync_timeout=30s upsync_interval=10ms; }}",
        http_block("app", &consul.http_addr(), "", ""),
        consul.http_addr()
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http).workers(4));
    put_server(&consul, "other", &b.host_port(), "");
    for round in 0..3 {
        let addr = if round % 2 == 0 { a.host_port() } else { b.host_port() };
        put_server(&consul, "app", &addr, "");
        let other = if round % 2 == 0 { b.host_port() } else { a.host_port() };
        if round > 0 {
            delete_server(&consul, "app", &other);
        }
        let version = wait_servers(&nginx, "app", &[&addr]);
        // Each request lands on any of the 4 workers: all must report the same version.
        let mut seen = std::collections::BTreeSet::new();
        let mut pids = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let (_, body) = http_get(&nginx.url("/show?upstream=app&format=json")).unwrap();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            seen.insert(v["upstreams"][0]["sync"]["version"].as_u64().unwrap());
            pids.insert(v["worker_pid"].as_u64().unwrap());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![version], "workers disagree on the list version");
        assert!(pids.len() > 1, "the check needs answers from several workers, got {pids:?}");
    }
    wait_until("two Consul connections", Duration::from_secs(10), || connections_to(&nginx.process_pids(), consul.ports.http) == 2);
    // And it stays at one per upstream (no per-worker polling, no leaks) over a while.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(connections_to(&nginx.process_pids(), consul.ports.http), 2);
    }
}

#[test]
fn deleting_every_server_keeps_the_last_list_unless_allow_empty() {
    let dir = TestDir::new("sync_empty");
    let consul = Consul::start(dir.path());
    let a = Backend::start("a");
    let http = format!(
        "{}\n upstream open {{ server 127.0.0.1:9; upsync {}/v1/kv/upstreams/open upsync_timeout=30s upsync_interval=10ms; upsync_allow_empty on; }}
         server {{ listen 127.0.0.1:{{{{port1}}}}; location / {{ proxy_pass http://open; }} }}",
        http_block("app", &consul.http_addr(), "", ""),
        consul.http_addr()
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http));
    put_server(&consul, "app", &a.host_port(), "");
    put_server(&consul, "open", &a.host_port(), "");
    wait_servers(&nginx, "app", &[&a.host_port()]);
    wait_servers(&nginx, "open", &[&a.host_port()]);

    consul.kv_delete_tree("upstreams/app");
    consul.kv_delete_tree("upstreams/open");
    wait_until("the empty-answer warning", Duration::from_secs(20), || nginx.error_log().contains("Consul returned no servers"));
    wait_servers(&nginx, "open", &[]);
    assert_eq!(all_ok(&nginx.url("/"), 5).get("a"), Some(&5), "the last list of app was not kept");
    let open = format!("http://127.0.0.1:{}/", nginx.extra_port(1));
    assert_eq!(hits(&open, 3).get("HTTP 502"), Some(&3), "an empty upstream with upsync_allow_empty on must fail fast");
    let show = show_json(&nginx, "app");
    assert!(show["sync"]["last_error"].as_str().unwrap_or("").contains("no servers"), "{show}");
}

#[test]
fn malformed_value_keeps_the_last_good_state() {
    let dir = TestDir::new("sync_malformed");
    let consul = Consul::start(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &consul.http_addr(), "", "")));
    put_server(&consul, "app", &a.host_port(), r#"{"weight":7}"#);
    wait_servers(&nginx, "app", &[&a.host_port()]);

    put_server(&consul, "app", &a.host_port(), "{this is not json");
    put_server(&consul, "app", "not-an-address", r#"{"weight":1}"#);
    put_server(&consul, "app", &b.host_port(), r#"{"weight":2}"#);
    wait_servers(&nginx, "app", &[&a.host_port(), &b.host_port()]);
    let a_entry = shown_server(&nginx, "app", &a.host_port()).unwrap();
    assert_eq!(a_entry["weight"], 7, "a lost its last good attributes: {a_entry}");
    let log = nginx.error_log();
    assert!(
        log.contains(&format!("upstreams/app/{}", a.host_port())) && log.contains("at index"),
        "no skip message naming the key and index:\n{log}"
    );
    assert!(log.contains("not-an-address"), "{log}");
}

#[test]
fn upstream_show_text_is_byte_for_byte_and_stock_upstreams_are_untouched() {
    let dir = TestDir::new("sync_show");
    let consul = Consul::start(dir.path());
    let (a, s) = (Backend::start("a"), Backend::start("static"));
    let http = format!(
        "{}\n upstream plain {{ server {} weight=2 max_fails=3 fail_timeout=20s; }}
         server {{ listen 127.0.0.1:{{{{port1}}}}; location / {{ proxy_pass http://plain; }} }}",
        http_block("app", &consul.http_addr(), "", ""),
        s.host_port()
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http));
    put_server(&consul, "app", &a.host_port(), r#"{"weight":10,"max_fails":3,"fail_timeout":10,"down":1}"#);
    wait_servers(&nginx, "app", &[&a.host_port()]);
    let (status, text) = http_get(&nginx.url("/show?app")).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        text,
        format!(
            "Upstream name: app; Backend server count: 1\n        server {} weight=10 max_fails=3 fail_timeout=10s down;\n",
            a.host_port()
        )
    );
    let (_, all) = http_get(&nginx.url("/show")).unwrap();
    assert!(
        all.contains(&format!(
            "Upstream name: plain; Backend server count: 1\n        server {} weight=2 max_fails=3 fail_timeout=20s;\n\n",
            s.host_port()
        )),
        "{all}"
    );
    let (_, missing) = http_get(&nginx.url("/show?nope")).unwrap();
    assert_eq!(missing, "The upstream you requested does not exist. Please double-check the name");
    let (code, _) = upsync_tests::net::http_request("POST", &nginx.url("/show"), &[], Some(b"x")).unwrap();
    assert_eq!(code, 405);
    // JSON on request, by Accept header too.
    let (_, j) = upsync_tests::net::http_request("GET", &nginx.url("/show?app"), &[("Accept", "application/json")], None).unwrap();
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    let sync = &v["upstreams"][0]["sync"];
    assert_eq!(sync["origin"], "consul");
    assert!(sync["consul_index"].as_u64().unwrap() > 0 && sync["last_sync_ms"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(sync["source"], format!("http://{}/v1/kv/upstreams/app", consul.http_addr()));
    // The stock upstream still balances as nginx does, with no sync section.
    assert_eq!(all_ok(&format!("http://127.0.0.1:{}/", nginx.extra_port(1)), 3).get("static"), Some(&3));
    assert!(show_json(&nginx, "plain").get("sync").is_none());
}

#[test]
fn hostname_keys_are_resolved() {
    let dir = TestDir::new("sync_hostname");
    let consul = Consul::start(dir.path());
    let a = Backend::start("a");
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &consul.http_addr(), "", "")));
    put_server(&consul, "app", &format!("localhost:{}", a.port()), r#"{"weight":2}"#);
    wait_server_field(&nginx, "app", &a.host_port(), "weight", serde_json::json!(2));
    assert_eq!(all_ok(&nginx.url("/"), 5).get("a"), Some(&5));
}

#[test]
fn catalog_and_health_services() {
    let dir = TestDir::new("sync_services");
    let consul = Consul::start(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let http = format!(
        "upstream cat {{ server 127.0.0.1:9; upsync {c}/v1/catalog/service/web upsync_type=consul_services upsync_interval=10ms; }}
         upstream hea {{ server 127.0.0.1:9; upsync {c}/v1/health/service/web upsync_type=consul_health upsync_interval=10ms; }}
         server {{ listen 127.0.0.1:{{{{port}}}}; location = /show {{ upstream_show; }}
                   location /cat {{ proxy_pass http://cat; }} location /hea {{ proxy_pass http://hea; }} }}",
        c = consul.http_addr()
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http));
    for (id, be, tags) in [("web-a", &a, serde_json::json!(["weight=3", "max_fails=5"])), ("web-b", &b, serde_json::json!(["backup"]))] {
        consul.register_service(&serde_json::json!({
            "ID": id, "Name": "web", "Address": "127.0.0.1", "Port": be.port(), "Tags": tags,
            "Check": { "CheckID": format!("{id}-ttl"), "TTL": "60s", "Status": "passing" }
        }));
    }
    wait_servers(&nginx, "cat", &[&a.host_port(), &b.host_port()]);
    wait_servers(&nginx, "hea", &[&a.host_port(), &b.host_port()]);
    let cat = show_json(&nginx, "cat");
    let sa = shown_server(&nginx, "cat", &a.host_port()).unwrap();
    assert_eq!((sa["weight"].as_u64(), sa["max_fails"].as_u64()), (Some(3), Some(5)), "{cat}");
    assert!(cat["servers"].as_array().unwrap().iter().any(|s| s["server"] == b.host_port() && s["backup"] == true), "{cat}");

    // A failing check marks the instance down in consul_health, not in consul_services.
    consul.ttl_check("web-a-ttl", "fail");
    wait_server_field(&nginx, "hea", &a.host_port(), "down", serde_json::json!(true));
    assert_eq!(all_ok(&nginx.url("/hea"), 5).get("b"), Some(&5), "the backup must serve when the only primary is down");
    assert_eq!(all_ok(&nginx.url("/cat"), 5).get("a"), Some(&5));
    consul.deregister_service("web-b");
    wait_servers(&nginx, "cat", &[&a.host_port()]);
}

/// upstream_show (text and JSON) and the dump file list servers in nginx-upsync-module's order:
/// a server that joins goes to the head, several joining in one answer in reverse order of
/// Consul's listing (keys in byte order), servers that stay keep their place.
#[test]
fn servers_are_listed_in_nginx_upsync_modules_order() {
    let dir = TestDir::new("sync_listing_order");
    let consul = Consul::start(dir.path());
    let dump = dir.join("app.dump");
    let nginx = Nginx::start(
        dir.path(),
        NginxConf::new(&http_block("app", &consul.http_addr(), "", &format!("upsync_dump_path {};", dump.display()))).workers(2),
    );
    let key = |host: &str| format!("upstreams/app/{host}:1");
    let put = |hosts: &[(&str, &str)]| consul.kv_put_many(&hosts.iter().map(|(h, v)| (key(h), v.to_string())).collect::<Vec<_>>());
    let listed = |want: &[&str]| {
        let want: Vec<String> = want.iter().map(|h| format!("{h}:1")).collect();
        wait_until(&format!("the listing {want:?}"), Duration::from_secs(20), || {
            let json: Vec<String> = show_json(&nginx, "app")["servers"]
                .as_array()
                .map(|a| a.iter().filter_map(|s| s["server"].as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            let text = http_get(&nginx.url("/show?upstream=app")).map(|r| r.1).unwrap_or_default();
            let text_order: Vec<String> = text
                .lines()
                .filter_map(|l| l.trim().strip_prefix("server "))
                .map(|l| l.split([' ', ';']).next().unwrap_or("").to_string())
                .collect();
            let dumped: Vec<String> = std::fs::read_to_string(&dump)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.strip_prefix("server ").map(|l| l.split([' ', ';']).next().unwrap_or("").to_string()))
                .collect();
            json == want && text_order == want && dumped == want
        });
    };
    put(&[("127.0.0.1", "")]);
    listed(&["127.0.0.1"]);
    // Two in one transaction: Consul lists .2 then .3; each goes to the head in turn.
    put(&[("127.0.0.2", ""), ("127.0.0.3", "")]);
    listed(&["127.0.0.3", "127.0.0.2", "127.0.0.1"]);
    // An update keeps its place.
    put(&[("127.0.0.2", r#"{"weight":5}"#)]);
    wait_server_field(&nginx, "app", "127.0.0.2:1", "weight", 5.into());
    listed(&["127.0.0.3", "127.0.0.2", "127.0.0.1"]);
    // A removal closes the gap.
    consul.kv_delete(&key("127.0.0.3"));
    listed(&["127.0.0.2", "127.0.0.1"]);
    // Byte order of the keys: "127.0.0.11:1" comes before "127.0.0.4:1".
    put(&[("127.0.0.4", ""), ("127.0.0.11", "")]);
    listed(&["127.0.0.4", "127.0.0.11", "127.0.0.2", "127.0.0.1"]);
}
