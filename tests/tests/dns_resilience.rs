//! upsync-dns when things go wrong: Consul stopped (answers continue, staleness reported),
//! malformed and truncated packets (FORMERR or silence, never a crash), SIGTERM, and bad
//! configurations.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use serde_json::json;
use upsync_tests::consul::Consul;
use upsync_tests::dns::{dig, send_raw, wait_dig, DnsOptions, DnsServer};
use upsync_tests::paths::workspace_bin;
use upsync_tests::{wait_until, TestDir};

#[test]
fn consul_stopped_answers_continue_and_staleness_is_reported() {
    let dir = TestDir::new("dns_consul_down");
    let mut consul = Consul::start(dir.path());
    let dns = DnsServer::start(dir.path(), &consul.http_addr(), DnsOptions::default());
    consul.register_service(&json!({"ID": "w1", "Name": "web", "Address": "127.0.0.61", "Port": 80}));
    wait_dig(&dns, "web registered", &["web.service.upsync.", "A"], |d| d.data("A") == ["127.0.0.61"]);
    assert_eq!(dns.metric("upsync_dns_consul_up"), Some(1.0));

    consul.kill();
    wait_until("upsync_dns_consul_up 0", Duration::from_secs(60), || dns.metric("upsync_dns_consul_up") == Some(0.0));
    for _ in 0..20 {
        let d = dns.dig(&["web.service.upsync.", "A"]);
        assert_eq!((d.status.as_str(), d.data("A")), ("NOERROR", vec!["127.0.0.61".to_string()]), "answers continue: {}", d.raw);
    }
    assert!(dns.dig(&["nope.service.upsync.", "A"]).is_nxdomain());
    wait_until("a staleness above zero", Duration::from_secs(60), || dns.metric("upsync_dns_snapshot_stale_seconds").unwrap_or(0.0) > 0.0);
    let h = dns.health();
    assert_eq!(h["status"], "stale", "{h}");
    assert!(dns.metric(r#"upsync_dns_consul_errors_total{watch="catalog-services"}"#).unwrap_or(0.0) >= 1.0, "{}", dns.metrics());
    assert!(dns.log().contains("answering from the last snapshot"), "the log says so:\n{}", dns.log());

    // Consul back (a dev agent restarts empty): the data follows Consul again.
    consul.restart();
    wait_until("upsync_dns_consul_up 1", Duration::from_secs(60), || dns.metric("upsync_dns_consul_up") == Some(1.0));
    assert!(dns.log().contains("Consul answers again"), "{}", dns.log());
    wait_dig(&dns, "the empty catalog served", &["web.service.upsync.", "A"], |d| d.is_nxdomain());
    consul.register_service(&json!({"ID": "w2", "Name": "web", "Address": "127.0.0.62", "Port": 80}));
    wait_dig(&dns, "a new registration served", &["web.service.upsync.", "A"], |d| d.data("A") == ["127.0.0.62"]);
}

#[test]
fn before_consul_answers_zone_names_get_servfail_not_nxdomain() {
    let dir = TestDir::new("dns_never_synced");
    // Nothing listens on this port: the server starts, but has never read Consul.
    let nobody = format!("127.0.0.1:{}", upsync_tests::net::free_port());
    let dns = DnsServer::start(dir.path(), &nobody, DnsOptions { no_wait_synced: true, ..Default::default() });
    let d = dns.dig(&["web.service.upsync.", "A"]);
    assert_eq!(d.status, "SERVFAIL", "a resolver must not cache an NXDOMAIN for a name we cannot know yet: {}", d.raw);
    assert_eq!(dns.health()["status"], "starting");
}

/// Datagrams that are not DNS queries, or broken ones.
/// How many of [`bad_packets`] are the named cases (the rest is noise).
const NAMED_PACKETS: usize = 11;

fn bad_packets() -> Vec<(&'static str, Vec<u8>)> {
    let query = {
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
        q.extend(b"\x03web\x07service\x06upsync\x00\x00\x01\x00\x01");
        q
    };
    let mut v = vec![
        ("empty", vec![]),
        ("one byte", vec![0x00]),
        ("eleven bytes", vec![0; 11]),
        ("header only, one question announced", query[..12].to_vec()),
        ("question cut inside a label", query[..17].to_vec()),
        ("question without type and class", query[..query.len() - 4].to_vec()),
        ("label longer than the packet", [&query[..12], &[0x3f, b'a', b'b']].concat()),
        ("compression pointer to itself", [&query[..12], &[0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01]].concat()),
        ("65535 questions announced", [&[0xab, 0xcd, 0x01, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0][..], &query[12..]].concat()),
        ("answer count without answers", [&[0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0x00, 0x05, 0, 0, 0, 0][..], &query[12..]].concat()),
        (
            "bad OPT record",
            [&[0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0x00, 0x01][..], &query[12..], &[0x00, 0x00, 0x29, 0x04]].concat(),
        ),
    ];
    // Deterministic noise.
    let mut x: u32 = 0x1234_5678;
    for len in [13usize, 40, 100, 300, 512, 1500] {
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        v.push(("random bytes", junk));
    }
    v
}

#[test]
fn malformed_and_truncated_packets_get_formerr_or_nothing() {
    let dir = TestDir::new("dns_malformed");
    let consul = Consul::start(dir.path());
    let mut dns = DnsServer::start(dir.path(), &consul.http_addr(), DnsOptions::default());
    for (i, (what, bytes)) in bad_packets().into_iter().enumerate() {
        // The named packets from the header on (a query header, QR=0, opcode QUERY) must get a
        // FORMERR; shorter ones and noise may be dropped, but never crash the server.
        let must_answer = i < NAMED_PACKETS && bytes.len() >= 12;
        match send_raw(dns.addr(), &bytes, Duration::from_millis(300)) {
            Some(answer) => {
                let m = Message::from_vec(&answer).unwrap_or_else(|e| panic!("{what}: the answer does not parse: {e}"));
                assert_eq!(m.metadata.response_code, ResponseCode::FormErr, "{what}: {m:?}");
                assert!(m.answers.is_empty(), "{what}");
            }
            None => assert!(!must_answer, "{what}: no answer (expected FORMERR)"),
        }
        assert!(dns.is_running(), "upsync-dns died on: {what}");
    }
    // A response (QR=1) is never answered (no reflection).
    let mut response = bad_packets()[5].1.clone();
    response[2] |= 0x80;
    assert_eq!(send_raw(dns.addr(), &response, Duration::from_millis(300)), None);

    // The same over TCP: a length prefix with junk, a prefix longer than what follows.
    for payload in
        [vec![0x00, 0x05, 1, 2, 3, 4, 5], vec![0xff, 0xff, 1, 2, 3], vec![0x00, 0x0c, 0xab, 0xcd, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]]
    {
        let mut s = TcpStream::connect(dns.addr()).expect("TCP connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        let _ = s.write_all(&payload);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        assert!(dns.is_running(), "upsync-dns died on TCP input {payload:?}");
    }
    let d = dig(dns.addr(), &["service.upsync.", "SOA"]);
    assert_eq!(d.status, "NOERROR", "still answering: {}", d.raw);
    assert!(dns.metric(r#"upsync_dns_dropped_total{reason="malformed"}"#).unwrap_or(0.0) >= 1.0);
    assert!(dns.metric(r#"upsync_dns_dropped_total{reason="response"}"#).unwrap_or(0.0) >= 1.0);
}

#[test]
fn sigterm_stops_gracefully() {
    let dir = TestDir::new("dns_sigterm");
    let consul = Consul::start(dir.path());
    let mut dns = DnsServer::start(dir.path(), &consul.http_addr(), DnsOptions::default());
    let status = dns.signal_and_wait(libc::SIGTERM, Duration::from_secs(20)).expect("exited after SIGTERM");
    assert!(status.success(), "exit status {status:?}; log:\n{}", dns.log());
    let log = dns.log();
    assert!(log.contains("SIGTERM: shutting down") && log.contains("stopped"), "{log}");
}

#[test]
fn check_config_accepts_good_files_and_names_mistakes() {
    let dir = TestDir::new("dns_check_config");
    let run = |args: &[&str]| {
        let out =
            Command::new(workspace_bin("upsync-dns")).args(args).env_remove("CONSUL_HTTP_TOKEN").output().expect("running upsync-dns");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let good = dir.join("good.toml");
    std::fs::write(&good, "[consul]\naddresses = [\"127.0.0.1:8500\"]\ntoken = \"s3cret-token\"\n[dns]\nlisten = [\"127.0.0.1:5353\"]\nzone = \"svc.example.\"\n[forward]\nupstreams = [\"127.0.0.1:5354\"]\n").unwrap();
    let (code, out) = run(&["--config", good.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("configuration OK") && out.contains("svc.example.") && out.contains("127.0.0.1:5354"), "{out}");
    assert!(!out.contains("s3cret-token"), "the token is never printed: {out}");
    let (code, out) =
        run(&["--consul", "127.0.0.1:8500,127.0.0.2:8500", "--listen", "127.0.0.1:5353", "--zone", "dc1.internal", "--check-config"]);
    assert_eq!(code, Some(0), "{out}");

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[dns]\nlisten = [\"127.0.0.1:5353\"]\nzonee = \"x\"\n").unwrap();
    let (code, out) = run(&["--config", bad.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("zonee") && out.contains("bad.toml"), "names the key and the file: {out}");
    let (code, out) = run(&["--zone", ".", "--check-config"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("root zone"), "{out}");
    let (code, out) = run(&["--config", "/nonexistent/upsync-dns.toml", "--check-config"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("/nonexistent/upsync-dns.toml"), "{out}");
    // The [consul] table shared with upsync-sidecar: its former flat TLS key still works, with
    // a warning naming the key to write; an unknown key is named with the keys there are.
    let former = dir.join("former.toml");
    std::fs::write(&former, "[consul]\naddresses = [\"https://127.0.0.1:8501\"]\nca_file = \"/etc/upsync/consul-ca.pem\"\n").unwrap();
    let (code, out) = run(&["--config", former.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("warning: [consul] ca_file is deprecated") && out.contains("tls.ca_file"), "{out}");
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "[consul]\nadresses = [\"127.0.0.1:8500\"]\n").unwrap();
    let (code, out) = run(&["--config", typo.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("unknown key `adresses`") && out.contains("typo.toml"), "{out}");
}
