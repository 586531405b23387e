//! The stream module (`ngx_stream_upsync_module.so`) against a real Consul, real TCP and UDP
//! backends and real nginx `stream {}` proxies: changes in Consul reach new connections without
//! reload, an established connection to a removed server is not cut, one Consul connection per
//! watched upstream whatever the number of workers, and `upstream_show` in a stream server.
use std::time::Duration;

use upsync_tests::backend::Backend;
use upsync_tests::consul::Consul;
use upsync_tests::net::connections_to;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::stream::{
    stream_block, stream_show, stream_show_lines, udp_ask, wait_stream_server_line, wait_stream_servers, KeptConnection, UdpBackend,
};
use upsync_tests::upsync::{all_ok, delete_server, hits, http_block, put_server, upstream_block};
use upsync_tests::{wait_until, TestDir};

#[test]
fn tcp_add_remove_down_weight_reach_new_connections_and_established_ones_stay() {
    let dir = TestDir::new("stream_tcp");
    let consul = Consul::start(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let nginx = Nginx::start(dir.path(), NginxConf::new("").stream(&stream_block("app", &consul.http_addr(), "", "")).workers(4));
    let (master, workers) = (nginx.master_pid(), nginx.worker_pids());
    let (url, show) = (nginx.url("/"), nginx.extra_port(1));

    put_server(&consul, "app", &a.host_port(), r#"{"weight":1,"max_fails":2,"fail_timeout":10}"#);
    wait_stream_servers(show, "app", &[&a.host_port()]);
    assert_eq!(all_ok(&url, 10).get("a"), Some(&10));

    // Add b with three times a's weight: new connections go to both, more to b.
    put_server(&consul, "app", &b.host_port(), r#"{"weight":3}"#);
    wait_stream_servers(show, "app", &[&a.host_port(), &b.host_port()]);
    let h = all_ok(&url, 40);
    let (ha, hb) = (h.get("a").copied().unwrap_or(0), h.get("b").copied().unwrap_or(0));
    assert!(ha > 0 && hb > ha, "{h:?}");

    // Re-weight: upstream_show reports the new weight.
    put_server(&consul, "app", &b.host_port(), r#"{"weight":"1"}"#);
    wait_stream_server_line(show, "app", &b.host_port(), "weight=1 ");

    // Mark a down: only b gets new connections.
    put_server(&consul, "app", &a.host_port(), r#"{"down":1}"#);
    wait_stream_server_line(show, "app", &a.host_port(), "down");
    assert_eq!(all_ok(&url, 20).get("b"), Some(&20));

    // An established connection to b survives b's removal; new connections go to a.
    let mut kept = KeptConnection::open(nginx.port());
    assert_eq!(kept.get().unwrap(), "b");
    put_server(&consul, "app", &a.host_port(), "");
    delete_server(&consul, "app", &b.host_port());
    wait_stream_servers(show, "app", &[&a.host_port()]);
    assert_eq!(all_ok(&url, 20).get("a"), Some(&20));
    assert_eq!(kept.get().expect("the established connection to the removed server was cut"), "b");

    // No reload, and one Consul connection (one watched upstream) for the 4 workers.
    assert_eq!(nginx.master_pid(), master, "the master changed");
    assert_eq!(nginx.worker_pids(), workers, "workers were replaced: something reloaded nginx");
    let pids: Vec<u32> = std::iter::once(master).chain(workers).collect();
    wait_until("one Consul connection", Duration::from_secs(10), || connections_to(&pids, consul.ports.http) == 1);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(connections_to(&pids, consul.ports.http), 1, "more than one Consul connection for one watched upstream");
    }
    let log = nginx.error_log();
    assert!(!log.contains("[alert]") && !log.contains("[crit]"), "{log}");
}

/// A UDP upstream, beside a TCP one and an HTTP upstream synced by the HTTP module in the same
/// nginx (each module with its own zone and leader); syncing goes on after a reload.
#[test]
fn udp_upstream_follows_consul_beside_http_and_after_reload() {
    let dir = TestDir::new("stream_udp");
    let consul = Consul::start(dir.path());
    let (ua, ub) = (UdpBackend::start("ua"), UdpBackend::start("ub"));
    let web = Backend::start("web");
    let stream = format!(
        "{}\n{}
        server {{ listen 127.0.0.1:{{{{port2}}}} udp; proxy_pass dns; proxy_responses 1; proxy_timeout 2s; }}",
        stream_block("app", &consul.http_addr(), "", ""),
        upstream_block("dns", &consul.http_addr(), "", "")
    );
    // The HTTP server listens on {{port3}}: {{port}} is the stream proxy's.
    let http = http_block("web", &consul.http_addr(), "", "").replace("{{port}}", "{{port3}}");
    let conf = NginxConf::new(&http).stream(&stream).workers(2);
    let mut nginx = Nginx::start(dir.path(), conf.clone());
    let (show, udp) = (nginx.extra_port(1), nginx.extra_port(2));

    put_server(&consul, "dns", &ua.host_port(), "");
    put_server(&consul, "web", &web.host_port(), "");
    wait_stream_servers(show, "dns", &[&ua.host_port()]);
    for _ in 0..5 {
        assert_eq!(udp_ask(udp).as_deref(), Some("ua"));
    }
    let web_url = format!("http://127.0.0.1:{}/", nginx.extra_port(3));
    wait_until("the HTTP upstream synced beside the stream ones", Duration::from_secs(20), || hits(&web_url, 1).contains_key("web"));

    nginx.reload_with(conf);
    put_server(&consul, "dns", &ub.host_port(), "");
    delete_server(&consul, "dns", &ua.host_port());
    wait_stream_servers(show, "dns", &[&ub.host_port()]);
    for _ in 0..5 {
        assert_eq!(udp_ask(udp).as_deref(), Some("ub"));
    }
    assert_eq!(all_ok(&web_url, 5).get("web"), Some(&5));
    let log = nginx.error_log();
    assert!(!log.contains("[alert]") && !log.contains("[crit]") && !log.contains("panicked"), "{log}");
}

#[test]
fn catalog_and_health_sources_and_the_listing() {
    let dir = TestDir::new("stream_catalog");
    let consul = Consul::start(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let stream = format!(
        "upstream svc {{
            server 127.0.0.1:9;
            upsync {consul}/v1/health/service/svc upsync_type=consul_health upsync_timeout=30s upsync_interval=10ms;
            upsync_dump_path {{{{dir}}}}/servers_svc.conf;
            upsync_lb least_conn;
        }}
        upstream plain {{ server 127.0.0.1:9 weight=2; }}
        server {{ listen 127.0.0.1:{{{{port}}}}; proxy_pass svc; }}
        server {{ listen 127.0.0.1:{{{{port1}}}}; upstream_show; }}",
        consul = consul.http_addr()
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new("").stream(&stream).workers(2));
    let show = nginx.extra_port(1);
    let register = |id: &str, be: &Backend, tags: &[&str]| {
        consul.register_service(&serde_json::json!({
            "ID": id, "Name": "svc", "Address": "127.0.0.1", "Port": be.port(), "Tags": tags,
            "Check": {"CheckID": format!("check-{id}"), "TTL": "1h", "Status": "passing"}
        }))
    };
    register("svc-a", &a, &["weight=2"]);
    register("svc-b", &b, &[]);
    wait_stream_servers(show, "svc", &[&a.host_port(), &b.host_port()]);
    wait_stream_server_line(show, "svc", &a.host_port(), "weight=2 ");
    let h = all_ok(&nginx.url("/"), 20);
    assert!(h.contains_key("a") && h.contains_key("b"), "{h:?}");

    // A failing check marks the instance down.
    consul.ttl_check("check-svc-a", "fail");
    wait_stream_server_line(show, "svc", &a.host_port(), "down");
    assert_eq!(all_ok(&nginx.url("/"), 10).get("b"), Some(&10));

    // The listing has every stream upstream, synced or not; the dump file follows.
    let text = stream_show(show);
    assert_eq!(stream_show_lines(&text, "plain"), vec!["server 127.0.0.1:9 weight=2 max_fails=1 fail_timeout=10s;"], "{text}");
    wait_until("the dump file", Duration::from_secs(10), || {
        std::fs::read_to_string(dir.join("servers_svc.conf")).is_ok_and(|d| d.contains(&a.host_port()) && d.contains("down"))
    });
}

/// `nginx -t` checks the stream directives with the HTTP module's messages, and refuses what
/// the stream module does not do, saying what to use instead.
#[test]
fn stream_directives_are_checked_by_nginx_t() {
    let dir = TestDir::new("stream_config");
    let check = |name: &str, lines: &str| {
        let stream = format!(
            "upstream app {{ server 127.0.0.1:9; upsync 127.0.0.1:8500/v1/kv/upstreams/app; {lines} }}
             server {{ listen 127.0.0.1:{{{{port}}}}; proxy_pass app; }}"
        );
        Nginx::test_config(&dir.subdir(name), &NginxConf::new("").stream(&stream))
    };
    let ok = check("ok", "upsync_lb least_conn; upsync_dump_path servers.conf; upsync_allow_empty on;");
    assert!(ok.ok, "{}", ok.output);
    let hash = check("hash", "hash $remote_addr; upsync_lb hash_modula;");
    assert!(hash.ok, "{}", hash.output);
    for (name, lines, message) in [
        ("ip_hash", "upsync_lb ip_hash;", "stream module has no ip_hash"),
        ("ketama", "hash $remote_addr consistent; upsync_lb hash_ketama;", "hash_ketama is not supported in stream"),
        ("consistent", "hash $remote_addr consistent;", "\"hash ... consistent\" is not supported with upsync in stream"),
        ("modula", "upsync_lb hash_modula;", "needs nginx's \"hash KEY;\""),
        ("duplicate", "upsync_dump_path a; upsync_dump_path b;", "\"upsync_dump_path\" directive: is duplicate"),
    ] {
        let t = check(name, lines);
        assert!(!t.ok && t.output.contains(message), "{name}: expected \"{message}\":\n{}", t.output);
    }
}
