//! The ground everything else stands on: the module loads into the real nginx, bad directives
//! are reported by `nginx -t`, nginx proxies to a real backend, and Consul answers.

use upsync_tests::backend::Backend;
use upsync_tests::consul::Consul;
use upsync_tests::net::http_get;
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::TestDir;

#[test]
fn module_loads_and_config_test_passes() {
    let dir = TestDir::new("module_loads");
    let conf = NginxConf::new(
        "upstream app { server 127.0.0.1:1; }
         server { listen 127.0.0.1:{{port}}; location / { proxy_pass http://app; } }",
    );
    let t = Nginx::test_config(dir.path(), &conf);
    assert!(t.ok, "nginx -t failed with the module loaded:\n{}", t.output);
    assert!(t.output.contains("test is successful"), "{}", t.output);
}

#[test]
fn malformed_directive_fails_config_test_with_a_clear_message() {
    let dir = TestDir::new("malformed_directive");
    let conf = NginxConf::new(
        "upstream app { server 127.0.0.1:1; upsync 127.0.0.1:8500 upsync_timeout=6m; }
         server { listen 127.0.0.1:{{port}}; location / { proxy_pass http://app; } }",
    );
    let t = Nginx::test_config(dir.path(), &conf);
    assert!(!t.ok, "nginx -t accepted an upsync address without a path:\n{}", t.output);
    assert!(t.output.contains("upsync"), "the message does not name the directive:\n{}", t.output);
    assert!(t.output.contains("127.0.0.1:8500"), "the message does not quote the bad value:\n{}", t.output);
    assert!(t.output.contains("nginx.conf:"), "the message has no file:line:\n{}", t.output);
}

#[test]
fn request_is_proxied_to_a_backend() {
    let dir = TestDir::new("proxied");
    let backend = Backend::start("alpha");
    let conf = NginxConf::new(&format!(
        "upstream app {{ server {}; }}
         server {{ listen 127.0.0.1:{{{{port}}}}; location / {{ proxy_pass http://app; }} }}",
        backend.host_port()
    ));
    let nginx = Nginx::start(dir.path(), conf);
    let (status, body) = http_get(&nginx.url("/")).expect("request through nginx");
    assert_eq!((status, body.as_str()), (200, "alpha"));
    assert_eq!(backend.requests(), 1);
}

#[test]
fn consul_kv_round_trip() {
    let dir = TestDir::new("consul_kv");
    let consul = Consul::start(dir.path());
    assert_eq!(consul.kv_get("upstreams/app/127.0.0.1:8080"), None);
    consul.kv_put("upstreams/app/127.0.0.1:8080", r#"{"weight":2}"#);
    assert_eq!(consul.kv_get("upstreams/app/127.0.0.1:8080").as_deref(), Some(r#"{"weight":2}"#));
    assert_eq!(consul.kv_keys("upstreams/"), vec!["upstreams/app/127.0.0.1:8080".to_string()]);
    consul.kv_delete_tree("upstreams/");
    assert!(consul.kv_keys("upstreams/").is_empty());
}
