//! The nginx module against a Consul with ACLs (default deny) and one serving HTTPS with client
//! certificates: it syncs with the right token / certificates, reports clearly without them,
//! and never writes the token to the error log.
use std::time::Duration;

use upsync_tests::backend::Backend;
use upsync_tests::consul::{Consul, ConsulOptions, ConsulTls};
use upsync_tests::net::free_port;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::upsync::{all_ok, put_server, show_json, wait_servers};
use upsync_tests::{wait_until, TestDir};

fn block(name: &str, target: &str, lines: &str) -> String {
    format!(
        "upstream {name} {{ server 127.0.0.1:9; upsync {target}/v1/kv/upstreams/{name} upsync_interval=10ms upsync_timeout=30s; {lines} }}"
    )
}

fn server(locations: &[&str]) -> String {
    let locs: String = locations.iter().map(|n| format!("location /{n} {{ proxy_pass http://{n}; }}")).collect();
    format!("server {{ listen 127.0.0.1:{{{{port}}}}; location = /show {{ upstream_show; }} {locs} }}")
}

#[test]
fn acl_token_inline_or_from_a_file_and_a_clear_error_without_it() {
    let dir = TestDir::new("sec_acl");
    let consul = Consul::start_with(dir.path(), ConsulOptions::with_acl());
    let token = consul.create_token("upstreams-read", r#"key_prefix "upstreams/" { policy = "list" }"#);
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let a = Backend::start("a");
    for up in ["inline", "file", "none"] {
        put_server(&consul, up, &a.host_port(), "");
    }
    let http = format!(
        "{}\n{}\n{}\n{}",
        block("inline", &consul.http_addr(), &format!("upsync_token {token};")),
        block("file", &consul.http_addr(), &format!("upsync_token_file {};", token_file.display())),
        block("none", &consul.http_addr(), ""),
        server(&["inline", "file", "none"])
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http).log_level("debug"));
    wait_servers(&nginx, "inline", &[&a.host_port()]);
    wait_servers(&nginx, "file", &[&a.host_port()]);
    assert_eq!(all_ok(&nginx.url("/file"), 3).get("a"), Some(&3));
    wait_until("the ACL error of the upstream without token", Duration::from_secs(20), || {
        show_json(&nginx, "none")["sync"]["last_error"].as_str().is_some_and(|e| e.contains("ACL token rejected by Consul at"))
    });
    assert_eq!(show_json(&nginx, "none")["servers"][0]["server"], "127.0.0.1:9", "the placeholder must stay");
    let log = nginx.error_log();
    assert!(log.contains("ACL token rejected"), "{log}");
    assert!(!log.contains(&token), "the ACL token appears in the error log (at debug level)");
}

#[test]
fn https_with_ca_and_client_certificate() {
    let dir = TestDir::new("sec_tls");
    let tls = ConsulTls::create(&dir.subdir("tls"));
    let https_port = free_port();
    let consul = Consul::start_with(dir.path(), ConsulOptions::default().with_https(&tls, https_port, true));
    let a = Backend::start("a");
    for up in ["good", "nocert", "noca"] {
        put_server(&consul, up, &a.host_port(), "");
    }
    let target = format!("https://127.0.0.1:{https_port}");
    let http = format!(
        "{}\n{}\n{}\n{}",
        block(
            "good",
            &target,
            &format!("upsync_tls ca={} cert={} key={};", tls.ca_file.display(), tls.client_cert.display(), tls.client_key.display())
        ),
        block("nocert", &target, &format!("upsync_tls ca={};", tls.ca_file.display())),
        block("noca", &target, ""),
        server(&["good", "nocert", "noca"])
    );
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http));
    wait_servers(&nginx, "good", &[&a.host_port()]);
    assert_eq!(all_ok(&nginx.url("/good"), 3).get("a"), Some(&3));
    for up in ["nocert", "noca"] {
        wait_until(&format!("a TLS error for {up}"), Duration::from_secs(20), || {
            show_json(&nginx, up)["sync"]["last_error"].as_str().is_some_and(|e| !e.is_empty())
        });
        let e = show_json(&nginx, up)["sync"]["last_error"].as_str().unwrap().to_string();
        assert!(e.contains(&format!("127.0.0.1:{https_port}")), "{up}: the error does not name the address: {e}");
        eprintln!("{up}: {e}");
    }
}
