//! `upsync-discovery` against Consul 1.8.7 with ACLs (default deny) and with HTTPS
//! (certificates made by `consul tls ca create` / `consul tls cert create`).
mod discovery_common;

use std::time::Duration;

use discovery_common::*;
use upsync_discovery::{fetch_once, Client, ConsulConfig, Error, Query, Secret, TlsOptions};
use upsync_tests::consul::{Consul, ConsulOptions, ConsulTls};
use upsync_tests::net::free_port;
use upsync_tests::TestDir;

fn kv(prefix: &str) -> Query {
    Query::Kv { prefix: prefix.to_string() }
}

#[test]
fn acl_token_with_read_on_the_prefix_works_and_no_token_is_reported_clearly() {
    let dir = TestDir::new("discovery_acl");
    let consul = Consul::start_with(dir.path(), ConsulOptions::with_acl());
    let token = consul.create_token("upstreams-read", r#"key_prefix "upstreams/" { policy = "list" }"#);
    consul.kv_put("upstreams/app/10.0.0.1:80", "");
    let base = || ConsulConfig::from_addresses(&consul.http_addr()).unwrap();

    // With the token: the watch works and follows changes.
    let cfg = ConsulConfig { token: Some(Secret::new(token.clone())), ..base() };
    assert!(!format!("{cfg:?}").contains(&token), "the token shows in Debug output");
    let with = WatchThread::start(Client::new(cfg).unwrap(), kv("upstreams/app"), opts());
    assert_eq!(addrs(&with.next_set(LONG).0), ["10.0.0.1:80"]);
    consul.kv_put("upstreams/app/10.0.0.2:80", "");
    assert_eq!(addrs(&with.next_set(LONG).0), ["10.0.0.1:80", "10.0.0.2:80"]);

    // Without a token (anonymous, denied by default) and with an unknown token: an ACL
    // error, reported as a watch event, that says so.
    let unknown = "00000000-0000-0000-0000-000000000000";
    for (label, tok) in [("no token", None), ("unknown token", Some(Secret::new(unknown)))] {
        let w = WatchThread::start(Client::new(ConsulConfig { token: tok, ..base() }).unwrap(), kv("upstreams/app"), opts());
        let err = w.next_error(LONG);
        let msg = err.to_string();
        eprintln!("{label}: {msg}");
        assert!(err.is_acl_denied() && !err.is_transient(), "{label}: {msg}");
        assert!(msg.contains(&format!("ACL token rejected by Consul at http://{}", consul.http_addr())), "{label}: {msg}");
        assert!(!msg.contains(&token) && !msg.contains(unknown), "{msg}");
    }

    // The token does not reach outside its prefix.
    let c = Client::new(ConsulConfig { token: Some(Secret::new(token.clone())), ..base() }).unwrap();
    let err = runtime().block_on(c.kv_put("other/key", b"x", None)).unwrap_err();
    assert!(err.is_acl_denied(), "{err}");
}

#[test]
fn acl_token_file_is_reread_when_it_changes() {
    let dir = TestDir::new("discovery_acl_file");
    let consul = Consul::start_with(dir.path(), ConsulOptions::with_acl());
    let token = consul.create_token("upstreams-read", r#"key_prefix "upstreams/" { policy = "list" }"#);
    consul.kv_put("upstreams/app/10.0.0.1:80", "");
    let file = dir.join("token");
    std::fs::write(&file, "11111111-2222-3333-4444-555555555555\n").unwrap();
    let cfg = ConsulConfig { token_file: Some(file.clone()), ..ConsulConfig::from_addresses(&consul.http_addr()).unwrap() };
    let w = WatchThread::start(Client::new(cfg).unwrap(), kv("upstreams/app"), opts());
    assert!(w.next_error(LONG).is_acl_denied());
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let (set, _) = w.until_set(LONG, "the watch to work with the new token", |s| s.len() == 1);
    assert_eq!(addrs(&set), ["10.0.0.1:80"]);

    let missing = ConsulConfig { token_file: Some(dir.join("nope")), ..ConsulConfig::from_addresses("127.0.0.1:1").unwrap() };
    let err = Client::new(missing).unwrap_err().to_string();
    assert!(err.contains("token file") && err.contains("nope"), "{err}");
}

#[test]
fn https_with_the_ca_and_a_client_certificate_works_and_fails_clearly_without() {
    let dir = TestDir::new("discovery_tls");
    let tls = ConsulTls::create(&dir.subdir("tls"));
    let https_port = free_port();
    let consul = Consul::start_with(dir.path(), ConsulOptions::default().with_https(&tls, https_port, true));
    consul.kv_put("secure/10.0.0.1:80", "");
    let full = TlsOptions {
        ca_file: Some(tls.ca_file.clone()),
        cert_file: Some(tls.client_cert.clone()),
        key_file: Some(tls.client_key.clone()),
        server_name: None,
    };
    let cfg = |addr: String, tls: Option<TlsOptions>| ConsulConfig { tls, ..ConsulConfig::from_addresses(&addr).unwrap() };

    // By IP (the certificate has 127.0.0.1) and by name (localhost), with a watch that follows
    // a change over TLS.
    for addr in [format!("https://127.0.0.1:{https_port}"), format!("https://localhost:{https_port}")] {
        let c = Client::new(cfg(addr.clone(), Some(full.clone()))).unwrap();
        let got = runtime().block_on(fetch_once(&c, &kv("secure"))).unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert_eq!(got.value.as_endpoints().unwrap().len(), 1, "{addr}");
    }
    let w =
        WatchThread::start(Client::new(cfg(format!("https://127.0.0.1:{https_port}"), Some(full.clone()))).unwrap(), kv("secure"), opts());
    assert_eq!(w.next_set(LONG).0.len(), 1);
    consul.kv_put("secure/10.0.0.2:80", "");
    assert_eq!(w.next_set(LONG).0.len(), 2);

    // Without the CA file the system roots do not trust Consul's CA.
    let no_ca = TlsOptions { ca_file: None, ..full.clone() };
    let err = fetch_err(cfg(format!("https://127.0.0.1:{https_port}"), Some(no_ca)));
    assert!(matches!(err, Error::Tls { .. }), "{err}");
    assert!(err.to_string().contains(&format!("TLS handshake with Consul at https://127.0.0.1:{https_port} failed")), "{err}");
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");

    // A name the certificate does not hold.
    let wrong_name = TlsOptions { server_name: Some("consul.example.org".into()), ..full.clone() };
    let err = fetch_err(cfg(format!("https://127.0.0.1:{https_port}"), Some(wrong_name)));
    assert!(matches!(err, Error::Tls { .. }) && err.to_string().contains("not valid for name"), "{err}");

    // Consul requires a client certificate (verify_incoming_https).
    let no_cert = TlsOptions { cert_file: None, key_file: None, ..full.clone() };
    let err = fetch_err(cfg(format!("https://127.0.0.1:{https_port}"), Some(no_cert)));
    assert!(matches!(err, Error::Tls { .. }) && err.to_string().to_lowercase().contains("certificate"), "{err}");

    // Plain HTTP to the HTTPS port.
    let err = fetch_err(cfg(format!("http://127.0.0.1:{https_port}"), None));
    eprintln!("plain HTTP to the HTTPS port: {err}");

    // A CA file that does not exist is a configuration error at construction.
    let bad = TlsOptions { ca_file: Some(dir.join("missing-ca.pem")), ..full };
    let err = Client::new(cfg(format!("https://127.0.0.1:{https_port}"), Some(bad))).unwrap_err().to_string();
    assert!(err.contains("missing-ca.pem"), "{err}");
}

fn fetch_err(cfg: ConsulConfig) -> Error {
    let cfg = ConsulConfig { connect_timeout: Duration::from_secs(10), ..cfg };
    let c = Client::new(cfg).unwrap();
    let err = runtime().block_on(fetch_once(&c, &kv("secure"))).expect_err("the request should have failed");
    eprintln!("{err}");
    err
}
