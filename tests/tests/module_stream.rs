//! The stream module (`ngx_stream_upsync_module.so`) against a real Consul, real TCP and UDP
//! backends and real nginx `stream {}` proxies: changes in Consul reach new connections without
//! reload, an established connection to a removed server is not cut, one Consul connection per
//! watched upstream whatever the number of workers, and `upstream_show` in a stream server;
//! `hash` and `hash ... consistent` map keys as a stock nginx stream with the same servers;
//! with `zone`, the workers share their servers' failure state.
use std::net::UdpSocket;
use std::time::Duration;

use upsync_tests::backend::Backend;
use upsync_tests::consul::Consul;
use upsync_tests::net::connections_to;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::stream::{
    stream_block, stream_show, stream_show_lines, udp_ask, wait_stream_server_line, wait_stream_servers, KeptConnection, UdpBackend,
};
use upsync_tests::upsync::{all_ok, delete_server, hits, http_block, put_server, sort_by_port, upstream_block};
use upsync_tests::{wait_for, wait_until, TestDir};

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
    wait_until("one Consul connection", Duration::from_secs(10), || connections_to(&nginx.process_pids(), consul.ports.http) == 1);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(connections_to(&nginx.process_pids(), consul.ports.http), 1, "more than one Consul connection for one watched upstream");
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
        server {{ listen 127.0.0.1:{{{{port1}}}}; upstream_show; }}
        server {{ listen 127.0.0.1:{{{{port2}}}}; upstream_show json; }}
        server {{ listen 127.0.0.1:{{{{port3}}}}; upstream_show prometheus; }}",
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

    // `upstream_show json;` and `upstream_show prometheus;`: the HTTP module's other forms.
    let json: serde_json::Value = serde_json::from_str(&stream_show(nginx.extra_port(2))).expect("upstream_show json is JSON");
    let svc = json["upstreams"].as_array().and_then(|u| u.iter().find(|u| u["name"] == "svc")).unwrap_or_else(|| panic!("{json}"));
    let a_view = svc["servers"].as_array().and_then(|v| v.iter().find(|s| s["server"] == a.host_port())).unwrap_or_else(|| panic!("{svc}"));
    assert_eq!((a_view["weight"].as_u64(), a_view["down"].as_bool()), (Some(2), Some(true)), "{svc}");
    assert!(svc["sync"].is_object() && json["worker_pid"].as_u64().is_some(), "{json}");
    let metrics = stream_show(nginx.extra_port(3));
    assert!(metrics.contains("upsync_nginx_upstream_servers{") && metrics.contains("upstream=\"svc\""), "{metrics}");
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
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
    for (name, lines) in [
        ("hash", "hash $remote_addr; upsync_lb hash_modula;"),
        ("ketama", "hash $remote_addr consistent; upsync_lb hash_ketama;"),
        ("consistent", "hash $remote_addr consistent;"),
        ("zone_consistent", "zone app 64k; hash $remote_addr consistent; upsync_lb hash_ketama;"),
    ] {
        let t = check(name, lines);
        assert!(t.ok, "{name}: {}", t.output);
    }
    for (name, lines, message) in [
        ("ip_hash", "upsync_lb ip_hash;", "stream module has no ip_hash"),
        ("ketama_alone", "upsync_lb hash_ketama;", "needs nginx's \"hash KEY consistent;\""),
        ("modula_consistent", "upsync_lb hash_modula; hash $remote_addr consistent;", "without \"consistent\""),
        ("modula", "upsync_lb hash_modula;", "needs nginx's \"hash KEY;\""),
        ("duplicate", "upsync_dump_path a; upsync_dump_path b;", "\"upsync_dump_path\" directive: is duplicate"),
        ("show_form", "} server { listen 127.0.0.1:1; upstream_show html; } upstream x { server 127.0.0.1:9;", "unknown format \"html\""),
    ] {
        let t = check(name, lines);
        assert!(!t.ok && t.output.contains(message), "{name}: expected \"{message}\":\n{}", t.output);
    }
}

/// A synced UDP upstream with `hash $remote_port consistent` (upsync_lb hash_ketama), one with
/// `hash $remote_port` (hash_modula) and one with `zone` and `hash $remote_port consistent`
/// (nginx >= 1.27.3 builds that ring on first use, not at configuration time), proxied on
/// `{{port1}}`, `{{port2}}` and `{{port3}}`; `upstream_show` on `{{port}}` (TCP: the test harness
/// waits for it).
fn hash_stream(consul: &str) -> String {
    format!(
        "{}\n{}\n{}
        server {{ listen 127.0.0.1:{{{{port}}}}; upstream_show; }}
        server {{ listen 127.0.0.1:{{{{port1}}}} udp; proxy_pass ring; proxy_responses 1; proxy_timeout 2s; }}
        server {{ listen 127.0.0.1:{{{{port2}}}} udp; proxy_pass modula; proxy_responses 1; proxy_timeout 2s; }}
        server {{ listen 127.0.0.1:{{{{port3}}}} udp; proxy_pass zring; proxy_responses 1; proxy_timeout 2s; }}",
        upstream_block("ring", consul, "", "upsync_lb hash_ketama; upsync_allow_empty on; hash $remote_port consistent;"),
        upstream_block("modula", consul, "", "upsync_lb hash_modula; upsync_allow_empty on; hash $remote_port;"),
        upstream_block("zring", consul, "", "zone zring 64k; upsync_lb hash_ketama; hash $remote_port consistent;"),
    )
}

/// A stock nginx stream (no module) with `servers` written in the same blocks.
fn stock_hash_stream(servers: &[String]) -> NginxConf {
    let lines: String = servers.iter().map(|s| format!("server {s};\n")).collect();
    let stream = format!(
        "upstream ring {{ hash $remote_port consistent; {lines} }}
        upstream modula {{ hash $remote_port; {lines} }}
        server {{ listen 127.0.0.1:{{{{port}}}}; return ok; }}
        server {{ listen 127.0.0.1:{{{{port1}}}} udp; proxy_pass ring; proxy_responses 1; proxy_timeout 2s; }}
        server {{ listen 127.0.0.1:{{{{port2}}}} udp; proxy_pass modula; proxy_responses 1; proxy_timeout 2s; }}"
    );
    NginxConf::new("").stream(&stream).workers(2).without_module()
}

/// The client ports used as hash keys (`$remote_port`): loopback ports below Linux's ephemeral
/// range, so that other tests' sockets rarely hold them; a port that cannot be bound is skipped.
const KEY_PORTS: std::ops::Range<u16> = 21_000..22_000;

/// For each key port, the UDP backend that answers a datagram sent from it to `port`: the same
/// client ports, so the same keys, on every nginx compared.
fn udp_mapping(port: u16, keys: &[u16]) -> Vec<Option<String>> {
    keys.iter()
        .map(|&k| {
            let sock = UdpSocket::bind(("127.0.0.1", k)).ok()?;
            sock.set_read_timeout(Some(Duration::from_secs(2))).expect("read timeout");
            sock.send_to(b"who", ("127.0.0.1", port)).expect("UDP send");
            let mut buf = [0u8; 256];
            sock.recv_from(&mut buf).ok().map(|(n, _)| String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .collect()
}

/// Keys (client ports) mapped to different backends; a key that got no answer from either
/// side (port busy) is not compared.
fn differences(a: &[Option<String>], b: &[Option<String>]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x.is_some() && y.is_some() && x != y).count()
}

/// `hash KEY consistent` and `hash KEY` in synced stream upstreams: every key goes to the server
/// a stock nginx stream with the same servers written in its configuration picks; adding one
/// server to ten moves about an eleventh of the keys, all to it.
#[test]
fn synced_stream_hash_upstreams_map_keys_as_stock_nginx_and_follow_changes() {
    let dir = TestDir::new("stream_hash");
    let consul = Consul::start(dir.path());
    let backends: Vec<UdpBackend> = (0..11).map(|i| UdpBackend::start(&format!("u{i}"))).collect();
    let synced = Nginx::start(&dir.subdir("synced"), NginxConf::new("").stream(&hash_stream(&consul.http_addr())).workers(2));
    let (show, ring, modula, zring) = (synced.port(), synced.extra_port(1), synced.extra_port(2), synced.extra_port(3));
    let mut addrs: Vec<String> = backends.iter().map(UdpBackend::host_port).collect();
    for a in &addrs[..10] {
        for upstream in ["ring", "modula", "zring"] {
            put_server(&consul, upstream, a, "");
        }
    }
    let ten: Vec<&str> = addrs[..10].iter().map(String::as_str).collect();
    for upstream in ["ring", "modula", "zring"] {
        wait_stream_servers(show, upstream, &ten);
    }
    // In the order the module lists peers (address, then port), for the order-dependent modula.
    let mut ten_sorted = addrs[..10].to_vec();
    sort_by_port(&mut ten_sorted);
    let stock = Nginx::start(&dir.subdir("stock10"), stock_hash_stream(&ten_sorted));
    let keys: Vec<u16> = KEY_PORTS.collect();

    let ring10 = udp_mapping(ring, &keys);
    let answered = ring10.iter().filter(|a| a.is_some()).count();
    assert!(answered >= keys.len() * 9 / 10, "only {answered} of {} keys answered", keys.len());
    assert_eq!(differences(&ring10, &udp_mapping(stock.extra_port(1), &keys)), 0, "consistent hash differs from stock nginx");
    assert_eq!(differences(&ring10, &udp_mapping(zring, &keys)), 0, "consistent hash with zone differs from stock nginx");
    let spread: std::collections::BTreeSet<&String> = ring10.iter().flatten().collect();
    assert_eq!(spread.len(), 10, "keys spread over {spread:?}");
    let modula_keys = &keys[..300];
    let modula10 = udp_mapping(modula, modula_keys);
    assert_eq!(differences(&modula10, &udp_mapping(stock.extra_port(2), modula_keys)), 0, "hash (modula) differs from stock nginx");
    drop(stock);

    // An 11th server: about 1/11 of the keys move, all to it; stock nginx with 11 agrees.
    let eleven: Vec<&str> = addrs.iter().map(String::as_str).collect();
    for upstream in ["ring", "modula", "zring"] {
        put_server(&consul, upstream, &addrs[10], "");
    }
    for upstream in ["ring", "modula", "zring"] {
        wait_stream_servers(show, upstream, &eleven);
    }
    let ring11 = udp_mapping(ring, &keys);
    let moved = differences(&ring10, &ring11);
    let fraction = moved as f64 / answered as f64;
    eprintln!("adding 1 server to 10 moved {moved} of {answered} keys ({:.2}%; 1/11 = 9.09%)", fraction * 100.0);
    assert!(fraction > 0.03 && fraction <= 1.0 / 11.0 + 0.03, "{fraction}");
    assert!(
        ring10.iter().zip(&ring11).filter(|(a, b)| a.is_some() && b.is_some() && a != b).all(|(_, b)| b.as_deref() == Some("u10")),
        "a key moved between old servers"
    );
    sort_by_port(&mut addrs);
    let stock = Nginx::start(&dir.subdir("stock11"), stock_hash_stream(&addrs));
    assert_eq!(differences(&ring11, &udp_mapping(stock.extra_port(1), &keys)), 0, "consistent hash differs from stock nginx at 11");
    assert_eq!(differences(&ring11, &udp_mapping(zring, &keys)), 0, "consistent hash with zone differs from stock nginx at 11");
    assert_eq!(
        differences(&udp_mapping(modula, modula_keys), &udp_mapping(stock.extra_port(2), modula_keys)),
        0,
        "hash (modula) differs at 11"
    );

    // Emptied (upsync_allow_empty on): no answer, never a crash (the placeholder is down).
    consul.kv_delete_tree("upstreams/ring/");
    consul.kv_delete_tree("upstreams/modula/");
    wait_stream_servers(show, "ring", &[]);
    wait_stream_servers(show, "modula", &[]);
    assert_eq!(udp_mapping(ring, &keys[..2]), vec![None, None]);
    assert!(synced.crashes().is_empty(), "{:?}", synced.crashes());
    let log = synced.error_log();
    assert!(!log.contains("[alert]") && !log.contains("[crit]") && !log.contains("panicked"), "{log}");
}

/// With `zone` in a synced stream upstream, the workers share their servers' failure state as
/// nginx's workers do for a static upstream with `zone`: with `max_fails=1`, the first failed
/// connection in any worker takes the server out of every worker's choice for `fail_timeout`.
#[test]
fn zone_shares_failures_between_stream_workers() {
    let dir = TestDir::new("stream_zone_fails");
    let consul = Consul::start(dir.path());
    let good = Backend::start("good");
    // A port nothing listens on: each try on it is a refused connection, a failure that the
    // stream proxy retries on the next server (proxy_next_upstream is on by default).
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let log = dir.path().join("upstream.log");
    let stream = format!(
        "log_format peers '$pid $upstream_addr';
         upstream app {{
             zone app 64k;
             server 127.0.0.1:9;
             upsync {c}/v1/kv/upstreams/app upsync_timeout=30s upsync_interval=10ms;
         }}
         server {{ listen 127.0.0.1:{{{{port}}}} reuseport; proxy_pass app; access_log {log} peers; }}
         server {{ listen 127.0.0.1:{{{{port1}}}}; upstream_show; }}",
        c = consul.http_addr(),
        log = log.display()
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new("").stream(&stream).workers(4));
    let params = r#"{"weight":1,"max_fails":1,"fail_timeout":60}"#;
    put_server(&consul, "app", &good.host_port(), params);
    put_server(&consul, "app", &refused, params);
    wait_stream_servers(nginx.extra_port(1), "app", &[&good.host_port(), &refused]);
    // Every connection succeeds (a try on the refused server is retried on the good one).
    let answers = all_ok(&nginx.url("/"), 200);
    assert_eq!(answers.get("good"), Some(&200), "{answers:?}");
    let lines = wait_for("the access log of 200 sessions", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        (lines.len() >= 200).then_some(lines)
    });
    let pids: std::collections::BTreeSet<&str> = lines.iter().filter_map(|l| l.split(' ').next()).collect();
    let tries_on_refused = lines.iter().filter(|l| l.contains(&refused)).count();
    // The test means something only if several workers served connections.
    assert!(pids.len() >= 2, "only worker(s) {pids:?} served the 200 connections; reuseport should spread them");
    assert_eq!(
        tries_on_refused,
        1,
        "after its first failure the refused server must be avoided by all {} workers that served: {lines:?}",
        pids.len()
    );
}

/// A list over 32 KiB (4,000 servers) is built on a builder thread, as in HTTP, and installed by
/// the event loop: it reaches new connections, and so does the next change of it.
#[test]
fn a_large_stream_list_is_built_off_the_event_loop_and_reaches_connections() {
    let dir = TestDir::new("stream_big");
    let consul = Consul::start(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    // One worker: the listing is the list that worker balances (installed, not being built).
    let nginx = Nginx::start(dir.path(), NginxConf::new("").stream(&stream_block("app", &consul.http_addr(), "", "")).workers(1));
    let (url, show) = (nginx.url("/"), nginx.extra_port(1));
    let down: Vec<(String, String)> =
        (0..4000).map(|i| (format!("upstreams/app/127.0.{}.{}:9", 1 + i / 250, 1 + i % 250), r#"{"down":1}"#.to_string())).collect();
    consul.kv_put_many(&down);
    put_server(&consul, "app", &a.host_port(), "");
    let listed = |addr: &str| {
        let lines = stream_show_lines(&stream_show(show), "app");
        (lines.len(), lines.iter().any(|l| l.starts_with(&format!("server {addr} "))))
    };
    wait_until("the 4,001 servers listed", Duration::from_secs(30), || listed(&a.host_port()) == (4001, true));
    assert_eq!(all_ok(&url, 20).get("a"), Some(&20));

    put_server(&consul, "app", &b.host_port(), "");
    delete_server(&consul, "app", &a.host_port());
    wait_until("b instead of a", Duration::from_secs(30), || listed(&b.host_port()) == (4001, true));
    assert_eq!(all_ok(&url, 20).get("b"), Some(&20));
    assert!(nginx.crashes().is_empty(), "{:?}", nginx.crashes());
}
